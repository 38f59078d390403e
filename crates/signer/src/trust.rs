//! Trust bundle publication: keep a Secret (istiod's `external-ca-cert`,
//! key `root-cert.pem`) equal to the signers' roots. Automates the seed's
//! manual `kubectl create secret generic external-ca-cert ...` step.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result};
use futures::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};

use meshca_ca_store::CurrentCa;
use meshca_kube::{LastError, apply};

/// Where the roots go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustBundleTarget {
    pub namespace: String,
    pub name: String,
    pub key: String,
}

impl Default for TrustBundleTarget {
    fn default() -> Self {
        TrustBundleTarget {
            namespace: "istio-system".into(),
            name: "external-ca-cert".into(),
            key: "root-cert.pem".into(),
        }
    }
}

/// The roots of all signers, each once, in signer order (PEM); `None`
/// until every signer has a CA (never a partial bundle).
pub fn roots_pem(cas: &[CurrentCa]) -> Option<String> {
    let mut seen: Vec<Vec<u8>> = Vec::new();
    let mut out = String::new();
    for current in cas {
        let ca = current.borrow().clone()?;
        for der in ca.roots_der() {
            if !seen.contains(der) {
                out.push_str(&meshca_pki::pem::encode("CERTIFICATE", der));
                seen.push(der.clone());
            }
        }
    }
    (!out.is_empty()).then_some(out)
}

/// The label on the Secret.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "meshca-signer");

/// The Secret meshca applies: the roots under the key, and the label. No
/// `type`: a new Secret gets `Opaque`, and one made by hand keeps its own.
pub fn desired(target: &TrustBundleTarget, pem: &str) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(target.name.clone()),
            namespace: Some(target.namespace.clone()),
            labels: Some(BTreeMap::from([(
                MANAGED_BY.0.to_string(),
                MANAGED_BY.1.to_string(),
            )])),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(
            target.key.clone(),
            ByteString(pem.as_bytes().to_vec()),
        )])),
        ..Default::default()
    }
}

/// Keys the Secret holds besides the roots. istiod reads only the roots key,
/// but anything else in a trust bundle is a tampered copy: it goes.
pub fn stray_keys(existing: Option<&Secret>, target: &TrustBundleTarget) -> Vec<String> {
    existing
        .and_then(|s| s.data.as_ref())
        .map(|d| d.keys().filter(|k| **k != target.key).cloned().collect())
        .unwrap_or_default()
}

/// Whether the Secret needs a write: missing, the roots under the key
/// differ, or other keys were added. Labels of others do not count.
pub fn needs_write(existing: Option<&Secret>, target: &TrustBundleTarget, pem: &str) -> bool {
    let have = existing
        .and_then(|s| s.data.as_ref())
        .and_then(|d| d.get(&target.key));
    have.is_none_or(|b| b.0 != pem.as_bytes()) || !stray_keys(existing, target).is_empty()
}

/// Makes the Secret hold exactly `pem` under the key and nothing else
/// (server-side apply as `meshca-signer`; keys another manager added are
/// removed first, which an apply alone cannot do); returns whether it wrote.
pub async fn sync_once(client: &Client, target: &TrustBundleTarget, pem: &str) -> Result<bool> {
    let api = Api::<Secret>::namespaced(client.clone(), &target.namespace);
    let place = || format!("Secret {}/{}", target.namespace, target.name);
    let existing = api
        .get_opt(&target.name)
        .await
        .with_context(|| format!("reading {}", place()))?;
    if !needs_write(existing.as_ref(), target, pem) {
        return Ok(false);
    }
    let stray = stray_keys(existing.as_ref(), target);
    if !stray.is_empty() {
        let removed: serde_json::Map<String, serde_json::Value> = stray
            .into_iter()
            .map(|k| (k, serde_json::Value::Null))
            .collect();
        let patch = serde_json::json!({ "data": removed });
        api.patch(&target.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .with_context(|| format!("removing other keys from {}", place()))?;
    }
    apply::apply(&api, apply::SIGNER, &desired(target, pem))
        .await
        .with_context(|| format!("applying {}", place()))?;
    Ok(true)
}

/// After a failed write, the next try comes this much later (or at the next
/// change).
const RETRY: Duration = Duration::from_secs(2);

/// Publishes on every CA change and puts the Secret back when someone else
/// changes or deletes it (a watch on it by name); re-checks every `resync`.
pub async fn keep_published(
    client: Client,
    target: TrustBundleTarget,
    cas: Vec<CurrentCa>,
    resync: Duration,
) {
    let mut ca_changes = futures::stream::select_all(
        cas.iter()
            .map(|ca| Box::pin(meshca_ca_store::changes(ca)) as std::pin::Pin<Box<_>>),
    )
    .chain(futures::stream::pending());
    let api = Api::<Secret>::namespaced(client.clone(), &target.namespace);
    let mut secret_events = watcher(
        api,
        watcher::Config::default().fields(&format!("metadata.name={}", target.name)),
    )
    .default_backoff()
    .boxed();
    let mut last_error = LastError::default();
    loop {
        let mut delay = resync;
        if let Some(pem) = roots_pem(&cas) {
            match sync_once(&client, &target, &pem).await {
                Ok(wrote) => {
                    last_error.clear();
                    if wrote {
                        tracing::info!(namespace = %target.namespace, name = %target.name, "trust bundle published");
                    }
                }
                Err(e) => {
                    let e = format!("{e:#}");
                    if last_error.is_new(&e) {
                        tracing::warn!(error = %e, "publishing the trust bundle; retrying");
                    } else {
                        tracing::debug!(error = %e, "publishing the trust bundle");
                    }
                    delay = RETRY;
                }
            }
        }
        tokio::select! {
            _ = ca_changes.next() => {}
            // Our own writes come back here too: one cheap GET each.
            _ = secret_events.next() => {}
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROOT: &str = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";

    #[test]
    fn the_applied_secret_is_the_roots_under_the_key_and_the_label() {
        let target = TrustBundleTarget::default();
        assert_eq!(
            serde_json::to_value(desired(&target, ROOT)).unwrap(),
            serde_json::json!({
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {
                    "name": "external-ca-cert",
                    "namespace": "istio-system",
                    "labels": { "app.kubernetes.io/managed-by": "meshca-signer" },
                },
                "data": { "root-cert.pem": ByteString(ROOT.as_bytes().to_vec()) },
            })
        );
    }

    #[test]
    fn a_missing_or_different_root_or_another_key_is_written() {
        let target = TrustBundleTarget::default();
        assert!(needs_write(None, &target, ROOT));
        let mut secret = desired(&target, ROOT);
        assert!(!needs_write(Some(&secret), &target, ROOT));
        // Labels of others do not count; another key does.
        secret.metadata.labels = None;
        assert!(!needs_write(Some(&secret), &target, ROOT));
        let data = secret.data.as_mut().unwrap();
        data.insert("extra".into(), ByteString(b"x".to_vec()));
        assert!(needs_write(Some(&secret), &target, ROOT));
        assert_eq!(stray_keys(Some(&secret), &target), ["extra"]);
        secret.data.as_mut().unwrap().remove("extra");
        assert!(needs_write(
            Some(&secret),
            &target,
            &ROOT.replace("AAAA", "BBBB")
        ));
        secret.data.as_mut().unwrap().remove("root-cert.pem");
        assert!(needs_write(Some(&secret), &target, ROOT));
    }
}
