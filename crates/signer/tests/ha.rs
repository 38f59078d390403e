//! High availability: leader election with two replicas, a crash in the
//! middle of a 500-CSR backlog, and the cleaner. Real kube-apiserver
//! (testenv); the controller runs with exactly deploy/signer/rbac.yaml's RBAC.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::*;
use futures::StreamExt;
use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Event;
use kube::api::{Api, ListParams};
use meshca_pki::{KeyType, SanEntry, SigningKey, cert};
use meshca_signer::{CaSource, CleanerConfig, Config, LeaderElection, SignerConfig, SignerPolicy};
use meshca_testsupport::{Identity, TestEnv};
use x509_parser::prelude::*;

async fn start_with(
    identity: &Identity,
    signer: &str,
    ca_dir: &std::path::Path,
    tweak: impl FnOnce(&mut Config),
) -> meshca_signer::Running {
    let client = identity.client().await.unwrap();
    let mut config = Config::new(vec![SignerConfig {
        policy: SignerPolicy::istiod(signer),
        ca: CaSource::Dir(ca_dir.to_path_buf()),
    }]);
    tweak(&mut config);
    meshca_signer::start(client, config).await.unwrap()
}

fn election(ns: &str, identity: &str) -> LeaderElection {
    let mut le = LeaderElection::new(ns, "signer-ca-leader", identity);
    le.lease_duration = Duration::from_secs(3);
    le.renew_deadline = Duration::from_secs(2);
    le.retry_period = Duration::from_millis(300);
    le
}

async fn lease_holder(client: &kube::Client, ns: &str) -> Option<String> {
    Api::<Lease>::namespaced(client.clone(), ns)
        .get_opt("signer-ca-leader")
        .await
        .unwrap()
        .and_then(|l| l.spec?.holder_identity)
}

async fn reporting_instance(client: &kube::Client, csr: &str) -> String {
    for _ in 0..100 {
        // The same Events through core/v1, which can select on the object.
        let events = Api::<Event>::namespaced(client.clone(), "default")
            .list(&ListParams::default().fields(&format!("involvedObject.name={csr}")))
            .await
            .unwrap();
        if let Some(e) = events
            .items
            .into_iter()
            .find(|e| e.reason.as_deref() == Some("CertificateIssued"))
        {
            return e.reporting_instance.unwrap_or_default();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no CertificateIssued Event for {csr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_only_the_leader_signs_and_a_standby_takes_over() {
    tokio::time::timeout(Duration::from_secs(90), async {
        let env = TestEnv::get().await;
        let admin = env.client();
        let Setup {
            ns,
            dir,
            signer,
            controller_id,
            istiod,
        } = setup(&env, "signer-ha").await;
        let ca = make_ca(&dir.join("ca"), "ha", Duration::from_secs(86400));
        let n = ns.name().to_string();

        let a = start_with(&controller_id, &signer, &ca.dir, |c| {
            c.leader_election = Some(election(&n, "replica-a"));
            c.instance = Some("replica-a".into());
        })
        .await;
        for _ in 0..50 {
            if lease_holder(&admin, &n).await.as_deref() == Some("replica-a") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(lease_holder(&admin, &n).await.as_deref(), Some("replica-a"));
        let b = start_with(&controller_id, &signer, &ca.dir, |c| {
            c.leader_election = Some(election(&n, "replica-b"));
            c.instance = Some("replica-b".into());
        })
        .await;

        let uri = format!("spiffe://cluster.local/ns/{n}/sa/x");
        let mut first = Vec::new();
        for _ in 0..4 {
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
            first.push(name);
        }
        for name in &first {
            wait_issued(&istiod, name).await.unwrap();
            assert_eq!(reporting_instance(&admin, name).await, "replica-a");
        }
        let signed = |r: &meshca_signer::Running| {
            metric(
                &r.metrics_text(),
                &format!("meshca_signer_signed_total{{signer=\"{signer}\"}}"),
            )
        };
        assert_eq!(signed(&a), Some(4.0));
        assert_eq!(signed(&b), None, "the standby signs nothing");
        assert_eq!(metric(&b.metrics_text(), "meshca_signer_leader"), Some(0.0));

        // The leader crashes (no release): the standby takes over within the
        // lease duration (3 s here) and signs what comes next.
        a.abort();
        let crashed = Instant::now();
        let mut second = Vec::new();
        for _ in 0..4 {
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
            second.push(name);
        }
        for name in &second {
            wait_issued(&istiod, name).await.unwrap();
        }
        let took = crashed.elapsed();
        // Lease duration 3 s, plus the new leader's start and the CSRs' creation.
        assert!(took < Duration::from_secs(10), "failover took {took:?}");
        for name in &second {
            assert_eq!(reporting_instance(&admin, name).await, "replica-b");
        }
        assert_eq!(lease_holder(&admin, &n).await.as_deref(), Some("replica-b"));
        assert_eq!(signed(&b), Some(4.0));

        // A graceful stop releases the lease.
        b.shutdown().await.unwrap();
        assert_eq!(lease_holder(&admin, &n).await, None);
        ns.cleanup().await.unwrap();
    })
    .await
    .expect("test timed out");
}

fn csr_pem(uri: &str) -> String {
    let key = SigningKey::generate(KeyType::EcdsaP256).unwrap();
    meshca_pki::csr::build_csr(&key, cert::EMPTY_NAME, &[SanEntry::Uri(uri.into())]).unwrap()
}

async fn certificates(client: &kube::Client, signer: &str) -> BTreeMap<String, Option<String>> {
    Api::<CertificateSigningRequest>::all(client.clone())
        .list(&ListParams::default().fields(&format!("spec.signerName={signer}")))
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|c| {
            assert_eq!(failed(&c), None, "no CSR may fail");
            (c.metadata.name.clone().unwrap(), certificate(&c))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_in_the_middle_of_a_500_csr_backlog_signs_each_exactly_once() {
    const N: usize = 500;
    tokio::time::timeout(Duration::from_secs(120), async {
        let env = TestEnv::get().await;
        let admin = env.client();
        let ns = env.namespace("signer-backlog").await.unwrap();
        let dir = ns.temp_dir().to_path_buf();
        let signer = unique_signer(&ns);
        let o = manifest_options(&ns, &[&signer]);
        let controller_id = controller_identity(&ns, &o).await.unwrap();
        let ca = make_ca(&dir.join("ca"), "backlog", Duration::from_secs(86400));

        // The backlog: 500 approved CSRs before any controller runs.
        let uri = format!("spiffe://cluster.local/ns/{}/sa/x", ns.name());
        let pems: Vec<String> = (0..N).map(|_| csr_pem(&uri)).collect();
        let started = Instant::now();
        futures::stream::iter(pems)
            .map(|pem| {
                let (ns, admin, signer) = (&ns, admin.clone(), signer.clone());
                async move {
                    let name = create_csr(ns, &admin, &signer, &pem, &ISTIOD_USAGES, Some(3600))
                        .await
                        .unwrap();
                    set_approval(&admin, &name, "Approved").await.unwrap();
                }
            })
            .buffer_unordered(32)
            .collect::<Vec<()>>()
            .await;
        eprintln!(
            "backlog of {N} created and approved in {:?}",
            started.elapsed()
        );

        let no_events = |c: &mut Config| c.events = false;
        // The first run signs slowly (2 at a time) so the crash lands mid-backlog.
        let first = start_with(&controller_id, &signer, &ca.dir, |c| {
            c.events = false;
            c.concurrency = 2;
        })
        .await;
        let t0 = Instant::now();
        loop {
            let done = certificates(&admin, &signer)
                .await
                .values()
                .filter(|c| c.is_some())
                .count();
            if done >= N / 5 {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "first run too slow: {done}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Crash, mid-flight.
        first.abort();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let before = certificates(&admin, &signer).await;
        let signed_before = before.values().filter(|c| c.is_some()).count();
        eprintln!("crashed with {signed_before}/{N} signed");
        assert!(signed_before < N, "the crash must come mid-backlog");

        let second = start_with(&controller_id, &signer, &ca.dir, no_events).await;
        let t1 = Instant::now();
        let after = loop {
            let now = certificates(&admin, &signer).await;
            if now.values().all(Option::is_some) {
                break now;
            }
            assert!(
                t1.elapsed() < Duration::from_secs(50),
                "second run too slow"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        eprintln!("rest signed in {:?}", t1.elapsed());
        assert_eq!(after.len(), N);
        // Nothing signed before the crash was signed again...
        for (name, cert) in &before {
            if cert.is_some() {
                assert_eq!(&after[name], cert, "{name} changed");
            }
        }
        // ...the second run wrote exactly the missing ones...
        let text = second.metrics_text();
        let series = format!("meshca_signer_signed_total{{signer=\"{signer}\"}}");
        assert_eq!(
            metric(&text, &series),
            Some((N - signed_before) as f64),
            "{text}"
        );
        // ...and every certificate is distinct (one serial each).
        let serials: BTreeSet<Vec<u8>> = after
            .values()
            .map(|c| {
                let chain = c.as_ref().unwrap();
                let der = &meshca_pki::pem::parse_all(chain.as_bytes()).unwrap()[0].der;
                X509Certificate::from_der(der)
                    .unwrap()
                    .1
                    .raw_serial()
                    .to_vec()
            })
            .collect();
        assert_eq!(serials.len(), N);
        second.shutdown().await.unwrap();
        ns.cleanup().await.unwrap();
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleaner_deletes_only_its_own_signers_csrs_when_due() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let env = TestEnv::get().await;
        let admin = env.client();
        let Setup {
            ns,
            dir,
            signer,
            controller_id,
            istiod,
        } = setup(&env, "signer-cleaner").await;
        let ca = make_ca(&dir.join("ca"), "cleaner", Duration::from_secs(86400));
        let running = start_with(&controller_id, &signer, &ca.dir, |c| {
            c.cleaner = Some(CleanerConfig {
                interval: Duration::from_millis(200),
                issued: Duration::ZERO,
                denied: Duration::ZERO,
                failed: Duration::ZERO,
                pending: Duration::from_secs(3600),
            })
        })
        .await;
        let uri = format!("spiffe://cluster.local/ns/{}/sa/x", ns.name());
        let csr = |s: &str| {
            let (ns, istiod, s, pem) = (&ns, istiod.clone(), s.to_string(), spiffe_csr(&dir, &uri));
            async move {
                create_csr(ns, &istiod, &s, &pem, &ISTIOD_USAGES, Some(3600))
                    .await
                    .unwrap()
            }
        };
        let issued = csr(&signer).await;
        set_approval(&istiod, &issued, "Approved").await.unwrap();
        let denied = csr(&signer).await;
        set_approval(&istiod, &denied, "Denied").await.unwrap();
        let pending = csr(&signer).await;
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
        set_approval(&admin, &other, "Denied").await.unwrap();

        let api = Api::<CertificateSigningRequest>::all(admin.clone());
        for name in [&issued, &denied] {
            let mut gone = false;
            for _ in 0..100 {
                if api.get_opt(name).await.unwrap().is_none() {
                    gone = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            assert!(gone, "{name} was not cleaned");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(
            api.get_opt(&pending).await.unwrap().is_some(),
            "pending < 1h stays"
        );
        assert!(
            api.get_opt(&other).await.unwrap().is_some(),
            "another signer's CSR stays"
        );
        running.shutdown().await.unwrap();
        ns.cleanup().await.unwrap();
    })
    .await
    .expect("test timed out");
}
