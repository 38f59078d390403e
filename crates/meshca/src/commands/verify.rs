//! `meshca verify`: the seed's manual check (compare the proxy's trusted CA
//! with the root, and check the workload chain), automated.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use base64::Engine;
use meshca_pki::Source;
use meshca_pki::bundle::certificates;
use rustls_pki_types::UnixTime;
use serde_json::Value;

use super::inspect::fingerprint;
use crate::input::read_input;

#[derive(clap::Args)]
pub struct VerifyArgs {
    /// The root certificate(s) the workload must trust and chain to.
    #[arg(long)]
    pub root: PathBuf,
    /// A PEM chain, leaf first.
    #[arg(
        long,
        conflicts_with = "proxy_secret",
        required_unless_present = "proxy_secret"
    )]
    pub chain: Option<PathBuf>,
    /// The JSON that `istioctl proxy-config secret <pod> -o json` prints.
    #[arg(long)]
    pub proxy_secret: Option<PathBuf>,
}

pub fn run(args: &VerifyArgs) -> Result<ExitCode> {
    let root_bytes = read_input(&args.root)?;
    let root_name = args.root.display().to_string();
    let roots = certificates(Source {
        name: &root_name,
        bytes: &root_bytes,
    })?;
    if roots.is_empty() {
        bail!("{root_name}: contains no certificate");
    }

    let mut problems = Vec::new();
    let chain = if let Some(path) = &args.proxy_secret {
        let json: Value = serde_json::from_slice(&read_input(path)?)
            .with_context(|| format!("{}: not JSON", path.display()))?;
        let secret = ProxySecret::find(&json).with_context(|| format!("{}", path.display()))?;
        let name = format!("{} (ROOTCA trustedCa)", path.display());
        let trusted = certificates(Source {
            name: &name,
            bytes: &secret.trusted_ca,
        })?;
        problems.extend(compare_roots(&roots, &trusted));
        let name = format!("{} (default certificateChain)", path.display());
        certificates(Source {
            name: &name,
            bytes: &secret.cert_chain,
        })?
    } else {
        let path = args
            .chain
            .as_ref()
            .context("--chain or --proxy-secret is required")?;
        let name = path.display().to_string();
        certificates(Source {
            name: &name,
            bytes: &read_input(path)?,
        })?
    };

    match verify_chain(&chain, &roots) {
        Ok(summary) => println!("chain: {summary}"),
        Err(e) => problems.push(format!(
            "the workload chain does not verify to {root_name}: {e}"
        )),
    }
    if problems.is_empty() {
        println!("OK: the workload trusts exactly the given root and its chain verifies to it");
        Ok(ExitCode::SUCCESS)
    } else {
        for p in &problems {
            println!("FAIL: {p}");
        }
        Ok(ExitCode::FAILURE)
    }
}

/// The two secrets of an Envoy secrets config dump that matter here.
struct ProxySecret {
    trusted_ca: Vec<u8>,
    cert_chain: Vec<u8>,
}

impl ProxySecret {
    /// Finds the `ROOTCA` and `default` secrets anywhere in the dump, so both
    /// istioctl's output and a raw `/config_dump` section work.
    fn find(json: &Value) -> Result<Self> {
        let mut trusted_ca = None;
        let mut cert_chain = None;
        walk(json, &mut |obj| {
            let name = obj.get("name").and_then(Value::as_str);
            let inline = |path: &[&str]| {
                path.iter()
                    .try_fold(obj, |v, key| v.get(*key))
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            };
            match name {
                Some("ROOTCA") => {
                    if let Some(b) = inline(&["validationContext", "trustedCa", "inlineBytes"]) {
                        trusted_ca = Some(b);
                    }
                }
                Some("default") => {
                    if let Some(b) = inline(&["tlsCertificate", "certificateChain", "inlineBytes"])
                    {
                        cert_chain = Some(b);
                    }
                }
                _ => {}
            }
        });
        let decode = |what: &str, b64: Option<String>| -> Result<Vec<u8>> {
            let b64 = b64.with_context(|| format!("no {what} found"))?;
            base64::engine::general_purpose::STANDARD
                .decode(b64.trim())
                .with_context(|| format!("{what} is not base64"))
        };
        Ok(ProxySecret {
            trusted_ca: decode(
                "ROOTCA secret with validationContext.trustedCa.inlineBytes",
                trusted_ca,
            )?,
            cert_chain: decode(
                "default secret with tlsCertificate.certificateChain.inlineBytes",
                cert_chain,
            )?,
        })
    }
}

fn walk(value: &Value, visit: &mut dyn FnMut(&Value)) {
    match value {
        Value::Object(map) => {
            visit(value);
            map.values().for_each(|v| walk(v, visit));
        }
        Value::Array(items) => items.iter().for_each(|v| walk(v, visit)),
        _ => {}
    }
}

/// What differs between the expected roots and the proxy's trusted CAs.
fn compare_roots(expected: &[Vec<u8>], trusted: &[Vec<u8>]) -> Vec<String> {
    let mut problems = Vec::new();
    for root in expected.iter().filter(|r| !trusted.contains(r)) {
        problems.push(format!(
            "the proxy does not trust the root with SHA-256 {}",
            fingerprint(root)
        ));
    }
    for extra in trusted.iter().filter(|t| !expected.contains(t)) {
        problems.push(format!(
            "the proxy trusts a CA that is not the given root: SHA-256 {}",
            fingerprint(extra)
        ));
    }
    problems
}

/// Verifies leaf -> intermediates -> one of `roots` at the current time.
fn verify_chain(chain: &[Vec<u8>], roots: &[Vec<u8>]) -> Result<String> {
    let (leaf, rest) = chain.split_first().context("the chain is empty")?;
    // A root at the end of the chain is harmless: unused certificates are ignored.
    meshca_pki::chain::verify_chain(leaf, rest, roots, UnixTime::now())
        .map_err(anyhow::Error::msg)?;
    let (_, parsed) =
        x509_parser::parse_x509_certificate(leaf).map_err(|e| anyhow::anyhow!("leaf: {e}"))?;
    let sans: Vec<String> = parsed
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|s| {
            s.value
                .general_names
                .iter()
                .map(|n| n.to_string())
                .collect()
        })
        .unwrap_or_default();
    Ok(format!(
        "{} certificate(s), leaf {} valid until {}",
        chain.len(),
        if sans.is_empty() {
            "(no SANs)".to_owned()
        } else {
            sans.join(", ")
        },
        parsed.validity().not_after
    ))
}
