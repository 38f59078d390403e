//! The whole issue path: CSR PEM in, chain PEM out (parse, policy, proof of
//! possession, build, sign, encode), for each CA key type and CSR key type.

use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use meshca_pki::csr::build_csr;
use meshca_pki::profile::{CaCertRequest, self_signed_root};
use meshca_pki::{
    CaBundle, CertOptions, CsrPolicy, KeyType, LocalCa, SanEntry, SigningKey, WorkloadProfile, cert,
};
use time::OffsetDateTime;

fn local_ca(key_type: KeyType) -> LocalCa {
    let now = OffsetDateTime::now_utc();
    let key = SigningKey::generate(key_type).unwrap();
    let subject = cert::organization_name("cluster.local");
    let root = self_signed_root(
        &CaCertRequest {
            subject_der: &subject,
            key: &key,
            ttl: Duration::from_secs(10 * 365 * 86400),
        },
        now,
    )
    .unwrap();
    let bundle = CaBundle::from_parts(key, root.clone(), vec![], vec![root], now).unwrap();
    LocalCa::new(
        Arc::new(bundle),
        CsrPolicy::default(),
        WorkloadProfile::default(),
    )
}

fn workload_csr(key_type: KeyType) -> String {
    let key = SigningKey::generate(key_type).unwrap();
    let sans = [SanEntry::Uri(
        "spiffe://cluster.local/ns/default/sa/bench".into(),
    )];
    build_csr(&key, cert::EMPTY_NAME, &sans).unwrap()
}

fn issue(c: &mut Criterion) {
    let identities = vec!["spiffe://cluster.local/ns/default/sa/bench".to_owned()];
    let options = CertOptions {
        subject_ids: &identities,
        ttl_seconds: 3600,
        for_ca: false,
    };
    let mut group = c.benchmark_group("issue");
    group.throughput(Throughput::Elements(1));
    for ca_type in [KeyType::Rsa2048, KeyType::EcdsaP256] {
        let ca = local_ca(ca_type);
        for csr_type in [KeyType::Rsa2048, KeyType::EcdsaP256] {
            let csr = workload_csr(csr_type);
            group.bench_function(format!("ca={ca_type}/csr={csr_type}"), |b| {
                b.iter(|| ca.sign_with_cert_chain(csr.as_bytes(), &options).unwrap())
            });
        }
    }
    group.finish();
}

criterion_group!(benches, issue);
criterion_main!(benches);
