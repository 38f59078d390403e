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
use k8s_openapi::api::certificates::v1beta1::{ClusterTrustBundle, ClusterTrustBundleSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::watch;

use meshca_kube::LastError;

/// Istio's names.
pub const BUNDLE_NAME: &str = "istio.io:istiod-ca:root-cert";
pub const SIGNER_NAME: &str = "istio.io/istiod-ca";

/// Everything is re-checked this often even without events, so a missed
/// watch event cannot leave a stale bundle for long.
const RESYNC: Duration = Duration::from_secs(300);

/// What the cluster needs.
#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    InSync,
    Create(ClusterTrustBundle),
    /// Replace the existing object, resourceVersion kept (a concurrent change
    /// conflicts and is retried).
    Update(ClusterTrustBundle),
}

pub fn desired(roots_pem: &str) -> ClusterTrustBundle {
    ClusterTrustBundle {
        metadata: ObjectMeta {
            name: Some(BUNDLE_NAME.into()),
            ..Default::default()
        },
        spec: ClusterTrustBundleSpec {
            signer_name: Some(SIGNER_NAME.into()),
            trust_bundle: roots_pem.into(),
        },
    }
}

/// The API refuses a name prefixed `istio.io:istiod-ca:` with any other
/// signer, and the signer is immutable, so only the bundle can differ.
pub fn plan(existing: Option<&ClusterTrustBundle>, roots_pem: &str) -> Plan {
    match existing {
        None => Plan::Create(desired(roots_pem)),
        Some(b) if b.spec.trust_bundle == roots_pem => Plan::InSync,
        Some(b) => {
            let mut fixed = b.clone();
            fixed.spec.trust_bundle = roots_pem.into();
            fixed.metadata.managed_fields = None;
            Plan::Update(fixed)
        }
    }
}

async fn sync(api: &Api<ClusterTrustBundle>, roots_pem: &str) -> Result<(), kube::Error> {
    match plan(api.get_opt(BUNDLE_NAME).await?.as_ref(), roots_pem) {
        Plan::InSync => Ok(()),
        Plan::Create(bundle) => {
            api.create(&PostParams::default(), &bundle).await?;
            tracing::info!("created ClusterTrustBundle {BUNDLE_NAME}");
            Ok(())
        }
        Plan::Update(bundle) => {
            api.replace(BUNDLE_NAME, &PostParams::default(), &bundle)
                .await?;
            tracing::info!("re-synced ClusterTrustBundle {BUNDLE_NAME}");
            Ok(())
        }
    }
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
                             deploy/server/rbac-cluster-trust-bundle.yaml); retrying"
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
    fn a_missing_bundle_is_created_with_istios_name_and_signer() {
        let Plan::Create(b) = plan(None, ROOT) else {
            panic!("expected Create");
        };
        assert_eq!(
            b.metadata.name.as_deref(),
            Some("istio.io:istiod-ca:root-cert")
        );
        assert_eq!(b.spec.signer_name.as_deref(), Some("istio.io/istiod-ca"));
        assert_eq!(b.spec.trust_bundle, ROOT);
    }

    #[test]
    fn an_equal_bundle_is_left_alone_and_another_is_replaced_keeping_its_version() {
        let mut existing = desired(ROOT);
        existing.metadata.resource_version = Some("7".into());
        assert_eq!(plan(Some(&existing), ROOT), Plan::InSync);
        let other = ROOT.replace("AAAA", "BBBB");
        let Plan::Update(fixed) = plan(Some(&existing), &other) else {
            panic!("expected Update");
        };
        assert_eq!(fixed.spec.trust_bundle, other);
        assert_eq!(fixed.metadata.resource_version.as_deref(), Some("7"));
    }
}
