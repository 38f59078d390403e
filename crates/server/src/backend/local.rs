//! Signing with the CA this process holds.

use meshca_ca_store::CurrentCa;
use meshca_pki::{CertOptions, CsrPolicy, LocalCa, WorkloadProfile};

use super::{Backend, SignFailure, SignRequest};

/// The local CA backend: the current CA of the store, Istio's workload profile.
pub struct LocalBackend {
    ca: CurrentCa,
    profile: WorkloadProfile,
}

impl LocalBackend {
    pub fn new(ca: CurrentCa, profile: WorkloadProfile) -> Self {
        LocalBackend { ca, profile }
    }

    /// The CA as it is now (a rotation swaps it between requests, never within one).
    pub fn current(&self) -> LocalCa {
        current_ca(&self.ca, &self.profile)
    }
}

/// The local CA over the current bundle (`CaNotReady` refusals without one).
pub fn current_ca(ca: &CurrentCa, profile: &WorkloadProfile) -> LocalCa {
    match ca.borrow().clone() {
        Some(bundle) => LocalCa::new(bundle, CsrPolicy::default(), profile.clone()),
        None => LocalCa::not_ready(CsrPolicy::default(), profile.clone()),
    }
}

#[tonic::async_trait]
impl Backend for LocalBackend {
    async fn sign(&self, request: &SignRequest<'_>) -> Result<Vec<String>, SignFailure> {
        let options = CertOptions {
            subject_ids: request.identities,
            ttl_seconds: request.ttl_seconds,
            for_ca: false,
        };
        let ca = self.current();
        let external = ca.bundle().is_some_and(|b| b.key().is_external());
        if !external {
            // Signing is CPU-bound and short (one signature); doing it inline
            // avoids a thread hop per request.
            return Ok(ca.sign_with_cert_chain(request.csr_pem, &options)?);
        }
        // A key in a module is a blocking call that may wait on a device:
        // keep it off the async workers.
        let csr = request.csr_pem.to_vec();
        let identities = request.identities.to_vec();
        let ttl_seconds = request.ttl_seconds;
        let signed = tokio::task::spawn_blocking(move || {
            let options = CertOptions {
                subject_ids: &identities,
                ttl_seconds,
                for_ca: false,
            };
            ca.sign_with_cert_chain(&csr, &options)
        })
        .await
        .map_err(|_| meshca_pki::Error::CertGeneration("the signing task failed".into()))?;
        Ok(signed?)
    }
}
