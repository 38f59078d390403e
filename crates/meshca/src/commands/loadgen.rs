//! `meshca loadgen`: many concurrent istio-agent-like clients on long-lived
//! TLS connections against any Istio CA (meshca or istiod), reporting
//! certificates per second and latency percentiles. Bounded in requests and
//! time; it stops by itself.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use meshca_pki::csr::build_csr;
use meshca_pki::{KeyType, SanEntry, SigningKey, cert};
use meshca_proto::IstioCertificateRequest;
use meshca_proto::istio_certificate_service_client::IstioCertificateServiceClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use crate::duration::parse_duration;
use crate::input::read_input;

#[derive(clap::Args)]
pub struct LoadgenArgs {
    #[arg(long, default_value = "127.0.0.1:15012")]
    pub addr: String,
    /// Root that verifies the CA's serving certificate.
    #[arg(long)]
    pub root: PathBuf,
    #[arg(long, default_value = "istiod.istio-system.svc")]
    pub server_name: String,
    /// Token files; client i uses file i mod N (one token per simulated workload).
    #[arg(long = "token-file", required_unless_present = "client_cert")]
    pub token_files: Vec<PathBuf>,
    /// Authenticate with this client certificate chain instead (renewals).
    #[arg(long, requires = "client_key")]
    pub client_cert: Option<PathBuf>,
    #[arg(long)]
    pub client_key: Option<PathBuf>,
    /// Concurrent clients (each keeps requests in flight one at a time).
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// TLS connections shared by the clients (HTTP/2 multiplexes the rest).
    #[arg(long, default_value_t = 16)]
    pub connections: usize,
    /// Total requests to send.
    #[arg(long, default_value_t = 10_000)]
    pub requests: usize,
    /// Requests per second over all clients (open loop: each client keeps
    /// its own schedule, and a latency counts from when its request was
    /// due, so a stalled server is not hidden); unset: each client sends
    /// its next request as soon as the last is answered.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Stop after this long even if requests remain.
    #[arg(long, value_parser = parse_duration, default_value = "120s")]
    pub max_duration: Duration,
    /// Key type of the pre-made CSRs (client key generation is not measured).
    #[arg(long, default_value = "ecdsa-p256")]
    pub key_type: KeyType,
    /// Requested certificate lifetime.
    #[arg(long, value_parser = parse_duration, default_value = "1h")]
    pub ttl: Duration,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Request n uses token n mod N (instead of client i using token i mod
    /// N): with --requests N, every workload asks exactly once (mass restart).
    #[arg(long)]
    pub token_per_request: bool,
    /// Each CSR carries its token's identity as its one URI SAN,
    /// spiffe://TRUST_DOMAIN/ns/NS/sa/SA from the token's `sub` claim, as
    /// istio-agent's CSRs do (RA mode refuses CSRs without it).
    #[arg(long)]
    pub san_from_token: bool,
    /// Trust domain of --san-from-token.
    #[arg(long, default_value = "cluster.local")]
    pub trust_domain: String,
    /// Ask on behalf of this SPIFFE identity (metadata
    /// `ImpersonatedIdentity`), as ztunnel does for a pod on its node.
    #[arg(long)]
    pub impersonate: Option<String>,
}

/// The SPIFFE identity of a Kubernetes service account token (its `sub`,
/// `system:serviceaccount:NS:SA`; the signature is not checked here).
fn token_spiffe_id(token: &str, trust_domain: &str) -> Result<String> {
    use base64::Engine;
    let payload = token.split('.').nth(1).context("token is not a JWT")?;
    let claims: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload.trim_end_matches('='))
            .context("token payload is not base64url")?,
    )?;
    let sub = claims["sub"].as_str().context("token has no sub")?;
    match sub.split(':').collect::<Vec<_>>()[..] {
        ["system", "serviceaccount", ns, sa] => {
            Ok(format!("spiffe://{trust_domain}/ns/{ns}/sa/{sa}"))
        }
        _ => anyhow::bail!("token sub {sub:?} is not a service account"),
    }
}

pub fn loadgen(args: &LoadgenArgs) -> Result<ExitCode> {
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(run(args))
}

async fn run(args: &LoadgenArgs) -> Result<ExitCode> {
    let tokens: Vec<String> = args
        .token_files
        .iter()
        .map(|p| Ok(String::from_utf8(read_input(p)?)?.trim().to_owned()))
        .collect::<Result<_>>()?;
    // A pool of CSRs made up front, so the figures measure the CA.
    let keys: Vec<SigningKey> = (0..32.min(args.requests.max(1)))
        .map(|_| SigningKey::generate(args.key_type))
        .collect::<Result<_, _>>()?;
    // With --san-from-token, one CSR per token (keys shared round-robin).
    let csrs: Vec<String> = if args.san_from_token {
        anyhow::ensure!(!tokens.is_empty(), "--san-from-token needs --token-file");
        tokens
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let id = token_spiffe_id(t, &args.trust_domain)?;
                build_csr(
                    &keys[i % keys.len()],
                    cert::EMPTY_NAME,
                    &[SanEntry::Uri(id)],
                )
                .map_err(anyhow::Error::msg)
            })
            .collect::<Result<_>>()?
    } else {
        keys.iter()
            .map(|key| build_csr(key, cert::EMPTY_NAME, &[]).map_err(anyhow::Error::msg))
            .collect::<Result<_>>()?
    };
    let tokens = Arc::new(tokens);
    let csrs = Arc::new(csrs);
    let root = read_input(&args.root)?;
    let identity = match (&args.client_cert, &args.client_key) {
        (Some(cert), Some(key)) => Some(tonic::transport::Identity::from_pem(
            read_input(cert)?,
            zeroize::Zeroizing::new(read_input(key)?).as_slice(),
        )),
        _ => None,
    };
    let mut channels = Vec::new();
    for _ in 0..args.connections.max(1) {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&root))
            .domain_name(args.server_name.clone());
        if let Some(identity) = &identity {
            tls = tls.identity(identity.clone());
        }
        let channel = Endpoint::from_shared(format!("https://{}", args.addr))?
            .tls_config(tls)?
            .connect_timeout(Duration::from_secs(10))
            .connect()
            .await
            .with_context(|| format!("connecting to {}", args.addr))?;
        channels.push(channel);
    }

    let next = Arc::new(AtomicUsize::new(0));
    let deadline = Instant::now() + args.max_duration;
    let started = Instant::now();
    let clients = args.concurrency.max(1);
    // With --rate, client i sends at started + (i + k * clients) / rate.
    let interval = args
        .rate
        .filter(|r| r.is_finite() && *r > 0.0)
        .map(|r| Duration::from_secs_f64(1.0 / r));
    let mut tasks = Vec::new();
    for client in 0..clients {
        let channel: Channel = channels[client % channels.len()].clone();
        let (tokens, csrs) = (tokens.clone(), csrs.clone());
        let (per_request, per_token_csr) = (args.token_per_request, args.san_from_token);
        let (next, impersonate) = (next.clone(), args.impersonate.clone());
        let (ttl, total) = (args.ttl.as_secs() as i64, args.requests);
        tasks.push(tokio::spawn(async move {
            let mut grpc = IstioCertificateServiceClient::new(channel);
            let mut latencies = Vec::new();
            let mut errors: HashMap<String, usize> = HashMap::new();
            let mut due = interval.map(|i| started + i * client as u32);
            loop {
                if let Some(at) = due {
                    if at >= deadline {
                        break;
                    }
                    tokio::time::sleep_until(at.into()).await;
                }
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= total || Instant::now() >= deadline {
                    break;
                }
                let t = if per_request { n } else { client };
                let t = (!tokens.is_empty()).then(|| t % tokens.len());
                let csr = match t {
                    Some(t) if per_token_csr => csrs[t].clone(),
                    _ => csrs[n % csrs.len()].clone(),
                };
                let mut body = IstioCertificateRequest::from_agent(csr, ttl, "");
                if let Some(id) = impersonate.as_deref() {
                    body = body.impersonating(id);
                }
                let mut req = tonic::Request::new(body);
                if let Some(v) = t.and_then(|t| format!("Bearer {}", tokens[t]).parse().ok()) {
                    req.metadata_mut().insert("authorization", v);
                }
                let sent = due.unwrap_or_else(Instant::now);
                if let (Some(at), Some(i)) = (&mut due, interval) {
                    *at += i * clients as u32;
                }
                // Bounded: a request still waiting at the deadline counts as an error.
                let answer =
                    tokio::time::timeout_at(deadline.into(), grpc.create_certificate(req)).await;
                match answer {
                    Ok(Ok(resp)) if resp.get_ref().cert_chain.len() >= 2 => {
                        latencies.push(sent.elapsed())
                    }
                    Ok(Ok(_)) => *errors.entry("short chain".into()).or_default() += 1,
                    Ok(Err(status)) => {
                        *errors.entry(format!("{:?}", status.code())).or_default() += 1
                    }
                    Err(_) => *errors.entry("deadline".into()).or_default() += 1,
                }
            }
            (latencies, errors)
        }));
    }
    let mut latencies = Vec::new();
    let mut errors: HashMap<String, usize> = HashMap::new();
    for task in tasks {
        let (l, e) = task.await?;
        latencies.extend(l);
        for (k, v) in e {
            *errors.entry(k).or_default() += v;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort();
    let pct = |p: f64| -> f64 {
        if latencies.is_empty() {
            return 0.0;
        }
        let i = ((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1;
        latencies[i].as_secs_f64() * 1000.0
    };
    let ok = latencies.len();
    let report = serde_json::json!({
        "addr": args.addr,
        "concurrency": args.concurrency,
        "connections": args.connections,
        "tokens": tokens.len(),
        "ok": ok,
        "errors": errors,
        "seconds": elapsed,
        "certs_per_second": ok as f64 / elapsed,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "p999_ms": pct(0.999),
    });
    if args.json {
        println!("{report}");
    } else {
        println!(
            "{ok} certificates in {elapsed:.2}s = {:.0}/s; p50 {:.1} ms, p99 {:.1} ms, p99.9 {:.1} ms; errors {errors:?}",
            ok as f64 / elapsed,
            pct(0.50),
            pct(0.99),
            pct(0.999)
        );
    }
    Ok(if errors.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
