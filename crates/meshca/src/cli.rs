//! Command-line arguments. Subcommands only wire library pieces together.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use meshca_pki::KeyType;

#[derive(Parser)]
#[command(
    name = "meshca",
    version,
    about = "A certificate authority for Istio service meshes and Kubernetes"
)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Offline CA work: create a CA, sign a CSR.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Show a certificate, a chain or a CSR.
    Inspect(InspectArgs),
    /// Check that a workload's chain verifies to a root, and that its trusted CA is that root.
    Verify(VerifyArgs),
    /// Run the Istio CA server (istiod's CreateCertificate on :15012).
    Server(Box<crate::cmd_server::ServerArgs>),
    /// Mint a token with the standalone server's local key.
    Token(crate::cmd_server::TokenArgs),
    /// Request a certificate from an Istio-compatible CA, as istio-agent does.
    Request(crate::cmd_request::RequestArgs),
    /// Load-test an Istio CA (meshca or istiod) with concurrent clients.
    Loadgen(Box<crate::cmd_loadgen::LoadgenArgs>),
    /// Run the Kubernetes CSR signer controller (the seed's custom CA controller).
    Signer(Box<crate::cmd_signer::SignerArgs>),
    /// Print deployment manifests.
    #[command(subcommand)]
    Manifests(crate::cmd_manifests::ManifestsCommand),
}

#[derive(Subcommand)]
pub enum CaCommand {
    /// Create a self-signed root CA (or an intermediate) in Istio's cacerts layout.
    Init(InitArgs),
    /// Sign a CSR as an Istio workload certificate for the given identities.
    Sign(SignArgs),
}

#[derive(clap::Args)]
pub struct InitArgs {
    /// Directory to write ca-cert.pem, ca-key.pem, cert-chain.pem and root-cert.pem into.
    #[arg(long)]
    pub out: PathBuf,
    /// Key type of the new CA.
    #[arg(long, default_value = "rsa-2048")]
    pub key_type: KeyType,
    /// Organization (O=) of the CA subject; Istio uses the trust domain.
    #[arg(long, default_value = "cluster.local")]
    pub org: String,
    /// Lifetime, e.g. 87600h or 10years.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10years")]
    pub ttl: Duration,
    /// Make an intermediate signed by the CA in this cacerts directory.
    #[arg(long)]
    pub intermediate_of: Option<PathBuf>,
    /// Overwrite existing files.
    #[arg(long)]
    pub force: bool,
}

#[derive(clap::Args)]
pub struct SignArgs {
    /// The CA's cacerts directory (ca-cert.pem, ...) or tls.crt/tls.key/ca.crt directory.
    #[arg(long)]
    pub ca: PathBuf,
    /// The CSR, PEM; `-` reads standard input.
    #[arg(long)]
    pub csr: PathBuf,
    /// An identity to certify (becomes a SAN): spiffe://..., a DNS name or an IP. Repeatable.
    #[arg(long = "identity", required = true)]
    pub identities: Vec<String>,
    /// Requested lifetime; without it Istio's default of 24h applies.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub ttl: Option<Duration>,
    /// Longest lifetime granted; longer requests are refused (Istio's MAX_WORKLOAD_CERT_TTL).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "90days")]
    pub max_ttl: Duration,
}

#[derive(clap::Args)]
pub struct InspectArgs {
    /// A PEM (or DER) certificate, chain or CSR; `-` reads standard input.
    pub file: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args)]
pub struct VerifyArgs {
    /// The root certificate(s) the workload must trust and chain to.
    #[arg(long)]
    pub root: PathBuf,
    /// A PEM chain, leaf first.
    #[arg(
        long,
        conflicts_with = "proxy_secret",
        required_unless_present = "proxy_secret"
    )]
    pub chain: Option<PathBuf>,
    /// The JSON that `istioctl proxy-config secret <pod> -o json` prints.
    #[arg(long)]
    pub proxy_secret: Option<PathBuf>,
}

pub fn parse_and_run() -> ExitCode {
    let args = Args::parse();
    let result = match args.command {
        Command::Ca(CaCommand::Init(a)) => crate::cmd_ca::init(&a),
        Command::Ca(CaCommand::Sign(a)) => crate::cmd_ca::sign(&a),
        Command::Inspect(a) => crate::inspect::run(&a),
        Command::Verify(a) => crate::verify::run(&a),
        Command::Server(a) => crate::cmd_server::server(*a),
        Command::Token(a) => crate::cmd_server::token(&a),
        Command::Request(a) => crate::cmd_request::request(&a),
        Command::Loadgen(a) => crate::cmd_loadgen::loadgen(&a),
        Command::Signer(a) => crate::cmd_signer::signer(*a),
        Command::Manifests(c) => crate::cmd_manifests::run(c),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            // One line: the whole cause chain.
            eprintln!("meshca: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Reads a file, or standard input for `-`.
pub fn read_input(path: &std::path::Path) -> anyhow::Result<Vec<u8>> {
    use anyhow::Context;
    use std::io::Read;
    if path.as_os_str() == "-" {
        let mut buf = Vec::new();
        std::io::stdin()
            .read_to_end(&mut buf)
            .context("reading standard input")?;
        Ok(buf)
    } else {
        std::fs::read(path).with_context(|| format!("reading {}", path.display()))
    }
}
