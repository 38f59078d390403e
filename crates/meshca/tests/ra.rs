//! `meshca server` in RA mode (`EXTERNAL_CA=ISTIOD_RA_KUBERNETES_API`)
//! against a real kube-apiserver and the real `meshca signer`: the server
//! runs with exactly the Helm chart's RBAC for RA mode, the signer with
//! exactly the chart's signer RBAC. Each test has its own signer name
//! (`<namespace>.example.com/foo`, substituted for the manifest's
//! `example.com/foo`) so tests running at once never sign each other's CSRs.

mod common;

use common::ra::{
    Server, assert_csrs_gone, openssl_verify, pem_ders, request, server_ra_rbac, signer_ca,
    signer_ca_in_token, start_signer, workload_csr,
};
use common::{leaf_uris, pem_der};

use std::process::Command;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use kube::api::{Api, WatchEvent, WatchParams};
use meshca_testsupport::TestEnv;
use x509_parser::prelude::*;

fn leaf_lifetime(chain: &[String]) -> i64 {
    let der = &pem_ders(&chain[0])[0];
    let (_, cert) = X509Certificate::from_der(der).unwrap();
    cert.validity().not_after.timestamp() - ::time::OffsetDateTime::now_utc().unix_timestamp()
}

/// Watch events seen: ("added" | "modified" | "deleted", the object).
type Seen = std::sync::Arc<std::sync::Mutex<Vec<(String, CertificateSigningRequest)>>>;

/// Records every version of `signer`'s CSRs (as an admin) until aborted:
/// what the server submitted, how it approved, and that it deleted them.
fn record_csrs(client: kube::Client, signer: &str) -> (tokio::task::JoinHandle<()>, Seen) {
    let seen = Seen::default();
    let api = Api::<CertificateSigningRequest>::all(client);
    let wp = WatchParams::default().fields(&format!("spec.signerName={signer}"));
    let out = seen.clone();
    let task = tokio::spawn(async move {
        let mut events = api.watch(&wp, "0").await.unwrap().boxed();
        while let Ok(Some(event)) = events.try_next().await {
            let (kind, csr) = match event {
                WatchEvent::Added(c) => ("added", c),
                WatchEvent::Modified(c) => ("modified", c),
                WatchEvent::Deleted(c) => ("deleted", c),
                _ => continue,
            };
            out.lock().unwrap().push((kind.to_string(), csr));
        }
    });
    (task, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_client_gets_a_chain_from_the_signer_through_the_kubernetes_csr_api() {
    tokio::time::timeout(Duration::from_secs(120), async {
        let env = TestEnv::get().await;
        let ns = env.namespace("srv-ra-ok").await.unwrap();
        let dir = ns.temp_dir().to_path_buf();
        let domain = format!("{}.example.com", ns.name());
        let signer = format!("{domain}/foo");
        // The signer's key is in a token (SoftHSM2): the RA path end to end with an HSM key.
        let ca = signer_ca_in_token(&dir).unwrap();
        let _signer = start_signer(&ns, &signer, &ca, "cluster.local")
            .await
            .unwrap();
        let server = Server::start(
            &ns,
            &signer,
            &ca.root_pem,
            &[
                "--cert-signer-domain",
                &domain,
                "--cert-signers",
                "foo",
                "--ra-timeout",
                "30s",
            ],
        )
        .await
        .unwrap();

        ns.create_service_account("workload").await.unwrap();
        let token = ns.token("workload").await.unwrap();
        let token_file = dir.join("workload.token");
        std::fs::write(&token_file, &token).unwrap();
        let spiffe = format!("spiffe://cluster.local/ns/{}/sa/workload", ns.name());
        let (recorder, seen) = record_csrs(env.client(), &signer);
        tokio::time::sleep(Duration::from_millis(200)).await;

        // Istio's own Go client, as istio-agent asks.
        let out = Command::new(meshca_testsupport::bin("istio-client"))
            .args([
                "-addr",
                &server.addr,
                "-json",
                "-timeout",
                "30s",
                "-ttl",
                "1h",
            ])
            .arg("-root-cert")
            .arg(server.serving_root())
            .arg("-token")
            .arg(&token_file)
            .args(["-host", &spiffe])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "istio-client: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let chain: Vec<String> = json["chain"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap().to_string())
            .collect();
        assert_eq!(
            chain.len(),
            3,
            "leaf, the signer's intermediate, root: {chain:?}"
        );
        assert_eq!(
            pem_ders(chain.last().unwrap()),
            pem_ders(&ca.root_pem),
            "the signer's root is the last element"
        );
        openssl_verify(&dir, &chain, &ca.root_pem).unwrap();
        assert_eq!(leaf_uris(&chain), vec![spiffe.clone()]);
        // expirationSeconds carried the requested TTL to the signer.
        let life = leaf_lifetime(&chain);
        assert!(
            (3500..=3600).contains(&life),
            "lifetime {life}s for a 1h request"
        );

        // The CSR as istiod makes it, approved by the server, then deleted.
        assert_csrs_gone(&signer).await;
        {
            let seen = seen.lock().unwrap();
            let (_, first) = seen.first().expect("the server's CSR was seen");
            let name = first.metadata.name.clone().unwrap();
            assert!(name.starts_with("csr-workload-"), "{name}");
            assert_eq!(first.spec.signer_name, signer);
            assert_eq!(first.spec.expiration_seconds, Some(3600));
            assert_eq!(
                first.spec.usages.as_deref().unwrap(),
                [
                    "digital signature",
                    "key encipherment",
                    "server auth",
                    "client auth"
                ]
            );
            assert_eq!(
                first.spec.username.as_deref(),
                Some(format!("system:serviceaccount:{}:meshca", ns.name()).as_str())
            );
            let ours: Vec<_> = seen
                .iter()
                .filter(|(_, c)| c.metadata.name.as_deref() == Some(&name))
                .collect();
            let approved = ours.iter().find_map(|(_, c)| {
                c.status
                    .as_ref()?
                    .conditions
                    .as_ref()?
                    .iter()
                    .find(|c| c.type_ == "Approved")
                    .cloned()
            });
            let approved = approved.expect("approved");
            assert_eq!(approved.status, "True");
            assert_eq!(approved.reason.as_deref(), Some("MeshcaRAApproved"));
            assert!(
                ours.iter()
                    .any(|(_, c)| c.status.as_ref().is_some_and(|s| s.certificate.is_some())),
                "signed"
            );
            assert_eq!(ours.last().unwrap().0, "deleted", "deleted afterwards");
        }
        recorder.abort();

        // The per-request signer: CERT_SIGNER_DOMAIN/<CertSigner>, and a TTL
        // below the API's minimum raised to 600 s.
        let mut client = server.grpc().await.unwrap();
        let answer = client
            .create_certificate(request(workload_csr(&spiffe), 60, "foo", &token))
            .await
            .unwrap()
            .into_inner()
            .cert_chain;
        openssl_verify(&dir, &answer, &ca.root_pem).unwrap();
        assert_eq!(leaf_uris(&answer), vec![spiffe.clone()]);
        let life = leaf_lifetime(&answer);
        assert!(
            (500..=600).contains(&life),
            "lifetime {life}s for a 60 s request"
        );

        // istiod's checks happen before anything is submitted.
        assert_csrs_gone(&signer).await;
        let (recorder, seen) = record_csrs(env.client(), &signer);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let other = format!("spiffe://cluster.local/ns/{}/sa/admin", ns.name());
        let refused = client
            .create_certificate(request(workload_csr(&other), 0, "", &token))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
        // Istio's template: an empty subject. This one would make the
        // signer's certificate an apiserver admin wherever the CA is also
        // trusted for client certificates.
        let key = meshca_pki::SigningKey::generate(meshca_pki::KeyType::EcdsaP256).unwrap();
        let admin_csr = meshca_pki::csr::build_csr(
            &key,
            &meshca_pki::cert::organization_and_common_name("system:masters", "kubernetes-admin"),
            &[meshca_pki::SanEntry::Uri(spiffe.clone())],
        )
        .unwrap();
        let refused = client
            .create_certificate(request(admin_csr, 0, "", &token))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
        assert_eq!(
            refused
                .metadata()
                .get("meshca-reason")
                .unwrap()
                .to_str()
                .unwrap(),
            "ra_csr_template"
        );
        // CertSigner only from the allow-list (--cert-signers foo), not any
        // signer under the domain.
        let not_listed = format!("{domain}/kube-apiserver-client");
        let (not_listed_recorder, not_listed_seen) = record_csrs(env.client(), &not_listed);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let refused = client
            .create_certificate(request(
                workload_csr(&spiffe),
                0,
                "kube-apiserver-client",
                &token,
            ))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
        assert_eq!(
            refused
                .metadata()
                .get("meshca-reason")
                .unwrap()
                .to_str()
                .unwrap(),
            "ra_signer_not_allowed"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        recorder.abort();
        not_listed_recorder.abort();
        let created: Vec<_> = seen
            .lock()
            .unwrap()
            .iter()
            .map(|(k, _)| k.clone())
            .collect();
        assert!(
            created.is_empty(),
            "CSR objects for refused requests: {created:?}"
        );
        assert!(
            not_listed_seen.lock().unwrap().is_empty(),
            "a CSR for {not_listed}"
        );

        assert_csrs_gone(&signer).await;
        drop(server);
        ns.cleanup().await.unwrap();
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signer_failure_comes_back_at_once_with_the_signers_reason() {
    tokio::time::timeout(Duration::from_secs(120), async {
        let env = TestEnv::get().await;
        let ns = env.namespace("srv-ra-deny").await.unwrap();
        let dir = ns.temp_dir().to_path_buf();
        let signer = format!("{}.example.com/foo", ns.name());
        let ca = signer_ca(&dir).unwrap();
        // The signer only certifies another trust domain.
        let _signer = start_signer(&ns, &signer, &ca, "other.example")
            .await
            .unwrap();
        // A 60 s timeout: only noticing Failed makes the answer fast.
        let server = Server::start(&ns, &signer, &ca.root_pem, &[])
            .await
            .unwrap();
        ns.create_service_account("workload").await.unwrap();
        let token = ns.token("workload").await.unwrap();
        let spiffe = format!("spiffe://cluster.local/ns/{}/sa/workload", ns.name());
        let mut client = server.grpc().await.unwrap();

        // The first request also waits for the signer's initial list; time the second.
        for attempt in 0..2 {
            let started = Instant::now();
            let e = client
                .create_certificate(request(workload_csr(&spiffe), 3600, "", &token))
                .await
                .unwrap_err();
            let took = started.elapsed();
            assert_eq!(e.code(), tonic::Code::Internal, "{e:?}");
            assert!(e.message().starts_with("CSR signing error ("), "{e:?}");
            assert!(e.message().contains("policy_trust_domain"), "{e:?}");
            assert!(e.message().contains("SignerValidationFailure"), "{e:?}");
            assert_eq!(
                e.metadata().get("meshca-reason").unwrap().to_str().unwrap(),
                "ra_failed"
            );
            if attempt == 1 {
                assert!(took < Duration::from_secs(1), "denial took {took:?}");
            }
        }
        assert_csrs_gone(&signer).await;
        drop(server);
        ns.cleanup().await.unwrap();
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_answer_the_request_times_out_and_the_csr_is_deleted() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let env = TestEnv::get().await;
        let ns = env.namespace("srv-ra-timeout").await.unwrap();
        let signer = format!("{}.example.com/foo", ns.name());
        let ca = signer_ca(ns.temp_dir()).unwrap();
        // No signer runs for this name.
        let server = Server::start(&ns, &signer, &ca.root_pem, &["--ra-timeout", "1s"])
            .await
            .unwrap();
        ns.create_service_account("workload").await.unwrap();
        let token = ns.token("workload").await.unwrap();
        let spiffe = format!("spiffe://cluster.local/ns/{}/sa/workload", ns.name());
        let mut client = server.grpc().await.unwrap();
        // A tampered CSR (the signature's last bit flipped) is refused at
        // once, with the pki's reason, before anything is submitted.
        let mut der = pem_der(&workload_csr(&spiffe));
        *der.last_mut().unwrap() ^= 1;
        let tampered = meshca_pki::pem::encode("CERTIFICATE REQUEST", &der);
        let e = client
            .create_certificate(request(tampered, 0, "", &token))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
        assert_eq!(
            e.metadata().get("meshca-reason").unwrap().to_str().unwrap(),
            "csr_signature_invalid"
        );
        let started = Instant::now();
        let e = client
            .create_certificate(request(workload_csr(&spiffe), 0, "", &token))
            .await
            .unwrap_err();
        let took = started.elapsed();
        assert_eq!(e.code(), tonic::Code::Internal, "{e:?}");
        assert!(e.message().contains(&signer), "{e:?}");
        assert_eq!(
            e.metadata().get("meshca-reason").unwrap().to_str().unwrap(),
            "ra_timeout"
        );
        assert!(
            took >= Duration::from_secs(1) && took < Duration::from_secs(5),
            "{took:?}"
        );
        assert_csrs_gone(&signer).await;
        drop(server);
        ns.cleanup().await.unwrap();
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_that_does_not_verify_to_the_configured_roots_is_refused_until_the_roots_file_has_its_root()
 {
    tokio::time::timeout(Duration::from_secs(120), async {
        let env = TestEnv::get().await;
        let ns = env.namespace("srv-ra-roots").await.unwrap();
        let dir = ns.temp_dir().to_path_buf();
        let signer = format!("{}.example.com/foo", ns.name());
        let ca = signer_ca(&dir).unwrap();
        let stranger = signer_ca(&dir.join("stranger")).unwrap();
        let _signer = start_signer(&ns, &signer, &ca, "cluster.local")
            .await
            .unwrap();
        ns.create_service_account("workload").await.unwrap();
        let token = ns.token("workload").await.unwrap();
        let spiffe = format!("spiffe://cluster.local/ns/{}/sa/workload", ns.name());

        // The default root is someone else's: the signed chain is refused.
        let wrong = Server::start(
            &ns,
            &signer,
            &stranger.root_pem,
            &["--reload-interval", "200ms"],
        )
        .await
        .unwrap();
        let e = wrong
            .grpc()
            .await
            .unwrap()
            .create_certificate(request(workload_csr(&spiffe), 3600, "", &token))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Internal, "{e:?}");
        assert_eq!(
            e.metadata().get("meshca-reason").unwrap().to_str().unwrap(),
            "ra_chain_invalid",
            "{e:?}"
        );

        // The roots file gains the signer's root (as kubelet updates the
        // mounted external-ca-cert Secret, by rename): accepted without a
        // restart, and the answer ends with the roots now configured.
        let both = format!("{}{}", stranger.root_pem, ca.root_pem);
        let file = wrong.state.path().join("external-ca-cert/root-cert.pem");
        std::fs::write(file.with_extension("tmp"), &both).unwrap();
        std::fs::rename(file.with_extension("tmp"), &file).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let chain = loop {
            let answer = wrong
                .grpc()
                .await
                .unwrap()
                .create_certificate(request(workload_csr(&spiffe), 3600, "", &token))
                .await;
            match answer {
                Ok(a) => break a.into_inner().cert_chain,
                Err(e) => assert!(
                    Instant::now() < deadline,
                    "still refused after the roots file changed: {e:?}"
                ),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        openssl_verify(&dir, &chain, &ca.root_pem).unwrap();
        assert_eq!(pem_ders(chain.last().unwrap()), pem_ders(&both));
        drop(wrong);

        // The same default, but this signer's own roots configured: accepted,
        // and those roots are what the answer ends with.
        let own = dir.join("own-root.pem");
        std::fs::write(&own, &ca.root_pem).unwrap();
        let spec = format!("{signer}={}", own.display());
        let right = Server::start(&ns, &signer, &stranger.root_pem, &["--signer-roots", &spec])
            .await
            .unwrap();
        let chain = right
            .grpc()
            .await
            .unwrap()
            .create_certificate(request(workload_csr(&spiffe), 3600, "", &token))
            .await
            .unwrap()
            .into_inner()
            .cert_chain;
        openssl_verify(&dir, &chain, &ca.root_pem).unwrap();
        assert_eq!(pem_ders(chain.last().unwrap()), pem_ders(&ca.root_pem));
        assert_csrs_gone(&signer).await;
        drop(right);
        ns.cleanup().await.unwrap();
    })
    .await
    .expect("test timed out");
}

/// The RA backend run in process: a signer name of the test's own, its CA's
/// root as the roots file, the server's identity with exactly the chart's
/// RA RBAC, a workload's SPIFFE ID and the backend's configuration.
struct InProcess {
    signer: String,
    identity: meshca_testsupport::Identity,
    spiffe: String,
    config: meshca_server::backend::ra::RaConfig,
}

impl InProcess {
    async fn set_up(ns: &meshca_testsupport::TestNamespace) -> InProcess {
        let dir = ns.temp_dir();
        let signer = format!("{}.example.com/foo", ns.name());
        let ca = signer_ca(dir).unwrap();
        let roots_file = dir.join("root-cert.pem");
        std::fs::write(&roots_file, &ca.root_pem).unwrap();
        let identity = ns
            .identity_from_manifest("meshca", &server_ra_rbac(ns, &signer).unwrap())
            .await
            .unwrap();
        let config = meshca_server::backend::ra::RaConfig {
            signer: Some(signer.clone()),
            signer_domain: None,
            cert_signers: Vec::new(),
            roots_file,
            signer_roots: Vec::new(),
            timeout: Duration::from_secs(5),
            workload: meshca_pki::WorkloadProfile::default(),
            after_create: None,
        };
        InProcess {
            spiffe: format!("spiffe://cluster.local/ns/{}/sa/workload", ns.name()),
            signer,
            identity,
            config,
        }
    }
}

/// The RA path (in process, with exactly the server's RA RBAC) when someone
/// who may create and delete CSRs, but not approve them, swaps meshca's CSR
/// between its creation and its approval: deletes it and creates another
/// with the same name and their own request. meshca must not approve the
/// impostor (nor delete it) and answers with `ra_csr_replaced`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_csr_swapped_under_the_same_name_is_never_approved_nor_deleted() {
    use k8s_openapi::ByteString;
    use kube::api::{DeleteParams, PostParams};
    use meshca_server::backend::ra::{AfterCreateHook, KubernetesRa, RaConfig, RaError};
    use std::sync::{Arc, Mutex};

    tokio::time::timeout(Duration::from_secs(60), async {
        let env = TestEnv::get().await;
        let ns = env.namespace("srv-ra-swap").await.unwrap();
        let InProcess {
            signer: _,
            identity,
            spiffe,
            config,
        } = InProcess::set_up(&ns).await;
        let impostor_csr = workload_csr(&format!(
            "spiffe://cluster.local/ns/{}/sa/attacker",
            ns.name()
        ));

        // The attacker (admin here): between create and approve, replace
        // meshca's CSR by their own under the same name.
        let admin = Api::<CertificateSigningRequest>::all(env.client());
        let swapped: Arc<Mutex<Option<(String, String)>>> = Arc::default();
        let hook = {
            let (admin, swapped, request) = (admin.clone(), swapped.clone(), impostor_csr.clone());
            AfterCreateHook(Arc::new(move |name: String| {
                let (admin, swapped, request) = (admin.clone(), swapped.clone(), request.clone());
                Box::pin(async move {
                    let ours = admin.get(&name).await.unwrap();
                    admin.delete(&name, &DeleteParams::default()).await.unwrap();
                    let mut impostor = ours.clone();
                    impostor.metadata = kube::api::ObjectMeta {
                        name: Some(name.clone()),
                        labels: ours.metadata.labels.clone(),
                        ..Default::default()
                    };
                    impostor.spec.request = ByteString(request.into_bytes());
                    impostor.spec.username = None;
                    impostor.spec.groups = None;
                    impostor.spec.uid = None;
                    impostor.spec.extra = None;
                    impostor.status = None;
                    // The delete may still be finishing.
                    let created = loop {
                        match admin.create(&PostParams::default(), &impostor).await {
                            Ok(c) => break c,
                            Err(e) if meshca_kube::status::is_conflict(&e) => {
                                tokio::time::sleep(Duration::from_millis(50)).await
                            }
                            Err(e) => panic!("creating the impostor: {e}"),
                        }
                    };
                    *swapped.lock().unwrap() = Some((name, created.metadata.uid.clone().unwrap()));
                })
            }))
        };
        let config = RaConfig {
            timeout: Duration::from_secs(20),
            after_create: Some(hook),
            ..config
        };
        let ra = KubernetesRa::new(
            identity.client().await.unwrap(),
            config,
            meshca_kube::ApiLimit::new(8),
        )
        .unwrap();
        let result = ra
            .sign(
                workload_csr(&spiffe).as_bytes(),
                std::slice::from_ref(&spiffe),
                3600,
                false,
                None,
            )
            .await;
        let (name, impostor_uid) = swapped.lock().unwrap().clone().expect("the hook ran");
        ns.delete_csr_on_cleanup(&name);
        // The impostor is still there, unapproved.
        let now = admin
            .get_opt(&name)
            .await
            .unwrap()
            .expect("the impostor was deleted");
        assert_eq!(now.metadata.uid.as_deref(), Some(impostor_uid.as_str()));
        assert_eq!(now.spec.request.0, impostor_csr.as_bytes());
        let conditions = now.status.and_then(|s| s.conditions).unwrap_or_default();
        assert!(
            conditions.iter().all(|c| c.type_ != "Approved"),
            "the impostor was approved: {conditions:?}"
        );
        let e = result.unwrap_err();
        assert_eq!(e, RaError::Replaced(name.clone()), "{e}");
        assert_eq!(e.reason(), "ra_csr_replaced");
        admin.delete(&name, &DeleteParams::default()).await.unwrap();
        ns.cleanup().await.unwrap();
    })
    .await
    .expect("test timed out");
}

/// A CSR with the server's label that no request waits for, as when the
/// apiserver commits a create after meshca's call gave up (created here by
/// an admin, exactly as the server would), is deleted once the orphan grace
/// has passed; a CSR without the label is left alone. The grace is short
/// here (20 s; the default outlasts the longest request) but longer than
/// any request of the other RA tests, whose CSRs this sweep also sees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_csr_of_ours_that_no_request_waits_for_is_deleted_after_the_grace() {
    use kube::api::{DeleteParams, PostParams};
    use meshca_server::backend::ra::{KubernetesRa, new_csr};

    const GRACE: Duration = Duration::from_secs(20);
    tokio::time::timeout(Duration::from_secs(120), async {
        let env = TestEnv::get().await;
        let ns = env.namespace("srv-ra-orphan").await.unwrap();
        let InProcess {
            signer,
            identity,
            spiffe,
            config,
        } = InProcess::set_up(&ns).await;
        let admin = Api::<CertificateSigningRequest>::all(env.client());
        let pp = PostParams::default();
        let ours = new_csr(workload_csr(&spiffe).as_bytes(), &signer, 3600);
        let orphan = admin.create(&pp, &ours).await.unwrap();
        let mut theirs = ours.clone();
        theirs.metadata.labels = None;
        let unlabeled = admin.create(&pp, &theirs).await.unwrap();
        let (orphan, unlabeled) = (
            orphan.metadata.name.unwrap(),
            unlabeled.metadata.name.unwrap(),
        );
        ns.delete_csr_on_cleanup(&orphan);
        ns.delete_csr_on_cleanup(&unlabeled);

        let started = Instant::now();
        let _ra = KubernetesRa::with_orphan_grace(
            identity.client().await.unwrap(),
            config,
            meshca_kube::ApiLimit::new(8),
            GRACE,
        )
        .unwrap();
        while admin.get_opt(&orphan).await.unwrap().is_some() {
            assert!(
                started.elapsed() < GRACE * 3,
                "the orphan CSR {orphan} is still there after {:?}",
                started.elapsed()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let gone_after = started.elapsed();
        assert!(
            gone_after >= GRACE,
            "deleted before the grace: {gone_after:?}"
        );
        assert!(
            admin.get_opt(&unlabeled).await.unwrap().is_some(),
            "a CSR without meshca's label was deleted"
        );
        admin
            .delete(&unlabeled, &DeleteParams::default())
            .await
            .unwrap();
        ns.cleanup().await.unwrap();
    })
    .await
    .expect("test timed out");
}
