//! Kubernetes glue shared by `meshca server` and `meshca signer`, each piece once.
//!
//! - [`client`]: the client from a kubeconfig, `KUBECONFIG` or the pod's account.
//! - [`lease`]: leader election on a `coordination.k8s.io/v1` Lease.
//! - [`apply`]: server-side apply of the objects meshca owns.
//! - [`cluster_trust_bundle`]: the ClusterTrustBundles meshca publishes (name, object, plan).
//! - [`api_limit`]: a fair bound (and a timeout) on API calls in flight.
//! - [`status`]: what a `kube::Error` means (conflict, not found, forbidden).
//! - [`watch_backoff`]: how soon a broken watch on the request path retries.
//! - [`last_error`]: retry loops log a failure when it starts or changes.
//! - [`monitoring`]: `/healthz`, `/readyz` and `/metrics`.
//! - [`shutdown`]: one `CancellationToken`, cancelled on SIGTERM or Ctrl-C.
//! - `mock` (feature `mock`): a scripted API server for tests without a cluster.
#![deny(rust_2018_idioms)]
#![forbid(unsafe_code)]

pub mod api_limit;
pub mod apply;
pub mod client;
pub mod cluster_trust_bundle;
pub mod last_error;
pub mod lease;
#[cfg(feature = "mock")]
pub mod mock;
pub mod monitoring;
pub mod shutdown;
pub mod status;
pub mod watch_backoff;

pub use api_limit::{ApiBusy, ApiLimit};
pub use last_error::LastError;
pub use lease::{Elector, LeaderElection};
pub use tokio_util::sync::CancellationToken;
pub use watch_backoff::WatchBackoff;
