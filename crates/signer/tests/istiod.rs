//! The seed's setup end to end: Istio's own CA client asks istiod (real
//! pilot-discovery, RA mode: `EXTERNAL_CA=ISTIOD_RA_KUBERNETES_API`,
//! `K8S_SIGNER=<signer>`) for a workload certificate; istiod creates and
//! approves a Kubernetes CSR; meshca's signer (with exactly its manifest's
//! RBAC) signs it; istiod checks the chain against the root the signer
//! published (Secret external-ca-cert, copied where the seed mounts it) and
//! answers. Needs `testenv/build istiod` (pilot-discovery).

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ListParams};
use meshca_signer::{CaSource, Config, SignerConfig, SignerPolicy, TrustBundleTarget};
use meshca_testsupport::{Proc, TestEnv, free_port};
use x509_parser::prelude::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istiod_in_ra_mode_gets_workload_certificates_from_the_signer() {
    tokio::time::timeout(Duration::from_secs(180), async {
        let env = TestEnv::get().await;
        let admin = env.client();
        let ns = env.namespace("signer-istiod-e2e").await.unwrap();
        let dir = ns.temp_dir().to_path_buf();
        let signer = unique_signer(&ns);
        let o = manifest_options(&ns, &[&signer]);
        let controller_id = controller_identity(&ns, &o).await.unwrap();
        let ca = make_ca(&dir.join("ca"), "e2e", Duration::from_secs(86400));

        let mut config = Config::new(vec![SignerConfig {
            policy: SignerPolicy::istiod(signer.clone()),
            ca: CaSource::Dir(ca.dir.clone()),
        }]);
        config.trust_bundle = Some(TrustBundleTarget {
            namespace: ns.name().into(),
            ..Default::default()
        });
        let running = meshca_signer::start(controller_id.client().await.unwrap(), config)
            .await
            .unwrap();

        // The published root, where the seed mounts Secret external-ca-cert.
        let secrets = Api::<Secret>::namespaced(admin.clone(), ns.name());
        let mut root = None;
        for _ in 0..100 {
            if let Some(s) = secrets.get_opt("external-ca-cert").await.unwrap() {
                root = s.data.and_then(|d| d.get("root-cert.pem").cloned());
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let root = root.expect("external-ca-cert published");
        assert_eq!(root.0, ca.root_pem.as_bytes());
        let istiod_dir = dir.join("istiod");
        std::fs::create_dir_all(istiod_dir.join("etc/external-ca-cert")).unwrap();
        std::fs::write(
            istiod_dir.join("etc/external-ca-cert/root-cert.pem"),
            &root.0,
        )
        .unwrap();

        // istiod (admin kubeconfig), its namespace = the test namespace.
        let ports: Vec<u16> = (0..5).map(|_| free_port()).collect();
        let grpc = format!("127.0.0.1:{}", ports[2]);
        let kubeconfig = std::env::var("KUBECONFIG").unwrap();
        let log = std::fs::File::create(dir.join("istiod.log")).unwrap();
        let _istiod = Proc(
            Command::new(meshca_testsupport::bin("pilot-discovery"))
                .current_dir(&istiod_dir)
                .args([
                    "discovery",
                    "--kubeconfig",
                    &kubeconfig,
                    "--clusterID",
                    "Kubernetes",
                ])
                .args(["--httpAddr", &format!("127.0.0.1:{}", ports[0])])
                .args(["--grpcAddr", &format!("127.0.0.1:{}", ports[1])])
                .args(["--secureGRPCAddr", &grpc])
                .args(["--httpsAddr", &format!("127.0.0.1:{}", ports[3])])
                .args(["--monitoringAddr", &format!("127.0.0.1:{}", ports[4])])
                .env("POD_NAMESPACE", ns.name())
                .env("POD_NAME", "istiod-e2e")
                .env("CLOUD_PLATFORM", "none")
                .env("PILOT_ENABLE_ANALYSIS", "false")
                .env("EXTERNAL_CA", "ISTIOD_RA_KUBERNETES_API")
                .env("K8S_SIGNER", &signer)
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap(),
        );
        let ready: std::net::SocketAddr = format!("127.0.0.1:{}", ports[0]).parse().unwrap();
        let mut up = false;
        for _ in 0..1200 {
            if let Ok((200, _)) = http_get(ready, "/ready").await {
                up = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            up,
            "istiod not ready; see {}",
            dir.join("istiod.log").display()
        );
        // istiod's own serving certificate comes from its self-signed CA.
        let istiod_ca = secrets.get("istio-ca-secret").await.unwrap();
        let istiod_root = dir.join("istiod-root.pem");
        std::fs::write(&istiod_root, &istiod_ca.data.unwrap()["ca-cert.pem"].0).unwrap();

        ns.create_service_account("workload").await.unwrap();
        let token = ns.token("workload").await.unwrap();
        let token_file = dir.join("workload.token");
        std::fs::write(&token_file, token).unwrap();
        let spiffe = format!("spiffe://cluster.local/ns/{}/sa/workload", ns.name());
        let out = Command::new(meshca_testsupport::bin("istio-client"))
            .args(["-addr", &grpc, "-json", "-timeout", "60s", "-ttl", "1h"])
            .arg("-root-cert")
            .arg(&istiod_root)
            .arg("-token")
            .arg(&token_file)
            .args(["-host", &spiffe])
            .args(["-server-name", &format!("istiod.{}.svc", ns.name())])
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "istio-client: {}\nistiod log: {}",
            String::from_utf8_lossy(&out.stderr),
            dir.join("istiod.log").display()
        );
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let chain: Vec<String> = json["chain"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap().to_string())
            .collect();
        let all = chain.concat();
        openssl_verify(&dir, &all, &ca.root_pem).unwrap();
        let blocks = split_pem(&all);
        assert_eq!(
            blocks[1], ca.intermediate_pem,
            "our intermediate in the chain"
        );
        let der = meshca_pki::pem::parse_all(blocks[0].as_bytes()).unwrap();
        let (_, leaf) = X509Certificate::from_der(&der[0].der).unwrap();
        let sans = leaf.subject_alternative_name().unwrap().unwrap();
        assert_eq!(
            sans.value.general_names,
            vec![GeneralName::URI(spiffe.as_str())]
        );
        let metrics = running.metrics_text();
        assert!(
            metric(
                &metrics,
                &format!("meshca_signer_signed_total{{signer=\"{signer}\"}}")
            )
            .unwrap_or(0.0)
                >= 1.0,
            "{metrics}"
        );
        // istiod deletes its CSRs once it has the certificate.
        let csrs = Api::<CertificateSigningRequest>::all(admin.clone());
        let lp = ListParams::default().fields(&format!("spec.signerName={signer}"));
        let mut left = usize::MAX;
        for _ in 0..50 {
            left = csrs.list(&lp).await.unwrap().items.len();
            if left == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(left, 0, "istiod deletes its CSRs");
        running.shutdown().await.unwrap();
        ns.cleanup().await.unwrap();
    })
    .await
    .expect("test timed out");
}
