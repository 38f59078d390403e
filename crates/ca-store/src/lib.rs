//! meshca's CA material, in one home for the server, the signer and `meshca ca`.
//!
//! ```text
//! directory (cacerts or tls.*) ─┐
//! separate files ───────────────┼─> Material ─> CaBundle::load (verified) ─> watch::Receiver<Option<Arc<CaBundle>>>
//! Secret (kubernetes.io/tls,    │                                            (polled files / watched Secret;
//!   istio-ca-secret data) ──────┘                                             a broken update keeps the current CA)
//! ```
//!
//! Every byte of a private key read here is held in a `Zeroizing` buffer.
#![deny(rust_2018_idioms)]
#![forbid(unsafe_code)]

pub mod dir;
pub mod files;
mod material;
pub mod secret;
pub mod source;
pub mod watch;

pub use material::{Material, Part};
pub use source::CaSource;
pub use watch::{CurrentCa, changes, watch};
