//! The command line: one subcommand per file in `commands/`.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::commands::{ca, inspect, loadgen, request, server, signer, token, verify};

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
    Ca(ca::CaCommand),
    /// Show a certificate, a chain or a CSR.
    Inspect(inspect::InspectArgs),
    /// Check that a workload's chain verifies to a root, and that its trusted CA is that root.
    Verify(verify::VerifyArgs),
    /// Run the Istio CA server (istiod's CreateCertificate on :15012).
    Server(Box<server::ServerArgs>),
    /// Mint a token with the standalone server's local key.
    Token(token::TokenArgs),
    /// Request a certificate from an Istio-compatible CA, as istio-agent does.
    Request(request::RequestArgs),
    /// Load-test an Istio CA (meshca or istiod) with concurrent clients.
    Loadgen(Box<loadgen::LoadgenArgs>),
    /// Run the Kubernetes CSR signer controller (the seed's custom CA controller).
    Signer(Box<signer::SignerArgs>),
}

pub fn parse_and_run() -> ExitCode {
    let result = match Args::parse().command {
        Command::Ca(ca::CaCommand::Init(a)) => ca::init(&a),
        Command::Ca(ca::CaCommand::Sign(a)) => ca::sign(&a),
        Command::Inspect(a) => inspect::run(&a),
        Command::Verify(a) => verify::run(&a),
        Command::Server(a) => server::run(*a),
        Command::Token(a) => token::token(&a),
        Command::Request(a) => request::request(&a),
        Command::Loadgen(a) => loadgen::loadgen(&a),
        Command::Signer(a) => signer::signer(*a),
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
