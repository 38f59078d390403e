//! meshca: a certificate authority for Istio service meshes and Kubernetes.
#![deny(rust_2018_idioms)]
#![forbid(unsafe_code)]

mod cadir;
mod cli;
mod cmd_ca;
mod inspect;
mod verify;

fn main() -> std::process::ExitCode {
    cli::parse_and_run()
}
