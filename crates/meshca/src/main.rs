//! meshca: a certificate authority for Istio service meshes and Kubernetes.
#![deny(rust_2018_idioms)]
#![forbid(unsafe_code)]

mod cli;
mod cmd_ca;
mod cmd_loadgen;
mod cmd_manifests;
mod cmd_request;
mod cmd_server;
mod cmd_signer;
mod duration;
mod inspect;
mod logging;
mod process;
mod verify;

fn main() -> std::process::ExitCode {
    // One crypto provider for every TLS user in the process: aws-lc-rs.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    cli::parse_and_run()
}
