//! Everything meshca refuses, each with its specific error and stable reason
//! string; and request fields that are tolerated but never copied.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use meshca_pki::pem::PemError;
use meshca_pki::profile::{self, ISTIOD_USAGES, KubernetesProfile, SubjectRule, WorkloadProfile};
use meshca_pki::{
    BundleError, BundleSources, CaBundle, CertOptions, CsrError, CsrPolicy, Error, ErrorKind,
    GrpcCode, LocalCa, PolicyViolation, Source, cert, pem, validate_csr,
};
use time::OffsetDateTime;
use x509_parser::oid_registry::Oid;

const DAY: i64 = 24 * 3600;

fn p256_csr(subject: &str, extra: &[&str]) -> Vec<u8> {
    openssl_csr(openssl_key(Key::P256), subject, extra)
}

/// A valid RSA-2048 CSR with the Istio URI SAN.
fn good_csr() -> &'static [u8] {
    static CSR: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    CSR.get_or_init(|| openssl_csr(openssl_key(Key::Rsa2048), "/O=x", &["-addext", SAN_ID]))
}

fn refuse(input: &[u8]) -> CsrError {
    refuse_with(input, &CsrPolicy::default())
}

fn refuse_with(input: &[u8], policy: &CsrPolicy) -> CsrError {
    let err = validate_csr(input, policy).expect_err("CSR must be refused");
    let as_error = Error::from(err.clone());
    assert_eq!(as_error.reason(), err.reason());
    assert_eq!(as_error.kind(), ErrorKind::CsrError);
    assert_eq!(as_error.grpc_code(), GrpcCode::InvalidArgument);
    err
}

// ---- CSR encoding ----

#[test]
fn oversized_csr_is_refused_as_csr_too_large() {
    let mut input = good_csr().to_vec();
    input.resize(32 * 1024 + 1, b'\n');
    let err = refuse(&input);
    assert_eq!(
        err,
        CsrError::TooLarge {
            size: 32 * 1024 + 1,
            limit: 32 * 1024
        }
    );
    assert_eq!(err.reason(), "csr_too_large");
    // The limit is the policy's.
    let policy = CsrPolicy {
        max_pem_bytes: 100,
        ..CsrPolicy::default()
    };
    assert!(matches!(
        refuse_with(good_csr(), &policy),
        CsrError::TooLarge { limit: 100, .. }
    ));
}

#[test]
fn text_without_pem_block_is_refused_as_csr_not_pem() {
    let err = refuse(b"this is not a CSR");
    assert_eq!(err, CsrError::NotPem(PemError::NoBlock));
    assert_eq!(err.reason(), "csr_not_pem");
    let der = pem_der(good_csr());
    assert_eq!(
        refuse(&der),
        CsrError::NotPem(PemError::NoBlock),
        "raw DER is not PEM"
    );
    assert_eq!(refuse(b""), CsrError::NotPem(PemError::NoBlock));
}

#[test]
fn two_pem_blocks_are_refused_as_csr_pem_block_count() {
    let mut input = good_csr().to_vec();
    input.extend_from_slice(good_csr());
    let err = refuse(&input);
    assert_eq!(err, CsrError::BlockCount(2));
    assert_eq!(err.reason(), "csr_pem_block_count");
}

#[test]
fn certificate_block_is_refused_as_csr_pem_type() {
    let der = pem_der(good_csr());
    let err = refuse(pem::encode("CERTIFICATE", &der).as_bytes());
    assert_eq!(err, CsrError::WrongBlockType("CERTIFICATE".into()));
    assert_eq!(err.reason(), "csr_pem_type");
    let err = refuse(pem::encode("NEW CERTIFICATE REQUEST", &der).as_bytes());
    assert_eq!(
        err,
        CsrError::WrongBlockType("NEW CERTIFICATE REQUEST".into())
    );
}

#[test]
fn garbage_base64_in_a_proper_block_is_refused_as_csr_not_pem() {
    let input = b"-----BEGIN CERTIFICATE REQUEST-----\nMIIB$$$not*base64!!\n-----END CERTIFICATE REQUEST-----\n";
    let err = refuse(input);
    assert_eq!(
        err,
        CsrError::NotPem(PemError::Base64("CERTIFICATE REQUEST".into()))
    );
    assert_eq!(err.reason(), "csr_not_pem");
}

#[test]
fn valid_der_with_trailing_bytes_is_refused_as_csr_trailing_data() {
    let mut der = pem_der(good_csr());
    der.extend_from_slice(&[0, 0, 0]);
    let err = refuse(pem::encode("CERTIFICATE REQUEST", &der).as_bytes());
    assert_eq!(err, CsrError::TrailingData(3));
    assert_eq!(err.reason(), "csr_trailing_data");
}

#[test]
fn truncated_der_is_refused_as_csr_malformed() {
    let der = pem_der(good_csr());
    for cut in [1, 10, der.len() / 2, der.len() - 1] {
        let err = refuse(pem::encode("CERTIFICATE REQUEST", &der[..cut]).as_bytes());
        assert!(
            matches!(err, CsrError::Malformed(_)),
            "cut at {cut}: {err:?}"
        );
        assert_eq!(err.reason(), "csr_malformed");
    }
    let err = refuse(pem::encode("CERTIFICATE REQUEST", &[]).as_bytes());
    assert_eq!(err.reason(), "csr_malformed");
}

// ---- CSR keys ----

#[test]
fn rsa_1024_key_is_never_accepted() {
    let csr = openssl_csr(openssl_key(Key::Rsa1024), "/O=x", &["-addext", SAN_ID]);
    // The key policy runs before the signature check, so the reason names the size.
    let err = refuse(&csr);
    assert_eq!(
        err,
        CsrError::RsaKeySize {
            bits: 1024,
            min: 2048,
            max: 8192
        }
    );
    assert_eq!(err.reason(), "csr_key_size");
}

#[test]
fn other_name_sans_are_ignored_by_the_workload_profile_and_refused_by_the_kubernetes_one() {
    let csr = openssl_csr(
        openssl_key(Key::P256),
        "/O=x",
        &[
            "-addext",
            "subjectAltName=URI:spiffe://cluster.local/ns/default/sa/bookinfo,otherName:1.3.6.1.4.1.311.20.2.3;UTF8:foo@bar",
        ],
    );
    let der = issue_workload_for(&csr);
    let cert = parse_cert(&der);
    let san = cert.subject_alternative_name().unwrap().unwrap();
    assert_eq!(san.value.general_names.len(), 1, "only the identity");
    let validated = validate_csr(&csr, &CsrPolicy::default()).unwrap();
    let err = meshca_pki::profile::check_kubernetes_policy(
        &meshca_pki::KubernetesProfile::default(),
        &validated,
        &[],
    )
    .unwrap_err();
    assert_eq!(err.reason(), "policy_other_san");
}

#[test]
fn kubernetes_certificate_that_would_name_nobody_is_refused() {
    let csr = openssl_csr(openssl_key(Key::P256), "/", &[]);
    let validated = validate_csr(&csr, &CsrPolicy::default()).unwrap();
    let profile = meshca_pki::KubernetesProfile {
        sans: meshca_pki::SanPolicy {
            min_uris: 0,
            ..meshca_pki::SanPolicy::default()
        },
        ..meshca_pki::KubernetesProfile::default()
    };
    let err = meshca_pki::profile::check_kubernetes_policy(&profile, &validated, &[]).unwrap_err();
    assert_eq!(err.reason(), "policy_no_name");
}

#[test]
fn rsa_key_above_policy_max_is_refused_as_csr_key_size() {
    let csr = openssl_csr(openssl_key(Key::Rsa3072), "/O=x", &["-addext", SAN_ID]);
    let policy = CsrPolicy {
        rsa_max_bits: 2048,
        ..CsrPolicy::default()
    };
    let err = refuse_with(&csr, &policy);
    assert_eq!(
        err,
        CsrError::RsaKeySize {
            bits: 3072,
            min: 2048,
            max: 2048
        }
    );
    assert_eq!(err.reason(), "csr_key_size");
    assert!(validate_csr(&csr, &CsrPolicy::default()).is_ok());
}

#[test]
fn p521_key_is_refused_as_csr_key_curve() {
    let csr = openssl_csr(openssl_key(Key::P521), "/O=x", &["-addext", SAN_ID]);
    let err = refuse(&csr);
    assert_eq!(err, CsrError::Curve("1.3.132.0.35".into()));
    assert_eq!(err.reason(), "csr_key_curve");
}

#[test]
fn key_types_disabled_by_policy_are_refused() {
    let rsa = good_csr();
    let p256 = p256_csr("/O=x", &["-addext", SAN_ID]);
    let p384 = openssl_csr(openssl_key(Key::P384), "/O=x", &["-addext", SAN_ID]);
    let ed = openssl_csr(openssl_key(Key::Ed25519), "/O=x", &["-addext", SAN_ID]);
    let all = CsrPolicy::default();
    for csr in [rsa, &p256[..], &p384[..], &ed[..]] {
        validate_csr(csr, &all).unwrap();
    }
    let err = refuse_with(
        rsa,
        &CsrPolicy {
            allow_rsa: false,
            ..all.clone()
        },
    );
    assert_eq!(err, CsrError::KeyAlgorithm("RSA".into()));
    assert_eq!(err.reason(), "csr_key_algorithm");
    let err = refuse_with(
        &ed,
        &CsrPolicy {
            allow_ed25519: false,
            ..all.clone()
        },
    );
    assert_eq!(err, CsrError::KeyAlgorithm("Ed25519".into()));
    assert_eq!(err.reason(), "csr_key_algorithm");
    let err = refuse_with(
        &p256,
        &CsrPolicy {
            allow_p256: false,
            ..all.clone()
        },
    );
    assert_eq!(err, CsrError::Curve("P-256".into()));
    assert_eq!(err.reason(), "csr_key_curve");
    let err = refuse_with(
        &p384,
        &CsrPolicy {
            allow_p384: false,
            ..all.clone()
        },
    );
    assert_eq!(err, CsrError::Curve("P-384".into()));
    // Disabling one type leaves the others alone.
    validate_csr(
        &p384,
        &CsrPolicy {
            allow_p256: false,
            ..all
        },
    )
    .unwrap();
}

// ---- CSR signatures ----

#[test]
fn sha1_signed_rsa_csr_is_refused_as_csr_weak_signature_algorithm() {
    let csr = openssl_csr(
        openssl_key(Key::Rsa2048),
        "/O=x",
        &["-sha1", "-addext", SAN_ID],
    );
    let err = refuse(&csr);
    assert_eq!(
        err,
        CsrError::WeakSignatureAlgorithm("1.2.840.113549.1.1.5".into())
    );
    assert_eq!(err.reason(), "csr_weak_signature_algorithm");
}

#[test]
fn sha1_signed_ecdsa_csr_is_refused_as_csr_weak_signature_algorithm() {
    let csr = p256_csr("/O=x", &["-sha1", "-addext", SAN_ID]);
    let err = refuse(&csr);
    assert_eq!(
        err,
        CsrError::WeakSignatureAlgorithm("1.2.840.10045.4.1".into())
    );
    assert_eq!(err.reason(), "csr_weak_signature_algorithm");
}

#[test]
fn md5_signed_csr_is_refused_as_csr_weak_signature_algorithm() {
    let csr = openssl_csr(
        openssl_key(Key::Rsa2048),
        "/O=x",
        &["-md5", "-addext", SAN_ID],
    );
    let err = refuse(&csr);
    assert_eq!(
        err,
        CsrError::WeakSignatureAlgorithm("1.2.840.113549.1.1.4".into())
    );
    assert_eq!(err.reason(), "csr_weak_signature_algorithm");
}

#[test]
fn rsa_pss_signed_csr_is_refused_as_csr_signature_algorithm() {
    let csr = openssl_csr(
        openssl_key(Key::Rsa2048),
        "/O=x",
        &["-sigopt", "rsa_padding_mode:pss", "-addext", SAN_ID],
    );
    let err = refuse(&csr);
    assert_eq!(
        err,
        CsrError::SignatureAlgorithm("1.2.840.113549.1.1.10".into())
    );
    assert_eq!(err.reason(), "csr_signature_algorithm");
}

#[test]
fn flipped_signature_bytes_are_refused_as_csr_signature_invalid() {
    for csr in [good_csr().to_vec(), p256_csr("/O=x", &["-addext", SAN_ID])] {
        let mut der = pem_der(&csr);
        let last = der.len() - 1;
        der[last] ^= 0x01;
        let err = refuse(pem::encode("CERTIFICATE REQUEST", &der).as_bytes());
        assert_eq!(err, CsrError::BadSignature);
        assert_eq!(err.reason(), "csr_signature_invalid");
    }
}

#[test]
fn csr_whose_signed_subject_was_altered_is_refused_as_csr_signature_invalid() {
    let mut der = pem_der(good_csr());
    // "/O=x": change the value byte 'x' to 'y' (same length, still valid DER).
    let pos = der
        .windows(5)
        .position(|w| w == [0x55, 0x04, 0x0a, 0x0c, 0x01])
        .expect("O attribute")
        + 5;
    assert_eq!(der[pos], b'x');
    der[pos] = b'y';
    let err = refuse(pem::encode("CERTIFICATE REQUEST", &der).as_bytes());
    assert_eq!(err, CsrError::BadSignature);
}

// ---- CA bundles ----

struct Files {
    cert: Vec<u8>,
    key: Vec<u8>,
    chain: Option<Vec<u8>>,
    roots: Option<Vec<u8>>,
}

fn load(files: &Files, now: OffsetDateTime) -> Result<CaBundle, BundleError> {
    CaBundle::load(
        &BundleSources {
            cert: Source {
                name: "ca-cert.pem",
                bytes: &files.cert,
            },
            key: Source {
                name: "ca-key.pem",
                bytes: &files.key,
            },
            chain: files.chain.as_deref().map(|bytes| Source {
                name: "cert-chain.pem",
                bytes,
            }),
            roots: files.roots.as_deref().map(|bytes| Source {
                name: "root-cert.pem",
                bytes,
            }),
        },
        now,
    )
}

fn files_of(ca: &TestCa) -> Files {
    let chain: String = ca
        .intermediates
        .iter()
        .chain(&ca.roots)
        .map(|c| to_pem(c))
        .collect();
    Files {
        cert: ca.bundle.signing_cert_pem().as_bytes().to_vec(),
        key: ca.bundle.key().to_pkcs8_pem().unwrap().as_bytes().to_vec(),
        chain: Some(chain.into_bytes()),
        roots: Some(ca.bundle.roots_pem().as_bytes().to_vec()),
    }
}

/// A self-signed openssl certificate with the extension section `section` of
/// common::OPENSSL_CNF; returns (cert PEM, key PEM).
fn openssl_self_signed(section: &str) -> (Vec<u8>, Vec<u8>) {
    let dir = tempdir();
    let d = dir.path();
    std::fs::write(d.join("k.pem"), openssl_key(Key::P256)).unwrap();
    openssl(
        d,
        &[
            "req",
            "-x509",
            "-new",
            "-key",
            "k.pem",
            "-days",
            "30",
            "-subj",
            "/O=test/CN=test",
            "-extensions",
            section,
            "-out",
            "c.pem",
        ],
    );
    (
        std::fs::read(d.join("c.pem")).unwrap(),
        openssl_key(Key::P256).to_vec(),
    )
}

#[test]
fn intact_bundle_files_load() {
    for kind in ALL_CAS {
        load(&files_of(test_ca(kind)), now()).unwrap_or_else(|e| panic!("{kind:?}: {e}"));
    }
}

#[test]
fn key_not_matching_the_cert_is_refused_naming_the_key_file() {
    let mut files = files_of(test_ca(CaKind::P256Root));
    files.key = test_ca(CaKind::P384Root)
        .bundle
        .key()
        .to_pkcs8_pem()
        .unwrap()
        .as_bytes()
        .to_vec();
    let err = load(&files, now()).unwrap_err();
    assert_eq!(err.file, "ca-key.pem");
    assert!(err.problem.contains("does not match"), "{err}");
    // Same key type, different key.
    files.key = openssl_key(Key::P256).to_vec();
    let err = load(&files, now()).unwrap_err();
    assert_eq!(err.file, "ca-key.pem");
}

#[test]
fn non_ca_cert_as_ca_cert_is_refused() {
    let (cert, key) = openssl_self_signed("not_ca");
    let files = Files {
        cert: cert.clone(),
        key: key.clone(),
        chain: None,
        roots: None,
    };
    let err = load(&files, now()).unwrap_err();
    assert_eq!(err.file, "ca-cert.pem");
    assert!(err.problem.contains("is not a CA"), "{err}");

    // A leaf the library issued, with its (openssl) key, as ca-cert.pem.
    let ca = test_ca(CaKind::P256Root);
    let csr = validate_csr(
        &p256_csr("/O=x", &["-addext", SAN_ID]),
        &CsrPolicy::default(),
    )
    .unwrap();
    let leaf = profile::issue_workload(
        &WorkloadProfile::default(),
        &ca.bundle,
        &csr,
        &[ID.into()],
        3600,
        false,
        now(),
    )
    .unwrap();
    let files = Files {
        cert: to_pem(&leaf).into_bytes(),
        key,
        chain: None,
        roots: Some(ca.bundle.roots_pem().into()),
    };
    let err = load(&files, now()).unwrap_err();
    assert_eq!(err.file, "ca-cert.pem");
    assert!(err.problem.contains("is not a CA"), "{err}");
}

#[test]
fn ca_cert_without_key_cert_sign_is_refused() {
    for section in ["ca_without_cert_sign", "ca_without_key_usage"] {
        let (cert, key) = openssl_self_signed(section);
        let err = load(
            &Files {
                cert,
                key,
                chain: None,
                roots: None,
            },
            now(),
        )
        .unwrap_err();
        assert_eq!(err.file, "ca-cert.pem", "{section}");
        assert!(err.problem.contains("keyCertSign"), "{section}: {err}");
    }
    // Control: the same shape with keyCertSign loads.
    let (cert, key) = openssl_self_signed("root_ca");
    load(
        &Files {
            cert,
            key,
            chain: None,
            roots: None,
        },
        now(),
    )
    .unwrap();
}

#[test]
fn expired_or_not_yet_valid_ca_is_refused() {
    let ca = test_ca(CaKind::P256Root);
    let files = files_of(ca);
    let future = ca.bundle.not_after() + Duration::from_secs(1);
    let err = load(&files, future).unwrap_err();
    assert_eq!(err.file, "ca-cert.pem");
    assert!(err.problem.contains("expired"), "{err}");
    let far = now() + Duration::from_secs(100 * 365 * DAY as u64);
    assert!(load(&files, far).unwrap_err().problem.contains("expired"));
    // NotBefore may be up to 5 minutes ahead (clock skew); beyond that, refused.
    let past = ca.bundle.not_before() - Duration::from_secs(301);
    let err = load(&files, past).unwrap_err();
    assert_eq!(err.file, "ca-cert.pem");
    assert!(err.problem.contains("not valid before"), "{err}");

    // An intermediate bundle whose intermediate is valid but root expired is
    // caught by the chain walk too: use an expired-at-load `now` for from_parts.
    let inter = test_ca(CaKind::Rsa2048RootP256Intermediate);
    let key =
        meshca_pki::SigningKey::from_pem(inter.bundle.key().to_pkcs8_pem().unwrap().as_bytes())
            .unwrap();
    let err = CaBundle::from_parts(
        key,
        inter.bundle.signing_cert_der().to_vec(),
        vec![],
        inter.roots.clone(),
        far,
    )
    .unwrap_err();
    assert!(err.problem.contains("expired"), "{err}");
}

#[test]
fn chain_that_does_not_reach_the_roots_is_refused_naming_cert_chain() {
    let inter = test_ca(CaKind::Rsa2048RootP256Intermediate);
    let other_root = test_ca(CaKind::P256Root);
    let mut files = files_of(inter);
    // Roots from another CA.
    files.roots = Some(other_root.bundle.roots_pem().as_bytes().to_vec());
    files.chain = Some(to_pem(&inter.intermediates[0]).into_bytes());
    let err = load(&files, now()).unwrap_err();
    assert_eq!(err.file, "cert-chain.pem", "{err}");
    assert!(err.problem.contains("does not verify to a root"), "{err}");
    // cert-chain.pem carrying the (wrong) root, not among the roots.
    let mut files = files_of(inter);
    files.roots = Some(other_root.bundle.roots_pem().as_bytes().to_vec());
    let err = load(&files, now()).unwrap_err();
    assert_eq!(
        err.file, "root-cert.pem",
        "self-signed chain end not among the roots: {err}"
    );
}

#[test]
fn empty_root_file_is_refused() {
    for empty in [&b""[..], b"\n  \n"] {
        let mut files = files_of(test_ca(CaKind::P256Root));
        files.roots = Some(empty.to_vec());
        let err = load(&files, now()).unwrap_err();
        assert_eq!(
            err,
            BundleError::new("root-cert.pem", "contains no certificate")
        );
    }
}

#[test]
fn partial_bundle_is_refused_naming_the_missing_part() {
    let ca = test_ca(CaKind::P256Root);
    // Key file without a private key block.
    let mut files = files_of(ca);
    files.key = ca.bundle.signing_cert_pem().as_bytes().to_vec();
    let err = load(&files, now()).unwrap_err();
    assert_eq!(err.file, "ca-key.pem", "{err}");
    // Empty key file.
    files.key = Vec::new();
    assert_eq!(load(&files, now()).unwrap_err().file, "ca-key.pem");
    // Empty cert file.
    let mut files = files_of(ca);
    files.cert = Vec::new();
    assert_eq!(
        load(&files, now()).unwrap_err(),
        BundleError::new("ca-cert.pem", "contains no certificate")
    );
    // A key block in the cert file.
    let mut files = files_of(ca);
    files.cert.extend_from_slice(&files.key.clone());
    assert_eq!(load(&files, now()).unwrap_err().file, "ca-cert.pem");
}

// ---- TTL and signer validity ----

fn workload(ca: &TestCa, ttl: i64, now: OffsetDateTime) -> Result<Vec<u8>, Error> {
    let csr = validate_csr(good_csr(), &CsrPolicy::default()).unwrap();
    profile::issue_workload(
        &WorkloadProfile::default(),
        &ca.bundle,
        &csr,
        &[ID.into()],
        ttl,
        false,
        now,
    )
}

#[test]
fn workload_ttl_above_90_days_is_refused_as_ttl_too_long() {
    let ca = test_ca(CaKind::P256Root);
    let max = 90 * DAY;
    let err = workload(ca, max + 1, now()).unwrap_err();
    assert_eq!(
        err,
        Error::TtlTooLong {
            requested: max + 1,
            max
        }
    );
    assert_eq!(err.reason(), "ttl_too_long");
    assert_eq!(err.kind(), ErrorKind::TtlError);
    assert_eq!(err.grpc_code(), GrpcCode::InvalidArgument);
    assert_eq!(
        workload(ca, i64::MAX, now()).unwrap_err().reason(),
        "ttl_too_long"
    );
    // Exactly the max is granted as asked.
    let now = now();
    let der = workload(ca, max, now).unwrap();
    assert_eq!(
        parse_cert(&der).validity().not_after.to_datetime(),
        now + Duration::from_secs(max as u64)
    );
    // Through LocalCa as well.
    let local = LocalCa::new(
        ca.bundle.clone(),
        CsrPolicy::default(),
        WorkloadProfile::default(),
    );
    let ids = [ID.to_owned()];
    let err = local
        .sign(
            good_csr(),
            &CertOptions {
                subject_ids: &ids,
                ttl_seconds: max + 1,
                for_ca: false,
            },
        )
        .unwrap_err();
    assert_eq!(err.reason(), "ttl_too_long");
}

#[test]
fn workload_ttl_zero_or_negative_gets_the_24h_default() {
    let ca = test_ca(CaKind::P256Root);
    let now = now();
    for ttl in [0, -1, -3600, i64::MIN] {
        let der = workload(ca, ttl, now).unwrap();
        assert_eq!(
            parse_cert(&der).validity().not_after.to_datetime(),
            now + Duration::from_secs(DAY as u64),
            "ttl {ttl}"
        );
    }
}

#[test]
fn expired_signer_refuses_to_issue_as_ca_expired() {
    let ca = test_ca(CaKind::P256Root);
    let csr = validate_csr(good_csr(), &CsrPolicy::default()).unwrap();
    for at in [
        ca.bundle.not_after(),
        ca.bundle.not_after() + Duration::from_secs(3600),
    ] {
        let err = workload(ca, 3600, at).unwrap_err();
        assert!(matches!(err, Error::CaExpired(_)), "{err:?}");
        assert_eq!(err.reason(), "ca_expired");
        assert_eq!(err.kind(), ErrorKind::CaNotReady);
        assert_eq!(err.grpc_code(), GrpcCode::Internal);
        let usages: Vec<String> = ISTIOD_USAGES.iter().map(|u| (*u).to_owned()).collect();
        let err = profile::issue_kubernetes(
            &KubernetesProfile::default(),
            &ca.bundle,
            &csr,
            &usages,
            None,
            at,
        )
        .unwrap_err();
        assert_eq!(err.reason(), "ca_expired");
    }
    // One second before expiry still issues (clamped to the CA's NotAfter).
    let der = workload(ca, 3600, ca.bundle.not_after() - Duration::from_secs(1)).unwrap();
    assert_eq!(
        parse_cert(&der).validity().not_after.to_datetime(),
        ca.bundle.not_after()
    );
}

#[test]
fn ca_without_material_refuses_as_ca_not_ready() {
    let local = LocalCa::not_ready(CsrPolicy::default(), WorkloadProfile::default());
    let ids = [ID.to_owned()];
    let err = local
        .sign(
            good_csr(),
            &CertOptions {
                subject_ids: &ids,
                ttl_seconds: 0,
                for_ca: false,
            },
        )
        .unwrap_err();
    assert_eq!(err.reason(), "ca_not_ready");
    assert_eq!(err.grpc_code(), GrpcCode::Internal);
    assert!(local.bundle().is_none());
}

// ---- Kubernetes signer policy ----

fn usages() -> Vec<String> {
    ISTIOD_USAGES.iter().map(|u| (*u).to_owned()).collect()
}

fn kube(profile: &KubernetesProfile, csr_pem: &[u8], usages: &[String]) -> Result<Vec<u8>, Error> {
    let csr = validate_csr(csr_pem, &CsrPolicy::default()).unwrap();
    let ca = test_ca(CaKind::P256Root);
    profile::issue_kubernetes(profile, &ca.bundle, &csr, usages, Some(3600), now())
}

fn kube_violation(csr_pem: &[u8]) -> PolicyViolation {
    kube_violation_with(&KubernetesProfile::default(), csr_pem, &usages())
}

fn kube_violation_with(
    profile: &KubernetesProfile,
    csr_pem: &[u8],
    usages: &[String],
) -> PolicyViolation {
    match kube(profile, csr_pem, usages) {
        Err(Error::Policy(v)) => {
            let e = Error::Policy(v.clone());
            assert_eq!(e.reason(), v.reason());
            assert_eq!(e.grpc_code(), GrpcCode::InvalidArgument);
            v
        }
        other => panic!("expected a policy violation, got {other:?}"),
    }
}

#[test]
fn kubernetes_csr_with_two_uri_sans_is_refused() {
    let csr = p256_csr(
        "/O=x",
        &[
            "-addext",
            "subjectAltName=URI:spiffe://cluster.local/ns/a/sa/b,URI:spiffe://cluster.local/ns/a/sa/c",
        ],
    );
    let v = kube_violation(&csr);
    assert_eq!(
        v,
        PolicyViolation::UriSanCount {
            expected: "1".into(),
            found: 2
        }
    );
    assert_eq!(v.reason(), "policy_uri_san_count");
}

#[test]
fn kubernetes_csr_without_uri_san_is_refused() {
    let v = kube_violation(&p256_csr("/O=x", &[]));
    assert_eq!(
        v,
        PolicyViolation::UriSanCount {
            expected: "1".into(),
            found: 0
        }
    );
    assert_eq!(v.reason(), "policy_uri_san_count");
}

#[test]
fn kubernetes_csr_with_non_spiffe_uri_is_refused() {
    let v = kube_violation(&p256_csr(
        "/O=x",
        &[
            "-addext",
            "subjectAltName=URI:https://example.com/ns/a/sa/b",
        ],
    ));
    assert_eq!(
        v,
        PolicyViolation::UriNotSpiffe("https://example.com/ns/a/sa/b".into())
    );
    assert_eq!(v.reason(), "policy_uri_not_spiffe");
}

#[test]
fn kubernetes_csr_with_disallowed_trust_domain_is_refused() {
    let v = kube_violation(&p256_csr(
        "/O=x",
        &["-addext", "subjectAltName=URI:spiffe://evil.org/ns/a/sa/b"],
    ));
    assert_eq!(v, PolicyViolation::TrustDomain("evil.org".into()));
    assert_eq!(v.reason(), "policy_trust_domain");
}

#[test]
fn kubernetes_csr_with_dns_san_is_refused() {
    let v = kube_violation(&p256_csr(
        "/O=x",
        &["-addext", &format!("{SAN_ID},DNS:evil.com")],
    ));
    assert_eq!(v, PolicyViolation::DnsSan("evil.com".into()));
    assert_eq!(v.reason(), "policy_dns_san");
}

#[test]
fn kubernetes_csr_with_ip_san_is_refused() {
    let v = kube_violation(&p256_csr(
        "/O=x",
        &["-addext", &format!("{SAN_ID},IP:10.0.0.1")],
    ));
    assert_eq!(v, PolicyViolation::IpSan("10.0.0.1".into()));
    assert_eq!(v.reason(), "policy_ip_san");
}

#[test]
fn kubernetes_csr_with_email_san_is_refused() {
    let v = kube_violation(&p256_csr(
        "/O=x",
        &["-addext", &format!("{SAN_ID},email:a@example.com")],
    ));
    assert_eq!(v, PolicyViolation::EmailSan("a@example.com".into()));
    assert_eq!(v.reason(), "policy_email_san");
}

#[test]
fn kubernetes_csr_with_subject_under_require_empty_is_refused() {
    let profile = KubernetesProfile {
        subject: SubjectRule::RequireEmpty,
        ..KubernetesProfile::default()
    };
    let v = kube_violation_with(&profile, &p256_csr("/O=x", &["-addext", SAN_ID]), &usages());
    assert!(
        matches!(&v, PolicyViolation::SubjectNotEmpty(s) if s.contains("O=x")),
        "{v:?}"
    );
    assert_eq!(v.reason(), "policy_subject_not_empty");
    // An empty subject passes, and the SAN is then critical.
    let der = kube(&profile, &p256_csr("/", &["-addext", SAN_ID]), &usages()).unwrap();
    let cert = parse_cert(&der);
    assert_eq!(cert.subject().as_raw(), cert::EMPTY_NAME);
    assert_eq!(sans(&cert), Some((true, vec![format!("URI:{ID}")])));
}

#[test]
fn kubernetes_unknown_usage_is_refused() {
    let csr = p256_csr("/O=x", &["-addext", SAN_ID]);
    let mut u = usages();
    u.push("frobnicate".into());
    let v = kube_violation_with(&KubernetesProfile::default(), &csr, &u);
    assert_eq!(v, PolicyViolation::UnknownUsage("frobnicate".into()));
    assert_eq!(v.reason(), "policy_usage_unknown");
}

#[test]
fn kubernetes_disallowed_usage_cert_sign_is_refused() {
    let csr = p256_csr("/O=x", &["-addext", SAN_ID]);
    let mut u = usages();
    u.push("cert sign".into());
    let v = kube_violation_with(&KubernetesProfile::default(), &csr, &u);
    assert_eq!(v, PolicyViolation::UsageNotAllowed("cert sign".into()));
    assert_eq!(v.reason(), "policy_usage_not_allowed");
}

#[test]
fn kubernetes_csr_requesting_ca_true_is_refused() {
    let csr = p256_csr(
        "/O=x",
        &[
            "-addext",
            SAN_ID,
            "-addext",
            "basicConstraints=critical,CA:TRUE",
        ],
    );
    assert!(
        validate_csr(&csr, &CsrPolicy::default())
            .unwrap()
            .requests_ca
    );
    let v = kube_violation(&csr);
    assert_eq!(v, PolicyViolation::CaRequested);
    assert_eq!(v.reason(), "policy_ca_requested");
}

// ---- Tolerated, never copied ----

fn issue_workload_for(csr_pem: &[u8]) -> Vec<u8> {
    let ca = test_ca(CaKind::P256Root);
    let csr = validate_csr(csr_pem, &CsrPolicy::default()).unwrap();
    let der = profile::issue_workload(
        &WorkloadProfile::default(),
        &ca.bundle,
        &csr,
        &[ID.into()],
        3600,
        false,
        now(),
    )
    .unwrap();
    openssl_verify(&der, &ca.intermediates, &ca.roots);
    der
}

#[test]
fn workload_csr_requesting_ca_true_gets_ca_false() {
    let csr = p256_csr(
        "/O=x",
        &[
            "-addext",
            SAN_ID,
            "-addext",
            "basicConstraints=critical,CA:TRUE",
        ],
    );
    let der = issue_workload_for(&csr);
    let cert = parse_cert(&der);
    assert_not_ca(&cert);
    // A P-256 key: digitalSignature only (keyEncipherment is RSA-only).
    assert_key_usage(&cert, 0b001);
    // Through LocalCa too.
    let local = LocalCa::new(
        Arc::clone(&test_ca(CaKind::P256Root).bundle),
        CsrPolicy::default(),
        WorkloadProfile::default(),
    );
    let ids = [ID.to_owned()];
    let leaf = local
        .sign(
            &csr,
            &CertOptions {
                subject_ids: &ids,
                ttl_seconds: 0,
                for_ca: false,
            },
        )
        .unwrap();
    assert_not_ca(&parse_cert(&pem_der(leaf.as_bytes())));
}

#[test]
fn unknown_csr_extensions_are_tolerated_but_not_copied() {
    let csr = p256_csr(
        "/O=x",
        &[
            "-addext",
            SAN_ID,
            "-addext",
            "1.2.3.4.5=ASN1:UTF8String:hello",
            "-addext",
            "nsComment=hi",
        ],
    );
    let der = issue_workload_for(&csr);
    let cert = parse_cert(&der);
    let unknown = Oid::from(&[1, 2, 3, 4, 5]).unwrap();
    assert!(
        cert.extensions().iter().all(|e| e.oid != unknown),
        "1.2.3.4.5 was copied"
    );
    let oids: Vec<String> = cert
        .extensions()
        .iter()
        .map(|e| e.oid.to_id_string())
        .collect();
    let mut sorted = oids.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        [
            "2.5.29.14",
            "2.5.29.15",
            "2.5.29.17",
            "2.5.29.19",
            "2.5.29.35",
            "2.5.29.37"
        ],
        "{oids:?}"
    );
    assert!(!der.windows(5).any(|w| w == b"hello"));
    // Kubernetes profile: accepted and not copied either.
    let der = kube(&KubernetesProfile::default(), &csr, &usages()).unwrap();
    assert!(
        parse_cert(&der)
            .extensions()
            .iter()
            .all(|e| e.oid != unknown)
    );
}

#[test]
fn workload_profile_ignores_csr_sans_and_certifies_only_the_identity() {
    let csr = p256_csr(
        "/O=x",
        &[
            "-addext",
            "subjectAltName=DNS:evil.com,URI:spiffe://cluster.local/ns/kube-system/sa/admin,IP:1.2.3.4",
        ],
    );
    let der = issue_workload_for(&csr);
    let cert = parse_cert(&der);
    assert_eq!(sans(&cert), Some((true, vec![format!("URI:{ID}")])));
    assert_eq!(
        cert.subject().as_raw(),
        cert::EMPTY_NAME,
        "no CN in the CSR -> empty subject"
    );
}

#[test]
fn workload_identity_longer_than_64_chars_is_san_only_even_with_cn() {
    let ca = test_ca(CaKind::P256Root);
    let csr = validate_csr(&p256_csr("/CN=client", &[]), &CsrPolicy::default()).unwrap();
    let long = format!("spiffe://cluster.local/ns/default/sa/{}", "a".repeat(40));
    assert!(long.len() > 64);
    let der = profile::issue_workload(
        &WorkloadProfile::default(),
        &ca.bundle,
        &csr,
        std::slice::from_ref(&long),
        3600,
        false,
        now(),
    )
    .unwrap();
    let cert = parse_cert(&der);
    assert_eq!(cert.subject().as_raw(), cert::EMPTY_NAME);
    assert_eq!(sans(&cert), Some((true, vec![format!("URI:{long}")])));
    let der = profile::issue_workload(
        &WorkloadProfile::default(),
        &ca.bundle,
        &csr,
        &[ID.into()],
        3600,
        false,
        now(),
    )
    .unwrap();
    assert_eq!(
        parse_cert(&der).subject().as_raw(),
        &cert::common_name(ID)[..]
    );
}

#[test]
fn unusable_ca_key_files_are_refused_naming_the_key_file() {
    let dir = tempdir();
    let d = dir.path();
    // A P-521 CA: the curve is not supported for signing.
    std::fs::write(d.join("k.pem"), openssl_key(Key::P521)).unwrap();
    openssl(
        d,
        &[
            "req",
            "-x509",
            "-new",
            "-key",
            "k.pem",
            "-days",
            "30",
            "-subj",
            "/O=p521",
            "-extensions",
            "root_ca",
            "-out",
            "c.pem",
        ],
    );
    let files = Files {
        cert: std::fs::read(d.join("c.pem")).unwrap(),
        key: openssl_key(Key::P521).to_vec(),
        chain: None,
        roots: None,
    };
    let err = load(&files, now()).unwrap_err();
    assert_eq!(err.file, "ca-key.pem", "{err}");

    // An encrypted PKCS#8 key.
    std::fs::write(d.join("p256.pem"), openssl_key(Key::P256)).unwrap();
    openssl(
        d,
        &[
            "pkcs8",
            "-topk8",
            "-in",
            "p256.pem",
            "-passout",
            "pass:secret",
            "-v2",
            "aes-256-cbc",
            "-out",
            "enc.pem",
        ],
    );
    let (cert, _) = openssl_self_signed("root_ca");
    let files = Files {
        cert,
        key: std::fs::read(d.join("enc.pem")).unwrap(),
        chain: None,
        roots: None,
    };
    let err = load(&files, now()).unwrap_err();
    assert_eq!(err.file, "ca-key.pem", "{err}");
    assert!(!err.problem.contains("secret"));
}
