//! Client certificates: which issuers meshca accepts them from, and the one
//! identity a certificate may carry.
//!
//! rustls verifies the chain to the CA's roots during the handshake. That
//! alone would trust every CA under those roots, so a certificate
//! authenticates only when, in addition:
//! - this server's signing certificate signed the leaf, or a signing
//!   certificate it rotated away from, for as long as a leaf that one issued
//!   can still be valid;
//! - the leaf names exactly one SPIFFE URI SAN, in the server's trust
//!   domain. DNS and IP SANs are never identities.

use std::sync::RwLock;
use std::time::Duration;

use anyhow::{Result, anyhow, bail};
use meshca_pki::{CaBundle, SpiffeId};
use time::OffsetDateTime;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

/// How many replaced signing certificates are kept at most (each CA change
/// adds one; they leave when their last leaf has expired).
const MAX_PREVIOUS: usize = 8;

/// A signing certificate whose leaves authenticate.
#[derive(Clone)]
struct Issuer {
    cert_der: Vec<u8>,
    roots_der: Vec<Vec<u8>>,
    /// `None` while current; once replaced, when the last leaf it can have
    /// issued expires.
    until: Option<OffsetDateTime>,
    not_after: OffsetDateTime,
}

impl Issuer {
    fn of(bundle: &CaBundle) -> Self {
        Issuer {
            cert_der: bundle.signing_cert_der().to_vec(),
            roots_der: bundle.roots_der().to_vec(),
            until: None,
            not_after: bundle.not_after(),
        }
    }

    fn accepted(&self, now: OffsetDateTime) -> bool {
        self.until.is_none_or(|until| now < until)
    }
}

/// The signing certificates whose leaves authenticate as client
/// certificates: the current one and those it replaced, each until the
/// last leaf it can have issued (at most `max_leaf_ttl` after the change,
/// never after its own expiry) has expired.
pub struct ClientCertIssuers {
    /// The current issuer first.
    issuers: RwLock<Vec<Issuer>>,
    max_leaf_ttl: Duration,
}

impl ClientCertIssuers {
    /// `max_leaf_ttl`: the longest workload certificate the CA issues
    /// (MAX_WORKLOAD_CERT_TTL).
    pub fn new(current: Option<&CaBundle>, max_leaf_ttl: Duration) -> Self {
        ClientCertIssuers {
            issuers: RwLock::new(current.map(Issuer::of).into_iter().collect()),
            max_leaf_ttl,
        }
    }

    /// The CA is now `bundle`. A signing certificate it replaces stays
    /// accepted until its last leaf has expired.
    pub fn rotate(&self, bundle: &CaBundle, now: OffsetDateTime) {
        let mut issuers = self.issuers.write().unwrap_or_else(|e| e.into_inner());
        let next = Issuer::of(bundle);
        let mut kept: Vec<Issuer> = Vec::with_capacity(issuers.len() + 1);
        kept.push(next.clone());
        for mut old in issuers.drain(..) {
            if old.cert_der == next.cert_der {
                continue;
            }
            if old.until.is_none() {
                old.until = Some((now + self.max_leaf_ttl).min(old.not_after));
            }
            if old.accepted(now) && kept.len() <= MAX_PREVIOUS {
                kept.push(old);
            }
        }
        *issuers = kept;
    }

    /// Every root the TLS verifier trusts for client chains: those of the
    /// accepted signing certificates.
    pub fn roots(&self, now: OffsetDateTime) -> Vec<Vec<u8>> {
        let issuers = self.issuers.read().unwrap_or_else(|e| e.into_inner());
        let mut roots: Vec<Vec<u8>> = Vec::new();
        for issuer in issuers.iter().filter(|i| i.accepted(now)) {
            for root in &issuer.roots_der {
                if !roots.contains(root) {
                    roots.push(root.clone());
                }
            }
        }
        roots
    }

    /// Whether an accepted signing certificate signed `leaf` (name, key
    /// and signature; the leaf valid now, for client authentication).
    pub fn check(&self, leaf: &[u8], now: OffsetDateTime) -> Result<()> {
        let issuers: Vec<Issuer> = self
            .issuers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|i| i.accepted(now))
            .cloned()
            .collect();
        let unix = rustls_pki_types::UnixTime::since_unix_epoch(Duration::from_secs(
            u64::try_from(now.unix_timestamp()).unwrap_or(0),
        ));
        let mut errors = Vec::new();
        for issuer in &issuers {
            // The signing certificate as the trust anchor: the path must end
            // in it, so its key signed the leaf. rustls has already checked
            // the rest of the chain up to a root.
            match meshca_pki::chain::verify_chain(
                leaf,
                &[],
                std::slice::from_ref(&issuer.cert_der),
                unix,
            ) {
                Ok(()) => return Ok(()),
                Err(e) => errors.push(e),
            }
        }
        if issuers.is_empty() {
            bail!(
                "the CA is not ready: no signing certificate to check a client certificate against"
            );
        }
        bail!(
            "client certificate not issued by this CA's signing certificate{}: {}",
            if issuers.len() > 1 {
                " or one it rotated from"
            } else {
                ""
            },
            errors.join("; ")
        )
    }
}

/// The one identity of a client certificate: its only SPIFFE URI SAN, in
/// `trust_domain`. DNS, IP and other URI SANs are not identities; zero or
/// several SPIFFE URIs, or one in another trust domain, is an error.
pub fn certificate_identity(der: &[u8], trust_domain: &str) -> Result<String> {
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der)
        .map_err(|e| anyhow!("client certificate: {e}"))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| anyhow!("client certificate SAN: {e}"))?;
    let spiffe: Vec<&str> = san
        .iter()
        .flat_map(|san| san.value.general_names.iter())
        .filter_map(|name| match name {
            // The scheme is case-insensitive: `SPIFFE://` counts (and fails
            // the SPIFFE ID check below), it does not slip past the count.
            GeneralName::URI(u)
                if u.get(..9)
                    .is_some_and(|s| s.eq_ignore_ascii_case("spiffe://")) =>
            {
                Some(*u)
            }
            _ => None,
        })
        .collect();
    let [uri] = spiffe.as_slice() else {
        bail!(
            "client certificate has {} SPIFFE URI SANs, not exactly one (DNS and IP SANs are never identities)",
            spiffe.len()
        );
    };
    let id: SpiffeId = uri
        .parse()
        .map_err(|e: String| anyhow!("client certificate URI SAN: {e}"))?;
    if id.trust_domain() != trust_domain {
        bail!(
            "client certificate identity {uri:?} is in trust domain {:?}, this CA serves {trust_domain:?}",
            id.trust_domain()
        );
    }
    Ok(id.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshca_pki::cert::{self, Extensions, TbsFields};
    use meshca_pki::{KeyType, SanEntry, SigningKey};

    fn leaf_with(sans: &[SanEntry]) -> Vec<u8> {
        let key = SigningKey::generate(KeyType::EcdsaP256).unwrap();
        let mut extensions = Extensions::default();
        if !sans.is_empty() {
            extensions.subject_alt_names(sans, true).unwrap();
        }
        let now = OffsetDateTime::now_utc();
        cert::sign_certificate(
            &key,
            &TbsFields {
                serial: &cert::random_serial().unwrap(),
                issuer_der: cert::EMPTY_NAME,
                not_before: now,
                not_after: now + Duration::from_secs(60),
                subject_der: cert::EMPTY_NAME,
                spki_der: &key.spki_der(),
                extensions,
            },
        )
        .unwrap()
    }

    fn uri(s: &str) -> SanEntry {
        SanEntry::Uri(s.into())
    }

    #[test]
    fn only_one_spiffe_uri_in_the_trust_domain_is_an_identity() {
        let ztunnel = "spiffe://cluster.local/ns/istio-system/sa/ztunnel";
        let one = leaf_with(&[uri(ztunnel), SanEntry::Dns("a.example".into())]);
        assert_eq!(
            certificate_identity(&one, "cluster.local").unwrap(),
            ztunnel
        );

        let refused = [
            leaf_with(&[SanEntry::Dns(ztunnel.into())]),
            leaf_with(&[SanEntry::Ip("10.0.0.1".parse().unwrap())]),
            leaf_with(&[]),
            leaf_with(&[uri(ztunnel), uri("spiffe://cluster.local/ns/a/sa/b")]),
            leaf_with(&[uri(ztunnel), uri("SPIFFE://cluster.local/ns/a/sa/b")]),
            leaf_with(&[uri("spiffe://other.domain/ns/istio-system/sa/ztunnel")]),
            leaf_with(&[uri("spiffe://cluster.local/ns/a/../sa/b")]),
        ];
        for (i, cert) in refused.iter().enumerate() {
            assert!(
                certificate_identity(cert, "cluster.local").is_err(),
                "case {i}"
            );
        }
    }

    fn root() -> CaBundle {
        use meshca_pki::profile::{CaCertRequest, self_signed_root};
        let key = SigningKey::generate(KeyType::EcdsaP256).unwrap();
        let now = OffsetDateTime::now_utc();
        let der = self_signed_root(
            &CaCertRequest {
                subject_der: &cert::organization_name("cluster.local"),
                key: &key,
                ttl: Duration::from_secs(86400),
            },
            now,
        )
        .unwrap();
        CaBundle::from_parts(key, der.clone(), vec![], vec![der], now).unwrap()
    }

    fn leaf_of(ca: &CaBundle) -> Vec<u8> {
        let key = SigningKey::generate(KeyType::EcdsaP256).unwrap();
        let csr = meshca_pki::csr::build_csr(&key, cert::EMPTY_NAME, &[]).unwrap();
        let csr = meshca_pki::validate_csr(csr.as_bytes(), &Default::default()).unwrap();
        meshca_pki::profile::issue_workload(
            &Default::default(),
            ca,
            &csr,
            &["spiffe://cluster.local/ns/a/sa/b".into()],
            3600,
            false,
            OffsetDateTime::now_utc(),
        )
        .unwrap()
    }

    #[test]
    fn a_replaced_signing_certificate_is_accepted_only_while_its_leaves_can_live() {
        let (old, new) = (root(), root());
        let issuers = ClientCertIssuers::new(Some(&old), Duration::from_secs(600));
        let old_leaf = leaf_of(&old);
        let now = OffsetDateTime::now_utc();
        issuers.check(&old_leaf, now).unwrap();
        assert!(issuers.check(&leaf_of(&new), now).is_err(), "not yet");

        issuers.rotate(&new, now);
        issuers.check(&leaf_of(&new), now).unwrap();
        issuers.check(&old_leaf, now).unwrap();
        assert_eq!(issuers.roots(now).len(), 2);
        // The same CA again changes nothing.
        issuers.rotate(&new, now);
        assert_eq!(issuers.roots(now).len(), 2);

        // Past the longest workload TTL, the old CA's leaves (had they
        // lived that long) no longer authenticate, nor does its root.
        let later = now + Duration::from_secs(601);
        assert!(issuers.check(&old_leaf, later).is_err());
        assert_eq!(issuers.roots(later), new.roots_der());
    }
}
