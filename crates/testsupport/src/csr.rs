//! CertificateSigningRequests as a test makes them: create one for a signer,
//! approve (or deny) it through `/approval`, read its certificate or its
//! `Failed` condition.

use anyhow::{Context, Result, bail};
use k8s_openapi::ByteString;
use k8s_openapi::api::certificates::v1::{
    CertificateSigningRequest, CertificateSigningRequestCondition, CertificateSigningRequestSpec,
    CertificateSigningRequestStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Client;
use kube::api::{Api, PostParams};

use crate::TestNamespace;

/// Creates a CSR as `client`; deleted on the namespace's cleanup.
pub async fn create_csr(
    ns: &TestNamespace,
    client: &Client,
    signer: &str,
    pem: &str,
    usages: &[&str],
    expiration_seconds: Option<i32>,
) -> Result<String> {
    let name = ns.unique_name("csr");
    ns.delete_csr_on_cleanup(&name);
    let csr = CertificateSigningRequest {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            ..Default::default()
        },
        spec: CertificateSigningRequestSpec {
            request: ByteString(pem.as_bytes().to_vec()),
            signer_name: signer.to_string(),
            expiration_seconds,
            usages: Some(usages.iter().map(|u| u.to_string()).collect()),
            ..Default::default()
        },
        status: None,
    };
    Api::<CertificateSigningRequest>::all(client.clone())
        .create(&PostParams::default(), &csr)
        .await
        .with_context(|| format!("creating CSR {name}"))?;
    Ok(name)
}

/// Adds `Approved` (or `Denied`) through /approval, as `client`.
pub async fn set_approval(client: &Client, name: &str, type_: &str) -> Result<()> {
    let api = Api::<CertificateSigningRequest>::all(client.clone());
    for _ in 0..10 {
        let mut csr = api.get(name).await?;
        let status = csr
            .status
            .get_or_insert_with(CertificateSigningRequestStatus::default);
        status
            .conditions
            .get_or_insert_with(Vec::new)
            .push(CertificateSigningRequestCondition {
                type_: type_.into(),
                status: "True".into(),
                reason: Some(format!("Test{type_}")),
                message: Some("set by the signer integration test".into()),
                ..Default::default()
            });
        match api
            .replace_subresource("approval", name, &PostParams::default(), &csr)
            .await
        {
            Ok(_) => return Ok(()),
            Err(kube::Error::Api(s)) if s.code == 409 => continue,
            Err(e) => return Err(e.into()),
        }
    }
    bail!("approval of {name} kept conflicting")
}

/// `status.certificate`, if the signer wrote one.
pub fn certificate(csr: &CertificateSigningRequest) -> Option<String> {
    csr.status
        .as_ref()
        .and_then(|s| s.certificate.as_ref())
        .map(|c| String::from_utf8_lossy(&c.0).into_owned())
}

/// The condition named `type_` (`Approved`, `Denied`, `Failed`), if set.
pub fn condition(
    csr: &CertificateSigningRequest,
    type_: &str,
) -> Option<CertificateSigningRequestCondition> {
    csr.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == type_).cloned())
}

/// The `Failed` condition, if the signer set one.
pub fn failed(csr: &CertificateSigningRequest) -> Option<CertificateSigningRequestCondition> {
    condition(csr, "Failed")
}
