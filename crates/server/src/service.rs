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

/// State shared by the handlers and the reload loop.
pub struct Shared {
    pub ca: RwLock<Arc<LocalCa>>,
    pub auth: Authenticator,
    pub metrics: Metrics,
}

impl Shared {
    pub fn ca(&self) -> Arc<LocalCa> {
        self.ca.read().unwrap_or_else(|p| p.into_inner()).clone()
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
        // Impersonation (ztunnel) needs the node checks of a later release;
        // until then it is refused, never granted.
        if metadata_string(&body, "ImpersonatedIdentity").is_some_and(|s| !s.is_empty()) {
            m.authentication_failure.inc();
            return Err(refuse(
                tonic::Code::Unauthenticated,
                "request impersonation authentication failure",
                "impersonation_not_allowed",
            ));
        }

        let ca = self.shared.ca();
        let options = CertOptions {
            subject_ids: &caller.identities,
            ttl_seconds: body.validity_duration,
            for_ca: false,
        };
        // Signing is CPU-bound and short (one signature); doing it inline
        // avoids a thread hop per request.
        let result = ca.sign_with_cert_chain(body.csr.as_bytes(), &options);
        m.issue_duration.observe(started.elapsed().as_secs_f64());
        match result {
            Ok(cert_chain) => {
                m.success_cert_issuance.inc();
                tracing::debug!(identities = ?caller.identities, "certificate issued");
                Ok(Response::new(IstioCertificateResponse { cert_chain }))
            }
            Err(e) => {
                if e.kind() == ErrorKind::CsrError {
                    m.csr_parsing_err.inc();
                }
                m.csr_sign_err
                    .get_or_create(&ErrorLabel {
                        error: e.reason().into(),
                    })
                    .inc();
                tracing::info!(identities = ?caller.identities, reason = e.reason(), error = %e, "CSR signing error");
                let code = match e.grpc_code() {
                    GrpcCode::InvalidArgument => tonic::Code::InvalidArgument,
                    GrpcCode::Internal => tonic::Code::Internal,
                };
                Err(refuse(
                    code,
                    &format!("CSR signing error ({e})"),
                    e.reason(),
                ))
            }
        }
    }
}
