//! Pod certificates at scale on the real node (issue 11): `--pods` pods with
//! a `podCertificate` volume for `meshca signer`, created together.
//!
//!     eval "$(testenv/up node)"
//!     cargo build --release -p meshca --examples
//!     target/release/examples/pod_certificates_scale --pods 500
//!
//! Prints:
//! - each pod's time from its create call to Running (the kubelet starts the
//!   container only once the credential is in the volume), p50/p99;
//! - the signer's PodCertificateRequest throughput (issued per second, from
//!   the first request seen to the last issued) and each request's time from
//!   first seen to issued;
//! - the apiserver's ceiling for the same writes, in the same run: as the
//!   kubelet (the node's credentials) create a request for each pod, then as
//!   a signer write its status with a ready-made certificate (no signing, no
//!   reads), at several concurrencies; the best is the ceiling.
//!
//! There is no peer: no other signer issues PodCertificateRequests.

#[path = "bench_common/mod.rs"]
mod bench_common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::ByteString;
use k8s_openapi::api::certificates::v1beta1::{
    PodCertificateRequest, PodCertificateRequestSpec, PodCertificateRequestStatus,
};
use k8s_openapi::api::core::v1::{Node, Pod, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta, Time};
use kube::api::{Api, ListParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use meshca_pki::{KeyType, SigningKey};
use meshca_testsupport::pod_certificates::{self, PodSigner, percentile};
use meshca_testsupport::{TestEnv, client_from_kubeconfig, openssl};
use x509_parser::prelude::*;

#[derive(Parser)]
struct Args {
    /// Pods to start (the node takes up to testenv's maxPods, 600).
    #[arg(long, default_value_t = 500)]
    pods: usize,
    /// Pod create calls in flight.
    #[arg(long, default_value_t = 32)]
    create_concurrency: usize,
    /// Concurrencies tried for the apiserver's ceiling.
    #[arg(long, value_delimiter = ',', default_value = "8,32,128")]
    ceiling_concurrency: Vec<usize>,
}

/// When each request was first seen and when it was seen issued.
#[derive(Default)]
struct Seen {
    created: HashMap<String, Instant>,
    issued: HashMap<String, Instant>,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let env = TestEnv::try_get().await?;
    let client = env.client();
    let ns = env.namespace("pcr-scale").await?;
    let signer = PodSigner::start(&bench_common::meshca_bin()?, &ns, &[]).await?;
    let image = std::env::var("MESHCA_TESTENV_PAUSE_IMAGE")
        .context("MESHCA_TESTENV_PAUSE_IMAGE: start testenv with `testenv/up node`")?;
    let accounts = 10;
    for i in 0..accounts {
        ns.create_service_account(&format!("sa-{i}")).await?;
    }
    let specs = (0..args.pods)
        .map(|i| {
            let sa = format!("sa-{}", i % accounts);
            pod_certificates::pod(&format!("p-{i}"), &sa, &signer.name, &image, 3600)
        })
        .collect::<Result<Vec<_>>>()?;

    let seen = Arc::new(Mutex::new(Seen::default()));
    let watching = tokio::spawn(watch_requests(
        Api::<PodCertificateRequest>::namespaced(client.clone(), ns.name()),
        seen.clone(),
    ));
    let pods = Api::<Pod>::namespaced(client.clone(), ns.name());
    let t = Instant::now();
    let started = pod_certificates::start_all(
        &pods,
        specs,
        args.create_concurrency,
        Duration::from_secs(900),
    )
    .await?;
    let all_running = t.elapsed();
    watching.abort();
    let running: Vec<Duration> = started.iter().map(|s| s.running_after).collect();
    let (throughput, signer_latency) = {
        let seen = seen.lock().unwrap();
        let first = seen
            .created
            .values()
            .min()
            .copied()
            .context("no requests")?;
        let last = seen.issued.values().max().copied().context("none issued")?;
        let latency: Vec<Duration> = seen
            .issued
            .iter()
            .filter_map(|(name, at)| Some(*at - *seen.created.get(name)?))
            .collect();
        (
            seen.issued.len() as f64 / (last - first).as_secs_f64(),
            latency,
        )
    };
    println!("pods: {} Running in {all_running:.1?}", started.len());
    println!(
        "pod created -> Running (credential in place): p50 {:.2?}, p99 {:.2?}, max {:.2?}",
        percentile(&running, 50),
        percentile(&running, 99),
        percentile(&running, 100)
    );
    println!(
        "signer: {} requests issued, {throughput:.0}/s; request seen -> issued p50 {:.2?}, p99 {:.2?}",
        signer_latency.len(),
        percentile(&signer_latency, 50),
        percentile(&signer_latency, 99)
    );

    let ceiling = apiserver_ceiling(&env, ns.name(), ns.temp_dir(), &args)
        .await
        .context("measuring the apiserver's ceiling")?;
    println!(
        "apiserver ceiling (create as the node + status as the signer, best of {:?}): {ceiling:.0}/s; signer at {:.0}% of it",
        args.ceiling_concurrency,
        100.0 * throughput / ceiling
    );
    signer.cleanup(&client).await;
    ns.cleanup().await
}

async fn watch_requests(api: Api<PodCertificateRequest>, seen: Arc<Mutex<Seen>>) {
    let mut events = watcher(api, watcher::Config::default())
        .applied_objects()
        .boxed();
    while let Ok(Some(pcr)) = events.try_next().await {
        let name = pcr.name_any();
        let mut seen = seen.lock().unwrap();
        let now = Instant::now();
        seen.created.entry(name.clone()).or_insert(now);
        let issued = pcr
            .status
            .as_ref()
            .is_some_and(|s| s.certificate_chain.is_some());
        if issued {
            seen.issued.entry(name).or_insert(now);
        }
    }
}

/// The best rate of (create a request as the node, write its status as a
/// signer) over the concurrencies in `args`, for the pods in `ns`.
async fn apiserver_ceiling(
    env: &TestEnv,
    ns: &str,
    dir: &std::path::Path,
    args: &Args,
) -> Result<f64> {
    let admin = env.client();
    let testenv_dir = std::env::var("MESHCA_TESTENV_DIR").context("MESHCA_TESTENV_DIR")?;
    let kubelet =
        client_from_kubeconfig(&std::path::Path::new(&testenv_dir).join("node/kubelet.kubeconfig"))
            .await
            .context("the node's kubeconfig")?;
    let node_name = std::env::var("MESHCA_TESTENV_NODE").context("MESHCA_TESTENV_NODE")?;
    let node_uid = Api::<Node>::all(admin.clone())
        .get(&node_name)
        .await?
        .uid()
        .context("node uid")?;
    let sa_uids: HashMap<String, String> = Api::<ServiceAccount>::namespaced(admin.clone(), ns)
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .map(|sa| (sa.name_any(), sa.uid().unwrap_or_default()))
        .collect();
    let pods = Api::<Pod>::namespaced(admin.clone(), ns)
        .list(&ListParams::default())
        .await?
        .items;

    // One key for every request, so one certificate serves every status:
    // the measured work is the API's, not ours.
    let key = SigningKey::generate(KeyType::EcdsaP256)?;
    std::fs::write(dir.join("ceiling-key.pem"), key.to_pkcs8_pem()?.as_bytes())?;
    let cert_pem = String::from_utf8(openssl::run(
        dir,
        &[
            "req",
            "-x509",
            "-new",
            "-key",
            "ceiling-key.pem",
            "-subj",
            "/CN=ceiling",
            "-days",
            "1",
        ],
    )?)?;
    let der = meshca_pki::pem::parse_all(cert_pem.as_bytes())?[0]
        .der
        .to_vec();
    let (_, cert) = X509Certificate::from_der(&der)?;
    let not_before = cert.validity().not_before.timestamp();
    let not_after = cert.validity().not_after.timestamp();
    let at = |s: i64| -> Result<Time> { Ok(Time(k8s_openapi::jiff::Timestamp::from_second(s)?)) };
    let status = PodCertificateRequestStatus {
        conditions: Some(vec![Condition {
            type_: "Issued".into(),
            status: "True".into(),
            reason: "Issued".into(),
            message: "ceiling".into(),
            last_transition_time: Time(k8s_openapi::jiff::Timestamp::now()),
            observed_generation: None,
        }]),
        certificate_chain: Some(cert_pem),
        not_before: Some(at(not_before)?),
        not_after: Some(at(not_after)?),
        begin_refresh_at: Some(at(not_before + 3600)?),
    };
    let requests: Vec<PodCertificateRequest> = pods
        .iter()
        .map(|pod| {
            let uid = pod.uid().unwrap_or_default();
            let sa = pod
                .spec
                .as_ref()
                .and_then(|s| s.service_account_name.clone())
                .unwrap_or_default();
            Ok(PodCertificateRequest {
                metadata: ObjectMeta {
                    generate_name: Some("ceiling-".into()),
                    namespace: Some(ns.into()),
                    ..Default::default()
                },
                spec: PodCertificateRequestSpec {
                    // Another signer name: meshca leaves these alone.
                    signer_name: "meshca.test/ceiling".into(),
                    pod_name: pod.name_any(),
                    pod_uid: uid.clone(),
                    service_account_uid: sa_uids.get(&sa).cloned().unwrap_or_default(),
                    service_account_name: sa,
                    node_name: node_name.clone(),
                    node_uid: node_uid.clone(),
                    max_expiration_seconds: Some(86400),
                    pkix_public_key: ByteString(key.spki_der()),
                    proof_of_possession: ByteString(key.sign(uid.as_bytes())?),
                    unverified_user_annotations: None,
                },
                status: None,
            })
        })
        .collect::<Result<_>>()?;

    let mut best: f64 = 0.0;
    for &concurrency in &args.ceiling_concurrency {
        let t = Instant::now();
        let done = futures::stream::iter(requests.clone())
            .map(|pcr| {
                let (kubelet, admin, status) = (kubelet.clone(), admin.clone(), status.clone());
                async move { create_and_issue(kubelet, admin, ns, pcr, status).await }
            })
            .buffer_unordered(concurrency)
            .try_fold(0usize, |n, ()| async move { Ok(n + 1) })
            .await?;
        let rate = done as f64 / t.elapsed().as_secs_f64();
        println!(
            "  ceiling at concurrency {concurrency}: {done} in {:.2?}, {rate:.0}/s",
            t.elapsed()
        );
        best = best.max(rate);
    }
    Ok(best)
}

async fn create_and_issue(
    kubelet: Client,
    admin: Client,
    ns: &str,
    pcr: PodCertificateRequest,
    status: PodCertificateRequestStatus,
) -> Result<()> {
    let mut created = Api::<PodCertificateRequest>::namespaced(kubelet, ns)
        .create(&PostParams::default(), &pcr)
        .await?;
    created.status = Some(status);
    created.metadata.managed_fields = None;
    Api::<PodCertificateRequest>::namespaced(admin, ns)
        .replace_status(&created.name_any(), &PostParams::default(), &created)
        .await?;
    Ok(())
}
