//! Key material on its way through meshca: never in a `{:?}`, and key
//! files written with their modes whatever the umask.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use meshca_ca_store::dir::{self, NewCa, OutFile};
use meshca_ca_store::{Material, Part};
use meshca_pki::{KeyType, SigningKey, pem};
use time::OffsetDateTime;

/// Fragments of a key that a `{:?}` must not show: the PEM body lines, and
/// as hex (either case) or decimals (a `Vec<u8>`'s Debug, compact or
/// pretty) the first 16 DER bytes and the first and last 16 that are not
/// public (PKCS#8 may carry the public key, which the certificate shows).
fn key_fragments(key_pem: &str, public: &[u8]) -> Vec<String> {
    let der = pem::parse_all(key_pem.as_bytes()).unwrap().remove(0).der;
    let mut fragments: Vec<String> = key_pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .map(str::to_owned)
        .collect();
    let private: Vec<&[u8]> = der
        .windows(16)
        .filter(|w| !public.windows(16).any(|p| p == *w))
        .collect();
    for bytes in [&der[..16], private[0], private[private.len() - 1]] {
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        fragments.push(hex.to_uppercase());
        fragments.push(hex);
        let decimals: Vec<String> = bytes.iter().map(u8::to_string).collect();
        // Bounded by `[`, `,` or `]`, so 92 does not match inside 192.
        fragments.push(format!(",{},", decimals.join(",")));
        fragments.push(format!("[{},", decimals.join(",")));
    }
    fragments
}

fn assert_redacted(what: &str, debug: String, fragments: &[String]) {
    // Whitespace out, so that `{:#?}` and `{:?}` read alike.
    let compact: String = debug.chars().filter(|c| !c.is_whitespace()).collect();
    for fragment in fragments {
        assert!(
            !compact.contains(fragment.as_str()),
            "{what}'s Debug shows key bytes ({fragment}):\n{debug}"
        );
    }
}

#[test]
fn no_type_holding_a_key_shows_it_in_debug() {
    for key_type in [KeyType::EcdsaP256, KeyType::Rsa2048] {
        let tmp = tempfile::tempdir().unwrap();
        let spec = NewCa {
            pkcs11: None,
            key_type,
            org: "cluster.local",
            ttl: Duration::from_secs(86400),
            issuer: None,
        };
        let (bundle, _) = dir::create(tmp.path(), &spec, false).unwrap();
        let key_pem = std::fs::read_to_string(tmp.path().join(dir::CA_KEY)).unwrap();
        let cert_pem = std::fs::read_to_string(tmp.path().join(dir::CA_CERT)).unwrap();
        let fragments = key_fragments(&key_pem, &bundle.key().spki_der());
        assert!(fragments.len() > 6, "{key_type}: the key has body lines");

        let block = pem::parse_all(key_pem.as_bytes()).unwrap();
        let key = SigningKey::from_pem(key_pem.as_bytes()).unwrap();
        let part = Part::new("ca-key.pem", key_pem.as_bytes());
        let material = Material {
            cert: Part::new("ca-cert.pem", cert_pem.as_bytes()),
            key: Part::new("ca-key.pem", key_pem.as_bytes()),
            chain: None,
            roots: None,
        };
        let loaded = material.load(OffsetDateTime::now_utc()).unwrap();
        let from_dir = dir::load(tmp.path(), OffsetDateTime::now_utc()).unwrap();
        for (what, debug) in [
            ("PemBlock", format!("{block:?}")),
            ("PemBlock", format!("{block:#?}")),
            ("SigningKey", format!("{key:?}")),
            ("CaBundle", format!("{bundle:?}")),
            ("CaBundle", format!("{loaded:#?}")),
            ("CaBundle", format!("{from_dir:?}")),
            ("Part", format!("{part:?}")),
            ("Material", format!("{material:?}")),
            ("Material", format!("{material:#?}")),
        ] {
            assert_redacted(what, debug, &fragments);
        }
        // What they do show.
        assert!(format!("{block:?}").contains("PRIVATE KEY"));
        assert_eq!(
            format!("{part:?}"),
            format!(
                "Part {{ name: \"ca-key.pem\", len: {}, .. }}",
                key_pem.len()
            )
        );
    }
}

/// A P-256 root CA of a day.
fn p256_root() -> NewCa<'static> {
    NewCa {
        pkcs11: None,
        key_type: KeyType::EcdsaP256,
        org: "cluster.local",
        ttl: Duration::from_secs(86400),
        issuer: None,
    }
}

/// `write_all`'s files, as `ls -l` would give their modes.
fn write_and_read_modes(dir: &Path) -> Vec<(String, u32)> {
    dir::write_all(
        dir,
        &[
            OutFile {
                name: "key.pem",
                contents: b"secret",
                secret: true,
            },
            OutFile {
                name: "cert.pem",
                contents: b"public",
                secret: false,
            },
        ],
        false,
    )
    .unwrap();
    let mut modes: Vec<(String, u32)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let mode = e.metadata().unwrap().permissions().mode() & 0o777;
            (e.file_name().to_string_lossy().into_owned(), mode)
        })
        .collect();
    modes.sort();
    modes
}

const CHILD: &str = "MESHCA_TEST_WRITE_UNDER_UMASK";

/// Run in a child process under a given umask (the test binary re-run by
/// `sh -c 'umask …; exec …'`, so no unsafe umask call here).
#[test]
fn written_files_get_their_modes_whatever_the_umask() {
    if let Ok(dir) = std::env::var(CHILD) {
        let modes = write_and_read_modes(Path::new(&dir));
        println!("MODES {modes:?}");
        return;
    }
    let exe = std::env::current_exe().unwrap();
    for umask in ["0000", "0022", "0077", "0777"] {
        let tmp = tempfile::tempdir().unwrap();
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "umask {umask} && exec \"$0\" --exact written_files_get_their_modes_whatever_the_umask --nocapture"
            ))
            .arg(&exe)
            .env(CHILD, tmp.path())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "umask {umask}: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Keys 0600, others 0644; no temporary file left behind.
        assert!(
            stdout.contains(r#"MODES [("cert.pem", 420), ("key.pem", 384)]"#),
            "umask {umask}: {stdout}"
        );
    }
}

/// The copies made while reading a CA from a Secret (kubernetes.io/tls and
/// istio-ca-secret) end in types whose Debug shows no key bytes either.
#[test]
fn cas_read_from_secrets_show_no_key_in_debug() {
    use k8s_openapi::ByteString;
    use k8s_openapi::api::core::v1::Secret;
    use meshca_ca_store::secret::{istio_data, load_istio, load_tls};
    use std::collections::BTreeMap;

    let tmp = tempfile::tempdir().unwrap();
    let spec = p256_root();
    let (bundle, _) = dir::create(tmp.path(), &spec, false).unwrap();
    let key_pem = std::fs::read_to_string(tmp.path().join(dir::CA_KEY)).unwrap();
    let cert_pem = std::fs::read_to_string(tmp.path().join(dir::CA_CERT)).unwrap();
    let fragments = key_fragments(&key_pem, &bundle.key().spki_der());

    let mut data = BTreeMap::new();
    data.insert("tls.crt".to_owned(), ByteString(cert_pem.into_bytes()));
    data.insert("tls.key".to_owned(), ByteString(key_pem.into_bytes()));
    let secret = Secret {
        data: Some(data),
        ..Default::default()
    };
    let from_tls = load_tls(&secret, OffsetDateTime::now_utc()).unwrap();
    let istio = istio_data(&bundle).unwrap();
    let from_istio = load_istio(&istio, OffsetDateTime::now_utc()).unwrap();
    for (what, debug) in [
        ("CaBundle from a tls Secret", format!("{from_tls:?}")),
        ("CaBundle from istio-ca-secret", format!("{from_istio:#?}")),
    ] {
        assert_redacted(what, debug, &fragments);
    }
    assert_eq!(
        from_istio.key().spki_der(),
        bundle.key().spki_der(),
        "the same key"
    );
}

/// A write that fails part way (here the key's temporary name is taken by
/// a directory; a full disk fails the same way) leaves no file of the set
/// behind, so the next start does not find a certificate without its key.
#[test]
fn a_failed_write_leaves_no_part_of_the_ca() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = tmp.path().join("ca");
    std::fs::create_dir_all(ca.join(format!(".{}.tmp", dir::CA_KEY))).unwrap();
    let spec = p256_root();
    let err = dir::create(&ca, &spec, false).unwrap_err();
    assert!(format!("{err:#}").contains(dir::CA_KEY), "{err:#}");
    let mut left: Vec<String> = std::fs::read_dir(&ca)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, [format!(".{}.tmp", dir::CA_KEY)], "only the obstacle");
    assert!(!dir::has_ca(&ca));

    std::fs::remove_dir(ca.join(format!(".{}.tmp", dir::CA_KEY))).unwrap();
    dir::create(&ca, &spec, false).unwrap();
    dir::load(&ca, OffsetDateTime::now_utc()).unwrap();
}
