//! Tier 2: one signer's reconcile against a scripted API (no cluster): what
//! it writes, and what it does when another writer got there first.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use kube::api::Api;
use meshca_ca_store::dir::{NewCa, create};
use meshca_kube::mock::{self, MockApi};
use meshca_pki::csr::build_csr;
use meshca_pki::{CaBundle, KeyType, SanEntry, SigningKey, cert};
use meshca_signer::SignerPolicy;
use meshca_signer::controller::{SignerContext, reconcile};
use meshca_signer::metrics::Metrics;
use prometheus_client::registry::Registry;
use serde_json::json;
use x509_parser::prelude::{FromDer, X509Certificate};

const SIGNER: &str = "example.com/foo";
const URI: &str = "spiffe://cluster.local/ns/app/sa/web";
const STATUS: &str = "/apis/certificates.k8s.io/v1/certificatesigningrequests/csr-1/status";
const OBJECT: &str = "/apis/certificates.k8s.io/v1/certificatesigningrequests/csr-1";

fn ca(dir: &std::path::Path) -> CaBundle {
    let spec = NewCa {
        pkcs11: None,
        key_type: KeyType::EcdsaP256,
        org: "cluster.local",
        ttl: Duration::from_secs(86400),
        issuer: None,
    };
    create(dir, &spec, true).unwrap().0
}

/// An approved istiod-shaped CSR (as JSON, as the apiserver holds it).
fn approved_csr(certificate: Option<&str>) -> serde_json::Value {
    let key = SigningKey::generate(KeyType::EcdsaP256).unwrap();
    let pem = build_csr(&key, cert::EMPTY_NAME, &[SanEntry::Uri(URI.into())]).unwrap();
    let mut status = json!({"conditions": [{"type": "Approved", "status": "True",
        "reason": "Test", "message": "", "lastUpdateTime": "2026-01-01T00:00:00Z"}]});
    if let Some(c) = certificate {
        status["certificate"] = json!(base64_of(c.as_bytes()));
    }
    json!({
        "apiVersion": "certificates.k8s.io/v1", "kind": "CertificateSigningRequest",
        "metadata": {"name": "csr-1", "uid": "u-1", "resourceVersion": "5"},
        "spec": {"request": base64_of(pem.as_bytes()), "signerName": SIGNER,
                 "usages": ["digital signature", "key encipherment", "server auth", "client auth"],
                 "expirationSeconds": 3600, "username": "system:serviceaccount:istio-system:istiod"},
        "status": status,
    })
}

fn base64_of(bytes: &[u8]) -> String {
    use k8s_openapi::ByteString;
    serde_json::to_value(ByteString(bytes.to_vec()))
        .unwrap()
        .as_str()
        .unwrap()
        .to_owned()
}

fn context(bundle: CaBundle) -> (Arc<SignerContext>, Arc<Metrics>, MockApi) {
    let (client, api) = mock::client();
    let metrics = Arc::new(Metrics::new(&mut Registry::default()));
    let (_, ca) = tokio::sync::watch::channel(Some(Arc::new(bundle)));
    let ctx = Arc::new(SignerContext {
        api: Api::<CertificateSigningRequest>::all(client),
        policy: SignerPolicy::istiod(SIGNER),
        ca,
        metrics: metrics.clone(),
        events: None,
    });
    (ctx, metrics, api)
}

fn from_json(v: serde_json::Value) -> Arc<CertificateSigningRequest> {
    Arc::new(serde_json::from_value(v).unwrap())
}

#[tokio::test]
async fn an_approved_csr_gets_a_certificate_for_its_uri_written_with_the_version_read() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = ca(dir.path());
    let root = bundle.roots_der().to_vec();
    let (ctx, _, mut api) = context(bundle);
    let csr = approved_csr(None);
    let reconciling = tokio::spawn(reconcile(from_json(csr.clone()), ctx));
    let written = api.expect("PUT", STATUS, 200, csr).await;
    reconciling.await.unwrap().unwrap();

    assert_eq!(written["metadata"]["resourceVersion"], "5");
    let issued: k8s_openapi::ByteString =
        serde_json::from_value(written["status"]["certificate"].clone()).unwrap();
    let chain = meshca_pki::pem::parse_all(&issued.0).unwrap();
    let leaf = chain[0].der.to_vec();
    let rest: Vec<Vec<u8>> = chain[1..].iter().map(|b| b.der.to_vec()).collect();
    meshca_pki::chain::verify_chain(&leaf, &rest, &root, rustls_pki_types::UnixTime::now())
        .expect("the chain verifies to the signer's root");
    let (_, parsed) = X509Certificate::from_der(&leaf).unwrap();
    let sans: Vec<String> = parsed
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .map(|n| n.to_string())
        .collect();
    assert_eq!(sans, [format!("URI({URI})")]);
}

#[tokio::test]
async fn a_conflict_is_decided_again_on_the_fresh_object_and_a_certificate_there_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let (ctx, metrics, mut api) = context(ca(dir.path()));
    let csr = approved_csr(None);
    let reconciling = tokio::spawn(reconcile(from_json(csr.clone()), ctx));
    api.expect("PUT", STATUS, 409, mock::status(409, "Conflict"))
        .await;
    // Another replica issued meanwhile: nothing more is written.
    let other = "-----BEGIN CERTIFICATE-----\nb3RoZXI=\n-----END CERTIFICATE-----\n";
    api.expect("GET", OBJECT, 200, approved_csr(Some(other)))
        .await;
    tokio::time::timeout(Duration::from_secs(5), reconciling)
        .await
        .expect("reconcile ends without another write")
        .unwrap()
        .unwrap();
    let label = Metrics::label(SIGNER);
    assert_eq!(metrics.conflicts.get_or_create(&label).get(), 1);
}

#[tokio::test]
async fn a_csr_deleted_before_the_write_ends_the_reconcile() {
    let dir = tempfile::tempdir().unwrap();
    let (ctx, _, mut api) = context(ca(dir.path()));
    let csr = approved_csr(None);
    let reconciling = tokio::spawn(reconcile(from_json(csr), ctx));
    api.expect("PUT", STATUS, 404, mock::status(404, "NotFound"))
        .await;
    reconciling
        .await
        .unwrap()
        .expect("a deleted CSR is not an error");
}

#[tokio::test]
async fn an_approved_csr_without_its_request_is_read_again_before_deciding() {
    let dir = tempfile::tempdir().unwrap();
    let (ctx, metrics, mut api) = context(ca(dir.path()));
    let full = approved_csr(None);
    // What trim() leaves of an approved CSR that came with a list (the
    // backlog at start): no request.
    let mut compacted = full.clone();
    compacted["spec"]["request"] = json!("");
    let reconciling = tokio::spawn(reconcile(from_json(compacted), ctx));
    api.expect("GET", OBJECT, 200, full.clone()).await;
    let written = api.expect("PUT", STATUS, 200, full).await;
    reconciling.await.unwrap().unwrap();
    assert!(written["status"]["certificate"].is_string(), "{written}");
    let label = Metrics::label(SIGNER);
    assert_eq!(metrics.signed.get_or_create(&label).get(), 1);
}
