//! `IstioCertificateService/CreateCertificate`: authenticate, sign, answer in
//! Istio's layout with Istio's codes.

use std::sync::{Arc, RwLock};
use std::time::Instant;

use meshca_pki::{CertOptions, CertificateAuthority, ErrorKind, GrpcCode, LocalCa};
use meshca_proto::istio_certificate_service_server::IstioCertificateService;
use meshca_proto::{IstioCertificateRequest, IstioCertificateResponse};
use tonic::{Request, Response, Status};

use crate::auth::{Authenticator, Credentials};
use crate::metrics::{AuthLabel, ErrorLabel, Metrics};
use crate::tls::ConnInfo;

/// Who signs workload certificates.
pub enum Backend {
    /// The local CA in [`Shared::ca`].
    Local,
    /// The Kubernetes CSR API (RA mode); the local CA then only signs the
    /// serving certificate, as istiod's does in RA mode.
    KubernetesRa(Box<crate::ra::KubernetesRa>),
}

/// State shared by the handlers and the reload loop.
pub struct Shared {
    /// The local CA: signs workloads in [`Backend::Local`] mode and always
    /// the serving certificate.
    pub ca: RwLock<Arc<LocalCa>>,
    pub backend: Backend,
    pub auth: Authenticator,
    pub metrics: Metrics,
    /// ztunnel impersonation; `None`: every `ImpersonatedIdentity` is refused.
    pub impersonation: Option<crate::impersonation::Impersonation>,
}

/// Why a backend did not sign: Istio's error kind, a stable reason, a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignFailure {
    pub kind: ErrorKind,
    pub reason: &'static str,
    pub message: String,
}

impl From<meshca_pki::Error> for SignFailure {
    fn from(e: meshca_pki::Error) -> Self {
        SignFailure {
            kind: e.kind(),
            reason: e.reason(),
            message: e.to_string(),
        }
    }
}

impl From<crate::ra::RaError> for SignFailure {
    fn from(e: crate::ra::RaError) -> Self {
        SignFailure {
            kind: e.kind(),
            reason: e.reason(),
            message: e.to_string(),
        }
    }
}

/// One signing request of an authenticated caller.
pub struct SignRequest<'a> {
    pub csr_pem: &'a [u8],
    pub identities: &'a [String],
    pub ttl_seconds: i64,
    /// The `CertSigner` metadata (RA mode's per-request signer).
    pub cert_signer: Option<&'a str>,
}

impl Shared {
    pub fn ca(&self) -> Arc<LocalCa> {
        self.ca.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The chain in Istio's response layout, from the configured backend.
    pub async fn sign(&self, req: &SignRequest<'_>) -> Result<Vec<String>, SignFailure> {
        match &self.backend {
            Backend::Local => {
                let options = CertOptions {
                    subject_ids: req.identities,
                    ttl_seconds: req.ttl_seconds,
                    for_ca: false,
                };
                // Signing is CPU-bound and short (one signature); doing it
                // inline avoids a thread hop per request.
                Ok(self.ca().sign_with_cert_chain(req.csr_pem, &options)?)
            }
            Backend::KubernetesRa(ra) => Ok(ra
                .sign(
                    req.csr_pem,
                    req.identities,
                    req.ttl_seconds,
                    false,
                    req.cert_signer,
                )
                .await?),
        }
    }
}

pub struct CaService {
    pub shared: Arc<Shared>,
}

/// The header carrying the stable reason of a refusal next to Istio's message.
pub const REASON_HEADER: &str = "meshca-reason";

fn metadata_string<'a>(request: &'a IstioCertificateRequest, key: &str) -> Option<&'a str> {
    let value = request.metadata.as_ref()?.fields.get(key)?;
    match value.kind.as_ref()? {
        prost_types::value::Kind::StringValue(s) => Some(s.as_str()),
        _ => None,
    }
}

fn refuse(code: tonic::Code, message: &str, reason: &str) -> Status {
    let mut status = Status::new(code, message);
    if let Ok(value) = reason.parse() {
        status.metadata_mut().insert(REASON_HEADER, value);
    }
    status
}

#[tonic::async_trait]
impl IstioCertificateService for CaService {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let started = Instant::now();
        let m = &self.shared.metrics;
        m.csr.inc();

        let header = |name: &str| request.metadata().get(name).and_then(|v| v.to_str().ok());
        let conn = request.extensions().get::<ConnInfo>();
        let creds = Credentials {
            peer_cert: conn.and_then(|c| c.peer_cert.as_deref()).map(Vec::as_slice),
            bearer: header("authorization").and_then(|v| v.strip_prefix("Bearer ")),
            cluster_id: header("clusterid"),
        };
        let caller = match self.shared.auth.authenticate(&creds, m).await {
            Ok(caller) => caller,
            Err(e) => {
                m.authentication_failure.inc();
                let remote = conn.and_then(|c| c.remote);
                tracing::info!(?remote, error = %format!("{e:#}"), "authentication failed");
                return Err(refuse(
                    tonic::Code::Unauthenticated,
                    "request authenticate failure",
                    "unauthenticated",
                ));
            }
        };
        m.authenticated
            .get_or_create(&AuthLabel {
                authenticator: caller.authenticator.into(),
            })
            .inc();

        let body = request.into_inner();
        let mut caller = caller;
        if let Some(requested) =
            metadata_string(&body, "ImpersonatedIdentity").filter(|s| !s.is_empty())
        {
            let decision = match &self.shared.impersonation {
                Some(imp) => crate::impersonation::decide(
                    &imp.trusted,
                    &self.shared.auth.trust_domain,
                    &caller,
                    requested,
                    &imp.pods,
                ),
                None => Err(crate::impersonation::Refusal {
                    reason: "impersonation_not_allowed",
                    detail: "impersonation is off".into(),
                }),
            };
            match decision {
                Ok(identity) => {
                    tracing::info!(caller = ?caller.identities, impersonated = %identity, "impersonation allowed");
                    caller.identities = vec![identity];
                }
                Err(refusal) => {
                    m.authentication_failure.inc();
                    tracing::info!(caller = ?caller.identities, requested, reason = refusal.reason, detail = %refusal.detail, "impersonation refused");
                    return Err(refuse(
                        tonic::Code::Unauthenticated,
                        crate::impersonation::REFUSAL_MESSAGE,
                        refusal.reason,
                    ));
                }
            }
        }

        let result = self
            .shared
            .sign(&SignRequest {
                csr_pem: body.csr.as_bytes(),
                identities: &caller.identities,
                ttl_seconds: body.validity_duration,
                cert_signer: metadata_string(&body, "CertSigner"),
            })
            .await;
        m.issue_duration.observe(started.elapsed().as_secs_f64());
        match result {
            Ok(cert_chain) => {
                m.success_cert_issuance.inc();
                tracing::debug!(identities = ?caller.identities, "certificate issued");
                Ok(Response::new(IstioCertificateResponse { cert_chain }))
            }
            Err(e) => {
                if e.kind == ErrorKind::CsrError {
                    m.csr_parsing_err.inc();
                }
                m.csr_sign_err
                    .get_or_create(&ErrorLabel {
                        error: e.reason.into(),
                    })
                    .inc();
                tracing::info!(identities = ?caller.identities, reason = e.reason, error = %e.message, "CSR signing error");
                let code = match e.kind.grpc_code() {
                    GrpcCode::InvalidArgument => tonic::Code::InvalidArgument,
                    GrpcCode::Internal => tonic::Code::Internal,
                };
                Err(refuse(
                    code,
                    &format!("CSR signing error ({})", e.message),
                    e.reason,
                ))
            }
        }
    }
}
