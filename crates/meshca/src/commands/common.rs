//! Argument groups shared by the long-running commands (`server`, `signer`),
//! flattened into each so both spell them the same way.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use meshca_kube::LeaderElection;

use crate::duration::parse_duration;

/// Where the Kubernetes client comes from.
#[derive(clap::Args, Debug, Clone)]
pub struct KubeArgs {
    /// Kubeconfig file; without it, the pod's service account (in a pod).
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
}

/// Where CA keys named by a `pkcs11:` URI live (a key file, Secret key or
/// `--pkcs11` value holding the URI). The PIN is never a flag value.
#[derive(clap::Args, Debug, Clone)]
pub struct Pkcs11Args {
    /// PKCS#11 module (shared library) for keys named by a `pkcs11:` URI
    /// without `module-path=`, e.g. /usr/lib/softhsm/libsofthsm2.so.
    #[arg(long, env = "MESHCA_PKCS11_MODULE")]
    pub pkcs11_module: Option<PathBuf>,
    /// File holding the token's user PIN. Without it the PIN is read from
    /// the environment variable MESHCA_PKCS11_PIN.
    #[arg(long, env = "MESHCA_PKCS11_PIN_FILE")]
    pub pkcs11_pin_file: Option<PathBuf>,
}

impl Pkcs11Args {
    /// Makes these the process-wide defaults (before any CA is loaded).
    pub fn apply(&self) {
        meshca_hsm::set_defaults(meshca_hsm::Defaults {
            module: self.pkcs11_module.clone(),
            pin: match &self.pkcs11_pin_file {
                Some(path) => meshca_hsm::PinSource::File(path.clone()),
                None => meshca_hsm::PinSource::Env(meshca_hsm::PIN_ENV.into()),
            },
        });
    }
}

/// Logging.
#[derive(clap::Args, Debug, Clone)]
pub struct LogArgs {
    /// Log as JSON lines.
    #[arg(long)]
    pub json_logs: bool,
}

impl LogArgs {
    pub fn init(&self) {
        crate::logging::init(self.json_logs);
    }
}

/// Leader election: on by default (the Helm chart runs replicas), one opt-out.
#[derive(clap::Args, Debug, Clone)]
pub struct LeaderElectionArgs {
    /// Run without a Lease (one replica, or no Lease RBAC): this replica always leads.
    #[arg(long, env = "MESHCA_NO_LEADER_ELECTION")]
    pub no_leader_election: bool,
    /// The Lease's duration; renewals and retries follow client-go's proportions.
    #[arg(long, value_parser = parse_duration, default_value = "15s")]
    pub leader_election_lease_duration: Duration,
}

impl LeaderElectionArgs {
    /// The election on Lease `namespace/lease`, unless opted out.
    pub fn election(&self, namespace: &str, lease: &str) -> Option<LeaderElection> {
        (!self.no_leader_election).then(|| {
            LeaderElection::new(namespace, lease, &instance_name())
                .with_lease_duration(self.leader_election_lease_duration)
        })
    }
}

/// This replica's name: the pod name, else host and process id.
pub fn instance_name() -> String {
    let env = |k| std::env::var(k).ok().filter(|v: &String| !v.is_empty());
    env("POD_NAME").unwrap_or_else(|| {
        let host = env("HOSTNAME").unwrap_or_else(|| "meshca".into());
        format!("{host}-{}", std::process::id())
    })
}

/// `--monitoring-listen`: an address, or `none`.
pub fn monitoring_addr(value: &str) -> Result<Option<std::net::SocketAddr>> {
    match value {
        "none" | "" => Ok(None),
        addr => Ok(Some(addr.parse().context("--monitoring-listen")?)),
    }
}
