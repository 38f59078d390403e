//! CA material on disk: Istio's `cacerts` layout (or `tls.crt`/`tls.key`/`ca.crt`).

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use meshca_pki::{BundleSources, CaBundle, Source};
use time::OffsetDateTime;
use zeroize::Zeroizing;

pub const CA_CERT: &str = "ca-cert.pem";
pub const CA_KEY: &str = "ca-key.pem";
pub const CERT_CHAIN: &str = "cert-chain.pem";
pub const ROOT_CERT: &str = "root-cert.pem";
const TLS_CERT: &str = "tls.crt";
const TLS_KEY: &str = "tls.key";
const TLS_CA: &str = "ca.crt";

/// Loads and verifies the CA in `dir`. Errors name the file at fault.
pub fn load(dir: &Path, now: OffsetDateTime) -> Result<CaBundle> {
    let read = |name: &str| -> Result<Option<Zeroizing<Vec<u8>>>> {
        let path = dir.join(name);
        match fs::read(&path) {
            Ok(bytes) => Ok(Some(Zeroizing::new(bytes))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    };
    let require = |name: &str, file: Option<Zeroizing<Vec<u8>>>, layout: &str| {
        file.with_context(|| format!("{}: missing ({layout})", dir.join(name).display()))
    };
    let named = |name: &str| dir.join(name).display().to_string();

    if let Some(cert) = read(CA_CERT)? {
        let layout =
            "the cacerts layout needs ca-cert.pem, ca-key.pem, cert-chain.pem and root-cert.pem";
        let key = require(CA_KEY, read(CA_KEY)?, layout)?;
        let chain = require(CERT_CHAIN, read(CERT_CHAIN)?, layout)?;
        let roots = require(ROOT_CERT, read(ROOT_CERT)?, layout)?;
        let names = [
            named(CA_CERT),
            named(CA_KEY),
            named(CERT_CHAIN),
            named(ROOT_CERT),
        ];
        let sources = BundleSources {
            cert: Source {
                name: &names[0],
                bytes: &cert,
            },
            key: Source {
                name: &names[1],
                bytes: &key,
            },
            chain: Some(Source {
                name: &names[2],
                bytes: &chain,
            }),
            roots: Some(Source {
                name: &names[3],
                bytes: &roots,
            }),
        };
        return Ok(CaBundle::load(&sources, now)?);
    }
    if let Some(cert) = read(TLS_CERT)? {
        let key = require(TLS_KEY, read(TLS_KEY)?, "tls.crt needs tls.key beside it")?;
        let roots = read(TLS_CA)?;
        let names = [named(TLS_CERT), named(TLS_KEY), named(TLS_CA)];
        let sources = BundleSources {
            cert: Source {
                name: &names[0],
                bytes: &cert,
            },
            key: Source {
                name: &names[1],
                bytes: &key,
            },
            chain: None,
            roots: roots.as_ref().map(|r| Source {
                name: &names[2],
                bytes: r,
            }),
        };
        return Ok(CaBundle::load(&sources, now)?);
    }
    bail!(
        "{}: no CA found (expected {CA_CERT}, {CA_KEY}, {CERT_CHAIN}, {ROOT_CERT} or {TLS_CERT}, {TLS_KEY}[, {TLS_CA}])",
        dir.display()
    )
}

/// A file to write: name, contents, whether it holds a private key.
pub struct OutFile<'a> {
    pub name: &'a str,
    pub contents: &'a [u8],
    pub secret: bool,
}

/// Writes all files or none of the existing ones: refuses to overwrite
/// without `force`, writes each through a temporary file renamed into place,
/// and creates key files with mode 0600 from the start.
pub fn write_all(dir: &Path, files: &[OutFile<'_>], force: bool) -> Result<Vec<PathBuf>> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    if !force {
        let existing: Vec<_> = files
            .iter()
            .map(|f| dir.join(f.name))
            .filter(|p| p.exists())
            .map(|p| p.display().to_string())
            .collect();
        if !existing.is_empty() {
            bail!(
                "refusing to overwrite {} (use --force)",
                existing.join(", ")
            );
        }
    }
    let mut written = Vec::new();
    for file in files {
        let path = dir.join(file.name);
        let tmp = dir.join(format!(".{}.tmp", file.name));
        let mode = if file.secret { 0o600 } else { 0o644 };
        let _ = fs::remove_file(&tmp);
        let mut out = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        out.write_all(file.contents)
            .and_then(|()| out.sync_all())
            .with_context(|| format!("writing {}", tmp.display()))?;
        // The umask may have narrowed the mode; a key must never be wider.
        fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))?;
        fs::rename(&tmp, &path).with_context(|| format!("renaming into {}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}
