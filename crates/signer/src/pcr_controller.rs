//! The kube glue of the PodCertificateRequest path: watch one signer's
//! requests (field selector `spec.signerName`), read the pod, ServiceAccount
//! and Node they name, run [`crate::pcr::decide`], write the answer through
//! `/status` with the object's resourceVersion, publish an Event, count it.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::certificates::v1beta1::{PodCertificateRequest, PodCertificateRequestStatus};
use k8s_openapi::api::core::v1::{Node, Pod, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Api, PostParams};
use kube::runtime::controller::Action as Requeue;
use kube::{Client, ResourceExt};
use meshca_kube::status;
use time::OffsetDateTime;

use crate::cluster_trust_bundle::{Published, covers};
use crate::controller::truncate;
use crate::events::{EventSink, Kind};
use crate::metrics::{ErrorLabel, FailedLabel, Metrics};
use crate::pcr::{Facts, PcrAction, PodCertPolicy, decide, reasons, skip_reason};

const CONFLICT_RETRIES: usize = 5;

/// What one signer's PodCertificateRequest reconciler needs.
pub struct PcrContext {
    pub client: Client,
    pub signer: String,
    pub policy: PodCertPolicy,
    pub ca: meshca_ca_store::CurrentCa,
    /// The roots in the signer's ClusterTrustBundle (`None`: not published,
    /// nothing to wait for).
    pub published: Option<Published>,
    pub metrics: Arc<Metrics>,
    pub events: Option<EventSink>,
}

#[derive(Debug, thiserror::Error)]
pub enum PcrError {
    #[error("writing PodCertificateRequest {name} status: {source}")]
    Write {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("reading for PodCertificateRequest {name}: {source}")]
    Read {
        name: String,
        #[source]
        source: kube::Error,
    },
}

pub async fn reconcile(
    pcr: Arc<PodCertificateRequest>,
    ctx: Arc<PcrContext>,
) -> Result<Requeue, PcrError> {
    let namespace = pcr.namespace().unwrap_or_default();
    let name = format!("{namespace}/{}", pcr.name_any());
    let api = Api::<PodCertificateRequest>::namespaced(ctx.client.clone(), &namespace);
    let read = |name: &str| {
        let name = name.to_owned();
        move |source| PcrError::Read { name, source }
    };
    let mut current = (*pcr).clone();
    for _ in 0..CONFLICT_RETRIES {
        if skip_reason(&current, &ctx.signer).is_some() {
            return Ok(Requeue::await_change());
        }
        // Read now, not from a cache: a pod deleted and recreated a moment
        // ago must be seen with its new UID.
        let spec = &current.spec;
        let pod = Api::<Pod>::namespaced(ctx.client.clone(), &namespace)
            .get_opt(&spec.pod_name)
            .await
            .map_err(read(&name))?;
        let sa = Api::<ServiceAccount>::namespaced(ctx.client.clone(), &namespace)
            .get_opt(&spec.service_account_name)
            .await
            .map_err(read(&name))?;
        let node = Api::<Node>::all(ctx.client.clone())
            .get_opt(&spec.node_name)
            .await
            .map_err(read(&name))?;
        let ca = ctx.ca.borrow().clone();
        let roots_published = match (&ctx.published, ca.as_deref()) {
            (Some(p), Some(ca)) => covers(&p.borrow(), ca),
            _ => true,
        };
        let action = decide(
            &current,
            &ctx.signer,
            &ctx.policy,
            ca.as_deref(),
            Facts {
                pod: pod.as_ref(),
                service_account: sa.as_ref(),
                node: node.as_ref(),
            },
            roots_published,
            OffsetDateTime::now_utc(),
        );
        let now = Time(k8s_openapi::jiff::Timestamp::now());
        let status = match &action {
            PcrAction::Skip(_) => return Ok(Requeue::await_change()),
            PcrAction::Retry { code, message } => {
                tracing::debug!(pcr = %name, code, message, "not signing yet");
                return Ok(Requeue::requeue(Duration::from_secs(2)));
            }
            PcrAction::Issue {
                chain,
                not_before,
                not_after,
                begin_refresh_at,
            } => PodCertificateRequestStatus {
                conditions: Some(vec![condition(
                    "Issued",
                    reasons::ISSUED,
                    format!("issued by signer {}", ctx.signer),
                    &now,
                )]),
                certificate_chain: Some(chain.clone()),
                not_before: Some(time(*not_before)),
                not_after: Some(time(*not_after)),
                begin_refresh_at: Some(time(*begin_refresh_at)),
            },
            PcrAction::Refuse {
                condition: type_,
                reason,
                message,
                ..
            } => PodCertificateRequestStatus {
                conditions: Some(vec![condition(
                    type_,
                    reason,
                    truncate(message, 1000),
                    &now,
                )]),
                ..Default::default()
            },
        };
        let mut next = current.clone();
        next.metadata.managed_fields = None;
        next.status = Some(status);
        match api
            .replace_status(&current.name_any(), &PostParams::default(), &next)
            .await
        {
            Ok(_) => {
                record(&ctx, &current, &action);
                return Ok(Requeue::await_change());
            }
            Err(e) if status::is_conflict(&e) => {
                ctx.metrics
                    .conflicts
                    .get_or_create(&Metrics::label(&ctx.signer))
                    .inc();
                match api.get_opt(&current.name_any()).await {
                    Ok(Some(fresh)) => current = fresh,
                    Ok(None) => return Ok(Requeue::await_change()),
                    Err(source) => return Err(PcrError::Read { name, source }),
                }
            }
            Err(e) if status::is_not_found(&e) => return Ok(Requeue::await_change()),
            Err(source) => return Err(PcrError::Write { name, source }),
        }
    }
    Ok(Requeue::requeue(Duration::from_secs(1)))
}

pub fn error_policy(
    pcr: Arc<PodCertificateRequest>,
    error: &PcrError,
    ctx: Arc<PcrContext>,
) -> Requeue {
    let (PcrError::Write { source, .. } | PcrError::Read { source, .. }) = error;
    let code = status::code(source).map_or_else(|| "transport".to_string(), |c| c.to_string());
    ctx.metrics
        .api_errors
        .get_or_create(&ErrorLabel {
            signer: ctx.signer.clone(),
            code,
        })
        .inc();
    tracing::warn!(pcr = %pcr.name_any(), error = %error, "reconcile failed; retrying");
    Requeue::requeue(Duration::from_secs(2))
}

/// Shrinks a request before it enters the cache: managedFields always; a
/// final one (Issued, Denied, Failed) keeps only what
/// [`skip_reason`] looks at, its chain replaced by a one-byte marker, so
/// the requests of a cluster's pods (kube-controller-manager deletes them
/// later) cost little. A request still to decide stays whole.
pub fn compact(pcr: &mut PodCertificateRequest) {
    pcr.metadata.managed_fields = None;
    if skip_reason(pcr, &pcr.spec.signer_name).is_none() {
        return;
    }
    pcr.metadata.annotations = None;
    pcr.metadata.labels = None;
    pcr.spec.pkix_public_key = Default::default();
    pcr.spec.proof_of_possession = Default::default();
    pcr.spec.unverified_user_annotations = None;
    if let Some(status) = pcr.status.as_mut() {
        if status
            .certificate_chain
            .as_deref()
            .is_some_and(|c| !c.is_empty())
        {
            status.certificate_chain = Some("-".into());
        }
        for c in status.conditions.iter_mut().flatten() {
            c.message = String::new();
        }
    }
}

fn condition(type_: &str, reason: &str, message: String, now: &Time) -> Condition {
    Condition {
        type_: type_.into(),
        status: "True".into(),
        reason: reason.into(),
        message,
        last_transition_time: now.clone(),
        observed_generation: None,
    }
}

fn time(t: OffsetDateTime) -> Time {
    Time(
        k8s_openapi::jiff::Timestamp::from_second(t.unix_timestamp())
            .unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
    )
}

fn record(ctx: &PcrContext, pcr: &PodCertificateRequest, action: &PcrAction) {
    let signer = &ctx.signer;
    let name = format!("{}/{}", pcr.namespace().unwrap_or_default(), pcr.name_any());
    let (kind, reason, note) = match action {
        PcrAction::Issue { .. } => {
            ctx.metrics
                .pod_certificates_issued
                .get_or_create(&Metrics::label(signer))
                .inc();
            tracing::info!(pcr = %name, signer, pod = %pcr.spec.pod_name, "pod certificate issued");
            (
                Kind::Normal,
                "CertificateIssued",
                format!("pod certificate issued by signer {signer}"),
            )
        }
        PcrAction::Refuse {
            condition,
            code,
            reason,
            message,
        } => {
            ctx.metrics
                .pod_certificates_refused
                .get_or_create(&FailedLabel {
                    signer: signer.clone(),
                    reason: (*code).into(),
                })
                .inc();
            tracing::warn!(pcr = %name, signer, code, message, "PodCertificateRequest {condition}");
            (Kind::Warning, *reason, truncate(message, 1000))
        }
        PcrAction::Skip(_) | PcrAction::Retry { .. } => return,
    };
    if let Some(sink) = &ctx.events {
        sink.publish_pcr(pcr, kind, reason, note);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;
    use k8s_openapi::api::certificates::v1beta1::PodCertificateRequestSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ManagedFieldsEntry;

    fn open_request() -> PodCertificateRequest {
        let mut p = PodCertificateRequest {
            spec: PodCertificateRequestSpec {
                signer_name: "example.com/foo".into(),
                pkix_public_key: ByteString(vec![1; 91]),
                proof_of_possession: ByteString(vec![2; 72]),
                ..Default::default()
            },
            ..Default::default()
        };
        p.metadata.managed_fields = Some(vec![ManagedFieldsEntry::default()]);
        p
    }

    #[test]
    fn an_open_request_is_cached_whole_and_a_final_one_small() {
        let mut open = open_request();
        compact(&mut open);
        assert!(open.metadata.managed_fields.is_none());
        assert_eq!(
            open.spec.pkix_public_key.0.len(),
            91,
            "still to decide: whole"
        );
        assert_eq!(skip_reason(&open, "example.com/foo"), None);

        let mut issued = open_request();
        let now = Time(k8s_openapi::jiff::Timestamp::now());
        issued.status = Some(PodCertificateRequestStatus {
            conditions: Some(vec![condition("Issued", "Issued", "m".into(), &now)]),
            certificate_chain: Some("-----BEGIN CERTIFICATE-----...".into()),
            ..Default::default()
        });
        compact(&mut issued);
        assert!(issued.spec.pkix_public_key.0.is_empty());
        assert!(issued.spec.proof_of_possession.0.is_empty());
        assert_eq!(chain_len(&issued), 1);
        assert_eq!(
            skip_reason(&issued, "example.com/foo"),
            Some(crate::pcr::PcrSkip::Final),
            "still final after compaction"
        );
    }

    fn chain_len(p: &PodCertificateRequest) -> usize {
        p.status
            .as_ref()
            .and_then(|s| s.certificate_chain.as_ref())
            .map_or(0, String::len)
    }
}
