//! Property tests: CSR validation never panics and never accepts a request
//! whose signed part changed; issued workload certificates carry exactly the
//! authenticated identities; the TTL rules hold for every input.

mod common;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;
use std::sync::OnceLock;
use std::time::Duration;

use common::*;
use meshca_pki::profile::{self, ISTIOD_USAGES, KubernetesProfile, WorkloadProfile};
use meshca_pki::{CsrPolicy, Error, KeyType, cert, pem, validate_csr};
use proptest::prelude::*;
use proptest::sample::Index;
use time::OffsetDateTime;

const DAY: i64 = 24 * 3600;

/// Valid openssl CSRs (PEM) of each key type, with the Istio URI SAN.
fn csrs() -> &'static [Vec<u8>] {
    static CSRS: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    CSRS.get_or_init(|| {
        [
            (Key::Rsa2048, "-sha256"),
            (Key::P256, "-sha256"),
            (Key::P384, "-sha384"),
            (Key::P384, "-sha256"),
        ]
        .iter()
        .map(|(k, d)| {
            openssl_csr(
                openssl_key(*k),
                "/O=prop/CN=client",
                &[*d, "-addext", SAN_ID],
            )
        })
        .chain(std::iter::once(openssl_csr(
            openssl_key(Key::Ed25519),
            "/",
            &["-addext", SAN_ID],
        )))
        .collect()
    })
}

/// (start, end) of the DER TLV that starts at `at`.
fn tlv_range(der: &[u8], at: usize) -> (usize, usize) {
    let first = der[at + 1] as usize;
    let (header, len) = if first < 0x80 {
        (2, first)
    } else {
        let n = first & 0x7f;
        let len = der[at + 2..at + 2 + n]
            .iter()
            .fold(0usize, |acc, b| acc << 8 | *b as usize);
        (2 + n, len)
    };
    (at, at + header + len)
}

/// The byte range of the CertificationRequestInfo (the signed part).
fn info_range(der: &[u8]) -> (usize, usize) {
    let (_, outer_end) = tlv_range(der, 0);
    assert_eq!(outer_end, der.len());
    let header = if der[1] < 0x80 {
        2
    } else {
        2 + (der[1] & 0x7f) as usize
    };
    tlv_range(der, header)
}

fn csr_pem(der: &[u8]) -> String {
    pem::encode("CERTIFICATE REQUEST", der)
}

#[test]
fn info_range_covers_the_signed_part() {
    for csr in csrs() {
        let der = pem_der(csr);
        let (start, end) = info_range(&der);
        assert!(start > 0 && end < der.len());
        assert_eq!(der[start], 0x30);
        validate_csr(csr, &CsrPolicy::default()).unwrap();
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic_and_never_validate(bytes in proptest::collection::vec(any::<u8>(), 0..3000)) {
        prop_assert!(validate_csr(&bytes, &CsrPolicy::default()).is_err());
        prop_assert!(validate_csr(csr_pem(&bytes).as_bytes(), &CsrPolicy::default()).is_err());
    }

    #[test]
    fn flipped_bit_in_signed_info_never_validates(which in any::<Index>(), pos in any::<Index>(), bit in 0u8..8) {
        let csrs = csrs();
        let mut der = pem_der(&csrs[which.index(csrs.len())]);
        let (start, end) = info_range(&der);
        let i = start + pos.index(end - start);
        der[i] ^= 1 << bit;
        let result = validate_csr(csr_pem(&der).as_bytes(), &CsrPolicy::default());
        prop_assert!(result.is_err(), "bit {} of byte {} flipped, still valid", bit, i);
    }

    #[test]
    fn flipped_bit_anywhere_never_panics_and_accepted_csrs_keep_their_signed_info(
        which in any::<Index>(), pos in any::<Index>(), bit in 0u8..8,
    ) {
        let csrs = csrs();
        let original = pem_der(&csrs[which.index(csrs.len())]);
        let mut der = original.clone();
        let i = pos.index(der.len());
        der[i] ^= 1 << bit;
        if let Ok(csr) = validate_csr(csr_pem(&der).as_bytes(), &CsrPolicy::default()) {
            let (start, end) = info_range(&original);
            prop_assert!(i < start || i >= end, "flip inside the signed info at {} accepted", i);
            let good = validate_csr(&csrs[which.index(csrs.len())], &CsrPolicy::default()).unwrap();
            prop_assert_eq!(csr.spki_der, good.spki_der);
            prop_assert_eq!(csr.subject_der, good.subject_der);
        }
    }

    #[test]
    fn truncated_der_never_validates(which in any::<Index>(), len in any::<Index>()) {
        let csrs = csrs();
        let der = pem_der(&csrs[which.index(csrs.len())]);
        let cut = len.index(der.len());
        prop_assert!(validate_csr(csr_pem(&der[..cut]).as_bytes(), &CsrPolicy::default()).is_err());
    }

    #[test]
    fn mutated_pem_text_never_panics_and_accepts_only_the_same_request(
        which in any::<Index>(),
        edits in proptest::collection::vec((any::<Index>(), any::<u8>()), 1..4),
        cut in proptest::option::of(any::<Index>()),
    ) {
        let csrs = csrs();
        let original = &csrs[which.index(csrs.len())];
        let mut text = original.clone();
        for (pos, byte) in &edits {
            let i = pos.index(text.len());
            text[i] = *byte;
        }
        if let Some(cut) = cut {
            text.truncate(cut.index(text.len()));
        }
        if let Ok(csr) = validate_csr(&text, &CsrPolicy::default()) {
            let good = validate_csr(original, &CsrPolicy::default()).unwrap();
            prop_assert_eq!(csr.spki_der, good.spki_der);
            prop_assert_eq!(csr.subject_der, good.subject_der);
            prop_assert_eq!(csr.requested_sans, good.requested_sans);
        }
    }
}

fn label() -> impl Strategy<Value = String> {
    "[a-z0-9]([a-z0-9-]{0,12}[a-z0-9])?"
}

fn identity() -> impl Strategy<Value = String> {
    prop_oneof![
        (label(), label(), label())
            .prop_map(|(td, ns, sa)| format!("spiffe://{td}.local/ns/{ns}/sa/{sa}")),
        proptest::collection::vec(label(), 1..4).prop_map(|labels| labels.join(".")),
        any::<[u8; 4]>().prop_map(|b| Ipv4Addr::from(b).to_string()),
        any::<[u8; 16]>().prop_map(|b| Ipv6Addr::from(b).to_string()),
    ]
}

/// Istio's typing, restated independently of the library.
fn expected_san(identity: &str) -> String {
    if let Ok(ip) = IpAddr::from_str(identity) {
        format!("IP:{ip}")
    } else if identity.starts_with("spiffe://") {
        format!("URI:{identity}")
    } else {
        format!("DNS:{identity}")
    }
}

fn workload_csrs() -> &'static [(Vec<u8>, meshca_pki::ValidatedCsr); 2] {
    static CSRS: OnceLock<[(Vec<u8>, meshca_pki::ValidatedCsr); 2]> = OnceLock::new();
    CSRS.get_or_init(|| {
        [("/O=prop", Key::P256), ("/CN=client", Key::P256)].map(|(subject, key)| {
            let pem = openssl_csr(
                openssl_key(key),
                subject,
                &["-addext", "subjectAltName=DNS:ignored.example"],
            );
            let csr = validate_csr(&pem, &CsrPolicy::default()).unwrap();
            (pem, csr)
        })
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn workload_certs_contain_exactly_the_identities_in_order(
        ids in proptest::collection::vec(identity(), 1..6),
        with_cn in any::<bool>(),
    ) {
        let ca = test_ca(CaKind::P256Root);
        let (pem, csr) = &workload_csrs()[usize::from(with_cn)];
        let now = now();
        let der = profile::issue_workload(&WorkloadProfile::default(), &ca.bundle, csr, &ids, 3600, false, now)
            .unwrap();
        let cert = parse_cert(&der);
        let expected: Vec<String> = ids.iter().map(|id| expected_san(id)).collect();
        prop_assert_eq!(sans(&cert), Some((true, expected)));
        let subject = if with_cn && ids[0].len() <= 64 { cert::common_name(&ids[0]) } else { cert::EMPTY_NAME.to_vec() };
        prop_assert_eq!(cert.subject().as_raw(), &subject[..]);
        let (_, spki) = csr_subject_and_spki(pem);
        prop_assert_eq!(cert.public_key().raw, &spki[..]);
        webpki_verify(&der, &ca.intermediates, &ca.roots, now);
    }
}

/// A P-256 root valid for 30 days from `base`.
fn short_ca() -> &'static (TestCa, OffsetDateTime) {
    static CA: OnceLock<(TestCa, OffsetDateTime)> = OnceLock::new();
    CA.get_or_init(|| {
        let base = now();
        let ca = root_ca(
            "30-day root",
            KeyType::EcdsaP256,
            &cert::organization_name("cluster.local"),
            Duration::from_secs(30 * DAY as u64),
            base,
        );
        (ca, base)
    })
}

fn ttl_strategy() -> impl Strategy<Value = i64> {
    prop_oneof![
        Just(i64::MIN),
        Just(0i64),
        -1_000_000i64..0,
        1i64..=90 * DAY,
        Just(90 * DAY),
        90 * DAY + 1..=400 * DAY,
        Just(i64::MAX),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn workload_ttl_rule_holds(ttl in ttl_strategy(), offset in 0i64..35 * DAY) {
        let (ca, base) = short_ca();
        let (_, csr) = &workload_csrs()[0];
        let now = *base + Duration::from_secs(offset as u64);
        let profile = WorkloadProfile::default();
        let max = 90 * DAY;
        let result = profile::issue_workload(&profile, &ca.bundle, csr, &[ID.into()], ttl, false, now);
        if ttl > max {
            prop_assert_eq!(result, Err(Error::TtlTooLong { requested: ttl, max }));
        } else if now >= ca.bundle.not_after() {
            prop_assert_eq!(result.map_err(|e| e.reason()), Err("ca_expired"));
        } else {
            let der = result.unwrap();
            let cert = parse_cert(&der);
            let effective = if ttl <= 0 { DAY } else { ttl };
            let expected = (now + Duration::from_secs(effective as u64)).min(ca.bundle.not_after());
            prop_assert_eq!(cert.validity().not_after.to_datetime(), expected);
            prop_assert_eq!(cert.validity().not_before.to_datetime(), now - Duration::from_secs(120));
        }
    }

    #[test]
    fn kubernetes_ttl_rule_holds(
        expiration in proptest::option::of(prop_oneof![any::<i64>(), -1000i64..2 * DAY, 0i64..400 * DAY]),
        default_ttl in 1i64..100 * DAY,
        max_ttl in 1i64..400 * DAY,
        offset in 0i64..35 * DAY,
    ) {
        let (ca, base) = short_ca();
        let csr_with_uri = validate_csr(openssl_csr_cached(), &CsrPolicy::default()).unwrap();
        let now = *base + Duration::from_secs(offset as u64);
        let profile = KubernetesProfile {
            default_ttl: Duration::from_secs(default_ttl as u64),
            max_ttl: Duration::from_secs(max_ttl as u64),
            ..KubernetesProfile::default()
        };
        let usages: Vec<String> = ISTIOD_USAGES.iter().map(|u| (*u).to_owned()).collect();
        let result = profile::issue_kubernetes(&profile, &ca.bundle, &csr_with_uri, &usages, expiration, now);
        if now >= ca.bundle.not_after() {
            prop_assert_eq!(result.map_err(|e| e.reason()), Err("ca_expired"));
            return Ok(());
        }
        // kube-controller-manager: absent -> default (never above max);
        // below 10 min -> 10 min; above max -> max.
        let ttl = match expiration {
            None => default_ttl.min(max_ttl),
            Some(s) => s.max(600).min(max_ttl.max(600)),
        };
        let not_after = if ttl >= 8 * 3600 { now + Duration::from_secs((ttl - 300) as u64) } else { now + Duration::from_secs(ttl as u64) };
        let der = result.unwrap();
        let cert = parse_cert(&der);
        prop_assert_eq!(cert.validity().not_after.to_datetime(), not_after.min(ca.bundle.not_after()));
        prop_assert_eq!(cert.validity().not_before.to_datetime(), now - Duration::from_secs(300));
    }
}

fn openssl_csr_cached() -> &'static [u8] {
    static CSR: OnceLock<Vec<u8>> = OnceLock::new();
    CSR.get_or_init(|| openssl_csr(openssl_key(Key::P256), "/O=prop", &["-addext", SAN_ID]))
}
