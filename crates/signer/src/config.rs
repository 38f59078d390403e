//! The signer config file (YAML or JSON): several signers, each with its own
//! CA and policy. The single-signer command-line flags build the same thing.
//!
//! ```yaml
//! signers:
//!   - name: example.com/foo
//!     caSecret: signer-ca-system/signer-ca-keypair   # or caDir: /etc/signer-ca
//!     defaultTTL: 24h
//!     maxTTL: 8760h
//!     trustDomains: [cluster.local]                  # ["*"]: any
//!     subject: empty                                 # empty (default) | copy
//!   - name: example.com/tenant-a
//!     caDir: /etc/tenant-a
//!     trustDomains: [tenant-a.example]
//!   - name: example.com/tenant-b
//!     caCertPath: /etc/tenant-b/tls.crt              # signer-ca's --ca-cert-path
//!     caKeyPath: /etc/tenant-b/tls.key
//!     caRootsPath: /etc/tenant-b/ca.crt              # optional: default the chain's last
//!     podCertificates: {}                            # PodCertificateRequests too (see PodCertificatesSpec)
//! ```

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use meshca_pki::{CsrPolicy, KubernetesProfile, SanPolicy, SubjectRule, TrustDomains, profile};
use serde::Deserialize;

use crate::{CaSource, PodCertPolicy, SignerConfig, SignerPolicy};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub signers: Vec<SignerSpec>,
}

/// One signer in the config file; every policy field has the istiod default.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SignerSpec {
    pub name: String,
    #[serde(default)]
    pub ca_dir: Option<PathBuf>,
    /// `NAMESPACE/NAME` of a kubernetes.io/tls Secret.
    #[serde(default)]
    pub ca_secret: Option<String>,
    /// Separate files (signer-ca's `--ca-cert-path`, `--ca-key-path`).
    #[serde(default)]
    pub ca_cert_path: Option<PathBuf>,
    #[serde(default)]
    pub ca_key_path: Option<PathBuf>,
    #[serde(default)]
    pub ca_roots_path: Option<PathBuf>,
    #[serde(default, rename = "defaultTTL")]
    pub default_ttl: Option<String>,
    #[serde(default, rename = "maxTTL")]
    pub max_ttl: Option<String>,
    #[serde(default)]
    pub include_root: bool,
    #[serde(default = "default_trust_domains")]
    pub trust_domains: Vec<String>,
    #[serde(default = "default_subject")]
    pub subject: String,
    #[serde(default = "one", rename = "minURIs")]
    pub min_uris: usize,
    #[serde(default = "one", rename = "maxURIs")]
    pub max_uris: usize,
    #[serde(default = "yes")]
    pub spiffe_only: bool,
    #[serde(default, rename = "allowDNS")]
    pub allow_dns: bool,
    #[serde(default, rename = "allowIP")]
    pub allow_ip: bool,
    #[serde(default)]
    pub allow_email: bool,
    #[serde(default = "default_usages")]
    pub allowed_usages: Vec<String>,
    /// Sign this signer's PodCertificateRequests too.
    #[serde(default)]
    pub pod_certificates: Option<PodCertificatesSpec>,
}

/// `podCertificates:` of a signer: the PodCertificateRequest path's policy.
///
/// ```yaml
/// podCertificates:
///   trustDomain: cluster.local      # default: the signer's first trustDomains entry
///   maxTTL: 24h                     # longest maxExpirationSeconds accepted
///   keyTypes: [RSA3072, RSA4096, ECDSAP256, ECDSAP384, ED25519]
///   namespaces: []                  # empty: all
///   serviceAccounts: []             # namespace/account or namespace/*; empty: all
///   userAnnotations: []             # unverifiedUserAnnotations keys accepted (ignored)
///   refreshWindow: 50-70            # beginRefreshAt at this share of the lifetime (percent)
/// ```
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PodCertificatesSpec {
    #[serde(default)]
    pub trust_domain: Option<String>,
    #[serde(default, rename = "maxTTL")]
    pub max_ttl: Option<String>,
    #[serde(default)]
    pub key_types: Option<Vec<String>>,
    #[serde(default)]
    pub namespaces: Vec<String>,
    #[serde(default)]
    pub service_accounts: Vec<String>,
    #[serde(default)]
    pub user_annotations: Vec<String>,
    /// `FROM-TO` percent of the lifetime where `beginRefreshAt` falls.
    #[serde(default)]
    pub refresh_window: Option<String>,
}

impl PodCertificatesSpec {
    /// The policy, with `trust_domains` (the CSR path's) for the default.
    pub fn build(&self, signer: &str, trust_domains: &[String]) -> Result<PodCertPolicy> {
        let trust_domain = match &self.trust_domain {
            Some(td) => td.clone(),
            None => trust_domains
                .iter()
                .find(|t| *t != "*")
                .cloned()
                .with_context(|| format!("signer {signer}: podCertificates needs a trustDomain"))?,
        };
        if format!("spiffe://{trust_domain}/ns/a/sa/b")
            .parse::<meshca_pki::SpiffeId>()
            .is_err()
        {
            bail!("signer {signer}: {trust_domain:?} is not a trust domain");
        }
        let mut policy = PodCertPolicy::new(trust_domain);
        if let Some(t) = &self.max_ttl {
            policy.max_ttl = humantime::parse_duration(t)
                .with_context(|| format!("signer {signer}: podCertificates maxTTL {t:?}"))?;
            if policy.max_ttl < crate::pcr::API_MIN_EXPIRATION {
                bail!(
                    "signer {signer}: podCertificates maxTTL must be at least 1h (the API's minimum)"
                );
            }
        }
        if let Some(kinds) = &self.key_types {
            let keys = &mut policy.keys;
            keys.allow_rsa = false;
            keys.allow_p256 = false;
            keys.allow_p384 = false;
            keys.allow_ed25519 = false;
            let (mut rsa_min, mut rsa_max) = (usize::MAX, 0);
            for k in kinds {
                match k.as_str() {
                    "RSA3072" | "RSA4096" => {
                        let bits = if k == "RSA3072" { 3072 } else { 4096 };
                        keys.allow_rsa = true;
                        rsa_min = rsa_min.min(bits);
                        rsa_max = rsa_max.max(bits);
                    }
                    "ECDSAP256" => keys.allow_p256 = true,
                    "ECDSAP384" => keys.allow_p384 = true,
                    "ED25519" => keys.allow_ed25519 = true,
                    other => bail!(
                        "signer {signer}: key type {other:?} is not one of RSA3072, RSA4096, ECDSAP256, ECDSAP384, ED25519"
                    ),
                }
            }
            if keys.allow_rsa {
                keys.rsa_min_bits = rsa_min;
                keys.rsa_max_bits = rsa_max;
            }
        }
        for entry in &self.service_accounts {
            if !entry
                .split_once('/')
                .is_some_and(|(n, a)| !n.is_empty() && !a.is_empty())
            {
                bail!(
                    "signer {signer}: serviceAccounts entry {entry:?} must be namespace/account or namespace/*"
                );
            }
        }
        policy.namespaces = self.namespaces.clone();
        policy.service_accounts = self.service_accounts.clone();
        policy.user_annotations = self.user_annotations.clone();
        if let Some(w) = &self.refresh_window {
            policy.refresh_window = w
                .parse()
                .map_err(|e| anyhow::anyhow!("signer {signer}: podCertificates {e}"))?;
        }
        Ok(policy)
    }
}

fn default_trust_domains() -> Vec<String> {
    vec!["cluster.local".into()]
}
fn default_subject() -> String {
    "empty".into()
}
fn one() -> usize {
    1
}
fn yes() -> bool {
    true
}
fn default_usages() -> Vec<String> {
    profile::ISTIOD_USAGES
        .iter()
        .map(|u| u.to_string())
        .collect()
}

impl SignerSpec {
    /// A spec with every default, for signer `name`.
    pub fn new(name: impl Into<String>) -> Self {
        SignerSpec {
            name: name.into(),
            ca_dir: None,
            ca_secret: None,
            ca_cert_path: None,
            ca_key_path: None,
            ca_roots_path: None,
            default_ttl: None,
            max_ttl: None,
            include_root: false,
            trust_domains: default_trust_domains(),
            subject: default_subject(),
            min_uris: 1,
            max_uris: 1,
            spiffe_only: true,
            allow_dns: false,
            allow_ip: false,
            allow_email: false,
            allowed_usages: default_usages(),
            pod_certificates: None,
        }
    }

    pub fn build(&self) -> Result<SignerConfig> {
        let ctx = || format!("signer {}", self.name);
        validate_signer_name(&self.name).with_context(ctx)?;
        let files = match (&self.ca_cert_path, &self.ca_key_path) {
            (Some(cert), Some(key)) => Some(CaSource::Files {
                cert: cert.clone(),
                key: key.clone(),
                roots: self.ca_roots_path.clone(),
            }),
            (None, None) if self.ca_roots_path.is_none() => None,
            (None, None) => bail!("signer {}: caRootsPath needs caCertPath", self.name),
            _ => bail!("signer {}: caCertPath and caKeyPath go together", self.name),
        };
        let ca = match (&self.ca_dir, &self.ca_secret, files) {
            (Some(d), None, None) => CaSource::Dir(d.clone()),
            (None, Some(s), None) => s.parse().map_err(anyhow::Error::msg).with_context(ctx)?,
            (None, None, Some(files)) => files,
            _ => bail!(
                "signer {}: give exactly one of caDir, caSecret and caCertPath/caKeyPath",
                self.name
            ),
        };
        let parse = |s: &Option<String>, default: Duration| -> Result<Duration> {
            match s {
                None => Ok(default),
                Some(t) => humantime::parse_duration(t)
                    .with_context(|| format!("signer {}: duration {t:?}", self.name)),
            }
        };
        let defaults = KubernetesProfile::default();
        let default_ttl = parse(&self.default_ttl, defaults.default_ttl)?;
        let max_ttl = parse(&self.max_ttl, defaults.max_ttl)?;
        let subject = match self.subject.as_str() {
            "copy" => SubjectRule::CopyFromCsr,
            "empty" => SubjectRule::RequireEmpty,
            other => bail!(
                "signer {}: subject must be copy or empty, not {other:?}",
                self.name
            ),
        };
        let trust_domains = if self.trust_domains.iter().any(|t| t == "*") {
            TrustDomains::Any
        } else {
            TrustDomains::Only(self.trust_domains.clone())
        };
        if self.min_uris > self.max_uris {
            bail!("signer {}: minURIs > maxURIs", self.name);
        }
        let pod_certificates = self
            .pod_certificates
            .as_ref()
            .map(|p| p.build(&self.name, &self.trust_domains))
            .transpose()?;
        Ok(SignerConfig {
            policy: SignerPolicy {
                name: self.name.clone(),
                profile: KubernetesProfile {
                    default_ttl,
                    max_ttl,
                    subject,
                    sans: SanPolicy {
                        min_uris: self.min_uris,
                        max_uris: self.max_uris,
                        spiffe_only: self.spiffe_only,
                        trust_domains,
                        allow_dns: self.allow_dns,
                        allow_ip: self.allow_ip,
                        allow_email: self.allow_email,
                    },
                    allowed_usages: self.allowed_usages.clone(),
                },
                csr_policy: CsrPolicy::default(),
                include_root: self.include_root,
                pod_certificates,
            },
            ca,
        })
    }
}

/// `<domain>/<path>`; the `kubernetes.io` domain belongs to the built-in signers.
pub fn validate_signer_name(name: &str) -> Result<()> {
    let Some((domain, path)) = name.split_once('/') else {
        bail!("signer name {name:?} must be <domain>/<path>");
    };
    if domain.is_empty() || path.is_empty() || !domain.contains('.') {
        bail!("signer name {name:?} must be <domain>/<path> with a DNS domain");
    }
    if domain == "kubernetes.io" || domain.ends_with(".kubernetes.io") {
        bail!("signer name {name:?}: kubernetes.io signers are kube-controller-manager's");
    }
    Ok(())
}

/// Reads a config file (YAML, or JSON which is YAML).
pub fn load(path: &std::path::Path) -> Result<Vec<SignerConfig>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    parse(&text).with_context(|| format!("in {}", path.display()))
}

pub fn parse(text: &str) -> Result<Vec<SignerConfig>> {
    let file: ConfigFile = serde_saphyr::from_str(text).context("parsing the signer config")?;
    if file.signers.is_empty() {
        bail!("no signers");
    }
    let mut names = std::collections::BTreeSet::new();
    let mut out = Vec::new();
    for s in &file.signers {
        if !names.insert(s.name.clone()) {
            bail!("signer {} is configured twice", s.name);
        }
        out.push(s.build()?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_several_signers_with_defaults() {
        let signers = parse(
            "signers:\n\
             - name: example.com/foo\n  caSecret: ns/secret\n\
             - name: example.com/bar\n  caDir: /etc/bar\n  maxTTL: 2h\n  trustDomains: ['*']\n  subject: copy\n  includeRoot: true\n",
        )
        .unwrap();
        assert_eq!(signers.len(), 2);
        assert_eq!(signers[0].policy, SignerPolicy::istiod("example.com/foo"));
        // The safe default: no subject is copied into certificates.
        assert_eq!(signers[0].policy.profile.subject, SubjectRule::RequireEmpty);
        assert_eq!(
            signers[0].ca,
            CaSource::Secret {
                namespace: "ns".into(),
                name: "secret".into()
            }
        );
        let bar = &signers[1].policy;
        assert_eq!(bar.profile.max_ttl, Duration::from_secs(7200));
        assert_eq!(bar.profile.sans.trust_domains, TrustDomains::Any);
        assert_eq!(bar.profile.subject, SubjectRule::CopyFromCsr);
        assert!(bar.include_root);
    }

    #[test]
    fn ca_from_separate_files() {
        let signers = parse(
            "signers:\n\
             - name: example.com/foo\n  caCertPath: /ca/tls.crt\n  caKeyPath: /ca/tls.key\n\
             - name: example.com/bar\n  caCertPath: /b/c.pem\n  caKeyPath: /b/k.pem\n  caRootsPath: /b/r.pem\n",
        )
        .unwrap();
        assert_eq!(
            signers[0].ca,
            CaSource::Files {
                cert: "/ca/tls.crt".into(),
                key: "/ca/tls.key".into(),
                roots: None
            }
        );
        assert_eq!(
            signers[1].ca,
            CaSource::Files {
                cert: "/b/c.pem".into(),
                key: "/b/k.pem".into(),
                roots: Some("/b/r.pem".into())
            }
        );
    }

    #[test]
    fn pod_certificates_per_signer() {
        let signers = parse(
            "signers:\n\
             - name: example.com/foo\n  caDir: /a\n  trustDomains: [mesh.example]\n  podCertificates: {}\n\
             - name: example.com/bar\n  caDir: /b\n  podCertificates:\n    trustDomain: bar.example\n    maxTTL: 48h\n    keyTypes: [ECDSAP256, RSA4096]\n    serviceAccounts: [shop/*]\n    userAnnotations: [example.com/tier]\n\
             - name: example.com/baz\n  caDir: /c\n",
        )
        .unwrap();
        let foo = signers[0].policy.pod_certificates.as_ref().unwrap();
        assert_eq!(
            foo.trust_domain, "mesh.example",
            "the CSR path's trust domain"
        );
        assert_eq!(foo.max_ttl, Duration::from_secs(86400));
        assert_eq!(foo.keys, meshca_pki::pod_key::pod_key_policy());
        let bar = signers[1].policy.pod_certificates.as_ref().unwrap();
        assert_eq!(bar.trust_domain, "bar.example");
        assert_eq!(bar.max_ttl, Duration::from_secs(2 * 86400));
        assert!(bar.keys.allow_p256 && !bar.keys.allow_p384 && !bar.keys.allow_ed25519);
        assert_eq!((bar.keys.rsa_min_bits, bar.keys.rsa_max_bits), (4096, 4096));
        assert_eq!(bar.service_accounts, ["shop/*"]);
        assert_eq!(bar.user_annotations, ["example.com/tier"]);
        assert!(signers[2].policy.pod_certificates.is_none());
        for (text, needle) in [
            ("keyTypes: [DSA]", "not one of"),
            ("maxTTL: 30m", "at least 1h"),
            ("serviceAccounts: [shop]", "namespace/account"),
            ("trustDomain: \"a b\"", "not a trust domain"),
        ] {
            let cfg = format!(
                "signers:\n- name: example.com/foo\n  caDir: /a\n  podCertificates:\n    {text}\n"
            );
            let err = format!("{:#}", parse(&cfg).unwrap_err());
            assert!(err.contains(needle), "{text}: {err}");
        }
    }

    #[test]
    fn refuses_bad_configs() {
        for (text, needle) in [
            ("signers: []", "no signers"),
            (
                "signers:\n- name: example.com/foo\n",
                "exactly one of caDir",
            ),
            (
                "signers:\n- name: example.com/foo\n  caDir: /a\n  caSecret: a/b\n",
                "exactly one",
            ),
            (
                "signers:\n- name: example.com/foo\n  caDir: /a\n  caCertPath: /c\n  caKeyPath: /k\n",
                "exactly one",
            ),
            (
                "signers:\n- name: example.com/foo\n  caCertPath: /c\n",
                "caCertPath and caKeyPath go together",
            ),
            (
                "signers:\n- name: example.com/foo\n  caKeyPath: /k\n",
                "caCertPath and caKeyPath go together",
            ),
            (
                "signers:\n- name: example.com/foo\n  caDir: /a\n  caRootsPath: /r\n",
                "caRootsPath needs caCertPath",
            ),
            ("signers:\n- name: foo\n  caDir: /a\n", "<domain>/<path>"),
            (
                "signers:\n- name: kubernetes.io/kubelet-serving\n  caDir: /a\n",
                "kube-controller-manager",
            ),
            (
                "signers:\n- name: example.com/foo\n  caSecret: nons\n",
                "NAMESPACE/NAME",
            ),
            (
                "signers:\n- name: example.com/foo\n  caDir: /a\n  subject: keep\n",
                "copy or empty",
            ),
            (
                "signers:\n- name: example.com/foo\n  caDir: /a\n  maxTTL: forever\n",
                "duration",
            ),
            (
                "signers:\n- name: example.com/foo\n  caDir: /a\n  colour: red\n",
                "colour",
            ),
            (
                "signers:\n- name: example.com/foo\n  caDir: /a\n- name: example.com/foo\n  caDir: /b\n",
                "twice",
            ),
        ] {
            let e = format!("{:#}", parse(text).unwrap_err());
            assert!(e.contains(needle), "{text:?}: {e}");
        }
    }
}
