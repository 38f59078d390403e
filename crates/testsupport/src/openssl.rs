//! Small helpers around the `openssl` CLI, for making test keys, CSRs and
//! certificates.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// Runs `openssl ARGS` in `dir` and returns its stdout.
pub fn run(dir: &Path, args: &[&str]) -> Result<Vec<u8>> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .context("running the openssl CLI (is it installed?)")?;
    if !out.status.success() {
        bail!(
            "openssl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out.stdout)
}

/// A PKCS#10 CSR (PEM) for a fresh P-256 key with subject `subject`
/// (e.g. `/CN=foo/O=bar`); the key goes to `dir/<name>.key`.
pub fn csr_pem(dir: &Path, name: &str, subject: &str) -> Result<String> {
    let key = format!("{name}.key");
    let csr = format!("{name}.csr");
    run(
        dir,
        &[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &key,
            "-subj",
            subject,
            "-out",
            &csr,
        ],
    )?;
    Ok(std::fs::read_to_string(dir.join(csr))?)
}

/// A self-signed P-256 certificate valid for `days`, with subject `subject`;
/// returns the paths of `dir/<name>.crt` and `dir/<name>.key`.
pub fn self_signed(dir: &Path, name: &str, subject: &str, days: u32) -> Result<(PathBuf, PathBuf)> {
    let key = format!("{name}.key");
    let crt = format!("{name}.crt");
    run(
        dir,
        &[
            "req",
            "-x509",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &key,
            "-subj",
            subject,
            "-days",
            &days.to_string(),
            "-out",
            &crt,
        ],
    )?;
    Ok((dir.join(crt), dir.join(key)))
}
