//! Helpers shared by the integration tests of the `meshca` binary.
// Each test binary uses its own subset.
#![allow(dead_code)]

pub mod fault;
pub mod ra;

use std::process::Command;

use anyhow::{Context, Result, bail};
use k8s_openapi::ByteString;
use k8s_openapi::api::certificates::v1::{
    CertificateSigningRequest, CertificateSigningRequestCondition, CertificateSigningRequestSpec,
    CertificateSigningRequestStatus,
};
use kube::api::{ObjectMeta, PostParams};
use x509_parser::prelude::*;

#[allow(unused_imports)] // each test binary uses its own subset
pub use meshca_testsupport::{Proc, free_port};

/// Runs `meshca ARGS`, failing with its stderr.
pub fn meshca(args: &[&str]) -> Result<()> {
    let out = Command::new(env!("CARGO_BIN_EXE_meshca"))
        .args(args)
        .output()?;
    if !out.status.success() {
        bail!(
            "meshca {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Waits (at most 30 s) until the process serving /readyz on `monitoring`
/// answers ready; fails at once if it exits.
pub async fn wait_ready(monitoring: &str, child: &mut Proc, what: &str) -> Result<()> {
    let t = std::time::Instant::now();
    loop {
        if let Some(status) = child.0.try_wait()? {
            bail!("{what} exited with {status} before becoming ready");
        }
        if meshca_testsupport::http_get(monitoring.parse()?, "/readyz")
            .await
            .is_ok_and(|(code, _)| code == 200)
        {
            return Ok(());
        }
        anyhow::ensure!(
            t.elapsed() < std::time::Duration::from_secs(30),
            "{what} not ready within 30 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// DER of the first PEM block.
pub fn pem_der(pem: &str) -> Vec<u8> {
    meshca_pki::pem::parse_all(pem.as_bytes())
        .unwrap()
        .remove(0)
        .der
        .to_vec()
}

/// The DER of every PEM block of `pem` (none if it does not parse).
pub fn ders(pem: &str) -> Vec<Vec<u8>> {
    meshca_pki::pem::parse_all(pem.as_bytes())
        .unwrap_or_default()
        .into_iter()
        .map(|b| b.der.to_vec())
        .collect()
}

/// The URI SANs of the leaf (the first chain element).
#[track_caller]
pub fn leaf_uris(chain: &[String]) -> Vec<String> {
    let der = pem_der(&chain[0]);
    let (_, cert) = X509Certificate::from_der(&der).unwrap();
    assert!(cert.subject_alternative_name().unwrap().is_some(), "no SAN");
    uris(&cert)
}

/// A certificate's URI SANs (none without a SAN extension, or a bad one).
pub fn uris(cert: &X509Certificate<'_>) -> Vec<String> {
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return vec![];
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some((*u).to_owned()),
            _ => None,
        })
        .collect()
}

/// [`wait_ready`] for tests without a runtime: curl, 30 s at most.
pub fn wait_ready_blocking(proc: &mut Proc, monitoring: &str) -> Result<()> {
    let t = std::time::Instant::now();
    loop {
        if let Some(status) = proc.0.try_wait()? {
            bail!("meshca exited: {status}");
        }
        let ready = Command::new("curl")
            .args(["-sf", &format!("http://{monitoring}/readyz")])
            .output()?
            .status
            .success();
        if ready {
            return Ok(());
        }
        if t.elapsed() > std::time::Duration::from_secs(30) {
            bail!("meshca not ready in 30 s");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// The usages istiod's RA puts in its CSRs.
pub const RA_USAGES: [&str; 4] = [
    "digital signature",
    "key encipherment",
    "server auth",
    "client auth",
];

/// Creates CSR `name` of `request` (PEM) for `signer`, shaped as istiod's
/// RA makes it, and approves it, as `api`'s identity.
pub async fn create_approved_csr(
    api: &kube::Api<CertificateSigningRequest>,
    name: &str,
    signer: &str,
    request: String,
) -> Result<()> {
    let mut csr = api
        .create(
            &PostParams::default(),
            &CertificateSigningRequest {
                metadata: ObjectMeta {
                    name: Some(name.into()),
                    ..Default::default()
                },
                spec: CertificateSigningRequestSpec {
                    request: ByteString(request.into_bytes()),
                    signer_name: signer.into(),
                    expiration_seconds: Some(3600),
                    usages: Some(RA_USAGES.iter().map(|u| u.to_string()).collect()),
                    ..Default::default()
                },
                status: None,
            },
        )
        .await
        .with_context(|| format!("creating CSR {name}"))?;
    csr.status
        .get_or_insert_with(CertificateSigningRequestStatus::default)
        .conditions
        .get_or_insert_with(Vec::new)
        .push(CertificateSigningRequestCondition {
            type_: "Approved".into(),
            status: "True".into(),
            reason: Some("TestApproved".into()),
            message: Some("approved by a meshca test".into()),
            ..Default::default()
        });
    api.replace_subresource("approval", name, &PostParams::default(), &csr)
        .await
        .with_context(|| format!("approving CSR {name}"))?;
    Ok(())
}
