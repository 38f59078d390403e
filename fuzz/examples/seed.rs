//! Writes the fuzz fixtures (`fuzz/fixtures`: a cacerts CA made as `meshca
//! ca init` makes it, a JWT key, a CSR key, the time) and the seed corpora
//! (`fuzz/corpus/<target>/seed-*`) built from them.
//!
//!   cargo run --manifest-path fuzz/Cargo.toml --no-default-features --example seed [-- --fixtures]
//!
//! Without `--fixtures` the existing fixtures are kept (and written only if
//! missing), so checked-in seeds and crash inputs stay meaningful.

use std::path::Path;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use k8s_openapi::ByteString;
use k8s_openapi::api::certificates::v1::{
    CertificateSigningRequest, CertificateSigningRequestCondition, CertificateSigningRequestSpec,
    CertificateSigningRequestStatus,
};
use meshca_ca_store::dir::{NewCa, create};
use meshca_fuzz::{AUDIENCE, IDENTITY, ISSUER, SIGNER, fixtures, fixtures_dir, join};
use meshca_pki::csr::build_csr;
use meshca_pki::profile::{self, ISTIOD_USAGES};
use meshca_pki::{CsrPolicy, KeyType, SanEntry, SigningKey, WorkloadProfile, cert, pem};
use meshca_proto::IstioCertificateRequest;
use meshca_server::auth::jwt::JwtIssuer;
use prost::Message;

const YEAR: u64 = 365 * 24 * 3600;

fn spec(issuer: Option<&meshca_pki::CaBundle>) -> NewCa<'_> {
    NewCa {
        key_type: KeyType::EcdsaP256,
        org: "cluster.local",
        ttl: Duration::from_secs(30 * YEAR),
        issuer,
        pkcs11: None,
    }
}

fn write_fixtures(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let now = time::OffsetDateTime::now_utc();
    let (root, _) = create(&dir.join("root"), &spec(None), true).unwrap();
    create(&dir.join("ca"), &spec(Some(&root)), true).unwrap();
    let jwt = JwtIssuer::generate_pkcs8().unwrap();
    std::fs::write(dir.join("jwt-key.der"), &*jwt).unwrap();
    // A JWKS naming the same key, for the JWKS path.
    let public = JwtIssuer::from_pkcs8(&jwt, ISSUER)
        .unwrap()
        .public_key_pem();
    let spki = &pem::parse_all(public.as_bytes()).unwrap()[0].der;
    let point = &spki[spki.len() - 64..];
    let jwks = serde_json::json!({"keys": [{
        "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": "fuzz",
        "x": B64URL.encode(&point[..32]), "y": B64URL.encode(&point[32..]),
    }]});
    std::fs::write(dir.join("jwks.json"), jwks.to_string()).unwrap();
    let key = SigningKey::generate(KeyType::EcdsaP256).unwrap();
    let csr = build_csr(&key, cert::EMPTY_NAME, &[SanEntry::Uri(IDENTITY.into())]).unwrap();
    std::fs::write(dir.join("csr.pem"), csr).unwrap();
    std::fs::write(dir.join("now"), format!("{}\n", now.unix_timestamp())).unwrap();
}

fn seed(corpus: &Path, target: &str, name: &str, bytes: &[u8]) {
    let dir = corpus.join(target);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(format!("seed-{name}")), bytes).unwrap();
}

fn csr_object(request: &str, conditions: &[(&str, &str)], signer: &str) -> Vec<u8> {
    let object = CertificateSigningRequest {
        spec: CertificateSigningRequestSpec {
            signer_name: signer.into(),
            request: ByteString(request.as_bytes().to_vec()),
            usages: Some(ISTIOD_USAGES.iter().map(|u| (*u).to_owned()).collect()),
            expiration_seconds: Some(86400),
            ..Default::default()
        },
        status: Some(CertificateSigningRequestStatus {
            certificate: None,
            conditions: Some(
                conditions
                    .iter()
                    .map(|(t, s)| CertificateSigningRequestCondition {
                        type_: (*t).into(),
                        status: (*s).into(),
                        ..Default::default()
                    })
                    .collect(),
            ),
        }),
        ..Default::default()
    };
    serde_json::to_vec(&object).unwrap()
}

fn main() {
    let fixtures_path = fixtures_dir();
    if std::env::args().any(|a| a == "--fixtures") || !fixtures_path.join("now").exists() {
        write_fixtures(&fixtures_path);
    }
    let f = fixtures();
    let corpus = fixtures_path.parent().unwrap().join("corpus");
    let read = |p: &str| std::fs::read(fixtures_path.join(p)).unwrap();
    let identity = SanEntry::Uri(IDENTITY.into());

    // csr: every key type (PEM), two as DER, other SAN types and subjects.
    let mut csrs = Vec::new();
    for kt in KeyType::ALL {
        let key = SigningKey::generate(kt).unwrap();
        let pem_csr = build_csr(&key, cert::EMPTY_NAME, std::slice::from_ref(&identity)).unwrap();
        let name = format!("{kt:?}").to_lowercase();
        seed(&corpus, "csr", &format!("{name}.pem"), pem_csr.as_bytes());
        if matches!(kt, KeyType::Rsa2048 | KeyType::EcdsaP256 | KeyType::Ed25519) {
            let der = &pem::parse_all(pem_csr.as_bytes()).unwrap()[0].der;
            seed(&corpus, "csr", &format!("{name}.der"), der);
        }
        csrs.push((name, pem_csr));
    }
    let key = SigningKey::generate(KeyType::EcdsaP256).unwrap();
    let sans = [
        SanEntry::Dns("svc.example.com".into()),
        SanEntry::Ip("10.0.0.1".parse().unwrap()),
        SanEntry::Ip("::1".parse().unwrap()),
        SanEntry::Email("a@example.com".into()),
        identity.clone(),
    ];
    let mixed = build_csr(&key, &cert::organization_and_common_name("o", "cn"), &sans).unwrap();
    seed(&corpus, "csr", "mixed-sans.pem", mixed.as_bytes());
    let blank_o = build_csr(&key, &cert::organization_name(""), &[identity]).unwrap();
    seed(&corpus, "csr", "blank-o.pem", blank_o.as_bytes());

    // ca_bundle: the cacerts set in every mode; the root alone as an istio-ca-secret.
    let cacerts = [
        "ca-cert.pem",
        "ca-key.pem",
        "cert-chain.pem",
        "root-cert.pem",
    ]
    .map(|n| read(&format!("ca/{n}")));
    let parts: Vec<&[u8]> = cacerts.iter().map(Vec::as_slice).collect();
    // (Mode 1, a tls Secret, takes tls.crt, tls.key, ca.crt: its own seed below.)
    for mode in [0u8, 2, 3, 4, 5] {
        let mut input = vec![b'0' + mode];
        input.extend(join(&parts));
        seed(&corpus, "ca_bundle", &format!("cacerts-mode{mode}"), &input);
    }
    // tls.crt = signing certificate followed by its chain; ca.crt = root.
    let mut tls_crt = cacerts[0].clone();
    tls_crt.extend(&cacerts[2]);
    let mut input = vec![b'1'];
    input.extend(join(&[&tls_crt, &cacerts[1], &cacerts[3]]));
    seed(&corpus, "ca_bundle", "tls-secret", &input);
    let istio = meshca_ca_store::secret::istio_data(&f.root).unwrap();
    let mut input = vec![b'2'];
    input.extend(join(&[
        &istio["ca-cert.pem"].0,
        &istio["ca-key.pem"].0,
        &istio["cert-chain.pem"].0,
        &istio["root-cert.pem"].0,
    ]));
    seed(&corpus, "ca_bundle", "istio-ca-secret-root", &input);

    // jwt: a valid token alone; with PEM keys, issuer, audience; with a JWKS.
    let issuer = JwtIssuer::from_pkcs8(&f.jwt_key, ISSUER).unwrap();
    let token = issuer
        .mint("default", "default", AUDIENCE, 3600, f.now)
        .unwrap();
    seed(&corpus, "jwt", "token", token.as_bytes());
    let pem_key = issuer.public_key_pem();
    seed(
        &corpus,
        "jwt",
        "pem-keys",
        &join(&[
            pem_key.as_bytes(),
            token.as_bytes(),
            ISSUER.as_bytes(),
            b"istio-ca,other",
        ]),
    );
    let jwks = read("jwks.json");
    seed(
        &corpus,
        "jwt",
        "jwks",
        &join(&[&jwks, token.as_bytes(), ISSUER.as_bytes()]),
    );

    // grpc: istio-agent's request for each key type, each auth flag; impersonation.
    for (name, pem_csr) in &csrs {
        let body = IstioCertificateRequest::from_agent(pem_csr.clone(), 3600, "").encode_to_vec();
        for flags in [0u8, 2] {
            let mut input = vec![flags];
            input.extend(&body);
            seed(&corpus, "grpc", &format!("{name}-flags{flags}"), &input);
        }
    }
    let mut request = IstioCertificateRequest::from_agent(csrs[3].1.clone(), 0, "");
    if let Some(metadata) = request.metadata.as_mut() {
        metadata.fields.insert(
            "ImpersonatedIdentity".into(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::StringValue(IDENTITY.into())),
            },
        );
    }
    let mut input = vec![0u8];
    input.extend(request.encode_to_vec());
    seed(&corpus, "grpc", "impersonation-refused", &input);

    // decide: CSR objects as JSON (approved, pending, denied, another
    // signer) and one shaped by `arbitrary`.
    let fixture_csr = String::from_utf8(f.csr_pem.clone()).unwrap();
    let objects: [(&str, &[(&str, &str)], &str); 4] = [
        ("approved", &[("Approved", "True")], SIGNER),
        ("pending-refused", &[], SIGNER),
        (
            "denied-refused",
            &[("Approved", "True"), ("Denied", "True")],
            SIGNER,
        ),
        (
            "other-signer-refused",
            &[("Approved", "True")],
            "example.com/x",
        ),
    ];
    for (name, conditions, signer) in objects {
        for knobs in [[0u8, 0, 0, 0], [2, 0, 0, 0]] {
            let mut input = knobs.to_vec();
            input.extend(csr_object(&fixture_csr, conditions, signer));
            seed(&corpus, "decide", &format!("{name}-{}", knobs[0]), &input);
        }
    }
    for (name, pem_csr) in csrs.iter().filter(|(n, _)| n.contains("rsa2048")) {
        let mut input = vec![1u8, 0, 0, 0];
        input.extend(csr_object(pem_csr, &[("Approved", "True")], SIGNER));
        seed(&corpus, "decide", &format!("approved-{name}"), &input);
    }
    seed(
        &corpus,
        "decide",
        "arbitrary-refused",
        &[0, 0, 0, 0, 0, 1, 0, 1, 0, 0, 1, 4, 0, 1, 2, 3, 0, 0, 0, 0],
    );

    // ra_chain: what a signer answers for the fixture CSR: the leaf and
    // the intermediate; alone, and with roots, CSR and identity spelled out.
    let validated = meshca_pki::validate_csr(&f.csr_pem, &CsrPolicy::default()).unwrap();
    let leaf = profile::issue_workload(
        &WorkloadProfile::default(),
        &f.ca,
        &validated,
        &[IDENTITY.to_owned()],
        0,
        false,
        f.now(),
    )
    .unwrap();
    let mut issued = pem::encode("CERTIFICATE", &leaf).into_bytes();
    issued.extend(f.ca.signing_cert_pem().as_bytes());
    seed(&corpus, "ra_chain", "issued", &issued);
    seed(
        &corpus,
        "ra_chain",
        "issued-roots-csr-id",
        &join(&[&issued, &f.root_pem, &f.csr_pem, IDENTITY.as_bytes()]),
    );
    pcr_seeds(&corpus);
    eprintln!("seeds written under {}", corpus.display());
}

/// pcr: a request as the kubelet makes it with the pod, account and node
/// the signer reads; then the same with one fact changed each (refused).
fn pcr_seeds(corpus: &Path) {
    use meshca_fuzz::PcrInput;
    let key = SigningKey::generate(KeyType::EcdsaP256).unwrap();
    let pod_uid = "7c5bd1b0-0000-4000-8000-000000000001";
    fn object<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> T {
        serde_json::from_value(v).unwrap()
    }
    let input = PcrInput {
        pcr: Some(object(serde_json::json!({
            "metadata": {"name": "req-1", "namespace": "default", "uid": "u-1"},
            "spec": {
                "signerName": SIGNER,
                "podName": "web", "podUID": pod_uid,
                "serviceAccountName": "web", "serviceAccountUID": "sa-uid",
                "nodeName": "node-a", "nodeUID": "node-uid",
                "maxExpirationSeconds": 3600,
                "pkixPublicKey": base64::engine::general_purpose::STANDARD.encode(key.spki_der()),
                "proofOfPossession": base64::engine::general_purpose::STANDARD
                    .encode(key.sign(pod_uid.as_bytes()).unwrap()),
            },
        }))),
        pod: Some(object(serde_json::json!({
            "metadata": {"name": "web", "namespace": "default", "uid": pod_uid},
            "spec": {"nodeName": "node-a", "serviceAccountName": "web", "containers": []},
        }))),
        sa: Some(object(serde_json::json!({
            "metadata": {"name": "web", "namespace": "default", "uid": "sa-uid"},
        }))),
        node: Some(object(serde_json::json!({
            "metadata": {"name": "node-a", "uid": "node-uid"},
        }))),
    };
    let write = |name: &str, knobs: [u8; 4], input: &PcrInput| {
        let mut bytes = knobs.to_vec();
        bytes.extend(serde_json::to_vec(input).unwrap());
        seed(corpus, "pcr", name, &bytes);
    };
    write("issued", [0, 0, 0, 0], &input);
    write("issued-root-ca", [1, 1, 0, 0], &input);
    write("roots-unpublished-refused", [0, 0, 0, 1], &input);
    write("no-ca-refused", [0, 2, 0, 0], &input);
    let mut recreated = serde_json::to_value(&input).unwrap();
    recreated["pod"]["metadata"]["uid"] = "7c5bd1b0-0000-4000-8000-000000000002".into();
    write("pod-recreated-refused", [0, 0, 0, 0], &object(recreated));
    let mut moved = serde_json::to_value(&input).unwrap();
    moved["pod"]["spec"]["nodeName"] = "node-b".into();
    write("pod-on-other-node-refused", [0, 0, 0, 0], &object(moved));
    let mut long = serde_json::to_value(&input).unwrap();
    long["pcr"]["spec"]["maxExpirationSeconds"] = 7200.into();
    write("longer-than-policy-refused", [3, 0, 0, 0], &object(long));
    let mut other = serde_json::to_value(&input).unwrap();
    other["pcr"]["spec"]["signerName"] = "example.com/other".into();
    write("other-signer-refused", [0, 0, 0, 0], &object(other));
    let mut no_pod = serde_json::to_value(&input).unwrap();
    no_pod["pod"] = serde_json::Value::Null;
    write("pod-gone-refused", [0, 0, 0, 0], &object(no_pod));
}
