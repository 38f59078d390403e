//! Which signer, and istiod's checks of a request.

use super::*;
use crate::backend::ra::*;
use meshca_pki::{ErrorKind, GrpcCode, SanEntry, pem};

#[test]
fn the_signer_is_k8s_signer_or_the_domain_with_the_cert_signer_metadata() {
    let c = config(Some("example.com/foo"), Some("example.com"));
    assert_eq!(signer_name(&c, None).unwrap(), "example.com/foo");
    assert_eq!(signer_name(&c, Some("")).unwrap(), "example.com/foo");
    assert_eq!(signer_name(&c, Some("bar")).unwrap(), "example.com/bar");
    let no_domain = config(Some("example.com/foo"), None);
    let e = signer_name(&no_domain, Some("bar")).unwrap_err();
    assert_eq!(e, RaError::NoSignerDomain("bar".into()));
    assert_eq!(e.kind().grpc_code(), GrpcCode::Internal);
    assert_eq!(
        signer_name(&config(None, None), None).unwrap_err(),
        RaError::NoSigner
    );
}

#[test]
fn a_cert_signer_must_be_on_the_allow_list() {
    let c = config(Some("example.com/foo"), Some("example.com"));
    // Any other name under the domain, e.g. a client-certificate signer.
    for other in ["kube-apiserver-client", "foo", "bar/x", "Bar", "ba"] {
        let e = signer_name(&c, Some(other)).unwrap_err();
        assert_eq!(e, RaError::SignerNotAllowed(other.into()));
        assert_eq!(e.reason(), "ra_signer_not_allowed");
        assert_eq!(e.kind().grpc_code(), GrpcCode::InvalidArgument);
    }
    // An empty list allows no CertSigner at all; K8S_SIGNER still works.
    let none = RaConfig {
        cert_signers: Vec::new(),
        ..c.clone()
    };
    assert_eq!(
        signer_name(&none, Some("bar")).unwrap_err(),
        RaError::SignerNotAllowed("bar".into())
    );
    assert_eq!(signer_name(&none, None).unwrap(), "example.com/foo");
    let two = RaConfig {
        cert_signers: vec!["bar".into(), "istio-ca.v2".into()],
        ..c
    };
    assert_eq!(
        signer_name(&two, Some("istio-ca.v2")).unwrap(),
        "example.com/istio-ca.v2"
    );
}

#[test]
fn cert_signers_entries_are_signer_name_segments() {
    for good in ["bar", "istio-ca", "a.b-c.d", "0", &"a".repeat(63)] {
        assert_eq!(validate_cert_signer(good), Ok(()), "{good}");
    }
    for bad in [
        "",
        "a/b",
        "/",
        "Bar",
        "-a",
        "a-",
        "a..b",
        ".a",
        "a b",
        "a_b",
        "*",
        &"a".repeat(64),
    ] {
        assert!(validate_cert_signer(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn istios_template_with_the_callers_identity_passes() {
    let (key, pem) = csr_with(&[SanEntry::Uri(ID.into())]);
    let csr = check_request(
        pem.as_bytes(),
        &ids(),
        3600,
        false,
        &WorkloadProfile::default(),
    )
    .unwrap();
    assert_eq!(csr.public_key_bits, key.public_key_bits());
    // Istio's Go GenCSR writes the subject `O=""`.
    let key = SigningKey::generate(KeyType::EcdsaP256).unwrap();
    let go = meshca_pki::csr::build_csr(
        &key,
        &cert::organization_name(""),
        &[SanEntry::Uri(ID.into())],
    )
    .unwrap();
    check_request(go.as_bytes(), &ids(), 0, false, &WorkloadProfile::default()).unwrap();
}

/// A CSR with the caller's URI SAN and one more requested extension.
fn csr_with_extra_extension(oid: &[u64], value: &[u8]) -> String {
    use meshca_pki::der;
    let key = SigningKey::generate(KeyType::EcdsaP256).unwrap();
    let san = meshca_pki::san::san_extension_value(&[SanEntry::Uri(ID.into())]).unwrap();
    let san_ext = der::sequence(&[&der::oid(&[2, 5, 29, 17]), &der::octet_string(&san)]);
    let extra = der::sequence(&[&der::oid(oid), &der::octet_string(value)]);
    let attributes = der::sequence(&[
        &der::oid(&[1, 2, 840, 113549, 1, 9, 14]),
        &der::tlv(der::SET, &[&der::sequence(&[&san_ext, &extra])]),
    ]);
    let info = der::sequence(&[
        &der::small_integer(0),
        cert::EMPTY_NAME,
        &key.spki_der(),
        &der::tlv(der::context(0, true), &[&attributes]),
    ]);
    let signature = key.sign(&info).unwrap();
    let csr = der::sequence(&[
        &info,
        &key.signature_algorithm_der(),
        &der::bit_string(&signature),
    ]);
    pem::encode("CERTIFICATE REQUEST", &csr)
}

#[test]
fn requests_istiod_refuses_are_refused_before_anything_is_submitted() {
    let p = WorkloadProfile::default();
    let (_, ok) = csr_with(&[SanEntry::Uri(ID.into())]);
    let refused = |pem: &str, ids: &[String], ttl: i64, for_ca: bool| {
        check_request(pem.as_bytes(), ids, ttl, for_ca, &p).unwrap_err()
    };
    assert_eq!(refused(&ok, &ids(), 0, true), RaError::ForCa);

    let other = "spiffe://cluster.local/ns/app/sa/admin";
    let (_, foreign) = csr_with(&[SanEntry::Uri(other.into())]);
    assert_eq!(
        refused(&foreign, &ids(), 0, false),
        RaError::SanNotCallers(other.into())
    );

    let (_, dns) = csr_with(&[
        SanEntry::Uri(ID.into()),
        SanEntry::Dns("web.app.svc".into()),
    ]);
    assert!(matches!(
        refused(&dns, &ids(), 0, false),
        RaError::Template(_)
    ));
    let (_, ip) = csr_with(&[SanEntry::Ip("10.0.0.1".parse().unwrap())]);
    assert!(matches!(
        refused(&ip, &ids(), 0, false),
        RaError::Template(_)
    ));
    let (_, email) = csr_with(&[SanEntry::Email("a@b.c".into())]);
    assert!(matches!(
        refused(&email, &ids(), 0, false),
        RaError::Template(_)
    ));

    // istiod's ValidateCSR needs a SAN extension.
    let (_, bare) = csr_with(&[]);
    assert!(matches!(
        refused(&bare, &ids(), 0, false),
        RaError::Template(_)
    ));
    // Only the SAN extension: here keyUsage (digitalSignature) next to it.
    let extra = csr_with_extra_extension(&[2, 5, 29, 15], &[0x03, 0x02, 0x07, 0x80]);
    meshca_pki::validate_csr(extra.as_bytes(), &CsrPolicy::default()).unwrap();
    let e = refused(&extra, &ids(), 0, false);
    assert!(e.to_string().contains("2.5.29.15"), "{e}");

    // Istio's template has an empty subject (or only `O=""`); anything
    // else would end up in the signed certificate (`--subject copy`).
    for subject in [
        cert::organization_and_common_name("system:masters", "kubernetes-admin"),
        cert::organization_name("system:masters"),
        cert::common_name("web"),
    ] {
        let key = SigningKey::generate(KeyType::EcdsaP256).unwrap();
        let pem = meshca_pki::csr::build_csr(&key, &subject, &[SanEntry::Uri(ID.into())]).unwrap();
        let e = refused(&pem, &ids(), 0, false);
        assert!(matches!(e, RaError::Template(_)), "{e}");
        assert_eq!(e.reason(), "ra_csr_template");
    }

    let both = vec![ID.to_string(), other.to_string()];
    let (_, two) = csr_with(&[SanEntry::Uri(ID.into()), SanEntry::Uri(other.into())]);
    assert!(matches!(
        refused(&two, &both, 0, false),
        RaError::Template(_)
    ));

    let max = p.max_ttl.as_secs() as i64;
    let e = refused(&ok, &ids(), max + 1, false);
    assert_eq!(e.kind(), ErrorKind::TtlError);
    assert_eq!(e.reason(), "ttl_too_long");

    let e = refused("not a csr", &ids(), 0, false);
    assert_eq!(e.kind(), ErrorKind::CsrError);
    // The signature's last bit flipped: the DER stays well formed, the
    // self-signature breaks.
    let mut der = pem::parse_all(ok.as_bytes())
        .unwrap()
        .remove(0)
        .der
        .to_vec();
    *der.last_mut().unwrap() ^= 1;
    let tampered = pem::encode("CERTIFICATE REQUEST", &der);
    let e = refused(&tampered, &ids(), 0, false);
    assert_eq!(e.kind().grpc_code(), GrpcCode::InvalidArgument);
    assert_eq!(e.reason(), "csr_signature_invalid");

    for e in [
        RaError::ForCa,
        RaError::SanNotCallers(String::new()),
        RaError::Template(String::new()),
    ] {
        assert_eq!(e.kind().grpc_code(), GrpcCode::InvalidArgument, "{e}");
    }
}

#[test]
fn expiration_is_the_requested_ttl_or_the_default_but_at_least_600_seconds() {
    let p = WorkloadProfile::default();
    assert_eq!(expiration_seconds(0, &p), 86400);
    assert_eq!(expiration_seconds(-5, &p), 86400);
    assert_eq!(expiration_seconds(60, &p), 600);
    assert_eq!(expiration_seconds(3600, &p), 3600);
}
