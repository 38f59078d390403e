//! Garbage collection of this signer's CSRs with kube-controller-manager's
//! ages (its `csrcleaner`), but only for our own signer names.

use std::time::Duration;

use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use kube::Client;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams};
use x509_parser::prelude::{FromDer, X509Certificate};

/// The ages after which a CSR is deleted (kube-controller-manager's defaults).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CleanerConfig {
    pub interval: Duration,
    /// Issued: this long after approval.
    pub issued: Duration,
    pub denied: Duration,
    pub failed: Duration,
    /// Neither issued, denied nor failed: this long after creation.
    pub pending: Duration,
}

impl Default for CleanerConfig {
    fn default() -> Self {
        CleanerConfig {
            interval: Duration::from_secs(60),
            issued: Duration::from_secs(3600),
            denied: Duration::from_secs(3600),
            failed: Duration::from_secs(3600),
            pending: Duration::from_secs(24 * 3600),
        }
    }
}

fn secs(t: &k8s_openapi::apimachinery::pkg::apis::meta::v1::Time) -> i64 {
    t.0.as_second()
}

fn older(t: Option<i64>, age: Duration, now: i64) -> bool {
    t.is_some_and(|t| t.saturating_add(age.as_secs() as i64) < now)
}

/// Why `csr` is due for deletion at `now` (Unix seconds), if it is. Pure.
/// Never for another signer's CSR.
pub fn due(
    csr: &CertificateSigningRequest,
    signers: &[String],
    cfg: &CleanerConfig,
    now: i64,
) -> Option<&'static str> {
    if !signers.contains(&csr.spec.signer_name) {
        return None;
    }
    let created = csr.metadata.creation_timestamp.as_ref().map(secs);
    let status = csr.status.as_ref();
    let conditions = status
        .and_then(|s| s.conditions.as_deref())
        .unwrap_or_default();
    let updated = |type_: &str| {
        conditions
            .iter()
            .find(|c| c.type_ == type_)
            .map(|c| c.last_update_time.as_ref().map(secs).or(created))
    };
    if let Some(cert) = status
        .and_then(|s| s.certificate.as_ref())
        .filter(|c| !c.0.is_empty())
    {
        let expired = meshca_pki::pem::parse_all(&cert.0)
            .ok()
            .and_then(|b| {
                let first = b.into_iter().next()?;
                let (_, c) = X509Certificate::from_der(&first.der).ok()?;
                Some(c.validity().not_after.timestamp())
            })
            .is_some_and(|na| na < now);
        if expired {
            return Some("certificate_expired");
        }
        return older(updated("Approved").flatten().or(created), cfg.issued, now)
            .then_some("issued");
    }
    if let Some(t) = updated("Denied") {
        return older(t, cfg.denied, now).then_some("denied");
    }
    if let Some(t) = updated("Failed") {
        return older(t, cfg.failed, now).then_some("failed");
    }
    older(created, cfg.pending, now).then_some("pending")
}

/// Deletes due CSRs of `signers` every `cfg.interval`, forever.
pub async fn run(client: Client, signers: Vec<String>, cfg: CleanerConfig) {
    let api = Api::<CertificateSigningRequest>::all(client);
    let mut last_error = meshca_kube::LastError::default();
    loop {
        for signer in &signers {
            let lp = ListParams::default().fields(&format!("spec.signerName={signer}"));
            let list = match api.list(&lp).await {
                Ok(l) => {
                    last_error.clear();
                    l
                }
                Err(e) => {
                    if last_error.is_new(&e) {
                        tracing::warn!(error = %e, "cleaner: listing CSRs failed; retrying");
                    }
                    continue;
                }
            };
            let now = k8s_openapi::jiff::Timestamp::now().as_second();
            for csr in list.items {
                let Some(why) = due(&csr, &signers, &cfg, now) else {
                    continue;
                };
                let name = csr.name_any();
                // Precondition on the UID: never delete a re-created namesake.
                let dp =
                    DeleteParams {
                        preconditions: csr.metadata.uid.clone().map(|uid| {
                            kube::api::Preconditions {
                                uid: Some(uid),
                                resource_version: None,
                            }
                        }),
                        ..Default::default()
                    };
                match api.delete(&name, &dp).await {
                    Ok(_) => tracing::info!(csr = %name, why, "cleaner: deleted"),
                    Err(e) => tracing::debug!(csr = %name, error = %e, "cleaner: delete"),
                }
            }
        }
        tokio::time::sleep(cfg.interval).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;
    use k8s_openapi::api::certificates::v1::{
        CertificateSigningRequestCondition, CertificateSigningRequestSpec,
        CertificateSigningRequestStatus,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use k8s_openapi::jiff::Timestamp;

    const NOW: i64 = 1_800_000_000;

    fn t(s: i64) -> Time {
        Time(Timestamp::from_second(s).unwrap())
    }

    fn csr(
        signer: &str,
        created: i64,
        conds: &[(&str, i64)],
        cert: bool,
    ) -> CertificateSigningRequest {
        let mut c = CertificateSigningRequest {
            spec: CertificateSigningRequestSpec {
                signer_name: signer.into(),
                ..Default::default()
            },
            ..Default::default()
        };
        c.metadata.creation_timestamp = Some(t(created));
        c.status = Some(CertificateSigningRequestStatus {
            conditions: Some(
                conds
                    .iter()
                    .map(|(ty, at)| CertificateSigningRequestCondition {
                        type_: (*ty).into(),
                        status: "True".into(),
                        last_update_time: Some(t(*at)),
                        ..Default::default()
                    })
                    .collect(),
            ),
            certificate: cert.then(|| ByteString(b"not a pem".to_vec())),
        });
        c
    }

    #[test]
    fn kube_controller_manager_ages_for_own_signers_only() {
        let s = vec!["example.com/foo".to_string()];
        let cfg = CleanerConfig::default();
        let due = |c: &CertificateSigningRequest| due(c, &s, &cfg, NOW);
        let h = 3600;
        assert_eq!(
            due(&csr(
                "example.com/foo",
                NOW - 2 * h,
                &[("Approved", NOW - 2 * h)],
                true
            )),
            Some("issued")
        );
        assert_eq!(
            due(&csr(
                "example.com/foo",
                NOW - 2 * h,
                &[("Approved", NOW - 10)],
                true
            )),
            None
        );
        assert_eq!(
            due(&csr(
                "example.com/foo",
                NOW - 2 * h,
                &[("Denied", NOW - 2 * h)],
                false
            )),
            Some("denied")
        );
        assert_eq!(
            due(&csr(
                "example.com/foo",
                NOW - 2 * h,
                &[("Denied", NOW - 60)],
                false
            )),
            None
        );
        assert_eq!(
            due(&csr(
                "example.com/foo",
                NOW - 2 * h,
                &[("Approved", NOW - 2 * h), ("Failed", NOW - 2 * h)],
                false
            )),
            Some("failed")
        );
        assert_eq!(
            due(&csr("example.com/foo", NOW - 25 * h, &[], false)),
            Some("pending")
        );
        assert_eq!(due(&csr("example.com/foo", NOW - 23 * h, &[], false)), None);
        assert_eq!(
            due(&csr(
                "example.com/foo",
                NOW - 23 * h,
                &[("Approved", NOW - 23 * h)],
                false
            )),
            None
        );
        // Another signer's CSRs are never ours to delete, however old.
        assert_eq!(
            due(&csr(
                "example.com/bar",
                NOW - 100 * h,
                &[("Denied", NOW - 99 * h)],
                false
            )),
            None
        );
        assert_eq!(
            due(&csr(
                "kubernetes.io/kubelet-serving",
                NOW - 100 * h,
                &[],
                false
            )),
            None
        );
    }
}
