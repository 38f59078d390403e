//! The self-signed CA in Kubernetes: Secret `istio-ca-secret` (type
//! `istio.io/ca-root`) in the CA's namespace, as istiod keeps it.
//!
//! - Created if missing; replicas race safely: create, and on 409 read the
//!   winner's Secret and use it.
//! - An existing Secret (written by istiod) is used as is: migrating keeps the root.
//! - Rotation as Istio's self-signed root rotator: a check every interval
//!   (with jitter) re-issues the root **with the same key and subject** when
//!   its remaining life is below the grace percentile, so leaves issued
//!   before still verify with the new root. The Secret is replaced with the
//!   resourceVersion read (a conflict means another replica won: re-read).
//!   A root rotated by another replica is picked up by the same check.
//!
//! Keys are never logged.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ObjectMeta, PostParams};
use meshca_ca_store::secret::{istio_data, load_istio};
use meshca_pki::profile::{CaCertRequest, self_signed_root};
use meshca_pki::{CaBundle, KeyType, SigningKey, cert};
use time::OffsetDateTime;

pub use meshca_ca_store::secret::{
    CA_CERT, CA_KEY, CERT_CHAIN, ISTIO_CA_SECRET as SECRET_NAME,
    ISTIO_CA_SECRET_TYPE as SECRET_TYPE, KEY, ROOT_CERT,
};

/// Where the Secret lives and how the root is kept fresh.
#[derive(Clone, Debug)]
pub struct CaSecretConfig {
    pub namespace: String,
    /// How often the root's remaining life is checked (Istio: 1h).
    pub check_interval: Duration,
    /// Re-issue when less than this percentage of the life remains (Istio: 20).
    pub grace_percentile: u32,
}

/// How a new root is made: Istio's shape, `O=<org>`, no CN.
#[derive(Clone, Copy, Debug)]
pub struct RootSpec<'a> {
    pub key_type: KeyType,
    pub org: &'a str,
    pub ttl: Duration,
}

/// Whether a certificate valid `[not_before, not_after]` has less than
/// `grace_percentile` % of its life left at `now` (Istio's check).
pub fn needs_rotation(
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
    now: OffsetDateTime,
    grace_percentile: u32,
) -> bool {
    let life = (not_after - not_before).as_seconds_f64();
    if life <= 0.0 {
        return true;
    }
    let left = (not_after - now).as_seconds_f64();
    left / life < f64::from(grace_percentile) / 100.0
}

fn copy_key(key: &SigningKey) -> Result<SigningKey> {
    let pem_text = key.to_pkcs8_pem()?;
    Ok(SigningKey::from_pem(pem_text.as_bytes())?)
}

/// A new self-signed root CA in Istio's shape.
pub fn new_root(spec: &RootSpec<'_>, now: OffsetDateTime) -> Result<CaBundle> {
    let key = SigningKey::generate(spec.key_type)?;
    root_bundle(key, &cert::organization_name(spec.org), spec.ttl, now)
}

/// The root re-issued with the same key and subject and a fresh life of
/// `ttl`: certificates signed by the old one verify with the new one.
pub fn reissue(bundle: &CaBundle, ttl: Duration, now: OffsetDateTime) -> Result<CaBundle> {
    root_bundle(copy_key(bundle.key())?, bundle.subject_der(), ttl, now)
}

/// A bundle whose signing certificate is its own root.
fn root_bundle(
    key: SigningKey,
    subject_der: &[u8],
    ttl: Duration,
    now: OffsetDateTime,
) -> Result<CaBundle> {
    let der = self_signed_root(
        &CaCertRequest {
            subject_der,
            key: &key,
            ttl,
        },
        now,
    )?;
    Ok(CaBundle::from_parts(
        key,
        der.clone(),
        vec![],
        vec![der],
        now,
    )?)
}

fn secret_of(namespace: &str, data: BTreeMap<String, ByteString>) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(SECRET_NAME.into()),
            namespace: Some(namespace.into()),
            ..Default::default()
        },
        type_: Some(SECRET_TYPE.into()),
        data: Some(data),
        ..Default::default()
    }
}

fn read_bundle(secret: &Secret, now: OffsetDateTime) -> Result<CaBundle> {
    let empty = BTreeMap::new();
    load_istio(secret.data.as_ref().unwrap_or(&empty), now)
}

/// How [`load_or_create`] got the CA.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// The Secret was there.
    Existing,
    /// This call created the Secret.
    Created,
    /// The Secret was missing, but another replica created it first (409):
    /// its CA is used.
    LostRace,
}

/// The CA in Secret `istio-ca-secret`, created (race-safely) if missing.
pub async fn load_or_create(
    client: kube::Client,
    config: &CaSecretConfig,
    spec: &RootSpec<'_>,
) -> Result<(CaBundle, Origin)> {
    let api = Api::<Secret>::namespaced(client, &config.namespace);
    let place = || format!("Secret {}/{SECRET_NAME}", config.namespace);
    // Errors say what to check: the RBAC, the namespace, or the way out.
    let failed = || {
        format!(
            "{} (RBAC: the Helm chart's <name>-ca-secret Role in POD_NAMESPACE; or --no-ca-secret \
             to keep the CA in the state directory)",
            place()
        )
    };
    if let Some(secret) = api.get_opt(SECRET_NAME).await.with_context(failed)? {
        let bundle = read_bundle(&secret, OffsetDateTime::now_utc()).with_context(place)?;
        tracing::info!(secret = %place(), "using the self-signed CA in the Secret");
        return Ok((bundle, Origin::Existing));
    }
    let now = OffsetDateTime::now_utc();
    let bundle = new_root(spec, now).context("creating the self-signed CA")?;
    let secret = secret_of(&config.namespace, istio_data(&bundle)?);
    match api.create(&PostParams::default(), &secret).await {
        Ok(_) => {
            tracing::info!(secret = %place(), "created a self-signed root CA in the Secret");
            Ok((bundle, Origin::Created))
        }
        Err(e) if meshca_kube::status::is_conflict(&e) => {
            // Another replica was first: use its CA.
            let secret = api.get(SECRET_NAME).await.with_context(failed)?;
            let bundle = read_bundle(&secret, OffsetDateTime::now_utc()).with_context(place)?;
            tracing::info!(secret = %place(), "another replica created the CA Secret; using it");
            Ok((bundle, Origin::LostRace))
        }
        // Only a missing namespace makes a create answer 404.
        Err(e) if meshca_kube::status::is_not_found(&e) => Err(e).with_context(|| {
            let ns = &config.namespace;
            format!(
                "{}: namespace {ns} does not exist. Create it (kubectl create namespace {ns}), \
                 or give meshca's namespace with POD_NAMESPACE or --ca-secret-namespace, or \
                 use --no-ca-secret to keep the CA in the state directory",
                place()
            )
        }),
        Err(e) => Err(e).with_context(|| format!("creating {}", failed())),
    }
}

/// A random duration in `[0, max)`.
fn jitter(max: Duration) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    let r = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    let nanos = u64::try_from(max.as_nanos()).unwrap_or(u64::MAX);
    if nanos == 0 {
        return Duration::ZERO;
    }
    Duration::from_nanos(r % nanos)
}

/// Checks the root every `check_interval` (plus jitter, as Istio does) and
/// rotates it when due; `on_change` gets every new bundle (rotated here or
/// by another replica). `served` is the signing certificate served now. When
/// `root_file` is given, the public roots are written there on change.
pub async fn rotation_loop(
    client: kube::Client,
    config: CaSecretConfig,
    ttl: Duration,
    mut served: Vec<u8>,
    root_file: Option<PathBuf>,
    on_change: impl Fn(CaBundle) + Send,
) {
    let api = Api::<Secret>::namespaced(client, &config.namespace);
    // Never hammer the API server, whatever the flag says.
    let interval = config.check_interval.max(Duration::from_millis(100));
    tokio::time::sleep(jitter(interval)).await;
    let mut last_error = meshca_kube::LastError::default();
    loop {
        let checked = check_once(&api, &config, ttl, &served).await;
        if checked.is_ok() {
            last_error.clear();
        }
        match checked {
            Ok(Some(bundle)) => {
                served = bundle.signing_cert_der().to_vec();
                if let Some(path) = &root_file
                    && let Err(e) =
                        meshca_ca_store::dir::replace_public(path, bundle.roots_pem().as_bytes())
                {
                    tracing::warn!(error = %format!("{e:#}"), "writing the root certificate");
                }
                on_change(bundle);
            }
            Ok(None) => {}
            Err(e) => {
                let error = format!("{e:#}");
                if last_error.is_new(&error) {
                    tracing::warn!(
                        %error,
                        namespace = %config.namespace,
                        "self-signed root check failed; retrying at the next check"
                    );
                }
            }
        }
        let pause = interval + jitter(interval / 10);
        tokio::time::sleep(pause).await;
    }
}

/// One check: the bundle to serve if it changed (rotated here, or by
/// another replica), `None` if nothing to do.
async fn check_once(
    api: &Api<Secret>,
    config: &CaSecretConfig,
    ttl: Duration,
    served: &[u8],
) -> Result<Option<CaBundle>> {
    // A conflict means another replica updated the Secret: read it again.
    for _ in 0..3 {
        let secret = api
            .get(SECRET_NAME)
            .await
            .context("reading the CA Secret")?;
        let now = OffsetDateTime::now_utc();
        let bundle = read_bundle(&secret, now)?;
        if !needs_rotation(
            bundle.not_before(),
            bundle.not_after(),
            now,
            config.grace_percentile,
        ) {
            let changed = bundle.signing_cert_der() != served;
            if changed {
                tracing::info!("the CA Secret holds a new root; serving it");
            }
            return Ok(changed.then_some(bundle));
        }
        let rotated = reissue(&bundle, ttl, now).context("re-issuing the self-signed root")?;
        let mut next = secret_of(&config.namespace, istio_data(&rotated)?);
        next.metadata.resource_version = secret.metadata.resource_version.clone();
        // Keep what else the Secret carries (labels, annotations, other keys).
        next.metadata.labels = secret.metadata.labels.clone();
        next.metadata.annotations = secret.metadata.annotations.clone();
        if let (Some(old), Some(new)) = (&secret.data, next.data.as_mut()) {
            for (k, v) in old {
                new.entry(k.clone()).or_insert_with(|| v.clone());
            }
        }
        match api
            .replace(SECRET_NAME, &PostParams::default(), &next)
            .await
        {
            Ok(_) => {
                tracing::info!(
                    old_not_after = %bundle.not_after(),
                    new_not_after = %rotated.not_after(),
                    "self-signed root re-issued with the same key and subject"
                );
                return Ok(Some(rotated));
            }
            Err(e) if meshca_kube::status::is_conflict(&e) => {
                tracing::info!("CA Secret changed meanwhile; reading it again");
            }
            Err(e) => return Err(e).context("updating the CA Secret"),
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(86_400);

    #[test]
    fn rotation_decision_by_remaining_life() {
        let start = OffsetDateTime::UNIX_EPOCH;
        let end = start + time::Duration::days(100);
        let at = |d: i64| start + time::Duration::days(d);
        assert!(!needs_rotation(start, end, at(0), 20));
        assert!(!needs_rotation(start, end, at(79), 20));
        assert!(needs_rotation(start, end, at(81), 20));
        assert!(needs_rotation(start, end, at(120), 20));
        assert!(needs_rotation(start, end, at(51), 50));
        assert!(!needs_rotation(start, end, at(49), 50));
        assert!(!needs_rotation(start, end, at(99), 0));
        assert!(needs_rotation(start, start, at(0), 20));
    }

    #[test]
    fn bundle_round_trips_through_secret_data() {
        let now = OffsetDateTime::now_utc();
        let spec = RootSpec {
            key_type: KeyType::EcdsaP256,
            org: "example.org",
            ttl: DAY,
        };
        let bundle = new_root(&spec, now).unwrap();
        let data = istio_data(&bundle).unwrap();
        let keys: Vec<_> = data.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [CA_CERT, CA_KEY, CERT_CHAIN, KEY, ROOT_CERT],
            "Istio's keys"
        );
        assert!(data[CERT_CHAIN].0.is_empty());
        assert!(data[KEY].0.is_empty());
        assert_eq!(data[CA_CERT].0, data[ROOT_CERT].0);
        let back = load_istio(&data, now).unwrap();
        assert_eq!(back.signing_cert_der(), bundle.signing_cert_der());
        assert_eq!(back.key().spki_der(), bundle.key().spki_der());

        let mut broken = data.clone();
        broken.remove(CA_KEY);
        let err = load_istio(&broken, now).unwrap_err().to_string();
        assert!(err.contains(CA_KEY), "{err}");
    }

    #[test]
    fn reissue_keeps_key_and_subject() {
        let now = OffsetDateTime::now_utc();
        let spec = RootSpec {
            key_type: KeyType::EcdsaP256,
            org: "example.org",
            ttl: Duration::from_secs(600),
        };
        let old = new_root(&spec, now).unwrap();
        let new = reissue(&old, DAY * 10, now).unwrap();
        assert_ne!(new.signing_cert_der(), old.signing_cert_der());
        assert_eq!(new.subject_der(), old.subject_der());
        assert_eq!(new.key().spki_der(), old.key().spki_der());
        assert_eq!(new.key_id(), old.key_id());
        assert!(new.not_after() > old.not_after());
        assert_eq!(new.roots_der(), [new.signing_cert_der().to_vec()]);
    }
}
