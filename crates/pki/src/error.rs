//! Errors with stable reason strings.
//!
//! Every refusal has one `reason()`: a snake_case string that never changes
//! once released. The same string labels metrics, goes into a Kubernetes CSR
//! `Failed` condition message and into the gRPC error detail, so operators can
//! grep one word across all three.

use crate::key::SignError;
use crate::pem::PemError;

/// Istio's CA error types (`caerror.ErrType`), which decide the gRPC code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    CaNotReady,
    CsrError,
    TtlError,
    CertGenError,
}

/// The gRPC status codes the CA answers with; numeric values are gRPC's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrpcCode {
    InvalidArgument = 3,
    Internal = 13,
}

impl ErrorKind {
    /// Istio's mapping: request problems are InvalidArgument (not retried by
    /// istio-agent), CA-side problems are Internal (retried with backoff).
    pub fn grpc_code(self) -> GrpcCode {
        match self {
            ErrorKind::CsrError | ErrorKind::TtlError => GrpcCode::InvalidArgument,
            ErrorKind::CaNotReady | ErrorKind::CertGenError => GrpcCode::Internal,
        }
    }

    /// Istio's own names for these kinds (its `csr_sign_err_count{error}` label).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::CaNotReady => "CA_NOT_READY",
            ErrorKind::CsrError => "CSR_ERROR",
            ErrorKind::TtlError => "TTL_ERROR",
            ErrorKind::CertGenError => "CERT_GEN_ERROR",
        }
    }
}

/// Why a CSR was refused before anything was signed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CsrError {
    #[error("CSR is {size} bytes, above the limit of {limit}")]
    TooLarge { size: usize, limit: usize },
    #[error("CSR is not PEM: {0}")]
    NotPem(PemError),
    #[error("expected exactly one PEM block, found {0}")]
    BlockCount(usize),
    #[error("PEM block is `{0}`, expected `CERTIFICATE REQUEST`")]
    WrongBlockType(String),
    #[error("CSR is not valid DER: {0}")]
    Malformed(String),
    #[error("CSR has {0} bytes after its DER structure")]
    TrailingData(usize),
    #[error("public key algorithm {0} is not allowed")]
    KeyAlgorithm(String),
    #[error("RSA key of {bits} bits is outside the allowed {min}-{max}")]
    RsaKeySize { bits: usize, min: usize, max: usize },
    #[error("elliptic curve {0} is not allowed")]
    Curve(String),
    #[error("signature algorithm {0} is too weak (SHA-1/MD5)")]
    WeakSignatureAlgorithm(String),
    #[error("signature algorithm {0} is not supported")]
    SignatureAlgorithm(String),
    #[error("CSR signature does not verify (no proof of possession of the key)")]
    BadSignature,
    #[error("requested extension {0} is malformed")]
    MalformedExtension(&'static str),
    #[error("RSA public exponent {0} is not allowed (it must be odd, at least 3 and below 2^32)")]
    RsaExponent(String),
    #[error("the CSR requests {0} more than once")]
    DuplicateExtension(String),
    #[error("the proof of possession does not verify with the public key")]
    ProofOfPossession,
}

impl CsrError {
    pub fn reason(&self) -> &'static str {
        match self {
            CsrError::TooLarge { .. } => "csr_too_large",
            CsrError::NotPem(_) => "csr_not_pem",
            CsrError::BlockCount(_) => "csr_pem_block_count",
            CsrError::WrongBlockType(_) => "csr_pem_type",
            CsrError::Malformed(_) => "csr_malformed",
            CsrError::TrailingData(_) => "csr_trailing_data",
            CsrError::KeyAlgorithm(_) => "csr_key_algorithm",
            CsrError::RsaKeySize { .. } => "csr_key_size",
            CsrError::Curve(_) => "csr_key_curve",
            CsrError::WeakSignatureAlgorithm(_) => "csr_weak_signature_algorithm",
            CsrError::SignatureAlgorithm(_) => "csr_signature_algorithm",
            CsrError::BadSignature => "csr_signature_invalid",
            CsrError::MalformedExtension(_) => "csr_extension_malformed",
            CsrError::RsaExponent(_) => "csr_rsa_exponent",
            CsrError::DuplicateExtension(_) => "csr_extension_duplicate",
            CsrError::ProofOfPossession => "pop_signature_invalid",
        }
    }
}

/// A signer policy rule the request breaks (Kubernetes CSR profile).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyViolation {
    #[error("expected {expected} URI SAN(s), the CSR has {found}")]
    UriSanCount { expected: String, found: usize },
    #[error("URI SAN {0} is not a SPIFFE ID")]
    UriNotSpiffe(String),
    #[error("trust domain {0} is not allowed")]
    TrustDomain(String),
    #[error("DNS SANs are not allowed ({0})")]
    DnsSan(String),
    #[error("wildcard DNS SAN {0} is not allowed")]
    WildcardDnsSan(String),
    #[error("IP SANs are not allowed ({0})")]
    IpSan(String),
    #[error("email SANs are not allowed ({0})")]
    EmailSan(String),
    #[error("SAN {0} is of a type this signer never certifies")]
    OtherSan(String),
    #[error("the certificate would name nobody: empty subject and no SANs")]
    NoName,
    #[error("the subject must be empty, the CSR has {0}")]
    SubjectNotEmpty(String),
    #[error("usage {0:?} is not allowed for this signer")]
    UsageNotAllowed(String),
    #[error("usage {0:?} is not a Kubernetes key usage")]
    UnknownUsage(String),
    #[error("the CSR asks for a CA certificate; this signer never issues one")]
    CaRequested,
}

impl PolicyViolation {
    pub fn reason(&self) -> &'static str {
        match self {
            PolicyViolation::UriSanCount { .. } => "policy_uri_san_count",
            PolicyViolation::UriNotSpiffe(_) => "policy_uri_not_spiffe",
            PolicyViolation::TrustDomain(_) => "policy_trust_domain",
            PolicyViolation::DnsSan(_) => "policy_dns_san",
            PolicyViolation::WildcardDnsSan(_) => "policy_dns_san_wildcard",
            PolicyViolation::IpSan(_) => "policy_ip_san",
            PolicyViolation::EmailSan(_) => "policy_email_san",
            PolicyViolation::OtherSan(_) => "policy_other_san",
            PolicyViolation::NoName => "policy_no_name",
            PolicyViolation::SubjectNotEmpty(_) => "policy_subject_not_empty",
            PolicyViolation::UsageNotAllowed(_) => "policy_usage_not_allowed",
            PolicyViolation::UnknownUsage(_) => "policy_usage_unknown",
            PolicyViolation::CaRequested => "policy_ca_requested",
        }
    }
}

/// Any reason the CA did not issue a certificate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("CA is not ready: {0}")]
    CaNotReady(String),
    #[error("CA signing certificate expired at {0}")]
    CaExpired(String),
    #[error(transparent)]
    Csr(#[from] CsrError),
    #[error(transparent)]
    Policy(#[from] PolicyViolation),
    #[error("requested TTL {requested}s is greater than the max allowed TTL {max}s")]
    TtlTooLong { requested: i64, max: i64 },
    #[error("certificate generation failed: {0}")]
    CertGeneration(String),
    /// The CA key's module or token cannot sign now; retried requests may succeed.
    #[error("{0}")]
    CaKeyUnavailable(String),
    /// The module signed, but not with the CA certificate's key.
    #[error("the CA key's signature does not verify against the CA certificate")]
    CaKeyMismatch,
}

impl From<SignError> for Error {
    fn from(e: SignError) -> Self {
        match e {
            SignError::Crypto => Error::CertGeneration(e.to_string()),
            SignError::KeyUnavailable(_) => Error::CaKeyUnavailable(e.to_string()),
            SignError::SignatureMismatch => Error::CaKeyMismatch,
        }
    }
}

impl Error {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::CaNotReady(_) | Error::CaExpired(_) => ErrorKind::CaNotReady,
            Error::Csr(_) | Error::Policy(_) => ErrorKind::CsrError,
            Error::TtlTooLong { .. } => ErrorKind::TtlError,
            Error::CertGeneration(_) | Error::CaKeyUnavailable(_) | Error::CaKeyMismatch => {
                ErrorKind::CertGenError
            }
        }
    }

    pub fn grpc_code(&self) -> GrpcCode {
        self.kind().grpc_code()
    }

    pub fn reason(&self) -> &'static str {
        match self {
            Error::CaNotReady(_) => "ca_not_ready",
            Error::CaExpired(_) => "ca_expired",
            Error::Csr(e) => e.reason(),
            Error::Policy(p) => p.reason(),
            Error::TtlTooLong { .. } => "ttl_too_long",
            Error::CertGeneration(_) => "cert_generation",
            Error::CaKeyUnavailable(_) => "ca_key_unavailable",
            Error::CaKeyMismatch => "ca_key_mismatch",
        }
    }
}

/// A CA bundle that cannot be used, naming the file at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}: {problem}")]
pub struct BundleError {
    pub file: String,
    pub problem: String,
}

impl BundleError {
    pub fn new(file: impl Into<String>, problem: impl Into<String>) -> Self {
        BundleError {
            file: file.into(),
            problem: problem.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_map_to_istio_grpc_codes() {
        assert_eq!(
            Error::from(CsrError::BadSignature).grpc_code(),
            GrpcCode::InvalidArgument
        );
        assert_eq!(
            Error::TtlTooLong {
                requested: 2,
                max: 1
            }
            .grpc_code(),
            GrpcCode::InvalidArgument
        );
        assert_eq!(
            Error::CaNotReady("x".into()).grpc_code(),
            GrpcCode::Internal
        );
        assert_eq!(Error::CaExpired("x".into()).grpc_code(), GrpcCode::Internal);
        assert_eq!(
            Error::CertGeneration("x".into()).grpc_code(),
            GrpcCode::Internal
        );
        let unavailable = Error::from(SignError::KeyUnavailable("token removed".into()));
        assert_eq!(unavailable.grpc_code(), GrpcCode::Internal);
        assert_eq!(unavailable.reason(), "ca_key_unavailable");
        assert_eq!(
            Error::from(SignError::SignatureMismatch).reason(),
            "ca_key_mismatch"
        );
        assert_eq!(GrpcCode::InvalidArgument as i32, 3);
        assert_eq!(GrpcCode::Internal as i32, 13);
    }
}
