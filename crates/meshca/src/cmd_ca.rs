//! `meshca ca init` and `meshca ca sign`.

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use meshca_pki::{CertOptions, CertificateAuthority, CsrPolicy, LocalCa, WorkloadProfile};
use meshca_server::cadir;
use time::OffsetDateTime;

use crate::cli::{InitArgs, SignArgs, read_input};

pub fn init(args: &InitArgs) -> Result<ExitCode> {
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
