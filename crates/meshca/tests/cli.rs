//! The offline CLI as an operator uses it: `ca init`, `ca sign`, `inspect`,
//! `verify`, checked with the real openssl CLI.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use base64::Engine;

fn meshca(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_meshca"))
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap()
}

fn ok(dir: &Path, args: &[&str]) -> String {
    let out = meshca(dir, args);
    assert!(
        out.status.success(),
        "meshca {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn openssl(dir: &Path, args: &[&str]) -> Output {
    Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap()
}

/// `w.csr` (P-256, subject `O=`) and its key `w.key`, by the openssl CLI.
fn make_csr(dir: &Path) {
    meshca_testsupport::openssl::csr_pem(dir, "w", "/O=").unwrap();
}

#[test]
fn ca_init_writes_the_cacerts_layout_with_a_private_key_file_and_never_overwrites() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(d, &["ca", "init", "--out", "root"]);
    for (file, mode) in [
        ("ca-cert.pem", 0o644),
        ("ca-key.pem", 0o600),
        ("cert-chain.pem", 0o644),
        ("root-cert.pem", 0o644),
    ] {
        let meta = std::fs::metadata(d.join("root").join(file)).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, mode, "{file}");
    }
    let text = String::from_utf8(
        openssl(d, &["x509", "-in", "root/ca-cert.pem", "-noout", "-text"]).stdout,
    )
    .unwrap();
    assert!(text.contains("Subject: O = cluster.local\n"), "{text}");
    assert!(
        text.contains("CA:TRUE") && text.contains("Certificate Sign"),
        "{text}"
    );
    assert!(
        text.contains("Public-Key: (2048 bit)"),
        "default key type is RSA-2048: {text}"
    );

    let before = std::fs::read(d.join("root/ca-key.pem")).unwrap();
    let out = meshca(d, &["ca", "init", "--out", "root"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("refusing to overwrite"));
    assert_eq!(
        std::fs::read(d.join("root/ca-key.pem")).unwrap(),
        before,
        "key replaced without --force"
    );
    ok(
        d,
        &[
            "ca",
            "init",
            "--out",
            "root",
            "--force",
            "--key-type",
            "ecdsa-p384",
            "--org",
            "example.org",
        ],
    );
    assert_ne!(std::fs::read(d.join("root/ca-key.pem")).unwrap(), before);
    let text = String::from_utf8(
        openssl(
            d,
            &["x509", "-in", "root/ca-cert.pem", "-noout", "-subject"],
        )
        .stdout,
    )
    .unwrap();
    assert_eq!(text.trim(), "subject=O = example.org");
}

#[test]
fn ca_sign_prints_leaf_intermediate_root_that_openssl_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(
        d,
        &["ca", "init", "--out", "root", "--key-type", "ecdsa-p256"],
    );
    ok(
        d,
        &["ca", "init", "--out", "int", "--intermediate-of", "root"],
    );
    make_csr(d);
    let id = "spiffe://cluster.local/ns/default/sa/bookinfo";
    let chain = ok(
        d,
        &[
            "ca",
            "sign",
            "--ca",
            "int",
            "--csr",
            "w.csr",
            "--identity",
            id,
            "--ttl",
            "2h",
        ],
    );
    assert_eq!(chain.matches("BEGIN CERTIFICATE").count(), 3);
    std::fs::write(d.join("chain.pem"), &chain).unwrap();
    let leaf_end = chain.find("-----END CERTIFICATE-----").unwrap() + 26;
    std::fs::write(d.join("leaf.pem"), &chain[..leaf_end]).unwrap();
    let root = std::fs::read_to_string(d.join("root/root-cert.pem")).unwrap();
    assert!(chain.ends_with(&root), "root last");
    let out = openssl(
        d,
        &[
            "verify",
            "-CAfile",
            "root/root-cert.pem",
            "-untrusted",
            "int/ca-cert.pem",
            "leaf.pem",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    let json: serde_json::Value =
        serde_json::from_str(&ok(d, &["inspect", "--json", "chain.pem"])).unwrap();
    assert_eq!(json[0]["type"], "certificate");
    assert_eq!(json[0]["spiffe_ids"][0], id);
    assert_eq!(json[0]["is_ca"], false);
    assert_eq!(json[0]["key"], "ECDSA P-256");
    let left = json[0]["seconds_left"].as_i64().unwrap();
    assert!((7000..=7200).contains(&left), "{left}");
    assert_eq!(json[1]["is_ca"], true);
    assert_eq!(json[2]["self_signed"], true);
    assert_eq!(json[0]["sha256_fingerprint"].as_str().unwrap().len(), 95);

    let csr: serde_json::Value =
        serde_json::from_str(&ok(d, &["inspect", "--json", "w.csr"])).unwrap();
    assert_eq!(csr[0]["type"], "certificate_request");
    assert_eq!(csr[0]["key"], "ECDSA P-256");
}

#[test]
fn ca_sign_errors_are_one_line_on_stderr_and_nothing_on_stdout() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(
        d,
        &["ca", "init", "--out", "ca", "--key-type", "ecdsa-p256"],
    );
    make_csr(d);
    std::fs::write(d.join("garbage.csr"), "not a csr").unwrap();
    let cases: [(&[&str], &str); 4] = [
        (&["--csr", "garbage.csr"], "csr_not_pem"),
        (&["--csr", "w.csr", "--ttl", "100days"], "ttl_too_long"),
        (&["--csr", "missing.csr"], "missing.csr"),
        (&["--csr", "w.csr", "--ca", "nowhere"], "no CA found"),
    ];
    for (extra, expected) in cases {
        let mut args = vec![
            "ca",
            "sign",
            "--identity",
            "spiffe://cluster.local/ns/a/sa/b",
        ];
        if !extra.contains(&"--ca") {
            args.extend(["--ca", "ca"]);
        }
        args.extend(extra);
        let out = meshca(d, &args);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(out.stdout.is_empty(), "{args:?} printed on stdout");
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
    // A partial bundle names the missing file.
    std::fs::remove_file(d.join("ca/ca-key.pem")).unwrap();
    let out = meshca(
        d,
        &[
            "ca",
            "sign",
            "--ca",
            "ca",
            "--csr",
            "w.csr",
            "--identity",
            "x",
        ],
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("ca-key.pem: missing"));
}

/// The JSON `istioctl proxy-config secret <pod> -o json` prints.
fn proxy_secret(trusted_ca_pem: &str, chain_pem: &str) -> String {
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    serde_json::json!({
        "dynamicActiveSecrets": [
            {"name": "default", "versionInfo": "2026-11-30T10:00:00Z", "lastUpdated": "2026-11-30T10:00:00Z",
             "secret": {"@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret",
                        "name": "default",
                        "tlsCertificate": {"certificateChain": {"inlineBytes": b64(chain_pem)},
                                           "privateKey": {"inlineBytes": "W3JlZGFjdGVkXQ=="}}}},
            {"name": "ROOTCA", "versionInfo": "2026-11-30T10:00:00Z", "lastUpdated": "2026-11-30T10:00:00Z",
             "secret": {"@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret",
                        "name": "ROOTCA",
                        "validationContext": {"trustedCa": {"inlineBytes": b64(trusted_ca_pem)}}}}
        ]
    })
    .to_string()
}

#[test]
fn verify_passes_only_when_the_proxy_trusts_exactly_the_root_and_its_chain_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(
        d,
        &["ca", "init", "--out", "ca", "--key-type", "ecdsa-p256"],
    );
    ok(
        d,
        &["ca", "init", "--out", "other", "--key-type", "ecdsa-p256"],
    );
    make_csr(d);
    let chain = ok(
        d,
        &[
            "ca",
            "sign",
            "--ca",
            "ca",
            "--csr",
            "w.csr",
            "--identity",
            "spiffe://cluster.local/ns/a/sa/b",
        ],
    );
    let root = std::fs::read_to_string(d.join("ca/root-cert.pem")).unwrap();
    let other = std::fs::read_to_string(d.join("other/root-cert.pem")).unwrap();
    let leaf = &chain[..chain.find(&root).unwrap()];
    std::fs::write(d.join("chain.pem"), &chain).unwrap();

    let out = ok(
        d,
        &[
            "verify",
            "--root",
            "ca/root-cert.pem",
            "--chain",
            "chain.pem",
        ],
    );
    assert!(out.contains("OK"), "{out}");

    std::fs::write(d.join("good.json"), proxy_secret(&root, leaf)).unwrap();
    let out = ok(
        d,
        &[
            "verify",
            "--root",
            "ca/root-cert.pem",
            "--proxy-secret",
            "good.json",
        ],
    );
    assert!(out.contains("spiffe://cluster.local/ns/a/sa/b"), "{out}");

    // The proxy trusts another root: the seed's comparison fails, and says so.
    std::fs::write(d.join("wrong-trust.json"), proxy_secret(&other, leaf)).unwrap();
    let out = meshca(
        d,
        &[
            "verify",
            "--root",
            "ca/root-cert.pem",
            "--proxy-secret",
            "wrong-trust.json",
        ],
    );
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("does not trust the root") && text.contains("not the given root"),
        "{text}"
    );

    // The chain was issued by another CA.
    let out = meshca(
        d,
        &[
            "verify",
            "--root",
            "other/root-cert.pem",
            "--chain",
            "chain.pem",
        ],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("does not verify"));

    // Not an Envoy secrets dump: a clear error.
    std::fs::write(d.join("empty.json"), "{}").unwrap();
    let out = meshca(
        d,
        &[
            "verify",
            "--root",
            "ca/root-cert.pem",
            "--proxy-secret",
            "empty.json",
        ],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no ROOTCA secret"));
}

#[test]
fn jwt_keys_without_an_issuer_are_refused_before_anything_starts() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("keys.pem"), "").unwrap();
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_meshca"));
        cmd.current_dir(d)
            .args(["server", "--standalone", "--state-dir", "state"])
            .args(args)
            .env_remove("MESHCA_JWT_KEYS")
            .env_remove("MESHCA_JWT_ISSUER");
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    };
    for out in [
        run(&["--jwt-keys", "keys.pem"], &[]),
        run(&[], &[("MESHCA_JWT_KEYS", "keys.pem")]),
    ] {
        assert_eq!(out.status.code(), Some(2), "a usage error");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("required arguments were not provided")
                && stderr.contains("--jwt-issuer"),
            "{stderr}"
        );
    }
    let out = run(&["--jwt-keys", "keys.pem", "--jwt-issuer", ""], &[]);
    assert_eq!(out.status.code(), Some(2), "an empty issuer is no issuer");
    assert!(!d.join("state").exists(), "nothing was started");
}
