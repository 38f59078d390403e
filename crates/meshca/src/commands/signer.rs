//! `meshca signer`: the Kubernetes CSR signer controller (flags and wiring;
//! the controller is the meshca-signer crate).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Result, bail};
use meshca_signer::config::{PodCertificatesSpec, SignerSpec};
use meshca_signer::{CleanerConfig, Config, SignerConfig, TrustBundleTarget};

use super::common::{KubeArgs, LeaderElectionArgs, LogArgs, instance_name, monitoring_addr};
use crate::duration::parse_duration;

#[derive(clap::Args)]
pub struct SignerArgs {
    /// Signer name to sign for (repeatable; each gets the same CA and policy).
    /// Use --config for several signers with their own CA and policy.
    #[arg(
        long = "signer-name",
        env = "SIGNER_NAME",
        value_delimiter = ',',
        default_value = "example.com/foo"
    )]
    pub signer_names: Vec<String>,
    /// A YAML/JSON file with several signers, each with its own CA and policy
    /// (see the meshca-signer crate docs); replaces the single-signer flags.
    #[arg(long, conflicts_with_all = ["ca_dir", "ca_secret", "ca_cert_path"])]
    pub config: Option<PathBuf>,
    /// CA directory: Istio's cacerts layout or tls.crt/tls.key[/ca.crt]; polled for changes.
    #[arg(long, env = "SIGNER_CA_DIR", conflicts_with = "ca_secret")]
    pub ca_dir: Option<PathBuf>,
    /// CA Secret NAMESPACE/NAME (kubernetes.io/tls: tls.crt, tls.key, optional ca.crt); watched.
    #[arg(long, env = "SIGNER_CA_SECRET", conflicts_with = "ca_cert_path")]
    pub ca_secret: Option<String>,
    /// signer-ca's flags: the signing certificate (intermediates may follow) ...
    #[arg(long, requires = "ca_key_path", conflicts_with = "ca_dir")]
    pub ca_cert_path: Option<PathBuf>,
    /// ... and its key; polled for changes.
    #[arg(long, requires = "ca_cert_path")]
    pub ca_key_path: Option<PathBuf>,
    /// Roots for --ca-cert-path (default: the last certificate of its chain).
    #[arg(long, requires = "ca_cert_path")]
    pub ca_roots_path: Option<PathBuf>,
    /// Lifetime when a CSR has no spec.expirationSeconds.
    #[arg(long, value_parser = parse_duration, default_value = "24h")]
    pub certificate_duration: Duration,
    /// Longest lifetime; longer requests are shortened (kube-controller-manager semantics).
    #[arg(long, value_parser = parse_duration, default_value = "8760h")]
    pub max_certificate_duration: Duration,
    /// Trust domains SPIFFE URI SANs may name (comma separated; `*` for any).
    #[arg(long, value_delimiter = ',', default_value = "cluster.local")]
    pub trust_domains: Vec<String>,
    /// Subject of issued certificates: `empty` (CSRs with a subject other
    /// than Istio's empty `O=` are refused) or `copy` (the CSR's, byte for
    /// byte: only where nothing trusts this CA by subject, e.g. not as an
    /// apiserver client CA).
    #[arg(long, default_value = "empty", value_parser = ["empty", "copy"])]
    pub subject: String,
    /// Also allow DNS SANs.
    #[arg(long)]
    pub allow_dns_sans: bool,
    /// Append the root(s) to status.certificate after the intermediates.
    #[arg(long)]
    pub include_root: bool,
    #[command(flatten)]
    pub kube: KubeArgs,
    /// CSRs processed at once per signer. kube-rs has no client-side QPS
    /// limiter (client-go's 5/10 defaults do not apply): this is the throttle.
    #[arg(long, default_value_t = 64)]
    pub concurrency: u16,
    /// How often --ca-dir is checked for changes.
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    pub ca_poll_interval: Duration,
    /// Namespace of istiod's trust bundle Secret.
    #[arg(long, default_value = "istio-system")]
    pub trust_bundle_namespace: String,
    /// Name of the trust bundle Secret (key root-cert.pem).
    #[arg(long, default_value = "external-ca-cert")]
    pub trust_bundle_name: String,
    /// Do not publish the roots.
    #[arg(long)]
    pub no_trust_bundle: bool,
    /// Leader election is on by default (--no-leader-election turns it
    /// off); kept so older manifests with `--leader-elect` still start.
    #[arg(long, hide = true)]
    pub leader_elect: bool,
    #[command(flatten)]
    pub leader_election: LeaderElectionArgs,
    #[arg(long, env = "POD_NAMESPACE", default_value = "signer-ca-system")]
    pub leader_election_namespace: String,
    #[arg(long, default_value = "signer-ca-leader")]
    pub leader_election_lease: String,
    /// Do not delete old CSRs of our signers (kube-controller-manager's ages).
    #[arg(long)]
    pub no_cleaner: bool,
    /// /healthz, /readyz and /metrics; `none` turns it off.
    #[arg(
        long,
        env = "MESHCA_MONITORING_LISTEN",
        default_value = "127.0.0.1:8443"
    )]
    pub monitoring_listen: String,
    /// Do not publish Kubernetes Events.
    #[arg(long)]
    pub no_events: bool,
    /// Also sign PodCertificateRequests (certificates.k8s.io/v1beta1) of the
    /// signer names: pods get spiffe://<trust domain>/ns/<ns>/sa/<account>
    /// through a `podCertificate` projected volume.
    #[arg(long, env = "MESHCA_POD_CERTIFICATES")]
    pub pod_certificates: bool,
    /// Trust domain of pod certificates (default: the first --trust-domains).
    #[arg(long)]
    pub pod_certificate_trust_domain: Option<String>,
    /// Longest pod certificate lifetime; a larger maxExpirationSeconds is Denied.
    #[arg(long, default_value = "24h")]
    pub pod_certificate_max_duration: String,
    /// Key types pod certificates may have (RSA3072, RSA4096, ECDSAP256,
    /// ECDSAP384, ED25519); default all of them.
    #[arg(long, value_delimiter = ',')]
    pub pod_certificate_key_types: Option<Vec<String>>,
    /// Namespaces whose pods may get one (default: all).
    #[arg(long, value_delimiter = ',')]
    pub pod_certificate_namespaces: Vec<String>,
    /// namespace/account (or namespace/*) that may get one (default: all).
    #[arg(long, value_delimiter = ',')]
    pub pod_certificate_service_accounts: Vec<String>,
    /// unverifiedUserAnnotations keys accepted (and ignored); others are Denied.
    #[arg(long, value_delimiter = ',')]
    pub pod_certificate_user_annotations: Vec<String>,
    /// Where beginRefreshAt falls, in percent of the lifetime (FROM-TO, a
    /// point chosen per request); at least 10 minutes from either end, so
    /// `0` asks the kubelet to refresh as early as the API allows.
    #[arg(long, default_value = "50-70")]
    pub pod_certificate_refresh_window: String,
    /// Publish each signer's roots as ClusterTrustBundle
    /// <signer name with / as :>:roots (on by default with --pod-certificates).
    #[arg(long)]
    pub cluster_trust_bundle: bool,
    /// Do not publish ClusterTrustBundles.
    #[arg(long, conflicts_with = "cluster_trust_bundle")]
    pub no_cluster_trust_bundle: bool,
    #[command(flatten)]
    pub log: LogArgs,
    #[command(flatten)]
    pub pkcs11: crate::commands::common::Pkcs11Args,
}

fn signers(args: &SignerArgs) -> Result<Vec<SignerConfig>> {
    if let Some(path) = &args.config {
        return meshca_signer::config::load(path);
    }
    if args.ca_dir.is_none() && args.ca_secret.is_none() && args.ca_cert_path.is_none() {
        bail!(
            "give the CA with --ca-dir, --ca-secret NAMESPACE/NAME or --ca-cert-path/--ca-key-path (or use --config)"
        );
    }
    args.signer_names
        .iter()
        .map(|name| {
            let mut spec = SignerSpec::new(name.clone());
            spec.ca_dir = args.ca_dir.clone();
            spec.ca_secret = args.ca_secret.clone();
            spec.ca_cert_path = args.ca_cert_path.clone();
            spec.ca_key_path = args.ca_key_path.clone();
            spec.ca_roots_path = args.ca_roots_path.clone();
            spec.include_root = args.include_root;
            spec.trust_domains = args.trust_domains.clone();
            spec.subject = args.subject.clone();
            spec.allow_dns = args.allow_dns_sans;
            if args.pod_certificates {
                spec.pod_certificates = Some(PodCertificatesSpec {
                    trust_domain: args.pod_certificate_trust_domain.clone(),
                    max_ttl: Some(args.pod_certificate_max_duration.clone()),
                    key_types: args.pod_certificate_key_types.clone(),
                    namespaces: args.pod_certificate_namespaces.clone(),
                    service_accounts: args.pod_certificate_service_accounts.clone(),
                    user_annotations: args.pod_certificate_user_annotations.clone(),
                    refresh_window: Some(args.pod_certificate_refresh_window.clone()),
                });
            }
            let mut signer = spec.build()?;
            signer.policy.profile.default_ttl = args.certificate_duration;
            signer.policy.profile.max_ttl = args.max_certificate_duration;
            Ok(signer)
        })
        .collect()
}

pub fn signer(args: SignerArgs) -> Result<ExitCode> {
    args.log.init();
    args.pkcs11.apply();
    let signers = signers(&args)?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        let client = meshca_kube::client::required(args.kube.kubeconfig.as_deref()).await?;
        let instance = instance_name();
        let mut config = Config::new(signers);
        config.concurrency = args.concurrency.max(1);
        config.ca_poll_interval = args.ca_poll_interval;
        config.events = !args.no_events;
        config.instance = Some(instance);
        config.monitoring_listen = monitoring_addr(&args.monitoring_listen)?;
        if !args.no_trust_bundle {
            config.trust_bundle = Some(TrustBundleTarget {
                namespace: args.trust_bundle_namespace.clone(),
                name: args.trust_bundle_name.clone(),
                ..Default::default()
            });
        }
        config.leader_election = args
            .leader_election
            .election(&args.leader_election_namespace, &args.leader_election_lease);
        if !args.no_cleaner {
            config.cleaner = Some(CleanerConfig::default());
        }
        let any_pod_certificates = config
            .signers
            .iter()
            .any(|s| s.policy.pod_certificates.is_some());
        config.cluster_trust_bundles =
            args.cluster_trust_bundle || (any_pod_certificates && !args.no_cluster_trust_bundle);
        let names: Vec<String> = config
            .signers
            .iter()
            .map(|s| s.policy.name.clone())
            .collect();
        let mut running = meshca_signer::start(client, config).await?;
        if let Some(addr) = running.monitoring_addr {
            tracing::info!(%addr, "monitoring: /healthz /readyz /metrics");
        }
        tracing::info!(signers = ?names, "meshca signer started");
        let shutdown = meshca_kube::shutdown::on_signals();
        tokio::select! {
            result = running.stopped() => return result,
            _ = shutdown.cancelled() => {}
        }
        tracing::info!("shutting down: finishing in-flight CSRs");
        running.shutdown().await
    })?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use meshca_signer::CaSource;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: SignerArgs,
    }

    #[test]
    fn ca_cert_path_and_ca_key_path_flags_give_a_files_ca() {
        let cli = Cli::try_parse_from([
            "signer",
            "--ca-cert-path",
            "/ca/tls.crt",
            "--ca-key-path",
            "/ca/tls.key",
            "--ca-roots-path",
            "/ca/ca.crt",
        ])
        .unwrap();
        let signers = signers(&cli.args).unwrap();
        assert_eq!(signers.len(), 1);
        assert_eq!(
            signers[0].ca,
            CaSource::Files {
                cert: "/ca/tls.crt".into(),
                key: "/ca/tls.key".into(),
                roots: Some("/ca/ca.crt".into()),
            }
        );
    }
}
