//! Each signer's roots as a ClusterTrustBundle (certificates.k8s.io/v1beta1)
//! linked to its signer name, named `<signer with / as :>:roots` as the API
//! requires, labelled `app.kubernetes.io/managed-by: meshca-signer`. Pods
//! mount it with a `clusterTrustBundle` projection by `signerName` and
//! `labelSelector`.
//!
//! Root rotation: a root the CA no longer has stays in the bundle (marked in
//! annotation [`RETIRED`] with the time it may go) for the signer's longest
//! certificate lifetime, or until it expires, so leaves from the old root
//! keep verifying. The other way round, the roots of a new CA go into the
//! bundle before any pod certificate from it: the publisher reports the
//! roots stored in the bundle ([`Published`]) and the PodCertificateRequest
//! path signs only with a CA whose roots are all there.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use futures::StreamExt;
use k8s_openapi::api::certificates::v1beta1::ClusterTrustBundle;
use kube::Client;
use kube::api::Api;
use kube::runtime::{WatchStreamExt, watcher};
use meshca_ca_store::CurrentCa;
use meshca_kube::cluster_trust_bundle::{self as ctb, Plan};
use meshca_kube::{LastError, apply};
use tokio::sync::watch;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::metrics::Metrics;
use crate::trust::MANAGED_BY;

/// The suffix of the bundle's name.
pub const SUFFIX: &str = "roots";
/// Annotation: JSON map of retired roots (SHA-256 of the DER, hex) to the
/// Unix time after which they leave the bundle.
pub const RETIRED: &str = "meshca.io/retired-roots";

/// The roots (DER) stored in the bundle, as last written or read.
pub type Published = watch::Receiver<Arc<BTreeSet<Vec<u8>>>>;

/// The bundle's name for `signer_name`.
pub fn name(signer_name: &str) -> String {
    ctb::bundle_name(signer_name, SUFFIX)
}

/// What the bundle should hold: the CA's roots first, then the retired ones
/// still kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    pub roots: Vec<Vec<u8>>,
    pub retired: BTreeMap<String, i64>,
}

impl Wanted {
    pub fn pem(&self) -> String {
        self.roots
            .iter()
            .map(|der| meshca_pki::pem::encode("CERTIFICATE", der))
            .collect()
    }

    pub fn object(&self, signer_name: &str) -> ClusterTrustBundle {
        let annotations = if self.retired.is_empty() {
            BTreeMap::new()
        } else {
            BTreeMap::from([(
                RETIRED.to_string(),
                serde_json::to_string(&self.retired).unwrap_or_default(),
            )])
        };
        ctb::desired(
            &name(signer_name),
            signer_name,
            &self.pem(),
            BTreeMap::from([(MANAGED_BY.0.to_string(), MANAGED_BY.1.to_string())]),
            annotations,
        )
    }
}

/// Pure planning: the CA's `current` roots, plus each root of the `existing`
/// bundle that is not current, kept until `retain` after it was first seen
/// retired (or its annotated time), never past its own expiry.
pub fn wanted(
    current: &[Vec<u8>],
    existing: Option<&ClusterTrustBundle>,
    now_unix: i64,
    retain: Duration,
) -> Wanted {
    let mut roots: Vec<Vec<u8>> = Vec::new();
    for der in current {
        if !roots.contains(der) {
            roots.push(der.clone());
        }
    }
    let marked: BTreeMap<String, i64> = existing
        .and_then(|b| b.metadata.annotations.as_ref())
        .and_then(|a| a.get(RETIRED))
        .and_then(|v| serde_json::from_str(v).ok())
        .unwrap_or_default();
    let mut retired = BTreeMap::new();
    let old = existing
        .map(|b| roots_in(&b.spec.trust_bundle))
        .unwrap_or_default();
    for der in old {
        if roots.contains(&der) {
            continue;
        }
        let Ok((_, cert)) = X509Certificate::from_der(&der) else {
            continue;
        };
        let fp = fingerprint(&der);
        let until = marked
            .get(&fp)
            .copied()
            .unwrap_or_else(|| now_unix.saturating_add(retain.as_secs() as i64))
            .min(cert.validity().not_after.timestamp());
        if now_unix < until {
            retired.insert(fp, until);
            roots.push(der);
        }
    }
    Wanted { roots, retired }
}

/// The DER certificates of a PEM bundle (anything else is skipped).
pub fn roots_in(pem: &str) -> Vec<Vec<u8>> {
    meshca_pki::pem::parse_all(pem.as_bytes())
        .map(|blocks| {
            blocks
                .into_iter()
                .filter(|b| b.label == "CERTIFICATE")
                .map(|b| b.der.to_vec())
                .collect()
        })
        .unwrap_or_default()
}

fn fingerprint(der: &[u8]) -> String {
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Whether every root of `ca` is in `published`.
pub fn covers(published: &BTreeSet<Vec<u8>>, ca: &meshca_pki::CaBundle) -> bool {
    ca.roots_der().iter().all(|r| published.contains(r))
}

/// One pass: read, plan, write if needed. Returns the roots now stored.
pub async fn sync_once(
    api: &Api<ClusterTrustBundle>,
    signer_name: &str,
    current: &[Vec<u8>],
    retain: Duration,
) -> Result<(BTreeSet<Vec<u8>>, bool)> {
    let bundle = name(signer_name);
    let existing = api
        .get_opt(&bundle)
        .await
        .with_context(|| format!("reading ClusterTrustBundle {bundle}"))?;
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let want = wanted(current, existing.as_ref(), now, retain);
    let object = want.object(signer_name);
    let wrote = ctb::plan(existing.as_ref(), &object) == Plan::Apply;
    if wrote {
        apply::apply(api, apply::SIGNER, &object)
            .await
            .with_context(|| format!("applying ClusterTrustBundle {bundle}"))?;
    }
    Ok((want.roots.into_iter().collect(), wrote))
}

/// Keeps signer `signer_name`'s bundle in step with its CA (on CA changes,
/// on changes to the bundle by anyone, and every `resync`), reporting the
/// roots stored through `published`.
pub async fn keep_published(
    client: Client,
    signer_name: String,
    ca: CurrentCa,
    retain: Duration,
    published: watch::Sender<Arc<BTreeSet<Vec<u8>>>>,
    metrics: Arc<Metrics>,
    resync: Duration,
) {
    let api = Api::<ClusterTrustBundle>::all(client);
    let bundle = name(&signer_name);
    let mut ca_changes = Box::pin(meshca_ca_store::changes(&ca).chain(futures::stream::pending()));
    let mut events = watcher(
        api.clone(),
        watcher::Config::default().fields(&format!("metadata.name={bundle}")),
    )
    .default_backoff()
    .boxed();
    let mut last_error = LastError::default();
    loop {
        let mut delay = resync;
        let current = ca.borrow().clone();
        if let Some(current) = current {
            match sync_once(&api, &signer_name, current.roots_der(), retain).await {
                Ok((roots, wrote)) => {
                    last_error.clear();
                    if wrote {
                        metrics
                            .trust_bundle_writes
                            .get_or_create(&Metrics::label(&signer_name))
                            .inc();
                        tracing::info!(bundle, roots = roots.len(), "ClusterTrustBundle published");
                    }
                    published.send_replace(Arc::new(roots));
                }
                Err(e) => {
                    let e = format!("{e:#}");
                    if last_error.is_new(&e) {
                        tracing::warn!(
                            error = %e,
                            "publishing the ClusterTrustBundle (API on? RBAC: clustertrustbundles \
                             and `attest` on the signer name); retrying"
                        );
                    }
                    delay = Duration::from_secs(2);
                }
            }
        }
        tokio::select! {
            _ = ca_changes.next() => {}
            _ = events.next() => {}
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshca_pki::profile::{CaCertRequest, self_signed_root};
    use meshca_pki::{KeyType, SigningKey, cert};
    use time::OffsetDateTime;

    fn root(days: u64) -> Vec<u8> {
        let key = SigningKey::generate(KeyType::EcdsaP256).unwrap();
        self_signed_root(
            &CaCertRequest {
                subject_der: &cert::organization_name("r"),
                key: &key,
                ttl: Duration::from_secs(days * 86400),
            },
            OffsetDateTime::now_utc(),
        )
        .unwrap()
    }

    const DAY: Duration = Duration::from_secs(86400);

    #[test]
    fn the_name_starts_with_the_signer_prefix() {
        assert_eq!(name("example.com/foo"), "example.com:foo:roots");
    }

    #[test]
    fn a_rotated_root_stays_until_its_leaves_can_have_expired() {
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let (old, new) = (root(30), root(30));
        let first = wanted(std::slice::from_ref(&old), None, now, DAY);
        assert_eq!(first.roots, std::slice::from_ref(&old));
        assert!(first.retired.is_empty());
        let stored = first.object("example.com/foo");
        assert_eq!(
            stored.metadata.name.as_deref(),
            Some("example.com:foo:roots")
        );
        assert_eq!(stored.spec.signer_name.as_deref(), Some("example.com/foo"));

        // Rotation: the new root first, the old one kept and marked.
        let both = wanted(std::slice::from_ref(&new), Some(&stored), now, DAY);
        assert_eq!(both.roots, [new.clone(), old.clone()]);
        assert_eq!(
            both.retired.values().copied().collect::<Vec<_>>(),
            [now + 86400]
        );
        let stored = both.object("example.com/foo");
        assert!(roots_in(&stored.spec.trust_bundle).contains(&old));

        // Later passes keep the first mark, not a new one.
        let later = wanted(std::slice::from_ref(&new), Some(&stored), now + 3600, DAY);
        assert_eq!(later.roots.len(), 2);
        assert_eq!(later.retired, both.retired);
        // After the retention, only the new root.
        let gone = wanted(std::slice::from_ref(&new), Some(&stored), now + 86400, DAY);
        assert_eq!(gone.roots, std::slice::from_ref(&new));
        assert!(gone.retired.is_empty());
        assert!(
            gone.object("example.com/foo")
                .metadata
                .annotations
                .is_none()
        );
    }

    #[test]
    fn a_retired_root_never_outlives_itself() {
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let (old, new) = (root(2), root(30));
        let stored = wanted(std::slice::from_ref(&old), None, now, DAY).object("x.io/y");
        let w = wanted(std::slice::from_ref(&new), Some(&stored), now, 365 * DAY);
        let until = *w.retired.values().next().unwrap();
        assert!(until <= now + 2 * 86400, "capped at the root's notAfter");
        let w = wanted(
            std::slice::from_ref(&new),
            Some(&stored),
            now + 3 * 86400,
            365 * DAY,
        );
        assert_eq!(w.roots, [new]);
    }
}
