//! The kube glue: watch one signer's CSRs, run [`decide`], write the answer
//! through `/status` with the object's resourceVersion, publish an Event.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::certificates::v1::{
    CertificateSigningRequest, CertificateSigningRequestCondition, CertificateSigningRequestStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use kube::api::{Api, GetParams, PostParams};
use kube::runtime::controller::Action as Requeue;
use meshca_kube::status;
use time::OffsetDateTime;

use crate::decide::{Action, SignerPolicy, decide};
use crate::events::{EventSink, Kind};
use crate::metrics::{FailedLabel, Metrics};

/// How many times a conflicting status write is re-read and decided again
/// before the CSR goes back to the queue.
const CONFLICT_RETRIES: usize = 5;

/// What one signer's reconciler needs.
pub struct SignerContext {
    pub api: Api<CertificateSigningRequest>,
    pub policy: SignerPolicy,
    pub ca: meshca_ca_store::CurrentCa,
    pub metrics: Arc<Metrics>,
    /// Where Events go (`None`: no Events).
    pub events: Option<EventSink>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("writing CSR {name} status: {source}")]
    Write {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("re-reading CSR {name}: {source}")]
    Read {
        name: String,
        #[source]
        source: kube::Error,
    },
}

/// Decides on one CSR and carries the decision out. A conflict (someone
/// else wrote first, or our cached copy was stale) means: re-read, decide
/// again. An existing certificate or Failed condition is never replaced.
pub async fn reconcile(
    csr: Arc<CertificateSigningRequest>,
    ctx: Arc<SignerContext>,
) -> Result<Requeue, ReconcileError> {
    let name = csr.name_any();
    let mut current = (*csr).clone();
    if is_compacted(&current) && crate::decide::skip_reason(&current, &ctx.policy.name).is_none() {
        // Listed without its request (see `trim`): an approved CSR is only
        // ever decided on its real request. At least as new as the cached
        // copy, so the apiserver answers from its watch cache (no etcd read).
        let params = match current.metadata.resource_version.as_deref() {
            Some(rv) => GetParams::at(rv),
            None => GetParams::default(),
        };
        match ctx.api.get_with(&name, &params).await {
            Ok(fresh) => current = fresh,
            Err(e) if status::is_not_found(&e) => return Ok(Requeue::await_change()),
            Err(source) => return Err(ReconcileError::Read { name, source }),
        }
    }
    for _ in 0..CONFLICT_RETRIES {
        let ca = ctx.ca.borrow().clone();
        let action = if ca.as_ref().is_some_and(|b| b.key().is_external()) {
            // A key in a module is a blocking call that may wait on a
            // device: keep it off the async workers.
            let (csr, policy, ca) = (current.clone(), ctx.policy.clone(), ca.clone());
            tokio::task::spawn_blocking(move || {
                decide(&csr, &policy, ca.as_deref(), OffsetDateTime::now_utc())
            })
            .await
            .unwrap_or_else(|_| Action::Retry {
                code: "cert_generation",
                message: "the signing task failed".into(),
            })
        } else {
            decide(
                &current,
                &ctx.policy,
                ca.as_deref(),
                OffsetDateTime::now_utc(),
            )
        };
        let written = match &action {
            Action::Skip(_) => return Ok(Requeue::await_change()),
            Action::Retry { code, message } => {
                if *code == "ca_not_ready" {
                    tracing::debug!(csr = %name, code, message, "not signing yet");
                } else {
                    tracing::warn!(csr = %name, code, message, "not signing yet; will retry");
                }
                return Ok(Requeue::requeue(Duration::from_secs(5)));
            }
            Action::Issue { certificate } => {
                let mut next = current.clone();
                next.status.get_or_insert_with(Default::default).certificate =
                    Some(ByteString(certificate.clone().into_bytes()));
                write_status(&ctx.api, &name, &next).await
            }
            Action::Fail {
                reason, message, ..
            } => {
                let mut next = current.clone();
                let now = Time(k8s_openapi::jiff::Timestamp::now());
                next.status
                    .get_or_insert_with(CertificateSigningRequestStatus::default)
                    .conditions
                    .get_or_insert_with(Vec::new)
                    .push(CertificateSigningRequestCondition {
                        type_: "Failed".into(),
                        status: "True".into(),
                        reason: Some((*reason).into()),
                        message: Some(message.clone()),
                        last_update_time: Some(now.clone()),
                        last_transition_time: Some(now),
                    });
                write_status(&ctx.api, &name, &next).await
            }
        };
        match written {
            Ok(()) => {
                record(&ctx, &current, &action);
                return Ok(Requeue::await_change());
            }
            Err(e) if status::is_conflict(&e) => {
                ctx.metrics
                    .conflicts
                    .get_or_create(&Metrics::label(&ctx.policy.name))
                    .inc();
                match ctx.api.get_opt(&name).await {
                    Ok(Some(fresh)) => current = fresh,
                    Ok(None) => return Ok(Requeue::await_change()),
                    Err(source) => return Err(ReconcileError::Read { name, source }),
                }
            }
            Err(e) if status::is_not_found(&e) => return Ok(Requeue::await_change()),
            Err(source) => return Err(ReconcileError::Write { name, source }),
        }
    }
    Ok(Requeue::requeue(Duration::from_secs(1)))
}

/// On error: log and try again shortly.
pub fn error_policy(
    csr: Arc<CertificateSigningRequest>,
    error: &ReconcileError,
    ctx: Arc<SignerContext>,
) -> Requeue {
    let (ReconcileError::Write { source, .. } | ReconcileError::Read { source, .. }) = error;
    let code = status::code(source).map_or_else(|| "transport".to_string(), |c| c.to_string());
    ctx.metrics
        .api_errors
        .get_or_create(&crate::metrics::ErrorLabel {
            signer: ctx.policy.name.clone(),
            code,
        })
        .inc();
    tracing::warn!(csr = %csr.name_any(), error = %error, "reconcile failed; retrying");
    Requeue::requeue(Duration::from_secs(2))
}

/// `replace_status` with the object's resourceVersion: the apiserver refuses
/// (409) if the CSR changed since it was read.
async fn write_status(
    api: &Api<CertificateSigningRequest>,
    name: &str,
    next: &CertificateSigningRequest,
) -> Result<(), kube::Error> {
    debug_assert!(next.metadata.resource_version.is_some());
    api.replace_status(name, &PostParams::default(), next)
        .await
        .map(drop)
}

fn record(ctx: &SignerContext, csr: &CertificateSigningRequest, action: &Action) {
    let signer = &ctx.policy.name;
    let name = csr.name_any();
    let (kind, reason, note) = match action {
        Action::Issue { .. } => {
            ctx.metrics
                .signed
                .get_or_create(&Metrics::label(signer))
                .inc();
            if let Some(created) = &csr.metadata.creation_timestamp {
                let secs = k8s_openapi::jiff::Timestamp::now()
                    .duration_since(created.0)
                    .as_secs_f64();
                ctx.metrics
                    .latency
                    .get_or_create(&Metrics::label(signer))
                    .observe(secs.max(0.0));
            }
            tracing::info!(csr = %name, signer, requester = csr.spec.username.as_deref().unwrap_or(""), "certificate issued");
            (
                Kind::Normal,
                "CertificateIssued",
                format!("certificate issued by signer {signer}"),
            )
        }
        Action::Fail {
            code,
            reason,
            message,
        } => {
            ctx.metrics
                .failed
                .get_or_create(&FailedLabel {
                    signer: signer.clone(),
                    reason: (*code).into(),
                })
                .inc();
            tracing::warn!(csr = %name, signer, code, message, "CSR marked Failed");
            (Kind::Warning, *reason, truncate(message, 1000))
        }
        Action::Skip(_) | Action::Retry { .. } => return,
    };
    if let Some(sink) = &ctx.events {
        sink.publish(csr, kind, reason, note);
    }
}

/// At most `max` bytes of `s`, cut on a character boundary (condition
/// messages and Event notes have size limits).
pub(crate) fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

/// Shrinks a CSR before it enters the cache: managedFields are dropped
/// (a status PUT without them keeps the server's), and a CSR this signer
/// has nothing to do for yet or any more (not approved, issued, failed,
/// denied) keeps only what [`crate::decide::skip_reason`] looks at (see
/// [`strip`]). So whoever may create CSRs for this signer, but not approve
/// them, cannot fill its memory with pending requests (the watch is
/// field-selected on spec.signerName: other signers' CSRs are never
/// listed). Such an object is never decided on nor written back: the
/// decision on it is always Skip. Approval changes the object, and the
/// watch then delivers it whole again (an update event carries the full
/// object), so an approved, open CSR that arrived on the watch keeps its
/// real request and is signed without another read. One that arrives
/// without (listed: see [`trim`]) is read again before it is decided on
/// ([`reconcile`], [`is_compacted`]); a conflict re-reads too.
pub fn compact(csr: &mut CertificateSigningRequest) {
    csr.metadata.managed_fields = None;
    if crate::decide::skip_reason(csr, &csr.spec.signer_name).is_none() {
        // Approved and open: decide() needs all of it.
        return;
    }
    strip(csr);
}

/// Keeps identity, resourceVersion, signer name, condition types/statuses
/// and a marker for the certificate: all [`crate::decide::skip_reason`] and
/// the queue depth look at. The request, labels, annotations and requester
/// go, and the certificate bytes become a one-byte marker.
fn strip(csr: &mut CertificateSigningRequest) {
    csr.metadata.managed_fields = None;
    let meta = &mut csr.metadata;
    meta.annotations = None;
    meta.labels = None;
    meta.generate_name = None;
    let spec = &mut csr.spec;
    spec.request = ByteString(Vec::new());
    spec.usages = None;
    spec.username = None;
    spec.groups = None;
    spec.extra = None;
    spec.uid = None;
    if let Some(status) = csr.status.as_mut() {
        if let Some(cert) = status.certificate.as_mut()
            && !cert.0.is_empty()
        {
            *cert = ByteString(b"-".to_vec());
        }
        for c in status.conditions.iter_mut().flatten() {
            c.message = None;
            c.reason = None;
            c.last_update_time = None;
            c.last_transition_time = None;
        }
    }
}

/// What the cache keeps of each watch event. Updates go through
/// [`compact`]; objects from a list (the start, or a re-list after the
/// watch fell too far behind) are all [`strip`]ped, approved and open ones
/// too: a list holds whatever piled up while no signer ran (a backlog has
/// no bound; with 10,000 approved CSRs at start the signer peaked at 72 MiB
/// keeping them whole, 51 MiB stripped: BENCHMARKS.md, Scale 3), and each
/// is signed once, so reading it again when its turn comes ([`reconcile`],
/// from the apiserver's watch cache) costs one GET per backlog CSR, not the
/// whole backlog's requests held at once.
pub fn trim(
    event: kube::runtime::watcher::Event<CertificateSigningRequest>,
) -> kube::runtime::watcher::Event<CertificateSigningRequest> {
    use kube::runtime::watcher::Event;
    match event {
        Event::InitApply(mut csr) => {
            strip(&mut csr);
            Event::InitApply(csr)
        }
        other => other.modify(compact),
    }
}

/// Whether `csr` lost its request to [`compact`] (the apiserver never
/// stores a CSR with an empty `spec.request`).
pub fn is_compacted(csr: &CertificateSigningRequest) -> bool {
    csr.spec.request.0.is_empty()
}

/// Counts the CSRs of this signer that are approved and not yet final.
pub fn pending(
    store: &kube::runtime::reflector::Store<CertificateSigningRequest>,
    name: &str,
) -> i64 {
    store
        .state()
        .iter()
        .filter(|c| crate::decide::skip_reason(c, name).is_none())
        .count() as i64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::{Skip, skip_reason};
    use k8s_openapi::api::certificates::v1::CertificateSigningRequestSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ManagedFieldsEntry;

    fn csr(conds: &[&str], cert: Option<&[u8]>) -> CertificateSigningRequest {
        let mut c = CertificateSigningRequest {
            spec: CertificateSigningRequestSpec {
                signer_name: "example.com/foo".into(),
                request: ByteString(b"REQUEST".to_vec()),
                ..Default::default()
            },
            ..Default::default()
        };
        c.metadata.managed_fields = Some(vec![ManagedFieldsEntry::default()]);
        c.status = Some(CertificateSigningRequestStatus {
            conditions: Some(
                conds
                    .iter()
                    .map(|t| CertificateSigningRequestCondition {
                        type_: (*t).into(),
                        status: "True".into(),
                        ..Default::default()
                    })
                    .collect(),
            ),
            certificate: cert.map(|c| ByteString(c.to_vec())),
        });
        c
    }

    #[test]
    fn compact_keeps_every_decision_and_the_request_of_open_csrs() {
        for (c, keeps_request) in [
            (csr(&[], None), false),
            (csr(&["Approved"], None), true),
            (csr(&["Approved"], Some(b"")), true),
            (csr(&["Approved"], Some(b"CERT")), false),
            (csr(&["Approved", "Failed"], None), false),
            (csr(&["Denied"], None), false),
        ] {
            let mut small = c.clone();
            compact(&mut small);
            assert_eq!(small.metadata.managed_fields, None);
            let skip = |x: &CertificateSigningRequest| skip_reason(x, "example.com/foo");
            assert_eq!(skip(&small), skip(&c), "{c:?}");
            assert_eq!(small.spec.request.0 == b"REQUEST", keeps_request, "{c:?}");
            assert_eq!(is_compacted(&small), !keeps_request, "{c:?}");
            if skip(&c) == Some(Skip::AlreadyIssued) {
                assert_eq!(small.status.unwrap().certificate.unwrap().0, b"-");
            }
        }
    }

    #[test]
    fn a_listed_backlog_is_cached_without_requests_and_updates_keep_theirs() {
        use kube::runtime::watcher::Event;
        let request = |e: &Event<CertificateSigningRequest>| match e {
            Event::Apply(c) | Event::InitApply(c) | Event::Delete(c) => c.spec.request.0.clone(),
            _ => unreachable!(),
        };
        for c in [
            csr(&[], None),
            csr(&["Approved"], None),
            csr(&["Approved"], Some(b"CERT")),
            csr(&["Denied"], None),
        ] {
            let skip = skip_reason(&c, "example.com/foo");
            // Listed (the backlog at start): no request, same decision, so
            // an approved, open one is read again before it is signed.
            let listed = trim(Event::InitApply(c.clone()));
            assert!(request(&listed).is_empty(), "{c:?}");
            let Event::InitApply(small) = &listed else {
                unreachable!()
            };
            assert_eq!(skip_reason(small, "example.com/foo"), skip, "{c:?}");
            assert!(is_compacted(small));
            assert_eq!(small.metadata.managed_fields, None);
            // Arriving on the watch: as `compact` (open ones keep theirs).
            let updated = trim(Event::Apply(c.clone()));
            assert_eq!(!request(&updated).is_empty(), skip.is_none(), "{c:?}");
        }
    }

    #[test]
    fn a_pending_csr_is_cached_without_its_request_until_approved() {
        // Not approved yet, with a large request and metadata: kept small.
        let mut pending = csr(&[], None);
        pending.spec.request = ByteString(vec![b'x'; 1 << 20]);
        pending.spec.username = Some("someone".into());
        pending.metadata.annotations = Some([("a".to_string(), "y".repeat(1 << 16))].into());
        pending.metadata.labels = Some([("l".to_string(), "v".to_string())].into());
        pending.status.as_mut().unwrap().conditions =
            Some(vec![CertificateSigningRequestCondition {
                type_: "Approved".into(),
                status: "False".into(),
                message: Some("z".repeat(1 << 16)),
                ..Default::default()
            }]);
        let mut small = pending.clone();
        compact(&mut small);
        assert!(small.spec.request.0.is_empty());
        assert_eq!(small.spec.username, None);
        assert_eq!(small.metadata.annotations, None);
        assert_eq!(small.metadata.labels, None);
        assert!(serde_json::to_vec(&small).unwrap().len() < 1024);
        assert_eq!(
            skip_reason(&small, "example.com/foo"),
            Some(Skip::NotApproved)
        );
        // The update that approves it carries the whole object again: kept.
        let mut approved = pending.clone();
        approved.status.as_mut().unwrap().conditions =
            Some(vec![CertificateSigningRequestCondition {
                type_: "Approved".into(),
                status: "True".into(),
                ..Default::default()
            }]);
        let mut kept = approved.clone();
        compact(&mut kept);
        assert_eq!(kept.spec.request, approved.spec.request);
        assert_eq!(kept.spec.username, approved.spec.username);
    }
}
