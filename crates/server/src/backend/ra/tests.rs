//! The pure parts of RA mode, with plain values.

use super::*;
use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::certificates::v1::CertificateSigningRequestCondition;
use meshca_pki::profile::{CaCertRequest, intermediate_ca, issue_workload, self_signed_root};
use meshca_pki::{CaBundle, GrpcCode, KeyType, SigningKey, cert, pem};
use meshca_pki::{CsrPolicy, ErrorKind, SanEntry};
use time::OffsetDateTime;

const ID: &str = "spiffe://cluster.local/ns/app/sa/web";

fn config(signer: Option<&str>, domain: Option<&str>) -> RaConfig {
    RaConfig {
        signer: signer.map(Into::into),
        signer_domain: domain.map(Into::into),
        cert_signers: vec!["bar".into()],
        roots_file: "roots.pem".into(),
        signer_roots: Vec::new(),
        timeout: Duration::from_secs(60),
        workload: WorkloadProfile::default(),
        after_create: None,
    }
}

fn csr_with(sans: &[SanEntry]) -> (SigningKey, String) {
    let key = SigningKey::generate(KeyType::EcdsaP256).unwrap();
    let pem = meshca_pki::csr::build_csr(&key, cert::EMPTY_NAME, sans).unwrap();
    (key, pem)
}

fn ids() -> Vec<String> {
    vec![ID.to_string()]
}

/// root -> intermediate, as a signer holds them.
struct Pki {
    root_der: Vec<u8>,
    intermediate: CaBundle,
}

fn pki() -> Pki {
    let now = OffsetDateTime::now_utc();
    let root_key = SigningKey::generate(KeyType::EcdsaP256).unwrap();
    let root_der = self_signed_root(
        &CaCertRequest {
            subject_der: &cert::organization_name("ra test root"),
            key: &root_key,
            ttl: Duration::from_secs(86400),
        },
        now,
    )
    .unwrap();
    let root = CaBundle::from_parts(
        root_key,
        root_der.clone(),
        vec![],
        vec![root_der.clone()],
        now,
    )
    .unwrap();
    let key = SigningKey::generate(KeyType::EcdsaP256).unwrap();
    let inter_der = intermediate_ca(
        &CaCertRequest {
            subject_der: &cert::organization_name("ra test intermediate"),
            key: &key,
            ttl: Duration::from_secs(86400),
        },
        &root,
        now,
    )
    .unwrap();
    let intermediate =
        CaBundle::from_parts(key, inter_der, vec![], vec![root_der.clone()], now).unwrap();
    Pki {
        root_der,
        intermediate,
    }
}

impl Pki {
    fn roots(&self) -> Roots {
        Roots::parse(
            "root.pem",
            pem::encode("CERTIFICATE", &self.root_der).as_bytes(),
        )
        .unwrap()
    }

    /// What a signer writes into status.certificate: leaf + intermediate (+ root).
    fn issue(&self, csr_pem: &str, identities: &[String], with_root: bool) -> Vec<u8> {
        let csr = meshca_pki::validate_csr(csr_pem.as_bytes(), &CsrPolicy::default()).unwrap();
        let leaf = issue_workload(
            &WorkloadProfile::default(),
            &self.intermediate,
            &csr,
            identities,
            3600,
            false,
            OffsetDateTime::now_utc(),
        )
        .unwrap();
        let mut out = pem::encode("CERTIFICATE", &leaf);
        out.push_str(self.intermediate.signing_cert_pem());
        if with_root {
            out.push_str(&pem::encode("CERTIFICATE", &self.root_der));
        }
        out.into_bytes()
    }
}

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
fn a_signer_with_its_own_roots_uses_them_and_others_the_default() {
    let (a, b) = (pki().roots(), pki().roots());
    let per_signer = BTreeMap::from([("example.com/bar".to_string(), b.clone())]);
    let pick = |default: Option<&Roots>, signer| {
        let trust = TrustAnchors {
            default: default.cloned(),
            per_signer: per_signer.clone(),
        };
        trust.roots_for(signer).map(|r| r.pem().to_owned())
    };
    assert_eq!(pick(Some(&a), "example.com/bar").unwrap(), b.pem());
    assert_eq!(pick(Some(&a), "example.com/foo").unwrap(), a.pem());
    assert_eq!(pick(None, "example.com/bar").unwrap(), b.pem());
    assert_eq!(
        pick(None, "example.com/foo").unwrap_err(),
        RaError::NoRoots("example.com/foo".into())
    );
    let both = TrustAnchors {
        default: Some(a.clone()),
        per_signer,
    };
    assert_eq!(both.all_roots_pem(), format!("{}{}", a.pem(), b.pem()));
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

#[test]
fn the_kubernetes_csr_is_shaped_like_istiods() {
    let csr = new_csr(b"PEM", "example.com/foo", 3600);
    assert_eq!(csr.metadata.generate_name.as_deref(), Some("csr-workload-"));
    assert_eq!(csr.metadata.name, None);
    assert_eq!(csr.spec.request.0, b"PEM");
    assert_eq!(csr.spec.signer_name, "example.com/foo");
    assert_eq!(csr.spec.expiration_seconds, Some(3600));
    assert_eq!(
        csr.spec.usages.as_deref().unwrap(),
        [
            "digital signature",
            "key encipherment",
            "server auth",
            "client auth"
        ]
    );
    let json = serde_json::to_value(&csr).unwrap();
    assert_eq!(json["apiVersion"], "certificates.k8s.io/v1");
}

#[test]
fn approval_adds_one_approved_condition() {
    let mut csr = new_csr(b"PEM", "example.com/foo", 3600);
    approve(&mut csr);
    approve(&mut csr);
    let conditions = csr.status.unwrap().conditions.unwrap();
    assert_eq!(conditions.len(), 1);
    assert_eq!(conditions[0].type_, "Approved");
    assert_eq!(conditions[0].status, "True");
    assert_eq!(conditions[0].reason.as_deref(), Some(APPROVAL_REASON));
}

#[test]
fn denied_and_failed_are_final_and_beat_a_certificate() {
    let mut csr = new_csr(b"PEM", "example.com/foo", 3600);
    assert_eq!(progress(&csr), Progress::Pending);
    approve(&mut csr);
    assert_eq!(progress(&csr), Progress::Pending);
    csr.status.as_mut().unwrap().certificate = Some(ByteString(b"CERT".to_vec()));
    assert_eq!(progress(&csr), Progress::Issued(b"CERT".to_vec()));
    for type_ in ["Denied", "Failed"] {
        let mut c = csr.clone();
        c.status
            .as_mut()
            .unwrap()
            .conditions
            .as_mut()
            .unwrap()
            .push(CertificateSigningRequestCondition {
                type_: type_.into(),
                status: "True".into(),
                reason: Some("SignerValidationFailure".into()),
                message: Some("policy_trust_domain: nope".into()),
                ..Default::default()
            });
        let (reason, message) = (
            "SignerValidationFailure".into(),
            "policy_trust_domain: nope".into(),
        );
        let expected = if type_ == "Denied" {
            Progress::Denied { reason, message }
        } else {
            Progress::Failed { reason, message }
        };
        assert_eq!(progress(&c), expected);
        let e = final_outcome(&c).unwrap_err();
        assert!(e.to_string().contains("policy_trust_domain: nope"), "{e}");
        assert_eq!(e.kind().grpc_code(), GrpcCode::Internal);
    }
}

/// A CSR object `name` with `uid`, issued with `cert`.
fn issued_object(name: &str, uid: &str, cert: &[u8]) -> CertificateSigningRequest {
    let mut csr = new_csr(b"PEM", "example.com/foo", 3600);
    csr.metadata.name = Some(name.into());
    csr.metadata.uid = Some(uid.into());
    approve(&mut csr);
    csr.status.as_mut().unwrap().certificate = Some(ByteString(cert.to_vec()));
    csr
}

#[tokio::test]
async fn a_waiter_takes_its_answer_only_from_the_object_with_its_uid() {
    let waiters = Arc::new(Waiters::default());
    // A namesake's certificate (ours deleted, the name reused) is never
    // our answer: the wait ends with Replaced.
    let (_registered, answer) = waiters.register("csr-workload-a", "uid-ours");
    waiters.seen(&issued_object("csr-workload-a", "uid-impostor", b"THEIRS"));
    let e = answer.await.unwrap().unwrap_err();
    assert_eq!(e, RaError::Replaced("csr-workload-a".into()));
    assert_eq!(e.reason(), "ra_csr_replaced");
    assert_eq!(e.kind().grpc_code(), GrpcCode::Internal);

    let (_registered, answer) = waiters.register("csr-workload-b", "uid-ours");
    waiters.deleted(&issued_object("csr-workload-b", "uid-impostor", b"THEIRS"));
    assert_eq!(
        answer.await.unwrap().unwrap_err(),
        RaError::Replaced("csr-workload-b".into())
    );

    let (_registered, answer) = waiters.register("csr-workload-c", "uid-ours");
    waiters.seen(&issued_object("csr-workload-c", "uid-ours", b"OURS"));
    assert_eq!(answer.await.unwrap().unwrap(), b"OURS");

    let (_registered, answer) = waiters.register("csr-workload-d", "uid-ours");
    waiters.deleted(&issued_object("csr-workload-d", "uid-ours", b""));
    assert_eq!(answer.await.unwrap().unwrap_err(), RaError::Deleted);
}

#[test]
fn a_verified_chain_gets_the_roots_as_its_last_element_once() {
    let pki = pki();
    let (_, pem_csr) = csr_with(&[SanEntry::Uri(ID.into())]);
    let csr = meshca_pki::validate_csr(pem_csr.as_bytes(), &CsrPolicy::default()).unwrap();
    let roots = pki.roots();
    for with_root in [false, true] {
        let issued = pki.issue(&pem_csr, &ids(), with_root);
        let chain = assemble_chain(&issued, &roots, &csr, &ids(), UnixTime::now()).unwrap();
        assert_eq!(chain.len(), 3, "{with_root}");
        assert_eq!(chain[1], pki.intermediate.signing_cert_pem());
        assert_eq!(chain[2], roots.pem());
    }
}

#[test]
fn chains_that_do_not_verify_or_name_someone_else_are_refused() {
    let other_signer = pki();
    let pki = pki();
    let (_, pem_csr) = csr_with(&[SanEntry::Uri(ID.into())]);
    let csr = meshca_pki::validate_csr(pem_csr.as_bytes(), &CsrPolicy::default()).unwrap();
    let now = UnixTime::now();
    let is_chain_error = |r: Result<Vec<String>, RaError>| {
        assert!(matches!(r, Err(RaError::Chain(_))), "{r:?}");
    };
    // Another signer's root.
    let issued = pki.issue(&pem_csr, &ids(), false);
    is_chain_error(assemble_chain(
        &issued,
        &other_signer.roots(),
        &csr,
        &ids(),
        now,
    ));
    // The intermediate missing.
    let leaf_only = meshca_pki::pem::parse_all(&issued).unwrap()[0].der.clone();
    let leaf_only = pem::encode("CERTIFICATE", &leaf_only);
    is_chain_error(assemble_chain(
        leaf_only.as_bytes(),
        &pki.roots(),
        &csr,
        &ids(),
        now,
    ));
    // A certificate for another key.
    let (_, other_csr) = csr_with(&[SanEntry::Uri(ID.into())]);
    let swapped = pki.issue(&other_csr, &ids(), false);
    is_chain_error(assemble_chain(&swapped, &pki.roots(), &csr, &ids(), now));
    // Another identity, or two.
    let other = vec!["spiffe://cluster.local/ns/app/sa/admin".to_string()];
    let foreign = pki.issue(&pem_csr, &other, false);
    is_chain_error(assemble_chain(&foreign, &pki.roots(), &csr, &ids(), now));
    let two = vec![ID.to_string(), other[0].clone()];
    let double = pki.issue(&pem_csr, &two, false);
    is_chain_error(assemble_chain(&double, &pki.roots(), &csr, &two, now));
    // Nothing at all.
    is_chain_error(assemble_chain(b"", &pki.roots(), &csr, &ids(), now));
}
