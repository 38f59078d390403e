//! meshca-hsm against a real module: SoftHSM2 with a token of this test's own.
#![allow(unsafe_code)]

use std::sync::{Arc, Mutex, OnceLock};
use std::thread;

use meshca_hsm::{Defaults, PinSource};
use meshca_pki::key::SignError;
use meshca_pki::{KeyType, SigningKey};
use meshca_testsupport::softhsm::{SOFTHSM_MODULE, SoftHsm};

/// One SoftHSM configuration per test process: SoftHSM reads
/// SOFTHSM2_CONF when the module is initialised, once.
fn hsm() -> &'static SoftHsm {
    static HSM: OnceLock<SoftHsm> = OnceLock::new();
    HSM.get_or_init(|| {
        let hsm = SoftHsm::new("meshca-test", "1234");
        // SAFETY: set once, before this process loads the module; the
        // other tests wait on this OnceLock before touching PKCS#11.
        unsafe { std::env::set_var("SOFTHSM2_CONF", hsm.conf()) };
        meshca_hsm::set_defaults(Defaults {
            module: Some(SOFTHSM_MODULE.into()),
            pin: PinSource::File(hsm.pin_file()),
        });
        hsm
    })
}

/// Tests that take the token away run alone.
static EXCLUSIVE: Mutex<()> = Mutex::new(());

fn shared() -> std::sync::MutexGuard<'static, ()> {
    EXCLUSIVE.lock().unwrap_or_else(|e| e.into_inner())
}

fn verify(key: &SigningKey, message: &[u8], signature: &[u8]) {
    use aws_lc_rs::signature::{
        ECDSA_P256_SHA256_ASN1, ECDSA_P384_SHA384_ASN1, RSA_PKCS1_2048_8192_SHA256,
        UnparsedPublicKey, VerificationAlgorithm,
    };
    let d = key.describe();
    let alg: &dyn VerificationAlgorithm = if d.starts_with("RSA") {
        &RSA_PKCS1_2048_8192_SHA256
    } else if d.starts_with("ECDSA P-256") {
        &ECDSA_P256_SHA256_ASN1
    } else {
        &ECDSA_P384_SHA384_ASN1
    };
    UnparsedPublicKey::new(alg, key.public_key_bits())
        .verify(message, signature)
        .unwrap_or_else(|_| panic!("{d}: signature does not verify"));
}

#[test]
fn keys_generated_in_the_token_sign_with_the_file_key_algorithms() {
    let hsm = hsm();
    let _g = shared();
    for key_type in [
        KeyType::Rsa2048,
        KeyType::Rsa3072,
        KeyType::Rsa4096,
        KeyType::EcdsaP256,
        KeyType::EcdsaP384,
    ] {
        let uri = hsm.uri(&format!("gen-{key_type}"));
        let key = meshca_hsm::generate_key(&uri, key_type).unwrap();
        let file = SigningKey::generate(key_type).unwrap();
        assert_eq!(
            key.signature_algorithm_der(),
            file.signature_algorithm_der(),
            "{key_type}"
        );
        assert_eq!(key.spki_der().len(), file.spki_der().len(), "{key_type}");
        let signature = key.sign(b"to be signed").unwrap();
        verify(&key, b"to be signed", &signature);
        assert!(
            format!("{key:?}").contains(&uri),
            "Debug names the URI: {key:?}"
        );
        // The private key cannot be exported.
        assert!(key.to_pkcs8_der().is_err());
        // Generating again under the same name is refused.
        let again = meshca_hsm::generate_key(&uri, key_type).unwrap_err();
        assert!(again.message.contains("already exists"), "{again}");
    }
}

#[test]
fn a_key_can_be_named_by_id_and_opened_again() {
    let hsm = hsm();
    let _g = shared();
    let uri = format!("pkcs11:token={};object=by-id;id=%42%43", hsm.label);
    let key = meshca_hsm::generate_key(&uri, KeyType::EcdsaP256).unwrap();
    let by_id = meshca_hsm::signing_key(&format!("pkcs11:token={};id=%42%43", hsm.label)).unwrap();
    assert_eq!(by_id.public_key_bits(), key.public_key_bits());
    let missing = meshca_hsm::signing_key(&hsm.uri("no-such-key")).unwrap_err();
    assert!(missing.message.contains("no private key"), "{missing}");
}

#[test]
fn parallel_signers_use_several_sessions() {
    let hsm = hsm();
    let _g = shared();
    let uri = hsm.uri("parallel");
    meshca_hsm::generate_key(&uri, KeyType::EcdsaP256).unwrap();
    let key = meshca_hsm::open_key(&uri).unwrap();
    let signing = Arc::new(SigningKey::external(key.clone()));
    let handles: Vec<_> = (0..8)
        .map(|i| {
            let signing = signing.clone();
            thread::spawn(move || {
                for j in 0..50 {
                    let message = format!("{i}-{j}");
                    let signature = signing.sign(message.as_bytes()).unwrap();
                    verify(&signing, message.as_bytes(), &signature);
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    assert!(
        key.idle_sessions() > 1,
        "parallel requests opened more than one session ({})",
        key.idle_sessions()
    );
}

#[test]
fn a_removed_token_fails_each_request_and_its_return_restores_service() {
    let hsm = hsm();
    let _g = shared();
    let uri = hsm.uri("removable");
    let key = meshca_hsm::generate_key(&uri, KeyType::Rsa2048).unwrap();
    key.sign(b"before").unwrap();

    hsm.remove_tokens();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let error = loop {
        match key.sign(b"while removed") {
            Err(e) => break e,
            Ok(_) if std::time::Instant::now() < deadline => {
                thread::sleep(std::time::Duration::from_millis(100))
            }
            Ok(_) => panic!("signing still works 10 s after the token's files were removed"),
        }
    };
    assert!(matches!(error, SignError::KeyUnavailable(_)), "{error:?}");
    for _ in 0..3 {
        assert!(key.sign(b"still removed").is_err());
    }

    hsm.restore_tokens();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match key.sign(b"after") {
            Ok(signature) => {
                verify(&key, b"after", &signature);
                break;
            }
            Err(e) if std::time::Instant::now() < deadline => {
                let _ = e;
                thread::sleep(std::time::Duration::from_millis(200))
            }
            Err(e) => panic!("the restored token does not sign: {e}"),
        }
    }
}

#[test]
fn debug_of_token_keys_and_bundles_names_the_uri_and_never_the_pin() {
    let hsm = hsm();
    let _g = shared();
    let uri = hsm.uri("debug");
    let key = meshca_hsm::generate_key(&uri, KeyType::EcdsaP256).unwrap();
    let token_key = meshca_hsm::open_key(&uri).unwrap();
    let root = meshca_pki::profile::self_signed_root(
        &meshca_pki::profile::CaCertRequest {
            subject_der: &meshca_pki::cert::organization_name("debug"),
            key: &key,
            ttl: std::time::Duration::from_secs(3600),
        },
        time::OffsetDateTime::now_utc(),
    )
    .unwrap();
    let bundle = meshca_pki::CaBundle::from_parts(
        key,
        root.clone(),
        vec![],
        vec![root],
        time::OffsetDateTime::now_utc(),
    )
    .unwrap();
    let pin = PinSource::File(hsm.pin_file()).read().unwrap();
    for debug in [
        format!("{token_key:?}"),
        format!("{bundle:?}"),
        format!("{bundle:#?}"),
        format!("{pin:?}"),
        format!("{:?}", PinSource::File(hsm.pin_file())),
    ] {
        assert!(!debug.contains(&hsm.pin), "the PIN in a Debug: {debug}");
    }
    assert!(format!("{bundle:?}").contains(&uri));
}

/// A session of this process on the test token, outside meshca-hsm (the
/// module is loaded once per process, so this shares its login state).
fn raw_session() -> cryptoki::session::Session {
    use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
    let ctx = Pkcs11::new(SOFTHSM_MODULE).unwrap();
    let _ = ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK));
    let slot = ctx
        .get_slots_with_token()
        .unwrap()
        .into_iter()
        .find(|s| ctx.get_token_info(*s).unwrap().label() == hsm().label)
        .unwrap();
    ctx.open_ro_session_no_drop(slot).unwrap()
}

#[test]
fn generated_keys_are_sensitive_and_never_extractable() {
    use cryptoki::object::{Attribute, AttributeType, ObjectClass};
    let hsm = hsm();
    let _g = shared();
    meshca_hsm::generate_key(&hsm.uri("attributes"), KeyType::EcdsaP256).unwrap();
    let session = raw_session();
    let key = session
        .find_objects(&[
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::Label(b"attributes".to_vec()),
        ])
        .unwrap()[0];
    let attrs = session
        .get_attributes(
            key,
            &[
                AttributeType::Sensitive,
                AttributeType::Extractable,
                AttributeType::NeverExtractable,
                AttributeType::Token,
            ],
        )
        .unwrap();
    for a in attrs {
        match a {
            Attribute::Sensitive(v) => assert!(v, "CKA_SENSITIVE"),
            Attribute::Extractable(v) => assert!(!v, "CKA_EXTRACTABLE"),
            Attribute::NeverExtractable(v) => assert!(v, "CKA_NEVER_EXTRACTABLE"),
            Attribute::Token(v) => assert!(v, "CKA_TOKEN"),
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn a_lost_login_is_renewed_without_failing_the_request() {
    let hsm = hsm();
    let _g = shared();
    let uri = hsm.uri("logout");
    let key = meshca_hsm::generate_key(&uri, KeyType::EcdsaP256).unwrap();
    key.sign(b"logged in").unwrap();
    // Logging out ends the login of every session of this process.
    raw_session().logout().unwrap();
    let signature = key.sign(b"after logout").unwrap();
    verify(&key, b"after logout", &signature);
}

#[test]
fn parallel_signers_through_a_removal_and_return_get_errors_then_signatures() {
    let hsm = hsm();
    let _g = shared();
    let uri = hsm.uri("hammered");
    let key = Arc::new(meshca_hsm::generate_key(&uri, KeyType::EcdsaP256).unwrap());
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let (key, stop) = (key.clone(), stop.clone());
            thread::spawn(move || {
                let (mut ok, mut failed) = (0u32, 0u32);
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    match key.sign(b"hammer") {
                        Ok(signature) => {
                            verify(&key, b"hammer", &signature);
                            ok += 1;
                        }
                        Err(SignError::KeyUnavailable(_)) => failed += 1,
                        Err(other) => panic!("{other:?}"),
                    }
                }
                (ok, failed)
            })
        })
        .collect();
    thread::sleep(std::time::Duration::from_millis(300));
    hsm.remove_tokens();
    thread::sleep(std::time::Duration::from_millis(1500));
    hsm.restore_tokens();
    thread::sleep(std::time::Duration::from_millis(2500));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (mut ok, mut failed) = (0, 0);
    for w in workers {
        let (o, f) = w.join().expect("a signer thread panicked");
        ok += o;
        failed += f;
    }
    assert!(failed > 0, "removing the token failed no request");
    assert!(ok > 0);
    // Service is back after the return.
    let signature = key.sign(b"after").unwrap();
    verify(&key, b"after", &signature);
}
