//! `meshca inspect`: what is in a certificate, chain or CSR.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Result, bail};
use meshca_pki::pem;
use serde::Serialize;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use x509_parser::certificate::X509Certificate;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;
use x509_parser::x509::SubjectPublicKeyInfo;

use crate::input::read_input;

#[derive(clap::Args)]
pub struct InspectArgs {
    /// A PEM (or DER) certificate, chain or CSR; `-` reads standard input.
    pub file: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Item {
    Certificate(CertInfo),
    CertificateRequest(CsrInfo),
}

#[derive(Serialize)]
struct CertInfo {
    subject: String,
    issuer: String,
    serial: String,
    sans: Vec<String>,
    spiffe_ids: Vec<String>,
    key: String,
    not_before: String,
    not_after: String,
    /// Seconds until NotAfter; negative once expired.
    seconds_left: i64,
    expired: bool,
    is_ca: bool,
    path_len: Option<u32>,
    key_usage: Vec<String>,
    ext_key_usage: Vec<String>,
    self_signed: bool,
    sha256_fingerprint: String,
}

#[derive(Serialize)]
struct CsrInfo {
    subject: String,
    sans: Vec<String>,
    spiffe_ids: Vec<String>,
    key: String,
    signature_algorithm: String,
    sha256_fingerprint: String,
}

pub fn run(args: &InspectArgs) -> Result<ExitCode> {
    let input = read_input(&args.file)?;
    let items = parse_items(&input)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&items)?);
    } else {
        let mut text = String::new();
        for (i, item) in items.iter().enumerate() {
            if i > 0 {
                text.push('\n');
            }
            print_text(&mut text, i, item)?;
        }
        // A closed pipe (`| head`) is not an error worth a panic.
        let _ = std::io::Write::write_all(&mut std::io::stdout().lock(), text.as_bytes());
    }
    Ok(ExitCode::SUCCESS)
}

fn parse_items(input: &[u8]) -> Result<Vec<Item>> {
    let now = OffsetDateTime::now_utc();
    let blocks: Vec<(String, Vec<u8>)> = match pem::parse_all(input) {
        Ok(blocks) => blocks
            .into_iter()
            .map(|b| (b.label, b.der.to_vec()))
            .collect(),
        // Not PEM: try the bytes as one DER object.
        Err(_) => vec![(String::new(), input.to_vec())],
    };
    let mut items = Vec::new();
    for (i, (label, der)) in blocks.iter().enumerate() {
        let n = i + 1;
        let item = match label.as_str() {
            "CERTIFICATE" => Item::Certificate(
                cert_info(der, now).map_err(|e| anyhow::anyhow!("block #{n}: {e}"))?,
            ),
            "CERTIFICATE REQUEST" | "NEW CERTIFICATE REQUEST" => Item::CertificateRequest(
                csr_info(der).map_err(|e| anyhow::anyhow!("block #{n}: {e}"))?,
            ),
            "" => match cert_info(der, now) {
                Ok(c) => Item::Certificate(c),
                Err(_) => match csr_info(der) {
                    Ok(c) => Item::CertificateRequest(c),
                    Err(_) => bail!("input is neither PEM nor a DER certificate or CSR"),
                },
            },
            // Keys and anything else are skipped, never printed.
            _ => continue,
        };
        items.push(item);
    }
    if items.is_empty() {
        bail!("no certificate or certificate request found");
    }
    Ok(items)
}

fn cert_info(der: &[u8], now: OffsetDateTime) -> Result<CertInfo> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| anyhow::anyhow!("not a certificate: {e}"))?;
    let mut sans = Vec::new();
    let mut key_usage = Vec::new();
    let mut ext_key_usage = Vec::new();
    let mut path_len = None;
    for ext in cert.extensions() {
        match ext.parsed_extension() {
            ParsedExtension::SubjectAlternativeName(san) => {
                sans.extend(san.general_names.iter().map(general_name))
            }
            ParsedExtension::KeyUsage(ku) => {
                key_usage = ku.to_string().split(", ").map(str::to_owned).collect()
            }
            ParsedExtension::ExtendedKeyUsage(eku) => {
                let named = [
                    (eku.any, "any"),
                    (eku.server_auth, "serverAuth"),
                    (eku.client_auth, "clientAuth"),
                    (eku.code_signing, "codeSigning"),
                    (eku.email_protection, "emailProtection"),
                    (eku.time_stamping, "timeStamping"),
                    (eku.ocsp_signing, "OCSPSigning"),
                ];
                ext_key_usage = named
                    .iter()
                    .filter(|(on, _)| *on)
                    .map(|(_, n)| (*n).to_owned())
                    .collect();
                ext_key_usage.extend(eku.other.iter().map(|o| o.to_id_string()));
            }
            ParsedExtension::BasicConstraints(bc) => path_len = bc.path_len_constraint,
            _ => {}
        }
    }
    let not_after = cert.validity().not_after.to_datetime();
    let seconds_left = (not_after - now).whole_seconds();
    Ok(CertInfo {
        subject: cert.subject().to_string(),
        issuer: cert.issuer().to_string(),
        serial: cert.raw_serial_as_string(),
        spiffe_ids: spiffe_ids(&sans),
        sans,
        key: describe_key(cert.public_key()),
        not_before: cert.validity().not_before.to_string(),
        not_after: cert.validity().not_after.to_string(),
        seconds_left,
        expired: seconds_left < 0,
        is_ca: cert.is_ca(),
        path_len,
        key_usage,
        ext_key_usage,
        self_signed: cert.subject().as_raw() == cert.issuer().as_raw()
            && cert.verify_signature(None).is_ok(),
        sha256_fingerprint: fingerprint(der),
    })
}

fn csr_info(der: &[u8]) -> Result<CsrInfo> {
    let (_, csr) =
        X509CertificationRequest::from_der(der).map_err(|e| anyhow::anyhow!("not a CSR: {e}"))?;
    let mut sans = Vec::new();
    if let Some(exts) = csr.requested_extensions() {
        for ext in exts {
            if let ParsedExtension::SubjectAlternativeName(san) = ext {
                sans.extend(san.general_names.iter().map(general_name));
            }
        }
    }
    Ok(CsrInfo {
        subject: csr.certification_request_info.subject.to_string(),
        spiffe_ids: spiffe_ids(&sans),
        sans,
        key: describe_key(&csr.certification_request_info.subject_pki),
        signature_algorithm: x509_parser::objects::oid2sn(
            &csr.signature_algorithm.algorithm,
            x509_parser::objects::oid_registry(),
        )
        .map_or_else(
            |_| csr.signature_algorithm.algorithm.to_id_string(),
            str::to_owned,
        ),
        sha256_fingerprint: fingerprint(der),
    })
}

fn general_name(name: &GeneralName<'_>) -> String {
    match name {
        GeneralName::URI(u) => format!("URI:{u}"),
        GeneralName::DNSName(d) => format!("DNS:{d}"),
        GeneralName::RFC822Name(e) => format!("email:{e}"),
        GeneralName::IPAddress(b) => match b.len() {
            4 => format!(
                "IP:{}",
                std::net::Ipv4Addr::from(<[u8; 4]>::try_from(*b).unwrap_or_default())
            ),
            16 => format!(
                "IP:{}",
                std::net::Ipv6Addr::from(<[u8; 16]>::try_from(*b).unwrap_or_default())
            ),
            _ => format!("IP:(invalid, {} bytes)", b.len()),
        },
        other => format!("{other}"),
    }
}

fn spiffe_ids(sans: &[String]) -> Vec<String> {
    sans.iter()
        .filter_map(|s| s.strip_prefix("URI:"))
        .filter(|u| u.starts_with("spiffe://"))
        .map(str::to_owned)
        .collect()
}

fn describe_key(spki: &SubjectPublicKeyInfo<'_>) -> String {
    use x509_parser::oid_registry as oids;
    let alg = &spki.algorithm.algorithm;
    if *alg == oids::OID_SIG_ED25519 {
        return "Ed25519".into();
    }
    match spki.parsed() {
        Ok(PublicKey::RSA(rsa)) => format!("RSA {}", rsa.key_size()),
        Ok(PublicKey::EC(_)) => {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok());
            match curve {
                Some(c) if c == oids::OID_EC_P256 => "ECDSA P-256".into(),
                Some(c) if c == oids::OID_NIST_EC_P384 => "ECDSA P-384".into(),
                Some(c) if c == oids::OID_NIST_EC_P521 => "ECDSA P-521".into(),
                Some(c) => format!("ECDSA {}", c.to_id_string()),
                None => "ECDSA (unknown curve)".into(),
            }
        }
        _ => format!("unknown ({})", alg.to_id_string()),
    }
}

pub fn fingerprint(der: &[u8]) -> String {
    let digest = Sha256::digest(der);
    digest
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn print_text(out: &mut String, index: usize, item: &Item) -> std::fmt::Result {
    use std::fmt::Write;
    let list = |v: &[String]| {
        if v.is_empty() {
            "(none)".to_owned()
        } else {
            v.join(", ")
        }
    };
    match item {
        Item::Certificate(c) => {
            let role = if c.self_signed {
                "root"
            } else if c.is_ca {
                "CA"
            } else if index == 0 {
                "leaf"
            } else {
                "certificate"
            };
            writeln!(out, "Certificate #{} ({role})", index + 1)?;
            writeln!(
                out,
                "  Subject:      {}",
                if c.subject.is_empty() {
                    "(empty)"
                } else {
                    &c.subject
                }
            )?;
            writeln!(out, "  Issuer:       {}", c.issuer)?;
            writeln!(out, "  SANs:         {}", list(&c.sans))?;
            for id in &c.spiffe_ids {
                writeln!(out, "  SPIFFE ID:    {id}")?;
            }
            writeln!(out, "  Key:          {}", c.key)?;
            writeln!(out, "  Not before:   {}", c.not_before)?;
            writeln!(
                out,
                "  Not after:    {} ({})",
                c.not_after,
                time_left(c.seconds_left)
            )?;
            let path_len = c
                .path_len
                .map(|p| format!(", pathlen {p}"))
                .unwrap_or_default();
            writeln!(out, "  CA:           {}{path_len}", c.is_ca)?;
            writeln!(out, "  Key usage:    {}", list(&c.key_usage))?;
            writeln!(out, "  Ext usage:    {}", list(&c.ext_key_usage))?;
            writeln!(out, "  Serial:       {}", c.serial)?;
            writeln!(out, "  SHA-256:      {}", c.sha256_fingerprint)?;
        }
        Item::CertificateRequest(r) => {
            writeln!(out, "Certificate request #{}", index + 1)?;
            writeln!(
                out,
                "  Subject:      {}",
                if r.subject.is_empty() {
                    "(empty)"
                } else {
                    &r.subject
                }
            )?;
            writeln!(out, "  SANs:         {}", list(&r.sans))?;
            for id in &r.spiffe_ids {
                writeln!(out, "  SPIFFE ID:    {id}")?;
            }
            writeln!(out, "  Key:          {}", r.key)?;
            writeln!(out, "  Signature:    {}", r.signature_algorithm)?;
            writeln!(out, "  SHA-256:      {}", r.sha256_fingerprint)?;
        }
    }
    Ok(())
}

fn time_left(seconds: i64) -> String {
    let (sign, s) = if seconds < 0 {
        ("expired ", -seconds)
    } else {
        ("", seconds)
    };
    let text = humantime::format_duration(std::time::Duration::from_secs(s as u64)).to_string();
    // Keep the two largest units: "89days 23h", not down to the second.
    let short: Vec<_> = text.split(' ').take(2).collect();
    if seconds < 0 {
        format!("{sign}{} ago", short.join(" "))
    } else {
        format!("{} left", short.join(" "))
    }
}
