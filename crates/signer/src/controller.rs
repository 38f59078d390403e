//! The kube glue: watch one signer's CSRs, run [`decide`], write the answer
//! through `/status` with the object's resourceVersion, publish an Event.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::certificates::v1::{
    CertificateSigningRequest, CertificateSigningRequestCondition, CertificateSigningRequestStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, PostParams};
use kube::runtime::controller::Action as Requeue;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Resource, ResourceExt};
use time::OffsetDateTime;

use crate::ca::CaHandle;
use crate::decide::{Action, SignerPolicy, decide};
use crate::metrics::{FailedLabel, Metrics};

/// How many times a conflicting status write is re-read and decided again
/// before the CSR goes back to the queue.
const CONFLICT_RETRIES: usize = 5;

/// What one signer's reconciler needs.
pub struct SignerContext {
    pub api: Api<CertificateSigningRequest>,
    pub policy: SignerPolicy,
    pub ca: Arc<CaHandle>,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    /// Publish Events (off in benchmarks to measure the signing path alone).
    pub events: bool,
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

fn is_status(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
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
    for _ in 0..CONFLICT_RETRIES {
        let ca = ctx.ca.get();
        let action = decide(
            &current,
            &ctx.policy,
            ca.as_deref(),
            OffsetDateTime::now_utc(),
        );
        let written = match &action {
            Action::Skip(_) => return Ok(Requeue::await_change()),
            Action::Retry { code, message } => {
                tracing::debug!(csr = %name, code, message, "not signing yet");
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
            Err(e) if is_status(&e, 409) => {
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
            Err(e) if is_status(&e, 404) => return Ok(Requeue::await_change()),
            Err(source) => return Err(ReconcileError::Write { name, source }),
        }
    }
    Ok(Requeue::requeue(Duration::from_secs(1)))
}

/// On error: log and try again shortly.
pub fn error_policy(
    csr: Arc<CertificateSigningRequest>,
    error: &ReconcileError,
    _ctx: Arc<SignerContext>,
) -> Requeue {
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
    let event = match action {
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
            Event {
                type_: EventType::Normal,
                reason: "CertificateIssued".into(),
                note: Some(format!("certificate issued by signer {signer}")),
                action: "Sign".into(),
                secondary: None,
            }
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
            Event {
                type_: EventType::Warning,
                reason: (*reason).into(),
                note: Some(truncate(message, 1000)),
                action: "Sign".into(),
                secondary: None,
            }
        }
        Action::Skip(_) | Action::Retry { .. } => return,
    };
    if !ctx.events {
        return;
    }
    let recorder = ctx.recorder.clone();
    let reference = csr.object_ref(&());
    tokio::spawn(async move {
        if let Err(e) = recorder.publish(&event, &reference).await {
            tracing::warn!(csr = ?reference.name, error = %e, "publishing Event");
        }
    });
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
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
