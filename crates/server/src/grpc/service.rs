//! `IstioCertificateService/CreateCertificate`: authenticate, sign, answer in
//! Istio's layout with Istio's codes.

use std::sync::Arc;
use std::time::Instant;

use meshca_kube::ApiBusy;
use meshca_kube::status::ApiUnavailable;
use meshca_pki::{ErrorKind, GrpcCode};
use meshca_proto::istio_certificate_service_server::IstioCertificateService;
use meshca_proto::{IstioCertificateRequest, IstioCertificateResponse};
use tonic::{Request, Response, Status};

use crate::auth::impersonation::{self, Impersonation};
use crate::auth::{Authenticator, Credentials};
use crate::backend::{Backend, SignRequest};
use crate::grpc::tls::ConnInfo;
use crate::metrics::{AuthLabel, ErrorLabel, InFlight, Metrics};

/// The gRPC service: authenticate, apply impersonation, sign with the backend.
pub struct CaService {
    pub backend: Arc<dyn Backend>,
    pub auth: Authenticator,
    pub metrics: Arc<Metrics>,
    /// ztunnel impersonation; `None`: every `ImpersonatedIdentity` is refused.
    pub impersonation: Option<Impersonation>,
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

/// The answer to a failed authentication: Istio's `Unauthenticated`, or
/// `Unavailable` (which istio-agent retries) when the token could not be
/// judged: no Kubernetes API call slot came in time (`kube_api_busy`), or
/// the TokenReview call failed (`kube_api_unavailable`: the apiserver down,
/// without its storage, or just restarted). istiod answers the latter
/// `Unauthenticated`,
/// which the agent does not retry: a workload would wait for its next
/// rotation attempt instead of a retry seconds later.
pub fn auth_error_status(e: &crate::auth::AuthError) -> Status {
    if e.is::<ApiBusy>() {
        return refuse(
            tonic::Code::Unavailable,
            "authentication unavailable, retry",
            "kube_api_busy",
        );
    }
    if e.is::<ApiUnavailable>() {
        return refuse(
            tonic::Code::Unavailable,
            "authentication unavailable, retry",
            "kube_api_unavailable",
        );
    }
    refuse(
        tonic::Code::Unauthenticated,
        "request authenticate failure",
        "unauthenticated",
    )
}

#[tonic::async_trait]
impl IstioCertificateService for CaService {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let started = Instant::now();
        let m = &self.metrics;
        let _in_flight = InFlight::start(&m.in_flight);
        m.csr.inc();

        let header = |name: &str| request.metadata().get(name).and_then(|v| v.to_str().ok());
        let conn = request.extensions().get::<ConnInfo>();
        let creds = Credentials {
            peer_cert: conn.and_then(|c| c.peer_cert.as_deref()).map(Vec::as_slice),
            bearer: header("authorization").and_then(|v| v.strip_prefix("Bearer ")),
            cluster_id: header("clusterid"),
        };
        let caller = match self.auth.authenticate(&creds, m).await {
            Ok(caller) => caller,
            Err(e) => {
                let remote = conn.and_then(|c| c.remote);
                let status = auth_error_status(&e);
                if status.code() == tonic::Code::Unavailable {
                    tracing::warn!(?remote, error = %format!("{e:#}"), "authentication deferred: Kubernetes API busy");
                } else {
                    m.authentication_failure.inc();
                    tracing::info!(?remote, error = %format!("{e:#}"), "authentication failed");
                }
                return Err(status);
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
            let decision = match &self.impersonation {
                Some(imp) => impersonation::decide(
                    &imp.trusted,
                    &self.auth.trust_domain,
                    &caller,
                    requested,
                    &imp.pods,
                ),
                None => Err(impersonation::Refusal {
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
                        impersonation::REFUSAL_MESSAGE,
                        refusal.reason,
                    ));
                }
            }
        }

        let result = self
            .backend
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_busy_kubernetes_api_is_unavailable_and_anything_else_unauthenticated() {
        let busy = anyhow::Error::new(ApiBusy(Duration::from_secs(5)))
            .context("TokenReview: Kubernetes API busy");
        let status = auth_error_status(&busy);
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert_eq!(
            status.metadata().get(REASON_HEADER).unwrap(),
            "kube_api_busy"
        );

        let refused = auth_error_status(&anyhow::anyhow!("TokenReview: not authenticated"));
        assert_eq!(refused.code(), tonic::Code::Unauthenticated);
        assert_eq!(
            refused.metadata().get(REASON_HEADER).unwrap(),
            "unauthenticated"
        );
    }
}
