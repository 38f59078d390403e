//! Root distribution: the ConfigMap `istio-ca-root-cert` in every namespace
//! ([`configmap`]) and optionally the ClusterTrustBundle
//! ([`cluster_trust_bundle`]), written by one replica at a time.
//!
//! istiod runs its namespace controller under leader election; meshca does
//! too, for the same reason: during a root change, replicas reload the CA
//! files at slightly different moments, and two writers with different roots
//! would make the ConfigMaps flap (each write also wakes every kubelet that
//! mounts them). Correctness does not depend on the lease: every write is a
//! server-side apply of the whole intent (field manager `meshca-server`), so
//! the roots of the last writer win and the next check fixes a stale one.

pub mod cluster_trust_bundle;
pub mod configmap;
pub mod spiffe_bundle;

use meshca_kube::{CancellationToken, Elector, LeaderElection};
use tokio::sync::watch;

#[derive(Debug, Clone)]
pub struct DistributionConfig {
    /// ConfigMap `istio-ca-root-cert` in every namespace.
    pub configmaps: bool,
    /// ClusterTrustBundle `istio.io:istiod-ca:root-cert`.
    pub cluster_trust_bundle: bool,
    /// `None`: this replica always writes (one replica, or tests).
    pub election: Option<LeaderElection>,
}

impl DistributionConfig {
    pub fn enabled(&self) -> bool {
        self.configmaps || self.cluster_trust_bundle
    }
}

async fn distribute(
    client: kube::Client,
    roots: watch::Receiver<String>,
    cfg: &DistributionConfig,
) {
    let configmaps = async {
        if cfg.configmaps {
            configmap::run(client.clone(), roots.clone()).await;
        }
    };
    let bundle = async {
        if cfg.cluster_trust_bundle {
            cluster_trust_bundle::run(client.clone(), roots.clone()).await;
        }
    };
    tokio::join!(configmaps, bundle);
}

/// Runs until `stop` is cancelled: while this replica holds the lease (or
/// always, without election), keeps the roots distributed. On stop the
/// lease is released, so another replica takes over at once instead of
/// after the lease duration.
pub async fn run(
    client: kube::Client,
    roots: watch::Receiver<String>,
    cfg: DistributionConfig,
    stop: CancellationToken,
) {
    if !cfg.enabled() {
        return;
    }
    let Some(election) = cfg.election.clone() else {
        tokio::select! {
            _ = distribute(client, roots, &cfg) => {}
            _ = stop.cancelled() => {}
        }
        return;
    };
    let mut elector = Elector::new(client.clone(), election);
    let lead = async {
        loop {
            elector.acquire().await;
            tracing::info!("distributing the roots (lease holder)");
            tokio::select! {
                _ = distribute(client.clone(), roots.clone(), &cfg) => return,
                _ = elector.hold() => {
                    tracing::warn!("lost the root distribution lease; another replica writes now");
                }
            }
        }
    };
    tokio::select! {
        _ = lead => {}
        _ = stop.cancelled() => {}
    }
    elector.release().await;
}
