//! PKCS#11 overhead: SoftHSM2's raw `C_Sign` rate against meshca's signing
//! through the same key (session pool + verification of every signature),
//! and whole certificates (`LocalCa::sign_with_cert_chain`: CSR check,
//! profile, DER, signature, chain) with the key in the token against the
//! same key as a file. One run, same thread (= session) count for all.
//!
//! ```sh
//! cargo run --release -p meshca-hsm --example pkcs11_bench -- 5 2   # seconds per case, threads
//! ```
#![allow(unsafe_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use aws_lc_rs::digest;
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, ObjectClass};
use cryptoki::session::UserType;
use cryptoki::types::AuthPin;
use meshca_hsm::{Defaults, PinSource};
use meshca_pki::csr::build_csr;
use meshca_pki::profile::{CaCertRequest, self_signed_root};
use meshca_pki::{
    CaBundle, CertOptions, CsrPolicy, KeyType, LocalCa, SanEntry, SigningKey, WorkloadProfile, cert,
};
use meshca_testsupport::softhsm::{SOFTHSM_MODULE, SoftHsm};
use time::OffsetDateTime;

/// Runs `work` on `threads` threads for `seconds`; operations per second.
fn rate<S: Send + 'static>(
    threads: usize,
    seconds: f64,
    setup: impl Fn() -> S + Send + Sync + 'static,
    work: impl Fn(&mut S) + Send + Sync + 'static,
) -> f64 {
    let setup = Arc::new(setup);
    let work = Arc::new(work);
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let started = Arc::new(std::sync::Barrier::new(threads + 1));
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (setup, work, stop, count, started) = (
                setup.clone(),
                work.clone(),
                stop.clone(),
                count.clone(),
                started.clone(),
            );
            std::thread::spawn(move || {
                let mut state = setup();
                started.wait();
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    work(&mut state);
                    n += 1;
                }
                count.fetch_add(n, Ordering::Relaxed);
            })
        })
        .collect();
    started.wait();
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(seconds));
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        h.join().unwrap();
    }
    count.load(Ordering::Relaxed) as f64 / t0.elapsed().as_secs_f64()
}

fn main() {
    let mut args = std::env::args().skip(1);
    let seconds: f64 = args.next().map_or(5.0, |s| s.parse().unwrap());
    let threads: usize = args.next().map_or(2, |s| s.parse().unwrap());

    let hsm = SoftHsm::new("bench", "1234");
    // SAFETY: before any thread exists and before the module is loaded.
    unsafe { std::env::set_var("SOFTHSM2_CONF", hsm.conf()) };
    meshca_hsm::set_defaults(Defaults {
        module: Some(SOFTHSM_MODULE.into()),
        pin: PinSource::File(hsm.pin_file()),
    });

    // The raw C_Sign loop gets its own context of the same module: PKCS#11
    // allows a second C_Initialize to answer "already initialised".
    let raw_ctx = Pkcs11::new(SOFTHSM_MODULE).unwrap();
    let _ = raw_ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK));

    let csr_key = SigningKey::generate(KeyType::EcdsaP256).unwrap();
    let csr = build_csr(
        &csr_key,
        cert::EMPTY_NAME,
        &[SanEntry::Uri(
            "spiffe://cluster.local/ns/default/sa/bench".into(),
        )],
    )
    .unwrap();
    let ids = vec!["spiffe://cluster.local/ns/default/sa/bench".to_string()];
    let tbs = vec![0x5au8; 600]; // about a workload TBSCertificate

    println!(
        "threads (= sessions): {threads}, {seconds} s per case, SoftHSM2 {}",
        SOFTHSM_MODULE
    );
    println!();
    println!(
        "| CA key | SoftHSM raw C_Sign/s | meshca pool only/s | meshca signatures/s (pool + verify) | share of raw | certs/s, key in token | certs/s, same key as file | token/file |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (key_type, label, id) in [
        (KeyType::Rsa2048, "rsa-2048", "01"),
        (KeyType::EcdsaP256, "ecdsa-p256", "02"),
    ] {
        // One key, as a file and imported into the token.
        let file_key = SigningKey::generate(key_type).unwrap();
        let pem_path = hsm.dir().join(format!("{label}.pem"));
        std::fs::write(&pem_path, file_key.to_pkcs8_pem().unwrap().as_bytes()).unwrap();
        let out = std::process::Command::new("softhsm2-util")
            .env("SOFTHSM2_CONF", hsm.conf())
            .args(["--import", pem_path.to_str().unwrap(), "--token", "bench"])
            .args(["--label", label, "--id", id, "--pin", &hsm.pin])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::remove_file(&pem_path).unwrap();
        let uri = hsm.uri(label);
        let token_key = meshca_hsm::signing_key(&uri).unwrap();
        assert_eq!(token_key.spki_der(), file_key.spki_der(), "the same key");

        let now = OffsetDateTime::now_utc();
        let root = self_signed_root(
            &CaCertRequest {
                subject_der: &cert::organization_name("bench"),
                key: &file_key,
                ttl: Duration::from_secs(86400),
            },
            now,
        )
        .unwrap();
        let ca = |key| {
            Arc::new(LocalCa::new(
                Arc::new(
                    CaBundle::from_parts(key, root.clone(), vec![], vec![root.clone()], now)
                        .unwrap(),
                ),
                CsrPolicy::default(),
                WorkloadProfile::default(),
            ))
        };
        let file_ca = ca(file_key);
        let token_ca = ca(meshca_hsm::signing_key(&uri).unwrap());

        // Raw: a session per thread, C_Sign with exactly the mechanism meshca uses.
        let raw = {
            let (ctx, label, tbs) = (raw_ctx.clone(), label.to_string(), tbs.clone());
            let pin = hsm.pin.clone();
            move |seconds| {
                let (ctx, label, tbs, pin) = (ctx.clone(), label.clone(), tbs.clone(), pin.clone());
                rate(
                    threads,
                    seconds,
                    move || {
                        let slot = ctx
                            .get_slots_with_token()
                            .unwrap()
                            .into_iter()
                            .find(|s| ctx.get_token_info(*s).unwrap().label() == "bench")
                            .unwrap();
                        let session = ctx.open_ro_session(slot).unwrap();
                        let _ = session.login(UserType::User, Some(&AuthPin::from(pin.as_str())));
                        let key = session
                            .find_objects(&[
                                Attribute::Class(ObjectClass::PRIVATE_KEY),
                                Attribute::Label(label.as_bytes().to_vec()),
                            ])
                            .unwrap()[0];
                        (session, key, key_type, tbs.clone())
                    },
                    |(session, key, key_type, tbs)| {
                        let signature = if *key_type == KeyType::Rsa2048 {
                            session.sign(&Mechanism::Sha256RsaPkcs, *key, tbs)
                        } else {
                            let d = digest::digest(&digest::SHA256, tbs);
                            session.sign(&Mechanism::Ecdsa, *key, d.as_ref())
                        };
                        signature.unwrap();
                    },
                )
            }
        };
        // The session pool alone (TokenKey), then the whole SigningKey
        // (pool + verification of the signature against the public key).
        let pool = {
            let key = meshca_hsm::open_key(&uri).unwrap();
            let tbs = tbs.clone();
            move |seconds| {
                let (key, tbs) = (key.clone(), tbs.clone());
                rate(
                    threads,
                    seconds,
                    || (),
                    move |_| {
                        key.sign_message(&tbs).unwrap();
                    },
                )
            }
        };
        let through_meshca = {
            let key = Arc::new(token_key);
            let tbs = tbs.clone();
            move |seconds| {
                let (key, tbs) = (key.clone(), tbs.clone());
                rate(
                    threads,
                    seconds,
                    || (),
                    move |_| {
                        key.sign(&tbs).unwrap();
                    },
                )
            }
        };
        let certs = |ca: Arc<LocalCa>| {
            let (csr, ids) = (csr.clone(), ids.clone());
            move |seconds| {
                let (ca, csr, ids) = (ca.clone(), csr.clone(), ids.clone());
                rate(
                    threads,
                    seconds,
                    || (),
                    move |_| {
                        let options = CertOptions {
                            subject_ids: &ids,
                            ttl_seconds: 3600,
                            for_ca: false,
                        };
                        ca.sign_with_cert_chain(csr.as_bytes(), &options).unwrap();
                    },
                )
            }
        };
        let cases: Vec<Box<dyn Fn(f64) -> f64>> = vec![
            Box::new(raw),
            Box::new(pool),
            Box::new(through_meshca),
            Box::new(certs(token_ca)),
            Box::new(certs(file_ca)),
        ];
        // Short rounds, the cases interleaved, medians: other load on the
        // machine then weighs on every case alike.
        let rounds = 5;
        let mut results = vec![Vec::new(); cases.len()];
        for _ in 0..rounds {
            for (case, out) in cases.iter().zip(results.iter_mut()) {
                out.push(case(seconds / rounds as f64));
            }
        }
        let median = |v: &mut Vec<f64>| {
            v.sort_by(|a, b| a.partial_cmp(b).unwrap());
            v[v.len() / 2]
        };
        let [raw, pool, through_meshca, token_certs, file_certs] =
            [0, 1, 2, 3, 4].map(|i| median(&mut results[i].clone()));
        println!(
            "| {label} | {raw:.0} | {pool:.0} | {through_meshca:.0} | {:.0}% | {token_certs:.0} | {file_certs:.0} | {:.0}% |",
            100.0 * through_meshca / raw,
            100.0 * token_certs / file_certs
        );
    }
}
