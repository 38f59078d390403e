//! PodCertificateRequests (certificates.k8s.io/v1beta1) and the signer's
//! ClusterTrustBundle against a real kube-apiserver (testenv) with the Node
//! authorizer, NodeRestriction and the PodCertificateRequest feature on.
//!
//! No kubelet runs: the test makes a node identity as a kubelet has one (a
//! `system:node:<name>` client certificate from testenv's CA), creates Node,
//! ServiceAccount and Pod objects (pods bound with spec.nodeName), and
//! creates the requests as that node, as the kubelet does for a
//! `podCertificate` volume. It then checks what the kubelet relies on. The
//! signer runs with exactly the Helm chart's RBAC (podCertificates on).
//!
//! Start testenv with `testenv/up node` (as `./test` does), or without the
//! node with:
//!   MESHCA_TESTENV_APISERVER_ARGS="--authorization-mode=Node \
//!     --enable-admission-plugins=NodeRestriction \
//!     --feature-gates=PodCertificateRequest=true \
//!     --runtime-config=certificates.k8s.io/v1beta1=true" testenv/up

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use common::*;
use k8s_openapi::ByteString;
use k8s_openapi::api::certificates::v1beta1::{
    ClusterTrustBundle, PodCertificateRequest, PodCertificateRequestSpec,
};
use k8s_openapi::api::core::v1::{Container, Event, Node, Pod, PodSpec, ServiceAccount};
use k8s_openapi::api::rbac::v1::ClusterRole;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::{Client, ResourceExt};
use meshca_pki::{KeyType, SigningKey};
use meshca_signer::{CaSource, Config, PodCertPolicy, SignerConfig, SignerPolicy};
use meshca_testsupport::{TestEnv, TestNamespace, chart, openssl};
use x509_parser::prelude::*;

const TEST_TIMEOUT: Duration = Duration::from_secs(120);
const HOW_TO_START: &str = "testenv's apiserver has no PodCertificateRequest API (or no Node \
authorizer): start it with `testenv/up node`, or with MESHCA_TESTENV_APISERVER_ARGS=\"--authorization-mode=Node \
--enable-admission-plugins=NodeRestriction --feature-gates=PodCertificateRequest=true \
--runtime-config=certificates.k8s.io/v1beta1=true\" testenv/up";

/// Fails (never skips) when the apiserver lacks what these tests need.
async fn require_pcr_api(client: &Client) {
    let api = Api::<PodCertificateRequest>::all(client.clone());
    if let Err(e) = api.list(&ListParams::default().limit(1)).await {
        panic!("{HOW_TO_START}\n(listing podcertificaterequests: {e})");
    }
}

/// A node as a kubelet is one: the Node object and a client with the
/// node's certificate (`CN=system:node:<name>, O=system:nodes`).
struct TestNode {
    name: String,
    uid: String,
    client: Client,
}

async fn make_node(env: &TestEnv, ns: &TestNamespace) -> Result<TestNode> {
    let name = ns.unique_name("node");
    let node = Api::<Node>::all(env.client())
        .create(
            &PostParams::default(),
            &Node {
                metadata: ObjectMeta {
                    name: Some(name.clone()),
                    ..Default::default()
                },
                ..Default::default()
            },
        )
        .await
        .context("creating the Node")?;
    let dir = ns.temp_dir();
    let ca = std::env::var("MESHCA_TESTENV_CA").context(HOW_TO_START)?;
    let ca_key = std::env::var("MESHCA_TESTENV_CA_KEY").context(HOW_TO_START)?;
    let (key, csr, crt, ext) = (
        format!("{name}.key"),
        format!("{name}.csr"),
        format!("{name}.crt"),
        format!("{name}.ext"),
    );
    std::fs::write(
        dir.join(&ext),
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n",
    )?;
    openssl::run(
        dir,
        &[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            &key,
        ],
    )?;
    let subject = format!("/O=system:nodes/CN=system:node:{name}");
    openssl::run(
        dir,
        &["req", "-new", "-key", &key, "-subj", &subject, "-out", &csr],
    )?;
    let serial = format!("0x{:x}", rand_u64());
    openssl::run(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca,
            "-CAkey",
            &ca_key,
            "-set_serial",
            &serial,
            "-days",
            "1",
            "-sha256",
            "-extfile",
            &ext,
            "-out",
            &crt,
        ],
    )?;
    let b64 = |p: &Path| -> Result<String> {
        use base64::Engine as _;
        Ok(base64::engine::general_purpose::STANDARD.encode(std::fs::read(p)?))
    };
    let kc = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "testenv", "cluster": {
            "server": env.apiserver_url(),
            "certificate-authority-data": b64(env.ca_pem_path())?,
        }}],
        "users": [{"name": "node", "user": {
            "client-certificate-data": b64(&dir.join(&crt))?,
            "client-key-data": b64(&dir.join(&key))?,
        }}],
        "contexts": [{"name": "testenv", "context": {"cluster": "testenv", "user": "node"}}],
        "current-context": "testenv",
    });
    let path = dir.join(format!("{name}.kubeconfig"));
    std::fs::write(&path, serde_json::to_vec(&kc)?)?;
    let client = meshca_testsupport::client_from_kubeconfig(&path).await?;
    Ok(TestNode {
        name,
        uid: node.uid().context("node UID")?,
        client,
    })
}

fn rand_u64() -> u64 {
    let mut b = [0u8; 8];
    aws_lc_rs::rand::fill(&mut b).unwrap();
    u64::from_le_bytes(b) >> 1
}

async fn make_sa(env: &TestEnv, ns: &TestNamespace, name: &str) -> ServiceAccount {
    match Api::<ServiceAccount>::namespaced(env.client(), ns.name())
        .get_opt(name)
        .await
        .unwrap()
    {
        Some(sa) => sa,
        None => ns.create_service_account(name).await.unwrap(),
    }
}

async fn make_pod(env: &TestEnv, ns: &TestNamespace, name: &str, sa: &str, node: &str) -> Pod {
    let pod = Pod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        spec: Some(PodSpec {
            service_account_name: Some(sa.into()),
            node_name: Some(node.into()),
            automount_service_account_token: Some(false),
            containers: vec![Container {
                name: "app".into(),
                image: Some("registry.invalid/app:1".into()),
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    };
    Api::<Pod>::namespaced(env.client(), ns.name())
        .create(&PostParams::default(), &pod)
        .await
        .unwrap()
}

/// A kubelet's key: its SubjectPublicKeyInfo and a proof of possession over
/// the pod UID, as the apiserver verifies it (Go's crypto).
enum Key {
    Pki(SigningKey),
    RsaPss(aws_lc_rs::rsa::KeySize),
    /// Made and used through the `openssl` CLI: `-pkeyopt` for the curve.
    Openssl(&'static str),
}

fn key_and_proof(dir: &Path, key: &Key, pod_uid: &str) -> (Vec<u8>, Vec<u8>) {
    use aws_lc_rs::encoding::AsDer;
    use aws_lc_rs::signature::{self, KeyPair, RsaKeyPair};
    match key {
        Key::Pki(k) => (k.spki_der(), k.sign(pod_uid.as_bytes()).unwrap()),
        Key::RsaPss(size) => {
            let pair = RsaKeyPair::generate(*size).unwrap();
            let spki = pair.public_key().as_der().unwrap().as_ref().to_vec();
            let mut sig = vec![0; pair.public_modulus_len()];
            pair.sign(
                &signature::RSA_PSS_SHA256,
                &aws_lc_rs::rand::SystemRandom::new(),
                pod_uid.as_bytes(),
                &mut sig,
            )
            .unwrap();
            (spki, sig)
        }
        Key::Openssl(curve) => {
            let id = meshca_testsupport::unique_name("k");
            let (k, pubf, dg, sig) = (
                format!("{id}.key"),
                format!("{id}.pub"),
                format!("{id}.dgst"),
                format!("{id}.sig"),
            );
            let curve = format!("ec_paramgen_curve:{curve}");
            openssl::run(
                dir,
                &[
                    "genpkey",
                    "-algorithm",
                    "EC",
                    "-pkeyopt",
                    &curve,
                    "-out",
                    &k,
                ],
            )
            .unwrap();
            openssl::run(
                dir,
                &[
                    "pkey", "-in", &k, "-pubout", "-outform", "DER", "-out", &pubf,
                ],
            )
            .unwrap();
            let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, pod_uid.as_bytes());
            std::fs::write(dir.join(&dg), digest.as_ref()).unwrap();
            // ECDSA over the SHA-256 digest, ASN.1: Go's ecdsa.SignASN1(sha256(uid)).
            openssl::run(
                dir,
                &["pkeyutl", "-sign", "-inkey", &k, "-in", &dg, "-out", &sig],
            )
            .unwrap();
            (
                std::fs::read(dir.join(pubf)).unwrap(),
                std::fs::read(dir.join(sig)).unwrap(),
            )
        }
    }
}

struct Ask<'a> {
    signer: &'a str,
    pod: &'a Pod,
    sa: &'a ServiceAccount,
    node: &'a TestNode,
    key: Key,
    max_expiration: Option<i32>,
    annotations: Option<BTreeMap<String, String>>,
}

fn ask<'a>(
    signer: &'a str,
    pod: &'a Pod,
    sa: &'a ServiceAccount,
    node: &'a TestNode,
    key: Key,
) -> Ask<'a> {
    Ask {
        signer,
        pod,
        sa,
        node,
        key,
        max_expiration: None,
        annotations: None,
    }
}

/// Creates the request as `as_client` (the node, as the kubelet would).
async fn create_pcr(dir: &Path, as_client: &Client, ask: Ask<'_>) -> Result<PodCertificateRequest> {
    let pod_uid = ask.pod.uid().unwrap();
    let (spki, proof) = key_and_proof(dir, &ask.key, &pod_uid);
    let ns = ask.pod.namespace().unwrap();
    let pcr = PodCertificateRequest {
        metadata: ObjectMeta {
            generate_name: Some("req-".into()),
            namespace: Some(ns.clone()),
            ..Default::default()
        },
        spec: PodCertificateRequestSpec {
            signer_name: ask.signer.into(),
            pod_name: ask.pod.name_any(),
            pod_uid,
            service_account_name: ask.sa.name_any(),
            service_account_uid: ask.sa.uid().unwrap(),
            node_name: ask.node.name.clone(),
            node_uid: ask.node.uid.clone(),
            max_expiration_seconds: ask.max_expiration,
            pkix_public_key: ByteString(spki),
            proof_of_possession: ByteString(proof),
            unverified_user_annotations: ask.annotations,
        },
        status: None,
    };
    Ok(
        Api::<PodCertificateRequest>::namespaced(as_client.clone(), &ns)
            .create(&PostParams::default(), &pcr)
            .await?,
    )
}

fn final_condition(p: &PodCertificateRequest) -> Option<Condition> {
    p.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| matches!(c.type_.as_str(), "Issued" | "Denied" | "Failed"))
        .cloned()
}

async fn wait_final(client: &Client, ns: &str, name: &str) -> PodCertificateRequest {
    let api = Api::<PodCertificateRequest>::namespaced(client.clone(), ns);
    for _ in 0..300 {
        let p = api.get(name).await.unwrap();
        if final_condition(&p).is_some() {
            return p;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("PodCertificateRequest {ns}/{name}: no Issued/Denied/Failed in 30 s");
}

fn chain(p: &PodCertificateRequest) -> String {
    p.status
        .as_ref()
        .and_then(|s| s.certificate_chain.clone())
        .unwrap_or_default()
}

async fn bundle_pem(client: &Client, signer: &str) -> String {
    let name = meshca_signer::cluster_trust_bundle::name(signer);
    for _ in 0..100 {
        if let Some(b) = Api::<ClusterTrustBundle>::all(client.clone())
            .get_opt(&name)
            .await
            .unwrap()
        {
            return b.spec.trust_bundle;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("ClusterTrustBundle {name} not published");
}

/// The signer's identity: exactly the chart's RBAC with podCertificates on.
async fn signer_identity(ns: &TestNamespace, signers: &[&str]) -> meshca_testsupport::Identity {
    signer_identity_named(ns, signers, &ns.unique_name("m")).await
}

async fn signer_identity_named(
    ns: &TestNamespace,
    signers: &[&str],
    name: &str,
) -> meshca_testsupport::Identity {
    let yaml = chart::signer_rbac(
        ns.name(),
        name,
        signers,
        ns.name(),
        &["signer.podCertificates.enabled=true"],
    )
    .unwrap();
    ns.identity_from_manifest("signer-ca-controller-manager", &yaml)
        .await
        .unwrap()
}

async fn start_signer(
    identity: &meshca_testsupport::Identity,
    signer: &str,
    ca_dir: &Path,
    pod: PodCertPolicy,
) -> meshca_signer::Running {
    let mut policy = SignerPolicy::istiod(signer);
    policy.pod_certificates = Some(pod);
    let mut config = Config::new(vec![SignerConfig {
        policy,
        ca: CaSource::Dir(ca_dir.to_path_buf()),
    }]);
    config.monitoring_listen = Some("127.0.0.1:0".parse().unwrap());
    config.ca_poll_interval = Duration::from_millis(200);
    config.cluster_trust_bundles = true;
    meshca_signer::start(identity.client().await.unwrap(), config)
        .await
        .unwrap()
}

async fn cleanup_cluster_objects(env: &TestEnv, node: &str, signer: &str) {
    let _ = Api::<Node>::all(env.client())
        .delete(node, &DeleteParams::default())
        .await;
    let _ = Api::<ClusterTrustBundle>::all(env.client())
        .delete(
            &meshca_signer::cluster_trust_bundle::name(signer),
            &DeleteParams::default(),
        )
        .await;
}

fn leaf_of(chain: &str) -> Vec<u8> {
    meshca_pki::pem::parse_all(chain.as_bytes()).unwrap()[0]
        .der
        .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_get_certificates_the_kubelet_accepts_chained_to_the_published_bundle() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let env = TestEnv::get().await;
        let admin = env.client();
        require_pcr_api(&admin).await;
        let ns = env.namespace("pcr-issue").await.unwrap();
        let dir = ns.temp_dir().to_path_buf();
        let signer = unique_signer(&ns);
        let other_signer = format!("other.{signer}");
        let identity = signer_identity(&ns, &[&signer]).await;
        let ca = make_ca(&dir.join("ca"), "pods", Duration::from_secs(86400 * 30));
        let node = make_node(&env, &ns).await.unwrap();
        let sa = make_sa(&env, &ns, "web").await;
        let running = start_signer(
            &identity,
            &signer,
            &ca.dir,
            PodCertPolicy::new("cluster.local"),
        )
        .await;
        let bundle = bundle_pem(&admin, &signer).await;
        assert_eq!(bundle, ca.root_pem, "the bundle holds the signer's root");

        let keys = [
            (
                "p256",
                Key::Pki(SigningKey::generate(KeyType::EcdsaP256).unwrap()),
            ),
            (
                "ed25519",
                Key::Pki(SigningKey::generate(KeyType::Ed25519).unwrap()),
            ),
            ("rsa3072", Key::RsaPss(aws_lc_rs::rsa::KeySize::Rsa3072)),
            ("p384", Key::Openssl("P-384")),
        ];
        let mut names = Vec::new();
        for (i, (label, key)) in keys.into_iter().enumerate() {
            let pod = make_pod(&env, &ns, &format!("web-{i}"), "web", &node.name).await;
            let pcr = create_pcr(
                &dir,
                &node.client,
                Ask {
                    signer: &signer,
                    pod: &pod,
                    sa: &sa,
                    node: &node,
                    key,
                    max_expiration: Some(7200),
                    annotations: None,
                },
            )
            .await
            .with_context(|| format!("creating the {label} request as the node"))
            .unwrap();
            names.push((label, pcr.name_any(), pod));
        }
        // Another signer's request on the same node: never touched.
        let pod = make_pod(&env, &ns, "web-other", "web", &node.name).await;
        let foreign = create_pcr(
            &dir,
            &node.client,
            Ask {
                signer: &other_signer,
                pod: &pod,
                sa: &sa,
                node: &node,
                key: Key::Pki(SigningKey::generate(KeyType::EcdsaP256).unwrap()),
                max_expiration: None,
                annotations: None,
            },
        )
        .await
        .unwrap();

        for (label, name, pod) in &names {
            let p = wait_final(&admin, ns.name(), name).await;
            let cond = final_condition(&p).unwrap();
            assert_eq!(cond.type_, "Issued", "{label}: {cond:?}");
            let chain = chain(&p);
            assert_eq!(split_pem(&chain).len(), 2, "{label}: leaf + intermediate");
            openssl_verify(&dir, &chain, &bundle)
                .with_context(|| format!("{label}: chain against the ClusterTrustBundle"))
                .unwrap();
            let der = leaf_of(&chain);
            let (_, leaf) = X509Certificate::from_der(&der).unwrap();
            assert_eq!(
                leaf.public_key().raw,
                p.spec.pkix_public_key.0.as_slice(),
                "{label}: issued to the requested key"
            );
            let san = leaf.subject_alternative_name().unwrap().unwrap();
            assert_eq!(
                format!("{:?}", san.value.general_names),
                format!("[URI(\"spiffe://cluster.local/ns/{}/sa/web\")]", ns.name()),
                "{label}"
            );
            let s = p.status.as_ref().unwrap();
            let nb = s.not_before.as_ref().unwrap().0.as_second();
            let na = s.not_after.as_ref().unwrap().0.as_second();
            let refresh = s.begin_refresh_at.as_ref().unwrap().0.as_second();
            assert_eq!(nb, leaf.validity().not_before.timestamp(), "{label}");
            assert_eq!(na, leaf.validity().not_after.timestamp(), "{label}");
            assert_eq!(na - nb, 7200, "{label}: maxExpirationSeconds, exactly");
            assert!(
                refresh >= nb + 600 && refresh <= na - 600,
                "{label}: API bounds"
            );
            assert!(
                (refresh - nb) * 100 >= (na - nb) * 50 && (refresh - nb) * 100 <= (na - nb) * 70,
                "{label}: refresh at 50-70% of the lifetime"
            );
            assert_eq!(p.spec.pod_uid, pod.uid().unwrap());
        }

        // Events in the request's namespace, and the metric.
        let events = Api::<Event>::namespaced(admin.clone(), ns.name())
            .list(&ListParams::default())
            .await
            .unwrap();
        assert!(
            events
                .items
                .iter()
                .any(|e| e.reason.as_deref() == Some("CertificateIssued")),
            "an Event per issued request"
        );
        let metrics = running.metrics_text();
        assert_eq!(
            metric(
                &metrics,
                &format!("meshca_signer_pod_certificates_issued_total{{signer=\"{signer}\"}}")
            ),
            Some(4.0),
            "{metrics}"
        );
        let foreign = Api::<PodCertificateRequest>::namespaced(admin.clone(), ns.name())
            .get(&foreign.name_any())
            .await
            .unwrap();
        assert!(foreign.status.is_none() || final_condition(&foreign).is_none());
        assert!(
            chain(&foreign).is_empty(),
            "another signer's request is left alone"
        );

        running.shutdown().await.unwrap();
        cleanup_cluster_objects(&env, &node.name, &signer).await;
        ns.cleanup().await.unwrap();
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_are_refused_with_their_reason_and_no_certificate() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let env = TestEnv::get().await;
        let admin = env.client();
        require_pcr_api(&admin).await;
        let ns = env.namespace("pcr-hostile").await.unwrap();
        let dir = ns.temp_dir().to_path_buf();
        let signer = unique_signer(&ns);
        let identity = signer_identity(&ns, &[&signer]).await;
        let ca = make_ca(&dir.join("ca"), "pods", Duration::from_secs(86400 * 30));
        let node = make_node(&env, &ns).await.unwrap();
        let other_node = make_node(&env, &ns).await.unwrap();
        let sa = make_sa(&env, &ns, "web").await;
        let p256 = || Key::Pki(SigningKey::generate(KeyType::EcdsaP256).unwrap());
        let ask = |pod, key| ask(&signer, pod, &sa, &node, key);
        // Made before the signer starts, so that it sees each only as it is now.
        let mut expected = Vec::new();

        // A pod deleted and recreated under the same name.
        let old = make_pod(&env, &ns, "recreated", "web", &node.name).await;
        let pcr = create_pcr(&dir, &node.client, ask(&old, p256())).await.unwrap();
        let pods = Api::<Pod>::namespaced(admin.clone(), ns.name());
        pods.delete("recreated", &DeleteParams::default().grace_period(0))
            .await
            .unwrap();
        for _ in 0..100 {
            if pods.get_opt("recreated").await.unwrap().is_none() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let new = make_pod(&env, &ns, "recreated", "web", &node.name).await;
        assert_ne!(old.uid(), new.uid());
        expected.push((pcr.name_any(), "PodIdentityMismatch", "pcr_pod_uid_mismatch"));

        // A pod on another node: NodeRestriction refuses the node...
        let elsewhere = make_pod(&env, &ns, "elsewhere", "web", &other_node.name).await;
        let refused = create_pcr(&dir, &node.client, ask(&elsewhere, p256())).await;
        let err = refused.expect_err("a node asked for another node's pod and the apiserver let it");
        assert!(format!("{err:#}").contains("403") || format!("{err:#}").contains("Forbidden")
            || format!("{err:#}").contains("not running on node"), "{err:#}");
        // ...and whoever else may create requests gets a Denied from the signer.
        match create_pcr(&dir, &admin, ask(&elsewhere, p256())).await {
            Ok(p) => expected.push((p.name_any(), "PodIdentityMismatch", "pcr_pod_node_mismatch")),
            Err(e) => eprintln!("the apiserver refused an admin's request naming the wrong node too: {e:#}"),
        }

        // A key type the API accepts and the signer's policy does not (P-521).
        let pod = make_pod(&env, &ns, "p521", "web", &node.name).await;
        let p = create_pcr(&dir, &node.client, ask(&pod, Key::Openssl("P-521"))).await.unwrap();
        expected.push((p.name_any(), "UnsupportedKeyType", "csr_key_curve"));
        // RSA 4096 under this signer's policy (ECDSA and Ed25519 only).
        let pod = make_pod(&env, &ns, "rsa", "web", &node.name).await;
        let p = create_pcr(&dir, &node.client, ask(&pod, Key::RsaPss(aws_lc_rs::rsa::KeySize::Rsa4096)))
            .await
            .unwrap();
        expected.push((p.name_any(), "UnsupportedKeyType", "csr_key_algorithm"));

        // maxExpirationSeconds below the API's minimum: refused at admission.
        let pod = make_pod(&env, &ns, "short", "web", &node.name).await;
        let mut short = ask(&pod, p256());
        short.max_expiration = Some(1800);
        let err = create_pcr(&dir, &node.client, short).await.expect_err("1800 s accepted");
        assert!(format!("{err:#}").contains("maxExpirationSeconds"), "{err:#}");
        // Above the signer's maximum (24 h), within the API's (91 d).
        let mut long = ask(&pod, p256());
        long.max_expiration = Some(2 * 86400);
        let p = create_pcr(&dir, &node.client, long).await.unwrap();
        expected.push((p.name_any(), "SignerPolicyDenied", "pcr_expiration_too_long"));

        // unverifiedUserAnnotations this signer does not know.
        let mut annotated = ask(&pod, p256());
        annotated.annotations = Some(BTreeMap::from([(
            "example.com/spiffe-id".to_string(),
            "spiffe://cluster.local/ns/kube-system/sa/admin".to_string(),
        )]));
        let p = create_pcr(&dir, &node.client, annotated).await.unwrap();
        expected.push((p.name_any(), "InvalidUnverifiedUserAnnotations", "pcr_user_annotation"));

        let mut policy = PodCertPolicy::new("cluster.local");
        policy.keys.allow_rsa = false;
        let running = start_signer(&identity, &signer, &ca.dir, policy).await;
        for (name, reason, code) in &expected {
            let p = wait_final(&admin, ns.name(), name).await;
            let cond = final_condition(&p).unwrap();
            assert_eq!(
                (cond.type_.as_str(), cond.reason.as_str()),
                ("Denied", *reason),
                "{name}: {cond:?}"
            );
            assert!(cond.message.starts_with(code), "{name}: {}", cond.message);
            assert!(chain(&p).is_empty(), "{name}: no certificate");
            let s = p.status.as_ref().unwrap();
            assert!(s.not_before.is_none() && s.not_after.is_none() && s.begin_refresh_at.is_none());
        }
        let metrics = running.metrics_text();
        for (_, _, code) in &expected {
            let series = format!(
                "meshca_signer_pod_certificates_refused_total{{signer=\"{signer}\",reason=\"{code}\"}}"
            );
            assert!(metric(&metrics, &series).is_some_and(|v| v >= 1.0), "{series}\n{metrics}");
        }
        let events = Api::<Event>::namespaced(admin.clone(), ns.name())
            .list(&ListParams::default())
            .await
            .unwrap();
        for (name, reason, _) in &expected {
            assert!(
                events.items.iter().any(|e| e.involved_object.name.as_deref() == Some(name.as_str())
                    && e.reason.as_deref() == Some(*reason)
                    && e.type_.as_deref() == Some("Warning")),
                "no Warning Event {reason} for {name}"
            );
        }

        running.shutdown().await.unwrap();
        cleanup_cluster_objects(&env, &node.name, &signer).await;
        cleanup_cluster_objects(&env, &other_node.name, &signer).await;
        ns.cleanup().await.unwrap();
    })
    .await
    .expect("test timed out");
}

/// The signer's ClusterRole (`<name>-signer`) with or without its
/// ClusterTrustBundle rules.
async fn set_bundle_rbac(env: &TestEnv, role: &str, original: &ClusterRole, allowed: bool) {
    let mut next = original.clone();
    if !allowed {
        next.rules = Some(
            original
                .rules
                .clone()
                .unwrap_or_default()
                .into_iter()
                .filter(|r| {
                    let res = r.resources.clone().unwrap_or_default();
                    !res.iter().any(|x| x == "clustertrustbundles")
                        && !r.verbs.iter().any(|v| v == "attest")
                })
                .collect(),
        );
    }
    let api = Api::<ClusterRole>::all(env.client());
    let mut current = api.get(role).await.unwrap();
    current.rules = next.rules;
    api.replace(role, &PostParams::default(), &current)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_root_is_in_the_bundle_with_the_old_before_its_first_pod_certificate() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let env = TestEnv::get().await;
        let admin = env.client();
        require_pcr_api(&admin).await;
        let ns = env.namespace("pcr-rotate").await.unwrap();
        let dir = ns.temp_dir().to_path_buf();
        let signer = unique_signer(&ns);
        let manifest = ns.unique_name("m");
        let identity = signer_identity_named(&ns, &[&signer], &manifest).await;
        let role = format!("{manifest}-signer");
        let original = Api::<ClusterRole>::all(admin.clone())
            .get(&role)
            .await
            .unwrap();
        let ca_dir = dir.join("ca");
        let old = make_ca(&ca_dir, "old", Duration::from_secs(86400 * 30));
        let node = make_node(&env, &ns).await.unwrap();
        let sa = make_sa(&env, &ns, "web").await;
        let running = start_signer(
            &identity,
            &signer,
            &ca_dir,
            PodCertPolicy::new("cluster.local"),
        )
        .await;
        assert_eq!(bundle_pem(&admin, &signer).await, old.root_pem);
        let ask = |pod| {
            let key = Key::Pki(SigningKey::generate(KeyType::EcdsaP256).unwrap());
            ask(&signer, pod, &sa, &node, key)
        };
        let pod = make_pod(&env, &ns, "before", "web", &node.name).await;
        let before = create_pcr(&dir, &node.client, ask(&pod)).await.unwrap();
        let before = wait_final(&admin, ns.name(), &before.name_any()).await;
        openssl_verify(&dir, &chain(&before), &old.root_pem).unwrap();

        // Record every version of the bundle from now on.
        let bundle_name = meshca_signer::cluster_trust_bundle::name(&signer);
        let (tx, mut versions) = tokio::sync::mpsc::unbounded_channel();
        let watch_api = Api::<ClusterTrustBundle>::all(admin.clone());
        let watcher_task = tokio::spawn(async move {
            use futures::StreamExt;
            use kube::runtime::watcher;
            let cfg = watcher::Config::default().fields(&format!("metadata.name={bundle_name}"));
            let mut s = Box::pin(watcher(watch_api, cfg));
            while let Some(ev) = s.next().await {
                if let Ok(watcher::Event::Apply(b) | watcher::Event::InitApply(b)) = ev {
                    let _ = tx.send(b);
                }
            }
        });

        // The signer may not write the bundle for now: the new root cannot
        // get in, so no certificate from it may go out.
        set_bundle_rbac(&env, &role, &original, false).await;
        let new = make_ca(&dir.join("new"), "new", Duration::from_secs(86400 * 40));
        write_ca_dir(&ca_dir, &new.intermediate_pem, &new.key_pem, &new.root_pem);
        let series = format!("meshca_signer_ca_expiry_timestamp_seconds{{signer=\"{signer}\"}}");
        let new_expiry = {
            let der = leaf_of(&new.intermediate_pem);
            let (_, leaf) = X509Certificate::from_der(&der).unwrap();
            leaf.validity().not_after.timestamp() as f64
        };
        for _ in 0..100 {
            if metric(&running.metrics_text(), &series) == Some(new_expiry) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(
            metric(&running.metrics_text(), &series),
            Some(new_expiry),
            "new CA loaded"
        );
        let pod = make_pod(&env, &ns, "after", "web", &node.name).await;
        let after = create_pcr(&dir, &node.client, ask(&pod)).await.unwrap();
        tokio::time::sleep(Duration::from_secs(4)).await;
        let held = Api::<PodCertificateRequest>::namespaced(admin.clone(), ns.name())
            .get(&after.name_any())
            .await
            .unwrap();
        assert!(
            final_condition(&held).is_none() && chain(&held).is_empty(),
            "a certificate from a root not in the bundle: {:?}",
            held.status
        );

        set_bundle_rbac(&env, &role, &original, true).await;
        let after = wait_final(&admin, ns.name(), &after.name_any()).await;
        assert_eq!(final_condition(&after).unwrap().type_, "Issued");
        openssl_verify(&dir, &chain(&after), &new.root_pem)
            .expect("the request after the rotation is from the new root");
        let issued_at: u64 = after.resource_version().unwrap().parse().unwrap();

        // The first bundle version with the new root came before the
        // certificate (resourceVersions are etcd's global revision), and held
        // the old root too.
        let mut first_with_new = None;
        while let Ok(b) = versions.try_recv() {
            let roots = meshca_signer::cluster_trust_bundle::roots_in(&b.spec.trust_bundle);
            let has_new = roots
                .iter()
                .any(|r| meshca_pki::pem::encode("CERTIFICATE", r) == new.root_pem);
            if has_new && first_with_new.is_none() {
                first_with_new = Some(b);
            }
        }
        let first = first_with_new.expect("the bundle never had the new root");
        let rv: u64 = first.resource_version().unwrap().parse().unwrap();
        assert!(
            rv < issued_at,
            "new root published (rv {rv}) before the certificate (rv {issued_at})"
        );
        assert!(
            first.spec.trust_bundle.contains(old.root_pem.trim()),
            "both roots at once"
        );
        assert!(first.spec.trust_bundle.contains(new.root_pem.trim()));
        // The old root stays: the certificate from before still verifies.
        let now = bundle_pem(&admin, &signer).await;
        openssl_verify(&dir, &chain(&before), &now).unwrap();
        openssl_verify(&dir, &chain(&after), &now).unwrap();

        watcher_task.abort();
        running.shutdown().await.unwrap();
        cleanup_cluster_objects(&env, &node.name, &signer).await;
        ns.cleanup().await.unwrap();
    })
    .await
    .expect("test timed out");
}
