//! The pure decision for a PodCertificateRequest (certificates.k8s.io/v1beta1,
//! KEP-4317): what to do with one request, given the signer's policy, its
//! CA, the pod, ServiceAccount and Node as the API has them now, and the time.
//!
//! The identity is `spiffe://<trust domain>/ns/<namespace>/sa/<account>`
//! from the request's namespace and `spec.serviceAccountName`, and only
//! after the pod of that name exists with `spec.podUID`, runs as that
//! account on `spec.nodeName`, and the account and node exist with the UIDs
//! the request names. The apiserver checked those when the kubelet created
//! the request; they are checked again here because the pod may have been
//! deleted (and recreated under the same name) since. Nothing the pod chose
//! (`unverifiedUserAnnotations`) reaches the certificate.

use std::time::Duration;

use k8s_openapi::api::certificates::v1beta1::PodCertificateRequest;
use k8s_openapi::api::core::v1::{Node, Pod, ServiceAccount};
use meshca_pki::pod_key::{pod_key_policy, validate_pod_key};
use meshca_pki::{CaBundle, CsrError, CsrPolicy, Error, SpiffeId, pem, profile};
use time::OffsetDateTime;

mod refresh;

#[cfg(test)]
use refresh::REFRESH_MARGIN;
use refresh::jitter_seed;
pub use refresh::{RefreshWindow, refresh_time};

/// kube-apiserver's bounds on `spec.maxExpirationSeconds` (custom signers)
/// and its default.
pub const API_MIN_EXPIRATION: Duration = Duration::from_secs(3600);
pub const API_MAX_EXPIRATION: Duration = Duration::from_secs(91 * 24 * 3600);
pub const API_DEFAULT_EXPIRATION: Duration = Duration::from_secs(24 * 3600);
/// Istio's backdate for clock skew (the apiserver wants notBefore within
/// 5 minutes of its clock).
const BACKDATE: Duration = Duration::from_secs(120);

/// One signer's rules for pod certificates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodCertPolicy {
    /// The trust domain of every identity this signer certifies.
    pub trust_domain: String,
    /// Key types and sizes (the API's: RSA 3072/4096, P-256, P-384, Ed25519).
    pub keys: CsrPolicy,
    /// Longest lifetime; a request whose `maxExpirationSeconds` is above is denied.
    pub max_ttl: Duration,
    /// Namespaces whose pods may get a certificate (empty: all).
    pub namespaces: Vec<String>,
    /// `namespace/account` pairs that may (empty: all); `namespace/*` is the
    /// whole namespace.
    pub service_accounts: Vec<String>,
    /// `unverifiedUserAnnotations` keys that are accepted (and ignored);
    /// any other key is denied, as the API asks of signers.
    pub user_annotations: Vec<String>,
    /// Where in the lifetime `beginRefreshAt` falls.
    pub refresh_window: RefreshWindow,
}

impl PodCertPolicy {
    pub fn new(trust_domain: impl Into<String>) -> Self {
        PodCertPolicy {
            trust_domain: trust_domain.into(),
            keys: pod_key_policy(),
            max_ttl: API_DEFAULT_EXPIRATION,
            namespaces: Vec::new(),
            service_accounts: Vec::new(),
            user_annotations: Vec::new(),
            refresh_window: RefreshWindow::default(),
        }
    }
}

/// The objects the request names, as read from the API just before deciding
/// (`None`: not found).
#[derive(Debug, Clone, Copy, Default)]
pub struct Facts<'a> {
    pub pod: Option<&'a Pod>,
    pub service_account: Option<&'a ServiceAccount>,
    pub node: Option<&'a Node>,
}

/// Why a request is left alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PcrSkip {
    OtherSigner,
    /// Issued, Denied or Failed already (by anyone): final.
    Final,
}

/// What the controller must do with a PodCertificateRequest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PcrAction {
    Skip(PcrSkip),
    /// Condition `Issued` plus these status fields.
    Issue {
        chain: String,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
        begin_refresh_at: OffsetDateTime,
    },
    /// Condition `condition` (`Denied` or `Failed`) with `reason`
    /// (CamelCase) and `message`; `code` is the stable snake_case reason.
    Refuse {
        condition: &'static str,
        code: &'static str,
        reason: &'static str,
        message: String,
    },
    /// Nothing to write now (no CA, or its roots not published yet).
    Retry {
        code: &'static str,
        message: String,
    },
}

/// The condition reasons written on PodCertificateRequests.
pub mod reasons {
    /// The API's well-known reason: the key type is not supported.
    pub const UNSUPPORTED_KEY_TYPE: &str = "UnsupportedKeyType";
    /// The API's well-known reason for `unverifiedUserAnnotations`.
    pub const INVALID_USER_ANNOTATIONS: &str = "InvalidUnverifiedUserAnnotations";
    /// The pod, account or node is gone or differs from the request.
    pub const POD_IDENTITY: &str = "PodIdentityMismatch";
    /// The signer's policy does not allow this pod or lifetime.
    pub const POLICY: &str = "SignerPolicyDenied";
    /// The key or its proof of possession is not valid.
    pub const INVALID_KEY: &str = "InvalidPublicKey";
    pub const CA_EXPIRED: &str = "SignerCAExpired";
    /// The CA expires before the shortest lifetime the API allows.
    pub const CA_EXPIRING: &str = "SignerCAExpiresTooSoon";
    pub const SIGNING: &str = "SignerSigningFailure";
    /// `Issued`'s reason.
    pub const ISSUED: &str = "Issued";
}

/// Why `pcr` is not for signer `name`, or final.
pub fn skip_reason(pcr: &PodCertificateRequest, name: &str) -> Option<PcrSkip> {
    if pcr.spec.signer_name != name {
        return Some(PcrSkip::OtherSigner);
    }
    let status = pcr.status.as_ref();
    let has_chain = status
        .and_then(|s| s.certificate_chain.as_deref())
        .is_some_and(|c| !c.is_empty());
    let final_condition = status
        .and_then(|s| s.conditions.as_deref())
        .unwrap_or_default()
        .iter()
        .any(|c| matches!(c.type_.as_str(), "Issued" | "Denied" | "Failed"));
    (has_chain || final_condition).then_some(PcrSkip::Final)
}

/// Decides on `pcr`. `roots_published`: the CA's roots are in the published
/// ClusterTrustBundle (or none is published), so a certificate from a new
/// root is never handed out before pods can trust it.
pub fn decide(
    pcr: &PodCertificateRequest,
    name: &str,
    policy: &PodCertPolicy,
    ca: Option<&CaBundle>,
    facts: Facts<'_>,
    roots_published: bool,
    now: OffsetDateTime,
) -> PcrAction {
    if let Some(skip) = skip_reason(pcr, name) {
        return PcrAction::Skip(skip);
    }
    let Some(ca) = ca else {
        return PcrAction::Retry {
            code: "ca_not_ready",
            message: format!("signer {name}: no CA loaded"),
        };
    };
    if !roots_published {
        return PcrAction::Retry {
            code: "trust_bundle_not_published",
            message: format!("signer {name}: the CA's roots are not in the ClusterTrustBundle yet"),
        };
    }
    let refuse = |condition, code, reason, detail: String| PcrAction::Refuse {
        condition,
        code,
        reason,
        message: format!("{code}: {detail} (signer {name})"),
    };
    let deny = |code, reason, detail| refuse("Denied", code, reason, detail);

    if let Some(key) = pcr
        .spec
        .unverified_user_annotations
        .iter()
        .flatten()
        .map(|(k, _)| k)
        .find(|k| !policy.user_annotations.contains(k))
    {
        return deny(
            "pcr_user_annotation",
            reasons::INVALID_USER_ANNOTATIONS,
            format!("unverifiedUserAnnotations key {key:?} is not one this signer accepts"),
        );
    }

    let namespace = pcr.metadata.namespace.as_deref().unwrap_or_default();
    let account = pcr.spec.service_account_name.as_str();
    if !policy.namespaces.is_empty() && !policy.namespaces.iter().any(|n| n == namespace) {
        return deny(
            "pcr_namespace_not_allowed",
            reasons::POLICY,
            format!("namespace {namespace:?} is not allowed"),
        );
    }
    if !policy.service_accounts.is_empty()
        && !policy.service_accounts.iter().any(|entry| {
            entry
                .split_once('/')
                .is_some_and(|(ns, sa)| ns == namespace && (sa == "*" || sa == account))
        })
    {
        return deny(
            "pcr_service_account_not_allowed",
            reasons::POLICY,
            format!("service account {namespace}/{account} is not allowed"),
        );
    }

    if let Err((code, detail)) = check_facts(pcr, facts) {
        return deny(code, reasons::POD_IDENTITY, detail);
    }

    let requested = pcr
        .spec
        .max_expiration_seconds
        .map_or(API_DEFAULT_EXPIRATION.as_secs() as i64, i64::from);
    if requested < API_MIN_EXPIRATION.as_secs() as i64 {
        return deny(
            "pcr_expiration_too_short",
            reasons::POLICY,
            format!(
                "maxExpirationSeconds {requested} is below the API's minimum {}",
                API_MIN_EXPIRATION.as_secs()
            ),
        );
    }
    let max = policy.max_ttl.min(API_MAX_EXPIRATION).as_secs() as i64;
    if requested > max {
        return deny(
            "pcr_expiration_too_long",
            reasons::POLICY,
            format!("maxExpirationSeconds {requested} is above this signer's maximum {max}"),
        );
    }

    let key = match validate_pod_key(
        &pcr.spec.pkix_public_key.0,
        &pcr.spec.proof_of_possession.0,
        &pcr.spec.pod_uid,
        &policy.keys,
    ) {
        Ok(k) => k,
        Err(e) => {
            let reason = match e {
                CsrError::KeyAlgorithm(_)
                | CsrError::Curve(_)
                | CsrError::RsaKeySize { .. }
                | CsrError::RsaExponent(_) => reasons::UNSUPPORTED_KEY_TYPE,
                _ => reasons::INVALID_KEY,
            };
            let mut detail = e.to_string();
            if reason == reasons::UNSUPPORTED_KEY_TYPE {
                detail.push_str(&format!("; supported: {}", supported_keys(&policy.keys)));
            }
            return deny(e.reason(), reason, detail);
        }
    };

    let id = format!(
        "spiffe://{}/ns/{namespace}/sa/{account}",
        policy.trust_domain
    );
    if id.parse::<SpiffeId>().is_err() {
        return deny(
            "pcr_identity_invalid",
            reasons::POD_IDENTITY,
            format!("{id:?} is not a valid SPIFFE ID"),
        );
    }

    // Whole seconds: status times must equal the certificate's exactly.
    let now = now.replace_nanosecond(0).unwrap_or(now);
    if now >= ca.not_after() {
        return refuse(
            "Failed",
            "ca_expired",
            reasons::CA_EXPIRED,
            format!("the CA expired at {}", ca.not_after()),
        );
    }
    let not_before = now - BACKDATE;
    let not_after = (not_before + Duration::from_secs(requested as u64)).min(ca.not_after());
    if not_after - not_before < API_MIN_EXPIRATION {
        return refuse(
            "Failed",
            "ca_expires_too_soon",
            reasons::CA_EXPIRING,
            format!(
                "the CA expires at {}, before the API's shortest lifetime (1h) would end",
                ca.not_after()
            ),
        );
    }
    let begin_refresh_at = refresh_time(
        not_before,
        not_after,
        policy.refresh_window,
        jitter_seed(pcr),
    );
    match profile::issue_workload_window(ca, &key, &[id], not_before, not_after, now) {
        Ok(der) => {
            let mut chain = pem::encode("CERTIFICATE", &der);
            let intermediates = ca.cert_chain_pem();
            if !intermediates.trim().is_empty() {
                if !chain.ends_with('\n') {
                    chain.push('\n');
                }
                chain.push_str(&intermediates);
            }
            PcrAction::Issue {
                chain,
                not_before,
                not_after,
                begin_refresh_at,
            }
        }
        Err(Error::CaNotReady(m)) => PcrAction::Retry {
            code: "ca_not_ready",
            message: m,
        },
        // The key's token is away: the request is fine; never failed for good.
        Err(e @ Error::CaKeyUnavailable(_)) => PcrAction::Retry {
            code: e.reason(),
            message: e.to_string(),
        },
        Err(e @ Error::CaExpired(_)) => {
            refuse("Failed", e.reason(), reasons::CA_EXPIRED, e.to_string())
        }
        Err(e) => refuse("Failed", e.reason(), reasons::SIGNING, e.to_string()),
    }
}

/// The pod, account and node exist with the names and UIDs of the request.
fn check_facts(
    pcr: &PodCertificateRequest,
    facts: Facts<'_>,
) -> Result<(), (&'static str, String)> {
    let spec = &pcr.spec;
    let namespace = pcr.metadata.namespace.as_deref().unwrap_or_default();
    let Some(pod) = facts.pod else {
        return Err((
            "pcr_pod_not_found",
            format!("pod {namespace}/{} does not exist", spec.pod_name),
        ));
    };
    if pod.metadata.uid.as_deref() != Some(spec.pod_uid.as_str())
        || pod.metadata.name.as_deref() != Some(spec.pod_name.as_str())
        || pod.metadata.namespace.as_deref() != Some(namespace)
    {
        return Err((
            "pcr_pod_uid_mismatch",
            format!(
                "pod {namespace}/{} has UID {:?}, the request names {:?} (deleted and recreated?)",
                spec.pod_name,
                pod.metadata.uid.as_deref().unwrap_or(""),
                spec.pod_uid
            ),
        ));
    }
    let pod_spec = pod.spec.as_ref();
    let pod_account = pod_spec
        .and_then(|s| s.service_account_name.as_deref())
        .filter(|s| !s.is_empty())
        .unwrap_or("default");
    if pod_account != spec.service_account_name {
        return Err((
            "pcr_pod_service_account_mismatch",
            format!(
                "pod runs as {pod_account:?}, the request names {:?}",
                spec.service_account_name
            ),
        ));
    }
    let pod_node = pod_spec.and_then(|s| s.node_name.as_deref()).unwrap_or("");
    if pod_node != spec.node_name {
        return Err((
            "pcr_pod_node_mismatch",
            format!(
                "pod is on node {pod_node:?}, the request names {:?}",
                spec.node_name
            ),
        ));
    }
    let Some(sa) = facts.service_account else {
        return Err((
            "pcr_service_account_not_found",
            format!(
                "service account {namespace}/{} does not exist",
                spec.service_account_name
            ),
        ));
    };
    if sa.metadata.uid.as_deref() != Some(spec.service_account_uid.as_str())
        || sa.metadata.name.as_deref() != Some(spec.service_account_name.as_str())
    {
        return Err((
            "pcr_service_account_uid_mismatch",
            format!(
                "service account {namespace}/{} has UID {:?}, the request names {:?}",
                spec.service_account_name,
                sa.metadata.uid.as_deref().unwrap_or(""),
                spec.service_account_uid
            ),
        ));
    }
    let Some(node) = facts.node else {
        return Err((
            "pcr_node_not_found",
            format!("node {} does not exist", spec.node_name),
        ));
    };
    if node.metadata.uid.as_deref() != Some(spec.node_uid.as_str())
        || node.metadata.name.as_deref() != Some(spec.node_name.as_str())
    {
        return Err((
            "pcr_node_uid_mismatch",
            format!(
                "node {} has UID {:?}, the request names {:?}",
                spec.node_name,
                node.metadata.uid.as_deref().unwrap_or(""),
                spec.node_uid
            ),
        ));
    }
    Ok(())
}

fn supported_keys(p: &CsrPolicy) -> String {
    let mut out = Vec::new();
    if p.allow_rsa {
        for bits in [3072, 4096] {
            if bits >= p.rsa_min_bits && bits <= p.rsa_max_bits {
                out.push(format!("RSA{bits}"));
            }
        }
    }
    if p.allow_p256 {
        out.push("ECDSAP256".into());
    }
    if p.allow_p384 {
        out.push("ECDSAP384".into());
    }
    if p.allow_ed25519 {
        out.push("ED25519".into());
    }
    out.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_keys::Pullable;
    use k8s_openapi::ByteString;
    use k8s_openapi::api::certificates::v1beta1::{
        PodCertificateRequestSpec, PodCertificateRequestStatus,
    };
    use k8s_openapi::api::core::v1::PodSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta, Time};
    use meshca_pki::profile::{CaCertRequest, self_signed_root};
    use meshca_pki::{KeyType, SigningKey, cert};
    use x509_parser::prelude::*;

    const SIGNER: &str = "example.com/foo";

    fn now() -> OffsetDateTime {
        OffsetDateTime::now_utc()
    }

    fn ca(ttl: Duration) -> CaBundle {
        let key = SigningKey::generate(KeyType::EcdsaP256).unwrap();
        let der = self_signed_root(
            &CaCertRequest {
                subject_der: &cert::organization_name("root"),
                key: &key,
                ttl,
            },
            now(),
        )
        .unwrap();
        CaBundle::from_parts(key, der.clone(), vec![], vec![der], now()).unwrap()
    }

    fn meta(name: &str, ns: Option<&str>, uid: &str) -> ObjectMeta {
        ObjectMeta {
            name: Some(name.into()),
            namespace: ns.map(Into::into),
            uid: Some(uid.into()),
            ..Default::default()
        }
    }

    struct World {
        pod: Pod,
        sa: ServiceAccount,
        node: Node,
    }

    fn world() -> World {
        World {
            pod: Pod {
                metadata: meta("web-0", Some("shop"), "pod-uid-1"),
                spec: Some(PodSpec {
                    service_account_name: Some("web".into()),
                    node_name: Some("node-a".into()),
                    ..Default::default()
                }),
                ..Default::default()
            },
            sa: ServiceAccount {
                metadata: meta("web", Some("shop"), "sa-uid-1"),
                ..Default::default()
            },
            node: Node {
                metadata: meta("node-a", None, "node-uid-1"),
                ..Default::default()
            },
        }
    }

    fn facts(w: &World) -> Facts<'_> {
        Facts {
            pod: Some(&w.pod),
            service_account: Some(&w.sa),
            node: Some(&w.node),
        }
    }

    fn pcr_with_key(key: &SigningKey, pod_uid: &str) -> PodCertificateRequest {
        PodCertificateRequest {
            metadata: meta("web-0-abc", Some("shop"), "pcr-uid-1"),
            spec: PodCertificateRequestSpec {
                signer_name: SIGNER.into(),
                pod_name: "web-0".into(),
                pod_uid: pod_uid.into(),
                service_account_name: "web".into(),
                service_account_uid: "sa-uid-1".into(),
                node_name: "node-a".into(),
                node_uid: "node-uid-1".into(),
                max_expiration_seconds: Some(86400),
                pkix_public_key: ByteString(key.spki_der()),
                proof_of_possession: ByteString(key.sign(pod_uid.as_bytes()).unwrap()),
                unverified_user_annotations: None,
            },
            status: None,
        }
    }

    fn pcr() -> PodCertificateRequest {
        pcr_with_key(
            &SigningKey::generate(KeyType::EcdsaP256).unwrap(),
            "pod-uid-1",
        )
    }

    fn run(p: &PodCertificateRequest, policy: &PodCertPolicy, w: &World) -> PcrAction {
        decide(
            p,
            SIGNER,
            policy,
            Some(&ca(Duration::from_secs(86400 * 30))),
            facts(w),
            true,
            now(),
        )
    }

    fn expect_refused(action: PcrAction, condition: &str, code: &str, reason: &str) {
        match action {
            PcrAction::Refuse {
                condition: c,
                code: k,
                reason: r,
                message,
            } => {
                assert_eq!((c, k, r), (condition, code, reason), "{message}");
                assert!(
                    message.starts_with(code) && message.contains(SIGNER),
                    "{message}"
                );
            }
            other => panic!("expected {condition}/{code}, got {other:?}"),
        }
    }

    #[test]
    fn a_ca_key_whose_token_is_away_retries_instead_of_failing() {
        let key = SigningKey::generate(KeyType::EcdsaP256).unwrap();
        let der = self_signed_root(
            &CaCertRequest {
                subject_der: &cert::organization_name("root"),
                key: &key,
                ttl: Duration::from_secs(86400 * 30),
            },
            now(),
        )
        .unwrap();
        let pullable = std::sync::Arc::new(Pullable::copy_of(&key));
        let bundle = CaBundle::from_parts(
            SigningKey::external(pullable.clone()),
            der.clone(),
            vec![],
            vec![der],
            now(),
        )
        .unwrap();
        let w = world();
        let policy = PodCertPolicy::new("cluster.local");
        let run = || {
            decide(
                &pcr(),
                SIGNER,
                &policy,
                Some(&bundle),
                facts(&w),
                true,
                now(),
            )
        };
        assert!(matches!(run(), PcrAction::Issue { .. }));
        pullable.pull_out();
        match run() {
            PcrAction::Retry { code, message } => {
                assert_eq!(code, "ca_key_unavailable");
                assert!(message.contains("token removed"), "{message}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_pods_request_gets_its_spiffe_id_and_api_valid_times() {
        let w = world();
        let policy = PodCertPolicy::new("cluster.local");
        let PcrAction::Issue {
            chain,
            not_before,
            not_after,
            begin_refresh_at,
        } = run(&pcr(), &policy, &w)
        else {
            panic!("not issued")
        };
        let der = meshca_pki::pem::parse_all(chain.as_bytes()).unwrap()[0]
            .der
            .to_vec();
        let (_, leaf) = X509Certificate::from_der(&der).unwrap();
        let san = leaf.subject_alternative_name().unwrap().unwrap();
        assert_eq!(
            format!("{:?}", san.value.general_names),
            "[URI(\"spiffe://cluster.local/ns/shop/sa/web\")]"
        );
        assert!(!leaf.is_ca());
        assert_eq!(
            leaf.validity().not_before.timestamp(),
            not_before.unix_timestamp()
        );
        assert_eq!(
            leaf.validity().not_after.timestamp(),
            not_after.unix_timestamp()
        );
        assert_eq!(
            (not_after - not_before).whole_seconds(),
            86400,
            "exactly maxExpirationSeconds"
        );
        assert!(
            (now() - not_before).whole_seconds() <= 300,
            "within the API's 5 minutes"
        );
        let at = (begin_refresh_at - not_before).whole_seconds();
        assert!(
            (43200..=60480).contains(&at),
            "refresh between 50% and 70%: {at}"
        );
    }

    #[test]
    fn refresh_is_spread_and_always_inside_the_apis_bounds() {
        let nb = now().replace_nanosecond(0).unwrap();
        let mut seen = std::collections::BTreeSet::new();
        for seed in 0..200u64 {
            let seed = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
            for lifetime in [3600, 7200, 86400, 91 * 86400] {
                let na = nb + Duration::from_secs(lifetime);
                let r = refresh_time(nb, na, RefreshWindow::default(), seed);
                assert!(r >= nb + REFRESH_MARGIN && r <= na - REFRESH_MARGIN);
                assert!(r - nb <= (na - nb) * 0.7 + ::time::Duration::SECOND);
                if lifetime == 86400 {
                    seen.insert((r - nb).whole_seconds());
                }
            }
        }
        assert!(
            seen.len() > 100,
            "jitter spreads refreshes: {} distinct",
            seen.len()
        );
    }

    #[test]
    fn the_refresh_window_moves_refresh_within_the_apis_bounds() {
        let nb = now().replace_nanosecond(0).unwrap();
        let na = nb + Duration::from_secs(3600);
        let at = |w: &str, seed| refresh_time(nb, na, w.parse().unwrap(), seed) - nb;
        // 0%: as early as the apiserver allows; 100%: as late.
        assert_eq!(at("0-0", 7), REFRESH_MARGIN);
        assert_eq!(at("100%", 7), Duration::from_secs(3000));
        assert_eq!(at("25", u64::MAX), Duration::from_secs(900));
        assert_eq!(at("50-50", 1 << 40), Duration::from_secs(1800));
        for bad in ["70-50", "101", "-", "a-b", ""] {
            assert!(bad.parse::<RefreshWindow>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn a_recreated_pod_or_a_moved_or_missing_object_is_denied() {
        let policy = PodCertPolicy::new("cluster.local");
        let p = pcr();
        let check = |f: &dyn Fn(&mut World), code: &str| {
            let mut w = world();
            f(&mut w);
            expect_refused(run(&p, &policy, &w), "Denied", code, reasons::POD_IDENTITY);
        };
        check(
            &|w| w.pod.metadata.uid = Some("pod-uid-2".into()),
            "pcr_pod_uid_mismatch",
        );
        check(
            &|w| w.pod.spec.as_mut().unwrap().service_account_name = Some("admin".into()),
            "pcr_pod_service_account_mismatch",
        );
        check(
            &|w| w.pod.spec.as_mut().unwrap().node_name = Some("node-b".into()),
            "pcr_pod_node_mismatch",
        );
        check(
            &|w| w.sa.metadata.uid = Some("sa-uid-2".into()),
            "pcr_service_account_uid_mismatch",
        );
        check(
            &|w| w.node.metadata.uid = Some("node-uid-2".into()),
            "pcr_node_uid_mismatch",
        );
        let w = world();
        let ca = ca(Duration::from_secs(86400));
        let missing = |f: Facts<'_>, code: &str| {
            expect_refused(
                decide(&p, SIGNER, &policy, Some(&ca), f, true, now()),
                "Denied",
                code,
                reasons::POD_IDENTITY,
            )
        };
        missing(
            Facts {
                pod: None,
                ..facts(&w)
            },
            "pcr_pod_not_found",
        );
        missing(
            Facts {
                service_account: None,
                ..facts(&w)
            },
            "pcr_service_account_not_found",
        );
        missing(
            Facts {
                node: None,
                ..facts(&w)
            },
            "pcr_node_not_found",
        );
    }

    #[test]
    fn policy_lifetime_keys_and_user_annotations() {
        let w = world();
        let mut policy = PodCertPolicy::new("cluster.local");
        let mut p = pcr();
        p.spec.max_expiration_seconds = Some(1800);
        expect_refused(
            run(&p, &policy, &w),
            "Denied",
            "pcr_expiration_too_short",
            reasons::POLICY,
        );
        p.spec.max_expiration_seconds = Some(2 * 86400);
        expect_refused(
            run(&p, &policy, &w),
            "Denied",
            "pcr_expiration_too_long",
            reasons::POLICY,
        );
        policy.max_ttl = Duration::from_secs(3 * 86400);
        let PcrAction::Issue {
            not_before,
            not_after,
            ..
        } = run(&p, &policy, &w)
        else {
            panic!("2 days under a 3-day policy: not issued")
        };
        assert_eq!((not_after - not_before).whole_seconds(), 2 * 86400);
        p.spec.max_expiration_seconds = None;
        assert!(
            matches!(run(&p, &policy, &w), PcrAction::Issue { .. }),
            "API default 24h"
        );

        let ed = pcr_with_key(
            &SigningKey::generate(KeyType::Ed25519).unwrap(),
            "pod-uid-1",
        );
        assert!(matches!(run(&ed, &policy, &w), PcrAction::Issue { .. }));
        policy.keys.allow_ed25519 = false;
        expect_refused(
            run(&ed, &policy, &w),
            "Denied",
            "csr_key_algorithm",
            reasons::UNSUPPORTED_KEY_TYPE,
        );
        let rsa = pcr_with_key(
            &SigningKey::generate(KeyType::Rsa2048).unwrap(),
            "pod-uid-1",
        );
        expect_refused(
            run(&rsa, &policy, &w),
            "Denied",
            "csr_key_size",
            reasons::UNSUPPORTED_KEY_TYPE,
        );

        let mut forged = pcr();
        forged.spec.proof_of_possession = pcr().spec.proof_of_possession;
        expect_refused(
            run(&forged, &policy, &w),
            "Denied",
            "pop_signature_invalid",
            reasons::INVALID_KEY,
        );

        let mut annotated = pcr();
        annotated.spec.unverified_user_annotations = Some(
            [(
                "example.com/identity".to_string(),
                "spiffe://evil/x".to_string(),
            )]
            .into(),
        );
        expect_refused(
            run(&annotated, &policy, &w),
            "Denied",
            "pcr_user_annotation",
            reasons::INVALID_USER_ANNOTATIONS,
        );
        policy.user_annotations = vec!["example.com/identity".into()];
        let PcrAction::Issue { chain, .. } = run(&annotated, &policy, &w) else {
            panic!("an allowed annotation: not issued")
        };
        assert!(!chain.contains("evil"));
        let der = meshca_pki::pem::parse_all(chain.as_bytes()).unwrap()[0]
            .der
            .to_vec();
        let (_, leaf) = X509Certificate::from_der(&der).unwrap();
        let san = leaf.subject_alternative_name().unwrap().unwrap();
        assert_eq!(
            format!("{:?}", san.value.general_names),
            "[URI(\"spiffe://cluster.local/ns/shop/sa/web\")]",
            "an accepted annotation never reaches the certificate"
        );
    }

    #[test]
    fn namespaces_and_accounts_outside_the_allow_lists_are_denied() {
        let w = world();
        let mut policy = PodCertPolicy::new("cluster.local");
        policy.namespaces = vec!["other".into()];
        expect_refused(
            run(&pcr(), &policy, &w),
            "Denied",
            "pcr_namespace_not_allowed",
            reasons::POLICY,
        );
        policy.namespaces = vec!["shop".into()];
        policy.service_accounts = vec!["shop/db".into()];
        expect_refused(
            run(&pcr(), &policy, &w),
            "Denied",
            "pcr_service_account_not_allowed",
            reasons::POLICY,
        );
        policy.service_accounts = vec!["shop/*".into()];
        assert!(matches!(run(&pcr(), &policy, &w), PcrAction::Issue { .. }));
    }

    #[test]
    fn skips_retries_and_ca_failures() {
        let w = world();
        let policy = PodCertPolicy::new("cluster.local");
        let mut other = pcr();
        other.spec.signer_name = "example.com/bar".into();
        assert_eq!(
            run(&other, &policy, &w),
            PcrAction::Skip(PcrSkip::OtherSigner)
        );
        for t in ["Issued", "Denied", "Failed"] {
            let mut p = pcr();
            p.status = Some(PodCertificateRequestStatus {
                conditions: Some(vec![Condition {
                    type_: t.into(),
                    status: "True".into(),
                    reason: "X".into(),
                    message: String::new(),
                    last_transition_time: Time(k8s_openapi::jiff::Timestamp::now()),
                    observed_generation: None,
                }]),
                ..Default::default()
            });
            assert_eq!(run(&p, &policy, &w), PcrAction::Skip(PcrSkip::Final));
        }
        let p = pcr();
        assert!(matches!(
            decide(&p, SIGNER, &policy, None, facts(&w), true, now()),
            PcrAction::Retry {
                code: "ca_not_ready",
                ..
            }
        ));
        let ca_ok = ca(Duration::from_secs(86400 * 30));
        assert!(matches!(
            decide(&p, SIGNER, &policy, Some(&ca_ok), facts(&w), false, now()),
            PcrAction::Retry {
                code: "trust_bundle_not_published",
                ..
            }
        ));
        let short = ca(Duration::from_secs(1800));
        expect_refused(
            decide(&p, SIGNER, &policy, Some(&short), facts(&w), true, now()),
            "Failed",
            "ca_expires_too_soon",
            reasons::CA_EXPIRING,
        );
        let later = now() + Duration::from_secs(3600);
        expect_refused(
            decide(&p, SIGNER, &policy, Some(&short), facts(&w), true, later),
            "Failed",
            "ca_expired",
            reasons::CA_EXPIRED,
        );
        // A two-day CA: a one-day request fits, a 36 h one is cut to the CA.
        let two_days = ca(Duration::from_secs(2 * 86400));
        let mut long = pcr();
        let mut lp = policy.clone();
        lp.max_ttl = Duration::from_secs(5 * 86400);
        long.spec.max_expiration_seconds = Some(4 * 86400);
        let PcrAction::Issue { not_after, .. } =
            decide(&long, SIGNER, &lp, Some(&two_days), facts(&w), true, now())
        else {
            panic!("not issued")
        };
        assert!(not_after <= two_days.not_after());
    }
}
