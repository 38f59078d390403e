//! The Kubernetes API's ceiling for meshca's paths, measured by a minimal
//! client that is not meshca: kube-rs calls and nothing else (no gRPC, no
//! TLS from workloads, no signing, no watch), each workload's calls one
//! after the other, `concurrency` workloads at a time.
//!
//! - [`Calls::TokenReview`]: one TokenReview per workload (the server's
//!   mass-restart path without the CA);
//! - [`Calls::Ra`]: the RA path's calls per certificate: TokenReview, CSR
//!   create, approval through `/approval`, the signer's status write (a
//!   fixed, already signed chain: the apiserver only checks it parses) and
//!   the delete. The CSRs name a signer of their own, so no real signer
//!   sees them.
//!
//! The report has `meshca loadgen --json`'s shape (`ok`, `errors`,
//! `seconds`, `certs_per_second`, `p50_ms`, `p99_ms`, `p999_ms`), so the
//! examples' tables take it as they take loadgen's.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use futures::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::certificates::v1::{
    CertificateSigningRequest, CertificateSigningRequestCondition, CertificateSigningRequestSpec,
    CertificateSigningRequestStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, PostParams, Preconditions};
use meshca_pki::profile::{CaCertRequest, self_signed_root};
use meshca_pki::{KeyType, SanEntry, SigningKey, cert, pem};

/// What the minimal client does per workload.
pub enum Calls {
    TokenReview,
    /// The RA path, with CSRs of this signer name.
    Ra {
        signer: String,
    },
}

/// The objects the RA calls carry, made once (not timed): an RSA-2048 CSR
/// with a SPIFFE URI SAN, as `meshca loadgen` sends, and a two-certificate
/// chain for the status write.
pub struct Fixtures {
    csr_pem: String,
    chain_pem: String,
}

impl Fixtures {
    pub fn new() -> Result<Self> {
        let key = SigningKey::generate(KeyType::Rsa2048).map_err(|e| anyhow::anyhow!("{e}"))?;
        let csr_pem = meshca_pki::csr::build_csr(
            &key,
            cert::EMPTY_NAME,
            &[SanEntry::Uri(
                "spiffe://cluster.local/ns/bench/sa/ceiling".into(),
            )],
        )
        .map_err(anyhow::Error::msg)?;
        let ca = SigningKey::generate(KeyType::EcdsaP256).map_err(|e| anyhow::anyhow!("{e}"))?;
        let der = self_signed_root(
            &CaCertRequest {
                subject_der: &cert::organization_name("ceiling"),
                key: &ca,
                ttl: Duration::from_secs(3600),
            },
            time::OffsetDateTime::now_utc(),
        )?;
        let one = pem::encode("CERTIFICATE", &der);
        Ok(Fixtures {
            csr_pem,
            chain_pem: format!("{one}{one}"),
        })
    }
}

/// Runs `calls` for every token, `concurrency` workloads at a time, as the
/// identity behind `client`; returns a loadgen-shaped report.
pub async fn run(
    client: &kube::Client,
    tokens: &[String],
    calls: &Calls,
    concurrency: usize,
    fixtures: &Fixtures,
) -> serde_json::Value {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let workers = futures::stream::iter(0..concurrency.max(1))
        .map(|_| {
            let next = next.clone();
            async move {
                let mut latencies = Vec::new();
                let mut errors: HashMap<String, usize> = HashMap::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(token) = tokens.get(i) else { break };
                    let sent = Instant::now();
                    match one(client, token, calls, fixtures).await {
                        Ok(()) => latencies.push(sent.elapsed()),
                        Err(e) => *errors.entry(format!("{e:#}")).or_default() += 1,
                    }
                }
                (latencies, errors)
            }
        })
        .buffer_unordered(concurrency.max(1))
        .collect::<Vec<_>>()
        .await;
    let seconds = started.elapsed().as_secs_f64();
    let mut latencies = Vec::new();
    let mut errors: HashMap<String, usize> = HashMap::new();
    for (l, e) in workers {
        latencies.extend(l);
        for (k, v) in e {
            *errors.entry(k).or_default() += v;
        }
    }
    latencies.sort();
    let pct = |p: f64| -> f64 {
        if latencies.is_empty() {
            return 0.0;
        }
        let i = ((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1;
        latencies[i].as_secs_f64() * 1000.0
    };
    serde_json::json!({
        "concurrency": concurrency,
        "ok": latencies.len(),
        "errors": errors,
        "seconds": seconds,
        "certs_per_second": latencies.len() as f64 / seconds,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "p999_ms": pct(0.999),
    })
}

/// One workload's calls.
async fn one(client: &kube::Client, token: &str, calls: &Calls, f: &Fixtures) -> Result<()> {
    let pp = PostParams::default();
    let review = TokenReview {
        spec: TokenReviewSpec {
            token: Some(token.to_owned()),
            audiences: Some(vec!["istio-ca".into()]),
        },
        ..Default::default()
    };
    let answer = Api::<TokenReview>::all(client.clone())
        .create(&pp, &review)
        .await?;
    if answer.status.and_then(|s| s.authenticated) != Some(true) {
        bail!("token not authenticated");
    }
    let Calls::Ra { signer } = calls else {
        return Ok(());
    };
    let csrs = Api::<CertificateSigningRequest>::all(client.clone());
    let object = CertificateSigningRequest {
        metadata: ObjectMeta {
            generate_name: Some("csr-ceiling-".into()),
            ..Default::default()
        },
        spec: CertificateSigningRequestSpec {
            request: ByteString(f.csr_pem.clone().into_bytes()),
            signer_name: signer.clone(),
            usages: Some(
                meshca_pki::profile::ISTIOD_USAGES
                    .iter()
                    .map(|u| u.to_string())
                    .collect(),
            ),
            expiration_seconds: Some(3600),
            ..Default::default()
        },
        status: None,
    };
    let mut csr = csrs.create(&pp, &object).await?;
    let name = csr.metadata.name.clone().unwrap_or_default();
    let uid = csr.metadata.uid.clone();
    csr.status = Some(CertificateSigningRequestStatus {
        conditions: Some(vec![CertificateSigningRequestCondition {
            type_: "Approved".into(),
            status: "True".into(),
            reason: Some("Ceiling".into()),
            message: Some("approved by the ceiling client".into()),
            ..Default::default()
        }]),
        certificate: None,
    });
    let mut csr = csrs
        .replace_subresource("approval", &name, &pp, &csr)
        .await?;
    if let Some(status) = csr.status.as_mut() {
        status.certificate = Some(ByteString(f.chain_pem.clone().into_bytes()));
    }
    csrs.replace_status(&name, &pp, &csr).await?;
    let dp = DeleteParams {
        preconditions: Some(Preconditions {
            uid,
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    csrs.delete(&name, &dp).await?;
    Ok(())
}

/// Reads token files.
pub fn read_tokens(paths: &[std::path::PathBuf]) -> Result<Vec<String>> {
    paths
        .iter()
        .map(|p| Ok(std::fs::read_to_string(p)?.trim().to_owned()))
        .collect()
}
