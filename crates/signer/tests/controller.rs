//! The signer controller against a real kube-apiserver (testenv), running as
//! a ServiceAccount with exactly deploy/signer/rbac.yaml's RBAC; CSRs created
//! and approved by an identity with exactly deploy/signer/istiod.yaml's RBAC.
//! Without a testenv every test fails with instructions (never skips).

mod common;

use std::time::Duration;

use common::*;
use k8s_openapi::ByteString;
use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use k8s_openapi::api::core::v1::Event;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, ListParams, PostParams};
use meshca_signer::{CaSource, Config, SignerConfig, SignerPolicy, TrustBundleTarget};
use meshca_testsupport::TestEnv;
use x509_parser::prelude::*;

const SIGNER: &str = "example.com/foo";
const TEST_TIMEOUT: Duration = Duration::from_secs(90);

async fn start(
    identity: &meshca_testsupport::Identity,
    signers: Vec<SignerConfig>,
    trust_bundle: Option<TrustBundleTarget>,
) -> meshca_signer::Running {
    let client = identity.client().await.unwrap();
    let mut config = Config::new(signers);
    config.monitoring_listen = Some("127.0.0.1:0".parse().unwrap());
    config.ca_poll_interval = Duration::from_millis(200);
    config.trust_bundle = trust_bundle;
    meshca_signer::start(client, config).await.unwrap()
}

/// The signer's events.k8s.io/v1 Events about `csr`, read through core/v1,
/// which can select on the object.
async fn events_for(client: &kube::Client, csr: &str) -> Vec<Event> {
    Api::<Event>::namespaced(client.clone(), "default")
        .list(&ListParams::default().fields(&format!("involvedObject.name={csr}")))
        .await
        .unwrap()
        .items
}

async fn wait_event(client: &kube::Client, csr: &str, reason: &str) -> Event {
    for _ in 0..100 {
        if let Some(e) = events_for(client, csr)
            .await
            .into_iter()
            .find(|e| e.reason.as_deref() == Some(reason))
        {
            return e;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no Event {reason} for CSR {csr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istiod_shaped_csrs_are_signed_and_nothing_else_is() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let env = TestEnv::get().await;
        let admin = env.client();
        let ns = env.namespace("signer-istiod").await.unwrap();
        let dir = ns.temp_dir().to_path_buf();
        let o = manifest_options(&ns, &[SIGNER]);
        let controller_id = controller_identity(&ns, &o).await.unwrap();
        let istiod = istiod_identity(&ns, &o)
            .await
            .unwrap()
            .client()
            .await
            .unwrap();
        let ca = make_ca(&dir.join("ca"), "signer", Duration::from_secs(86400 * 30));
        let running = start(
            &controller_id,
            vec![SignerConfig {
                policy: SignerPolicy::istiod(SIGNER),
                ca: CaSource::Dir(ca.dir.clone()),
            }],
            None,
        )
        .await;

        // Three istiod-shaped CSRs, approved by istiod's identity.
        let mut good = Vec::new();
        for i in 0..3 {
            let uri = format!("spiffe://cluster.local/ns/{}/sa/sa{i}", ns.name());
            let pem = spiffe_csr(&dir, &uri);
            let name = create_csr(&ns, &istiod, SIGNER, &pem, &ISTIOD_USAGES, Some(3600))
                .await
                .unwrap();
            set_approval(&istiod, &name, "Approved").await.unwrap();
            good.push((name, uri));
        }
        // Never to be signed: denied, unapproved, another signer's (approved by admin),
        // approved then denied.
        let uri = format!("spiffe://cluster.local/ns/{}/sa/other", ns.name());
        let denied = create_csr(
            &ns,
            &istiod,
            SIGNER,
            &spiffe_csr(&dir, &uri),
            &ISTIOD_USAGES,
            Some(3600),
        )
        .await
        .unwrap();
        set_approval(&istiod, &denied, "Denied").await.unwrap();
        let unapproved = create_csr(
            &ns,
            &istiod,
            SIGNER,
            &spiffe_csr(&dir, &uri),
            &ISTIOD_USAGES,
            Some(3600),
        )
        .await
        .unwrap();
        let other = create_csr(
            &ns,
            &admin,
            "example.com/bar",
            &spiffe_csr(&dir, &uri),
            &ISTIOD_USAGES,
            Some(3600),
        )
        .await
        .unwrap();
        set_approval(&admin, &other, "Approved").await.unwrap();

        for (name, uri) in &good {
            let chain = wait_issued(&istiod, name).await.unwrap();
            let blocks = split_pem(&chain);
            assert_eq!(blocks.len(), 2, "leaf + intermediate, no root: {chain}");
            assert_eq!(blocks[1], ca.intermediate_pem);
            openssl_verify(&dir, &chain, &ca.root_pem).unwrap();
            let der = meshca_pki::pem::parse_all(blocks[0].as_bytes()).unwrap();
            let (_, leaf) = X509Certificate::from_der(&der[0].der).unwrap();
            let sans = leaf.subject_alternative_name().unwrap().unwrap();
            assert_eq!(
                sans.value.general_names,
                vec![GeneralName::URI(uri.as_str())],
                "exactly the requested SPIFFE URI"
            );
            assert!(!leaf.is_ca());
            let eku = leaf.extended_key_usage().unwrap().unwrap().value;
            assert!(eku.server_auth && eku.client_auth);
            let life =
                leaf.validity().not_after.timestamp() - leaf.validity().not_before.timestamp();
            assert_eq!(
                life,
                3600 + 300,
                "expirationSeconds honoured, 5 min backdate"
            );
            assert_eq!(
                zlint_errors(&dir, &blocks[0]).unwrap(),
                Vec::<String>::new()
            );
            let ev = wait_event(&admin, name, "CertificateIssued").await;
            assert_eq!(ev.type_.as_deref(), Some("Normal"));
        }

        // Give the controller time to (wrongly) act on the others.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let api = Api::<CertificateSigningRequest>::all(admin.clone());
        for name in [&denied, &unapproved, &other] {
            let csr = api.get(name).await.unwrap();
            assert_eq!(certificate(&csr), None, "{name} must not be signed");
            assert_eq!(failed(&csr), None, "{name} must not be touched");
        }

        // Monitoring endpoints.
        let addr = running.monitoring_addr.unwrap();
        assert_eq!(http_get(addr, "/healthz").await.unwrap().0, 200);
        assert_eq!(http_get(addr, "/readyz").await.unwrap().0, 200);
        let (code, text) = http_get(addr, "/metrics").await.unwrap();
        assert_eq!(code, 200);
        let signed = metric(
            &text,
            "meshca_signer_signed_total{signer=\"example.com/foo\"}",
        );
        assert!(signed.unwrap_or(0.0) >= 3.0, "{text}");
        assert!(
            text.contains("meshca_signer_issue_latency_seconds_bucket{"),
            "{text}"
        );
        assert!(
            text.contains("meshca_signer_ca_expiry_timestamp_seconds{signer=\"example.com/foo\"}"),
            "{text}"
        );
        assert!(
            text.contains("meshca_signer_queue_depth{signer=\"example.com/foo\"}"),
            "{text}"
        );

        // Approving the unapproved one now gets it signed (the watch sees the change).
        set_approval(&istiod, &unapproved, "Approved")
            .await
            .unwrap();
        let chain = wait_issued(&istiod, &unapproved).await.unwrap();
        openssl_verify(&dir, &chain, &ca.root_pem).unwrap();

        running.shutdown().await.unwrap();
        ns.cleanup().await.unwrap();
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_policy_violation_fails_with_its_reason() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let env = TestEnv::get().await;
        let admin = env.client();
        let Setup {
            ns,
            dir,
            signer,
            controller_id,
            istiod,
        } = setup(&env, "signer-policy").await;
        let ca = make_ca(&dir.join("ca"), "signer", Duration::from_secs(86400 * 30));
        let running = start(
            &controller_id,
            vec![SignerConfig {
                policy: SignerPolicy::istiod(signer.clone()),
                ca: CaSource::Dir(ca.dir.clone()),
            }],
            None,
        )
        .await;

        let good_uri = format!(
            "subjectAltName=URI:spiffe://cluster.local/ns/{}/sa/x",
            ns.name()
        );
        let cases: Vec<(&str, String, Vec<&str>)> = vec![
            // The default subject policy: Istio's template (empty), since a
            // copied subject would make this an apiserver admin's
            // certificate wherever the CA is also a client CA.
            (
                "policy_subject_not_empty",
                openssl_csr(&dir, "/O=system:masters/CN=kubernetes-admin", &[&good_uri]).unwrap(),
                ISTIOD_USAGES.to_vec(),
            ),
            (
                "policy_trust_domain",
                openssl_csr(
                    &dir,
                    "/",
                    &["subjectAltName=URI:spiffe://evil.example/ns/a/sa/b"],
                )
                .unwrap(),
                ISTIOD_USAGES.to_vec(),
            ),
            (
                "policy_uri_not_spiffe",
                openssl_csr(&dir, "/", &["subjectAltName=URI:https://example.com/a"]).unwrap(),
                ISTIOD_USAGES.to_vec(),
            ),
            (
                "policy_dns_san",
                openssl_csr(&dir, "/", &[&format!("{good_uri},DNS:foo.example.com")]).unwrap(),
                ISTIOD_USAGES.to_vec(),
            ),
            (
                "policy_ip_san",
                openssl_csr(&dir, "/", &[&format!("{good_uri},IP:10.1.2.3")]).unwrap(),
                ISTIOD_USAGES.to_vec(),
            ),
            (
                "policy_email_san",
                openssl_csr(&dir, "/", &[&format!("{good_uri},email:a@example.com")]).unwrap(),
                ISTIOD_USAGES.to_vec(),
            ),
            (
                "policy_uri_san_count",
                openssl_csr(
                    &dir,
                    "/",
                    &[&format!("{good_uri},URI:spiffe://cluster.local/ns/a/sa/b")],
                )
                .unwrap(),
                ISTIOD_USAGES.to_vec(),
            ),
            (
                "policy_uri_san_count",
                openssl_csr(&dir, "/", &[]).unwrap(),
                ISTIOD_USAGES.to_vec(),
            ),
            (
                "policy_ca_requested",
                openssl_csr(&dir, "/", &[&good_uri, "basicConstraints=critical,CA:TRUE"]).unwrap(),
                ISTIOD_USAGES.to_vec(),
            ),
            (
                "policy_usage_not_allowed",
                openssl_csr(&dir, "/", &[&good_uri]).unwrap(),
                vec!["digital signature", "code signing"],
            ),
            // The key policy comes before the signature check (pki's
            // validate_csr): refused for its size, never as a bad signature.
            (
                "csr_key_size",
                openssl_csr_key(&dir, "/", &[&good_uri], &["-newkey", "rsa:1024"]).unwrap(),
                ISTIOD_USAGES.to_vec(),
            ),
        ];
        let mut names = Vec::new();
        for (code, pem, usages) in &cases {
            let name = create_csr(&ns, &istiod, &signer, pem, usages, Some(3600))
                .await
                .unwrap();
            set_approval(&istiod, &name, "Approved").await.unwrap();
            names.push((name, *code));
        }
        for (name, code) in &names {
            let cond = wait_failed(&istiod, name).await.unwrap();
            assert_eq!(cond.status, "True");
            assert_eq!(
                cond.reason.as_deref(),
                Some("SignerValidationFailure"),
                "{name}"
            );
            let msg = cond.message.unwrap_or_default();
            assert!(msg.starts_with(&format!("{code}: ")), "{code}: {msg}");
            assert!(msg.contains(&signer), "{msg}");
            let ev = wait_event(&admin, name, "SignerValidationFailure").await;
            assert_eq!(ev.type_.as_deref(), Some("Warning"));
            let note = ev.message.unwrap_or_default();
            assert!(note.starts_with(code), "{code}: {note}");
        }
        let text = running.metrics_text();
        let series = format!(
            "meshca_signer_failed_total{{signer=\"{signer}\",reason=\"policy_uri_san_count\"}}"
        );
        assert_eq!(metric(&text, &series), Some(2.0), "{text}");
        assert_eq!(
            metric(
                &text,
                &format!("meshca_signer_signed_total{{signer=\"{signer}\"}}")
            ),
            None,
            "nothing signed: {text}"
        );

        running.shutdown().await.unwrap();
        ns.cleanup().await.unwrap();
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_ca_fails_csrs_and_a_new_ca_in_the_dir_is_picked_up() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let env = TestEnv::get().await;
        let Setup {
            ns,
            dir,
            signer,
            controller_id,
            istiod,
        } = setup(&env, "signer-expiry").await;
        // An intermediate that expires 5 s from now.
        let ca = make_ca(&dir.join("ca"), "short", Duration::from_secs(5));
        let running = start(
            &controller_id,
            vec![SignerConfig {
                policy: SignerPolicy::istiod(signer.clone()),
                ca: CaSource::Dir(ca.dir.clone()),
            }],
            None,
        )
        .await;
        assert!(running.ready());
        // Wait for the CA's own notAfter (as the signer reports it), not a guess.
        let expiry = ca_expiry(&running, &signer);
        let left = expiry - ::time::OffsetDateTime::now_utc().unix_timestamp();
        tokio::time::sleep(Duration::from_secs(u64::try_from(left + 1).unwrap_or(0))).await;

        let uri = format!("spiffe://cluster.local/ns/{}/sa/x", ns.name());
        let name = create_csr(
            &ns,
            &istiod,
            &signer,
            &spiffe_csr(&dir, &uri),
            &ISTIOD_USAGES,
            Some(3600),
        )
        .await
        .unwrap();
        set_approval(&istiod, &name, "Approved").await.unwrap();
        let cond = wait_failed(&istiod, &name).await.unwrap();
        assert_eq!(cond.reason.as_deref(), Some("SignerCAExpired"));
        assert!(cond.message.unwrap_or_default().starts_with("ca_expired: "));

        // A new CA written into the directory is used without a restart.
        let fresh = make_ca(&dir.join("ca"), "fresh", Duration::from_secs(86400));
        // Until the signer reports the new CA's expiry: it has loaded it.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while ca_expiry(&running, &signer) == expiry {
            assert!(
                std::time::Instant::now() < deadline,
                "the new CA was not loaded"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let name = create_csr(
            &ns,
            &istiod,
            &signer,
            &spiffe_csr(&dir, &uri),
            &ISTIOD_USAGES,
            Some(3600),
        )
        .await
        .unwrap();
        set_approval(&istiod, &name, "Approved").await.unwrap();
        let chain = wait_issued(&istiod, &name).await.unwrap();
        openssl_verify(&dir, &chain, &fresh.root_pem).unwrap();
        assert!(openssl_verify(&dir, &chain, &ca.root_pem).is_err());

        running.shutdown().await.unwrap();
        ns.cleanup().await.unwrap();
    })
    .await
    .expect("test timed out");
}

/// The signer's reported notAfter of its CA (Unix seconds).
fn ca_expiry(running: &meshca_signer::Running, signer: &str) -> i64 {
    let text = running.metrics_text();
    let line = format!("meshca_signer_ca_expiry_timestamp_seconds{{signer=\"{signer}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&line))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no CA expiry for {signer} in {text}"))
}

fn tls_secret(name: &str, ns: &str, cert: &str, key: &str, roots: &str) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(ns.into()),
            ..Default::default()
        },
        type_: Some("kubernetes.io/tls".into()),
        data: Some(
            [
                ("tls.crt".to_string(), ByteString(cert.as_bytes().to_vec())),
                ("tls.key".to_string(), ByteString(key.as_bytes().to_vec())),
                ("ca.crt".to_string(), ByteString(roots.as_bytes().to_vec())),
            ]
            .into(),
        ),
        ..Default::default()
    }
}

async fn wait_trust_bundle(secrets: &Api<Secret>, want: &str) {
    for _ in 0..100 {
        if let Some(s) = secrets.get_opt("external-ca-cert").await.unwrap() {
            let got = s.data.and_then(|d| d.get("root-cert.pem").cloned());
            if got.as_ref().map(|b| b.0.as_slice()) == Some(want.as_bytes()) {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("external-ca-cert never held the expected roots");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_secret_rotation_under_load_and_trust_bundle_publication() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let env = TestEnv::get().await;
        let admin = env.client();
        let Setup {
            ns,
            dir,
            signer,
            controller_id,
            istiod,
        } = setup(&env, "signer-rotation").await;
        let secrets = Api::<Secret>::namespaced(admin.clone(), ns.name());

        let ca1 = make_ca(&dir.join("ca1"), "one", Duration::from_secs(86400));
        secrets
            .create(
                &PostParams::default(),
                &tls_secret(
                    "signer-ca-keypair",
                    ns.name(),
                    &ca1.intermediate_pem,
                    &ca1.key_pem,
                    &ca1.root_pem,
                ),
            )
            .await
            .unwrap();
        let running = start(
            &controller_id,
            vec![SignerConfig {
                policy: SignerPolicy::istiod(signer.clone()),
                ca: CaSource::Secret {
                    namespace: ns.name().into(),
                    name: "signer-ca-keypair".into(),
                },
            }],
            Some(TrustBundleTarget {
                namespace: ns.name().into(),
                ..Default::default()
            }),
        )
        .await;
        wait_trust_bundle(&secrets, &ca1.root_pem).await;
        let published = secrets.get("external-ca-cert").await.unwrap();
        assert_eq!(published.type_.as_deref(), Some("Opaque"));
        assert_eq!(
            published.metadata.labels.unwrap()["app.kubernetes.io/managed-by"],
            "meshca-signer"
        );

        // Someone else's plain update of the roots is put back at once (the
        // Secret is watched; the resync is 30 s), and a key they added goes.
        let mut edited = secrets.get("external-ca-cert").await.unwrap();
        let data = edited.data.as_mut().unwrap();
        data.insert("root-cert.pem".into(), ByteString(b"not a root".to_vec()));
        data.insert("ca.crt".into(), ByteString(b"someone else's root".to_vec()));
        let other_manager = PostParams {
            field_manager: Some("someone-else".into()),
            ..Default::default()
        };
        secrets
            .replace("external-ca-cert", &other_manager, &edited)
            .await
            .unwrap();
        wait_trust_bundle(&secrets, &ca1.root_pem).await;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let restored = loop {
            let s = secrets.get("external-ca-cert").await.unwrap();
            if !s.data.as_ref().unwrap().contains_key("ca.crt") {
                break s;
            }
            assert!(std::time::Instant::now() < deadline, "the added key stays");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let keys: Vec<&String> = restored.data.as_ref().unwrap().keys().collect();
        assert_eq!(keys, ["root-cert.pem"]);
        let applied = restored.metadata.managed_fields.iter().flatten().any(|m| {
            m.manager.as_deref() == Some("meshca-signer") && m.operation.as_deref() == Some("Apply")
        });
        assert!(
            applied,
            "not applied by meshca-signer: {:?}",
            restored.metadata.managed_fields
        );

        // Load: CSRs keep coming while the CA rotates to a new root and
        // intermediate, with both roots trusted during the rotation.
        let uri = format!("spiffe://cluster.local/ns/{}/sa/x", ns.name());
        let pems: Vec<String> = (0..30).map(|_| spiffe_csr(&dir, &uri)).collect();
        let mut names = Vec::new();
        for pem in &pems[..15] {
            let n = create_csr(&ns, &istiod, &signer, pem, &ISTIOD_USAGES, Some(3600))
                .await
                .unwrap();
            set_approval(&istiod, &n, "Approved").await.unwrap();
            names.push(n);
        }
        let ca2 = make_ca(&dir.join("ca2"), "two", Duration::from_secs(86400));
        let both_roots = format!("{}{}", ca1.root_pem, ca2.root_pem);
        let mut s = secrets.get("signer-ca-keypair").await.unwrap();
        s.data = tls_secret("x", "x", &ca2.intermediate_pem, &ca2.key_pem, &both_roots).data;
        secrets
            .replace("signer-ca-keypair", &PostParams::default(), &s)
            .await
            .unwrap();
        for pem in &pems[15..] {
            let n = create_csr(&ns, &istiod, &signer, pem, &ISTIOD_USAGES, Some(3600))
                .await
                .unwrap();
            set_approval(&istiod, &n, "Approved").await.unwrap();
            names.push(n);
        }
        wait_trust_bundle(&secrets, &both_roots).await;
        let mut by_new = 0;
        for n in &names {
            let chain = wait_issued(&istiod, n).await.unwrap();
            // Every certificate verifies against the published bundle.
            openssl_verify(&dir, &chain, &both_roots).unwrap();
            if openssl_verify(&dir, &chain, &ca2.root_pem).is_ok() {
                by_new += 1;
            }
        }
        assert!(by_new >= 1, "the new CA is in use");
        // After the rotation, a new CSR is signed by the new intermediate.
        let n = create_csr(
            &ns,
            &istiod,
            &signer,
            &spiffe_csr(&dir, &uri),
            &ISTIOD_USAGES,
            Some(3600),
        )
        .await
        .unwrap();
        set_approval(&istiod, &n, "Approved").await.unwrap();
        let chain = wait_issued(&istiod, &n).await.unwrap();
        assert_eq!(split_pem(&chain)[1], ca2.intermediate_pem);
        openssl_verify(&dir, &chain, &ca2.root_pem).unwrap();

        running.shutdown().await.unwrap();
        ns.cleanup().await.unwrap();
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_from_separate_files_as_signer_ca_flags_and_reloaded() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let env = TestEnv::get().await;
        let Setup {
            ns,
            dir,
            signer,
            controller_id,
            istiod,
        } = setup(&env, "signer-files").await;
        let files = dir.join("files");
        std::fs::create_dir_all(&files).unwrap();
        // tls.crt = intermediate + root (the roots default to the chain's end).
        let write = |ca: &TestCa| {
            std::fs::write(files.join("key.pem"), &ca.key_pem).unwrap();
            std::fs::write(
                files.join("cert.pem"),
                format!("{}{}", ca.intermediate_pem, ca.root_pem),
            )
            .unwrap();
        };
        let ca1 = make_ca(&dir.join("ca1"), "one", Duration::from_secs(86400));
        write(&ca1);
        let running = start(
            &controller_id,
            vec![SignerConfig {
                policy: SignerPolicy::istiod(signer.clone()),
                ca: CaSource::Files {
                    cert: files.join("cert.pem"),
                    key: files.join("key.pem"),
                    roots: None,
                },
            }],
            None,
        )
        .await;
        let uri = format!("spiffe://cluster.local/ns/{}/sa/x", ns.name());
        let sign = || async {
            let n = create_csr(
                &ns,
                &istiod,
                &signer,
                &spiffe_csr(&dir, &uri),
                &ISTIOD_USAGES,
                Some(3600),
            )
            .await
            .unwrap();
            set_approval(&istiod, &n, "Approved").await.unwrap();
            wait_issued(&istiod, &n).await.unwrap()
        };
        let chain = sign().await;
        openssl_verify(&dir, &chain, &ca1.root_pem).unwrap();

        let ca2 = make_ca(&dir.join("ca2"), "two", Duration::from_secs(86400));
        write(&ca2);
        tokio::time::sleep(Duration::from_millis(800)).await;
        let chain = sign().await;
        openssl_verify(&dir, &chain, &ca2.root_pem).unwrap();
        running.shutdown().await.unwrap();
        ns.cleanup().await.unwrap();
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_sign_permission_is_visible_and_nothing_is_signed() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let env = TestEnv::get().await;
        let ns = env.namespace("signer-rbac").await.unwrap();
        let dir = ns.temp_dir().to_path_buf();
        let signer = unique_signer(&ns);
        // The manifests rendered for another signer name: no `sign` on ours.
        let wrong = manifest_options(&ns, &["other.example.com/x"]);
        let controller_id = controller_identity(&ns, &wrong).await.unwrap();
        let o = manifest_options(&ns, &[&signer]);
        let istiod = istiod_identity(&ns, &o)
            .await
            .unwrap()
            .client()
            .await
            .unwrap();
        let ca = make_ca(&dir.join("ca"), "rbac", Duration::from_secs(86400));
        let running = start(
            &controller_id,
            vec![SignerConfig {
                policy: SignerPolicy::istiod(signer.clone()),
                ca: CaSource::Dir(ca.dir.clone()),
            }],
            None,
        )
        .await;
        let uri = format!("spiffe://cluster.local/ns/{}/sa/x", ns.name());
        let name = create_csr(
            &ns,
            &istiod,
            &signer,
            &spiffe_csr(&dir, &uri),
            &ISTIOD_USAGES,
            Some(3600),
        )
        .await
        .unwrap();
        set_approval(&istiod, &name, "Approved").await.unwrap();
        let series = format!("meshca_signer_api_errors_total{{signer=\"{signer}\",code=\"403\"}}");
        let mut seen = false;
        for _ in 0..100 {
            if metric(&running.metrics_text(), &series).unwrap_or(0.0) >= 1.0 {
                seen = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(seen, "{}", running.metrics_text());
        let csr = Api::<CertificateSigningRequest>::all(env.client())
            .get(&name)
            .await
            .unwrap();
        assert_eq!(certificate(&csr), None);
        assert_eq!(failed(&csr), None);
        running.shutdown().await.unwrap();
        ns.cleanup().await.unwrap();
    })
    .await
    .expect("test timed out");
}
