//! The pure parts of RA mode, with plain values: one file per job, as the
//! module is cut. The fixtures here are shared.

mod chain;
mod csr;
mod request;
mod trust;

use std::time::Duration;

use meshca_pki::profile::issue_workload;
use meshca_pki::{CaBundle, CsrPolicy, KeyType, SanEntry, SigningKey, WorkloadProfile, cert, pem};
use time::OffsetDateTime;

use super::{RaConfig, Roots};

pub const ID: &str = "spiffe://cluster.local/ns/app/sa/web";

pub fn config(signer: Option<&str>, domain: Option<&str>) -> RaConfig {
    RaConfig {
        signer: signer.map(Into::into),
        signer_domain: domain.map(Into::into),
        cert_signers: vec!["bar".into()],
        roots_file: "roots.pem".into(),
        signer_roots: Vec::new(),
        timeout: Duration::from_secs(60),
        workload: WorkloadProfile::default(),
        after_create: None,
    }
}

pub fn csr_with(sans: &[SanEntry]) -> (SigningKey, String) {
    let key = SigningKey::generate(KeyType::EcdsaP256).unwrap();
    let pem = meshca_pki::csr::build_csr(&key, cert::EMPTY_NAME, sans).unwrap();
    (key, pem)
}

pub fn ids() -> Vec<String> {
    vec![ID.to_string()]
}

/// root -> intermediate, as a signer holds them.
pub struct Pki {
    pub root_der: Vec<u8>,
    pub intermediate: CaBundle,
}

pub fn pki() -> Pki {
    let day = Duration::from_secs(86400);
    let (root, intermediate) = crate::test_ca::root_and_intermediate(day, day);
    Pki {
        root_der: root.signing_cert_der().to_vec(),
        intermediate,
    }
}

impl Pki {
    pub fn roots(&self) -> Roots {
        Roots::parse(
            "root.pem",
            pem::encode("CERTIFICATE", &self.root_der).as_bytes(),
        )
        .unwrap()
    }

    /// What a signer writes into status.certificate: leaf + intermediate (+ root).
    pub fn issue(&self, csr_pem: &str, identities: &[String], with_root: bool) -> Vec<u8> {
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
