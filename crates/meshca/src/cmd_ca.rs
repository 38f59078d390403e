//! `meshca ca init` and `meshca ca sign`.

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use meshca_pki::profile::{self, CaCertRequest};
use meshca_pki::{
    CaBundle, CertOptions, CertificateAuthority, CsrPolicy, LocalCa, SigningKey, WorkloadProfile,
    cert, pem,
};
use time::OffsetDateTime;

use crate::cadir::{self, OutFile};
use crate::cli::{InitArgs, SignArgs, read_input};

pub fn init(args: &InitArgs) -> Result<ExitCode> {
    let now = OffsetDateTime::now_utc();
    let key = SigningKey::generate(args.key_type)?;
    let key_pem = key.to_pkcs8_pem()?;

    let (cert_der, chain_pem, roots_pem, bundle) = match &args.intermediate_of {
        None => {
            let subject = cert::organization_name(&args.org);
            let request = CaCertRequest {
                subject_der: &subject,
                key: &key,
                ttl: args.ttl,
            };
            let der = profile::self_signed_root(&request, now)?;
            // Istio's self-signed CA keeps cert-chain.pem empty.
            let roots = pem::encode("CERTIFICATE", &der);
            let bundle = CaBundle::from_parts(key, der.clone(), vec![], vec![der.clone()], now)?;
            (der, String::new(), roots, bundle)
        }
        Some(issuer_dir) => {
            let issuer = cadir::load(issuer_dir, now)
                .with_context(|| format!("loading the issuing CA from {}", issuer_dir.display()))?;
            // A distinct CN keeps the intermediate's name apart from a root with the same O=.
            let subject = cert::organization_and_common_name(&args.org, "Intermediate CA");
            let request = CaCertRequest {
                subject_der: &subject,
                key: &key,
                ttl: args.ttl,
            };
            let der = profile::intermediate_ca(&request, &issuer, now)?;
            // Istio's plugged-in layout: cert-chain.pem is the CA cert, its issuers, and the root.
            let chain = format!(
                "{}{}{}",
                pem::encode("CERTIFICATE", &der),
                issuer.cert_chain_pem(),
                issuer.roots_pem()
            );
            let mut chain_der = vec![issuer.signing_cert_der().to_vec()];
            chain_der.extend(cert_ders(&issuer.cert_chain_pem())?);
            let bundle = CaBundle::from_parts(
                key,
                der.clone(),
                chain_der,
                issuer.roots_der().to_vec(),
                now,
            )?;
            (der, chain, issuer.roots_pem().to_owned(), bundle)
        }
    };

    let cert_pem = pem::encode("CERTIFICATE", &cert_der);
    let written = cadir::write_all(
        &args.out,
        &[
            OutFile {
                name: cadir::CA_CERT,
                contents: cert_pem.as_bytes(),
                secret: false,
            },
            OutFile {
                name: cadir::CA_KEY,
                contents: key_pem.as_bytes(),
                secret: true,
            },
            OutFile {
                name: cadir::CERT_CHAIN,
                contents: chain_pem.as_bytes(),
                secret: false,
            },
            OutFile {
                name: cadir::ROOT_CERT,
                contents: roots_pem.as_bytes(),
                secret: false,
            },
        ],
        args.force,
    )?;
    let kind = if args.intermediate_of.is_some() {
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

fn cert_ders(pem_text: &str) -> Result<Vec<Vec<u8>>> {
    let source = meshca_pki::Source {
        name: "chain",
        bytes: pem_text.as_bytes(),
    };
    Ok(meshca_pki::bundle::certificates(source)?)
}

pub fn sign(args: &SignArgs) -> Result<ExitCode> {
    let now = OffsetDateTime::now_utc();
    let bundle = cadir::load(&args.ca, now)?;
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
