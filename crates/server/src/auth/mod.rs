//! Who is calling: Istio's authenticators in Istio's order. The identity
//! that goes into a certificate comes from here and nowhere else.

pub mod impersonation;
pub mod jwt;
pub mod local_issuer;

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use kube::api::PostParams;
use meshca_pki::SpiffeId;
use sha2::{Digest, Sha256};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

use meshca_kube::ApiLimit;

use self::jwt::JwtVerifier;

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub identities: Vec<String>,
    /// `client_cert`, `token_review` or `jwt` (a metrics label).
    pub authenticator: &'static str,
    /// The Kubernetes account behind a token (not for client certificates).
    pub kube: Option<KubeAccount>,
}

/// A ServiceAccount proven by a token; a bound token (TokenReview's
/// `user.extra`) also names the pod it was issued for.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KubeAccount {
    pub namespace: String,
    pub service_account: String,
    pub pod_name: Option<String>,
    pub pod_uid: Option<String>,
}

impl KubeAccount {
    fn new(namespace: String, service_account: String) -> Self {
        KubeAccount {
            namespace,
            service_account,
            ..Default::default()
        }
    }
}

const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";

/// What a request carries that can prove who sent it.
pub struct Credentials<'a> {
    /// The verified client certificate (rustls checked it against the CA roots).
    pub peer_cert: Option<&'a [u8]>,
    /// The `authorization: Bearer` token.
    pub bearer: Option<&'a str>,
    /// The `clusterid` header.
    pub cluster_id: Option<&'a str>,
}

pub struct Authenticator {
    pub trust_domain: String,
    pub cluster_id: String,
    pub cluster_aliases: Vec<String>,
    pub token_review: Option<TokenReviewer>,
    pub jwt: Option<JwtVerifier>,
    pub cache: TokenCache,
}

/// Why authentication failed; logged, never sent to the caller (who gets
/// Istio's "request authenticate failure"). Never contains the token.
pub type AuthError = anyhow::Error;

/// A credential was proven (a verified client certificate, a token the API
/// server or a trusted key vouches for) but names no identity a certificate
/// can carry: what `citadel_server_id_extraction_err_count` counts.
#[derive(Debug)]
pub struct NoIdentity(pub String);

impl std::fmt::Display for NoIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "no identity: {}", self.0)
    }
}

impl std::error::Error for NoIdentity {}

impl Authenticator {
    /// Client certificate first (renewals, VMs), then the bearer token.
    /// A failure because a proven credential names no usable identity
    /// ([`NoIdentity`]) also counts in `id_extraction_err`.
    pub async fn authenticate(
        &self,
        creds: &Credentials<'_>,
        metrics: &crate::metrics::Metrics,
    ) -> Result<Caller, AuthError> {
        let result = self.try_authenticate(creds, metrics).await;
        if let Err(e) = &result
            && e.is::<NoIdentity>()
        {
            metrics.id_extraction_err.inc();
        }
        result
    }

    async fn try_authenticate(
        &self,
        creds: &Credentials<'_>,
        metrics: &crate::metrics::Metrics,
    ) -> Result<Caller, AuthError> {
        if let Some(cert) = creds.peer_cert {
            let identities =
                certificate_identities(cert).map_err(|e| NoIdentity(format!("{e:#}")))?;
            if !identities.is_empty() {
                return Ok(Caller {
                    identities,
                    authenticator: "client_cert",
                    kube: None,
                });
            }
        }
        let token = creds
            .bearer
            .context("no client certificate and no bearer token")?;
        if let Some(claimed) = creds.cluster_id
            && !claimed.is_empty()
            && claimed != self.cluster_id
            && !self.cluster_aliases.iter().any(|a| a == claimed)
        {
            bail!(
                "client claims to be in cluster {claimed:?}, this CA serves {:?}",
                self.cluster_id
            );
        }
        // One cache for both token authenticators: a token proven once is
        // not re-proven (TokenReview round trip, or a signature check) until
        // its entry ends, which is never after the token's own exp.
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some((account, authenticator)) = self.cache.get(&key) {
            metrics.token_cache_hits.inc();
            return self.caller(account, authenticator);
        }
        let mut errors = Vec::new();
        // A token proven by one authenticator but naming no identity.
        let mut no_identity = false;
        if let Some(reviewer) = &self.token_review {
            match reviewer.review(token).await {
                Ok(account) => {
                    self.cache
                        .insert(key, &account, "token_review", jwt::unverified_expiry(token));
                    return self.caller(account, "token_review");
                }
                Err(e) => {
                    no_identity |= e.is::<NoIdentity>();
                    errors.push(format!("TokenReview: {e:#}"))
                }
            }
        }
        if let Some(verifier) = &self.jwt {
            let now = time::OffsetDateTime::now_utc().unix_timestamp();
            match verifier.verify(token, now) {
                Ok((ns, sa)) => {
                    let account = KubeAccount::new(ns, sa);
                    self.cache
                        .insert(key, &account, "jwt", jwt::unverified_expiry(token));
                    return self.caller(account, "jwt");
                }
                Err(e) => {
                    no_identity |= e.is::<NoIdentity>();
                    errors.push(format!("JWT: {e:#}"))
                }
            }
        }
        if errors.is_empty() {
            bail!("a bearer token was sent but no token authenticator is configured");
        }
        if no_identity {
            return Err(NoIdentity(errors.join("; ")).into());
        }
        bail!("{}", errors.join("; "))
    }

    fn caller(&self, account: KubeAccount, authenticator: &'static str) -> Result<Caller> {
        let id = SpiffeId::workload(
            &self.trust_domain,
            &account.namespace,
            &account.service_account,
        )
        .map_err(NoIdentity)?;
        Ok(Caller {
            identities: vec![id.to_string()],
            authenticator,
            kube: Some(account),
        })
    }
}

/// Every SAN of a verified client certificate, as Istio reads them.
pub fn certificate_identities(der: &[u8]) -> Result<Vec<String>> {
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der)
        .map_err(|e| anyhow::anyhow!("client certificate: {e}"))?;
    let Some(san) = cert
        .subject_alternative_name()
        .map_err(|e| anyhow::anyhow!("client certificate SAN: {e}"))?
    else {
        return Ok(vec![]);
    };
    Ok(san
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(u) => Some((*u).to_owned()),
            GeneralName::DNSName(d) => Some((*d).to_owned()),
            GeneralName::IPAddress(b) => match b.len() {
                4 => <[u8; 4]>::try_from(*b)
                    .ok()
                    .map(|a| std::net::Ipv4Addr::from(a).to_string()),
                16 => <[u8; 16]>::try_from(*b)
                    .ok()
                    .map(|a| std::net::Ipv6Addr::from(a).to_string()),
                _ => None,
            },
            _ => None,
        })
        .collect())
}

/// Kubernetes TokenReview with the configured audiences.
pub struct TokenReviewer {
    api: kube::Api<TokenReview>,
    audiences: Vec<String>,
    limit: ApiLimit,
}

impl TokenReviewer {
    pub fn new(client: kube::Client, audiences: Vec<String>, limit: ApiLimit) -> Self {
        TokenReviewer {
            api: kube::Api::all(client),
            audiences,
            limit,
        }
    }

    /// The account (and, for a bound token, its pod) a token proves.
    pub async fn review(&self, token: &str) -> Result<KubeAccount> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(self.audiences.clone()),
            },
            ..Default::default()
        };
        let answer = self
            .limit
            .call(self.api.create(&PostParams::default(), &review))
            .await
            .context("TokenReview request")?;
        let status = answer.status.context("TokenReview without status")?;
        if status.authenticated != Some(true) {
            bail!("not authenticated: {}", status.error.unwrap_or_default());
        }
        check_audiences(&status, &self.audiences)?;
        // Authenticated: from here on, a failure is a missing identity.
        let user = status
            .user
            .ok_or_else(|| NoIdentity("TokenReview without user".into()))?;
        let groups = user.groups.unwrap_or_default();
        if !groups.iter().any(|g| g == "system:serviceaccounts") {
            return Err(NoIdentity(format!("not a service account (groups {groups:?})")).into());
        }
        let username = user.username.unwrap_or_default();
        let (namespace, service_account) = jwt::parse_service_account(&username)
            .map_err(|e| NoIdentity(format!("username {e}")))?;
        let mut extra = user.extra.unwrap_or_default();
        let mut one = |key: &str| {
            extra
                .remove(key)
                .and_then(|v| v.into_iter().next())
                .filter(|v| !v.is_empty())
        };
        Ok(KubeAccount {
            namespace,
            service_account,
            pod_name: one(EXTRA_POD_NAME),
            pod_uid: one(EXTRA_POD_UID),
        })
    }
}

/// An authenticated TokenReview answer must name one of the audiences asked
/// for: an audience-unaware authenticator (a webhook behind the apiserver)
/// answers without `status.audiences`, and an empty list means "valid for
/// the apiserver's own audience", not for this CA. With no audience asked
/// for, the apiserver's own audience is what was asked.
pub fn check_audiences(status: &TokenReviewStatus, requested: &[String]) -> Result<()> {
    if requested.is_empty() {
        return Ok(());
    }
    let answered = status.audiences.as_deref().unwrap_or_default();
    if answered.iter().any(|a| requested.contains(a)) {
        return Ok(());
    }
    bail!(
        "TokenReview answer names audiences {answered:?}, none of the requested {requested:?} \
         (an audience-unaware authenticator?)"
    )
}

/// TokenReview answers, keyed by a hash of the token. An entry never
/// outlives the token's own `exp` nor the configured TTL; only successes are
/// cached, so a revoked token is refused as soon as its entry ends. A moka
/// cache: bounded to `max_entries` (TinyLFU admission and eviction, so a
/// burst of one-off tokens does not push out the ones in use), each entry
/// with its own life.
pub struct TokenCache {
    ttl: Duration,
    /// `None` when caching is off (TTL or size 0).
    entries: Option<moka::sync::Cache<[u8; 32], Entry>>,
}

#[derive(Clone)]
struct Entry {
    account: KubeAccount,
    authenticator: &'static str,
    /// How long the entry lives from its insertion.
    life: Duration,
}

/// Each entry lives for its own `life`, counted from its last insertion.
struct EntryLife;

impl moka::Expiry<[u8; 32], Entry> for EntryLife {
    fn expire_after_create(&self, _: &[u8; 32], entry: &Entry, _: Instant) -> Option<Duration> {
        Some(entry.life)
    }

    fn expire_after_update(
        &self,
        _: &[u8; 32],
        entry: &Entry,
        _: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(entry.life)
    }
}

impl TokenCache {
    pub fn new(ttl: Duration, max_entries: usize) -> Self {
        let entries = (!ttl.is_zero() && max_entries > 0).then(|| {
            moka::sync::Cache::builder()
                .max_capacity(max_entries as u64)
                .expire_after(EntryLife)
                .build()
        });
        TokenCache { ttl, entries }
    }

    fn get(&self, key: &[u8; 32]) -> Option<(KubeAccount, &'static str)> {
        let entry = self.entries.as_ref()?.get(key)?;
        Some((entry.account, entry.authenticator))
    }

    fn insert(
        &self,
        key: [u8; 32],
        account: &KubeAccount,
        authenticator: &'static str,
        token_exp: Option<i64>,
    ) {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let (Some(entries), Some(life)) = (&self.entries, self.life(token_exp, now)) else {
            return;
        };
        entries.insert(
            key,
            Entry {
                account: account.clone(),
                authenticator,
                life,
            },
        );
    }

    /// The TTL, cut to what is left of the token at `now` (unix seconds).
    /// Without a readable exp the token's lifetime is unknown: not cached.
    fn life(&self, token_exp: Option<i64>, now: i64) -> Option<Duration> {
        let left = u64::try_from(token_exp? - now).ok().filter(|&s| s > 0)?;
        Some(self.ttl.min(Duration::from_secs(left)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use moka::Expiry;

    fn now() -> i64 {
        time::OffsetDateTime::now_utc().unix_timestamp()
    }

    #[test]
    fn cache_entries_never_outlive_the_token() {
        let cache = TokenCache::new(Duration::from_secs(60), 10);
        let now = now();
        let a = KubeAccount::new("ns".into(), "sa".into());
        cache.insert([1; 32], &a, "jwt", Some(now + 3600));
        assert_eq!(cache.get(&[1; 32]), Some((a.clone(), "jwt")));
        cache.insert([2; 32], &a, "jwt", Some(now - 1));
        assert_eq!(cache.get(&[2; 32]), None, "expired token cached");
        cache.insert([3; 32], &a, "jwt", None);
        assert_eq!(cache.get(&[3; 32]), None, "token without exp cached");

        // An entry's life: the TTL, or what is left of the token if shorter.
        let at = 1_000_000;
        assert_eq!(
            cache.life(Some(at + 3600), at),
            Some(Duration::from_secs(60))
        );
        assert_eq!(cache.life(Some(at + 10), at), Some(Duration::from_secs(10)));
        assert_eq!(cache.life(Some(at), at), None);
        assert_eq!(cache.life(Some(at - 1), at), None);
        assert_eq!(cache.life(None, at), None);
        // ... and moka is told exactly that life, on insertion and on replacement.
        let entry = Entry {
            account: a,
            authenticator: "jwt",
            life: Duration::from_secs(10),
        };
        let t = Instant::now();
        assert_eq!(
            EntryLife.expire_after_create(&[1; 32], &entry, t),
            Some(entry.life)
        );
        assert_eq!(
            EntryLife.expire_after_update(&[1; 32], &entry, t, Some(Duration::from_secs(1))),
            Some(entry.life)
        );
    }

    #[test]
    fn an_entry_ends_with_its_own_life() {
        let cache = TokenCache::new(Duration::from_secs(60), 10);
        let entries = cache.entries.as_ref().unwrap();
        let a = KubeAccount::new("ns".into(), "sa".into());
        for (key, life) in [
            ([1; 32], Duration::from_secs(3600)),
            ([2; 32], Duration::from_millis(20)),
        ] {
            entries.insert(
                key,
                Entry {
                    account: a.clone(),
                    authenticator: "jwt",
                    life,
                },
            );
        }
        // moka reads std's clock (its mock clock is private): a real wait,
        // which a slow machine can only lengthen.
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(cache.get(&[1; 32]), Some((a, "jwt")));
        assert_eq!(cache.get(&[2; 32]), None, "entry outlived its life");
    }

    #[test]
    fn cached_entries_keep_the_bound_pod() {
        let cache = TokenCache::new(Duration::from_secs(60), 10);
        let exp = Some(now() + 600);
        let a = KubeAccount {
            namespace: "istio-system".into(),
            service_account: "ztunnel".into(),
            pod_name: Some("ztunnel-abc".into()),
            pod_uid: Some("0000-1111".into()),
        };
        cache.insert([7; 32], &a, "token_review", exp);
        assert_eq!(cache.get(&[7; 32]), Some((a, "token_review")));
    }

    fn jwt_authenticator(issuer: &jwt::JwtIssuer) -> Authenticator {
        Authenticator {
            trust_domain: "cluster.local".into(),
            cluster_id: "Kubernetes".into(),
            cluster_aliases: vec![],
            token_review: None,
            jwt: Some(
                JwtVerifier::new(
                    issuer.public_key_pem().as_bytes(),
                    "meshca-local",
                    &["istio-ca".into()],
                )
                .unwrap(),
            ),
            cache: TokenCache::new(Duration::ZERO, 0),
        }
    }

    fn issuer() -> jwt::JwtIssuer {
        jwt::JwtIssuer::from_pkcs8(&jwt::JwtIssuer::generate_pkcs8().unwrap(), "meshca-local")
            .unwrap()
    }

    async fn authenticate(
        auth: &Authenticator,
        metrics: &crate::metrics::Metrics,
        token: &str,
    ) -> Result<Caller, AuthError> {
        let creds = Credentials {
            peer_cert: None,
            bearer: Some(token),
            cluster_id: None,
        };
        auth.authenticate(&creds, metrics).await
    }

    #[tokio::test]
    async fn only_a_proven_credential_without_identity_counts_as_id_extraction_error() {
        let metrics = crate::metrics::Metrics::new(&mut Default::default());
        let issuer = issuer();
        let auth = jwt_authenticator(&issuer);
        let now = time::OffsetDateTime::now_utc().unix_timestamp();

        let good = issuer.mint("ns1", "sa1", "istio-ca", 600, now).unwrap();
        let caller = authenticate(&auth, &metrics, &good).await.unwrap();
        assert_eq!(caller.identities, ["spiffe://cluster.local/ns/ns1/sa/sa1"]);

        // Not proven: another key's signature, another audience.
        let stranger = issuer_token_of_another_key(now);
        assert!(authenticate(&auth, &metrics, &stranger).await.is_err());
        let wrong_audience = issuer.mint("ns1", "sa1", "other", 600, now).unwrap();
        assert!(
            authenticate(&auth, &metrics, &wrong_audience)
                .await
                .is_err()
        );
        assert_eq!(metrics.id_extraction_err.get(), 0);

        // Proven, but `sub` (system:serviceaccount:ns1:a:b) names no account.
        let no_account = issuer.mint("ns1", "a:b", "istio-ca", 600, now).unwrap();
        let e = authenticate(&auth, &metrics, &no_account)
            .await
            .unwrap_err();
        assert!(e.is::<NoIdentity>(), "{e:#}");
        assert_eq!(metrics.id_extraction_err.get(), 1);

        // Proven, but the account makes no valid SPIFFE ID.
        let bad_id = issuer.mint("ns 1", "sa1", "istio-ca", 600, now).unwrap();
        let e = authenticate(&auth, &metrics, &bad_id).await.unwrap_err();
        assert!(e.is::<NoIdentity>(), "{e:#}");
        assert_eq!(metrics.id_extraction_err.get(), 2);

        // Proven, but `sub` would smuggle a path into the SPIFFE ID.
        let path = issuer.mint("a/sa/b", "c", "istio-ca", 600, now).unwrap();
        let e = authenticate(&auth, &metrics, &path).await.unwrap_err();
        assert!(e.is::<NoIdentity>(), "{e:#}");
        assert_eq!(metrics.id_extraction_err.get(), 3);
    }

    fn issuer_token_of_another_key(now: i64) -> String {
        issuer().mint("ns1", "sa1", "istio-ca", 600, now).unwrap()
    }

    #[test]
    fn a_token_review_must_name_a_requested_audience() {
        let requested = vec!["istio-ca".to_string(), "other".to_string()];
        let status = |audiences: Option<&[&str]>| TokenReviewStatus {
            authenticated: Some(true),
            audiences: audiences.map(|a| a.iter().map(|s| s.to_string()).collect()),
            ..Default::default()
        };
        assert!(check_audiences(&status(Some(&["istio-ca"])), &requested).is_ok());
        assert!(check_audiences(&status(Some(&["x", "other"])), &requested).is_ok());
        // An audience-unaware authenticator: no audiences, or the apiserver's.
        for answer in [
            None,
            Some(&[][..]),
            Some(&["https://kubernetes.default.svc"][..]),
        ] {
            let e = check_audiences(&status(answer), &requested).unwrap_err();
            assert!(
                !e.is::<NoIdentity>(),
                "not proven for this CA: unauthenticated"
            );
            assert!(e.to_string().contains("none of the requested"), "{e:#}");
        }
        // No audience asked for: the apiserver's own was.
        assert!(check_audiences(&status(None), &[]).is_ok());
    }

    #[test]
    fn a_full_cache_stays_within_its_size() {
        let cache = TokenCache::new(Duration::from_secs(60), 2);
        let exp = Some(now() + 600);
        let a = KubeAccount::new("ns".into(), "sa".into());
        for i in 0..5u8 {
            cache.insert([i; 32], &a, "jwt", exp);
        }
        let entries = cache.entries.as_ref().unwrap();
        entries.run_pending_tasks();
        assert_eq!(entries.entry_count(), 2);
    }

    #[test]
    fn a_zero_ttl_or_size_caches_nothing() {
        let exp = Some(now() + 600);
        let a = KubeAccount::new("ns".into(), "sa".into());
        for cache in [
            TokenCache::new(Duration::ZERO, 10),
            TokenCache::new(Duration::from_secs(60), 0),
        ] {
            cache.insert([1; 32], &a, "jwt", exp);
            assert_eq!(cache.get(&[1; 32]), None);
        }
    }
}
