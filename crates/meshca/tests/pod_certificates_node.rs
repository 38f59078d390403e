//! Pod certificates on the real node (`testenv/up node`, as `./test` starts
//! it): the kubelet makes the key, asks `meshca signer` through a
//! PodCertificateRequest and writes the credential into the pod.
//!
//! - **Refresh:** with `--pod-certificate-refresh-window 0` meshca sets
//!   `beginRefreshAt` as early as the apiserver allows (notBefore + 10 min).
//!   The kubelet (which adds up to 5 min of its own jitter and looks every
//!   1-2 min) asks again after that time, with a new key, and the pod's file
//!   holds the new certificate before the old one expires. This test takes
//!   8-16 minutes of wall time, the kubelet's timers.
//! - **Many pods at once:** pods started together each get their own
//!   identity; the figures for 500 pods are a benchmark
//!   (`examples/pod_certificates_scale.rs`, BENCHMARKS.md).
//!
//! The signer is the `meshca signer` binary with exactly the Helm chart's
//! RBAC (podCertificates on).

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use ::time::OffsetDateTime;
use anyhow::{Context, Result, ensure};
use k8s_openapi::api::certificates::v1beta1::PodCertificateRequest;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, PostParams};
use meshca_testsupport::pod_certificates::{self, CredentialBundle, PodSigner};
use meshca_testsupport::{TestEnv, TestNode};
use x509_parser::prelude::*;

/// The leaf of a credential: its SPIFFE ID and validity, checked to be
/// issued by the signer's root.
struct Leaf {
    spiffe: String,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
}

fn leaf(bundle: &CredentialBundle, root_der: &[u8]) -> Result<Leaf> {
    let (_, cert) = X509Certificate::from_der(&bundle.chain[0])?;
    let (_, root) = X509Certificate::from_der(root_der)?;
    cert.verify_signature(Some(root.public_key()))
        .context("the pod's certificate is not signed by the signer's root")?;
    let spiffe = cert
        .subject_alternative_name()?
        .context("no SAN")?
        .value
        .general_names
        .iter()
        .find_map(|n| match n {
            GeneralName::URI(u) => Some(u.to_string()),
            _ => None,
        })
        .context("no URI SAN")?;
    Ok(Leaf {
        spiffe,
        not_before: cert.validity().not_before.to_datetime(),
        not_after: cert.validity().not_after.to_datetime(),
    })
}

/// The requests the kubelet made for pod `uid`, oldest first.
async fn requests_of(
    api: &Api<PodCertificateRequest>,
    uid: &str,
) -> Result<Vec<PodCertificateRequest>> {
    let mut list: Vec<_> = api
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|r| r.spec.pod_uid == uid)
        .collect();
    list.sort_by_key(|r| r.metadata.creation_timestamp.clone());
    Ok(list)
}

fn begin_refresh_at(r: &PodCertificateRequest) -> Result<OffsetDateTime> {
    let t = r
        .status
        .as_ref()
        .and_then(|s| s.begin_refresh_at.as_ref())
        .context("request without beginRefreshAt")?;
    Ok(OffsetDateTime::from_unix_timestamp(t.0.as_second())?)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_kubelet_refreshes_a_pod_certificate_at_begin_refresh_at_before_it_expires()
-> Result<()> {
    let node = TestNode::get();
    let env = TestEnv::get().await;
    let ns = env.namespace("pcr-refresh").await?;
    let signer = PodSigner::start(
        Path::new(env!("CARGO_BIN_EXE_meshca")),
        &ns,
        &["--pod-certificate-refresh-window", "0"],
    )
    .await?;
    ns.create_service_account("job").await?;
    let image =
        std::env::var("MESHCA_TESTENV_PAUSE_IMAGE").context("MESHCA_TESTENV_PAUSE_IMAGE")?;
    let pods = Api::<Pod>::namespaced(env.client(), ns.name());
    let pod = pods
        .create(
            &PostParams::default(),
            &pod_certificates::pod("job", "job", &signer.name, &image, 3600)?,
        )
        .await?;
    let uid = pod.metadata.uid.context("pod without uid")?;
    pod_certificates::wait_running(&pods, "job", Duration::from_secs(90)).await?;
    let dir = node.pod_volume(&uid, "kubernetes.io~projected", pod_certificates::VOLUME);
    let first = CredentialBundle::read(&dir)?;
    let first_leaf = leaf(&first, &signer.root_der)?;
    let identity = format!("spiffe://cluster.local/ns/{}/sa/job", ns.name());
    ensure!(
        first_leaf.spiffe == identity,
        "{} != {identity}",
        first_leaf.spiffe
    );

    let pcrs = Api::<PodCertificateRequest>::namespaced(env.client(), ns.name());
    let asked = requests_of(&pcrs, &uid).await?;
    ensure!(asked.len() == 1, "{} requests for one pod", asked.len());
    let refresh_at = begin_refresh_at(&asked[0])?;
    // Window 0: as early as the apiserver accepts, notBefore + 10 minutes.
    ensure!(
        refresh_at == first_leaf.not_before + Duration::from_secs(600),
        "beginRefreshAt {refresh_at} is not notBefore {} + 10 min",
        first_leaf.not_before
    );
    eprintln!(
        "first certificate: notBefore {}, beginRefreshAt {refresh_at}, notAfter {}",
        first_leaf.not_before, first_leaf.not_after
    );

    // The kubelet adds up to 5 min to beginRefreshAt and looks every 1-2 min;
    // the pod's file follows on its next sync (15 s in testenv).
    let deadline = refresh_at + Duration::from_secs(5 * 60 + 2 * 60 + 90);
    let started = Instant::now();
    let second = loop {
        let now = OffsetDateTime::now_utc();
        ensure!(
            now < deadline,
            "no refreshed certificate in the pod by {deadline} (beginRefreshAt {refresh_at}); requests: {:?}",
            requests_of(&pcrs, &uid)
                .await?
                .iter()
                .map(|r| &r.metadata.name)
                .collect::<Vec<_>>()
        );
        match CredentialBundle::read(&dir) {
            Ok(b) if b != first => break b,
            _ => tokio::time::sleep(Duration::from_secs(5)).await,
        }
    };
    let replaced_at = OffsetDateTime::now_utc();
    eprintln!(
        "refreshed credential in the pod at {replaced_at} ({:?} of waiting)",
        started.elapsed()
    );
    let second_leaf = leaf(&second, &signer.root_der)?;
    ensure!(
        second_leaf.spiffe == identity,
        "the refreshed identity changed"
    );
    ensure!(
        second.key_pkcs8 != first.key_pkcs8,
        "the kubelet refreshed without a new key"
    );
    ensure!(
        replaced_at < first_leaf.not_after,
        "the new credential came after the old one expired"
    );
    ensure!(second_leaf.not_before > first_leaf.not_before);
    let asked = requests_of(&pcrs, &uid).await?;
    ensure!(
        asked.len() >= 2,
        "the kubelet made {} requests",
        asked.len()
    );
    let refresh_created = asked[1]
        .metadata
        .creation_timestamp
        .as_ref()
        .context("no creationTimestamp")?
        .0
        .as_second();
    ensure!(
        refresh_created >= refresh_at.unix_timestamp(),
        "the kubelet asked again before beginRefreshAt"
    );
    let issued = asked[1]
        .status
        .as_ref()
        .and_then(|s| s.certificate_chain.as_deref())
        .context("the refresh request is not issued")?;
    ensure!(
        common::pem_der(issued) == second.chain[0],
        "the pod holds a certificate other than the one its refresh request got"
    );
    signer.cleanup(&env.client()).await;
    ns.cleanup().await
}

#[tokio::test(flavor = "multi_thread")]
async fn pods_started_together_each_get_their_own_identity() -> Result<()> {
    const PODS: usize = 40;
    let node = TestNode::get();
    let env = TestEnv::get().await;
    let ns = env.namespace("pcr-many").await?;
    let signer = PodSigner::start(Path::new(env!("CARGO_BIN_EXE_meshca")), &ns, &[]).await?;
    let image =
        std::env::var("MESHCA_TESTENV_PAUSE_IMAGE").context("MESHCA_TESTENV_PAUSE_IMAGE")?;
    let mut specs = Vec::new();
    for i in 0..PODS {
        // Ten accounts, four pods each: identities come from the pod's
        // account, never from its name.
        let sa = format!("sa-{}", i % 10);
        if i < 10 {
            ns.create_service_account(&sa).await?;
        }
        specs.push(pod_certificates::pod(
            &format!("p-{i}"),
            &sa,
            &signer.name,
            &image,
            3600,
        )?);
    }
    let pods = Api::<Pod>::namespaced(env.client(), ns.name());
    let started = pod_certificates::start_all(&pods, specs, 16, Duration::from_secs(240)).await?;
    let times: Vec<Duration> = started.iter().map(|s| s.running_after).collect();
    eprintln!(
        "{PODS} pods with a podCertificate volume: Running after p50 {:?}, p99 {:?}",
        pod_certificates::percentile(&times, 50),
        pod_certificates::percentile(&times, 99)
    );
    for s in &started {
        let dir = node.pod_volume(&s.uid, "kubernetes.io~projected", pod_certificates::VOLUME);
        let bundle = CredentialBundle::read(&dir)?;
        let i: usize = s.name.trim_start_matches("p-").parse()?;
        let expected = format!("spiffe://cluster.local/ns/{}/sa/sa-{}", ns.name(), i % 10);
        let got = leaf(&bundle, &signer.root_der)?.spiffe;
        ensure!(got == expected, "pod {}: {got} != {expected}", s.name);
    }
    signer.cleanup(&env.client()).await;
    ns.cleanup().await
}
