//! The roots RA answers are verified against, read from files (the
//! `external-ca-cert` mount, and per-signer roots) and re-read on change.

use std::collections::BTreeMap;

use meshca_pki::Source;
use meshca_pki::bundle::certificates;

use super::{RaConfig, RaError};

/// The signer's roots, parsed once.
#[derive(Debug, Clone, PartialEq)]
pub struct Roots {
    pub(super) der: Vec<Vec<u8>>,
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
