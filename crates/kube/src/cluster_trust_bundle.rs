//! ClusterTrustBundles (certificates.k8s.io/v1beta1) that meshca publishes:
//! the object and whether the stored one needs writing, shared by the
//! server (Istio's `istio.io:istiod-ca:root-cert`) and the signer (one per
//! signer name).

use std::collections::BTreeMap;

use k8s_openapi::api::certificates::v1beta1::{ClusterTrustBundle, ClusterTrustBundleSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// The API's naming rule for a bundle linked to `signer_name`: the signer
/// name with `/` replaced by `:`, then `:` and a suffix.
pub fn bundle_name(signer_name: &str, suffix: &str) -> String {
    format!("{}:{suffix}", signer_name.replace('/', ":"))
}

/// Whether the stored bundle needs writing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    InSync,
    Apply,
}

/// The bundle as meshca wants it: `roots_pem` for `signer_name`, with these
/// labels and annotations (whatever else is on the stored object is others').
pub fn desired(
    name: &str,
    signer_name: &str,
    roots_pem: &str,
    labels: BTreeMap<String, String>,
    annotations: BTreeMap<String, String>,
) -> ClusterTrustBundle {
    ClusterTrustBundle {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: (!labels.is_empty()).then_some(labels),
            annotations: (!annotations.is_empty()).then_some(annotations),
            ..Default::default()
        },
        spec: ClusterTrustBundleSpec {
            signer_name: Some(signer_name.into()),
            trust_bundle: roots_pem.into(),
        },
    }
}

/// In sync when the stored bundle has the same signer, roots, and carries
/// the wanted labels and annotations.
pub fn plan(existing: Option<&ClusterTrustBundle>, want: &ClusterTrustBundle) -> Plan {
    let Some(have) = existing else {
        return Plan::Apply;
    };
    let carries = |have: &Option<BTreeMap<String, String>>,
                   want: &Option<BTreeMap<String, String>>| {
        want.iter()
            .flatten()
            .all(|(k, v)| have.as_ref().and_then(|h| h.get(k)) == Some(v))
    };
    if have.spec == want.spec
        && carries(&have.metadata.labels, &want.metadata.labels)
        && carries(&have.metadata.annotations, &want.metadata.annotations)
    {
        Plan::InSync
    } else {
        Plan::Apply
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROOT: &str = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";

    #[test]
    fn names_follow_the_apis_signer_prefix_rule() {
        assert_eq!(
            bundle_name("example.com/foo", "roots"),
            "example.com:foo:roots"
        );
        assert_eq!(
            bundle_name("istio.io/istiod-ca", "root-cert"),
            "istio.io:istiod-ca:root-cert"
        );
    }

    #[test]
    fn a_bundle_is_written_when_missing_or_different_and_left_alone_when_equal() {
        let labels = BTreeMap::from([("a".to_string(), "b".to_string())]);
        let want = desired("x.io:s:r", "x.io/s", ROOT, labels, BTreeMap::new());
        assert_eq!(plan(None, &want), Plan::Apply);
        let mut have = want.clone();
        have.metadata.resource_version = Some("3".into());
        have.metadata
            .labels
            .as_mut()
            .unwrap()
            .insert("other".into(), "x".into());
        assert_eq!(plan(Some(&have), &want), Plan::InSync);
        have.spec.trust_bundle = ROOT.replace("AAAA", "BBBB");
        assert_eq!(plan(Some(&have), &want), Plan::Apply);
        let mut unlabelled = want.clone();
        unlabelled.metadata.labels = None;
        assert_eq!(plan(Some(&unlabelled), &want), Plan::Apply);
    }
}
