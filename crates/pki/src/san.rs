//! Subject alternative names and SPIFFE IDs.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use crate::der;

/// One SubjectAltName entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SanEntry {
    Uri(String),
    Dns(String),
    Ip(IpAddr),
    Email(String),
    /// A SAN type meshca never certifies (otherName, registeredID, ...), as text.
    Other(String),
}

impl SanEntry {
    /// Istio's typing of an authenticated identity: an IP literal becomes an
    /// IP SAN, a `spiffe://` ID a URI SAN, anything else a DNS SAN.
    pub fn from_identity(identity: &str) -> SanEntry {
        if let Ok(ip) = IpAddr::from_str(identity) {
            SanEntry::Ip(ip)
        } else if identity.starts_with("spiffe://") {
            SanEntry::Uri(identity.to_owned())
        } else {
            SanEntry::Dns(identity.to_owned())
        }
    }

    /// The DER GeneralName. Text SANs are IA5String, so only ASCII without
    /// control characters is accepted.
    pub fn general_name_der(&self) -> Result<Vec<u8>, String> {
        let (tag, bytes): (u8, Vec<u8>) = match self {
            SanEntry::Email(s) => (1, ia5(s)?.to_vec()),
            SanEntry::Dns(s) => (2, ia5(s)?.to_vec()),
            SanEntry::Uri(s) => (6, ia5(s)?.to_vec()),
            SanEntry::Ip(IpAddr::V4(ip)) => (7, ip.octets().to_vec()),
            SanEntry::Ip(IpAddr::V6(ip)) => (7, ip.octets().to_vec()),
            SanEntry::Other(s) => return Err(format!("SAN {s} cannot be certified")),
        };
        Ok(der::tlv(der::context(tag, false), &[&bytes]))
    }
}

impl fmt::Display for SanEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SanEntry::Uri(s) => write!(f, "URI:{s}"),
            SanEntry::Dns(s) => write!(f, "DNS:{s}"),
            SanEntry::Ip(ip) => write!(f, "IP:{ip}"),
            SanEntry::Email(s) => write!(f, "email:{s}"),
            SanEntry::Other(s) => write!(f, "other:{s}"),
        }
    }
}

fn ia5(s: &str) -> Result<&[u8], String> {
    if s.is_empty() {
        return Err("empty SAN".into());
    }
    if s.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        Ok(s.as_bytes())
    } else {
        Err(format!("SAN {s:?} is not printable ASCII"))
    }
}

/// The DER value of a SubjectAltName extension.
pub fn san_extension_value(entries: &[SanEntry]) -> Result<Vec<u8>, String> {
    let names = entries
        .iter()
        .map(SanEntry::general_name_der)
        .collect::<Result<Vec<_>, _>>()?;
    let parts: Vec<&[u8]> = names.iter().map(Vec::as_slice).collect();
    Ok(der::sequence(&parts))
}

/// A SPIFFE ID, `spiffe://<trust-domain>/<path>`, checked against the SPIFFE
/// ID specification (lowercase trust domain, non-empty path, no `.`/`..`
/// segments, no query or fragment).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SpiffeId {
    trust_domain: String,
    path: String,
}

/// Whether `s` is a DNS-1123 label, as Kubernetes checks a namespace name:
/// at most 63 of `[a-z0-9-]`, starting and ending alphanumeric.
pub fn is_dns1123_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// Whether `s` is a DNS-1123 subdomain, as Kubernetes checks a
/// ServiceAccount name: at most 253 characters of dot-separated labels.
pub fn is_dns1123_subdomain(s: &str) -> bool {
    // Kubernetes bounds the whole name, not each label, to the label syntax.
    s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// The one check of a Kubernetes workload account before it names anything:
/// the namespace a DNS-1123 label, the ServiceAccount a DNS-1123 subdomain.
/// So neither can carry a `/` or `:` into a SPIFFE ID or a username.
pub fn check_workload_account(namespace: &str, service_account: &str) -> Result<(), String> {
    if !is_dns1123_label(namespace) {
        return Err(format!("namespace {namespace:?} is not a DNS-1123 label"));
    }
    if !is_dns1123_subdomain(service_account) {
        return Err(format!(
            "service account {service_account:?} is not a DNS-1123 subdomain"
        ));
    }
    Ok(())
}

impl SpiffeId {
    /// Istio's workload identity `spiffe://<td>/ns/<ns>/sa/<sa>`; the
    /// namespace and account are checked by [`check_workload_account`].
    pub fn workload(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, String> {
        check_workload_account(namespace, service_account)?;
        format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}").parse()
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    /// `(namespace, service account)` when the path is Istio's `/ns/<ns>/sa/<sa>`.
    pub fn namespace_and_service_account(&self) -> Option<(&str, &str)> {
        let mut parts = self.path.strip_prefix('/')?.split('/');
        match (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) {
            (Some("ns"), Some(ns), Some("sa"), Some(sa), None) => Some((ns, sa)),
            _ => None,
        }
    }
}

impl FromStr for SpiffeId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| format!("{s:?} does not start with spiffe://"))?;
        let (trust_domain, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if trust_domain.is_empty() {
            return Err(format!("{s:?} has an empty trust domain"));
        }
        if !trust_domain
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b))
        {
            return Err(format!("{s:?} has an invalid trust domain"));
        }
        if path.is_empty() {
            return Err(format!("{s:?} has no path"));
        }
        for segment in path[1..].split('/') {
            if segment.is_empty() || segment == "." || segment == ".." {
                return Err(format!("{s:?} has an empty, `.` or `..` path segment"));
            }
            if !segment
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
            {
                return Err(format!("{s:?} has invalid characters in its path"));
            }
        }
        Ok(SpiffeId {
            trust_domain: trust_domain.to_owned(),
            path: path.to_owned(),
        })
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}{}", self.trust_domain, self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn identities_are_typed_like_istio() {
        assert_eq!(
            SanEntry::from_identity("spiffe://cluster.local/ns/a/sa/b"),
            SanEntry::Uri("spiffe://cluster.local/ns/a/sa/b".into())
        );
        assert_eq!(
            SanEntry::from_identity("10.1.2.3"),
            SanEntry::Ip("10.1.2.3".parse().unwrap())
        );
        assert_eq!(
            SanEntry::from_identity("::1"),
            SanEntry::Ip("::1".parse().unwrap())
        );
        assert_eq!(
            SanEntry::from_identity("istiod.istio-system.svc"),
            SanEntry::Dns("istiod.istio-system.svc".into())
        );
    }

    #[test]
    fn ipv4_sans_are_four_bytes() {
        let der = SanEntry::from_identity("10.1.2.3")
            .general_name_der()
            .unwrap();
        assert_eq!(der, vec![0x87, 4, 10, 1, 2, 3]);
    }

    #[test]
    fn non_ascii_sans_are_refused() {
        assert!(
            SanEntry::Dns("bücher.example".into())
                .general_name_der()
                .is_err()
        );
        assert!(SanEntry::Dns(String::new()).general_name_der().is_err());
    }

    #[test]
    fn spiffe_ids_follow_the_spec() {
        let id: SpiffeId = "spiffe://cluster.local/ns/default/sa/bookinfo"
            .parse()
            .unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(
            id.namespace_and_service_account(),
            Some(("default", "bookinfo"))
        );
        for bad in [
            "http://cluster.local/ns/a/sa/b",
            "spiffe://",
            "spiffe://Cluster.local/x",
            "spiffe://cluster.local",
            "spiffe://cluster.local/",
            "spiffe://cluster.local/a//b",
            "spiffe://cluster.local/a/../b",
            "spiffe://cluster.local/a?b",
            "spiffe://cluster.local/a#b",
        ] {
            assert!(bad.parse::<SpiffeId>().is_err(), "{bad} accepted");
        }
        assert_eq!(
            SpiffeId::workload("td", "ns1", "sa1").unwrap().to_string(),
            "spiffe://td/ns/ns1/sa/sa1"
        );
    }

    #[test]
    fn workload_accounts_are_dns1123_names() {
        assert!(SpiffeId::workload("td", "a/sa/b", "c").is_err());
        assert!(SpiffeId::workload("td", "ns", "a/sa/b").is_err());
        assert!(SpiffeId::workload("td", "ns", "a:b").is_err());
        assert!(SpiffeId::workload("td", "Ns", "sa").is_err());
        assert!(SpiffeId::workload("td", "-ns", "sa").is_err());
        assert!(SpiffeId::workload("td", "ns", "sa.").is_err());
        assert!(SpiffeId::workload("td", "ns", "..").is_err());
        assert!(SpiffeId::workload("td", &"n".repeat(64), "sa").is_err());
        assert!(SpiffeId::workload("td", "ns", &"s".repeat(254)).is_err());
        assert!(SpiffeId::workload("td", &"n".repeat(63), &"s".repeat(253)).is_ok());
        // A ServiceAccount name may have dots; a namespace may not.
        assert_eq!(
            SpiffeId::workload("td", "istio-system", "sa.v1")
                .unwrap()
                .to_string(),
            "spiffe://td/ns/istio-system/sa/sa.v1"
        );
        assert!(SpiffeId::workload("td", "a.b", "sa").is_err());
        assert_eq!(
            check_workload_account("a/sa/b", "c").unwrap_err(),
            "namespace \"a/sa/b\" is not a DNS-1123 label"
        );
    }

    proptest! {
        #[test]
        fn only_dns1123_names_make_a_workload_id(
            ns in "[a-z0-9./:-]{0,8}|\\PC{0,8}",
            sa in "[a-z0-9./:-]{0,12}|\\PC{0,12}",
        ) {
            if let Ok(id) = SpiffeId::workload("cluster.local", &ns, &sa) {
                prop_assert!(is_dns1123_label(&ns), "{ns:?}");
                prop_assert!(is_dns1123_subdomain(&sa), "{sa:?}");
                prop_assert_eq!(id.namespace_and_service_account(), Some((&ns[..], &sa[..])));
            }
        }

        #[test]
        fn dns1123_names_always_make_a_workload_id(
            ns in "[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?",
            sa in "[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?(\\.[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?){0,3}",
        ) {
            let id = SpiffeId::workload("cluster.local", &ns, &sa).unwrap();
            prop_assert_eq!(id.to_string(), format!("spiffe://cluster.local/ns/{ns}/sa/{sa}"));
        }

        #[test]
        fn spiffe_parse_never_panics_and_round_trips(s in "\\PC{0,60}") {
            if let Ok(id) = s.parse::<SpiffeId>() {
                prop_assert_eq!(id.to_string(), s);
            }
        }
    }
}
