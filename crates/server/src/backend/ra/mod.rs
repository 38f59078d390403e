//! RA mode (`EXTERNAL_CA=ISTIOD_RA_KUBERNETES_API`): the server does not sign
//! workload certificates itself but forwards each request to the Kubernetes
//! CSR API, as istiod does, and answers with what the signer issued.
//!
//! Flow of one request: [`signer_name`] (K8S_SIGNER, or CERT_SIGNER_DOMAIN /
//! the `CertSigner` metadata if on the allow-list) -> [`check_request`]
//! (istiod's checks before submitting) -> [`new_csr`] (an istiod-shaped CSR)
//! -> create -> approve through `/approval` -> watch until [`progress`] is
//! final or the timeout ends (Denied and Failed end it at once, unlike
//! istiod) -> delete the CSR (always before answering; in the background if
//! the caller goes away; retried while the API does not answer) -> [`assemble_chain`] (verify against the signer's
//! roots ([`TrustAnchors::roots_for`]: its own, else the external-ca-cert
//! file), key and identity checks, roots last).
//! Approval, the answer and the deletion are bound to the created object's
//! UID (and request): a namesake (ours deleted, the name reused) is never
//! approved, deleted or answered from ([`RaError::Replaced`]).
//! Everything but [`KubernetesRa`] and [`TrustAnchors::read`] is a pure
//! function. The roots files are re-read by the server's reload loop
//! ([`KubernetesRa::reload_roots`]), so a signer's root rotation needs no
//! restart.
//!
//! Files: [`request`] (checks), [`csr`] (the CSR objects), [`waiters`] (the
//! shared watch), [`deletions`] (deleting them, also after an outage),
//! [`orphans`] (deleting ours that no request waits for),
//! [`chain`] (the answer), [`trust`] (the roots).

mod chain;
mod csr;
mod deletions;
mod error;
mod orphans;
mod request;
mod trust;
mod waiters;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use kube::api::{Api, PostParams};
use meshca_kube::{ApiLimit, status};
use meshca_pki::WorkloadProfile;
use rustls_pki_types::UnixTime;
use tokio::sync::watch;

pub use chain::assemble_chain;
pub use csr::{
    APPROVAL_REASON, MANAGED_BY, MIN_EXPIRATION_SECONDS, Progress, USAGES, approve, final_outcome,
    new_csr, progress,
};
use deletions::Deletions;
pub use error::RaError;
pub use request::{check_request, expiration_seconds, signer_name, validate_cert_signer};
pub use trust::{Roots, TrustAnchors};
use waiters::Waiters;

/// The `EXTERNAL_CA` value that selects this backend.
pub const EXTERNAL_CA_KUBERNETES: &str = "ISTIOD_RA_KUBERNETES_API";

/// How RA mode is configured.
#[derive(Debug, Clone)]
pub struct RaConfig {
    /// K8S_SIGNER: the signer of requests without `CertSigner` metadata.
    pub signer: Option<String>,
    /// CERT_SIGNER_DOMAIN: requests with `CertSigner` metadata go to `<domain>/<CertSigner>`.
    pub signer_domain: Option<String>,
    /// The `CertSigner` values a request may name (Istio's mesh config
    /// `certificateSigners`), each checked by [`validate_cert_signer`];
    /// empty: requests naming any `CertSigner` are refused.
    pub cert_signers: Vec<String>,
    /// The signer's roots, e.g. `./etc/external-ca-cert/root-cert.pem`; may
    /// be missing when every signer has its own in `signer_roots`.
    pub roots_file: PathBuf,
    /// Roots of particular signers (istiod's MeshConfig `caCertificates`
    /// with `certSigners`); other signers' chains are verified against `roots_file`.
    pub signer_roots: Vec<SignerRoots>,
    /// How long to wait for the signer.
    pub timeout: Duration,
    pub workload: WorkloadProfile,
    /// Tests only: called with the CSR's name after it is created and
    /// before it is approved (to swap the object meanwhile). Not a flag.
    #[doc(hidden)]
    pub after_create: Option<AfterCreateHook>,
}

/// A test hook of [`RaConfig::after_create`].
#[doc(hidden)]
#[derive(Clone)]
#[allow(clippy::type_complexity)]
pub struct AfterCreateHook(
    pub Arc<dyn Fn(String) -> futures::future::BoxFuture<'static, ()> + Send + Sync>,
);

impl std::fmt::Debug for AfterCreateHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AfterCreateHook")
    }
}

/// The roots file of one signer.
#[derive(Debug, Clone)]
pub struct SignerRoots {
    pub signer: String,
    pub file: PathBuf,
}

/// The Kubernetes side: create, approve, wait, delete.
pub struct KubernetesRa {
    api: Api<CertificateSigningRequest>,
    config: RaConfig,
    trust: watch::Sender<Arc<TrustAnchors>>,
    limit: ApiLimit,
    waiters: Arc<Waiters>,
    deletions: Arc<Deletions>,
}

impl KubernetesRa {
    /// Reads the roots and starts the shared CSR watch (needs a runtime).
    pub fn new(client: kube::Client, config: RaConfig, limit: ApiLimit) -> anyhow::Result<Self> {
        let grace = orphans::grace(config.timeout);
        Self::with_orphan_grace(client, config, limit, grace)
    }

    /// As [`KubernetesRa::new`], deleting orphans after `grace` (tests:
    /// the default outlasts the longest request, a minute or more).
    #[doc(hidden)]
    pub fn with_orphan_grace(
        client: kube::Client,
        config: RaConfig,
        limit: ApiLimit,
        grace: Duration,
    ) -> anyhow::Result<Self> {
        let trust = TrustAnchors::read(&config)?;
        let api = Api::all(client);
        let waiters = Arc::<Waiters>::default();
        let deletions = Arc::new(Deletions::new(api.clone(), limit.clone()));
        tokio::spawn(waiters::watch_csrs(
            api.clone(),
            waiters.clone(),
            deletions.clone(),
            grace,
        ));
        Ok(KubernetesRa {
            api,
            config,
            trust: watch::Sender::new(Arc::new(trust)),
            limit,
            waiters,
            deletions,
        })
    }

    pub fn trust(&self) -> Arc<TrustAnchors> {
        self.trust.borrow().clone()
    }

    /// Re-reads the roots files; `Ok(true)` when the roots changed (and are
    /// now in use). On error the current roots stay.
    pub fn reload_roots(&self) -> anyhow::Result<bool> {
        let next = TrustAnchors::read(&self.config)?;
        Ok(self.trust.send_if_modified(|current| {
            if **current == next {
                return false;
            }
            *current = Arc::new(next);
            true
        }))
    }

    /// Every configured root (default first), PEM.
    pub fn all_roots_pem(&self) -> String {
        self.trust().all_roots_pem()
    }

    /// Signs through the CSR API for an authenticated caller.
    pub async fn sign(
        &self,
        csr_pem: &[u8],
        identities: &[String],
        ttl_seconds: i64,
        for_ca: bool,
        cert_signer: Option<&str>,
    ) -> Result<Vec<String>, RaError> {
        let signer = signer_name(&self.config, cert_signer)?;
        let trust = self.trust();
        let roots = trust.roots_for(&signer)?;
        let csr = check_request(
            csr_pem,
            identities,
            ttl_seconds,
            for_ca,
            &self.config.workload,
        )?;
        let object = new_csr(
            csr_pem,
            &signer,
            expiration_seconds(ttl_seconds, &self.config.workload),
        );
        let created = self
            .limit
            .call(self.api.create(&PostParams::default(), &object))
            .await
            .map_err(api_error)?;
        let ours = Ours::of(&created)?;
        // Deleted before answering; if this future is dropped (the caller
        // went away), the guard deletes it in the background.
        let guard = DeleteOnDrop {
            deletions: self.deletions.clone(),
            name: ours.name.clone(),
            uid: ours.uid.clone(),
            armed: true,
        };
        let waited =
            tokio::time::timeout(self.config.timeout, self.approve_and_wait(created, &ours))
                .await
                .map_err(|_| RaError::Timeout {
                    signer: signer.clone(),
                    timeout: self.config.timeout,
                });
        guard.delete().await;
        let issued = waited??;
        tracing::debug!(csr = %ours.name, %signer, "CSR signed");
        assemble_chain(&issued, roots, &csr, identities, UnixTime::now())
    }

    /// Approves exactly the object we created (its UID is in every update,
    /// which the API server checks as a precondition) and waits for the
    /// signer's answer on that object. A namesake (same name, another UID or
    /// request: ours was deleted and the name reused) is never approved.
    async fn approve_and_wait(
        &self,
        created: CertificateSigningRequest,
        ours: &Ours,
    ) -> Result<Vec<u8>, RaError> {
        let name = &ours.name;
        let (_registered, answer) = self.waiters.register(name, &ours.uid);
        if let Some(hook) = &self.config.after_create {
            (hook.0)(name.clone()).await;
        }
        let mut object = created;
        let mut approved = None;
        for _ in 0..5 {
            ours.check(&object)?;
            approve(&mut object);
            // The UID binds the update to our object even if the
            // resourceVersion were dropped.
            object.metadata.uid = Some(ours.uid.clone());
            let pp = PostParams::default();
            let put = self.api.replace_subresource("approval", name, &pp, &object);
            match self.limit.call(put).await {
                Ok(o) => {
                    approved = Some(o);
                    break;
                }
                Err(e) if status::is_conflict(&e) => {
                    object = self
                        .limit
                        .call(self.api.get(name))
                        .await
                        .map_err(api_error)?;
                }
                Err(e) if status::is_not_found(&e) => return Err(RaError::Deleted),
                Err(e) => return Err(api_error(e)),
            }
        }
        let approved =
            approved.ok_or_else(|| RaError::Api(format!("approving {name} kept conflicting")))?;
        ours.check(&approved)?;
        if let Some(done) = final_outcome(&approved)? {
            return Ok(done);
        }
        answer
            .await
            .unwrap_or_else(|_| Err(RaError::Api("the CSR watch stopped".into())))
    }
}

/// The CSR object this request created: its name, UID and request.
struct Ours {
    name: String,
    uid: String,
    request: Vec<u8>,
}

impl Ours {
    fn of(created: &CertificateSigningRequest) -> Result<Self, RaError> {
        let name = created.metadata.name.clone();
        let uid = created.metadata.uid.clone();
        let (Some(name), Some(uid)) = (name, uid) else {
            return Err(RaError::Api("the created CSR has no name or UID".into()));
        };
        Ok(Ours {
            name,
            uid,
            request: created.spec.request.0.clone(),
        })
    }

    /// `Replaced` unless `seen` is our object with our request.
    fn check(&self, seen: &CertificateSigningRequest) -> Result<(), RaError> {
        if seen.metadata.uid.as_deref() == Some(self.uid.as_str())
            && seen.spec.request.0 == self.request
        {
            return Ok(());
        }
        tracing::warn!(
            csr = %self.name,
            ours = %self.uid,
            found = ?seen.metadata.uid,
            "RA mode: our CSR was replaced by another object of the same name; not approving it"
        );
        Err(RaError::Replaced(self.name.clone()))
    }
}

#[tonic::async_trait]
impl super::Backend for KubernetesRa {
    async fn sign(
        &self,
        request: &super::SignRequest<'_>,
    ) -> Result<Vec<String>, super::SignFailure> {
        Ok(KubernetesRa::sign(
            self,
            request.csr_pem,
            request.identities,
            request.ttl_seconds,
            false,
            request.cert_signer,
        )
        .await?)
    }
}

fn api_error(e: kube::Error) -> RaError {
    RaError::Api(e.to_string())
}

struct DeleteOnDrop {
    deletions: Arc<Deletions>,
    name: String,
    uid: String,
    armed: bool,
}

impl DeleteOnDrop {
    /// Deletes the CSR before the answer goes out. The deletion runs as
    /// its own task: were it part of the request, the request's timeout
    /// could cancel it halfway and leave the CSR (approved, maybe signed)
    /// behind, as an etcd freeze did (measured: 74 left) before.
    async fn delete(mut self) {
        self.armed = false;
        let deletions = self.deletions.clone();
        let (name, uid) = (
            std::mem::take(&mut self.name),
            std::mem::take(&mut self.uid),
        );
        let task = tokio::spawn(async move { deletions.delete(&name, &uid).await });
        // Dropping the handle (the request cancelled) leaves the task running.
        let _ = task.await;
    }
}

impl Drop for DeleteOnDrop {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let deletions = self.deletions.clone();
        let name = std::mem::take(&mut self.name);
        let uid = std::mem::take(&mut self.uid);
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!(csr = %name, "no runtime to delete the CSR");
            return;
        };
        runtime.spawn(async move { deletions.delete(&name, &uid).await });
    }
}

#[cfg(test)]
mod tests;
