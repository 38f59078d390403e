//! Interoperability with the real `openssl` CLI: CSRs made by openssl are
//! issued through both profiles by CAs of every kind, and every issued chain
//! is checked by `openssl verify`, by rustls-webpki and field by field.
//! Also: CA bundles whose files openssl wrote.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use meshca_pki::profile::{self, ISTIOD_USAGES, KubernetesProfile, WorkloadProfile};
use meshca_pki::{
    BundleSources, CaBundle, CertOptions, CsrPolicy, KeyType, LocalCa, Source, cert, validate_csr,
};
use time::OffsetDateTime;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::prelude::FromDer;

const WORKLOAD_TTL: i64 = 12 * 3600;
const DAY: i64 = 24 * 3600;

fn usages() -> Vec<String> {
    ISTIOD_USAGES.iter().map(|u| (*u).to_owned()).collect()
}

fn csr_has_cn(csr_pem: &[u8]) -> bool {
    let der = pem_der(csr_pem);
    let (_, csr) = X509CertificationRequest::from_der(&der).unwrap();
    csr.certification_request_info
        .subject
        .iter_common_name()
        .next()
        .is_some()
}

/// Fields every issued leaf must have, whatever the profile.
fn assert_common_leaf_fields(ca: &TestCa, csr_pem: &[u8], der: &[u8]) {
    let cert = parse_cert(der);
    let signing = ca.signing_cert();
    let (_, csr_spki) = csr_subject_and_spki(csr_pem);
    assert_eq!(
        cert.public_key().raw,
        &csr_spki[..],
        "leaf SPKI must be the CSR's SPKI byte for byte"
    );
    assert_eq!(
        cert.issuer().as_raw(),
        signing.subject().as_raw(),
        "issuer bytes == CA subject bytes"
    );
    let ca_ski = subject_key_id(&signing).expect("CA has a SubjectKeyIdentifier");
    assert_eq!(
        authority_key_id(&cert).as_deref(),
        Some(&ca_ski[..]),
        "AKI == CA SKI"
    );
    assert_eq!(ca.bundle.key_id(), &ca_ski[..]);
    // SKI: RFC 5280 method 1, SHA-1 of the CSR's subjectPublicKey bits.
    let csr_der = pem_der(csr_pem);
    let (_, parsed_csr) = X509CertificationRequest::from_der(&csr_der).unwrap();
    let key_bits = &parsed_csr
        .certification_request_info
        .subject_pki
        .subject_public_key
        .data;
    assert_eq!(
        subject_key_id(&cert),
        Some(cert::key_identifier(key_bits)),
        "leaf SKI"
    );
    assert_serial_ok(&cert);
    // keyEncipherment only for RSA keys (RFC 8813 / RFC 8410).
    let rsa = cert.public_key().algorithm.algorithm.to_id_string() == "1.2.840.113549.1.1.1";
    assert_key_usage(&cert, if rsa { 0b101 } else { 0b001 });
    assert_server_and_client_auth(&cert);
    assert_not_ca(&cert);
    assert_eq!(cert.version().0, 2, "X.509 v3");
}

fn verify_everywhere(ca: &TestCa, der: &[u8], at: OffsetDateTime) {
    openssl_verify(der, &ca.intermediates, &ca.roots);
    webpki_verify(der, &ca.intermediates, &ca.roots, at);
}

fn openssl_text_has_leaf_profile(der: &[u8], san_critical: bool) {
    let text = openssl_text(der);
    let san_header = if san_critical {
        "X509v3 Subject Alternative Name: critical"
    } else {
        "X509v3 Subject Alternative Name: \n"
    };
    assert!(
        text.contains(san_header),
        "SAN criticality wrong in:\n{text}"
    );
    assert!(text.contains(&format!("URI:{ID}\n")), "{text}");
    // keyEncipherment only for RSA keys (RFC 8813 / RFC 8410).
    let usages = if text.contains("Public Key Algorithm: rsaEncryption") {
        "Digital Signature, Key Encipherment"
    } else {
        "Digital Signature"
    };
    assert!(
        text.contains(&format!(
            "X509v3 Key Usage: critical\n                {usages}\n"
        )),
        "{text}"
    );
    assert!(
        text.contains("TLS Web Server Authentication, TLS Web Client Authentication"),
        "{text}"
    );
    assert!(
        text.contains("X509v3 Basic Constraints: critical\n                CA:FALSE"),
        "{text}"
    );
    assert!(text.contains("X509v3 Authority Key Identifier"), "{text}");
}

fn check_workload(ca: &TestCa, csr_pem: &[u8], now: OffsetDateTime) {
    let csr = validate_csr(csr_pem, &CsrPolicy::default()).unwrap();
    let der = profile::issue_workload(
        &WorkloadProfile::default(),
        &ca.bundle,
        &csr,
        &[ID.to_owned()],
        WORKLOAD_TTL,
        false,
        now,
    )
    .unwrap_or_else(|e| panic!("{}: workload issuance failed: {e}", ca.name));
    assert_common_leaf_fields(ca, csr_pem, &der);
    let cert = parse_cert(&der);
    let expected_subject = if csr_has_cn(csr_pem) {
        cert::common_name(ID)
    } else {
        cert::EMPTY_NAME.to_vec()
    };
    assert_eq!(
        cert.subject().as_raw(),
        &expected_subject[..],
        "workload subject"
    );
    assert_eq!(
        sans(&cert),
        Some((true, vec![format!("URI:{ID}")])),
        "workload SAN: critical, only the identity"
    );
    let v = cert.validity();
    assert_eq!(
        v.not_before.to_datetime(),
        now - Duration::from_secs(120),
        "NotBefore = now - 2 min"
    );
    assert_eq!(
        v.not_after.to_datetime(),
        now + Duration::from_secs(WORKLOAD_TTL as u64),
        "NotAfter = now + ttl"
    );
    openssl_text_has_leaf_profile(&der, true);
    verify_everywhere(ca, &der, now);
}

fn check_kubernetes(ca: &TestCa, csr_pem: &[u8], now: OffsetDateTime) {
    let csr = validate_csr(csr_pem, &CsrPolicy::default()).unwrap();
    let der = profile::issue_kubernetes(
        &KubernetesProfile::default(),
        &ca.bundle,
        &csr,
        &usages(),
        None,
        now,
    )
    .unwrap_or_else(|e| panic!("{}: kubernetes issuance failed: {e}", ca.name));
    assert_common_leaf_fields(ca, csr_pem, &der);
    let cert = parse_cert(&der);
    let (csr_subject, _) = csr_subject_and_spki(csr_pem);
    assert_eq!(
        cert.subject().as_raw(),
        &csr_subject[..],
        "kubernetes subject is the CSR subject byte for byte"
    );
    let subject_empty = csr_subject == cert::EMPTY_NAME;
    assert_eq!(
        sans(&cert),
        Some((subject_empty, vec![format!("URI:{ID}")])),
        "kubernetes SAN copied; critical iff the subject is empty"
    );
    let v = cert.validity();
    assert_eq!(
        v.not_before.to_datetime(),
        now - Duration::from_secs(300),
        "NotBefore = now - 5 min"
    );
    // Default 24h >= 8h: backdated by 5 minutes.
    assert_eq!(
        v.not_after.to_datetime(),
        now + Duration::from_secs((DAY - 300) as u64)
    );
    openssl_text_has_leaf_profile(&der, subject_empty);
    verify_everywhere(ca, &der, now);
}

fn check_all_cas(csr_pem: &[u8]) {
    let now = now();
    for kind in ALL_CAS {
        let ca = test_ca(kind);
        check_workload(ca, csr_pem, now);
        check_kubernetes(ca, csr_pem, now);
    }
}

fn csr(key: Key, subject: &str, digest: Option<&str>) -> Vec<u8> {
    let mut extra = vec!["-addext", SAN_ID];
    if let Some(d) = digest {
        extra.push(d);
    }
    openssl_csr(openssl_key(key), subject, &extra)
}

fn assert_csr_signature(csr_pem: &[u8], name: &str) {
    let dir = tempdir();
    std::fs::write(dir.path().join("r.csr"), csr_pem).unwrap();
    let text = String::from_utf8(openssl(
        dir.path(),
        &["req", "-in", "r.csr", "-noout", "-text"],
    ))
    .unwrap();
    assert!(
        text.contains(&format!("Signature Algorithm: {name}")),
        "{text}"
    );
}

#[test]
fn rsa_2048_csr_is_issued_by_every_ca_through_both_profiles() {
    check_all_cas(&csr(Key::Rsa2048, "/O=meshca-interop", Some("-sha256")));
}

#[test]
fn rsa_3072_csr_is_issued_by_every_ca_through_both_profiles() {
    check_all_cas(&csr(Key::Rsa3072, "/O=meshca-interop", Some("-sha256")));
}

#[test]
fn rsa_4096_csr_is_issued_by_every_ca_through_both_profiles() {
    check_all_cas(&csr(Key::Rsa4096, "/O=meshca-interop", Some("-sha384")));
}

#[test]
fn p256_sha256_csr_is_issued_by_every_ca_through_both_profiles() {
    let pem = csr(Key::P256, "/O=meshca-interop", Some("-sha256"));
    assert_csr_signature(&pem, "ecdsa-with-SHA256");
    check_all_cas(&pem);
}

#[test]
fn p256_key_signed_with_sha384_is_issued_with_its_own_key_type() {
    let pem = csr(Key::P256, "/O=meshca-interop", Some("-sha384"));
    assert_csr_signature(&pem, "ecdsa-with-SHA384");
    check_all_cas(&pem);
}

#[test]
fn p384_key_signed_with_sha256_is_issued_with_its_own_key_type() {
    let pem = csr(Key::P384, "/O=meshca-interop", Some("-sha256"));
    assert_csr_signature(&pem, "ecdsa-with-SHA256");
    check_all_cas(&pem);
}

#[test]
fn p384_sha384_csr_is_issued_by_every_ca_through_both_profiles() {
    let pem = csr(Key::P384, "/O=meshca-interop", Some("-sha384"));
    assert_csr_signature(&pem, "ecdsa-with-SHA384");
    check_all_cas(&pem);
}

#[test]
fn ed25519_csr_with_empty_subject_is_issued_by_every_ca_through_both_profiles() {
    let pem = csr(Key::Ed25519, "/", None);
    assert_csr_signature(&pem, "ED25519");
    check_all_cas(&pem);
}

#[test]
fn repeated_o_and_dc_subject_is_copied_byte_exact_and_workload_gets_cn_identity() {
    let pem = csr(
        Key::P256,
        "/DC=com/DC=example/O=a/O=b/CN=x",
        Some("-sha256"),
    );
    let (subject, _) = csr_subject_and_spki(&pem);
    // Sanity: the CSR really has two DC and two O attributes.
    let der = pem_der(&pem);
    let (_, csr) = X509CertificationRequest::from_der(&der).unwrap();
    let name = &csr.certification_request_info.subject;
    assert_eq!(name.iter_organization().count(), 2);
    assert_eq!(
        name.iter_by_oid(&x509_parser::oid_registry::OID_DOMAIN_COMPONENT)
            .count(),
        2
    );
    assert!(subject.len() > 20);
    check_all_cas(&pem);
}

#[test]
fn workload_not_after_is_clamped_to_the_signing_cert_not_after() {
    let now = now();
    let short_root = root_ca(
        "short-lived root",
        KeyType::EcdsaP256,
        &cert::organization_name("cluster.local"),
        Duration::from_secs(2 * DAY as u64),
        now,
    );
    let inter = intermediate_ca(
        "short-lived intermediate",
        test_ca(CaKind::P384Root),
        KeyType::Rsa2048,
        &cert::organization_name("intermediate"),
        Duration::from_secs(3 * DAY as u64),
        now,
    );
    let pem = csr(Key::P256, "/O=meshca-interop", Some("-sha256"));
    let csr = validate_csr(&pem, &CsrPolicy::default()).unwrap();
    for ca in [&short_root, &inter] {
        let der = profile::issue_workload(
            &WorkloadProfile::default(),
            &ca.bundle,
            &csr,
            &[ID.to_owned()],
            30 * DAY,
            false,
            now,
        )
        .unwrap();
        let cert = parse_cert(&der);
        assert_eq!(
            cert.validity().not_after.to_datetime(),
            ca.bundle.not_after(),
            "{}",
            ca.name
        );
        assert!(ca.bundle.not_after() < now + Duration::from_secs(30 * DAY as u64));
        verify_everywhere(ca, &der, now);

        // A TTL that ends before the CA does is not touched.
        let der = profile::issue_workload(
            &WorkloadProfile::default(),
            &ca.bundle,
            &csr,
            &[ID.to_owned()],
            DAY,
            false,
            now,
        )
        .unwrap();
        assert_eq!(
            parse_cert(&der).validity().not_after.to_datetime(),
            now + Duration::from_secs(DAY as u64)
        );

        // Kubernetes: 30 days requested, clamped to the CA as well.
        let der = profile::issue_kubernetes(
            &KubernetesProfile::default(),
            &ca.bundle,
            &csr,
            &usages(),
            Some(30 * DAY),
            now,
        )
        .unwrap();
        assert_eq!(
            parse_cert(&der).validity().not_after.to_datetime(),
            ca.bundle.not_after(),
            "{}",
            ca.name
        );
        verify_everywhere(ca, &der, now);
    }
}

#[test]
fn kubernetes_expiration_seconds_follow_kube_controller_manager_rules() {
    let now = now();
    let ca = test_ca(CaKind::P256Root);
    let pem = csr(Key::P256, "/O=meshca-interop", Some("-sha256"));
    let csr = validate_csr(&pem, &CsrPolicy::default()).unwrap();
    let profile = KubernetesProfile {
        default_ttl: Duration::from_secs(DAY as u64),
        max_ttl: Duration::from_secs(30 * DAY as u64),
        ..KubernetesProfile::default()
    };
    let short_default = KubernetesProfile {
        default_ttl: Duration::from_secs(2 * 3600),
        ..profile.clone()
    };
    let h8 = 8 * 3600;
    // (profile, expirationSeconds, expected NotAfter - now)
    let cases: [(&KubernetesProfile, Option<i64>, i64); 11] = [
        (&profile, None, DAY - 300),      // absent -> default (>= 8h: backdated)
        (&short_default, None, 2 * 3600), // absent -> default (< 8h: exact)
        (&profile, Some(3600), 3600),     // < 8h: exact
        (&profile, Some(h8 - 1), h8 - 1), // just under 8h: exact
        (&profile, Some(h8), h8 - 300),   // exactly 8h: backdated
        (&profile, Some(2 * DAY), 2 * DAY - 300),
        (&profile, Some(599), 600), // below 10 min -> 10 min
        (&profile, Some(1), 600),
        (&profile, Some(0), 600),
        (&profile, Some(-5), 600),
        (&profile, Some(365 * DAY), 30 * DAY - 300), // above max -> max
    ];
    for (p, expiration, expected) in cases {
        let der =
            profile::issue_kubernetes(p, &ca.bundle, &csr, &usages(), expiration, now).unwrap();
        let cert = parse_cert(&der);
        let v = cert.validity();
        assert_eq!(
            v.not_before.to_datetime(),
            now - Duration::from_secs(300),
            "{expiration:?}"
        );
        assert_eq!(
            v.not_after.to_datetime(),
            now + Duration::from_secs(expected as u64),
            "expirationSeconds {expiration:?} (default {:?})",
            p.default_ttl
        );
    }
    let der = profile::issue_kubernetes(&profile, &ca.bundle, &csr, &usages(), Some(i64::MAX), now)
        .unwrap();
    assert_eq!(
        parse_cert(&der).validity().not_after.to_datetime(),
        now + Duration::from_secs((30 * DAY - 300) as u64)
    );
}

#[test]
fn local_ca_chain_response_verifies_with_openssl_and_webpki() {
    let ca = test_ca(CaKind::Rsa2048RootP256Intermediate);
    let local = LocalCa::new(
        ca.bundle.clone(),
        CsrPolicy::default(),
        WorkloadProfile::default(),
    );
    let pem = csr(Key::Rsa2048, "/O=meshca-interop", Some("-sha256"));
    let ids = [ID.to_owned()];
    let chain = local
        .sign_with_cert_chain(
            &pem,
            &CertOptions {
                subject_ids: &ids,
                ttl_seconds: 3600,
                for_ca: false,
            },
        )
        .unwrap();
    // leaf, intermediate, roots.
    assert_eq!(chain.len(), 3, "{chain:?}");
    let leaf = pem_der(chain[0].as_bytes());
    assert_eq!(pem_der(chain[1].as_bytes()), ca.intermediates[0]);
    assert_eq!(pem_ders(chain[2].as_bytes()), ca.roots);
    assert_common_leaf_fields(ca, &pem, &leaf);
    verify_everywhere(ca, &leaf, now());
    let single = local
        .sign(
            &pem,
            &CertOptions {
                subject_ids: &ids,
                ttl_seconds: 3600,
                for_ca: false,
            },
        )
        .unwrap();
    assert_eq!(pem_ders(single.as_bytes()).len(), 1);
}

/// An openssl-made PKI: an RSA root with `DC=com,DC=example,O=Mesh Root,CN=root`
/// and intermediates (subject `DC=com,DC=example,O=a,O=b,CN=...`) whose keys are
/// written in the form given.
struct OpensslPki {
    root_pem: Vec<u8>,
    root_key: Vec<u8>,
}

fn openssl_pki() -> &'static OpensslPki {
    static PKI: std::sync::OnceLock<OpensslPki> = std::sync::OnceLock::new();
    PKI.get_or_init(|| {
        let dir = tempdir();
        let d = dir.path();
        std::fs::write(d.join("root.key"), openssl_key(Key::Rsa2048)).unwrap();
        openssl(
            d,
            &[
                "req",
                "-x509",
                "-new",
                "-key",
                "root.key",
                "-sha256",
                "-days",
                "3650",
                "-subj",
                "/DC=com/DC=example/O=Mesh Root/CN=root",
                "-extensions",
                "root_ca",
                "-out",
                "root.pem",
            ],
        );
        OpensslPki {
            root_pem: std::fs::read(d.join("root.pem")).unwrap(),
            root_key: std::fs::read(d.join("root.key")).unwrap(),
        }
    })
}

/// Key forms for an openssl-made intermediate.
#[derive(Clone, Copy, Debug)]
enum KeyForm {
    RsaPkcs1,
    RsaPkcs8,
    P256Sec1,
    P384Sec1,
    /// SEC1 without the optional public key (`openssl ec -no_public`).
    P256Sec1NoPublic,
    P256Pkcs8,
    Ed25519Pkcs8,
}

/// Makes an intermediate under the openssl root; returns (cert PEM, key PEM in `form`).
fn openssl_intermediate(form: KeyForm) -> (Vec<u8>, Vec<u8>) {
    let pki = openssl_pki();
    let dir = tempdir();
    let d = dir.path();
    std::fs::write(d.join("root.pem"), &pki.root_pem).unwrap();
    std::fs::write(d.join("root.key"), &pki.root_key).unwrap();
    let (base, header) = match form {
        KeyForm::RsaPkcs1 => (Key::Rsa3072, "-----BEGIN RSA PRIVATE KEY-----"),
        KeyForm::RsaPkcs8 => (Key::Rsa2048, "-----BEGIN PRIVATE KEY-----"),
        KeyForm::P256Sec1 => (Key::P256, "-----BEGIN EC PRIVATE KEY-----"),
        KeyForm::P384Sec1 => (Key::P384, "-----BEGIN EC PRIVATE KEY-----"),
        KeyForm::P256Sec1NoPublic => (Key::P256, "-----BEGIN EC PRIVATE KEY-----"),
        KeyForm::P256Pkcs8 => (Key::P256, "-----BEGIN PRIVATE KEY-----"),
        KeyForm::Ed25519Pkcs8 => (Key::Ed25519, "-----BEGIN PRIVATE KEY-----"),
    };
    std::fs::write(d.join("pkcs8.key"), openssl_key(base)).unwrap();
    match form {
        KeyForm::RsaPkcs1 => {
            openssl(
                d,
                &[
                    "rsa",
                    "-in",
                    "pkcs8.key",
                    "-traditional",
                    "-out",
                    "inter.key",
                ],
            );
        }
        KeyForm::RsaPkcs8 | KeyForm::P256Pkcs8 | KeyForm::Ed25519Pkcs8 => {
            std::fs::copy(d.join("pkcs8.key"), d.join("inter.key"))
                .map(|_| ())
                .unwrap()
        }
        KeyForm::P256Sec1NoPublic => {
            openssl(
                d,
                &["ec", "-in", "pkcs8.key", "-no_public", "-out", "inter.key"],
            );
        }
        KeyForm::P256Sec1 | KeyForm::P384Sec1 => {
            openssl(d, &["ec", "-in", "pkcs8.key", "-out", "inter.key"]);
        }
    }
    let key = std::fs::read(d.join("inter.key")).unwrap();
    assert!(
        String::from_utf8_lossy(&key).starts_with(header),
        "{form:?} key form"
    );
    openssl(
        d,
        &[
            "req",
            "-new",
            "-key",
            "inter.key",
            "-subj",
            &format!("/DC=com/DC=example/O=a/O=b/CN=intermediate {form:?}"),
            "-out",
            "inter.csr",
        ],
    );
    openssl(
        d,
        &[
            "x509",
            "-req",
            "-in",
            "inter.csr",
            "-CA",
            "root.pem",
            "-CAkey",
            "root.key",
            "-CAcreateserial",
            "-days",
            "1825",
            "-sha256",
            "-extfile",
            "openssl.cnf",
            "-extensions",
            "inter_ca",
            "-out",
            "inter.pem",
        ],
    );
    (std::fs::read(d.join("inter.pem")).unwrap(), key)
}

/// Loads a cacerts-layout bundle from openssl-made files and signs with it.
fn cacerts_from_openssl(form: KeyForm) {
    let pki = openssl_pki();
    let (inter_pem, inter_key) = openssl_intermediate(form);
    // After openssl made the certificate: openssl does not backdate NotBefore.
    let now = now();
    let mut chain = inter_pem.clone();
    chain.extend_from_slice(&pki.root_pem);
    let bundle = CaBundle::load(
        &BundleSources {
            cert: Source {
                name: "ca-cert.pem",
                bytes: &inter_pem,
            },
            key: Source {
                name: "ca-key.pem",
                bytes: &inter_key,
            },
            chain: Some(Source {
                name: "cert-chain.pem",
                bytes: &chain,
            }),
            roots: Some(Source {
                name: "root-cert.pem",
                bytes: &pki.root_pem,
            }),
        },
        now,
    )
    .unwrap_or_else(|e| panic!("{form:?}: {e}"));
    let inter_der = pem_der(&inter_pem);
    let root_der = pem_der(&pki.root_pem);
    assert_eq!(
        bundle.cert_chain_pem(),
        to_pem(&inter_der),
        "cert-chain.pem out = signing cert only"
    );
    assert_eq!(bundle.roots_der(), std::slice::from_ref(&root_der));
    let ca = TestCa {
        name: "openssl-made intermediate",
        bundle: Arc::new(bundle),
        roots: vec![root_der.clone()],
        intermediates: vec![inter_der.clone()],
    };
    let local = LocalCa::new(
        ca.bundle.clone(),
        CsrPolicy::default(),
        WorkloadProfile::default(),
    );
    for (key, digest) in [(Key::P384, "-sha256"), (Key::Rsa2048, "-sha256")] {
        let pem = csr(key, "/O=meshca-interop", Some(digest));
        let ids = [ID.to_owned()];
        let chain = local
            .sign_with_cert_chain(
                &pem,
                &CertOptions {
                    subject_ids: &ids,
                    ttl_seconds: 0,
                    for_ca: false,
                },
            )
            .unwrap();
        assert_eq!(chain.len(), 3);
        let leaf = pem_der(chain[0].as_bytes());
        assert_eq!(pem_der(chain[1].as_bytes()), inter_der);
        assert_eq!(pem_ders(chain[2].as_bytes()), vec![root_der.clone()]);
        // issuer bytes: the intermediate's repeated DC/O subject, exactly.
        let inter = parse_cert(&inter_der);
        assert_eq!(
            parse_cert(&leaf).issuer().as_raw(),
            inter.subject().as_raw()
        );
        assert_common_leaf_fields(&ca, &pem, &leaf);
        verify_everywhere(&ca, &leaf, OffsetDateTime::now_utc());
        // ttl 0 -> the 24h default.
        let v = parse_cert(&leaf).validity().not_after.to_datetime() - OffsetDateTime::now_utc();
        assert!((v.whole_seconds() - DAY).abs() < 60, "default ttl, got {v}");
    }
}

#[test]
fn openssl_made_bundle_with_pkcs1_rsa_key_loads_and_signs() {
    cacerts_from_openssl(KeyForm::RsaPkcs1);
}

#[test]
fn openssl_made_bundle_with_pkcs8_rsa_key_loads_and_signs() {
    cacerts_from_openssl(KeyForm::RsaPkcs8);
}

#[test]
fn openssl_made_bundle_with_sec1_p256_key_loads_and_signs() {
    cacerts_from_openssl(KeyForm::P256Sec1);
}

#[test]
fn openssl_made_bundle_with_sec1_p384_key_loads_and_signs() {
    cacerts_from_openssl(KeyForm::P384Sec1);
}

#[test]
fn openssl_made_bundle_with_sec1_key_without_public_key_loads_and_signs() {
    cacerts_from_openssl(KeyForm::P256Sec1NoPublic);
}

#[test]
fn openssl_made_bundle_with_pkcs8_p256_key_loads_and_signs() {
    cacerts_from_openssl(KeyForm::P256Pkcs8);
}

#[test]
fn openssl_made_bundle_with_pkcs8_ed25519_key_loads_and_signs() {
    cacerts_from_openssl(KeyForm::Ed25519Pkcs8);
}

#[test]
fn tls_layout_with_self_signed_tls_crt_has_no_ca_crt_and_is_its_own_root() {
    let pki = openssl_pki();
    let now = now();
    let bundle = CaBundle::load(
        &BundleSources {
            cert: Source {
                name: "tls.crt",
                bytes: &pki.root_pem,
            },
            key: Source {
                name: "tls.key",
                bytes: &pki.root_key,
            },
            chain: None,
            roots: None,
        },
        now,
    )
    .unwrap();
    let root_der = pem_der(&pki.root_pem);
    assert_eq!(bundle.roots_der(), std::slice::from_ref(&root_der));
    assert_eq!(
        bundle.cert_chain_pem(),
        "",
        "a self-signed CA has an empty cert-chain.pem"
    );
    assert_eq!(bundle.chain_after_leaf(), vec![to_pem(&root_der)]);
    let ca = TestCa {
        name: "tls.crt self-signed",
        bundle: Arc::new(bundle),
        roots: vec![root_der],
        intermediates: vec![],
    };
    let pem = csr(Key::P256, "/O=meshca-interop", Some("-sha256"));
    let csr = validate_csr(&pem, &CsrPolicy::default()).unwrap();
    let der = profile::issue_workload(
        &WorkloadProfile::default(),
        &ca.bundle,
        &csr,
        &[ID.to_owned()],
        3600,
        false,
        now,
    )
    .unwrap();
    assert_common_leaf_fields(&ca, &pem, &der);
    verify_everywhere(&ca, &der, now);
}

#[test]
fn tls_layout_with_chain_in_tls_crt_and_roots_in_ca_crt_loads_and_signs() {
    let pki = openssl_pki();
    let (inter_pem, inter_key) = openssl_intermediate(KeyForm::P256Sec1);
    let now = now();
    let root_der = pem_der(&pki.root_pem);
    let inter_der = pem_der(&inter_pem);
    let mut tls_crt = inter_pem.clone();
    tls_crt.extend_from_slice(&pki.root_pem);
    for roots in [
        Some(Source {
            name: "ca.crt",
            bytes: &pki.root_pem,
        }),
        None,
    ] {
        let bundle = CaBundle::load(
            &BundleSources {
                cert: Source {
                    name: "tls.crt",
                    bytes: &tls_crt,
                },
                key: Source {
                    name: "tls.key",
                    bytes: &inter_key,
                },
                chain: None,
                roots,
            },
            now,
        )
        .unwrap();
        assert_eq!(
            bundle.roots_der(),
            std::slice::from_ref(&root_der),
            "roots from {:?}",
            roots.map(|r| r.name)
        );
        assert_eq!(
            bundle.chain_after_leaf(),
            vec![to_pem(&inter_der), to_pem(&root_der)]
        );
        let ca = TestCa {
            name: "tls.crt chain",
            bundle: Arc::new(bundle),
            roots: vec![root_der.clone()],
            intermediates: vec![inter_der.clone()],
        };
        let pem = csr(Key::Ed25519, "/", None);
        let csr = validate_csr(&pem, &CsrPolicy::default()).unwrap();
        let der = profile::issue_kubernetes(
            &KubernetesProfile::default(),
            &ca.bundle,
            &csr,
            &usages(),
            Some(3600),
            now,
        )
        .unwrap();
        assert_common_leaf_fields(&ca, &pem, &der);
        verify_everywhere(&ca, &der, now);
    }
}

#[test]
fn multi_valued_rdn_subject_is_copied_byte_exact_by_kubernetes_profile() {
    let now = now();
    let pem = openssl_csr(
        openssl_key(Key::P256),
        "/DC=org/O=team-a+OU=mesh/O=team-b/CN=svc",
        &["-multivalue-rdn", "-addext", SAN_ID],
    );
    let (subject, _) = csr_subject_and_spki(&pem);
    let csr = validate_csr(&pem, &CsrPolicy::default()).unwrap();
    for kind in ALL_CAS {
        let ca = test_ca(kind);
        let der = profile::issue_kubernetes(
            &KubernetesProfile::default(),
            &ca.bundle,
            &csr,
            &usages(),
            None,
            now,
        )
        .unwrap();
        let cert = parse_cert(&der);
        assert_eq!(cert.subject().as_raw(), &subject[..]);
        assert_eq!(
            cert.subject()
                .iter_rdn()
                .map(|r| r.iter().count())
                .collect::<Vec<_>>(),
            [1, 2, 1, 1]
        );
        verify_everywhere(ca, &der, now);
    }
}

#[test]
fn kubernetes_profile_copies_allowed_sans_in_csr_order() {
    let now = now();
    let profile = KubernetesProfile {
        sans: meshca_pki::SanPolicy {
            min_uris: 0,
            max_uris: 2,
            spiffe_only: false,
            trust_domains: meshca_pki::TrustDomains::Any,
            allow_dns: true,
            allow_ip: true,
            allow_email: true,
        },
        ..KubernetesProfile::default()
    };
    let sans_ext = "subjectAltName=DNS:b.example.com,URI:spiffe://other.td/x,IP:10.1.2.3,email:ops@example.com,\
                    DNS:a.example.com,IP:fd00::1,URI:https://example.com/y";
    let pem = openssl_csr(
        openssl_key(Key::Rsa2048),
        "/O=meshca-interop",
        &["-addext", sans_ext],
    );
    let csr = validate_csr(&pem, &CsrPolicy::default()).unwrap();
    let ca = test_ca(CaKind::Rsa2048RootP256Intermediate);
    let der =
        profile::issue_kubernetes(&profile, &ca.bundle, &csr, &usages(), Some(3600), now).unwrap();
    let cert = parse_cert(&der);
    let expected = [
        "DNS:b.example.com",
        "URI:spiffe://other.td/x",
        "IP:10.1.2.3",
        "email:ops@example.com",
        "DNS:a.example.com",
        "IP:fd00::1",
        "URI:https://example.com/y",
    ];
    assert_eq!(
        sans(&cert),
        Some((false, expected.map(String::from).to_vec()))
    );
    let text = openssl_text(&der);
    assert!(
        text.contains(
            "DNS:b.example.com, URI:spiffe://other.td/x, IP Address:10.1.2.3, email:ops@example.com, \
             DNS:a.example.com, IP Address:FD00:0:0:0:0:0:0:1, URI:https://example.com/y"
        ),
        "{text}"
    );
    verify_everywhere(ca, &der, now);
}

#[test]
fn workload_for_ca_certificate_is_a_working_intermediate() {
    let now = now();
    let root = test_ca(CaKind::P384Root);
    let key_pem = openssl_key(Key::P256);
    let pem = openssl_csr(key_pem, "/CN=istiod", &[]);
    let ca_csr = validate_csr(&pem, &CsrPolicy::default()).unwrap();
    let ids = ["spiffe://cluster.local/ns/istio-system/sa/istiod".to_owned()];
    let der = profile::issue_workload(
        &WorkloadProfile::default(),
        &root.bundle,
        &ca_csr,
        &ids,
        30 * DAY,
        true,
        now,
    )
    .unwrap();
    let cert = parse_cert(&der);
    let bc = cert.basic_constraints().unwrap().unwrap();
    assert!(bc.critical && bc.value.ca);
    let ku = cert.key_usage().unwrap().unwrap();
    assert!(
        ku.critical
            && ku.value.key_cert_sign()
            && ku.value.crl_sign()
            && ku.value.digital_signature()
    );
    assert!(
        cert.extended_key_usage().unwrap().is_none(),
        "CA certificate without EKU"
    );
    assert_eq!(
        subject_key_id(&cert),
        Some(cert::key_identifier(&ca_csr.public_key_bits))
    );
    assert_eq!(
        authority_key_id(&cert).as_deref(),
        Some(root.bundle.key_id())
    );
    assert_eq!(cert.subject().as_raw(), &cert::common_name(&ids[0])[..]);

    // Load it as a CA with the openssl key and issue a leaf under it.
    let bundle = CaBundle::from_parts(
        meshca_pki::SigningKey::from_pem(key_pem).unwrap(),
        der.clone(),
        vec![],
        root.roots.clone(),
        now,
    )
    .unwrap();
    let ca = TestCa {
        name: "for_ca intermediate",
        bundle: Arc::new(bundle),
        roots: root.roots.clone(),
        intermediates: vec![der],
    };
    let leaf_pem = csr(Key::Rsa2048, "/O=meshca-interop", Some("-sha256"));
    let leaf_csr = validate_csr(&leaf_pem, &CsrPolicy::default()).unwrap();
    let leaf = profile::issue_workload(
        &WorkloadProfile::default(),
        &ca.bundle,
        &leaf_csr,
        &[ID.to_owned()],
        3600,
        false,
        now,
    )
    .unwrap();
    assert_common_leaf_fields(&ca, &leaf_pem, &leaf);
    verify_everywhere(&ca, &leaf, now);
}

#[test]
fn multi_root_bundle_loads_and_leaves_verify_against_the_root_set() {
    let now = now();
    let ca = test_ca(CaKind::Rsa2048RootP256Intermediate);
    let other = test_ca(CaKind::P384Root);
    let roots: Vec<Vec<u8>> = vec![other.roots[0].clone(), ca.roots[0].clone()];
    let roots_pem: String = roots.iter().map(|r| to_pem(r)).collect();
    let key = ca.bundle.key().to_pkcs8_pem().unwrap();
    let bundle = CaBundle::load(
        &BundleSources {
            cert: Source {
                name: "ca-cert.pem",
                bytes: ca.bundle.signing_cert_pem().as_bytes(),
            },
            key: Source {
                name: "ca-key.pem",
                bytes: key.as_bytes(),
            },
            chain: Some(Source {
                name: "cert-chain.pem",
                bytes: ca.bundle.signing_cert_pem().as_bytes(),
            }),
            roots: Some(Source {
                name: "root-cert.pem",
                bytes: roots_pem.as_bytes(),
            }),
        },
        now,
    )
    .unwrap();
    assert_eq!(bundle.roots_der(), &roots[..]);
    assert_eq!(bundle.roots_pem(), roots_pem);
    let chain_after = bundle.chain_after_leaf();
    assert_eq!(
        chain_after.last(),
        Some(&roots_pem),
        "all roots in the last element"
    );
    let multi = TestCa {
        name: "multi-root",
        bundle: Arc::new(bundle),
        roots,
        intermediates: ca.intermediates.clone(),
    };
    let pem = csr(Key::P256, "/O=meshca-interop", Some("-sha256"));
    let csr = validate_csr(&pem, &CsrPolicy::default()).unwrap();
    let der = profile::issue_workload(
        &WorkloadProfile::default(),
        &multi.bundle,
        &csr,
        &[ID.to_owned()],
        3600,
        false,
        now,
    )
    .unwrap();
    verify_everywhere(&multi, &der, now);
}

#[test]
fn two_level_intermediate_chain_in_any_order_loads_and_verifies() {
    let now = now();
    let mid = test_ca(CaKind::Rsa2048RootP256Intermediate);
    let lower = intermediate_ca(
        "second-level intermediate",
        mid,
        KeyType::EcdsaP384,
        &repeated_attribute_name("second level"),
        Duration::from_secs(365 * DAY as u64),
        now,
    );
    // cert-chain.pem: root first, then the upper intermediate, then the signing cert.
    let chain_pem: String = [
        &mid.roots[0],
        &mid.intermediates[0],
        &lower.intermediates[0],
    ]
    .iter()
    .map(|c| to_pem(c))
    .collect();
    let key = lower.bundle.key().to_pkcs8_pem().unwrap();
    let bundle = CaBundle::load(
        &BundleSources {
            cert: Source {
                name: "ca-cert.pem",
                bytes: to_pem(&lower.intermediates[0]).as_bytes(),
            },
            key: Source {
                name: "ca-key.pem",
                bytes: key.as_bytes(),
            },
            chain: Some(Source {
                name: "cert-chain.pem",
                bytes: chain_pem.as_bytes(),
            }),
            roots: Some(Source {
                name: "root-cert.pem",
                bytes: to_pem(&mid.roots[0]).as_bytes(),
            }),
        },
        now,
    )
    .unwrap();
    let expected_chain = vec![
        to_pem(&lower.intermediates[0]),
        to_pem(&mid.intermediates[0]),
        to_pem(&mid.roots[0]),
    ];
    assert_eq!(bundle.chain_after_leaf(), expected_chain);
    assert_eq!(
        bundle.cert_chain_pem(),
        format!("{}{}", expected_chain[0], expected_chain[1])
    );
    let ca = TestCa {
        name: "two-level",
        bundle: Arc::new(bundle),
        roots: mid.roots.clone(),
        intermediates: vec![lower.intermediates[0].clone(), mid.intermediates[0].clone()],
    };
    for (key, subject, digest) in [
        (Key::Rsa2048, "/O=meshca-interop", Some("-sha256")),
        (Key::Ed25519, "/", None),
    ] {
        let pem = csr(key, subject, digest);
        check_workload(&ca, &pem, now);
        check_kubernetes(&ca, &pem, now);
    }
}

#[test]
fn ca_valid_beyond_2049_writes_generalized_time_and_chains_verify() {
    let now = now();
    let forty_years = Duration::from_secs(40 * 365 * DAY as u64);
    let ca = root_ca(
        "40-year root",
        KeyType::EcdsaP256,
        &cert::organization_name("cluster.local"),
        forty_years,
        now,
    );
    assert!(ca.bundle.not_after().year() >= 2050);
    let root = parse_cert(&ca.roots[0]);
    assert_eq!(root.validity().not_after.to_datetime(), now + forty_years);
    // GeneralizedTime (tag 0x18) for the NotAfter, UTCTime (0x17) for the NotBefore.
    let not_after_text = format!(
        "{}Z",
        (now + forty_years)
            .format(&time::macros::format_description!(
                "[year][month][day][hour][minute][second]"
            ))
            .unwrap()
    );
    let mut generalized = vec![0x18, not_after_text.len() as u8];
    generalized.extend_from_slice(not_after_text.as_bytes());
    assert!(
        ca.roots[0]
            .windows(generalized.len())
            .any(|w| w == generalized),
        "GeneralizedTime NotAfter"
    );
    let text = openssl_text(&ca.roots[0]);
    let not_after_line = text.lines().find(|l| l.contains("Not After :")).unwrap();
    assert!(
        not_after_line.ends_with(&format!("{} GMT", (now + forty_years).year())),
        "{not_after_line}"
    );

    let pem = csr(Key::P256, "/O=meshca-interop", Some("-sha256"));
    let csr = validate_csr(&pem, &CsrPolicy::default()).unwrap();
    // A leaf signed an hour before the CA ends is clamped to the CA's NotAfter.
    let late = ca.bundle.not_after() - Duration::from_secs(3600);
    let der = profile::issue_workload(
        &WorkloadProfile::default(),
        &ca.bundle,
        &csr,
        &[ID.to_owned()],
        DAY,
        false,
        late,
    )
    .unwrap();
    assert_eq!(
        parse_cert(&der).validity().not_after.to_datetime(),
        ca.bundle.not_after()
    );
    webpki_verify(&der, &ca.intermediates, &ca.roots, late);
    let der = profile::issue_workload(
        &WorkloadProfile::default(),
        &ca.bundle,
        &csr,
        &[ID.to_owned()],
        DAY,
        false,
        now,
    )
    .unwrap();
    verify_everywhere(&ca, &der, now);
}
