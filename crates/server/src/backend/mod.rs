//! Who signs an authenticated request: the local CA ([`local`]) or, in RA
//! mode, the Kubernetes CSR API ([`ra`]). Both answer in Istio's chain
//! layout, or with a refusal carrying Istio's error kind and a stable reason.

pub mod local;
pub mod ra;

use meshca_pki::ErrorKind;

/// One signing request of an authenticated caller.
pub struct SignRequest<'a> {
    pub csr_pem: &'a [u8],
    /// The caller's identities, from authentication (never from the CSR).
    pub identities: &'a [String],
    pub ttl_seconds: i64,
    /// The `CertSigner` metadata (RA mode's per-request signer).
    pub cert_signer: Option<&'a str>,
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

impl From<ra::RaError> for SignFailure {
    fn from(e: ra::RaError) -> Self {
        SignFailure {
            kind: e.kind(),
            reason: e.reason(),
            message: e.to_string(),
        }
    }
}

/// The seed's `CertificateAuthority.SignWithCertChain`, async because the
/// RA backend waits for a signer.
#[tonic::async_trait]
pub trait Backend: Send + Sync {
    /// The leaf, each intermediate, and all roots in the last element.
    async fn sign(&self, request: &SignRequest<'_>) -> Result<Vec<String>, SignFailure>;
}
