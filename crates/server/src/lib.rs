//! meshca's Istio CA server: istiod's `CreateCertificate` on :15012.
//!
//! A request flows through the folders in order:
//!
//! ```text
//! grpc/      TLS accept (tls) -> CaService::create_certificate (service)
//! auth/      client certificate | TokenReview (cached) | local JWT keys -> Caller;
//!            ztunnel's ImpersonatedIdentity checked against a pod index (impersonation)
//! backend/   Backend::sign: local (meshca_pki::LocalCa over the current CA)
//!            or ra/ (the Kubernetes CSR API, as istiod in RA mode)
//!            -> Istio's chain layout, or a refusal with a stable reason
//! ```
//!
//! Beside the requests: `ca/` opens the CA (plugged-in `cacerts`, Secret
//! `istio-ca-secret` with Istio's root rotation, or a self-signed one in the
//! state directory) and keeps the CA, the RA roots and the serving
//! certificate current; `distribution/` keeps the roots in every namespace
//! and the ClusterTrustBundle (leader-elected); [`metrics`] are istiod's
//! `citadel_server_*`. [`Server::build`] wires it all; [`Server::serve`] runs
//! it until the shutdown token is cancelled.
#![deny(rust_2018_idioms)]
#![forbid(unsafe_code)]

pub mod auth;
pub mod backend;
pub mod ca;
mod config;
pub mod distribution;
pub mod grpc;
pub mod metrics;
mod server;
#[cfg(test)]
mod test_ca;

pub use config::{Limits, ServerConfig};
pub use server::{Server, Started};
