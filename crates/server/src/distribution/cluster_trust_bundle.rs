//! Root distribution through the ClusterTrustBundle API (the newer form of
//! `istio-ca-root-cert`), as istiod does it with
//! `ENABLE_CLUSTER_TRUST_BUNDLE_API`: one cluster-scoped object named
//! `istio.io:istiod-ca:root-cert` with signer `istio.io/istiod-ca` whose
//! `trustBundle` is the roots workloads trust. Pods read it through a
//! `clusterTrustBundle` projected volume.
//!
//! Needs `certificates.k8s.io/v1beta1` (Kubernetes 1.33+, feature gate
//! `ClusterTrustBundle`) and the `attest` verb on the signer.

use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::certificates::v1beta1::ClusterTrustBundle;
use kube::api::Api;
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::watch;

use meshca_kube::{LastError, apply, cluster_trust_bundle};

/// Istio's names.
pub const BUNDLE_NAME: &str = "istio.io:istiod-ca:root-cert";
pub const SIGNER_NAME: &str = "istio.io/istiod-ca";

/// Everything is re-checked this often even without events, so a missed
/// watch event cannot leave a stale bundle for long.
const RESYNC: Duration = Duration::from_secs(300);

/// What the cluster needs.
pub use meshca_kube::cluster_trust_bundle::Plan;

/// The bundle as the server wants it (planning shared with the signer's
/// bundles in meshca-kube).
pub fn desired(roots_pem: &str) -> ClusterTrustBundle {
    cluster_trust_bundle::desired(
        BUNDLE_NAME,
        SIGNER_NAME,
        roots_pem,
        Default::default(),
        Default::default(),
    )
}

pub fn plan(existing: Option<&ClusterTrustBundle>, roots_pem: &str) -> Plan {
    cluster_trust_bundle::plan(existing, &desired(roots_pem))
}

async fn sync(api: &Api<ClusterTrustBundle>, roots_pem: &str) -> Result<(), kube::Error> {
    let existing = api.get_opt(BUNDLE_NAME).await?;
    if plan(existing.as_ref(), roots_pem) == Plan::Apply {
        apply::apply(api, apply::SERVER, &desired(roots_pem)).await?;
        let action = if existing.is_some() {
            "re-synced"
        } else {
            "created"
        };
        tracing::info!("{action} ClusterTrustBundle {BUNDLE_NAME}");
    }
    Ok(())
}

/// Runs until dropped: keeps the bundle equal to the latest `roots`, put
/// back when someone changes or deletes it.
pub async fn run(client: kube::Client, mut roots: watch::Receiver<String>) {
    let api = Api::<ClusterTrustBundle>::all(client);
    let mut events = watcher(
        api.clone(),
        watcher::Config::default().fields(&format!("metadata.name={BUNDLE_NAME}")),
    )
    .default_backoff()
    .boxed();
    let mut last_error = LastError::default();
    loop {
        let root = roots.borrow_and_update().clone();
        let delay = if root.is_empty() {
            RESYNC
        } else {
            match sync(&api, &root).await {
                Ok(()) => {
                    last_error.clear();
                    RESYNC
                }
                Err(e) => {
                    if last_error.is_new(&e) {
                        tracing::warn!(
                            error = %e,
                            "ClusterTrustBundle {BUNDLE_NAME}: sync failed (API enabled? RBAC: \
                             the Helm chart with server.clusterTrustBundle=true); retrying"
                        );
                    } else {
                        tracing::debug!(error = %e, "ClusterTrustBundle sync");
                    }
                    Duration::from_secs(2)
                }
            }
        };
        tokio::select! {
            changed = roots.changed() => if changed.is_err() { return },
            // Our own writes come back here too: one cheap GET each.
            _ = events.next() => {}
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROOT: &str = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";

    #[test]
    fn a_missing_bundle_is_applied_with_istios_name_and_signer() {
        assert_eq!(plan(None, ROOT), Plan::Apply);
        assert_eq!(
            serde_json::to_value(desired(ROOT)).unwrap(),
            serde_json::json!({
                "apiVersion": "certificates.k8s.io/v1beta1",
                "kind": "ClusterTrustBundle",
                "metadata": { "name": "istio.io:istiod-ca:root-cert" },
                "spec": { "signerName": "istio.io/istiod-ca", "trustBundle": ROOT },
            })
        );
    }

    #[test]
    fn an_equal_bundle_is_left_alone_and_another_is_applied_again() {
        let mut existing = desired(ROOT);
        existing.metadata.resource_version = Some("7".into());
        assert_eq!(plan(Some(&existing), ROOT), Plan::InSync);
        let other = ROOT.replace("AAAA", "BBBB");
        assert_eq!(plan(Some(&existing), &other), Plan::Apply);
    }
}
