//! The pods impersonation reads: one watch on all pods into an index by
//! name and by node ([`PodIndex`], kept by [`PodStore`]), holding only the
//! facts the decision reads ([`PodFacts`]) from pods read as [`WatchedPod`].

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::runtime::{WatchStreamExt, watcher};
use meshca_kube::LastError;
use tokio::sync::watch;

use super::{PodFacts, Pods};
use crate::auth::PodDeletions;

/// Names many pods share (namespaces, nodes, service accounts), each kept
/// once however many pods use it: at 100,000 pods this halves the index.
#[derive(Debug, Default)]
struct Names {
    set: HashSet<Arc<str>>,
    /// The size after the last sweep.
    swept: usize,
}

impl Names {
    fn get(&mut self, name: &str) -> Arc<str> {
        if let Some(n) = self.set.get(name) {
            return n.clone();
        }
        if self.set.len() >= 2 * self.swept.max(1024) {
            // Names no pod uses any more (a node scaled away, a namespace
            // deleted) go when the set has doubled: amortized O(1).
            self.set.retain(|n| Arc::strong_count(n) > 1);
            self.swept = self.set.len();
        }
        let n: Arc<str> = Arc::from(name);
        self.set.insert(n.clone());
        n
    }

    fn find(&self, name: &str) -> Option<&Arc<str>> {
        self.set.get(name)
    }
}

/// One pod as the index keeps it.
#[derive(Debug)]
struct Entry {
    uid: Option<Box<str>>,
    service_account: Arc<str>,
    node: Option<Arc<str>>,
}

impl Entry {
    fn facts(&self) -> PodFacts {
        PodFacts {
            uid: self.uid.as_deref().map(str::to_owned),
            service_account: self.service_account.to_string(),
            node: self.node.as_deref().map(str::to_owned),
        }
    }
}

/// (node, namespace, service account), each name shared with the index.
type NodeAccount = (Arc<str>, Arc<str>, Arc<str>);

/// The pods, reduced to what the decision reads and indexed the way it
/// asks: by namespace and name, and by (node, namespace, service account).
/// Each lookup costs the same with 10 or 100,000 pods; each pod costs its
/// name, its UID and a few pointers (BENCHMARKS.md, Scale).
#[derive(Debug, Default)]
pub struct PodIndex {
    /// Namespace -> pod name -> pod.
    by_name: HashMap<Arc<str>, HashMap<Box<str>, Entry>>,
    /// How many pods of `(node, namespace, service account)` exist.
    on_node: HashMap<NodeAccount, usize>,
    names: Names,
    len: usize,
}

impl PodIndex {
    /// Adds or replaces the pod `namespace/name`.
    pub fn apply(&mut self, namespace: &str, name: &str, facts: PodFacts) {
        self.delete(namespace, name);
        let ns = self.names.get(namespace);
        let entry = Entry {
            uid: facts.uid.map(String::into_boxed_str),
            service_account: self.names.get(&facts.service_account),
            node: facts.node.as_deref().map(|n| self.names.get(n)),
        };
        if let Some(node) = &entry.node {
            *self
                .on_node
                .entry((node.clone(), ns.clone(), entry.service_account.clone()))
                .or_default() += 1;
        }
        self.by_name
            .entry(ns)
            .or_default()
            .insert(name.into(), entry);
        self.len += 1;
    }

    pub fn delete(&mut self, namespace: &str, name: &str) {
        let Some(pods) = self.by_name.get_mut(namespace) else {
            return;
        };
        let Some(old) = pods.remove(name) else {
            return;
        };
        if pods.is_empty() {
            self.by_name.remove(namespace);
        }
        self.len -= 1;
        if let (Some(node), Some(ns)) = (old.node, self.names.find(namespace)) {
            let key = (node, ns.clone(), old.service_account);
            if let Some(count) = self.on_node.get_mut(&key) {
                *count -= 1;
                if *count == 0 {
                    self.on_node.remove(&key);
                }
            }
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    fn entry(&self, namespace: &str, name: &str) -> Option<&Entry> {
        self.by_name.get(namespace)?.get(name)
    }

    /// The UIDs of pods in `self` that `newer` no longer has under that UID
    /// (deleted while the watch was re-listing).
    pub fn gone_since(&self, newer: &PodIndex) -> Vec<String> {
        self.by_name
            .iter()
            .flat_map(|(ns, pods)| pods.iter().map(move |(name, e)| (ns, name, e)))
            .filter_map(|(ns, name, entry)| {
                let uid = entry.uid.as_deref()?;
                let still = newer.entry(ns, name).and_then(|e| e.uid.as_deref());
                (still != Some(uid)).then(|| uid.to_owned())
            })
            .collect()
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Pods for PodIndex {
    fn pod(&self, namespace: &str, name: &str) -> Option<PodFacts> {
        self.entry(namespace, name).map(Entry::facts)
    }

    fn any_on_node(&self, node: &str, namespace: &str, service_account: &str) -> bool {
        // A name no pod has is not interned: no allocation to say no.
        let (Some(node), Some(ns), Some(sa)) = (
            self.names.find(node),
            self.names.find(namespace),
            self.names.find(service_account),
        ) else {
            return false;
        };
        self.on_node
            .contains_key(&(node.clone(), ns.clone(), sa.clone()))
    }
}

/// A pod as the watch reads it: the facts [`PodIndex`] keeps and the
/// resource version the watch resumes from. Deserializing into this type
/// skips the rest of each pod (labels, managed fields, containers, status)
/// without allocating it: the first list of 100,000 pods took 28 s as
/// whole `Pod`s, 16 s as this (BENCHMARKS.md, Scale 2).
#[derive(Clone, Debug, Default, serde::Deserialize)]
pub struct WatchedPod {
    #[serde(deserialize_with = "watched_meta")]
    pub metadata: ObjectMeta,
    #[serde(default)]
    spec: Option<WatchedSpec>,
}

#[derive(Clone, Debug, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct WatchedSpec {
    #[serde(default)]
    service_account_name: Option<String>,
    #[serde(default)]
    node_name: Option<String>,
}

/// The metadata fields the watch and the index read; the others are
/// skipped unparsed.
fn watched_meta<'de, D: serde::Deserializer<'de>>(d: D) -> Result<ObjectMeta, D::Error> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Meta {
        #[serde(default)]
        name: Option<String>,
        #[serde(default)]
        namespace: Option<String>,
        #[serde(default)]
        uid: Option<String>,
        #[serde(default)]
        resource_version: Option<String>,
    }
    let m = <Meta as serde::Deserialize>::deserialize(d)?;
    Ok(ObjectMeta {
        name: m.name,
        namespace: m.namespace,
        uid: m.uid,
        resource_version: m.resource_version,
        ..Default::default()
    })
}

/// The Pod API, read as [`WatchedPod`]s.
impl kube::Resource for WatchedPod {
    type DynamicType = ();
    type Scope = k8s_openapi::NamespaceResourceScope;

    fn kind(dt: &()) -> std::borrow::Cow<'_, str> {
        <Pod as kube::Resource>::kind(dt)
    }
    fn group(dt: &()) -> std::borrow::Cow<'_, str> {
        <Pod as kube::Resource>::group(dt)
    }
    fn version(dt: &()) -> std::borrow::Cow<'_, str> {
        <Pod as kube::Resource>::version(dt)
    }
    fn plural(dt: &()) -> std::borrow::Cow<'_, str> {
        <Pod as kube::Resource>::plural(dt)
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

fn facts(pod: &WatchedPod) -> PodFacts {
    let spec = pod.spec.as_ref();
    PodFacts {
        uid: pod.metadata.uid.clone(),
        service_account: spec
            .and_then(|s| s.service_account_name.clone())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "default".into()),
        node: spec.and_then(|s| s.node_name.clone()),
    }
}

fn key(pod: &WatchedPod) -> (String, String) {
    (
        pod.metadata.namespace.clone().unwrap_or_default(),
        pod.metadata.name.clone().unwrap_or_default(),
    )
}

/// How the pod watch gets its first state: a streaming list (WatchList,
/// `sendInitialEvents`), one watch request served from the apiserver's
/// watch cache, each pod parsed as it arrives; not a list of 200 pages of
/// 500: 11.9 s against 15.7 s for 100,000 pods read as [`WatchedPod`]
/// (`examples/scale_pods.rs --lists`, BENCHMARKS.md Scale 2).
fn streaming() -> watcher::Config {
    watcher::Config::default().streaming_lists()
}

/// kube-rs's paginated list then watch: for an apiserver that refuses a
/// streaming list (the WatchList feature gate is off by default in 1.33).
fn paginated() -> watcher::Config {
    watcher::Config::default()
}

/// Whether the apiserver refused the streaming list itself (422 Invalid or
/// 400 Bad Request, or a message naming `sendInitialEvents`), rather than
/// failing for a reason a retry fixes (RBAC, overload, the network).
fn refuses_streaming(e: &watcher::Error) -> bool {
    match e {
        watcher::Error::WatchStartFailed(kube::Error::Api(s)) => {
            matches!(s.code, 400 | 422) || s.message.contains("sendInitialEvents")
        }
        _ => false,
    }
}

/// The pod index, kept current by one watch on all pods (only the facts
/// the decision reads are kept, not the pods).
#[derive(Clone)]
pub struct PodStore {
    index: Arc<RwLock<PodIndex>>,
    synced: watch::Receiver<bool>,
}

impl PodStore {
    /// Starts the pod watch; the index fills once the first list is in.
    /// Every pod seen deleted (a delete event, or missing from a re-list)
    /// is reported to `deletions`.
    pub fn start(client: kube::Client, deletions: PodDeletions) -> PodStore {
        let index = Arc::new(RwLock::new(PodIndex::default()));
        let (synced_tx, synced) = watch::channel(false);
        let api = kube::Api::<WatchedPod>::all(client);
        let writer = index.clone();
        tokio::spawn(async move {
            let mut events = watcher(api.clone(), streaming()).default_backoff().boxed();
            let mut streaming_refused = false;
            let mut last_error = LastError::default();
            // A relist builds a fresh index, swapped in whole when complete.
            let mut relisting: Option<PodIndex> = None;
            while let Some(event) = events.next().await {
                let event = match event {
                    Ok(event) => {
                        last_error.clear();
                        event
                    }
                    Err(e) if !streaming_refused && refuses_streaming(&e) => {
                        tracing::info!(
                            error = %e,
                            "the apiserver refuses streaming lists (WatchList); listing pods in pages"
                        );
                        streaming_refused = true;
                        relisting = None;
                        events = watcher(api.clone(), paginated()).default_backoff().boxed();
                        continue;
                    }
                    Err(e) => {
                        if last_error.is_new(&e) {
                            tracing::warn!(
                                error = %e,
                                "watching pods for impersonation failed; not ready until it works \
                                 (RBAC: the Helm chart's impersonation ClusterRole, or --no-impersonation); \
                                 retrying"
                            );
                        }
                        continue;
                    }
                };
                let mut index = writer.write().unwrap_or_else(|p| p.into_inner());
                match event {
                    watcher::Event::Init => relisting = Some(PodIndex::default()),
                    watcher::Event::InitApply(pod) => {
                        let (ns, name) = key(&pod);
                        relisting.get_or_insert_with(PodIndex::default).apply(
                            &ns,
                            &name,
                            facts(&pod),
                        );
                    }
                    watcher::Event::InitDone => {
                        let fresh = relisting.take().unwrap_or_default();
                        for uid in index.gone_since(&fresh) {
                            deletions.deleted(&uid);
                        }
                        *index = fresh;
                        synced_tx.send_replace(true);
                    }
                    watcher::Event::Apply(pod) => {
                        let (ns, name) = key(&pod);
                        index.apply(&ns, &name, facts(&pod));
                    }
                    watcher::Event::Delete(pod) => {
                        if let Some(uid) = &pod.metadata.uid {
                            deletions.deleted(uid);
                        }
                        let (ns, name) = key(&pod);
                        index.delete(&ns, &name);
                    }
                }
            }
        });
        PodStore { index, synced }
    }

    /// Resolves when the first list of pods is in.
    pub async fn wait_synced(&self) {
        let mut synced = self.synced.clone();
        if synced.wait_for(|s| *s).await.is_err() {
            // The watch task ended: stay not ready.
            std::future::pending::<()>().await;
        }
        tracing::info!("pods listed for impersonation checks");
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, PodIndex> {
        self.index.read().unwrap_or_else(|p| p.into_inner())
    }
}

impl Pods for PodStore {
    fn pod(&self, namespace: &str, name: &str) -> Option<PodFacts> {
        self.read().pod(namespace, name)
    }

    fn any_on_node(&self, node: &str, namespace: &str, service_account: &str) -> bool {
        self.read().any_on_node(node, namespace, service_account)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_index_follows_applies_moves_and_deletes() {
        let facts = |sa: &str, node: &str| PodFacts {
            uid: Some("u".into()),
            service_account: sa.into(),
            node: Some(node.into()),
        };
        let mut index = PodIndex::default();
        index.apply("app", "a", facts("web", "n1"));
        index.apply("app", "b", facts("web", "n1"));
        assert!(index.any_on_node("n1", "app", "web"));
        assert!(!index.any_on_node("n2", "app", "web"));
        assert!(!index.any_on_node("n1", "other", "web"));
        index.delete("app", "a");
        assert!(index.any_on_node("n1", "app", "web"), "b still runs there");
        index.apply("app", "b", facts("web", "n2"));
        assert!(!index.any_on_node("n1", "app", "web"), "b moved away");
        assert!(index.any_on_node("n2", "app", "web"));
        assert_eq!(index.pod("app", "b").unwrap().node.as_deref(), Some("n2"));
        // A re-list without a (or with a recreated) pod: its old UID is gone.
        let mut relisted = PodIndex::default();
        relisted.apply(
            "app",
            "b",
            PodFacts {
                uid: Some("u2".into()),
                ..facts("web", "n2")
            },
        );
        index.apply("app", "c", facts("web", "n1"));
        assert_eq!(index.gone_since(&relisted), vec!["u".to_string(); 2]);
        assert!(relisted.gone_since(&relisted).is_empty());
        index.delete("app", "c");
        index.delete("app", "b");
        index.delete("app", "never-there");
        assert!(index.is_empty());
        assert!(!index.any_on_node("n2", "app", "web"));
    }

    #[test]
    fn shared_names_are_kept_once_and_unused_ones_go() {
        let mut index = PodIndex::default();
        let on = |node: String| PodFacts {
            uid: Some("u".into()),
            service_account: "web".into(),
            node: Some(node),
        };
        index.apply("app", "a", on("n".into()));
        index.apply("app", "b", on("n".into()));
        let ns = index.names.find("app").unwrap();
        assert!(Arc::ptr_eq(ns, index.by_name.keys().next().unwrap()));
        // One pod moving over 5000 nodes: the names of the nodes it left
        // are swept, not kept forever.
        for k in 0..5000 {
            index.apply("app", "a", on(format!("node-{k}")));
        }
        assert!(index.names.set.len() <= 2049, "{}", index.names.set.len());
        assert!(index.any_on_node("node-4999", "app", "web"));
        assert!(index.any_on_node("n", "app", "web"));
        assert!(!index.any_on_node("node-4998", "app", "web"));
        assert!(!index.any_on_node("never", "app", "web"));
        assert_eq!(index.len(), 2);
    }

    #[test]
    fn only_a_refused_streaming_list_falls_back_to_pages() {
        let api = |code: u16, message: &str| {
            watcher::Error::WatchStartFailed(kube::Error::Api(
                kube::core::Status::failure(message, "")
                    .with_code(code)
                    .boxed(),
            ))
        };
        // What a 1.33 apiserver (WatchList off) answers.
        assert!(refuses_streaming(&api(
            422,
            "sendInitialEvents is forbidden for watch unless the WatchList feature gate is enabled"
        )));
        assert!(refuses_streaming(&api(400, "bad request")));
        // RBAC, overload and a broken connection are retried as they are.
        assert!(!refuses_streaming(&api(403, "pods is forbidden")));
        assert!(!refuses_streaming(&api(429, "too many requests")));
        assert!(!refuses_streaming(&watcher::Error::NoResourceVersion));
    }

    #[test]
    fn facts_are_what_the_decision_reads() {
        let mut pod: WatchedPod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "n", "uid": "u", "resourceVersion": "7",
                         "labels": {"a": "b"}, "annotations": {"c": "d"},
                         "managedFields": [{"manager": "m", "fieldsV1": {"f:spec": {}}}]},
            "spec": {"nodeName": "node-a", "serviceAccountName": "sa",
                     "containers": [{"name": "c", "image": "i"}]},
            "status": {"phase": "Pending"},
        }))
        .unwrap();
        assert_eq!(
            facts(&pod),
            PodFacts {
                uid: Some("u".into()),
                service_account: "sa".into(),
                node: Some("node-a".into())
            }
        );
        assert_eq!(key(&pod), ("n".to_string(), "p".to_string()));
        // The watch resumes from the resource version; nothing else is kept.
        assert_eq!(
            pod.metadata,
            ObjectMeta {
                name: Some("p".into()),
                namespace: Some("n".into()),
                uid: Some("u".into()),
                resource_version: Some("7".into()),
                ..Default::default()
            }
        );
        pod.spec.as_mut().unwrap().service_account_name = None;
        assert_eq!(facts(&pod).service_account, "default");
    }
}
