//! Root distribution, as istiod does it: ConfigMap `istio-ca-root-cert`
//! (key `root-cert.pem`, label `istio.io/config: "true"`) in every
//! namespace, so that workloads can verify the CA's TLS.
//!
//! A kube-runtime controller over Namespaces: a new namespace gets the
//! ConfigMap; a ConfigMap changed or deleted by someone else (watched by
//! name through a field selector) is put back; a root change (the CA files
//! reloaded) re-syncs every namespace. The decision is [`plan`], a pure
//! function. Each completed list of the ConfigMaps (the first, and after
//! every re-list) also re-checks every namespace: a ConfigMap deleted before
//! that list produces no event, and the namespace may have been checked
//! before the deletion. Only the lease holder runs this ([`crate::distribution`]).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use tokio::sync::watch;

use meshca_kube::{LastError, apply};

/// Istio's names.
pub const CONFIGMAP_NAME: &str = "istio-ca-root-cert";
pub const DATA_KEY: &str = "root-cert.pem";
pub const LABEL_KEY: &str = "istio.io/config";
pub const LABEL_VALUE: &str = "true";
/// Namespaces istiod leaves alone (its `inject.IgnoredNamespaces`).
pub const IGNORED_NAMESPACES: [&str; 4] = [
    "kube-system",
    "kube-public",
    "kube-node-lease",
    "local-path-storage",
];

/// What a namespace needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    InSync,
    /// Server-side apply [`desired`]: creates the ConfigMap, or puts the
    /// root and the label back; keys and labels others own stay.
    Apply,
    /// `binaryData` holds the key too, which would make the object invalid:
    /// remove that key, then apply.
    DropBinaryKeyThenApply,
}

/// The ConfigMap istiod would create: all that meshca applies.
pub fn desired(namespace: &str, root_pem: &str) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(CONFIGMAP_NAME.into()),
            namespace: Some(namespace.into()),
            labels: Some(BTreeMap::from([(LABEL_KEY.into(), LABEL_VALUE.into())])),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(DATA_KEY.into(), root_pem.into())])),
        ..Default::default()
    }
}

/// Compares what is there with what should be: the root under its key and
/// the label. Other keys and labels someone added do not count. A write
/// happens only when something differs: a resync of 10,000 namespaces costs
/// reads, not writes.
pub fn plan(existing: Option<&ConfigMap>, root_pem: &str) -> Plan {
    let Some(existing) = existing else {
        return Plan::Apply;
    };
    let data_ok = existing
        .data
        .as_ref()
        .and_then(|d| d.get(DATA_KEY))
        .is_some_and(|v| v == root_pem);
    let label_ok = existing
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(LABEL_KEY))
        .is_some_and(|v| v == LABEL_VALUE);
    let binary_clash = existing
        .binary_data
        .as_ref()
        .is_some_and(|b| b.contains_key(DATA_KEY));
    match (binary_clash, data_ok && label_ok) {
        (true, _) => Plan::DropBinaryKeyThenApply,
        (false, true) => Plan::InSync,
        (false, false) => Plan::Apply,
    }
}

/// Whether a namespace gets the ConfigMap: not an ignored system namespace,
/// not being deleted.
pub fn manages(ns: &Namespace) -> bool {
    let name = ns.metadata.name.as_deref().unwrap_or_default();
    let terminating = ns.metadata.deletion_timestamp.is_some()
        || ns.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Terminating");
    !name.is_empty() && !IGNORED_NAMESPACES.contains(&name) && !terminating
}

/// The roots workloads should trust, each certificate once, in order.
pub fn merge_roots(sets: &[&str]) -> String {
    let mut seen = Vec::new();
    let mut out = String::new();
    for set in sets {
        for block in meshca_pki::pem::parse_all(set.as_bytes()).unwrap_or_default() {
            let der = block.der.to_vec();
            if block.label == "CERTIFICATE" && !seen.contains(&der) {
                out.push_str(&meshca_pki::pem::encode("CERTIFICATE", &der));
                seen.push(der);
            }
        }
    }
    out
}

struct Context {
    client: kube::Client,
    roots: watch::Receiver<String>,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct SyncError(#[from] kube::Error);

async fn reconcile(ns: Arc<Namespace>, ctx: Arc<Context>) -> Result<Action, SyncError> {
    if !manages(&ns) {
        return Ok(Action::await_change());
    }
    let name = ns.metadata.name.clone().unwrap_or_default();
    let root = ctx.roots.borrow().clone();
    if root.is_empty() {
        return Ok(Action::await_change());
    }
    let api = Api::<ConfigMap>::namespaced(ctx.client.clone(), &name);
    let existing = api.get_opt(CONFIGMAP_NAME).await?;
    let plan = plan(existing.as_ref(), &root);
    if plan == Plan::InSync {
        return Ok(Action::await_change());
    }
    if plan == Plan::DropBinaryKeyThenApply {
        // Apply leaves fields of other managers alone; this one must go.
        let patch = serde_json::json!({ "binaryData": { DATA_KEY: null } });
        api.patch(
            CONFIGMAP_NAME,
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?;
    }
    apply::apply(&api, apply::SERVER, &desired(&name, &root)).await?;
    let action = if existing.is_some() {
        "re-synced"
    } else {
        "created"
    };
    tracing::info!(namespace = %name, "{action} {CONFIGMAP_NAME}");
    Ok(Action::await_change())
}

fn error_policy(ns: Arc<Namespace>, e: &SyncError, _: Arc<Context>) -> Action {
    let name = ns.metadata.name.as_deref().unwrap_or_default();
    tracing::warn!(namespace = %name, error = %e, "{CONFIGMAP_NAME}: sync failed; retrying");
    Action::requeue(Duration::from_secs(2))
}

/// Runs until the process ends: keeps `istio-ca-root-cert` equal to the
/// latest value of `roots` in every namespace.
pub async fn run(client: kube::Client, roots: watch::Receiver<String>) {
    let namespaces = Api::<Namespace>::all(client.clone());
    let configmaps = Api::<ConfigMap>::all(client.clone());
    let root_changes = futures::stream::unfold(roots.clone(), |mut rx| async move {
        rx.changed().await.ok()?;
        Some(((), rx))
    });
    let (listed_tx, listed_rx) = futures::channel::mpsc::unbounded::<()>();
    let configmap_events = watcher(
        configmaps,
        watcher::Config::default().fields(&format!("metadata.name={CONFIGMAP_NAME}")),
    )
    .default_backoff()
    .filter_map(move |event| {
        let touched = match event {
            Ok(
                watcher::Event::Apply(cm)
                | watcher::Event::InitApply(cm)
                | watcher::Event::Delete(cm),
            ) => Some(Ok(cm)),
            Ok(watcher::Event::InitDone) => {
                let _ = listed_tx.unbounded_send(());
                None
            }
            Ok(watcher::Event::Init) => None,
            Err(e) => Some(Err(e)),
        };
        std::future::ready(touched)
    });
    let ctx = Arc::new(Context { client, roots });
    let mut last_error = LastError::default();
    Controller::new(namespaces, watcher::Config::default())
        .watches_stream(configmap_events, |cm: ConfigMap| {
            cm.metadata.namespace.map(|ns| ObjectRef::new(&ns))
        })
        .reconcile_all_on(futures::stream::select(root_changes, listed_rx))
        .run(reconcile, error_policy, ctx)
        .for_each(move |result| {
            match result {
                // An event for a namespace already gone: nothing to do.
                Err(controller::Error::ObjectNotFound(_)) => {}
                Err(controller::Error::ReconcilerFailed(..)) => {} // logged by error_policy
                // Watch errors (e.g. missing RBAC) are retried with backoff.
                Err(e) if last_error.is_new(&e) => {
                    tracing::warn!(
                        error = %e,
                        "{CONFIGMAP_NAME}: cannot watch namespaces/ConfigMaps (RBAC: \
                         the Helm chart's root-configmap ClusterRole; or --no-root-configmap); retrying"
                    );
                }
                Err(e) => tracing::debug!(error = %e, "{CONFIGMAP_NAME} controller"),
                Ok(_) => last_error.clear(),
            }
            std::future::ready(())
        })
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;
    use k8s_openapi::api::core::v1::NamespaceStatus;

    const ROOT: &str = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";

    #[test]
    fn a_missing_configmap_is_applied_in_istios_shape() {
        assert_eq!(plan(None, ROOT), Plan::Apply);
        // All of it, nothing else: whatever the body holds, meshca owns.
        let body = serde_json::to_value(desired("app", ROOT)).unwrap();
        assert_eq!(
            body,
            serde_json::json!({
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {
                    "name": "istio-ca-root-cert",
                    "namespace": "app",
                    "labels": { "istio.io/config": "true" },
                },
                "data": { "root-cert.pem": ROOT },
            })
        );
    }

    #[test]
    fn an_equal_configmap_is_left_alone_and_a_tampered_one_is_applied_again() {
        let mut cm = desired("app", ROOT);
        assert_eq!(plan(Some(&cm), ROOT), Plan::InSync);

        // Keys and labels of others do not make a write.
        cm.data
            .as_mut()
            .unwrap()
            .insert("extra".into(), "kept".into());
        cm.metadata
            .labels
            .as_mut()
            .unwrap()
            .insert("team".into(), "a".into());
        assert_eq!(plan(Some(&cm), ROOT), Plan::InSync);

        let mut tampered = cm.clone();
        tampered
            .data
            .as_mut()
            .unwrap()
            .insert(DATA_KEY.into(), "evil".into());
        assert_eq!(plan(Some(&tampered), ROOT), Plan::Apply);

        let mut unlabeled = cm.clone();
        unlabeled.metadata.labels = None;
        assert_eq!(plan(Some(&unlabeled), ROOT), Plan::Apply);

        let mut emptied = cm.clone();
        emptied.data = None;
        assert_eq!(plan(Some(&emptied), ROOT), Plan::Apply);

        // The same key in binaryData would make the object invalid.
        let mut binary = cm.clone();
        binary.binary_data = Some(BTreeMap::from([(
            DATA_KEY.to_string(),
            ByteString(b"x".to_vec()),
        )]));
        assert_eq!(plan(Some(&binary), ROOT), Plan::DropBinaryKeyThenApply);

        // A new root re-syncs.
        let other = ROOT.replace("AAAA", "BBBB");
        assert_eq!(plan(Some(&cm), &other), Plan::Apply);
    }

    #[test]
    fn system_and_terminating_namespaces_are_skipped() {
        let ns = |name: &str, phase: Option<&str>| Namespace {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            status: Some(NamespaceStatus {
                phase: phase.map(Into::into),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(manages(&ns("app", Some("Active"))));
        assert!(manages(&ns("default", None)));
        assert!(!manages(&ns("kube-system", Some("Active"))));
        assert!(!manages(&ns("app", Some("Terminating"))));
    }

    #[test]
    fn roots_are_merged_without_duplicates() {
        let a = meshca_pki::pem::encode("CERTIFICATE", b"a");
        let b = meshca_pki::pem::encode("CERTIFICATE", b"b");
        let merged = merge_roots(&[&format!("{a}{b}"), &b, &a]);
        assert_eq!(merged, format!("{a}{b}"));
    }
}
