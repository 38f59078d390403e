//! `meshca ca init` and `meshca ca sign`.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Subcommand;
use meshca_ca_store::dir as cadir;
use meshca_pki::{CertOptions, CsrPolicy, KeyType, LocalCa, WorkloadProfile};
use time::OffsetDateTime;

use crate::commands::common::Pkcs11Args;
use crate::input::read_input;

#[derive(Subcommand)]
pub enum CaCommand {
    /// Create a self-signed root CA (or an intermediate) in Istio's cacerts layout.
    Init(InitArgs),
    /// Sign a CSR as an Istio workload certificate for the given identities.
    Sign(SignArgs),
}

#[derive(clap::Args)]
pub struct InitArgs {
    /// Directory to write ca-cert.pem, ca-key.pem, cert-chain.pem and root-cert.pem into.
    #[arg(long)]
    pub out: PathBuf,
    /// Key type of the new CA.
    #[arg(long, default_value = "rsa-2048")]
    pub key_type: KeyType,
    /// Organization (O=) of the CA subject; Istio uses the trust domain.
    #[arg(long, default_value = "cluster.local")]
    pub org: String,
    /// Lifetime, e.g. 87600h or 10years.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10years")]
    pub ttl: Duration,
    /// Make an intermediate signed by the CA in this cacerts directory.
    #[arg(long)]
    pub intermediate_of: Option<PathBuf>,
    /// Overwrite existing files.
    #[arg(long)]
    pub force: bool,
    /// Generate the CA key inside the PKCS#11 token this URI names
    /// (`pkcs11:token=...;object=...`), sensitive and non-extractable;
    /// ca-key.pem then holds the URI instead of a key.
    #[arg(long, value_name = "URI")]
    pub pkcs11: Option<String>,
    #[command(flatten)]
    pub pkcs11_args: Pkcs11Args,
}

#[derive(clap::Args)]
pub struct SignArgs {
    /// The CA's cacerts directory (ca-cert.pem, ...) or tls.crt/tls.key/ca.crt directory.
    #[arg(long)]
    pub ca: PathBuf,
    /// The CSR, PEM; `-` reads standard input.
    #[arg(long)]
    pub csr: PathBuf,
    /// An identity to certify (becomes a SAN): spiffe://..., a DNS name or an IP. Repeatable.
    #[arg(long = "identity", required = true)]
    pub identities: Vec<String>,
    /// Requested lifetime; without it Istio's default of 24h applies.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub ttl: Option<Duration>,
    /// Longest lifetime granted; longer requests are refused (Istio's MAX_WORKLOAD_CERT_TTL).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "90days")]
    pub max_ttl: Duration,
    #[command(flatten)]
    pub pkcs11_args: Pkcs11Args,
}

pub fn init(args: &InitArgs) -> Result<ExitCode> {
    args.pkcs11_args.apply();
    let issuer = match &args.intermediate_of {
        Some(dir) => Some(
            cadir::load(dir, OffsetDateTime::now_utc())
                .with_context(|| format!("loading the issuing CA from {}", dir.display()))?,
        ),
        None => None,
    };
    let spec = cadir::NewCa {
        key_type: args.key_type,
        org: &args.org,
        ttl: args.ttl,
        issuer: issuer.as_ref(),
        pkcs11: args.pkcs11.as_deref(),
    };
    let (bundle, written) = cadir::create(&args.out, &spec, args.force)?;
    let kind = if issuer.is_some() {
        "intermediate"
    } else {
        "root"
    };
    println!(
        "created {kind} CA ({}, O={}), valid until {}",
        bundle.key().describe(),
        args.org,
        bundle.not_after()
    );
    for path in written {
        println!("  {}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}

pub fn sign(args: &SignArgs) -> Result<ExitCode> {
    args.pkcs11_args.apply();
    let bundle = cadir::load(&args.ca, OffsetDateTime::now_utc())?;
    let csr = read_input(&args.csr)?;
    let workload = WorkloadProfile {
        max_ttl: args.max_ttl,
        ..WorkloadProfile::default()
    };
    let ca = LocalCa::new(Arc::new(bundle), CsrPolicy::default(), workload);
    let ttl_seconds = args
        .ttl
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    let options = CertOptions {
        subject_ids: &args.identities,
        ttl_seconds,
        for_ca: false,
    };
    let chain = ca
        .sign_with_cert_chain(&csr, &options)
        .map_err(|e| anyhow::anyhow!("{} [{}]", e, e.reason()))?;
    // Only a complete result reaches stdout.
    let mut out = std::io::stdout().lock();
    out.write_all(chain.concat().as_bytes())?;
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}
