//! A flood of stalled gRPC streams against `meshca server` (issue 15, item
//! 3): `--connections` TLS connections each open `--streams` CreateCertificate
//! requests whose bodies never complete (the gRPC frame announces 100 bytes,
//! 3 come), ignoring the server's SETTINGS_MAX_CONCURRENT_STREAMS as an
//! attacker would, hold them for `--duration`, then close. Prints how many
//! streams the server refused (RST_STREAM REFUSED_STREAM) or ended.
//!
//!     cargo run --release -p meshca --example stream_flood -- \
//!         --addr 127.0.0.1:15012 --root meshca-data/root-cert.pem \
//!         --connections 200 --streams 100 --duration 20s

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:15012")]
    addr: SocketAddr,
    /// The server's root certificate (PEM).
    #[arg(long)]
    root: PathBuf,
    #[arg(long, default_value = "istiod.istio-system.svc")]
    server_name: String,
    #[arg(long, default_value_t = 200)]
    connections: usize,
    /// Stalled streams per connection.
    #[arg(long, default_value_t = 100)]
    streams: u32,
    /// How long the streams are held before every connection closes.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "20s")]
    duration: Duration,
}

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const END_HEADERS: u8 = 0x4;
const ACK: u8 = 0x1;
const REFUSED_STREAM: u32 = 0x7;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len())
        .expect("small frame")
        .to_be_bytes();
    let mut out = vec![len[1], len[2], len[3], kind, flags];
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// HPACK: literal fields without indexing, new names, no Huffman.
fn header_block(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in fields {
        out.push(0x00);
        for text in [name, value] {
            out.push(u8::try_from(text.len()).expect("short header"));
            out.extend_from_slice(text.as_bytes());
        }
    }
    out
}

async fn read_frame(io: &mut (impl AsyncRead + Unpin)) -> std::io::Result<(u8, u8, u32, Vec<u8>)> {
    let mut head = [0u8; 9];
    io.read_exact(&mut head).await?;
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
    let mut payload = vec![0u8; len];
    io.read_exact(&mut payload).await?;
    Ok((head[3], head[4], stream, payload))
}

#[derive(Default)]
struct Counts {
    connected: AtomicUsize,
    failed: AtomicUsize,
    sent: AtomicUsize,
    refused: AtomicUsize,
    reset: AtomicUsize,
    goaway: AtomicUsize,
}

async fn flood_one(
    args: &Args,
    tls: tokio_rustls::TlsConnector,
    counts: &Counts,
    deadline: tokio::time::Instant,
) -> Result<()> {
    let tcp = tokio::net::TcpStream::connect(args.addr).await?;
    let name = rustls_pki_types::ServerName::try_from(args.server_name.clone())?;
    let conn = tls.connect(name, tcp).await?;
    counts.connected.fetch_add(1, Ordering::SeqCst);
    let (mut read, mut write) = tokio::io::split(conn);
    write.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await?;
    write.write_all(&frame(SETTINGS, 0, 0, &[])).await?;
    let authority = args.addr.to_string();
    let block = header_block(&[
        (":method", "POST"),
        (":scheme", "https"),
        (
            ":path",
            "/istio.v1.auth.IstioCertificateService/CreateCertificate",
        ),
        (":authority", &authority),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ]);
    let mut out = Vec::new();
    for i in 0..args.streams {
        let id = 2 * i + 1;
        out.extend(frame(HEADERS, END_HEADERS, id, &block));
        out.extend(frame(DATA, 0, id, &[0, 0, 0, 0, 100, 1, 2, 3]));
    }
    let (acks_tx, mut acks_rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
    // Writes the flood, then answers what the reader asks (SETTINGS and PING acks).
    let writer = async move {
        write.write_all(&out).await?;
        counts
            .sent
            .fetch_add(args.streams as usize, Ordering::SeqCst);
        while let Some(ack) = acks_rx.recv().await {
            write.write_all(&ack).await?;
        }
        Ok::<_, std::io::Error>(())
    };
    let reader = async move {
        loop {
            let (kind, flags, stream, payload) = read_frame(&mut read).await?;
            match kind {
                SETTINGS if flags & ACK == 0 => {
                    let _ = acks_tx.send(frame(SETTINGS, ACK, 0, &[]));
                }
                PING if flags & ACK == 0 => {
                    let _ = acks_tx.send(frame(PING, ACK, 0, &payload));
                }
                RST_STREAM if stream != 0 => {
                    if payload[..] == REFUSED_STREAM.to_be_bytes() {
                        counts.refused.fetch_add(1, Ordering::SeqCst);
                    } else {
                        counts.reset.fetch_add(1, Ordering::SeqCst);
                    }
                }
                GOAWAY => {
                    counts.goaway.fetch_add(1, Ordering::SeqCst);
                }
                _ => {}
            }
        }
        #[allow(unreachable_code)]
        Ok::<_, std::io::Error>(())
    };
    tokio::select! {
        r = writer => r?,
        r = reader => r?,
        () = tokio::time::sleep_until(deadline) => {}
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Arc::new(Args::parse());
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(&args.root).with_context(|| format!("{}", args.root.display()))?;
    for block in meshca_pki::pem::parse_all(&pem)? {
        roots.add(rustls_pki_types::CertificateDer::from(block.der.to_vec()))?;
    }
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config));
    let counts = Arc::new(Counts::default());
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + args.duration;
    let tasks: Vec<_> = (0..args.connections)
        .map(|_| {
            let (args, tls, counts) = (args.clone(), tls.clone(), counts.clone());
            tokio::spawn(async move {
                if let Err(e) = flood_one(&args, tls, &counts, deadline).await {
                    counts.failed.fetch_add(1, Ordering::SeqCst);
                    note_error(&e);
                }
            })
        })
        .collect();
    for task in tasks {
        let _ = task.await;
    }
    let c = |a: &AtomicUsize| a.load(Ordering::SeqCst);
    println!(
        "stream flood: {} connections asked, {} connected, {} failed or closed early; \
         {} stalled streams sent, {} refused (REFUSED_STREAM), {} reset otherwise, {} GOAWAY; held {:.1}s",
        args.connections,
        c(&counts.connected),
        c(&counts.failed),
        c(&counts.sent),
        c(&counts.refused),
        c(&counts.reset),
        c(&counts.goaway),
        started.elapsed().as_secs_f64(),
    );
    Ok(())
}

fn note_error(e: &anyhow::Error) {
    static SHOWN: AtomicUsize = AtomicUsize::new(0);
    if SHOWN.fetch_add(1, Ordering::SeqCst) < 3 {
        eprintln!("connection: {e:#}");
    }
}
