//! Shared helpers for the integration tests: the real `openssl` CLI, CA
//! setups made by the library, and independent checks (x509-parser,
//! rustls-webpki, `openssl verify`).
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use meshca_pki::profile::{self, CaCertRequest};
use meshca_pki::{CaBundle, KeyType, SigningKey, cert, der, pem};
use rustls_pki_types::{CertificateDer, UnixTime};
use time::OffsetDateTime;
use x509_parser::certificate::X509Certificate;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::ParsedExtension;
use x509_parser::prelude::FromDer;

pub const ID: &str = "spiffe://cluster.local/ns/default/sa/bookinfo";
pub const SAN_ID: &str = "subjectAltName=URI:spiffe://cluster.local/ns/default/sa/bookinfo";

/// An openssl config whose sections the tests pick explicitly, so the
/// system's openssl.cnf never adds extensions behind our back.
pub const OPENSSL_CNF: &str = "\
[req]
distinguished_name = dn
[dn]
[root_ca]
subjectKeyIdentifier = hash
basicConstraints = critical, CA:true
keyUsage = critical, keyCertSign, cRLSign
[inter_ca]
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
basicConstraints = critical, CA:true
keyUsage = critical, keyCertSign, cRLSign
[ca_without_cert_sign]
subjectKeyIdentifier = hash
basicConstraints = critical, CA:true
keyUsage = critical, digitalSignature
[ca_without_key_usage]
subjectKeyIdentifier = hash
basicConstraints = critical, CA:true
[not_ca]
subjectKeyIdentifier = hash
basicConstraints = critical, CA:false
keyUsage = critical, digitalSignature, keyCertSign
";

/// Now, to the second (certificates carry whole seconds).
pub fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc().replace_nanosecond(0).unwrap()
}

/// A fresh temporary directory with `openssl.cnf` written into it.
pub fn tempdir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("openssl.cnf"), OPENSSL_CNF).unwrap();
    dir
}

/// Runs `openssl <args>` in `dir`; panics with stderr unless it exits 0.
pub fn openssl(dir: &Path, args: &[&str]) -> Vec<u8> {
    let out = run_openssl(dir, args);
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    out.stdout
}

pub fn run_openssl(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .env("OPENSSL_CONF", dir.join("openssl.cnf"))
        .output()
        .expect("the openssl CLI must be installed")
}

/// Key kinds generated with `openssl genpkey`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Key {
    Rsa1024,
    Rsa2048,
    Rsa3072,
    Rsa4096,
    P256,
    P384,
    P521,
    Ed25519,
}

impl Key {
    fn genpkey_args(self) -> &'static [&'static str] {
        match self {
            Key::Rsa1024 => &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:1024"],
            Key::Rsa2048 => &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
            Key::Rsa3072 => &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:3072"],
            Key::Rsa4096 => &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:4096"],
            Key::P256 => &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
            Key::P384 => &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-384"],
            Key::P521 => &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-521"],
            Key::Ed25519 => &["-algorithm", "ED25519"],
        }
    }
}

/// A PKCS#8 PEM private key made by openssl, generated once per test binary.
pub fn openssl_key(kind: Key) -> &'static [u8] {
    static CELLS: [OnceLock<Vec<u8>>; 8] = [const { OnceLock::new() }; 8];
    CELLS[kind as usize].get_or_init(|| {
        let dir = tempdir();
        let mut args = vec!["genpkey"];
        args.extend_from_slice(kind.genpkey_args());
        args.extend_from_slice(&["-out", "k.pem"]);
        openssl(dir.path(), &args);
        std::fs::read(dir.path().join("k.pem")).unwrap()
    })
}

/// `openssl req -new -key <key> -subj <subject> <extra>`; returns the PEM CSR.
pub fn openssl_csr(key: &[u8], subject: &str, extra: &[&str]) -> Vec<u8> {
    let dir = tempdir();
    std::fs::write(dir.path().join("k.pem"), key).unwrap();
    let mut args = vec![
        "req", "-new", "-key", "k.pem", "-subj", subject, "-out", "r.csr",
    ];
    args.extend_from_slice(extra);
    openssl(dir.path(), &args);
    std::fs::read(dir.path().join("r.csr")).unwrap()
}

/// The DER inside a single-block PEM.
pub fn pem_der(pem_text: &[u8]) -> Vec<u8> {
    let blocks = pem::parse_all(pem_text).unwrap();
    assert_eq!(blocks.len(), 1);
    blocks[0].der.to_vec()
}

/// All DER blocks of a PEM text.
pub fn pem_ders(pem_text: &[u8]) -> Vec<Vec<u8>> {
    pem::parse_all(pem_text)
        .unwrap()
        .iter()
        .map(|b| b.der.to_vec())
        .collect()
}

pub fn csr_subject_and_spki(csr_pem: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let der = pem_der(csr_pem);
    let (_, csr) = X509CertificationRequest::from_der(&der).unwrap();
    let info = &csr.certification_request_info;
    (
        info.subject.as_raw().to_vec(),
        info.subject_pki.raw.to_vec(),
    )
}

pub fn parse_cert(der: &[u8]) -> X509Certificate<'_> {
    let (rest, cert) = X509Certificate::from_der(der).expect("issued certificate parses");
    assert!(rest.is_empty(), "trailing bytes after certificate");
    cert
}

pub fn subject_key_id(cert: &X509Certificate<'_>) -> Option<Vec<u8>> {
    cert.extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(id) => Some(id.0.to_vec()),
            _ => None,
        })
}

pub fn authority_key_id(cert: &X509Certificate<'_>) -> Option<Vec<u8>> {
    cert.extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(aki) => {
                aki.key_identifier.as_ref().map(|k| k.0.to_vec())
            }
            _ => None,
        })
}

/// A DER Name `DC=com, DC=example, O=a, O=b, CN=<cn>` (repeated attribute types).
pub fn repeated_attribute_name(cn: &str) -> Vec<u8> {
    const DC: &[u64] = &[0, 9, 2342, 19200300, 100, 1, 25];
    const O: &[u64] = &[2, 5, 4, 10];
    const CN: &[u64] = &[2, 5, 4, 3];
    let rdn = |oid: &[u64], tag: u8, value: &str| {
        der::tlv(
            der::SET,
            &[&der::sequence(&[
                &der::oid(oid),
                &der::tlv(tag, &[value.as_bytes()]),
            ])],
        )
    };
    const IA5: u8 = 0x16;
    der::sequence(&[
        &rdn(DC, IA5, "com"),
        &rdn(DC, IA5, "example"),
        &rdn(O, der::UTF8_STRING, "a"),
        &rdn(O, der::UTF8_STRING, "b"),
        &rdn(CN, der::UTF8_STRING, cn),
    ])
}

/// A CA made by the library, with what a verifier needs.
pub struct TestCa {
    pub name: &'static str,
    pub bundle: Arc<CaBundle>,
    /// Root certificates, DER.
    pub roots: Vec<Vec<u8>>,
    /// Certificates between the leaf and the roots (signing cert first), DER.
    pub intermediates: Vec<Vec<u8>>,
}

impl TestCa {
    pub fn signing_cert(&self) -> X509Certificate<'_> {
        parse_cert(self.bundle.signing_cert_der())
    }
}

/// Library CA setups, made once per test binary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaKind {
    Rsa2048Root,
    P256Root,
    P384Root,
    /// rsa-2048 root (`O=cluster.local`) -> ecdsa-p256 intermediate with a
    /// `DC=com,DC=example,O=a,O=b,CN=...` subject -> leaf.
    Rsa2048RootP256Intermediate,
}

pub const ALL_CAS: [CaKind; 4] = [
    CaKind::Rsa2048Root,
    CaKind::P256Root,
    CaKind::P384Root,
    CaKind::Rsa2048RootP256Intermediate,
];

pub const TEN_YEARS: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

pub fn root_ca(
    name: &'static str,
    key_type: KeyType,
    subject_der: &[u8],
    ttl: Duration,
    now: OffsetDateTime,
) -> TestCa {
    let key = SigningKey::generate(key_type).unwrap();
    let root = profile::self_signed_root(
        &CaCertRequest {
            subject_der,
            key: &key,
            ttl,
        },
        now,
    )
    .unwrap();
    let bundle = CaBundle::from_parts(key, root.clone(), vec![], vec![root.clone()], now).unwrap();
    TestCa {
        name,
        bundle: Arc::new(bundle),
        roots: vec![root],
        intermediates: vec![],
    }
}

pub fn intermediate_ca(
    name: &'static str,
    root: &TestCa,
    key_type: KeyType,
    subject_der: &[u8],
    ttl: Duration,
    now: OffsetDateTime,
) -> TestCa {
    let key = SigningKey::generate(key_type).unwrap();
    let inter = profile::intermediate_ca(
        &CaCertRequest {
            subject_der,
            key: &key,
            ttl,
        },
        &root.bundle,
        now,
    )
    .unwrap();
    // The issuer's own intermediates (if it is not a root) complete the chain.
    let bundle = CaBundle::from_parts(
        key,
        inter.clone(),
        root.intermediates.clone(),
        root.roots.clone(),
        now,
    )
    .unwrap();
    let mut intermediates = vec![inter];
    intermediates.extend(root.intermediates.iter().cloned());
    TestCa {
        name,
        bundle: Arc::new(bundle),
        roots: root.roots.clone(),
        intermediates,
    }
}

pub fn test_ca(kind: CaKind) -> &'static TestCa {
    static CELLS: [OnceLock<TestCa>; 4] = [const { OnceLock::new() }; 4];
    static INTER_ROOT: OnceLock<TestCa> = OnceLock::new();
    CELLS[kind as usize].get_or_init(|| {
        let now = now();
        let org = cert::organization_name("cluster.local");
        match kind {
            CaKind::Rsa2048Root => root_ca("rsa-2048 root", KeyType::Rsa2048, &org, TEN_YEARS, now),
            CaKind::P256Root => {
                root_ca("ecdsa-p256 root", KeyType::EcdsaP256, &org, TEN_YEARS, now)
            }
            CaKind::P384Root => {
                root_ca("ecdsa-p384 root", KeyType::EcdsaP384, &org, TEN_YEARS, now)
            }
            CaKind::Rsa2048RootP256Intermediate => {
                let root = INTER_ROOT.get_or_init(|| {
                    root_ca(
                        "rsa-2048 root for intermediate",
                        KeyType::Rsa2048,
                        &org,
                        TEN_YEARS,
                        now,
                    )
                });
                intermediate_ca(
                    "rsa-2048 root -> ecdsa-p256 intermediate",
                    root,
                    KeyType::EcdsaP256,
                    &repeated_attribute_name("meshca intermediate"),
                    TEN_YEARS / 2,
                    now,
                )
            }
        }
    })
}

pub fn to_pem(der: &[u8]) -> String {
    pem::encode("CERTIFICATE", der)
}

/// `openssl verify -x509_strict -purpose <p> -CAfile root.pem [-untrusted chain.pem] leaf.pem`
/// for both sslclient and sslserver; asserts exit 0 and "OK".
pub fn openssl_verify(leaf: &[u8], intermediates: &[Vec<u8>], roots: &[Vec<u8>]) {
    let dir = tempdir();
    let d = dir.path();
    std::fs::write(d.join("leaf.pem"), to_pem(leaf)).unwrap();
    let roots_pem: String = roots.iter().map(|r| to_pem(r)).collect();
    std::fs::write(d.join("root.pem"), roots_pem).unwrap();
    let inter_pem: String = intermediates.iter().map(|r| to_pem(r)).collect();
    std::fs::write(d.join("chain.pem"), inter_pem).unwrap();
    for purpose in ["sslclient", "sslserver"] {
        let mut args = vec![
            "verify",
            "-x509_strict",
            "-purpose",
            purpose,
            "-CAfile",
            "root.pem",
        ];
        if !intermediates.is_empty() {
            args.extend_from_slice(&["-untrusted", "chain.pem"]);
        }
        args.push("leaf.pem");
        let out = run_openssl(d, &args);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("leaf.pem: OK"),
            "openssl {args:?}: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// `openssl x509 -noout -text` of a DER certificate.
pub fn openssl_text(der: &[u8]) -> String {
    let dir = tempdir();
    std::fs::write(dir.path().join("c.pem"), to_pem(der)).unwrap();
    String::from_utf8(openssl(
        dir.path(),
        &["x509", "-noout", "-text", "-in", "c.pem"],
    ))
    .unwrap()
}

/// rustls-webpki path building for client auth and server auth at `at`.
pub fn webpki_verify(
    leaf: &[u8],
    intermediates: &[Vec<u8>],
    roots: &[Vec<u8>],
    at: OffsetDateTime,
) {
    let roots: Vec<CertificateDer<'_>> = roots
        .iter()
        .map(|r| CertificateDer::from(r.as_slice()))
        .collect();
    let anchors: Vec<_> = roots
        .iter()
        .map(|r| webpki::anchor_from_trusted_cert(r).expect("root is a trust anchor"))
        .collect();
    let intermediates: Vec<CertificateDer<'_>> = intermediates
        .iter()
        .map(|c| CertificateDer::from(c.as_slice()))
        .collect();
    let leaf = CertificateDer::from(leaf);
    let ee = webpki::EndEntityCert::try_from(&leaf).expect("webpki parses the leaf");
    let time = UnixTime::since_unix_epoch(Duration::from_secs(at.unix_timestamp() as u64));
    for (usage, name) in [
        (webpki::KeyUsage::client_auth(), "client auth"),
        (webpki::KeyUsage::server_auth(), "server auth"),
    ] {
        ee.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            &intermediates,
            time,
            usage,
            None,
            None,
        )
        .unwrap_or_else(|e| panic!("webpki {name}: {e:?}"));
    }
}

/// The SAN extension of a certificate: (critical, names as `URI:`/`DNS:`/`IP:`/`email:` strings).
pub fn sans(cert: &X509Certificate<'_>) -> Option<(bool, Vec<String>)> {
    use x509_parser::extensions::GeneralName;
    let ext = cert
        .subject_alternative_name()
        .expect("one SAN extension")?;
    let names = ext
        .value
        .general_names
        .iter()
        .map(|n| match n {
            GeneralName::URI(s) => format!("URI:{s}"),
            GeneralName::DNSName(s) => format!("DNS:{s}"),
            GeneralName::RFC822Name(s) => format!("email:{s}"),
            GeneralName::IPAddress(b) => match b.len() {
                4 => format!(
                    "IP:{}",
                    std::net::IpAddr::from(<[u8; 4]>::try_from(*b).unwrap())
                ),
                16 => format!(
                    "IP:{}",
                    std::net::IpAddr::from(<[u8; 16]>::try_from(*b).unwrap())
                ),
                _ => format!("IP:bad length {}", b.len()),
            },
            other => format!("other:{other:?}"),
        })
        .collect();
    Some((ext.critical, names))
}

/// Serial number: positive, non-zero, at most 16 bytes of magnitude (< 2^128).
pub fn assert_serial_ok(cert: &X509Certificate<'_>) {
    let raw = cert.raw_serial();
    assert!(!raw.is_empty());
    assert_eq!(raw[0] & 0x80, 0, "serial is negative: {raw:02x?}");
    let magnitude: Vec<u8> = raw.iter().copied().skip_while(|b| *b == 0).collect();
    assert!(!magnitude.is_empty(), "serial is zero");
    assert!(
        magnitude.len() <= 16,
        "serial has {} bytes of magnitude",
        magnitude.len()
    );
}

/// Asserts the leaf's KeyUsage is critical and exactly `flags` (x509-parser's bit order:
/// bit 0 = digitalSignature, bit 2 = keyEncipherment, bit 5 = keyCertSign).
pub fn assert_key_usage(cert: &X509Certificate<'_>, flags: u16) {
    let ku = cert.key_usage().unwrap().expect("KeyUsage present");
    assert!(ku.critical, "KeyUsage must be critical");
    assert_eq!(ku.value.flags, flags, "KeyUsage bits");
}

/// Asserts ExtendedKeyUsage is exactly serverAuth + clientAuth.
pub fn assert_server_and_client_auth(cert: &X509Certificate<'_>) {
    let eku = cert
        .extended_key_usage()
        .unwrap()
        .expect("ExtendedKeyUsage present");
    let v = eku.value;
    assert!(
        v.server_auth && v.client_auth,
        "EKU lacks serverAuth/clientAuth"
    );
    assert!(
        !v.any
            && !v.code_signing
            && !v.email_protection
            && !v.time_stamping
            && !v.ocsp_signing
            && v.other.is_empty(),
        "EKU has extra purposes: {v:?}"
    );
}

/// Asserts BasicConstraints is present, critical and CA:FALSE.
pub fn assert_not_ca(cert: &X509Certificate<'_>) {
    let bc = cert
        .basic_constraints()
        .unwrap()
        .expect("BasicConstraints present");
    assert!(bc.critical, "BasicConstraints must be critical");
    assert!(!bc.value.ca, "leaf must be CA:FALSE");
}
