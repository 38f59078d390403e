//! Floods against a standalone `meshca server` (issue 13, part 2; the
//! stalled-stream flood of issue 15). For each flood the example starts the
//! flood, and once it is up runs legitimate clients beside it for
//! `--duration`: `meshca loadgen` at a fixed rate with a token, and another
//! with a TLS client certificate (a renewal). It reports the server's peak
//! RSS during the flood (`VmHWM`, reset before each flood through
//! `/proc/<pid>/clear_refs`), the legitimate requests answered and failed
//! with their p50/p99, and what the server did to the flood.
//!
//! The floods:
//! - `none`: the legitimate clients alone (the baseline);
//! - `idle`, `idle-cert`: `--idle-connections` TLS connections (with a client
//!   certificate for `idle-cert`) that send the HTTP/2 preface and SETTINGS,
//!   answer the server's PINGs and send nothing else;
//! - `slowloris`: `--slowloris-connections` connections that drip a
//!   ClientHello one byte a second, reconnecting when closed;
//! - `silent-tls`: `--silent-connections` that complete TLS and send nothing;
//! - `streams`: `--stream-connections` TLS connections each opening
//!   `--streams` CreateCertificate streams whose bodies never complete,
//!   ignoring SETTINGS_MAX_CONCURRENT_STREAMS as an attacker would;
//! - `rapid-reset`: HEADERS then RST_STREAM, over and over (CVE-2023-44487);
//! - `oversized`: a DATA frame announcing 16 MiB, a header list of 1 MiB in
//!   CONTINUATION frames, and a 1 MiB gRPC message, in turn;
//! - `garbage`: 64 KiB of random bytes instead of a ClientHello, and
//!   instead of the HTTP/2 preface after a TLS handshake.
//!
//! The last four keep `--attack-connections` connections busy, reconnecting
//! as fast as they are closed.
//!
//!     cargo build --release -p meshca --bin meshca --example floods
//!     target/release/examples/floods [--only idle,streams] [--duration 20s] \
//!         [--server-arg=--max-connections=20000]
//!
//! Everything listens on 127.0.0.1 and stops by itself; the server is killed
//! at the end. Both processes need about `--idle-connections` open files:
//! the example raises its soft RLIMIT_NOFILE to the hard one, and the server
//! inherits it.

mod bench_common;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bench_common::{Auth, Proc, free_port, loadgen_with, meshca_bin, wait_http};
use clap::{Parser, ValueEnum};
use meshca_kube::CancellationToken;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

#[derive(Parser)]
struct Args {
    /// The floods to run, in this order.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "none,idle,idle-cert,slowloris,silent-tls,streams,rapid-reset,oversized,garbage"
    )]
    only: Vec<Flood>,
    /// How long the legitimate clients run beside each flood.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "20s")]
    duration: Duration,
    #[arg(long, default_value_t = 10_000)]
    idle_connections: usize,
    #[arg(long, default_value_t = 5_000)]
    slowloris_connections: usize,
    #[arg(long, default_value_t = 1_000)]
    silent_connections: usize,
    #[arg(long, default_value_t = 200)]
    stream_connections: usize,
    /// Stalled streams per connection.
    #[arg(long, default_value_t = 100)]
    streams: u32,
    /// Flood connections opened a second.
    #[arg(long, default_value_t = 2000)]
    ramp: usize,
    /// Connections kept busy by rapid-reset, oversized and garbage.
    #[arg(long, default_value_t = 16)]
    attack_connections: usize,
    /// Legitimate clients of each kind (token, client certificate), each on
    /// its own connection.
    #[arg(long, default_value_t = 4)]
    legit_clients: usize,
    /// Legitimate requests per second of each kind.
    #[arg(long, default_value_t = 20.0)]
    legit_rate: f64,
    /// A `meshca server` flag (repeatable), e.g. `--server-arg=--max-connections=20000`.
    #[arg(long = "server-arg", allow_hyphen_values = true)]
    server_args: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Flood {
    None,
    Idle,
    IdleCert,
    Slowloris,
    SilentTls,
    Streams,
    RapidReset,
    Oversized,
    Garbage,
}

/// What a flood needs to reach the server.
struct Target {
    addr: SocketAddr,
    root: PathBuf,
    token: PathBuf,
    /// `cert-chain.pem` and `key.pem` of a workload certificate.
    client_dir: PathBuf,
    plain: tokio_rustls::TlsConnector,
    with_cert: tokio_rustls::TlsConnector,
}

impl Target {
    async fn tls(&self, cert: bool) -> Result<TlsStream<TcpStream>> {
        let tcp = TcpStream::connect(self.addr).await?;
        let connector = if cert { &self.with_cert } else { &self.plain };
        let name = ServerName::try_from("istiod.istio-system.svc")?;
        Ok(connector.connect(name, tcp).await?)
    }
}

fn connector(root: &Path, client_dir: Option<&Path>) -> Result<tokio_rustls::TlsConnector> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(root)? {
        roots.add(cert?)?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let mut config = match client_dir {
        None => builder.with_no_client_auth(),
        Some(dir) => {
            let chain = CertificateDer::pem_file_iter(dir.join("cert-chain.pem"))?
                .collect::<Result<Vec<_>, _>>()?;
            let key = PrivateKeyDer::from_pem_file(dir.join("key.pem"))?;
            builder.with_client_auth_cert(chain, key)?
        }
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// Named counts of what happened to the flood, and how long connections
/// were held before the server closed them.
#[derive(Default)]
struct Tally {
    counts: Mutex<BTreeMap<String, u64>>,
    held: Mutex<Vec<Duration>>,
    /// Connections made (TLS done, or TCP for slowloris).
    up: AtomicU64,
    /// Of those, still open.
    open: AtomicI64,
}

impl Tally {
    fn add(&self, what: impl Into<String>, n: u64) {
        *self
            .counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(what.into())
            .or_default() += n;
    }
    fn opened(&self) {
        self.up.fetch_add(1, Ordering::SeqCst);
        self.open.fetch_add(1, Ordering::SeqCst);
    }
    fn closed_after(&self, since: Instant) {
        self.open.fetch_sub(1, Ordering::SeqCst);
        self.add("closed by the server", 1);
        self.held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(since.elapsed());
    }
    fn summary(&self) -> String {
        let counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let mut parts: Vec<String> = counts.iter().map(|(k, v)| format!("{v} {k}")).collect();
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if !held.is_empty() {
            held.sort();
            parts.push(format!(
                "closed after p50 {:.1} s, max {:.1} s",
                held[held.len() / 2].as_secs_f64(),
                held[held.len() - 1].as_secs_f64()
            ));
        }
        parts.join(", ")
    }
}

mod raw_h2 {
    pub const DATA: u8 = 0x0;
    pub const HEADERS: u8 = 0x1;
    pub const RST_STREAM: u8 = 0x3;
    pub const SETTINGS: u8 = 0x4;
    pub const PING: u8 = 0x6;
    pub const GOAWAY: u8 = 0x7;
    pub const CONTINUATION: u8 = 0x9;
    pub const END_HEADERS: u8 = 0x4;
    pub const ACK: u8 = 0x1;
    pub const CANCEL: u32 = 0x8;
    pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

    /// A frame; `len` is what the header announces (the payload's length
    /// unless an oversized frame is announced).
    pub fn frame_announcing(len: u32, kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = len.to_be_bytes();
        let mut out = vec![len[1], len[2], len[3], kind, flags];
        out.extend_from_slice(&stream.to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
        frame_announcing(len, kind, flags, stream, payload)
    }

    /// HPACK: literal fields without indexing, new names, no Huffman; each
    /// name and value shorter than 127 bytes.
    pub fn header_block(fields: &[(&str, &str)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (name, value) in fields {
            out.push(0x00);
            for text in [name, value] {
                out.push(u8::try_from(text.len()).unwrap_or(126).min(126));
                out.extend_from_slice(&text.as_bytes()[..text.len().min(126)]);
            }
        }
        out
    }

    /// A CreateCertificate request's headers.
    pub fn request_headers(authority: &str) -> Vec<u8> {
        header_block(&[
            (":method", "POST"),
            (":scheme", "https"),
            (
                ":path",
                "/istio.v1.auth.IstioCertificateService/CreateCertificate",
            ),
            (":authority", authority),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ])
    }

    pub fn error_name(code: u32) -> &'static str {
        match code {
            0x0 => "NO_ERROR",
            0x1 => "PROTOCOL_ERROR",
            0x2 => "INTERNAL_ERROR",
            0x3 => "FLOW_CONTROL_ERROR",
            0x6 => "FRAME_SIZE_ERROR",
            0x7 => "REFUSED_STREAM",
            0x8 => "CANCEL",
            0x9 => "COMPRESSION_ERROR",
            0xb => "ENHANCE_YOUR_CALM",
            _ => "other",
        }
    }

    pub async fn read_frame(
        io: &mut (impl tokio::io::AsyncRead + Unpin),
    ) -> std::io::Result<(u8, u8, u32, Vec<u8>)> {
        use tokio::io::AsyncReadExt;
        let mut head = [0u8; 9];
        io.read_exact(&mut head).await?;
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        let mut payload = vec![0u8; len];
        io.read_exact(&mut payload).await?;
        Ok((head[3], head[4], stream, payload))
    }
}
use raw_h2::*;

/// What the writer of [`converse`] sends: once, or batch after batch until
/// the server closes or the flood stops.
enum Payload {
    Once(Vec<u8>),
    Repeat(Box<dyn FnMut() -> Vec<u8> + Send>),
}

/// How a conversation ended.
#[derive(PartialEq)]
enum Ended {
    Stopped,
    ClosedByServer,
}

/// Speaks HTTP/2 on `io`: sends the payload, answers the server's SETTINGS
/// and PINGs (so keepalive does not end the connection), and counts the
/// server's RST_STREAMs, GOAWAYs and responses, until the server closes the
/// connection or `stop`.
async fn converse(
    io: impl AsyncRead + AsyncWrite + Send + 'static,
    payload: Payload,
    tally: &Tally,
    stop: &CancellationToken,
) -> Ended {
    let (mut read, mut write) = tokio::io::split(io);
    let (acks_tx, mut acks_rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
    let writer = async move {
        match payload {
            Payload::Once(bytes) => {
                write.write_all(&bytes).await?;
                while let Some(ack) = acks_rx.recv().await {
                    write.write_all(&ack).await?;
                }
            }
            Payload::Repeat(mut next) => loop {
                while let Ok(ack) = acks_rx.try_recv() {
                    write.write_all(&ack).await?;
                }
                write.write_all(&next()).await?;
            },
        }
        // The reader is gone: the connection is ending.
        std::future::pending::<()>().await;
        Ok::<_, std::io::Error>(())
    };
    let reader = async {
        loop {
            let (kind, flags, stream, payload) = read_frame(&mut read).await?;
            match kind {
                SETTINGS if flags & ACK == 0 => {
                    let _ = acks_tx.send(frame(SETTINGS, ACK, 0, &[]));
                }
                PING if flags & ACK == 0 => {
                    let _ = acks_tx.send(frame(PING, ACK, 0, &payload));
                }
                RST_STREAM if payload.len() == 4 => {
                    let code = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
                    tally.add(format!("RST_STREAM {}", error_name(code)), 1);
                }
                GOAWAY if payload.len() >= 8 => {
                    let code = u32::from_be_bytes([payload[4], payload[5], payload[6], payload[7]]);
                    tally.add(format!("GOAWAY {}", error_name(code)), 1);
                }
                HEADERS if stream != 0 => tally.add("responses", 1),
                _ => {}
            }
        }
        #[allow(unreachable_code)]
        Ok::<_, std::io::Error>(())
    };
    tokio::select! {
        _ = writer => Ended::ClosedByServer,
        _ = reader => Ended::ClosedByServer,
        () = stop.cancelled() => Ended::Stopped,
    }
}

/// What every flood connection needs.
#[derive(Clone)]
struct Ctx {
    target: Arc<Target>,
    tally: Arc<Tally>,
    stop: CancellationToken,
}

/// One flood connection's work; its argument counts the connections made.
type Job = Arc<dyn Fn(Ctx, u64) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

fn job<Fut: Future<Output = ()> + Send + 'static>(
    f: impl Fn(Ctx, u64) -> Fut + Send + Sync + 'static,
) -> Job {
    Arc::new(move |c, turn| Box::pin(f(c, turn)))
}

/// Runs `job` on `count` connections, started `per_second` a second (in
/// steps of 50 ms; the listen backlog must not overflow); with `again`,
/// each starts over when it ends. Until `stop`.
async fn flood_with(count: usize, per_second: usize, again: bool, c: Ctx, job: Job) {
    let turns = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    let step = (per_second / 20).max(1);
    for i in 0..count {
        if i % step == step - 1 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if c.stop.is_cancelled() {
            break;
        }
        let (c, job, turns) = (c.clone(), job.clone(), turns.clone());
        workers.push(tokio::spawn(async move {
            loop {
                // Each job ends when the flood stops, counting how.
                job(c.clone(), turns.fetch_add(1, Ordering::SeqCst)).await;
                if !again || c.stop.is_cancelled() {
                    break;
                }
            }
        }));
    }
    for w in workers {
        let _ = w.await;
    }
}

/// A TLS connection, or `None` (counted) when the server refused it.
async fn connect(c: &Ctx, cert: bool) -> Option<TlsStream<TcpStream>> {
    match c.target.tls(cert).await {
        Ok(tls) => Some(tls),
        Err(e) => {
            c.tally.add(format!("refused ({})", short(&e)), 1);
            // Refused at once: do not spin.
            tokio::time::sleep(Duration::from_millis(100)).await;
            None
        }
    }
}

/// An idle HTTP/2 connection: preface and SETTINGS, then only acks.
async fn idle_connection(c: Ctx, cert: bool) {
    let Some(tls) = connect(&c, cert).await else {
        return;
    };
    c.tally.opened();
    let since = Instant::now();
    let mut hello = PREFACE.to_vec();
    hello.extend(frame(SETTINGS, 0, 0, &[]));
    match converse(tls, Payload::Once(hello), &c.tally, &c.stop).await {
        Ended::Stopped => c.tally.add("held to the end", 1),
        Ended::ClosedByServer => c.tally.closed_after(since),
    }
}

/// A short description of a connection error, for the tally.
fn short(e: &anyhow::Error) -> String {
    let text = format!("{e:#}").to_lowercase();
    if text.contains("reset") || text.contains("close") || text.contains("eof") {
        "closed at once".into()
    } else if text.contains("refused") {
        "connect refused".into()
    } else {
        text.chars().take(60).collect()
    }
}

/// Reads until the server closes the connection (or the flood stops).
async fn wait_closed(io: &mut (impl AsyncRead + Unpin), c: &Ctx, since: Instant) {
    let mut buf = [0u8; 4096];
    tokio::select! {
        () = async {
            while matches!(io.read(&mut buf).await, Ok(n) if n > 0) {}
        } => c.tally.closed_after(since),
        () = c.stop.cancelled() => c.tally.add("held to the end", 1),
    }
}

/// A TCP connection dripping a ClientHello, one byte a second.
async fn slowloris(c: Ctx) {
    let Ok(mut tcp) = TcpStream::connect(c.target.addr).await else {
        c.tally.add("connect failed", 1);
        tokio::time::sleep(Duration::from_millis(100)).await;
        return;
    };
    c.tally.opened();
    let since = Instant::now();
    let (mut read, mut write) = tcp.split();
    // A handshake record announcing 512 bytes, then its bytes one by one.
    let drip = async {
        let hello = [0x16u8, 0x03, 0x01, 0x02, 0x00, 0x01];
        for byte in hello.into_iter().chain(std::iter::repeat(0)) {
            if write.write_all(&[byte]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        std::future::pending::<()>().await;
    };
    tokio::select! {
        () = wait_closed(&mut read, &c, since) => {}
        () = drip => {}
    }
}

/// A connection that completes TLS and then says nothing.
async fn silent_tls(c: Ctx) {
    let Some(mut tls) = connect(&c, false).await else {
        return;
    };
    c.tally.opened();
    wait_closed(&mut tls, &c, Instant::now()).await;
}

/// `streams` CreateCertificate streams whose bodies never complete: the
/// gRPC frame announces 100 bytes, 3 come.
async fn stalled_streams(c: Ctx, streams: u32) {
    let Some(tls) = connect(&c, false).await else {
        return;
    };
    c.tally.opened();
    let block = request_headers(&c.target.addr.to_string());
    let mut out = PREFACE.to_vec();
    out.extend(frame(SETTINGS, 0, 0, &[]));
    for i in 0..streams {
        let id = 2 * i + 1;
        out.extend(frame(HEADERS, END_HEADERS, id, &block));
        out.extend(frame(DATA, 0, id, &[0, 0, 0, 0, 100, 1, 2, 3]));
    }
    c.tally.add("stalled streams sent", u64::from(streams));
    let since = Instant::now();
    match converse(tls, Payload::Once(out), &c.tally, &c.stop).await {
        Ended::Stopped => c.tally.add("connections held to the end", 1),
        Ended::ClosedByServer => c.tally.closed_after(since),
    }
}

/// HEADERS and RST_STREAM(CANCEL), 100 pairs a write, until closed.
async fn rapid_reset(c: Ctx) {
    let Some(tls) = connect(&c, false).await else {
        return;
    };
    let block = request_headers(&c.target.addr.to_string());
    let mut id = 1u32;
    let mut first = true;
    let tally = c.tally.clone();
    let batch = move || {
        let mut out = Vec::new();
        if first {
            out.extend_from_slice(PREFACE);
            out.extend(frame(SETTINGS, 0, 0, &[]));
            first = false;
        }
        for _ in 0..100 {
            out.extend(frame(HEADERS, END_HEADERS, id, &block));
            out.extend(frame(RST_STREAM, 0, id, &CANCEL.to_be_bytes()));
            id = id.wrapping_add(2) & 0x7fff_ffff;
        }
        tally.add("streams opened and reset", 100);
        out
    };
    let since = Instant::now();
    let ended = converse(tls, Payload::Repeat(Box::new(batch)), &c.tally, &c.stop).await;
    if ended == Ended::ClosedByServer {
        c.tally.closed_after(since);
    }
}

/// One of three oversized things, by turn: a DATA frame announcing 16 MiB,
/// 1 MiB of headers in CONTINUATION frames, a 1 MiB gRPC message.
async fn oversized(c: Ctx, turn: u64) {
    if turn % 3 == 2 {
        return oversized_message(&c).await;
    }
    let Some(tls) = connect(&c, false).await else {
        return;
    };
    let mut out = PREFACE.to_vec();
    out.extend(frame(SETTINGS, 0, 0, &[]));
    let headers = request_headers(&c.target.addr.to_string());
    if turn % 3 == 0 {
        c.tally.add("16 MiB DATA frames", 1);
        out.extend(frame(HEADERS, END_HEADERS, 1, &headers));
        out.extend(frame_announcing(0xff_ffff, DATA, 0, 1, &[0u8; 64 * 1024]));
    } else {
        c.tally.add("1 MiB header lists", 1);
        out.extend(frame(HEADERS, 0, 1, &headers));
        let value = "v".repeat(100);
        let names: Vec<String> = (0..140).map(|i| format!("x-flood-{i}")).collect();
        let fields: Vec<(&str, &str)> =
            names.iter().map(|n| (n.as_str(), value.as_str())).collect();
        let block = header_block(&fields);
        for i in 0..64 {
            let flags = if i == 63 { END_HEADERS } else { 0 };
            out.extend(frame(CONTINUATION, flags, 1, &block));
        }
    }
    let since = Instant::now();
    if converse(tls, Payload::Once(out), &c.tally, &c.stop).await == Ended::ClosedByServer {
        c.tally.closed_after(since);
    }
}

/// A CreateCertificate whose CSR is 1 MiB, through tonic as a client would.
async fn oversized_message(c: &Ctx) {
    use meshca_proto::IstioCertificateRequest;
    use meshca_proto::istio_certificate_service_client::IstioCertificateServiceClient;
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
    c.tally.add("1 MiB gRPC messages", 1);
    let answer = async {
        let root = std::fs::read(&c.target.root)?;
        let channel = Endpoint::from_shared(format!("https://{}", c.target.addr))?
            .tls_config(
                ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(root))
                    .domain_name("istiod.istio-system.svc"),
            )?
            .connect()
            .await?;
        let request = IstioCertificateRequest::from_agent("x".repeat(1 << 20), 3600, "");
        let status = match IstioCertificateServiceClient::new(channel)
            .create_certificate(request)
            .await
        {
            Ok(_) => "answered with a certificate (wrong)".to_owned(),
            Err(status) => format!("answered {:?}", status.code()),
        };
        Ok::<_, anyhow::Error>(status)
    };
    match answer.await {
        Ok(status) => c.tally.add(status, 1),
        Err(e) => c.tally.add(format!("failed ({})", short(&e)), 1),
    }
}

/// 64 KiB of random bytes: before TLS (odd turns) or after it.
async fn garbage(c: Ctx, turn: u64) {
    let mut state = turn.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let bytes: Vec<u8> = (0..64 * 1024)
        .map(|_| {
            // xorshift64: garbage needs no better randomness.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state.to_le_bytes()[0]
        })
        .collect();
    let since = Instant::now();
    if turn % 2 == 1 {
        c.tally.add("garbage instead of a ClientHello", 1);
        let Ok(mut tcp) = TcpStream::connect(c.target.addr).await else {
            c.tally.add("connect failed", 1);
            return;
        };
        if tcp.write_all(&bytes).await.is_err() {
            return c.tally.closed_after(since);
        }
        wait_closed(&mut tcp, &c, since).await;
    } else {
        c.tally.add("garbage after the TLS handshake", 1);
        let Some(mut tls) = connect(&c, false).await else {
            return;
        };
        if tls.write_all(&bytes).await.is_err() {
            return c.tally.closed_after(since);
        }
        wait_closed(&mut tls, &c, since).await;
    }
}

/// Runs one flood until `c.stop`.
async fn run_flood(flood: Flood, args: Arc<Args>, c: Ctx) {
    let attack = args.attack_connections;
    match flood {
        Flood::None => c.stop.cancelled().await,
        Flood::Idle => {
            let j = job(|c, _| idle_connection(c, false));
            flood_with(args.idle_connections, args.ramp, false, c, j).await
        }
        Flood::IdleCert => {
            let j = job(|c, _| idle_connection(c, true));
            flood_with(args.idle_connections, args.ramp, false, c, j).await
        }
        Flood::Slowloris => {
            let j = job(|c, _| slowloris(c));
            flood_with(args.slowloris_connections, args.ramp, true, c, j).await
        }
        Flood::SilentTls => {
            let j = job(|c, _| silent_tls(c));
            flood_with(args.silent_connections, args.ramp, true, c, j).await
        }
        Flood::Streams => {
            let streams = args.streams;
            let j = job(move |c, _| stalled_streams(c, streams));
            flood_with(args.stream_connections, args.ramp, false, c, j).await
        }
        Flood::RapidReset => {
            flood_with(attack, args.ramp, true, c, job(|c, _| rapid_reset(c))).await
        }
        Flood::Oversized => flood_with(attack, args.ramp, true, c, job(oversized)).await,
        Flood::Garbage => flood_with(attack, args.ramp, true, c, job(garbage)).await,
    }
}

/// How many connections a flood opens up front before the legitimate
/// clients start (0: none to wait for).
fn ramp(flood: Flood, args: &Args) -> usize {
    match flood {
        Flood::Idle | Flood::IdleCert => args.idle_connections,
        Flood::Slowloris => args.slowloris_connections,
        Flood::SilentTls => args.silent_connections,
        Flood::Streams => args.stream_connections,
        _ => 0,
    }
}

fn status_kib(pid: u32, field: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(field))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Raises the soft open-files limit to the hard one (inherited by the server).
fn raise_nofile(need: u64) -> Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit write or read the one struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            bail!("getrlimit: {}", std::io::Error::last_os_error());
        }
        limit.rlim_cur = limit.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
            bail!("setrlimit: {}", std::io::Error::last_os_error());
        }
    }
    if limit.rlim_cur < need {
        bail!(
            "open files: the hard limit is {}, the floods need {need}; raise it (ulimit -Hn) or lower --idle-connections",
            limit.rlim_cur
        );
    }
    Ok(limit.rlim_cur)
}

/// A standalone server with a token and a workload certificate for the
/// legitimate clients.
async fn start_server(tmp: &Path, extra: &[String]) -> Result<(Proc, Target)> {
    let meshca = meshca_bin()?;
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
    let monitoring = format!("127.0.0.1:{}", free_port());
    let state = tmp.join("state");
    let log = std::fs::File::create(tmp.join("server.log"))?;
    let proc = Proc(
        Command::new(&meshca)
            .args(["server", "--standalone", "--listen", &addr.to_string()])
            .args(["--monitoring-listen", &monitoring])
            .arg("--state-dir")
            .arg(&state)
            .arg("--root-ca-dir")
            .arg(tmp.join("none"))
            .args(extra)
            .env_remove("KUBECONFIG")
            .env("RUST_LOG", "warn")
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting meshca server")?,
    );
    wait_http(
        &format!("http://{monitoring}/readyz"),
        "meshca server",
        Duration::from_secs(30),
    )
    .await
    .with_context(|| format!("see {}", tmp.join("server.log").display()))?;
    let root = state.join("ca/root-cert.pem");
    let token = tmp.join("demo.token");
    let out = Command::new(&meshca)
        .args(["token", "--service-account", "demo", "--ttl", "4h"])
        .arg("--state-dir")
        .arg(&state)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "meshca token: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(&token, &out.stdout)?;
    let client_dir = tmp.join("client");
    let out = Command::new(&meshca)
        .args([
            "request",
            "--addr",
            &addr.to_string(),
            "--key-type",
            "ecdsa-p256",
            "--ttl",
            "4h",
        ])
        .arg("--root")
        .arg(&root)
        .arg("--token-file")
        .arg(&token)
        .arg("--out")
        .arg(&client_dir)
        .stdout(Stdio::null())
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "meshca request: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let target = Target {
        addr,
        plain: connector(&root, None)?,
        with_cert: connector(&root, Some(&client_dir))?,
        root,
        token,
        client_dir,
    };
    Ok((proc, target))
}

/// One kind of legitimate client's result: "ok/failed", "p50/p99".
fn legit_cells(report: &Result<serde_json::Value>) -> (String, String) {
    match report {
        Ok(r) => {
            let ok = r["ok"].as_u64().unwrap_or(0);
            let failed: u64 = r["errors"]
                .as_object()
                .map(|e| e.values().filter_map(|v| v.as_u64()).sum())
                .unwrap_or(0);
            let errors = if failed > 0 {
                format!(" {}", r["errors"])
            } else {
                String::new()
            };
            (
                format!("{ok} / {failed}{errors}"),
                format!(
                    "{:.1} / {:.1}",
                    r["p50_ms"].as_f64().unwrap_or(0.0),
                    r["p99_ms"].as_f64().unwrap_or(0.0)
                ),
            )
        }
        Err(e) => (format!("could not run: {}", short(e)), "-".into()),
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Arc::new(Args::parse());
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let need = (args.idle_connections.max(args.slowloris_connections) + 1000) as u64;
    let nofile = raise_nofile(need)?;
    let tmp = tempfile::tempdir()?;
    let (mut server, target) = start_server(tmp.path(), &args.server_args).await?;
    let target = Arc::new(target);
    let pid = server.0.id();
    println!(
        "meshca server pid {pid} on {}, open files {nofile}, legitimate clients {} + {} at {} requests/s each kind, {:?} per flood; extra server flags {:?}",
        target.addr,
        args.legit_clients,
        args.legit_clients,
        args.legit_rate,
        args.duration,
        args.server_args
    );
    println!(
        "\n| flood | server RSS before, MiB | peak RSS during, MiB | RSS at the end, MiB | token: ok / failed | token: p50 / p99 ms | client cert: ok / failed | client cert: p50 / p99 ms | what the server did to the flood |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for &flood in &args.only {
        let before = status_kib(pid, "VmRSS:").unwrap_or(0);
        // Reset VmHWM to the current RSS: the peak is this flood's.
        let reset = std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok();
        let tally = Arc::new(Tally::default());
        let stop = CancellationToken::new();
        let started = Instant::now();
        let ctx = Ctx {
            target: target.clone(),
            tally: tally.clone(),
            stop: stop.clone(),
        };
        let flooding = tokio::spawn(run_flood(flood, args.clone(), ctx));
        // Let the flood build up (60 s at most).
        let want = ramp(flood, &args) as u64;
        while tally.up.load(Ordering::SeqCst) < want && started.elapsed() < Duration::from_secs(60)
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let ramp_s = started.elapsed().as_secs_f64();
        if want == 0 && flood != Flood::None {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let legit = |auth: &'static str| {
            let (args, target) = (args.clone(), target.clone());
            tokio::task::spawn_blocking(move || {
                let tokens = [target.token.clone()];
                let auth = if auth == "token" {
                    Auth::Tokens(&tokens)
                } else {
                    Auth::ClientCert(&target.client_dir)
                };
                loadgen_with(
                    &target.addr.to_string(),
                    &target.root,
                    auth,
                    1_000_000,
                    args.legit_clients,
                    &[
                        "--rate",
                        &args.legit_rate.to_string(),
                        "--max-duration",
                        &format!("{}ms", args.duration.as_millis()),
                    ],
                )
            })
        };
        let (token, cert) = tokio::join!(legit("token"), legit("cert"));
        // RSS with the flood still held, at the end of the legitimate run.
        let held_rss = status_kib(pid, "VmRSS:").unwrap_or(0);
        let open = tally.open.load(Ordering::SeqCst);
        let up = tally.up.load(Ordering::SeqCst);
        stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(30), flooding).await;
        let peak = if reset {
            status_kib(pid, "VmHWM:").unwrap_or(0)
        } else {
            0
        };
        let (token_counts, token_lat) =
            legit_cells(&token.map_err(anyhow::Error::from).and_then(|r| r));
        let (cert_counts, cert_lat) =
            legit_cells(&cert.map_err(anyhow::Error::from).and_then(|r| r));
        let mut did = tally.summary();
        if want > 0 {
            did = format!(
                "{up} opened ({want} at once, in {ramp_s:.1} s), {open} open at the end; {did}"
            );
        }
        println!(
            "| {flood:?} | {:.1} | {:.1} | {:.1} | {token_counts} | {token_lat} | {cert_counts} | {cert_lat} | {did} |",
            mib(before),
            mib(peak),
            mib(held_rss),
        );
        // Let closed connections drain before the next flood.
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    if server.0.try_wait()?.is_some() {
        bail!(
            "the server died; see {}",
            tmp.path().join("server.log").display()
        );
    }
    Ok(())
}
