//! RA mode (`EXTERNAL_CA=ISTIOD_RA_KUBERNETES_API`): the server does not sign
//! workload certificates itself but forwards each request to the Kubernetes
//! CSR API, as istiod does, and answers with what the signer issued.
//!
//! Flow of one request: [`signer_name`] (K8S_SIGNER, or CERT_SIGNER_DOMAIN /
//! the `CertSigner` metadata) -> [`check_request`] (istiod's checks before
//! submitting) -> [`new_csr`] (an istiod-shaped CSR) -> create -> approve
//! through `/approval` -> watch until [`progress`] is final or the timeout
//! ends (Denied and Failed end it at once, unlike istiod) -> delete the CSR
//! (always before answering; in the background if the caller goes away) ->
//! [`assemble_chain`] (verify against the signer's roots
//! ([`TrustAnchors::roots_for`]: its own, else the external-ca-cert file),
//! key and identity checks, roots last).
//! Everything but [`KubernetesRa`] and [`TrustAnchors::read`] is a pure
//! function. The roots files are re-read by the server's reload loop
//! ([`KubernetesRa::reload_roots`]), so a signer's root rotation needs no
//! restart.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::certificates::v1::{
    CertificateSigningRequest, CertificateSigningRequestCondition, CertificateSigningRequestSpec,
    CertificateSigningRequestStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::{Api, DeleteParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::oneshot;

use crate::api_limit::ApiLimit;
use crate::last_error::LastError;
use meshca_pki::bundle::certificates;
use meshca_pki::{CsrPolicy, ErrorKind, SanEntry, Source, ValidatedCsr, WorkloadProfile};
use rustls_pki_types::UnixTime;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

/// The `EXTERNAL_CA` value that selects this backend.
pub const EXTERNAL_CA_KUBERNETES: &str = "ISTIOD_RA_KUBERNETES_API";
/// istiod's usages for workload CSRs.
pub const USAGES: [&str; 4] = [
    "digital signature",
    "key encipherment",
    "server auth",
    "client auth",
];
/// The API server refuses `expirationSeconds` below this.
pub const MIN_EXPIRATION_SECONDS: i64 = 600;
/// The condition reason of our approvals.
pub const APPROVAL_REASON: &str = "MeshcaRAApproved";

/// How RA mode is configured.
#[derive(Debug, Clone)]
pub struct RaConfig {
    /// K8S_SIGNER: the signer of requests without `CertSigner` metadata.
    pub signer: Option<String>,
    /// CERT_SIGNER_DOMAIN: requests with `CertSigner` metadata go to `<domain>/<CertSigner>`.
    pub signer_domain: Option<String>,
    /// The signer's roots, e.g. `./etc/external-ca-cert/root-cert.pem`; may
    /// be missing when every signer has its own in `signer_roots`.
    pub roots_file: PathBuf,
    /// Roots of particular signers (istiod's MeshConfig `caCertificates`
    /// with `certSigners`); other signers' chains are verified against `roots_file`.
    pub signer_roots: Vec<SignerRoots>,
    /// How long to wait for the signer.
    pub timeout: Duration,
    pub workload: WorkloadProfile,
}

/// The roots file of one signer.
#[derive(Debug, Clone)]
pub struct SignerRoots {
    pub signer: String,
    pub file: PathBuf,
}

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
    #[error("Kubernetes API: {0}")]
    Api(String),
    #[error("the signed chain is not acceptable: {0}")]
    Chain(String),
}

impl RaError {
    /// Istio's error kind, which decides the gRPC code: request problems are
    /// InvalidArgument, everything on the signer's side Internal.
    pub fn kind(&self) -> ErrorKind {
        match self {
            RaError::Request(e) => e.kind(),
            RaError::ForCa | RaError::SanNotCallers(_) | RaError::Template(_) => {
                ErrorKind::CsrError
            }
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
            RaError::NoSigner => "ra_no_signer",
            RaError::NoRoots(_) => "ra_no_roots",
            RaError::Denied { .. } => "ra_denied",
            RaError::Failed { .. } => "ra_failed",
            RaError::Timeout { .. } => "ra_timeout",
            RaError::Deleted => "ra_csr_deleted",
            RaError::Api(_) => "ra_kubernetes_api",
            RaError::Chain(_) => "ra_chain_invalid",
        }
    }
}

/// The signer of one request (istiod's rule).
pub fn signer_name(config: &RaConfig, cert_signer: Option<&str>) -> Result<String, RaError> {
    match cert_signer.filter(|s| !s.is_empty()) {
        Some(requested) => match config.signer_domain.as_deref().filter(|d| !d.is_empty()) {
            Some(domain) => Ok(format!("{domain}/{requested}")),
            None => Err(RaError::NoSignerDomain(requested.to_owned())),
        },
        None => config
            .signer
            .clone()
            .filter(|s| !s.is_empty())
            .ok_or(RaError::NoSigner),
    }
}

/// The OIDs of the extensions a CSR requests (dotted), in order.
fn requested_extension_oids(csr_pem: &[u8]) -> Vec<String> {
    let Some(block) = meshca_pki::pem::parse_all(csr_pem)
        .ok()
        .and_then(|b| b.into_iter().next())
    else {
        return Vec::new();
    };
    let Ok((_, csr)) =
        x509_parser::certification_request::X509CertificationRequest::from_der(&block.der)
    else {
        return Vec::new();
    };
    csr.certification_request_info
        .iter_attributes()
        .filter_map(|a| match a.parsed_attribute() {
            x509_parser::cri_attributes::ParsedCriAttribute::ExtensionRequest(r) => Some(r),
            _ => None,
        })
        .flat_map(|r| r.extensions.iter().map(|e| e.oid.to_id_string()))
        .collect()
}

/// subjectAltName.
const SAN_OID: &str = "2.5.29.17";

/// istiod's checks before a CSR is submitted: no CA requests, TTL within the
/// maximum, the CSR parses with a valid self-signature, its SANs are a subset
/// of the caller's identities (istiod's `ValidateCSR`, which also needs a SAN
/// extension) and it has Istio's template: one URI SAN, no DNS, IP or email
/// SANs, no extension but the SAN.
pub fn check_request(
    csr_pem: &[u8],
    identities: &[String],
    ttl_seconds: i64,
    for_ca: bool,
    profile: &WorkloadProfile,
) -> Result<ValidatedCsr, RaError> {
    if for_ca {
        return Err(RaError::ForCa);
    }
    let max = i64::try_from(profile.max_ttl.as_secs()).unwrap_or(i64::MAX);
    if ttl_seconds > max {
        return Err(meshca_pki::Error::TtlTooLong {
            requested: ttl_seconds,
            max,
        }
        .into());
    }
    let csr = meshca_pki::validate_csr(csr_pem, &CsrPolicy::default())
        .map_err(meshca_pki::Error::from)?;
    if csr.requests_ca {
        return Err(RaError::ForCa);
    }
    let mut uris = 0;
    for san in &csr.requested_sans {
        match san {
            SanEntry::Uri(uri) => {
                uris += 1;
                if !identities.iter().any(|id| id == uri) {
                    return Err(RaError::SanNotCallers(uri.clone()));
                }
            }
            other => {
                return Err(RaError::Template(format!(
                    "only a URI SAN is allowed, the CSR has {other}"
                )));
            }
        }
    }
    if uris != 1 {
        return Err(RaError::Template(format!(
            "exactly one URI SAN (the caller's identity) is needed, the CSR has {uris}"
        )));
    }
    if let Some(other) = requested_extension_oids(csr_pem)
        .into_iter()
        .find(|oid| oid != SAN_OID)
    {
        return Err(RaError::Template(format!(
            "extension {other} is not in Istio's CSR template (only subjectAltName)"
        )));
    }
    Ok(csr)
}

/// `spec.expirationSeconds`: the requested TTL (or the default), raised to
/// the API server's minimum.
pub fn expiration_seconds(ttl_seconds: i64, profile: &WorkloadProfile) -> i32 {
    let ttl = if ttl_seconds <= 0 {
        i64::try_from(profile.default_ttl.as_secs()).unwrap_or(i64::MAX)
    } else {
        ttl_seconds
    };
    i32::try_from(ttl.max(MIN_EXPIRATION_SECONDS)).unwrap_or(i32::MAX)
}

/// The CSR istiod would create.
/// The label on our CSRs, which the one shared watch selects.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "meshca-server");

pub fn new_csr(csr_pem: &[u8], signer: &str, expiration_seconds: i32) -> CertificateSigningRequest {
    CertificateSigningRequest {
        metadata: ObjectMeta {
            generate_name: Some("csr-workload-".into()),
            labels: Some(BTreeMap::from([(
                MANAGED_BY.0.to_string(),
                MANAGED_BY.1.to_string(),
            )])),
            ..Default::default()
        },
        spec: CertificateSigningRequestSpec {
            request: ByteString(csr_pem.to_vec()),
            signer_name: signer.to_owned(),
            usages: Some(USAGES.iter().map(|u| u.to_string()).collect()),
            expiration_seconds: Some(expiration_seconds),
            ..Default::default()
        },
        status: None,
    }
}

/// Adds condition Approved/True (the `/approval` subresource's body).
pub fn approve(csr: &mut CertificateSigningRequest) {
    let conditions = csr
        .status
        .get_or_insert_with(CertificateSigningRequestStatus::default)
        .conditions
        .get_or_insert_with(Vec::new);
    if conditions.iter().any(|c| c.type_ == "Approved") {
        return;
    }
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    conditions.push(CertificateSigningRequestCondition {
        type_: "Approved".into(),
        status: "True".into(),
        reason: Some(APPROVAL_REASON.into()),
        message: Some("approved by meshca server (RA mode) for an authenticated workload".into()),
        last_update_time: Some(now.clone()),
        last_transition_time: Some(now),
    });
}

/// Where a submitted CSR stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    Pending,
    Issued(Vec<u8>),
    Denied { reason: String, message: String },
    Failed { reason: String, message: String },
}

/// Reads the outcome from a CSR: a final condition wins over a certificate
/// (a certificate next to `Failed` is not trusted).
pub fn progress(csr: &CertificateSigningRequest) -> Progress {
    let Some(status) = &csr.status else {
        return Progress::Pending;
    };
    for c in status.conditions.iter().flatten() {
        if c.status != "True" {
            continue;
        }
        let reason = c.reason.clone().unwrap_or_default();
        let message = c.message.clone().unwrap_or_default();
        match c.type_.as_str() {
            "Denied" => return Progress::Denied { reason, message },
            "Failed" => return Progress::Failed { reason, message },
            _ => {}
        }
    }
    match &status.certificate {
        Some(c) if !c.0.is_empty() => Progress::Issued(c.0.clone()),
        _ => Progress::Pending,
    }
}

/// The signer's roots, parsed once.
#[derive(Debug, Clone, PartialEq)]
pub struct Roots {
    der: Vec<Vec<u8>>,
    pem: String,
}

impl Roots {
    pub fn parse(name: &str, pem_bytes: &[u8]) -> Result<Roots, RaError> {
        let der = certificates(Source {
            name,
            bytes: pem_bytes,
        })
        .map_err(|e| RaError::Chain(e.to_string()))?;
        if der.is_empty() {
            return Err(RaError::Chain(format!("{name}: contains no certificate")));
        }
        let pem = der
            .iter()
            .map(|d| meshca_pki::pem::encode("CERTIFICATE", d))
            .collect();
        Ok(Roots { der, pem })
    }

    pub fn pem(&self) -> &str {
        &self.pem
    }
}

/// What RA answers are verified against: the default roots and each
/// signer's own.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TrustAnchors {
    pub default: Option<Roots>,
    pub per_signer: BTreeMap<String, Roots>,
}

impl TrustAnchors {
    /// Reads the configured files. The default file may be missing only
    /// when signers have their own roots.
    pub fn read(config: &RaConfig) -> anyhow::Result<TrustAnchors> {
        use anyhow::Context;
        let parse = |file: &std::path::Path, what: &str| -> anyhow::Result<Roots> {
            let pem = std::fs::read(file)
                .with_context(|| format!("RA mode: reading {what} {}", file.display()))?;
            Ok(Roots::parse(&file.display().to_string(), &pem)?)
        };
        let per_signer = config
            .signer_roots
            .iter()
            .map(|r| {
                let roots = parse(&r.file, &format!("the roots of {}", r.signer))?;
                Ok((r.signer.clone(), roots))
            })
            .collect::<anyhow::Result<_>>()?;
        let file = &config.roots_file;
        let default = if !config.signer_roots.is_empty() && !file.exists() {
            None
        } else {
            Some(parse(file, "the signer's roots")?)
        };
        Ok(TrustAnchors {
            default,
            per_signer,
        })
    }

    /// The roots a signer's chains must verify to: its own, else the default.
    pub fn roots_for(&self, signer: &str) -> Result<&Roots, RaError> {
        self.per_signer
            .get(signer)
            .or(self.default.as_ref())
            .ok_or_else(|| RaError::NoRoots(signer.to_owned()))
    }

    /// Every root (default first, then by signer name), PEM.
    pub fn all_roots_pem(&self) -> String {
        self.default
            .iter()
            .chain(self.per_signer.values())
            .map(|r| r.pem.as_str())
            .collect()
    }
}

/// Checks what the signer returned and builds Istio's response: the chain
/// verifies to `roots` (as a client certificate), the leaf carries the CSR's
/// key and exactly one URI SAN, which is one of the caller's identities.
/// Layout: leaf, each intermediate, all roots in the last element.
pub fn assemble_chain(
    issued_pem: &[u8],
    roots: &Roots,
    csr: &ValidatedCsr,
    identities: &[String],
    now: UnixTime,
) -> Result<Vec<String>, RaError> {
    let chain = certificates(Source {
        name: "status.certificate",
        bytes: issued_pem,
    })
    .map_err(|e| RaError::Chain(e.to_string()))?;
    let (leaf, rest) = chain
        .split_first()
        .ok_or_else(|| RaError::Chain("status.certificate holds no certificate".into()))?;
    meshca_pki::chain::verify_chain(leaf, rest, &roots.der, now)
        .map_err(|e| RaError::Chain(format!("does not verify to the configured roots: {e}")))?;

    let (_, parsed) = x509_parser::certificate::X509Certificate::from_der(leaf)
        .map_err(|e| RaError::Chain(format!("leaf: {e}")))?;
    if parsed.public_key().subject_public_key.data.as_ref() != csr.public_key_bits.as_slice() {
        return Err(RaError::Chain(
            "the leaf's public key is not the CSR's".into(),
        ));
    }
    let uris: Vec<&str> = parsed
        .subject_alternative_name()
        .map_err(|e| RaError::Chain(format!("leaf SAN: {e}")))?
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some(*u),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    match uris.as_slice() {
        [uri] if identities.iter().any(|id| id == uri) => {}
        _ => {
            return Err(RaError::Chain(format!(
                "the leaf's URI SANs {uris:?} are not exactly the caller's identity {identities:?}"
            )));
        }
    }

    let mut out = Vec::with_capacity(chain.len() + 1);
    out.push(meshca_pki::pem::encode("CERTIFICATE", leaf));
    out.extend(
        rest.iter()
            .filter(|c| !roots.der.contains(c))
            .map(|c| meshca_pki::pem::encode("CERTIFICATE", c)),
    );
    out.push(roots.pem.clone());
    Ok(out)
}

type Outcome = Result<Vec<u8>, RaError>;

/// Requests waiting for the signer, by CSR name. One watch on all of this
/// server's CSRs (by label) feeds them, instead of a watch (and so, kube-rs
/// speaking HTTP/1.1, a connection) per request.
#[derive(Default)]
struct Waiters(std::sync::Mutex<HashMap<String, oneshot::Sender<Outcome>>>);

impl Waiters {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, oneshot::Sender<Outcome>>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for `name`'s final state; registered before the approval, so
    /// no answer of the signer can come before it.
    fn register(self: &Arc<Self>, name: &str) -> (Registered, oneshot::Receiver<Outcome>) {
        let (tx, rx) = oneshot::channel();
        self.lock().insert(name.to_owned(), tx);
        let registered = Registered {
            waiters: self.clone(),
            name: name.to_owned(),
        };
        (registered, rx)
    }

    fn seen(&self, csr: &CertificateSigningRequest) {
        let name = csr.metadata.name.as_deref().unwrap_or_default();
        let mut waiters = self.lock();
        if !waiters.contains_key(name) {
            return;
        }
        let outcome = match final_outcome(csr) {
            Ok(None) => return,
            Ok(Some(chain)) => Ok(chain),
            Err(e) => Err(e),
        };
        if let Some(tx) = waiters.remove(name) {
            let _ = tx.send(outcome);
        }
    }

    fn deleted(&self, csr: &CertificateSigningRequest) {
        let name = csr.metadata.name.as_deref().unwrap_or_default();
        if let Some(tx) = self.lock().remove(name) {
            let _ = tx.send(Err(RaError::Deleted));
        }
    }
}

/// Unregisters when the request ends, answered or not (timeout, caller gone).
struct Registered {
    waiters: Arc<Waiters>,
    name: String,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.waiters.lock().remove(&self.name);
    }
}

/// The shared watch; restarts (re-listing) after errors, so an answer
/// missed while disconnected arrives with the next list.
async fn watch_csrs(api: Api<CertificateSigningRequest>, waiters: Arc<Waiters>) {
    let selector = format!("{}={}", MANAGED_BY.0, MANAGED_BY.1);
    let mut events = watcher(api, watcher::Config::default().labels(&selector))
        .default_backoff()
        .boxed();
    let mut last_error = LastError::default();
    while let Some(event) = events.next().await {
        match event {
            Ok(watcher::Event::Apply(csr) | watcher::Event::InitApply(csr)) => waiters.seen(&csr),
            Ok(watcher::Event::Delete(csr)) => waiters.deleted(&csr),
            Ok(watcher::Event::Init | watcher::Event::InitDone) => last_error.clear(),
            Err(e) => {
                if last_error.is_new(&e) {
                    tracing::warn!(error = %e, "RA mode: watching our CSRs failed; retrying");
                }
            }
        }
    }
}

/// The Kubernetes side: create, approve, wait, delete.
pub struct KubernetesRa {
    api: Api<CertificateSigningRequest>,
    config: RaConfig,
    trust: RwLock<Arc<TrustAnchors>>,
    limit: ApiLimit,
    waiters: Arc<Waiters>,
}

impl KubernetesRa {
    /// Reads the roots and starts the shared CSR watch (needs a runtime).
    pub fn new(client: kube::Client, config: RaConfig, limit: ApiLimit) -> anyhow::Result<Self> {
        let trust = TrustAnchors::read(&config)?;
        let api = Api::all(client);
        let waiters = Arc::<Waiters>::default();
        tokio::spawn(watch_csrs(api.clone(), waiters.clone()));
        Ok(KubernetesRa {
            api,
            config,
            trust: RwLock::new(Arc::new(trust)),
            limit,
            waiters,
        })
    }

    pub fn trust(&self) -> Arc<TrustAnchors> {
        self.trust.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Re-reads the roots files; `Ok(true)` when the roots changed (and are
    /// now in use). On error the current roots stay.
    pub fn reload_roots(&self) -> anyhow::Result<bool> {
        let next = TrustAnchors::read(&self.config)?;
        let mut current = self.trust.write().unwrap_or_else(|p| p.into_inner());
        if **current == next {
            return Ok(false);
        }
        *current = Arc::new(next);
        Ok(true)
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
        let name = created
            .metadata
            .name
            .clone()
            .ok_or_else(|| RaError::Api("created CSR has no name".into()))?;
        // Deleted before answering; if this future is dropped (the caller
        // went away), the guard deletes it in the background.
        let guard = DeleteOnDrop {
            api: self.api.clone(),
            limit: self.limit.clone(),
            name: name.clone(),
            armed: true,
        };
        let waited = tokio::time::timeout(self.config.timeout, self.approve_and_wait(created))
            .await
            .map_err(|_| RaError::Timeout {
                signer: signer.clone(),
                timeout: self.config.timeout,
            });
        guard.delete().await;
        let issued = waited??;
        tracing::debug!(csr = %name, %signer, "CSR signed");
        assemble_chain(&issued, roots, &csr, identities, UnixTime::now())
    }

    async fn approve_and_wait(
        &self,
        created: CertificateSigningRequest,
    ) -> Result<Vec<u8>, RaError> {
        let name = created.metadata.name.clone().unwrap_or_default();
        let (_registered, answer) = self.waiters.register(&name);
        let mut object = created;
        let mut approved = None;
        for _ in 0..5 {
            approve(&mut object);
            let pp = PostParams::default();
            let put = self
                .api
                .replace_subresource("approval", &name, &pp, &object);
            match self.limit.call(put).await {
                Ok(o) => {
                    approved = Some(o);
                    break;
                }
                Err(kube::Error::Api(s)) if s.code == 409 => {
                    object = self
                        .limit
                        .call(self.api.get(&name))
                        .await
                        .map_err(api_error)?;
                }
                Err(e) => return Err(api_error(e)),
            }
        }
        let approved =
            approved.ok_or_else(|| RaError::Api(format!("approving {name} kept conflicting")))?;
        if let Some(done) = final_outcome(&approved)? {
            return Ok(done);
        }
        answer
            .await
            .unwrap_or_else(|_| Err(RaError::Api("the CSR watch stopped".into())))
    }
}

fn final_outcome(csr: &CertificateSigningRequest) -> Result<Option<Vec<u8>>, RaError> {
    match progress(csr) {
        Progress::Pending => Ok(None),
        Progress::Issued(c) => Ok(Some(c)),
        Progress::Denied { reason, message } => Err(RaError::Denied { reason, message }),
        Progress::Failed { reason, message } => Err(RaError::Failed { reason, message }),
    }
}

fn api_error(e: kube::Error) -> RaError {
    RaError::Api(e.to_string())
}

struct DeleteOnDrop {
    api: Api<CertificateSigningRequest>,
    limit: ApiLimit,
    name: String,
    armed: bool,
}

impl DeleteOnDrop {
    async fn delete(mut self) {
        self.armed = false;
        delete_csr(&self.api, &self.limit, &self.name).await;
    }
}

async fn delete_csr(api: &Api<CertificateSigningRequest>, limit: &ApiLimit, name: &str) {
    match limit.call(api.delete(name, &DeleteParams::default())).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 404 => {}
        Err(e) => tracing::warn!(csr = %name, error = %e, "deleting the CSR failed"),
    }
}

impl Drop for DeleteOnDrop {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let (api, limit) = (self.api.clone(), self.limit.clone());
        let name = std::mem::take(&mut self.name);
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!(csr = %name, "no runtime to delete the CSR");
            return;
        };
        runtime.spawn(async move { delete_csr(&api, &limit, &name).await });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshca_pki::profile::{CaCertRequest, intermediate_ca, issue_workload, self_signed_root};
    use meshca_pki::{CaBundle, GrpcCode, KeyType, SigningKey, cert, pem};
    use time::OffsetDateTime;

    const ID: &str = "spiffe://cluster.local/ns/app/sa/web";

    fn config(signer: Option<&str>, domain: Option<&str>) -> RaConfig {
        RaConfig {
            signer: signer.map(Into::into),
            signer_domain: domain.map(Into::into),
            roots_file: "roots.pem".into(),
            signer_roots: Vec::new(),
            timeout: Duration::from_secs(60),
            workload: WorkloadProfile::default(),
        }
    }

    fn csr_with(sans: &[SanEntry]) -> (SigningKey, String) {
        let key = SigningKey::generate(KeyType::EcdsaP256).unwrap();
        let pem = meshca_pki::csr::build_csr(&key, cert::EMPTY_NAME, sans).unwrap();
        (key, pem)
    }

    fn ids() -> Vec<String> {
        vec![ID.to_string()]
    }

    /// root -> intermediate, as a signer holds them.
    struct Pki {
        root_der: Vec<u8>,
        intermediate: CaBundle,
    }

    fn pki() -> Pki {
        let now = OffsetDateTime::now_utc();
        let root_key = SigningKey::generate(KeyType::EcdsaP256).unwrap();
        let root_der = self_signed_root(
            &CaCertRequest {
                subject_der: &cert::organization_name("ra test root"),
                key: &root_key,
                ttl: Duration::from_secs(86400),
            },
            now,
        )
        .unwrap();
        let root = CaBundle::from_parts(
            root_key,
            root_der.clone(),
            vec![],
            vec![root_der.clone()],
            now,
        )
        .unwrap();
        let key = SigningKey::generate(KeyType::EcdsaP256).unwrap();
        let inter_der = intermediate_ca(
            &CaCertRequest {
                subject_der: &cert::organization_name("ra test intermediate"),
                key: &key,
                ttl: Duration::from_secs(86400),
            },
            &root,
            now,
        )
        .unwrap();
        let intermediate =
            CaBundle::from_parts(key, inter_der, vec![], vec![root_der.clone()], now).unwrap();
        Pki {
            root_der,
            intermediate,
        }
    }

    impl Pki {
        fn roots(&self) -> Roots {
            Roots::parse(
                "root.pem",
                pem::encode("CERTIFICATE", &self.root_der).as_bytes(),
            )
            .unwrap()
        }

        /// What a signer writes into status.certificate: leaf + intermediate (+ root).
        fn issue(&self, csr_pem: &str, identities: &[String], with_root: bool) -> Vec<u8> {
            let csr = meshca_pki::validate_csr(csr_pem.as_bytes(), &CsrPolicy::default()).unwrap();
            let leaf = issue_workload(
                &WorkloadProfile::default(),
                &self.intermediate,
                &csr,
                identities,
                3600,
                false,
                OffsetDateTime::now_utc(),
            )
            .unwrap();
            let mut out = pem::encode("CERTIFICATE", &leaf);
            out.push_str(self.intermediate.signing_cert_pem());
            if with_root {
                out.push_str(&pem::encode("CERTIFICATE", &self.root_der));
            }
            out.into_bytes()
        }
    }

    #[test]
    fn the_signer_is_k8s_signer_or_the_domain_with_the_cert_signer_metadata() {
        let c = config(Some("example.com/foo"), Some("example.com"));
        assert_eq!(signer_name(&c, None).unwrap(), "example.com/foo");
        assert_eq!(signer_name(&c, Some("")).unwrap(), "example.com/foo");
        assert_eq!(signer_name(&c, Some("bar")).unwrap(), "example.com/bar");
        let no_domain = config(Some("example.com/foo"), None);
        let e = signer_name(&no_domain, Some("bar")).unwrap_err();
        assert_eq!(e, RaError::NoSignerDomain("bar".into()));
        assert_eq!(e.kind().grpc_code(), GrpcCode::Internal);
        assert_eq!(
            signer_name(&config(None, None), None).unwrap_err(),
            RaError::NoSigner
        );
    }

    #[test]
    fn a_signer_with_its_own_roots_uses_them_and_others_the_default() {
        let (a, b) = (pki().roots(), pki().roots());
        let per_signer = BTreeMap::from([("example.com/bar".to_string(), b.clone())]);
        let pick = |default: Option<&Roots>, signer| {
            let trust = TrustAnchors {
                default: default.cloned(),
                per_signer: per_signer.clone(),
            };
            trust.roots_for(signer).map(|r| r.pem.clone())
        };
        assert_eq!(pick(Some(&a), "example.com/bar").unwrap(), b.pem);
        assert_eq!(pick(Some(&a), "example.com/foo").unwrap(), a.pem);
        assert_eq!(pick(None, "example.com/bar").unwrap(), b.pem);
        assert_eq!(
            pick(None, "example.com/foo").unwrap_err(),
            RaError::NoRoots("example.com/foo".into())
        );
        let both = TrustAnchors {
            default: Some(a.clone()),
            per_signer,
        };
        assert_eq!(both.all_roots_pem(), format!("{}{}", a.pem, b.pem));
    }

    #[test]
    fn istios_template_with_the_callers_identity_passes() {
        let (key, pem) = csr_with(&[SanEntry::Uri(ID.into())]);
        let csr = check_request(
            pem.as_bytes(),
            &ids(),
            3600,
            false,
            &WorkloadProfile::default(),
        )
        .unwrap();
        assert_eq!(csr.public_key_bits, key.public_key_bits());
    }

    /// A CSR with the caller's URI SAN and one more requested extension.
    fn csr_with_extra_extension(oid: &[u64], value: &[u8]) -> String {
        use meshca_pki::der;
        let key = SigningKey::generate(KeyType::EcdsaP256).unwrap();
        let san = meshca_pki::san::san_extension_value(&[SanEntry::Uri(ID.into())]).unwrap();
        let san_ext = der::sequence(&[&der::oid(&[2, 5, 29, 17]), &der::octet_string(&san)]);
        let extra = der::sequence(&[&der::oid(oid), &der::octet_string(value)]);
        let attributes = der::sequence(&[
            &der::oid(&[1, 2, 840, 113549, 1, 9, 14]),
            &der::tlv(der::SET, &[&der::sequence(&[&san_ext, &extra])]),
        ]);
        let info = der::sequence(&[
            &der::small_integer(0),
            cert::EMPTY_NAME,
            &key.spki_der(),
            &der::tlv(der::context(0, true), &[&attributes]),
        ]);
        let signature = key.sign(&info).unwrap();
        let csr = der::sequence(&[
            &info,
            &key.signature_algorithm_der(),
            &der::bit_string(&signature),
        ]);
        pem::encode("CERTIFICATE REQUEST", &csr)
    }

    #[test]
    fn requests_istiod_refuses_are_refused_before_anything_is_submitted() {
        let p = WorkloadProfile::default();
        let (_, ok) = csr_with(&[SanEntry::Uri(ID.into())]);
        let refused = |pem: &str, ids: &[String], ttl: i64, for_ca: bool| {
            check_request(pem.as_bytes(), ids, ttl, for_ca, &p).unwrap_err()
        };
        assert_eq!(refused(&ok, &ids(), 0, true), RaError::ForCa);

        let other = "spiffe://cluster.local/ns/app/sa/admin";
        let (_, foreign) = csr_with(&[SanEntry::Uri(other.into())]);
        assert_eq!(
            refused(&foreign, &ids(), 0, false),
            RaError::SanNotCallers(other.into())
        );

        let (_, dns) = csr_with(&[
            SanEntry::Uri(ID.into()),
            SanEntry::Dns("web.app.svc".into()),
        ]);
        assert!(matches!(
            refused(&dns, &ids(), 0, false),
            RaError::Template(_)
        ));
        let (_, ip) = csr_with(&[SanEntry::Ip("10.0.0.1".parse().unwrap())]);
        assert!(matches!(
            refused(&ip, &ids(), 0, false),
            RaError::Template(_)
        ));
        let (_, email) = csr_with(&[SanEntry::Email("a@b.c".into())]);
        assert!(matches!(
            refused(&email, &ids(), 0, false),
            RaError::Template(_)
        ));

        // istiod's ValidateCSR needs a SAN extension.
        let (_, bare) = csr_with(&[]);
        assert!(matches!(
            refused(&bare, &ids(), 0, false),
            RaError::Template(_)
        ));
        // Only the SAN extension: here keyUsage (digitalSignature) next to it.
        let extra = csr_with_extra_extension(&[2, 5, 29, 15], &[0x03, 0x02, 0x07, 0x80]);
        meshca_pki::validate_csr(extra.as_bytes(), &CsrPolicy::default()).unwrap();
        let e = refused(&extra, &ids(), 0, false);
        assert!(e.to_string().contains("2.5.29.15"), "{e}");

        let both = vec![ID.to_string(), other.to_string()];
        let (_, two) = csr_with(&[SanEntry::Uri(ID.into()), SanEntry::Uri(other.into())]);
        assert!(matches!(
            refused(&two, &both, 0, false),
            RaError::Template(_)
        ));

        let max = p.max_ttl.as_secs() as i64;
        let e = refused(&ok, &ids(), max + 1, false);
        assert_eq!(e.kind(), ErrorKind::TtlError);
        assert_eq!(e.reason(), "ttl_too_long");

        let e = refused("not a csr", &ids(), 0, false);
        assert_eq!(e.kind(), ErrorKind::CsrError);
        // The signature's last bit flipped: the DER stays well formed, the
        // self-signature breaks.
        let mut der = pem::parse_all(ok.as_bytes())
            .unwrap()
            .remove(0)
            .der
            .to_vec();
        *der.last_mut().unwrap() ^= 1;
        let tampered = pem::encode("CERTIFICATE REQUEST", &der);
        let e = refused(&tampered, &ids(), 0, false);
        assert_eq!(e.kind().grpc_code(), GrpcCode::InvalidArgument);
        assert_eq!(e.reason(), "csr_signature_invalid");

        for e in [
            RaError::ForCa,
            RaError::SanNotCallers(String::new()),
            RaError::Template(String::new()),
        ] {
            assert_eq!(e.kind().grpc_code(), GrpcCode::InvalidArgument, "{e}");
        }
    }

    #[test]
    fn expiration_is_the_requested_ttl_or_the_default_but_at_least_600_seconds() {
        let p = WorkloadProfile::default();
        assert_eq!(expiration_seconds(0, &p), 86400);
        assert_eq!(expiration_seconds(-5, &p), 86400);
        assert_eq!(expiration_seconds(60, &p), 600);
        assert_eq!(expiration_seconds(3600, &p), 3600);
    }

    #[test]
    fn the_kubernetes_csr_is_shaped_like_istiods() {
        let csr = new_csr(b"PEM", "example.com/foo", 3600);
        assert_eq!(csr.metadata.generate_name.as_deref(), Some("csr-workload-"));
        assert_eq!(csr.metadata.name, None);
        assert_eq!(csr.spec.request.0, b"PEM");
        assert_eq!(csr.spec.signer_name, "example.com/foo");
        assert_eq!(csr.spec.expiration_seconds, Some(3600));
        assert_eq!(
            csr.spec.usages.as_deref().unwrap(),
            [
                "digital signature",
                "key encipherment",
                "server auth",
                "client auth"
            ]
        );
        let json = serde_json::to_value(&csr).unwrap();
        assert_eq!(json["apiVersion"], "certificates.k8s.io/v1");
    }

    #[test]
    fn approval_adds_one_approved_condition() {
        let mut csr = new_csr(b"PEM", "example.com/foo", 3600);
        approve(&mut csr);
        approve(&mut csr);
        let conditions = csr.status.unwrap().conditions.unwrap();
        assert_eq!(conditions.len(), 1);
        assert_eq!(conditions[0].type_, "Approved");
        assert_eq!(conditions[0].status, "True");
        assert_eq!(conditions[0].reason.as_deref(), Some(APPROVAL_REASON));
    }

    #[test]
    fn denied_and_failed_are_final_and_beat_a_certificate() {
        let mut csr = new_csr(b"PEM", "example.com/foo", 3600);
        assert_eq!(progress(&csr), Progress::Pending);
        approve(&mut csr);
        assert_eq!(progress(&csr), Progress::Pending);
        csr.status.as_mut().unwrap().certificate = Some(ByteString(b"CERT".to_vec()));
        assert_eq!(progress(&csr), Progress::Issued(b"CERT".to_vec()));
        for type_ in ["Denied", "Failed"] {
            let mut c = csr.clone();
            c.status
                .as_mut()
                .unwrap()
                .conditions
                .as_mut()
                .unwrap()
                .push(CertificateSigningRequestCondition {
                    type_: type_.into(),
                    status: "True".into(),
                    reason: Some("SignerValidationFailure".into()),
                    message: Some("policy_trust_domain: nope".into()),
                    ..Default::default()
                });
            let (reason, message) = (
                "SignerValidationFailure".into(),
                "policy_trust_domain: nope".into(),
            );
            let expected = if type_ == "Denied" {
                Progress::Denied { reason, message }
            } else {
                Progress::Failed { reason, message }
            };
            assert_eq!(progress(&c), expected);
            let e = final_outcome(&c).unwrap_err();
            assert!(e.to_string().contains("policy_trust_domain: nope"), "{e}");
            assert_eq!(e.kind().grpc_code(), GrpcCode::Internal);
        }
    }

    #[test]
    fn a_verified_chain_gets_the_roots_as_its_last_element_once() {
        let pki = pki();
        let (_, pem_csr) = csr_with(&[SanEntry::Uri(ID.into())]);
        let csr = meshca_pki::validate_csr(pem_csr.as_bytes(), &CsrPolicy::default()).unwrap();
        let roots = pki.roots();
        for with_root in [false, true] {
            let issued = pki.issue(&pem_csr, &ids(), with_root);
            let chain = assemble_chain(&issued, &roots, &csr, &ids(), UnixTime::now()).unwrap();
            assert_eq!(chain.len(), 3, "{with_root}");
            assert_eq!(chain[1], pki.intermediate.signing_cert_pem());
            assert_eq!(chain[2], roots.pem());
        }
    }

    #[test]
    fn chains_that_do_not_verify_or_name_someone_else_are_refused() {
        let other_signer = pki();
        let pki = pki();
        let (_, pem_csr) = csr_with(&[SanEntry::Uri(ID.into())]);
        let csr = meshca_pki::validate_csr(pem_csr.as_bytes(), &CsrPolicy::default()).unwrap();
        let now = UnixTime::now();
        let is_chain_error = |r: Result<Vec<String>, RaError>| {
            assert!(matches!(r, Err(RaError::Chain(_))), "{r:?}");
        };
        // Another signer's root.
        let issued = pki.issue(&pem_csr, &ids(), false);
        is_chain_error(assemble_chain(
            &issued,
            &other_signer.roots(),
            &csr,
            &ids(),
            now,
        ));
        // The intermediate missing.
        let leaf_only = meshca_pki::pem::parse_all(&issued).unwrap()[0].der.clone();
        let leaf_only = pem::encode("CERTIFICATE", &leaf_only);
        is_chain_error(assemble_chain(
            leaf_only.as_bytes(),
            &pki.roots(),
            &csr,
            &ids(),
            now,
        ));
        // A certificate for another key.
        let (_, other_csr) = csr_with(&[SanEntry::Uri(ID.into())]);
        let swapped = pki.issue(&other_csr, &ids(), false);
        is_chain_error(assemble_chain(&swapped, &pki.roots(), &csr, &ids(), now));
        // Another identity, or two.
        let other = vec!["spiffe://cluster.local/ns/app/sa/admin".to_string()];
        let foreign = pki.issue(&pem_csr, &other, false);
        is_chain_error(assemble_chain(&foreign, &pki.roots(), &csr, &ids(), now));
        let two = vec![ID.to_string(), other[0].clone()];
        let double = pki.issue(&pem_csr, &two, false);
        is_chain_error(assemble_chain(&double, &pki.roots(), &csr, &two, now));
        // Nothing at all.
        is_chain_error(assemble_chain(b"", &pki.roots(), &csr, &ids(), now));
    }
}
