//! The CA's key-cert bundle: signing certificate and key, intermediates, roots.
//!
//! Loading verifies everything an issued certificate depends on, so a bad
//! bundle fails at start with the file and the problem named, never later as
//! certificates that clients reject.

use time::OffsetDateTime;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::ParsedExtension;
use x509_parser::prelude::FromDer;

use crate::cert::{self, Extensions, TbsFields};
use crate::error::BundleError;
use crate::key::SigningKey;
use crate::pem;

/// One input file: its name (for errors) and its bytes.
#[derive(Clone, Copy)]
pub struct Source<'a> {
    pub name: &'a str,
    pub bytes: &'a [u8],
}

/// The files of a bundle. Istio's `cacerts` layout maps to
/// `cert=ca-cert.pem, key=ca-key.pem, chain=cert-chain.pem, roots=root-cert.pem`;
/// the `kubernetes.io/tls` layout to `cert=tls.crt` (which may carry the chain
/// after the signing certificate), `key=tls.key`, `roots=ca.crt` (optional: a
/// self-signed certificate at the end of `tls.crt` is then the root).
pub struct BundleSources<'a> {
    pub cert: Source<'a>,
    pub key: Source<'a>,
    pub chain: Option<Source<'a>>,
    pub roots: Option<Source<'a>>,
}

/// A verified CA bundle, ready to sign.
#[derive(Debug)]
pub struct CaBundle {
    key: SigningKey,
    signing_cert_der: Vec<u8>,
    signing_cert_pem: String,
    subject_der: Vec<u8>,
    key_id: Vec<u8>,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
    /// Certificates between the signing certificate and the root, each PEM.
    intermediates_pem: Vec<String>,
    roots_der: Vec<Vec<u8>>,
    roots_pem: String,
    signing_cert_is_root: bool,
}

impl CaBundle {
    /// Parses and verifies a bundle from its files.
    pub fn load(sources: &BundleSources<'_>, now: OffsetDateTime) -> Result<Self, BundleError> {
        Self::load_inner(sources, None, now)
    }

    /// As [`CaBundle::load`], with a key opened elsewhere (e.g. in an HSM,
    /// named by the key source): verified against the certificate the same way.
    pub fn load_with_key(
        sources: &BundleSources<'_>,
        key: SigningKey,
        now: OffsetDateTime,
    ) -> Result<Self, BundleError> {
        Self::load_inner(sources, Some(key), now)
    }

    fn load_inner(
        sources: &BundleSources<'_>,
        key: Option<SigningKey>,
        now: OffsetDateTime,
    ) -> Result<Self, BundleError> {
        let mut cert_file = certificates(sources.cert)?;
        if cert_file.is_empty() {
            return Err(BundleError::new(
                sources.cert.name,
                "contains no certificate",
            ));
        }
        let signing = cert_file.remove(0);
        let mut chain = cert_file;
        if let Some(chain_source) = sources.chain {
            chain.extend(certificates(chain_source)?);
        }
        let key = match key {
            Some(key) => key,
            None => SigningKey::from_pem(sources.key.bytes)
                .map_err(|e| BundleError::new(sources.key.name, e.to_string()))?,
        };
        let roots = match sources.roots {
            Some(roots_source) => {
                let roots = certificates(roots_source)?;
                if roots.is_empty() {
                    return Err(BundleError::new(
                        roots_source.name,
                        "contains no certificate",
                    ));
                }
                roots
            }
            None => {
                // No roots file: the self-signed certificates we were given are the roots.
                let all = std::iter::once(&signing).chain(&chain);
                let roots: Vec<_> = all.filter(|c| is_self_signed(c)).cloned().collect();
                if roots.is_empty() {
                    return Err(BundleError::new(
                        sources.cert.name,
                        "no root certificate given and none of the certificates is self-signed",
                    ));
                }
                roots
            }
        };
        let names = Names {
            cert: sources.cert.name,
            key: sources.key.name,
            chain: sources.chain.map_or(sources.cert.name, |c| c.name),
            roots: sources.roots.map_or(sources.cert.name, |r| r.name),
        };
        Self::assemble(key, signing, chain, roots, &names, now)
    }

    /// Builds a bundle from parts already in memory (e.g. just generated).
    pub fn from_parts(
        key: SigningKey,
        signing_cert_der: Vec<u8>,
        chain_der: Vec<Vec<u8>>,
        roots_der: Vec<Vec<u8>>,
        now: OffsetDateTime,
    ) -> Result<Self, BundleError> {
        let names = Names {
            cert: "ca-cert.pem",
            key: "ca-key.pem",
            chain: "cert-chain.pem",
            roots: "root-cert.pem",
        };
        Self::assemble(key, signing_cert_der, chain_der, roots_der, &names, now)
    }

    fn assemble(
        key: SigningKey,
        signing_der: Vec<u8>,
        chain: Vec<Vec<u8>>,
        roots: Vec<Vec<u8>>,
        names: &Names<'_>,
        now: OffsetDateTime,
    ) -> Result<Self, BundleError> {
        let signing = parse(&signing_der, names.cert)?;
        if signing.public_key().subject_public_key.data.as_ref() != key.public_key_bits() {
            return Err(BundleError::new(
                names.key,
                format!(
                    "the {} key does not match the certificate in {}",
                    key.describe(),
                    names.cert
                ),
            ));
        }
        check_ca(&signing, names.cert, "signing certificate", now)?;
        for (i, root) in roots.iter().enumerate() {
            parse(root, names.roots).map_err(|e| {
                BundleError::new(
                    names.roots,
                    format!("certificate #{}: {}", i + 1, e.problem),
                )
            })?;
        }

        // Walk from the signing certificate up to one of the roots.
        let mut intermediates: Vec<Vec<u8>> = Vec::new();
        let mut current = signing_der.clone();
        let signing_cert_is_root = roots.contains(&signing_der);
        if !signing_cert_is_root {
            loop {
                let child = parse(&current, names.chain)?;
                if let Some(root) = roots.iter().find(|r| issued_by(&child, r)) {
                    check_ca(
                        &parse(root, names.roots)?,
                        names.roots,
                        "root certificate",
                        now,
                    )?;
                    break;
                }
                if is_self_signed(&current) {
                    return Err(BundleError::new(
                        names.roots,
                        format!(
                            "self-signed certificate {} is not among the roots",
                            child.subject()
                        ),
                    ));
                }
                let issuer = chain
                    .iter()
                    .find(|c| **c != current && !intermediates.contains(c) && **c != signing_der && issued_by(&child, c))
                    .ok_or_else(|| {
                        BundleError::new(
                            names.chain,
                            format!(
                                "the chain does not verify to a root: no issuer found for {} (issuer {})",
                                child.subject(),
                                child.issuer()
                            ),
                        )
                    })?
                    .clone();
                check_ca(
                    &parse(&issuer, names.chain)?,
                    names.chain,
                    "intermediate certificate",
                    now,
                )?;
                if intermediates.len() >= 8 {
                    return Err(BundleError::new(
                        names.chain,
                        "chain is longer than 8 intermediates",
                    ));
                }
                intermediates.push(issuer.clone());
                current = issuer;
            }
        }

        let key_id = subject_key_id(&signing)
            .unwrap_or_else(|| cert::key_identifier(&signing.public_key().subject_public_key.data));
        let bundle = CaBundle {
            signing_cert_pem: pem::encode("CERTIFICATE", &signing_der),
            subject_der: signing.subject().as_raw().to_vec(),
            not_before: signing.validity().not_before.to_datetime(),
            not_after: signing.validity().not_after.to_datetime(),
            key_id,
            intermediates_pem: intermediates
                .iter()
                .map(|c| pem::encode("CERTIFICATE", c))
                .collect(),
            roots_pem: roots
                .iter()
                .map(|c| pem::encode("CERTIFICATE", c))
                .collect(),
            roots_der: roots,
            signing_cert_is_root,
            signing_cert_der: signing_der.clone(),
            key,
        };
        bundle.self_test(names)?;
        Ok(bundle)
    }

    /// Issues a throwaway certificate and checks that it names the CA's
    /// subject byte for byte and verifies under the CA's key: catches what
    /// the field checks cannot (an encoding the signer would get wrong).
    fn self_test(&self, names: &Names<'_>) -> Result<(), BundleError> {
        let fail =
            |problem: String| BundleError::new(names.cert, format!("self-test failed: {problem}"));
        let mut extensions = Extensions::default();
        extensions
            .basic_constraints(false)
            .authority_key_id(&self.key_id);
        let probe = cert::sign_certificate(
            &self.key,
            &TbsFields {
                serial: &[1],
                issuer_der: &self.subject_der,
                not_before: self.not_before,
                not_after: self.not_after,
                subject_der: cert::EMPTY_NAME,
                spki_der: &self.key.spki_der(),
                extensions,
            },
        )
        .map_err(|e| fail(e.to_string()))?;
        let probe = parse(&probe, names.cert)?;
        let signing = parse(&self.signing_cert_der, names.cert)?;
        if probe.issuer().as_raw() != self.subject_der.as_slice() {
            return Err(fail("issuer bytes differ from the CA subject".into()));
        }
        probe
            .verify_signature(Some(signing.public_key()))
            .map_err(|e| fail(format!("signature does not verify: {e}")))
    }

    pub fn key(&self) -> &SigningKey {
        &self.key
    }
    pub fn subject_der(&self) -> &[u8] {
        &self.subject_der
    }
    pub fn key_id(&self) -> &[u8] {
        &self.key_id
    }
    pub fn not_before(&self) -> OffsetDateTime {
        self.not_before
    }
    pub fn not_after(&self) -> OffsetDateTime {
        self.not_after
    }
    pub fn signing_cert_der(&self) -> &[u8] {
        &self.signing_cert_der
    }
    pub fn signing_cert_pem(&self) -> &str {
        &self.signing_cert_pem
    }
    pub fn roots_der(&self) -> &[Vec<u8>] {
        &self.roots_der
    }
    /// All roots, concatenated PEM (Istio's `root-cert.pem`).
    pub fn roots_pem(&self) -> &str {
        &self.roots_pem
    }
    /// The earliest expiry among the roots.
    pub fn roots_not_after(&self) -> Option<OffsetDateTime> {
        self.roots_der
            .iter()
            .filter_map(|r| X509Certificate::from_der(r).ok())
            .map(|(_, c)| c.validity().not_after.to_datetime())
            .min()
    }

    /// What follows a leaf in an Istio response: the signing certificate
    /// (unless it is the root), each intermediate as its own element, and
    /// all roots in the last element.
    pub fn chain_after_leaf(&self) -> Vec<String> {
        let mut out = Vec::with_capacity(self.intermediates_pem.len() + 2);
        if !self.signing_cert_is_root {
            out.push(self.signing_cert_pem.clone());
        }
        out.extend(self.intermediates_pem.iter().cloned());
        out.push(self.roots_pem.clone());
        out
    }

    /// Istio's `cert-chain.pem`: the signing certificate and the
    /// intermediates, without the roots (empty for a self-signed CA).
    pub fn cert_chain_pem(&self) -> String {
        if self.signing_cert_is_root {
            return String::new();
        }
        std::iter::once(&self.signing_cert_pem)
            .chain(&self.intermediates_pem)
            .cloned()
            .collect()
    }
}

struct Names<'a> {
    cert: &'a str,
    key: &'a str,
    chain: &'a str,
    roots: &'a str,
}

/// The certificates in a PEM file, in order; an empty or whitespace-only
/// file has none. Any block that is not a certificate is an error.
pub fn certificates(source: Source<'_>) -> Result<Vec<Vec<u8>>, BundleError> {
    if source.bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(Vec::new());
    }
    let blocks =
        pem::parse_all(source.bytes).map_err(|e| BundleError::new(source.name, e.to_string()))?;
    blocks
        .into_iter()
        .enumerate()
        .map(|(i, block)| {
            if block.label != "CERTIFICATE" {
                return Err(BundleError::new(
                    source.name,
                    format!(
                        "block #{} is `{}`, expected CERTIFICATE",
                        i + 1,
                        block.label
                    ),
                ));
            }
            parse(&block.der, source.name).map_err(|e| {
                BundleError::new(
                    source.name,
                    format!("certificate #{}: {}", i + 1, e.problem),
                )
            })?;
            Ok(block.der.to_vec())
        })
        .collect()
}

fn parse<'a>(der: &'a [u8], file: &str) -> Result<X509Certificate<'a>, BundleError> {
    match X509Certificate::from_der(der) {
        Ok(([], cert)) => Ok(cert),
        Ok(_) => Err(BundleError::new(
            file,
            "trailing bytes after the certificate",
        )),
        Err(e) => Err(BundleError::new(
            file,
            format!("not a valid certificate: {e}"),
        )),
    }
}

/// How far in the future a CA's NotBefore may lie and still load.
const CLOCK_SKEW: std::time::Duration = std::time::Duration::from_secs(300);

fn check_ca(
    cert: &X509Certificate<'_>,
    file: &str,
    role: &str,
    now: OffsetDateTime,
) -> Result<(), BundleError> {
    let fail =
        |problem: String| BundleError::new(file, format!("{role} {}: {problem}", cert.subject()));
    if !cert.is_ca() {
        return Err(fail(
            "is not a CA (BasicConstraints CA:TRUE missing)".into(),
        ));
    }
    match cert.key_usage() {
        Ok(Some(ku)) if ku.value.key_cert_sign() => {}
        Ok(_) => return Err(fail("KeyUsage lacks keyCertSign".into())),
        Err(e) => return Err(fail(format!("malformed KeyUsage: {e}"))),
    }
    let validity = cert.validity();
    // Tolerate a CA minted moments ago by a host whose clock runs a little ahead.
    if now + CLOCK_SKEW < validity.not_before.to_datetime() {
        return Err(fail(format!("is not valid before {}", validity.not_before)));
    }
    if now > validity.not_after.to_datetime() {
        return Err(fail(format!("expired at {}", validity.not_after)));
    }
    Ok(())
}

fn is_self_signed(der: &[u8]) -> bool {
    X509Certificate::from_der(der).is_ok_and(|(_, c)| {
        c.subject().as_raw() == c.issuer().as_raw() && c.verify_signature(None).is_ok()
    })
}

fn issued_by(child: &X509Certificate<'_>, issuer_der: &[u8]) -> bool {
    X509Certificate::from_der(issuer_der).is_ok_and(|(_, issuer)| {
        child.issuer().as_raw() == issuer.subject().as_raw()
            && child.verify_signature(Some(issuer.public_key())).is_ok()
    })
}

fn subject_key_id(cert: &X509Certificate<'_>) -> Option<Vec<u8>> {
    cert.extensions()
        .iter()
        .find_map(|ext| match ext.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(id) => Some(id.0.to_vec()),
            _ => None,
        })
}
