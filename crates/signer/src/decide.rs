//! The pure decision: what to do with one CSR, given a signer's policy, its
//! CA and the time. No I/O; the controller only carries the answer out.

use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use meshca_pki::{
    CaBundle, CsrPolicy, Error, KubernetesProfile, SubjectRule, pem, profile, validate_csr,
};
use time::OffsetDateTime;

/// One signer's rules: the name it answers to and what it will issue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignerPolicy {
    /// `spec.signerName` this signer handles, e.g. `example.com/foo`.
    pub name: String,
    /// SANs, subject, usages, TTL rules.
    pub profile: KubernetesProfile,
    /// Key types and sizes, size limits.
    pub csr_policy: CsrPolicy,
    /// Append the root(s) to `status.certificate` after the intermediates.
    pub include_root: bool,
    /// Sign this signer's PodCertificateRequests too, under this policy
    /// (`None`: CSRs only).
    pub pod_certificates: Option<crate::pcr::PodCertPolicy>,
}

impl SignerPolicy {
    /// The defaults istiod's CSRs need: signer `name`, an empty subject
    /// (Istio's template; a CSR with any other subject is refused), one
    /// SPIFFE URI in `cluster.local`, the four istiod usages, no root in the chain.
    pub fn istiod(name: impl Into<String>) -> Self {
        SignerPolicy {
            name: name.into(),
            profile: KubernetesProfile {
                subject: SubjectRule::RequireEmpty,
                ..KubernetesProfile::default()
            },
            csr_policy: CsrPolicy::default(),
            include_root: false,
            pod_certificates: None,
        }
    }
}

/// Why a CSR is left alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// `spec.signerName` is another signer's.
    OtherSigner,
    /// No `Approved=True` condition (yet).
    NotApproved,
    /// A `Denied` condition is present.
    Denied,
    /// A `Failed` condition is present (ours or anyone's).
    AlreadyFailed,
    /// `status.certificate` is already set; never overwritten.
    AlreadyIssued,
}

impl Skip {
    pub fn as_str(self) -> &'static str {
        match self {
            Skip::OtherSigner => "other_signer",
            Skip::NotApproved => "not_approved",
            Skip::Denied => "denied",
            Skip::AlreadyFailed => "already_failed",
            Skip::AlreadyIssued => "already_issued",
        }
    }
}

/// What the controller must do with a CSR.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Nothing: not ours, not approved, or already final.
    Skip(Skip),
    /// Write `certificate` (PEM: leaf, intermediates, root if configured)
    /// into `status.certificate`.
    Issue { certificate: String },
    /// Append condition `Failed` with this Kubernetes `reason` (CamelCase)
    /// and `message`; `code` is meshca's stable snake_case reason.
    Fail {
        code: &'static str,
        reason: &'static str,
        message: String,
    },
    /// Cannot decide now (no CA loaded): try again later, write nothing.
    Retry { code: &'static str, message: String },
}

/// The Kubernetes condition reasons the signer writes.
pub mod reasons {
    /// The request breaks the signer's policy or is not a valid CSR.
    pub const VALIDATION: &str = "SignerValidationFailure";
    /// The signer's CA certificate has expired.
    pub const CA_EXPIRED: &str = "SignerCAExpired";
    /// Signing itself failed.
    pub const SIGNING: &str = "SignerSigningFailure";
}

/// Decides what to do with `csr`. `ca` is the signer's current CA (`None`
/// if none is loaded). Pure apart from the random serial number of an issued
/// certificate: the same inputs give the same kind of answer.
pub fn decide(
    csr: &CertificateSigningRequest,
    signer: &SignerPolicy,
    ca: Option<&CaBundle>,
    now: OffsetDateTime,
) -> Action {
    if let Some(skip) = skip_reason(csr, &signer.name) {
        return Action::Skip(skip);
    }
    let Some(ca) = ca else {
        return Action::Retry {
            code: "ca_not_ready",
            message: format!("signer {}: no CA loaded", signer.name),
        };
    };
    let validated = match validate_csr(&csr.spec.request.0, &signer.csr_policy) {
        Ok(v) => v,
        Err(e) => return fail(signer, &Error::from(e)),
    };
    let usages = csr.spec.usages.clone().unwrap_or_default();
    let expiration = csr.spec.expiration_seconds.map(i64::from);
    match profile::issue_kubernetes(&signer.profile, ca, &validated, &usages, expiration, now) {
        Ok(der) => {
            let mut certificate = pem::encode("CERTIFICATE", &der);
            push_pem(&mut certificate, &ca.cert_chain_pem());
            if signer.include_root {
                push_pem(&mut certificate, ca.roots_pem());
            }
            Action::Issue { certificate }
        }
        Err(Error::CaNotReady(m)) => Action::Retry {
            code: "ca_not_ready",
            message: m,
        },
        // The key's token is away (removed, logged out, device error): the
        // request is fine and must not be failed for good; try again later.
        Err(e @ Error::CaKeyUnavailable(_)) => Action::Retry {
            code: e.reason(),
            message: format!("signer {}: {e}", signer.name),
        },
        Err(e) => fail(signer, &e),
    }
}

/// Why `csr` is not to be signed by signer `name`, or `None` if it must be
/// acted on: ours, `Approved=True`, no `Denied`, no `Failed`, no certificate.
/// Any `Denied` or `Failed` condition blocks, whatever its status: when in
/// doubt, do not sign.
pub fn skip_reason(csr: &CertificateSigningRequest, name: &str) -> Option<Skip> {
    if csr.spec.signer_name != name {
        return Some(Skip::OtherSigner);
    }
    let status = csr.status.as_ref();
    if status
        .and_then(|s| s.certificate.as_ref())
        .is_some_and(|c| !c.0.is_empty())
    {
        return Some(Skip::AlreadyIssued);
    }
    let conditions = status
        .and_then(|s| s.conditions.as_deref())
        .unwrap_or_default();
    if conditions.iter().any(|c| c.type_ == "Denied") {
        return Some(Skip::Denied);
    }
    if conditions.iter().any(|c| c.type_ == "Failed") {
        return Some(Skip::AlreadyFailed);
    }
    if !conditions
        .iter()
        .any(|c| c.type_ == "Approved" && c.status == "True")
    {
        return Some(Skip::NotApproved);
    }
    None
}

fn fail(signer: &SignerPolicy, e: &Error) -> Action {
    let code = e.reason();
    let reason = match e {
        Error::CaExpired(_) => reasons::CA_EXPIRED,
        Error::CertGeneration(_) => reasons::SIGNING,
        _ => reasons::VALIDATION,
    };
    Action::Fail {
        code,
        reason,
        message: format!("{code}: {e} (signer {})", signer.name),
    }
}

fn push_pem(out: &mut String, pem: &str) {
    if pem.trim().is_empty() {
        return;
    }
    if !out.ends_with('\n') {
        out.push('\n');
    }
    out.push_str(pem);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_keys::Pullable;
    use k8s_openapi::ByteString;
    use k8s_openapi::api::certificates::v1::{
        CertificateSigningRequestCondition, CertificateSigningRequestSpec,
        CertificateSigningRequestStatus,
    };
    use meshca_pki::profile::{CaCertRequest, intermediate_ca, self_signed_root};
    use meshca_pki::{KeyType, SanEntry, SigningKey, SubjectRule, cert, csr::build_csr};
    use std::time::Duration;
    use x509_parser::prelude::*;

    const SIGNER: &str = "example.com/foo";

    fn now() -> OffsetDateTime {
        OffsetDateTime::now_utc()
    }

    /// Root -> intermediate; the intermediate signs.
    fn ca_with_intermediate(ttl: Duration) -> CaBundle {
        let root_key = SigningKey::generate(KeyType::EcdsaP256).unwrap();
        let root_der = self_signed_root(
            &CaCertRequest {
                subject_der: &cert::organization_name("root"),
                key: &root_key,
                ttl: Duration::from_secs(86400 * 30),
            },
            now(),
        )
        .unwrap();
        let root = CaBundle::from_parts(
            root_key,
            root_der.clone(),
            vec![],
            vec![root_der.clone()],
            now(),
        )
        .unwrap();
        let key = SigningKey::generate(KeyType::EcdsaP256).unwrap();
        let der = intermediate_ca(
            &CaCertRequest {
                subject_der: &cert::organization_name("intermediate"),
                key: &key,
                ttl,
            },
            &root,
            now(),
        )
        .unwrap();
        CaBundle::from_parts(key, der, vec![], vec![root_der], now()).unwrap()
    }

    fn csr_pem(subject: &[u8], sans: &[SanEntry]) -> String {
        let key = SigningKey::generate(KeyType::EcdsaP256).unwrap();
        build_csr(&key, subject, sans).unwrap()
    }

    fn spiffe(td: &str) -> SanEntry {
        SanEntry::Uri(format!("spiffe://{td}/ns/default/sa/default"))
    }

    fn istiod_usages() -> Vec<String> {
        profile::ISTIOD_USAGES
            .iter()
            .map(|u| u.to_string())
            .collect()
    }

    fn condition(type_: &str, status: &str) -> CertificateSigningRequestCondition {
        CertificateSigningRequestCondition {
            type_: type_.into(),
            status: status.into(),
            ..Default::default()
        }
    }

    /// An istiod-shaped CSR, approved.
    fn csr_with(pem: String, usages: Vec<String>) -> CertificateSigningRequest {
        CertificateSigningRequest {
            metadata: Default::default(),
            spec: CertificateSigningRequestSpec {
                request: ByteString(pem.into_bytes()),
                signer_name: SIGNER.into(),
                usages: Some(usages),
                expiration_seconds: Some(3600),
                ..Default::default()
            },
            status: Some(CertificateSigningRequestStatus {
                conditions: Some(vec![condition("Approved", "True")]),
                certificate: None,
            }),
        }
    }

    fn istiod_csr() -> CertificateSigningRequest {
        csr_with(
            csr_pem(cert::EMPTY_NAME, &[spiffe("cluster.local")]),
            istiod_usages(),
        )
    }

    fn certs_in(pem_text: &str) -> Vec<Vec<u8>> {
        meshca_pki::pem::parse_all(pem_text.as_bytes())
            .unwrap()
            .into_iter()
            .map(|b| {
                assert_eq!(b.label, "CERTIFICATE");
                b.der.to_vec()
            })
            .collect()
    }

    fn expect_fail(action: Action, expected_code: &str) {
        match action {
            Action::Fail {
                code,
                reason,
                message,
            } => {
                assert_eq!(code, expected_code, "{message}");
                assert!(message.starts_with(expected_code), "{message}");
                assert!(message.contains(SIGNER), "{message}");
                assert!(!reason.is_empty());
            }
            other => panic!("expected Fail({expected_code}), got {other:?}"),
        }
    }

    #[test]
    fn istiod_csr_is_issued_with_leaf_then_intermediate() {
        let ca = ca_with_intermediate(Duration::from_secs(86400 * 10));
        let policy = SignerPolicy::istiod(SIGNER);
        let Action::Issue { certificate } = decide(&istiod_csr(), &policy, Some(&ca), now()) else {
            panic!("not issued");
        };
        let certs = certs_in(&certificate);
        assert_eq!(certs.len(), 2, "leaf + intermediate, no root by default");
        assert_eq!(certs[1], ca.signing_cert_der());
        let (_, leaf) = X509Certificate::from_der(&certs[0]).unwrap();
        assert!(!leaf.is_ca());
        let san = leaf.subject_alternative_name().unwrap().unwrap();
        assert_eq!(
            format!("{:?}", san.value.general_names),
            "[URI(\"spiffe://cluster.local/ns/default/sa/default\")]"
        );
        let ttl = leaf.validity().not_after.timestamp() - leaf.validity().not_before.timestamp();
        // 3600 s requested (< 8h: not shortened) plus the 5 min backdate.
        assert_eq!(ttl, 3600 + 300);
    }

    #[test]
    fn root_is_appended_only_when_configured() {
        let ca = ca_with_intermediate(Duration::from_secs(86400));
        let mut policy = SignerPolicy::istiod(SIGNER);
        policy.include_root = true;
        let Action::Issue { certificate } = decide(&istiod_csr(), &policy, Some(&ca), now()) else {
            panic!("not issued");
        };
        let certs = certs_in(&certificate);
        assert_eq!(certs.len(), 3);
        assert_eq!(certs[2], ca.roots_der()[0]);
    }

    #[test]
    fn skips_everything_not_ours_or_not_approved_or_final() {
        let ca = ca_with_intermediate(Duration::from_secs(86400));
        let policy = SignerPolicy::istiod(SIGNER);
        let decide_on = |f: &dyn Fn(&mut CertificateSigningRequest)| {
            let mut csr = istiod_csr();
            f(&mut csr);
            decide(&csr, &policy, Some(&ca), now())
        };
        let set_conditions = |conds: Vec<CertificateSigningRequestCondition>| {
            move |c: &mut CertificateSigningRequest| {
                c.status.as_mut().unwrap().conditions = Some(conds.clone())
            }
        };
        assert_eq!(
            decide_on(&|c| c.spec.signer_name = "example.com/bar".into()),
            Action::Skip(Skip::OtherSigner)
        );
        assert_eq!(
            decide_on(&|c| c.spec.signer_name = "kubernetes.io/kube-apiserver-client".into()),
            Action::Skip(Skip::OtherSigner)
        );
        assert_eq!(
            decide_on(&|c| c.status = None),
            Action::Skip(Skip::NotApproved)
        );
        assert_eq!(
            decide_on(&set_conditions(vec![])),
            Action::Skip(Skip::NotApproved)
        );
        assert_eq!(
            decide_on(&set_conditions(vec![condition("Approved", "False")])),
            Action::Skip(Skip::NotApproved)
        );
        assert_eq!(
            decide_on(&set_conditions(vec![condition("Approved", "Unknown")])),
            Action::Skip(Skip::NotApproved)
        );
        assert_eq!(
            decide_on(&set_conditions(vec![condition("Denied", "True")])),
            Action::Skip(Skip::Denied)
        );
        assert_eq!(
            decide_on(&set_conditions(vec![
                condition("Approved", "True"),
                condition("Denied", "True")
            ])),
            Action::Skip(Skip::Denied)
        );
        // Even a Denied=False blocks: when in doubt, do not sign.
        assert_eq!(
            decide_on(&set_conditions(vec![
                condition("Approved", "True"),
                condition("Denied", "False")
            ])),
            Action::Skip(Skip::Denied)
        );
        assert_eq!(
            decide_on(&set_conditions(vec![
                condition("Approved", "True"),
                condition("Failed", "True")
            ])),
            Action::Skip(Skip::AlreadyFailed)
        );
        assert_eq!(
            decide_on(&|c| c.status.as_mut().unwrap().certificate =
                Some(ByteString(b"-----BEGIN CERTIFICATE-----".to_vec()))),
            Action::Skip(Skip::AlreadyIssued)
        );
        // An issued certificate is never replaced, even if not approved (any order).
        assert_eq!(
            decide_on(&|c| {
                c.status = Some(CertificateSigningRequestStatus {
                    conditions: None,
                    certificate: Some(ByteString(b"x".to_vec())),
                })
            }),
            Action::Skip(Skip::AlreadyIssued)
        );
    }

    #[test]
    fn without_a_ca_it_retries_and_writes_nothing() {
        let policy = SignerPolicy::istiod(SIGNER);
        match decide(&istiod_csr(), &policy, None, now()) {
            Action::Retry { code, .. } => assert_eq!(code, "ca_not_ready"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_ca_key_whose_token_is_away_retries_instead_of_failing_the_csr() {
        let key = SigningKey::generate(KeyType::EcdsaP256).unwrap();
        let root_der = self_signed_root(
            &CaCertRequest {
                subject_der: &cert::organization_name("token root"),
                key: &key,
                ttl: Duration::from_secs(86400),
            },
            now(),
        )
        .unwrap();
        let pullable = std::sync::Arc::new(Pullable::copy_of(&key));
        let ca = CaBundle::from_parts(
            SigningKey::external(pullable.clone()),
            root_der.clone(),
            vec![],
            vec![root_der],
            now(),
        )
        .unwrap();
        let policy = SignerPolicy::istiod(SIGNER);
        assert!(matches!(
            decide(&istiod_csr(), &policy, Some(&ca), now()),
            Action::Issue { .. }
        ));
        pullable.pull_out();
        match decide(&istiod_csr(), &policy, Some(&ca), now()) {
            Action::Retry { code, message } => {
                assert_eq!(code, "ca_key_unavailable");
                assert!(message.contains("token removed"), "{message}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn every_policy_violation_fails_with_its_reason() {
        let ca = ca_with_intermediate(Duration::from_secs(86400));
        let policy = SignerPolicy::istiod(SIGNER);
        let run = |csr: CertificateSigningRequest| decide(&csr, &policy, Some(&ca), now());
        let with_sans =
            |sans: &[SanEntry]| csr_with(csr_pem(cert::EMPTY_NAME, sans), istiod_usages());

        expect_fail(run(with_sans(&[])), "policy_uri_san_count");
        expect_fail(
            run(with_sans(&[
                spiffe("cluster.local"),
                spiffe("cluster.local"),
            ])),
            "policy_uri_san_count",
        );
        expect_fail(run(with_sans(&[spiffe("evil.org")])), "policy_trust_domain");
        expect_fail(
            run(with_sans(&[SanEntry::Uri("https://example.com/x".into())])),
            "policy_uri_not_spiffe",
        );
        expect_fail(
            run(with_sans(&[
                spiffe("cluster.local"),
                SanEntry::Dns("foo.example.com".into()),
            ])),
            "policy_dns_san",
        );
        expect_fail(
            run(with_sans(&[
                spiffe("cluster.local"),
                SanEntry::Ip("10.0.0.1".parse().unwrap()),
            ])),
            "policy_ip_san",
        );
        expect_fail(
            run(with_sans(&[
                spiffe("cluster.local"),
                SanEntry::Email("a@example.com".into()),
            ])),
            "policy_email_san",
        );
        let good_pem = || csr_pem(cert::EMPTY_NAME, &[spiffe("cluster.local")]);
        expect_fail(
            run(csr_with(
                good_pem(),
                vec!["digital signature".into(), "code signing".into()],
            )),
            "policy_usage_not_allowed",
        );
        expect_fail(
            run(csr_with(good_pem(), vec!["cert sign".into()])),
            "policy_usage_not_allowed",
        );
        expect_fail(
            run(csr_with(good_pem(), vec!["flying".into()])),
            "policy_usage_unknown",
        );
        // Not a CSR at all, two CSRs, garbage base64-ish text, empty.
        expect_fail(
            run(csr_with("hello".into(), istiod_usages())),
            "csr_not_pem",
        );
        expect_fail(run(csr_with(String::new(), istiod_usages())), "csr_not_pem");
        expect_fail(
            run(csr_with(
                format!("{}{}", good_pem(), good_pem()),
                istiod_usages(),
            )),
            "csr_pem_block_count",
        );
        expect_fail(
            run(csr_with(
                meshca_pki::pem::encode("CERTIFICATE REQUEST", b"\x30\x03\x02\x01\x00"),
                istiod_usages(),
            )),
            "csr_malformed",
        );
        expect_fail(
            run(csr_with(
                meshca_pki::pem::encode("CERTIFICATE", ca.signing_cert_der()),
                istiod_usages(),
            )),
            "csr_pem_type",
        );
    }

    #[test]
    fn wildcard_dns_sans_fail_even_where_dns_sans_are_allowed() {
        let ca = ca_with_intermediate(Duration::from_secs(86400));
        let mut policy = SignerPolicy::istiod(SIGNER);
        policy.profile.sans.allow_dns = true;
        let run = |dns: &str| {
            let sans = [spiffe("cluster.local"), SanEntry::Dns(dns.into())];
            let csr = csr_with(csr_pem(cert::EMPTY_NAME, &sans), istiod_usages());
            decide(&csr, &policy, Some(&ca), now())
        };
        for wildcard in ["*.example.com", "*", "a.*.example.com", "foo*.example.com"] {
            expect_fail(run(wildcard), "policy_dns_san_wildcard");
        }
        assert!(
            matches!(run("svc.ns.svc.cluster.local"), Action::Issue { .. }),
            "a plain DNS SAN is issued where the policy allows DNS SANs"
        );
    }

    #[test]
    fn tampered_csr_signature_fails() {
        let ca = ca_with_intermediate(Duration::from_secs(86400));
        let policy = SignerPolicy::istiod(SIGNER);
        let pem_text = csr_pem(cert::EMPTY_NAME, &[spiffe("cluster.local")]);
        let mut der = meshca_pki::pem::parse_all(pem_text.as_bytes()).unwrap()[0]
            .der
            .to_vec();
        let last = der.len() - 1;
        der[last] ^= 0x01;
        let csr = csr_with(
            meshca_pki::pem::encode("CERTIFICATE REQUEST", &der),
            istiod_usages(),
        );
        expect_fail(
            decide(&csr, &policy, Some(&ca), now()),
            "csr_signature_invalid",
        );
    }

    #[test]
    fn subject_rules() {
        let ca = ca_with_intermediate(Duration::from_secs(86400));
        let subject = cert::organization_and_common_name("system:masters", "kubernetes-admin");
        let pem_text = csr_pem(&subject, &[spiffe("cluster.local")]);
        let csr = csr_with(pem_text, istiod_usages());

        // The default refuses a subject: it would reach the certificate.
        let mut policy = SignerPolicy::istiod(SIGNER);
        assert_eq!(policy.profile.subject, SubjectRule::RequireEmpty);
        expect_fail(
            decide(&csr, &policy, Some(&ca), now()),
            "policy_subject_not_empty",
        );
        // Istio's Go GenCSR writes `O=""`: accepted, and the certificate's
        // subject is empty.
        let blank = csr_with(
            csr_pem(&cert::organization_name(""), &[spiffe("cluster.local")]),
            istiod_usages(),
        );
        let Action::Issue { certificate } = decide(&blank, &policy, Some(&ca), now()) else {
            panic!("O=\"\": not issued")
        };
        let leaf_der = &certs_in(&certificate)[0];
        let (_, leaf) = X509Certificate::from_der(leaf_der).unwrap();
        assert_eq!(leaf.subject().as_raw(), cert::EMPTY_NAME);

        policy.profile.subject = SubjectRule::CopyFromCsr;
        let Action::Issue { certificate } = decide(&csr, &policy, Some(&ca), now()) else {
            panic!("copy: not issued")
        };
        let leaf_der = &certs_in(&certificate)[0];
        let (_, leaf) = X509Certificate::from_der(leaf_der).unwrap();
        assert_eq!(
            leaf.subject().as_raw(),
            subject.as_slice(),
            "copied byte for byte"
        );
    }

    #[test]
    fn ttl_follows_kube_controller_manager_under_the_max() {
        let ca = ca_with_intermediate(Duration::from_secs(86400 * 30));
        let mut policy = SignerPolicy::istiod(SIGNER);
        policy.profile.max_ttl = Duration::from_secs(2 * 3600);
        let lifetime = |exp: Option<i32>| {
            let mut csr = istiod_csr();
            csr.spec.expiration_seconds = exp;
            let Action::Issue { certificate } = decide(&csr, &policy, Some(&ca), now()) else {
                panic!("not issued")
            };
            let der = &certs_in(&certificate)[0];
            let (_, leaf) = X509Certificate::from_der(der).unwrap();
            leaf.validity().not_after.timestamp() - leaf.validity().not_before.timestamp()
        };
        assert_eq!(lifetime(Some(3600)), 3600 + 300);
        assert_eq!(lifetime(Some(86400)), 7200 + 300, "capped at the max");
        assert_eq!(lifetime(Some(60)), 600 + 300, "raised to 10 min");
        assert_eq!(lifetime(Some(-5)), 600 + 300, "nonsense raised to 10 min");
        assert_eq!(lifetime(None), 7200 + 300, "default 24h capped at max");
    }

    #[test]
    fn leaf_never_outlives_the_ca() {
        let ca = ca_with_intermediate(Duration::from_secs(3000));
        let policy = SignerPolicy::istiod(SIGNER);
        let Action::Issue { certificate } = decide(&istiod_csr(), &policy, Some(&ca), now()) else {
            panic!("not issued")
        };
        let der = &certs_in(&certificate)[0];
        let (_, leaf) = X509Certificate::from_der(der).unwrap();
        assert!(leaf.validity().not_after.timestamp() <= ca.not_after().unix_timestamp());
    }

    #[test]
    fn expired_ca_fails_with_ca_expired() {
        let ca = ca_with_intermediate(Duration::from_secs(3600));
        let policy = SignerPolicy::istiod(SIGNER);
        let later = now() + Duration::from_secs(7200);
        match decide(&istiod_csr(), &policy, Some(&ca), later) {
            Action::Fail { code, reason, .. } => {
                assert_eq!(code, "ca_expired");
                assert_eq!(reason, reasons::CA_EXPIRED);
            }
            other => panic!("{other:?}"),
        }
    }
}
