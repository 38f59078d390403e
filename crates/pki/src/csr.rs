//! CSR validation: everything checked before a single byte is signed.

use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::cri_attributes::ParsedCriAttribute;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry::{self as oids, Oid};
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;

use crate::error::CsrError;
use crate::pem;
use crate::san::SanEntry;

/// What CSRs are acceptable at all, before any profile looks at them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CsrPolicy {
    /// Limit on the PEM text; an RSA-8192 CSR with a few SANs is about 3 KiB.
    pub max_pem_bytes: usize,
    pub allow_rsa: bool,
    pub rsa_min_bits: usize,
    pub rsa_max_bits: usize,
    pub allow_p256: bool,
    pub allow_p384: bool,
    pub allow_ed25519: bool,
}

impl Default for CsrPolicy {
    fn default() -> Self {
        CsrPolicy {
            max_pem_bytes: 32 * 1024,
            allow_rsa: true,
            rsa_min_bits: 2048,
            rsa_max_bits: 8192,
            allow_p256: true,
            allow_p384: true,
            allow_ed25519: true,
        }
    }
}

/// The public key type of a CSR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CsrKey {
    Rsa { bits: usize },
    EcdsaP256,
    EcdsaP384,
    Ed25519,
}

/// A CSR whose encoding, key and signature have been checked. Holds copies of
/// the only parts a certificate may take from it.
#[derive(Debug, Clone)]
pub struct ValidatedCsr {
    /// DER SubjectPublicKeyInfo, copied into certificates byte for byte.
    pub spki_der: Vec<u8>,
    /// The public key bits inside the SPKI (for key-equality checks).
    pub public_key_bits: Vec<u8>,
    pub key: CsrKey,
    /// DER Name of the subject, byte for byte.
    pub subject_der: Vec<u8>,
    pub subject_is_empty: bool,
    /// The subject of Istio's CSR template: empty, or only an empty `O=`
    /// (what Istio's Go `GenCSR` writes; istiod's RA `ValidateCSR` accepts
    /// exactly these two).
    pub subject_is_blank: bool,
    pub has_common_name: bool,
    /// SANs from the extensionRequest attribute, in order.
    pub requested_sans: Vec<SanEntry>,
    /// BasicConstraints CA:TRUE was requested.
    pub requests_ca: bool,
}

impl ValidatedCsr {
    /// One-line rendering of the subject, for messages (computed on demand:
    /// the issue path never needs it).
    pub fn subject_text(&self) -> String {
        x509_parser::x509::X509Name::from_der(&self.subject_der)
            .map(|(_, name)| name.to_string())
            .unwrap_or_else(|_| "(unparsable subject)".into())
    }
}

/// Checks a PEM CSR: one `CERTIFICATE REQUEST` block, strict DER without
/// trailing bytes, an allowed key, a strong signature algorithm and a valid
/// self-signature (proof of possession).
pub fn validate_csr(input: &[u8], policy: &CsrPolicy) -> Result<ValidatedCsr, CsrError> {
    if input.len() > policy.max_pem_bytes {
        return Err(CsrError::TooLarge {
            size: input.len(),
            limit: policy.max_pem_bytes,
        });
    }
    let blocks = pem::parse_all(input).map_err(CsrError::NotPem)?;
    let [block] = blocks.as_slice() else {
        return Err(CsrError::BlockCount(blocks.len()));
    };
    if block.label != "CERTIFICATE REQUEST" {
        return Err(CsrError::WrongBlockType(block.label.clone()));
    }
    validate_csr_der(&block.der, policy)
}

/// No attribute, or exactly one: `O` with an empty string value.
fn is_blank_name(name: &x509_parser::x509::X509Name<'_>) -> bool {
    let mut rdns = name.iter();
    let Some(rdn) = rdns.next() else {
        return true;
    };
    let mut attributes = rdn.iter();
    match (rdns.next(), attributes.next(), attributes.next()) {
        (None, Some(only), None) => {
            only.attr_type() == &oids::OID_X509_ORGANIZATION_NAME
                && only.as_str().is_ok_and(str::is_empty)
        }
        _ => false,
    }
}

fn validate_csr_der(der: &[u8], policy: &CsrPolicy) -> Result<ValidatedCsr, CsrError> {
    let (rest, csr) =
        X509CertificationRequest::from_der(der).map_err(|e| CsrError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CsrError::TrailingData(rest.len()));
    }
    check_signature_algorithm(&csr.signature_algorithm.algorithm)?;
    let info = &csr.certification_request_info;
    let spki = &info.subject_pki;
    let key = classify_key(spki)?;
    // Key policy before the signature: a too-small key must be refused for
    // its size, not misreported as a bad signature by the verifier's limits.
    check_key(key, policy)?;
    csr.verify_signature().map_err(|_| CsrError::BadSignature)?;

    let mut requested_sans = Vec::new();
    let mut requests_ca = false;
    // Every extensionRequest attribute, not only the first (which is all
    // `requested_extensions()` looks at): a second one could hide CA:TRUE.
    let mut requests = info
        .iter_attributes()
        .filter_map(|a| match a.parsed_attribute() {
            ParsedCriAttribute::ExtensionRequest(r) => Some(r),
            _ => None,
        });
    let request = requests.next();
    if requests.next().is_some() {
        return Err(CsrError::DuplicateExtension(
            "the extensionRequest attribute".into(),
        ));
    }
    if let Some(request) = request {
        let mut seen: Vec<&Oid<'_>> = Vec::new();
        for ext in &request.extensions {
            if seen.contains(&&ext.oid) {
                return Err(CsrError::DuplicateExtension(format!(
                    "extension {}",
                    ext.oid.to_id_string()
                )));
            }
            seen.push(&ext.oid);
            match ext.parsed_extension() {
                ParsedExtension::SubjectAlternativeName(san) => {
                    for name in &san.general_names {
                        requested_sans.push(san_entry(name)?);
                    }
                }
                ParsedExtension::BasicConstraints(bc) => requests_ca |= bc.ca,
                ParsedExtension::ParseError { .. } => {
                    return Err(CsrError::MalformedExtension("requested extension"));
                }
                // Anything else is tolerated and never copied.
                _ => {}
            }
        }
    }

    let subject = &info.subject;
    Ok(ValidatedCsr {
        spki_der: spki.raw.to_vec(),
        public_key_bits: spki.subject_public_key.data.to_vec(),
        key,
        subject_der: subject.as_raw().to_vec(),
        subject_is_empty: subject.iter().next().is_none(),
        subject_is_blank: is_blank_name(subject),
        has_common_name: subject.iter_common_name().next().is_some(),
        requested_sans,
        requests_ca,
    })
}

fn check_signature_algorithm(alg: &Oid<'_>) -> Result<(), CsrError> {
    let strong = [
        oids::OID_PKCS1_SHA256WITHRSA,
        oids::OID_PKCS1_SHA384WITHRSA,
        oids::OID_PKCS1_SHA512WITHRSA,
        oids::OID_SIG_ECDSA_WITH_SHA256,
        oids::OID_SIG_ECDSA_WITH_SHA384,
        oids::OID_SIG_ED25519,
    ];
    let weak = [
        oids::OID_PKCS1_MD2WITHRSAENC,
        oids::OID_PKCS1_MD4WITHRSAENC,
        oids::OID_PKCS1_MD5WITHRSAENC,
        oids::OID_PKCS1_SHA1WITHRSA,
        oids::OID_SHA1_WITH_RSA,
        oids::OID_MD5_WITH_RSA,
        oids::OID_SIG_DSA_WITH_SHA1,
    ];
    // ecdsa-with-SHA1 (1.2.840.10045.4.1) is not in the registry.
    const ECDSA_WITH_SHA1: Oid<'static> = x509_parser::der_parser::oid!(1.2.840.10045.4.1);
    if strong.contains(alg) {
        Ok(())
    } else if weak.contains(alg) || *alg == ECDSA_WITH_SHA1 {
        Err(CsrError::WeakSignatureAlgorithm(alg.to_id_string()))
    } else {
        Err(CsrError::SignatureAlgorithm(alg.to_id_string()))
    }
}

pub(crate) fn classify_key(
    spki: &x509_parser::x509::SubjectPublicKeyInfo<'_>,
) -> Result<CsrKey, CsrError> {
    let alg = &spki.algorithm.algorithm;
    if *alg == oids::OID_PKCS1_RSAENCRYPTION {
        match spki.parsed() {
            Ok(PublicKey::RSA(rsa)) => {
                check_rsa_exponent(rsa.exponent)?;
                Ok(CsrKey::Rsa {
                    bits: bit_length(rsa.modulus),
                })
            }
            _ => Err(CsrError::Malformed("RSA public key".into())),
        }
    } else if *alg == oids::OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            // The tag first: `as_oid` reads any value's bytes as an OID, so
            // explicit parameters (a SEQUENCE) could pass for a named curve.
            .filter(|p| p.tag() == x509_parser::der_parser::asn1_rs::Tag::Oid)
            .and_then(|p| p.as_oid().ok())
            .ok_or_else(|| CsrError::Curve("(none or explicit parameters)".into()))?;
        if curve == oids::OID_EC_P256 {
            Ok(CsrKey::EcdsaP256)
        } else if curve == oids::OID_NIST_EC_P384 {
            Ok(CsrKey::EcdsaP384)
        } else {
            Err(CsrError::Curve(curve.to_id_string()))
        }
    } else if *alg == oids::OID_SIG_ED25519 {
        Ok(CsrKey::Ed25519)
    } else {
        Err(CsrError::KeyAlgorithm(alg.to_id_string()))
    }
}

pub(crate) fn check_key(key: CsrKey, policy: &CsrPolicy) -> Result<(), CsrError> {
    let refused = |name: &str| Err(CsrError::KeyAlgorithm(name.to_owned()));
    match key {
        CsrKey::Rsa { bits } => {
            if !policy.allow_rsa {
                return refused("RSA");
            }
            if bits < policy.rsa_min_bits || bits > policy.rsa_max_bits {
                return Err(CsrError::RsaKeySize {
                    bits,
                    min: policy.rsa_min_bits,
                    max: policy.rsa_max_bits,
                });
            }
            Ok(())
        }
        CsrKey::EcdsaP256 if !policy.allow_p256 => Err(CsrError::Curve("P-256".into())),
        CsrKey::EcdsaP384 if !policy.allow_p384 => Err(CsrError::Curve("P-384".into())),
        CsrKey::Ed25519 if !policy.allow_ed25519 => refused("Ed25519"),
        _ => Ok(()),
    }
}

/// Odd, at least 3, below 2^32 (Go's crypto/rsa refuses more than 2^31-1,
/// and everything issues with 65537): e = 1 makes any "signature" verify,
/// an even e is no RSA key, a huge one is a cost attack on verification.
fn check_rsa_exponent(big_endian: &[u8]) -> Result<(), CsrError> {
    let digits: Vec<u8> = big_endian.iter().copied().skip_while(|b| *b == 0).collect();
    let refuse = || {
        let hex: String = digits.iter().map(|b| format!("{b:02x}")).collect();
        CsrError::RsaExponent(format!("0x{}", if hex.is_empty() { "0" } else { &hex }))
    };
    if digits.len() > 4 {
        return Err(refuse());
    }
    let e = digits.iter().fold(0u64, |e, b| (e << 8) | u64::from(*b));
    if e < 3 || e % 2 == 0 {
        return Err(refuse());
    }
    Ok(())
}

pub(crate) fn bit_length(big_endian: &[u8]) -> usize {
    let digits: Vec<_> = big_endian.iter().skip_while(|b| **b == 0).collect();
    match digits.first() {
        None => 0,
        Some(first) => digits.len() * 8 - first.leading_zeros() as usize,
    }
}

fn san_entry(name: &GeneralName<'_>) -> Result<SanEntry, CsrError> {
    Ok(match name {
        GeneralName::DNSName(s) => SanEntry::Dns((*s).to_owned()),
        GeneralName::URI(s) => SanEntry::Uri((*s).to_owned()),
        GeneralName::RFC822Name(s) => SanEntry::Email((*s).to_owned()),
        GeneralName::IPAddress(bytes) => match bytes.len() {
            4 => SanEntry::Ip(<[u8; 4]>::try_from(*bytes).map_err(|_| bad_ip())?.into()),
            16 => SanEntry::Ip(<[u8; 16]>::try_from(*bytes).map_err(|_| bad_ip())?.into()),
            _ => return Err(bad_ip()),
        },
        // otherName, registeredID, directoryName...: well-formed but never
        // certified; a profile that copies SANs refuses them by policy.
        other => SanEntry::Other(other.to_string()),
    })
}

fn bad_ip() -> CsrError {
    CsrError::MalformedExtension("subjectAltName (IP address length)")
}

/// Makes a PEM CSR for `key` (used for meshca's own certificates, tests and
/// benchmarks; workloads bring their own).
pub fn build_csr(
    key: &crate::key::SigningKey,
    subject_der: &[u8],
    sans: &[SanEntry],
) -> Result<String, String> {
    use crate::der;
    let mut extensions = Vec::new();
    if !sans.is_empty() {
        extensions.push(der::sequence(&[
            &der::oid(&[2, 5, 29, 17]),
            &der::octet_string(&crate::san::san_extension_value(sans)?),
        ]));
    }
    let attributes = match extensions.is_empty() {
        true => Vec::new(),
        false => vec![extension_request(&extensions)],
    };
    build_csr_with_attributes(key, subject_der, &attributes)
}

/// The PKCS#9 extensionRequest attribute holding these DER extensions.
pub fn extension_request(extensions: &[Vec<u8>]) -> Vec<u8> {
    use crate::der;
    let extensions: Vec<&[u8]> = extensions.iter().map(Vec::as_slice).collect();
    der::sequence(&[
        &der::oid(&[1, 2, 840, 113549, 1, 9, 14]),
        &der::tlv(der::SET, &[&der::sequence(&extensions)]),
    ])
}

/// A CSR signed by `key` with exactly these DER attributes, whatever they
/// say: for tests and fuzzing of what validation refuses.
pub fn build_csr_with_attributes(
    key: &crate::key::SigningKey,
    subject_der: &[u8],
    attributes: &[Vec<u8>],
) -> Result<String, String> {
    use crate::der;
    let attributes: Vec<&[u8]> = attributes.iter().map(Vec::as_slice).collect();
    let info = der::sequence(&[
        &der::small_integer(0),
        subject_der,
        &key.spki_der(),
        &der::tlv(der::context(0, true), &attributes),
    ]);
    let algorithm = key.signature_algorithm_der();
    let signature = key.sign(&info).map_err(|e| e.to_string())?;
    let csr = der::sequence(&[&info, &algorithm, &der::bit_string(&signature)]);
    Ok(pem::encode("CERTIFICATE REQUEST", &csr))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bit_length_ignores_leading_zero_bytes() {
        assert_eq!(bit_length(&[0, 0x80, 0]), 16);
        assert_eq!(bit_length(&[0x01, 0]), 9);
        assert_eq!(bit_length(&[]), 0);
    }

    #[test]
    fn built_csrs_validate_for_every_key_type() {
        use crate::key::{KeyType, SigningKey};
        for key_type in KeyType::ALL {
            let key = SigningKey::generate(key_type).unwrap();
            let sans = [SanEntry::Uri("spiffe://cluster.local/ns/a/sa/b".into())];
            let pem = build_csr(&key, crate::cert::EMPTY_NAME, &sans).unwrap();
            let csr = validate_csr(pem.as_bytes(), &CsrPolicy::default()).unwrap();
            assert_eq!(csr.requested_sans, sans);
            assert_eq!(csr.public_key_bits, key.public_key_bits());
            assert!(csr.subject_is_empty && !csr.has_common_name && !csr.requests_ca);
        }
    }

    #[test]
    fn a_blank_subject_is_empty_or_only_an_empty_organization() {
        use crate::cert;
        use crate::key::{KeyType, SigningKey};
        let key = SigningKey::generate(KeyType::EcdsaP256).unwrap();
        let sans = [SanEntry::Uri("spiffe://cluster.local/ns/a/sa/b".into())];
        let blank = |subject: &[u8]| {
            let pem = build_csr(&key, subject, &sans).unwrap();
            validate_csr(pem.as_bytes(), &CsrPolicy::default())
                .unwrap()
                .subject_is_blank
        };
        assert!(blank(cert::EMPTY_NAME));
        // Istio's Go GenCSR: `O=""`.
        assert!(blank(&cert::organization_name("")));
        assert!(!blank(&cert::organization_name("system:masters")));
        assert!(!blank(&cert::common_name("")));
        assert!(!blank(&cert::organization_and_common_name("", "")));
        assert!(!blank(&cert::organization_and_common_name(
            "system:masters",
            "kubernetes-admin"
        )));
    }

    /// A PEM CSR with this SPKI and a signature that cannot verify: what
    /// the key checks refuse must be refused before the signature is tried.
    fn unsigned_csr(spki: &[u8], signature_algorithm: &[u64]) -> String {
        use crate::der;
        let info = der::sequence(&[
            &der::small_integer(0),
            crate::cert::EMPTY_NAME,
            spki,
            &der::tlv(der::context(0, true), &[]),
        ]);
        let alg = der::sequence(&[&der::oid(signature_algorithm)]);
        let csr = der::sequence(&[&info, &alg, &der::bit_string(&[0x55; 64])]);
        pem::encode("CERTIFICATE REQUEST", &csr)
    }

    const SHA256_WITH_RSA: [u64; 7] = [1, 2, 840, 113549, 1, 1, 11];
    const ECDSA_WITH_SHA256: [u64; 7] = [1, 2, 840, 10045, 4, 3, 2];

    fn rsa_spki(exponent: &[u8]) -> Vec<u8> {
        use crate::der;
        let modulus = [0xc3u8; 256]; // 2048 bits, odd
        let key = der::sequence(&[
            &der::unsigned_integer(&modulus),
            &der::unsigned_integer(exponent),
        ]);
        der::sequence(&[
            &der::sequence(&[&der::oid(&[1, 2, 840, 113549, 1, 1, 1]), &[der::NULL, 0]]),
            &der::bit_string(&key),
        ])
    }

    #[test]
    fn rsa_exponents_that_are_one_even_or_huge_are_refused() {
        let policy = CsrPolicy::default();
        for exponent in [
            &[0x01][..],
            &[0x00],
            &[0x02],
            &[0x01, 0x00, 0x00],             // 65536: even
            &[0x01, 0x00, 0x00, 0x00, 0x01], // 2^32 + 1
            &[0xff; 64],                     // a 512-bit exponent
        ] {
            let pem = unsigned_csr(&rsa_spki(exponent), &SHA256_WITH_RSA);
            let err = validate_csr(pem.as_bytes(), &policy).unwrap_err();
            assert_eq!(err.reason(), "csr_rsa_exponent", "{exponent:02x?}: {err}");
        }
        // 65537 and 3 pass the exponent check and fail at the signature.
        for exponent in [&[0x01, 0x00, 0x01][..], &[0x03]] {
            let pem = unsigned_csr(&rsa_spki(exponent), &SHA256_WITH_RSA);
            let err = validate_csr(pem.as_bytes(), &policy).unwrap_err();
            assert_eq!(err, CsrError::BadSignature, "{exponent:02x?}");
        }
    }

    #[test]
    fn explicit_curve_parameters_and_secp256k1_are_refused() {
        use crate::der;
        let point = [&[0x04u8][..], &[0x11; 64]].concat();
        let ec_spki = |parameters: &[u8]| {
            der::sequence(&[
                &der::sequence(&[&der::oid(&[1, 2, 840, 10045, 2, 1]), parameters]),
                &der::bit_string(&point),
            ])
        };
        let secp256k1 = der::oid(&[1, 3, 132, 0, 10]);
        // specifiedCurve: ECParameters SEQUENCE { version 1, fieldID, curve, base, order }.
        let explicit = der::sequence(&[
            &der::small_integer(1),
            &der::sequence(&[&der::oid(&[1, 2, 840, 10045, 1, 1]), &der::small_integer(7)]),
        ]);
        // A SEQUENCE whose content bytes are P-256's OID: still explicit.
        let p256 = der::oid(&[1, 2, 840, 10045, 3, 1, 7]);
        let disguised = der::tlv(der::SEQUENCE, &[&p256[2..]]);
        for (parameters, want) in [
            (
                disguised,
                CsrError::Curve("(none or explicit parameters)".into()),
            ),
            (secp256k1, CsrError::Curve("1.3.132.0.10".into())),
            (
                explicit,
                CsrError::Curve("(none or explicit parameters)".into()),
            ),
            (
                Vec::new(),
                CsrError::Curve("(none or explicit parameters)".into()),
            ),
        ] {
            let pem = unsigned_csr(&ec_spki(&parameters), &ECDSA_WITH_SHA256);
            let err = validate_csr(pem.as_bytes(), &CsrPolicy::default()).unwrap_err();
            assert_eq!(err, want);
            assert_eq!(err.reason(), "csr_key_curve");
        }
    }

    /// A properly signed CSR with these extensions (full DER Extension
    /// SEQUENCEs), in one extensionRequest attribute.
    fn signed_csr(extensions: &[Vec<u8>]) -> String {
        use crate::key::{KeyType, SigningKey};
        let key = SigningKey::generate(KeyType::EcdsaP256).unwrap();
        build_csr_with_attributes(
            &key,
            crate::cert::EMPTY_NAME,
            &[extension_request(extensions)],
        )
        .unwrap()
    }

    fn extension(oid: &[u64], value: &[u8]) -> Vec<u8> {
        use crate::der;
        der::sequence(&[&der::oid(oid), &der::octet_string(value)])
    }

    const SAN: [u64; 4] = [2, 5, 29, 17];
    const BASIC_CONSTRAINTS: [u64; 4] = [2, 5, 29, 19];

    fn san(entries: &[SanEntry]) -> Vec<u8> {
        extension(&SAN, &crate::san::san_extension_value(entries).unwrap())
    }

    #[test]
    fn duplicate_extensions_and_extension_requests_are_refused() {
        use crate::der;
        let id = SanEntry::Uri("spiffe://cluster.local/ns/a/sa/b".into());
        let other = SanEntry::Uri("spiffe://cluster.local/ns/kube-system/sa/admin".into());
        let ca = extension(&BASIC_CONSTRAINTS, &der::sequence(&[&der::boolean(true)]));
        let not_ca = extension(&BASIC_CONSTRAINTS, &der::sequence(&[]));
        let policy = CsrPolicy::default();
        for extensions in [
            vec![
                san(std::slice::from_ref(&id)),
                san(std::slice::from_ref(&other)),
            ],
            vec![san(std::slice::from_ref(&id)), not_ca.clone(), ca.clone()],
        ] {
            let err = validate_csr(signed_csr(&extensions).as_bytes(), &policy).unwrap_err();
            assert_eq!(err.reason(), "csr_extension_duplicate", "{err}");
        }
        // A second extensionRequest attribute (which a parser looking at the
        // first only would never see) hiding CA:TRUE.
        let key = crate::key::SigningKey::generate(crate::key::KeyType::EcdsaP256).unwrap();
        let pem = build_csr_with_attributes(
            &key,
            crate::cert::EMPTY_NAME,
            &[extension_request(&[san(&[id])]), extension_request(&[ca])],
        )
        .unwrap();
        let err = validate_csr(pem.as_bytes(), &policy).unwrap_err();
        assert_eq!(err.reason(), "csr_extension_duplicate", "{err}");
    }

    #[test]
    fn ip_sans_of_a_bad_length_and_malformed_extension_values_are_refused() {
        use crate::der;
        let ip = |bytes: &[u8]| der::tlv(der::context(7, false), &[bytes]);
        let policy = CsrPolicy::default();
        for bad in [
            extension(&SAN, &der::sequence(&[&ip(&[10, 0, 0, 1, 9])])),
            extension(&SAN, &der::sequence(&[&ip(&[])])),
            extension(&SAN, &der::sequence(&[&ip(&[0; 15])])),
            // Not a GeneralNames SEQUENCE at all.
            extension(&SAN, &[0x30, 0x05, 0x01]),
            extension(&SAN, b"garbage"),
            extension(&BASIC_CONSTRAINTS, &[0x30, 0x03, 0x01, 0x01]),
        ] {
            let err = validate_csr(signed_csr(&[bad]).as_bytes(), &policy).unwrap_err();
            assert!(
                matches!(err.reason(), "csr_extension_malformed" | "csr_malformed"),
                "{err}"
            );
        }
    }

    #[test]
    fn oversized_input_is_refused_before_parsing() {
        let policy = CsrPolicy {
            max_pem_bytes: 10,
            ..CsrPolicy::default()
        };
        assert_eq!(
            validate_csr(&[b'A'; 11], &policy).unwrap_err(),
            CsrError::TooLarge {
                size: 11,
                limit: 10
            }
        );
    }
}
