//! Helpers shared by the integration tests of the `meshca` binary.
// Each test binary uses its own subset.
#![allow(dead_code)]

pub mod fault;
pub mod ra;

use std::process::Command;

use anyhow::{Result, bail};
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

/// The URI SANs of the leaf (the first chain element).
#[track_caller]
pub fn leaf_uris(chain: &[String]) -> Vec<String> {
    let der = pem_der(&chain[0]);
    let (_, cert) = X509Certificate::from_der(&der).unwrap();
    let san = cert.subject_alternative_name().unwrap().unwrap();
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some((*u).to_owned()),
            _ => None,
        })
        .collect()
}
