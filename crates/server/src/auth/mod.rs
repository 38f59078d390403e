//! Who is calling: Istio's authenticators in Istio's order. The identity
//! that goes into a certificate comes from here and nowhere else.
//!
//! [`Authenticator`] tries a verified client certificate ([`client_cert`]),
//! then the bearer token: a cached answer ([`cache`]), TokenReview
//! ([`token_review`]) or local JWT keys ([`jwt`]); ztunnel's impersonation
//! is checked afterwards ([`impersonation`]).

mod cache;
mod client_cert;
pub mod impersonation;
pub mod jwt;
pub mod local_issuer;
mod token_review;

pub use cache::{PodDeletions, TokenCache};
pub use client_cert::{ClientCertIssuers, certificate_identity};
pub use token_review::{TokenReviewer, check_audiences};

use std::sync::Arc;

use anyhow::{Result, anyhow, bail};
use meshca_kube::ApiBusy;
use meshca_kube::status::ApiUnavailable;
use meshca_pki::SpiffeId;
use sha2::{Digest, Sha256};

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

/// What a request carries that can prove who sent it.
pub struct Credentials<'a> {
    /// The client's leaf certificate (rustls checked its chain to the CA
    /// roots; [`ClientCertIssuers`] checks who signed it).
    pub peer_cert: Option<&'a [u8]>,
    /// The `authorization: Bearer` token.
    pub bearer: Option<&'a str>,
    /// The `clusterid` header.
    pub cluster_id: Option<&'a str>,
}

pub struct Authenticator {
    pub trust_domain: String,
    /// Whose leaves authenticate as client certificates.
    pub client_certs: Arc<ClientCertIssuers>,
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
        // As Istio: a refused certificate leaves the token to prove who
        // calls; without one, the certificate's refusal is the answer.
        let mut cert_error = None;
        if let Some(cert) = creds.peer_cert {
            match self.client_cert(cert) {
                Ok(caller) => return Ok(caller),
                Err(e) => cert_error = Some(e),
            }
        }
        let Some(token) = creds.bearer else {
            return Err(
                cert_error.unwrap_or_else(|| anyhow!("no client certificate and no bearer token"))
            );
        };
        let result = self.token(token, creds, metrics).await;
        match (result, cert_error) {
            (Err(e), Some(cert_error)) => {
                Err(e.context(format!("client certificate refused: {cert_error:#}")))
            }
            (result, _) => result,
        }
    }

    /// A client certificate from this CA's signing certificate (or one it
    /// rotated from) naming one SPIFFE ID in the trust domain.
    fn client_cert(&self, cert: &[u8]) -> Result<Caller, AuthError> {
        self.client_certs
            .check(cert, time::OffsetDateTime::now_utc())?;
        // The CA vouches for the certificate; a missing or unusable
        // identity is an identity-extraction failure.
        let identity = certificate_identity(cert, &self.trust_domain)
            .map_err(|e| NoIdentity(format!("{e:#}")))?;
        Ok(Caller {
            identities: vec![identity],
            authenticator: "client_cert",
            kube: None,
        })
    }

    async fn token(
        &self,
        token: &str,
        creds: &Credentials<'_>,
        metrics: &crate::metrics::Metrics,
    ) -> Result<Caller, AuthError> {
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
        // TokenReview got no API call slot in time, or no answer from the
        // API: the token is unjudged.
        let mut busy = None;
        let mut unavailable = None;
        if let Some(reviewer) = &self.token_review {
            match reviewer.review(token).await {
                Ok(account) => {
                    self.cache
                        .insert(key, &account, "token_review", jwt::unverified_expiry(token));
                    return self.caller(account, "token_review");
                }
                Err(e) => {
                    no_identity |= e.is::<NoIdentity>();
                    busy = busy.or(e.downcast_ref::<ApiBusy>().copied());
                    unavailable = unavailable.or(e.downcast_ref::<ApiUnavailable>().cloned());
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
        // Not refused: the caller should retry (`Unavailable`).
        if let Some(busy) = busy {
            return Err(anyhow::Error::new(busy).context(errors.join("; ")));
        }
        if let Some(unavailable) = unavailable {
            return Err(anyhow::Error::new(unavailable).context(errors.join("; ")));
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

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt_authenticator(issuer: &jwt::JwtIssuer) -> Authenticator {
        Authenticator {
            trust_domain: "cluster.local".into(),
            cluster_id: "Kubernetes".into(),
            cluster_aliases: vec![],
            client_certs: Arc::new(ClientCertIssuers::new(None, std::time::Duration::ZERO)),
            token_review: None,
            jwt: Some(
                JwtVerifier::new(
                    issuer.public_key_pem().as_bytes(),
                    "meshca-local",
                    &["istio-ca".into()],
                )
                .unwrap(),
            ),
            cache: TokenCache::new(std::time::Duration::ZERO, 0),
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

    #[tokio::test]
    async fn a_token_review_without_a_free_slot_in_time_is_busy_not_refused() {
        use std::time::Duration;
        let metrics = crate::metrics::Metrics::new(&mut Default::default());
        // The API never answers: the one TokenReview slot stays taken.
        let (client, _api) = meshca_kube::mock::client();
        let reviews = meshca_kube::ApiLimit::new(1).with_permit_wait(Duration::from_millis(50));
        let auth = Authenticator {
            token_review: Some(TokenReviewer::new(
                client,
                vec!["istio-ca".into()],
                meshca_kube::ApiLimit::new(8),
                reviews,
            )),
            jwt: None,
            ..jwt_authenticator(&issuer())
        };
        let holder = authenticate(&auth, &metrics, "first-token");
        let second = async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            authenticate(&auth, &metrics, "second-token").await
        };
        let e = tokio::select! {
            _ = holder => panic!("the mocked API never answers"),
            r = second => r.unwrap_err(),
        };
        assert!(e.is::<ApiBusy>(), "{e:#}");
        assert_eq!(
            crate::grpc::service::auth_error_status(&e).code(),
            tonic::Code::Unavailable
        );
    }

    #[tokio::test]
    async fn a_token_review_the_api_cannot_answer_is_unavailable_not_refused() {
        let metrics = crate::metrics::Metrics::new(&mut Default::default());
        let (client, mut api) = meshca_kube::mock::client();
        let auth = Authenticator {
            token_review: Some(TokenReviewer::new(
                client,
                vec!["istio-ca".into()],
                meshca_kube::ApiLimit::new(8),
                meshca_kube::ApiLimit::new(8),
            )),
            jwt: None,
            ..jwt_authenticator(&issuer())
        };
        let path = "/apis/authentication.k8s.io/v1/tokenreviews";
        // The apiserver without its storage (etcd away) answers 503; just
        // restarted, with its RBAC caches empty, 403 to meshca's own call.
        // A bad token is still refused once the API answers the review.
        for (code, body, unjudged) in [
            (403, meshca_kube::mock::status(403, "Forbidden"), true),
            (
                503,
                meshca_kube::mock::status(503, "ServiceUnavailable"),
                true,
            ),
            (429, meshca_kube::mock::status(429, "TooManyRequests"), true),
            (
                201,
                serde_json::json!({
                    "apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                    "spec": {}, "status": {"authenticated": false, "error": "invalid"},
                }),
                false,
            ),
        ] {
            let asked = authenticate(&auth, &metrics, "a-token");
            let answered = api.expect("POST", path, code, body);
            let (e, _) = tokio::join!(asked, answered);
            let e = e.unwrap_err();
            let status = crate::grpc::service::auth_error_status(&e);
            if unjudged {
                assert!(e.is::<ApiUnavailable>(), "{code}: {e:#}");
                assert_eq!(status.code(), tonic::Code::Unavailable, "{code}");
                assert_eq!(
                    status.metadata().get("meshca-reason").unwrap(),
                    "kube_api_unavailable"
                );
            } else {
                assert_eq!(status.code(), tonic::Code::Unauthenticated, "{e:#}");
            }
        }
    }

    fn issuer_token_of_another_key(now: i64) -> String {
        issuer().mint("ns1", "sa1", "istio-ca", 600, now).unwrap()
    }
}
