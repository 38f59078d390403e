//! The Kubernetes CSR objects of RA mode: what istiod creates, how it is
//! approved, and how its outcome is read. Pure functions.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::certificates::v1::{
    CertificateSigningRequest, CertificateSigningRequestCondition, CertificateSigningRequestSpec,
    CertificateSigningRequestStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

use super::RaError;

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

/// The outcome as a result: `None` while pending.
pub fn final_outcome(csr: &CertificateSigningRequest) -> Result<Option<Vec<u8>>, RaError> {
    match progress(csr) {
        Progress::Pending => Ok(None),
        Progress::Issued(c) => Ok(Some(c)),
        Progress::Denied { reason, message } => Err(RaError::Denied { reason, message }),
        Progress::Failed { reason, message } => Err(RaError::Failed { reason, message }),
    }
}
