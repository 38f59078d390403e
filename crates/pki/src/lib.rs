//! meshca's PKI core: everything that decides what goes into a certificate.
//!
//! Data flow: PEM CSR -> [`csr::validate_csr`] (encoding, key policy, proof of
//! possession) -> a profile ([`profile::issue_workload`] for Istio workloads,
//! [`profile::issue_kubernetes`] for Kubernetes CSRs) -> DER certificate
//! signed by the [`bundle::CaBundle`] loaded and verified at start.
//! [`ca::LocalCa`] is the seed's `CertificateAuthority` signing calls over a bundle.
//!
//! No I/O, no async: callers pass bytes, the current time and file names in.
#![deny(rust_2018_idioms)]
#![forbid(unsafe_code)]

pub mod csr;
pub mod der;
pub mod error;
pub mod key;
pub mod pem;
pub mod pod_key;
pub mod san;

pub use error::{BundleError, CsrError, Error, ErrorKind, GrpcCode, PolicyViolation};
pub mod bundle;
pub mod ca;
pub mod cert;
pub mod chain;
pub mod profile;

pub use bundle::{BundleSources, CaBundle, Source};
pub use ca::{CertOptions, LocalCa};
pub use csr::{CsrKey, CsrPolicy, ValidatedCsr, validate_csr};
pub use key::{KeyType, SigningKey};
pub use profile::{KubernetesProfile, SanPolicy, SubjectRule, TrustDomains, WorkloadProfile};
pub use san::{SanEntry, SpiffeId};
