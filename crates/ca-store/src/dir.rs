//! CA material on disk: Istio's `cacerts` layout (or `tls.crt`/`tls.key`/`ca.crt`),
//! read and written (keys 0600 from the first byte).

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use meshca_pki::{CaBundle, Source};
use time::OffsetDateTime;

use crate::material::{Material, Part};

pub const CA_CERT: &str = "ca-cert.pem";
pub const CA_KEY: &str = "ca-key.pem";
pub const CERT_CHAIN: &str = "cert-chain.pem";
pub const ROOT_CERT: &str = "root-cert.pem";
const TLS_CERT: &str = "tls.crt";
const TLS_KEY: &str = "tls.key";
const TLS_CA: &str = "ca.crt";

/// The files whose change means the CA must be reloaded.
pub const WATCHED: [&str; 7] = [
    CA_CERT, CA_KEY, CERT_CHAIN, ROOT_CERT, TLS_CERT, TLS_KEY, TLS_CA,
];

/// Whether `dir` holds CA material in either layout.
pub fn has_ca(dir: &Path) -> bool {
    dir.join(CA_CERT).exists() || dir.join(TLS_CERT).exists()
}

/// Loads and verifies the CA in `dir`. Errors name the file at fault.
pub fn load(dir: &Path, now: OffsetDateTime) -> Result<CaBundle> {
    let read = |name: &str| -> Result<Option<Part>> {
        let path = dir.join(name);
        match fs::read(&path) {
            Ok(bytes) => Ok(Some(Part::new(path.display().to_string(), bytes))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    };
    let require = |name: &str, layout: &str| -> Result<Part> {
        read(name)?.with_context(|| format!("{}: missing ({layout})", dir.join(name).display()))
    };

    if let Some(cert) = read(CA_CERT)? {
        let layout =
            "the cacerts layout needs ca-cert.pem, ca-key.pem, cert-chain.pem and root-cert.pem";
        return Material {
            cert,
            key: require(CA_KEY, layout)?,
            chain: Some(require(CERT_CHAIN, layout)?),
            roots: Some(require(ROOT_CERT, layout)?),
        }
        .load(now);
    }
    if let Some(cert) = read(TLS_CERT)? {
        return Material {
            cert,
            key: require(TLS_KEY, "tls.crt needs tls.key beside it")?,
            chain: None,
            roots: read(TLS_CA)?,
        }
        .load(now);
    }
    bail!(
        "{}: no CA found (expected {CA_CERT}, {CA_KEY}, {CERT_CHAIN}, {ROOT_CERT} or {TLS_CERT}, {TLS_KEY}[, {TLS_CA}])",
        dir.display()
    )
}

/// A fingerprint of the CA files' metadata, to notice changes by polling.
pub fn fingerprint(dir: &Path) -> Vec<(String, Option<(std::time::SystemTime, u64)>)> {
    WATCHED
        .iter()
        .map(|name| {
            let meta = fs::metadata(dir.join(name)).ok();
            let stamp = meta.and_then(|m| Some((m.modified().ok()?, m.len())));
            ((*name).to_owned(), stamp)
        })
        .collect()
}

/// A file to write: name, contents, whether it holds a private key.
pub struct OutFile<'a> {
    pub name: &'a str,
    pub contents: &'a [u8],
    pub secret: bool,
}

/// Writes the files, refusing to overwrite any without `force`, all or
/// nothing: each is written and synced under a temporary name first, and
/// only when all of them are on disk are they renamed into place, so a full
/// disk or a read-only directory leaves no half-written CA (a certificate
/// without its key) behind. The renames go in reverse order: the first file
/// (`ca-cert.pem`, whose presence [`has_ca`] takes as "a CA is here") appears
/// last. Key files are created with mode 0600 from the start (and others
/// 0644), the mode set on the open handle before writing, so a key is never
/// readable by others, not even for a moment.
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
    let mut staged = Vec::with_capacity(files.len());
    let written = files
        .iter()
        .try_for_each(|file| write_temp(dir, file, &mut staged))
        .and_then(|()| {
            let mut written = Vec::with_capacity(files.len());
            for (file, tmp) in files.iter().zip(&staged).rev() {
                let path = dir.join(file.name);
                fs::rename(tmp, &path)
                    .with_context(|| format!("renaming into {}", path.display()))?;
                written.push(path);
            }
            written.reverse();
            Ok(written)
        });
    if written.is_err() {
        for tmp in &staged {
            let _ = fs::remove_file(tmp);
        }
    }
    let written = written?;
    // The renames themselves survive a crash only once the directory is synced.
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing {}", dir.display()))?;
    Ok(written)
}

/// Replaces one public file (0644) as [`write_all`] does: readers see the
/// old contents or the new, never a part.
pub fn replace_public(path: &Path, contents: &[u8]) -> Result<()> {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name().and_then(|n| n.to_str())) else {
        bail!("{}: not a file path", path.display())
    };
    let file = OutFile {
        name,
        contents,
        secret: false,
    };
    write_all(dir, &[file], true).map(drop)
}

/// Writes `file` under a temporary name in `dir` and syncs it; the name goes
/// into `staged` before the first byte, so a failed write is cleaned up too.
fn write_temp(dir: &Path, file: &OutFile<'_>, staged: &mut Vec<PathBuf>) -> Result<()> {
    let tmp = dir.join(format!(".{}.tmp", file.name));
    let mode = if file.secret { 0o600 } else { 0o644 };
    let _ = fs::remove_file(&tmp);
    let mut out = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    staged.push(tmp.clone());
    // The umask may have narrowed the mode (never widened it): set it
    // on the open handle, before a byte is written, so no path lookup
    // can reach another file and the contents never sit under another mode.
    out.set_permissions(fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", tmp.display()))?;
    out.write_all(file.contents)
        .and_then(|()| out.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))
}

/// What `create` makes.
pub struct NewCa<'a> {
    pub key_type: meshca_pki::KeyType,
    /// O= of the subject (Istio uses the trust domain).
    pub org: &'a str,
    pub ttl: std::time::Duration,
    /// Sign with this CA (an intermediate) instead of self-signing (a root).
    pub issuer: Option<&'a CaBundle>,
    /// Generate the key inside the token this `pkcs11:` URI names (sensitive,
    /// non-extractable); the key file then holds the URI, not a key.
    pub pkcs11: Option<&'a str>,
}

/// Creates a CA in the cacerts layout: a root shaped like Istio's
/// self-signed CA (`O=<org>`, no CN, empty cert-chain.pem) or an intermediate
/// (cert-chain.pem = its certificate, its issuers and the root, as Istio's
/// plug-in CA tooling writes it). Returns the verified bundle.
pub fn create(dir: &Path, spec: &NewCa<'_>, force: bool) -> Result<(CaBundle, Vec<PathBuf>)> {
    use meshca_pki::profile::{CaCertRequest, intermediate_ca, self_signed_root};
    use meshca_pki::{SigningKey, bundle::certificates, cert, pem};

    let now = OffsetDateTime::now_utc();
    let (key, key_pem) = match spec.pkcs11 {
        None => {
            let key = SigningKey::generate(spec.key_type)?;
            let pem = key.to_pkcs8_pem()?;
            (key, pem)
        }
        Some(uri) => {
            if !force && dir.join(CA_KEY).exists() {
                bail!(
                    "refusing to overwrite {} (use --force)",
                    dir.join(CA_KEY).display()
                );
            }
            let key = meshca_hsm::generate_key(uri, spec.key_type)
                .map_err(|e| anyhow::anyhow!("generating the CA key in the token: {e}"))?;
            (key, zeroize::Zeroizing::new(format!("{}\n", uri.trim())))
        }
    };
    let (cert_der, chain_pem, roots_pem, chain_der, roots_der) = match spec.issuer {
        None => {
            let subject = cert::organization_name(spec.org);
            let request = CaCertRequest {
                subject_der: &subject,
                key: &key,
                ttl: spec.ttl,
            };
            let der = self_signed_root(&request, now)?;
            let roots = pem::encode("CERTIFICATE", &der);
            (der.clone(), String::new(), roots, vec![], vec![der])
        }
        Some(issuer) => {
            // A distinct CN keeps the intermediate's name apart from a root with the same O=.
            let subject = cert::organization_and_common_name(spec.org, "Intermediate CA");
            let request = CaCertRequest {
                subject_der: &subject,
                key: &key,
                ttl: spec.ttl,
            };
            let der = intermediate_ca(&request, issuer, now)?;
            let chain = format!(
                "{}{}{}",
                pem::encode("CERTIFICATE", &der),
                issuer.cert_chain_pem(),
                issuer.roots_pem()
            );
            let issuer_chain = issuer.cert_chain_pem();
            let mut chain_der = certificates(Source {
                name: "issuer chain",
                bytes: issuer_chain.as_bytes(),
            })?;
            if chain_der.is_empty() {
                chain_der.push(issuer.signing_cert_der().to_vec());
            }
            (
                der,
                chain,
                issuer.roots_pem().to_owned(),
                chain_der,
                issuer.roots_der().to_vec(),
            )
        }
    };
    let cert_pem = pem::encode("CERTIFICATE", &cert_der);
    // Verify before writing anything.
    let bundle = CaBundle::from_parts(key, cert_der, chain_der, roots_der, now)?;
    let written = write_all(
        dir,
        &[
            OutFile {
                name: CA_CERT,
                contents: cert_pem.as_bytes(),
                secret: false,
            },
            OutFile {
                name: CA_KEY,
                contents: key_pem.as_bytes(),
                secret: true,
            },
            OutFile {
                name: CERT_CHAIN,
                contents: chain_pem.as_bytes(),
                secret: false,
            },
            OutFile {
                name: ROOT_CERT,
                contents: roots_pem.as_bytes(),
                secret: false,
            },
        ],
        force,
    )?;
    Ok((bundle, written))
}
