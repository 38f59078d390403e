//! Glue shared by the long-running subcommands (`server`, `signer`): the
//! Kubernetes client configuration and the shutdown signal.

use std::path::Path;

use anyhow::{Context, Result};

/// The client configuration of an explicit kubeconfig file.
pub async fn kubeconfig_file(path: &Path) -> Result<kube::Config> {
    let file = kube::config::Kubeconfig::read_from(path)
        .with_context(|| format!("reading {}", path.display()))?;
    Ok(
        kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
            .await?,
    )
}

/// Resolves on SIGTERM (what Kubernetes sends) or Ctrl-C.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
