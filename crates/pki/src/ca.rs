//! The local CA: the seed's `CertificateAuthority.Sign`/`SignWithCertChain`
//! over a key-cert bundle, as plain synchronous functions. The server's
//! async backend (local or RA) wraps it.

use std::sync::Arc;

use time::OffsetDateTime;

use crate::bundle::CaBundle;
use crate::csr::{CsrPolicy, validate_csr};
use crate::error::Error;
use crate::pem;
use crate::profile::{WorkloadProfile, issue_workload};

/// Options of one signing request (Istio's `CertOpts`).
#[derive(Debug, Clone, Copy)]
pub struct CertOptions<'a> {
    /// Authenticated identities; they become the SANs. Never taken from the CSR.
    pub subject_ids: &'a [String],
    /// Requested lifetime in seconds; <= 0 means the default.
    pub ttl_seconds: i64,
    pub for_ca: bool,
}

/// A CA that signs with a key it holds.
pub struct LocalCa {
    bundle: Option<Arc<CaBundle>>,
    csr_policy: CsrPolicy,
    profile: WorkloadProfile,
}

impl LocalCa {
    pub fn new(bundle: Arc<CaBundle>, csr_policy: CsrPolicy, profile: WorkloadProfile) -> Self {
        LocalCa {
            bundle: Some(bundle),
            csr_policy,
            profile,
        }
    }

    /// A CA without material yet: every request fails with `CaNotReady`.
    pub fn not_ready(csr_policy: CsrPolicy, profile: WorkloadProfile) -> Self {
        LocalCa {
            bundle: None,
            csr_policy,
            profile,
        }
    }

    fn issue(
        &self,
        csr_pem: &[u8],
        options: &CertOptions<'_>,
    ) -> Result<(Arc<CaBundle>, String), Error> {
        let bundle = self
            .bundle
            .clone()
            .ok_or_else(|| Error::CaNotReady("no CA key and certificate loaded".into()))?;
        let csr = validate_csr(csr_pem, &self.csr_policy)?;
        let der = issue_workload(
            &self.profile,
            &bundle,
            &csr,
            options.subject_ids,
            options.ttl_seconds,
            options.for_ca,
            OffsetDateTime::now_utc(),
        )?;
        Ok((bundle, pem::encode("CERTIFICATE", &der)))
    }

    /// The leaf certificate, PEM.
    pub fn sign(&self, csr_pem: &[u8], options: &CertOptions<'_>) -> Result<String, Error> {
        self.issue(csr_pem, options).map(|(_, leaf)| leaf)
    }

    /// The leaf followed by the chain, in Istio's response layout: one
    /// certificate per element, all roots in the last element.
    pub fn sign_with_cert_chain(
        &self,
        csr_pem: &[u8],
        options: &CertOptions<'_>,
    ) -> Result<Vec<String>, Error> {
        let (bundle, leaf) = self.issue(csr_pem, options)?;
        let mut chain = Vec::with_capacity(4);
        chain.push(leaf);
        chain.extend(bundle.chain_after_leaf());
        Ok(chain)
    }

    /// The key-cert bundle in use, if the CA is ready.
    pub fn bundle(&self) -> Option<Arc<CaBundle>> {
        self.bundle.clone()
    }
}
