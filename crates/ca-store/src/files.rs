//! A CA in separate files, as signer-ca's `--ca-cert-path`/`--ca-key-path`.

use std::path::Path;

use anyhow::{Context, Result};
use meshca_pki::CaBundle;
use time::OffsetDateTime;

use crate::material::{Material, Part};

fn read(path: &Path) -> Result<Part> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(Part::new(path.display().to_string(), bytes))
}

/// Loads a CA from its certificate (intermediates may follow), its key
/// and optionally its roots.
pub fn load(
    cert: &Path,
    key: &Path,
    roots: Option<&Path>,
    now: OffsetDateTime,
) -> Result<CaBundle> {
    Material {
        cert: read(cert)?,
        key: read(key)?,
        chain: None,
        roots: roots.map(read).transpose()?,
    }
    .load(now)
}

/// A change marker for polling: each file's modification time and size.
pub type Stamp = Option<(std::time::SystemTime, u64)>;

pub fn stamps(paths: &[&Path]) -> Vec<Stamp> {
    paths
        .iter()
        .map(|p| {
            let m = std::fs::metadata(p).ok()?;
            Some((m.modified().ok()?, m.len()))
        })
        .collect()
}
