//! Test support for meshca's integration tests, on a real kube-apiserver.
//!
//! The control plane comes from `testenv/` at the repository root: real
//! kube-apiserver v1.35.4 and etcd built from their Go modules, started on
//! 127.0.0.1 by `testenv/up`, which exports `KUBECONFIG` and `MESHCA_TESTENV_*`.
//! This crate never starts or fakes a cluster and never skips: without those
//! variables [`TestEnv::get`] panics with the command to run.
//!
//! ```text
//! eval "$(testenv/up)"; cargo test -p meshca-testsupport; testenv/down
//! ```
//!
//! Typical use in an async test (`#[tokio::test]`):
//!
//! ```no_run
//! # async fn t() -> anyhow::Result<()> {
//! use meshca_testsupport::{RbacSpec, TestEnv};
//! let env = TestEnv::get().await;                 // panics with instructions if no testenv
//! let ns = env.namespace("csr").await?;            // unique namespace, cleaned up on drop
//! ns.create_service_account("signer").await?;
//! let signer = ns.identity("signer", &[RbacSpec::Existing("meshca-signer".into())]).await?;
//! let client = signer.client().await?;             // runs with exactly that RBAC
//! let token = ns.token("signer").await?;           // TokenRequest, audience istio-ca
//! # let _ = (client, token); Ok(()) }
//! ```
//!
//! Runtime: every async function here runs on the caller's tokio runtime; each
//! [`TestEnv::get`] builds a fresh admin [`kube::Client`] bound to that runtime,
//! so it is safe to call from many `#[tokio::test]`s. Cleanup in `Drop` runs on a
//! separate thread with its own runtime, so it also works after the test's
//! runtime is gone; call [`TestNamespace::cleanup`] to clean up explicitly and
//! see errors.
//!
//! Where things are (one job per file; everything is re-exported here):
//!
//! - `chart.rs`: the Helm chart rendered by testenv's helm ([`chart::render`]).
//! - `env.rs`: [`TestEnv`] and its settings, paths of the testenv binaries.
//! - `namespace.rs`: [`TestNamespace`], its ServiceAccounts and cleanup.
//! - `node.rs`: [`TestNode`], the real node of `testenv/up node`, and
//!   [`build_image`] (`deploy/image/build`) for the images its pods run.
//! - `tokens.rs`: TokenRequest ([`TokenOptions`]) and [`token_review`].
//! - `rbac.rs`: [`RbacSpec`], [`rule`], grants from a component's RBAC (the chart's).
//! - `identity.rs`: [`Identity`], a ServiceAccount with its RBAC and kubeconfig.
//! - `names.rs`: [`unique_name`] and the label on every object made here.
//! - `process.rs`: [`Proc`] and [`free_port`] for processes a test starts.
//! - `pod_certificates.rs`: pods with a `podCertificate` volume and the
//!   credential bundle the kubelet wrote.
//! - `openssl.rs`: [`openssl`], keys, CSRs and certificates made with the CLI.
//! - `csr.rs`: [`csr`], CertificateSigningRequests created, approved and read.
//! - `monitoring.rs`: [`http_get`] and [`metric`] on a process's `/metrics`.
//! - [`is_not_found`], [`api_status_code`]: `meshca_kube::status`, re-exported.
#![forbid(unsafe_code)]

pub mod chart;
pub mod csr;
mod env;
mod identity;
mod monitoring;
mod names;
mod namespace;
mod node;
pub mod openssl;
pub mod pod_certificates;
mod process;
mod rbac;
pub mod softhsm;
mod tokens;

pub use env::{TestEnv, TestEnvConfig, bin};
pub use identity::{Identity, client_from_kubeconfig};
pub use meshca_kube::status::{code as api_status_code, is_not_found};
pub use monitoring::{http_get, metric};
pub use names::{TESTSUPPORT_LABEL, unique_name};
pub use namespace::TestNamespace;
pub use node::{Image, TestNode, build_image, repo_root};
pub use process::{Proc, free_port};
pub use rbac::{RbacSpec, rule};
pub use tokens::{ISTIO_CA_AUDIENCE, TokenOptions, token_review};
