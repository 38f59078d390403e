//! Why an RA request got no certificate, each with a stable reason.

use std::time::Duration;

use meshca_pki::ErrorKind;

/// Why an RA request got no certificate. Every variant has a stable reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RaError {
    #[error(transparent)]
    Request(#[from] meshca_pki::Error),
    #[error("CA certificates are not issued in RA mode")]
    ForCa,
    #[error("CSR SAN {0} is not an identity of the caller")]
    SanNotCallers(String),
    #[error("CSR does not match Istio's template: {0}")]
    Template(String),
    #[error("CertSigner {0:?} was requested but CERT_SIGNER_DOMAIN is not set")]
    NoSignerDomain(String),
    #[error("CertSigner {0:?} is not on the allow-list (--cert-signers)")]
    SignerNotAllowed(String),
    #[error("no signer: set K8S_SIGNER, or CERT_SIGNER_DOMAIN with CertSigner metadata")]
    NoSigner,
    #[error("no roots are configured for signer {0}")]
    NoRoots(String),
    #[error("the CSR was denied: {reason}: {message}")]
    Denied { reason: String, message: String },
    #[error("the signer failed the CSR: {reason}: {message}")]
    Failed { reason: String, message: String },
    #[error("no certificate from signer {signer} within {timeout:?}")]
    Timeout { signer: String, timeout: Duration },
    #[error("the CSR was deleted before it was signed")]
    Deleted,
    /// Another object (another UID or request) now has our CSR's name: it
    /// is never approved, deleted or taken as our answer.
    #[error("CSR {0} was replaced by another object of the same name; not approving it")]
    Replaced(String),
    #[error("Kubernetes API: {0}")]
    Api(String),
    #[error("the signed chain is not acceptable: {0}")]
    Chain(String),
}

impl RaError {
    /// Istio's error kind, which decides the gRPC code: request problems are
    /// InvalidArgument (a retry cannot help), everything on the Kubernetes
    /// or signer side Internal (retried by istio-agent).
    pub fn kind(&self) -> ErrorKind {
        match self {
            RaError::Request(e) => e.kind(),
            RaError::ForCa
            | RaError::SanNotCallers(_)
            | RaError::Template(_)
            | RaError::SignerNotAllowed(_) => ErrorKind::CsrError,
            _ => ErrorKind::CertGenError,
        }
    }

    pub fn reason(&self) -> &'static str {
        match self {
            RaError::Request(e) => e.reason(),
            RaError::ForCa => "ra_ca_requested",
            RaError::SanNotCallers(_) => "ra_san_not_callers",
            RaError::Template(_) => "ra_csr_template",
            RaError::NoSignerDomain(_) => "ra_no_signer_domain",
            RaError::SignerNotAllowed(_) => "ra_signer_not_allowed",
            RaError::NoSigner => "ra_no_signer",
            RaError::NoRoots(_) => "ra_no_roots",
            RaError::Denied { .. } => "ra_denied",
            RaError::Failed { .. } => "ra_failed",
            RaError::Timeout { .. } => "ra_timeout",
            RaError::Deleted => "ra_csr_deleted",
            RaError::Replaced(_) => "ra_csr_replaced",
            RaError::Api(_) => "ra_kubernetes_api",
            RaError::Chain(_) => "ra_chain_invalid",
        }
    }
}
