//! meshca: a certificate authority for Istio service meshes and Kubernetes.
#![deny(rust_2018_idioms)]
#![forbid(unsafe_code)]

mod cli;
mod commands;
mod duration;
mod input;
mod logging;

fn main() -> std::process::ExitCode {
    // One crypto provider for every TLS user in the process: aws-lc-rs.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    cli::parse_and_run()
}
