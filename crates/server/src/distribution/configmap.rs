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
//!
//! Cost at 10,000 namespaces (BENCHMARKS.md, Scale): the check reads no
//! API. The ConfigMap watch keeps, per namespace, only what [`plan`] needs
//! ([`Observed`]: a SHA-256 of the root, two flags), not the PEM; the
//! namespaces are watched as metadata, reduced to name and deletion mark. A
//! root change therefore costs one JSON merge patch per namespace and
//! nothing for those already in sync, at a bounded number of calls in flight
//! ([`CONCURRENCY`]) over kube-rs's pooled HTTP/1.1 connections.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, Patch, PatchParams};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{WatchStreamExt, watcher};
use sha2::{Digest, Sha256};
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
    /// Create the ConfigMap (server-side apply of [`desired`]), or put the
    /// root and the label back ([`update_patch`]); keys and labels others
    /// own stay.
    Apply,
    /// `binaryData` holds the key too, which would make the object invalid:
    /// remove that key in the same patch.
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

/// SHA-256 of a root bundle: what [`Observed`] remembers of it.
pub type RootDigest = [u8; 32];

pub fn digest(root_pem: &str) -> RootDigest {
    Sha256::digest(root_pem.as_bytes()).into()
}

/// What the decision needs of an existing ConfigMap, and all that is kept
/// of it: 35 bytes instead of the root PEM and the object around it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Observed {
    /// [`digest`] of `data[root-cert.pem]`, if that key is there.
    root: Option<RootDigest>,
    labelled: bool,
    binary_clash: bool,
}

impl Observed {
    pub fn of(cm: &ConfigMap) -> Observed {
        Observed {
            root: cm
                .data
                .as_ref()
                .and_then(|d| d.get(DATA_KEY))
                .map(|v| digest(v)),
            labelled: cm
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(LABEL_KEY))
                .is_some_and(|v| v == LABEL_VALUE),
            binary_clash: cm
                .binary_data
                .as_ref()
                .is_some_and(|b| b.contains_key(DATA_KEY)),
        }
    }
}

/// Compares what is there with what should be: the root under its key and
/// the label. Other keys and labels someone added do not count. A write
/// happens only when something differs: a resync of 10,000 namespaces costs
/// neither reads nor writes.
pub fn plan(existing: Option<&Observed>, root: &RootDigest) -> Plan {
    let Some(existing) = existing else {
        return Plan::Apply;
    };
    let in_sync = existing.root.as_ref() == Some(root) && existing.labelled;
    match (existing.binary_clash, in_sync) {
        (true, _) => Plan::DropBinaryKeyThenApply,
        (false, true) => Plan::InSync,
        (false, false) => Plan::Apply,
    }
}

/// A namespace as the controller keeps it: its metadata, reduced by
/// [`trim`].
type NamespaceMeta = PartialObjectMeta<Namespace>;

/// Whether a namespace gets the ConfigMap: not an ignored system namespace,
/// not being deleted. A namespace is `Terminating` exactly when its
/// deletion timestamp is set, so the metadata is enough.
pub fn manages(meta: &ObjectMeta) -> bool {
    let name = meta.name.as_deref().unwrap_or_default();
    !name.is_empty() && !IGNORED_NAMESPACES.contains(&name) && meta.deletion_timestamp.is_none()
}

/// All of a namespace the controller keeps: what [`manages`] reads and
/// the store's key (labels, annotations, managed fields go).
fn trim(ns: &mut NamespaceMeta) {
    let meta = std::mem::take(&mut ns.metadata);
    ns.metadata = ObjectMeta {
        name: meta.name,
        deletion_timestamp: meta.deletion_timestamp,
        ..Default::default()
    };
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

/// Reconciles in flight at most: each is at most two API calls, and this
/// many keep a 2-core apiserver busy without filling its request queues
/// (the default `--max-mutating-requests-inflight` is 200, shared with
/// every other writer). Measured in BENCHMARKS.md (Scale).
pub const CONCURRENCY: u16 = 32;

/// The ConfigMaps as last seen, by namespace.
#[derive(Default)]
struct Seen {
    by_namespace: HashMap<String, Observed>,
    /// The first list is in: before it, a namespace missing here may
    /// still have its ConfigMap.
    listed: bool,
}

struct Context {
    client: kube::Client,
    roots: watch::Receiver<String>,
    seen: Arc<Mutex<Seen>>,
}

impl Context {
    fn seen(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct SyncError(#[from] kube::Error);

async fn reconcile(ns: Arc<NamespaceMeta>, ctx: Arc<Context>) -> Result<Action, SyncError> {
    if !manages(&ns.metadata) {
        return Ok(Action::await_change());
    }
    let name = ns.metadata.name.clone().unwrap_or_default();
    let root = ctx.roots.borrow().clone();
    if root.is_empty() {
        return Ok(Action::await_change());
    }
    let existing = {
        let seen = ctx.seen();
        if !seen.listed {
            // The end of the first list reconciles every namespace.
            return Ok(Action::await_change());
        }
        seen.by_namespace.get(&name).copied()
    };
    let plan = plan(existing.as_ref(), &digest(&root));
    if plan == Plan::InSync {
        return Ok(Action::await_change());
    }
    let api = Api::<ConfigMap>::namespaced(ctx.client.clone(), &name);
    // `seen` learns the result from the watch, in order with others' writes.
    if existing.is_some() {
        // The apiserver spends about a fifth less CPU on this merge patch
        // than on an apply of the same fields (BENCHMARKS.md, Scale 1), and
        // a root change is one such write per namespace.
        let patch = update_patch(&root, plan == Plan::DropBinaryKeyThenApply);
        let params = PatchParams {
            field_manager: Some(apply::SERVER.into()),
            ..Default::default()
        };
        match api
            .patch(CONFIGMAP_NAME, &params, &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                tracing::debug!(namespace = %name, "re-synced {CONFIGMAP_NAME}");
                return Ok(Action::await_change());
            }
            // Deleted since the watch saw it: created below.
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }
    apply::apply(&api, apply::SERVER, &desired(&name, &root)).await?;
    tracing::debug!(namespace = %name, "created {CONFIGMAP_NAME}");
    Ok(Action::await_change())
}

/// The JSON merge patch that puts the root and the label back on an
/// existing ConfigMap: those two fields and nothing else (keys and labels
/// others added stay); with `drop_binary_key`, it also removes
/// `binaryData[root-cert.pem]`, which would make the object invalid.
pub fn update_patch(root_pem: &str, drop_binary_key: bool) -> serde_json::Value {
    let mut patch = serde_json::json!({
        "metadata": { "labels": { LABEL_KEY: LABEL_VALUE } },
        "data": { DATA_KEY: root_pem },
    });
    if drop_binary_key {
        patch["binaryData"] = serde_json::json!({ DATA_KEY: null });
    }
    patch
}

fn error_policy(ns: Arc<NamespaceMeta>, e: &SyncError, _: Arc<Context>) -> Action {
    let name = ns.metadata.name.as_deref().unwrap_or_default();
    tracing::warn!(namespace = %name, error = %e, "{CONFIGMAP_NAME}: sync failed; retrying");
    Action::requeue(Duration::from_secs(2))
}

/// A ConfigMap event reduced to what triggers a check: its name and
/// namespace (the rest is in `seen` as [`Observed`], or dropped).
fn namespace_only(cm: &ConfigMap) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: cm.metadata.name.clone(),
            namespace: cm.metadata.namespace.clone(),
            ..Default::default()
        },
        ..Default::default()
    }
}

/// Runs until the process ends: keeps `istio-ca-root-cert` equal to the
/// latest value of `roots` in every namespace.
pub async fn run(client: kube::Client, roots: watch::Receiver<String>) {
    let configmaps = Api::<ConfigMap>::all(client.clone());
    let root_changes = futures::stream::unfold(roots.clone(), |mut rx| async move {
        rx.changed().await.ok()?;
        Some(((), rx))
    });
    let seen = Arc::new(Mutex::new(Seen::default()));
    let (listed_tx, listed_rx) = futures::channel::mpsc::unbounded::<()>();
    let writer = seen.clone();
    // A re-list builds a fresh map, swapped in whole when complete.
    let mut relisting: Option<HashMap<String, Observed>> = None;
    let configmap_events = watcher(
        configmaps,
        watcher::Config::default().fields(&format!("metadata.name={CONFIGMAP_NAME}")),
    )
    .default_backoff()
    .filter_map(move |event| {
        let mut seen = writer.lock().unwrap_or_else(|p| p.into_inner());
        let touched = match event {
            Ok(watcher::Event::Init) => {
                relisting = Some(HashMap::new());
                None
            }
            Ok(watcher::Event::InitApply(cm)) => {
                if let Some(ns) = cm.metadata.namespace.clone() {
                    relisting
                        .get_or_insert_with(HashMap::new)
                        .insert(ns, Observed::of(&cm));
                }
                // InitDone checks every namespace.
                None
            }
            Ok(watcher::Event::InitDone) => {
                seen.by_namespace = relisting.take().unwrap_or_default();
                seen.listed = true;
                let _ = listed_tx.unbounded_send(());
                None
            }
            Ok(watcher::Event::Apply(cm)) => {
                if let Some(ns) = cm.metadata.namespace.clone() {
                    seen.by_namespace.insert(ns, Observed::of(&cm));
                }
                Some(Ok(namespace_only(&cm)))
            }
            Ok(watcher::Event::Delete(cm)) => {
                if let Some(ns) = &cm.metadata.namespace {
                    seen.by_namespace.remove(ns);
                }
                Some(Ok(namespace_only(&cm)))
            }
            Err(e) => Some(Err(e)),
        };
        std::future::ready(touched)
    });
    let (reader, writer) = reflector::store();
    // An Api of PartialObjectMeta makes metadata-only requests.
    let namespaces = watcher(
        Api::<NamespaceMeta>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .modify(trim)
    .reflect(writer)
    .applied_objects();
    let ctx = Arc::new(Context {
        client,
        roots,
        seen,
    });
    let mut last_error = LastError::default();
    Controller::for_stream(namespaces, reader)
        .with_config(controller::Config::default().concurrency(CONCURRENCY))
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
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    const ROOT: &str = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";

    /// The plan for a ConfigMap as the watch would have reduced it.
    fn plan_for(existing: Option<&ConfigMap>, root_pem: &str) -> Plan {
        plan(existing.map(Observed::of).as_ref(), &digest(root_pem))
    }

    #[test]
    fn a_missing_configmap_is_applied_in_istios_shape() {
        assert_eq!(plan_for(None, ROOT), Plan::Apply);
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
    fn the_update_patch_sets_the_root_and_the_label_only() {
        assert_eq!(
            update_patch(ROOT, false),
            serde_json::json!({
                "metadata": { "labels": { "istio.io/config": "true" } },
                "data": { "root-cert.pem": ROOT },
            })
        );
        // A clashing binaryData key goes in the same write.
        assert_eq!(
            update_patch(ROOT, true)["binaryData"],
            serde_json::json!({ "root-cert.pem": null })
        );
    }

    #[test]
    fn an_equal_configmap_is_left_alone_and_a_tampered_one_is_applied_again() {
        let mut cm = desired("app", ROOT);
        assert_eq!(plan_for(Some(&cm), ROOT), Plan::InSync);

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
        assert_eq!(plan_for(Some(&cm), ROOT), Plan::InSync);

        let mut tampered = cm.clone();
        tampered
            .data
            .as_mut()
            .unwrap()
            .insert(DATA_KEY.into(), "evil".into());
        assert_eq!(plan_for(Some(&tampered), ROOT), Plan::Apply);

        let mut unlabeled = cm.clone();
        unlabeled.metadata.labels = None;
        assert_eq!(plan_for(Some(&unlabeled), ROOT), Plan::Apply);

        let mut emptied = cm.clone();
        emptied.data = None;
        assert_eq!(plan_for(Some(&emptied), ROOT), Plan::Apply);

        // The same key in binaryData would make the object invalid.
        let mut binary = cm.clone();
        binary.binary_data = Some(BTreeMap::from([(
            DATA_KEY.to_string(),
            ByteString(b"x".to_vec()),
        )]));
        assert_eq!(plan_for(Some(&binary), ROOT), Plan::DropBinaryKeyThenApply);

        // A new root re-syncs.
        let other = ROOT.replace("AAAA", "BBBB");
        assert_eq!(plan_for(Some(&cm), &other), Plan::Apply);
    }

    #[test]
    fn system_and_terminating_namespaces_are_skipped() {
        let ns = |name: &str, deleted: bool| ObjectMeta {
            name: Some(name.into()),
            deletion_timestamp: deleted.then(|| Time(Default::default())),
            ..Default::default()
        };
        assert!(manages(&ns("app", false)));
        assert!(manages(&ns("default", false)));
        assert!(!manages(&ns("kube-system", false)));
        assert!(!manages(&ns("app", true)));
        assert!(!manages(&ns("", false)));
    }

    #[test]
    fn a_namespace_is_kept_as_its_name_and_deletion_mark() {
        let mut meta: NamespaceMeta = serde_json::from_value(serde_json::json!({
            "apiVersion": "meta.k8s.io/v1",
            "kind": "PartialObjectMetadata",
            "metadata": {
                "name": "app", "uid": "u", "resourceVersion": "7",
                "labels": {"a": "b"}, "annotations": {"c": "d"},
                "deletionTimestamp": "2026-01-01T00:00:00Z",
                "managedFields": [{"manager": "kubectl", "operation": "Update"}],
            },
        }))
        .unwrap();
        trim(&mut meta);
        let kept = serde_json::to_value(&meta.metadata).unwrap();
        assert_eq!(
            kept,
            serde_json::json!({"name": "app", "deletionTimestamp": "2026-01-01T00:00:00Z"})
        );
        assert!(!manages(&meta.metadata));
    }

    #[test]
    fn a_configmap_event_triggers_with_its_name_and_namespace_only() {
        // kube-runtime names the triggering object: the name must stay.
        let trigger = namespace_only(&desired("app", ROOT));
        assert_eq!(trigger.metadata.name.as_deref(), Some(CONFIGMAP_NAME));
        assert_eq!(trigger.metadata.namespace.as_deref(), Some("app"));
        assert!(trigger.data.is_none() && trigger.metadata.labels.is_none());
    }

    #[test]
    fn what_is_kept_of_a_configmap_is_a_digest_and_two_flags() {
        let cm = desired("app", ROOT);
        let seen = Observed::of(&cm);
        assert_eq!(seen.root, Some(digest(ROOT)));
        assert!(seen.labelled && !seen.binary_clash);
        assert_eq!(std::mem::size_of::<Observed>(), 35);
        // A one-character change of the root is a different digest.
        assert_ne!(digest(ROOT), digest(&ROOT.replace('A', "B")));
    }

    #[test]
    fn roots_are_merged_without_duplicates() {
        let a = meshca_pki::pem::encode("CERTIFICATE", b"a");
        let b = meshca_pki::pem::encode("CERTIFICATE", b"b");
        let merged = merge_roots(&[&format!("{a}{b}"), &b, &a]);
        assert_eq!(merged, format!("{a}{b}"));
    }
}
