//! One set of rules for where the Kubernetes client comes from, for every command.

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

/// The client, if the process has a cluster: `--kubeconfig`, then
/// `KUBECONFIG`, then the pod's service account. `None` when none of them
/// is there (the server then runs standalone).
pub async fn optional(kubeconfig: Option<&Path>) -> Result<Option<kube::Client>> {
    let config = match kubeconfig {
        Some(path) => kubeconfig_file(path).await?,
        None => match std::env::var_os("KUBECONFIG") {
            Some(path) if !path.is_empty() => kubeconfig_file(Path::new(&path)).await?,
            _ if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() => {
                kube::Config::incluster().context("reading the pod's service account")?
            }
            _ => return Ok(None),
        },
    };
    Ok(Some(kube::Client::try_from(config)?))
}

/// The client, for commands that cannot work without a cluster: as
/// [`optional`], and also `~/.kube/config` as kubectl reads it.
pub async fn required(kubeconfig: Option<&Path>) -> Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => kubeconfig_file(path).await?,
        None => kube::Config::infer()
            .await
            .context("no kubeconfig: give --kubeconfig, set KUBECONFIG or run in a pod")?,
    };
    Ok(kube::Client::try_from(config)?)
}
