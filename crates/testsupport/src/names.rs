//! Names and labels of the objects tests create: [`unique_name`] keeps tests
//! from colliding, [`TESTSUPPORT_LABEL`] marks everything this crate made.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// Label put on every object this crate creates.
pub const TESTSUPPORT_LABEL: &str = "meshca.io/testsupport";

/// `<prefix>-<suffix>`: a DNS-1123 label unique across processes and calls.
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mix =
        (nanos ^ (u64::from(std::process::id()) << 32) ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15))
            & 0xff_ffff_ffff;
    let suffix = format!("{mix:x}{n:x}");
    let mut p: String = prefix
        .to_ascii_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    p.truncate(62 - suffix.len());
    let p = p.trim_matches('-');
    if p.is_empty() {
        format!("t-{suffix}")
    } else {
        format!("{p}-{suffix}")
    }
}

/// The labels of every object this crate creates.
pub(crate) fn labels() -> BTreeMap<String, String> {
    BTreeMap::from([(TESTSUPPORT_LABEL.to_string(), "true".to_string())])
}

/// Metadata of an object this crate creates: name, namespace, labels.
pub(crate) fn meta(name: &str, namespace: Option<&str>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_string()),
        namespace: namespace.map(str::to_string),
        labels: Some(labels()),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_names_are_dns_labels() {
        let a = unique_name("Some_Prefix.x");
        let b = unique_name("Some_Prefix.x");
        assert_ne!(a, b);
        for n in [&a, &b, &unique_name(&"x".repeat(100))] {
            assert!(n.len() <= 63, "{n}");
            assert!(
                n.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'),
                "{n}"
            );
            assert!(!n.starts_with('-') && !n.ends_with('-'), "{n}");
        }
    }
}
