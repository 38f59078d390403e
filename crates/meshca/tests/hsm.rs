//! CA keys in a real PKCS#11 token (SoftHSM2): `meshca ca init --pkcs11`,
//! `meshca ca sign`, and `meshca server` with a plugged-in CA whose key is
//! in the token, through the token's removal and return. The binary runs
//! as an operator runs it, with SOFTHSM2_CONF pointing at this test's token.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use meshca_testsupport::softhsm::SoftHsm;
use meshca_testsupport::{Proc, free_port};

fn meshca(hsm: &SoftHsm, dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_meshca"))
        .current_dir(dir)
        .envs(hsm.env())
        .env("MESHCA_PKCS11_PIN_FILE", hsm.pin_file())
        .args(args)
        .output()
        .unwrap()
}

fn ok(hsm: &SoftHsm, dir: &Path, args: &[&str]) -> String {
    let out = meshca(hsm, dir, args);
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
fn ca_init_generates_each_key_type_in_the_token_and_ca_sign_uses_it() {
    let hsm = SoftHsm::new("ca-cli", "2468");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_csr(d);
    for key_type in [
        "rsa-2048",
        "rsa-3072",
        "rsa-4096",
        "ecdsa-p256",
        "ecdsa-p384",
    ] {
        let uri = hsm.uri(&format!("root-{key_type}"));
        let out = ok(
            &hsm,
            d,
            &[
                "ca",
                "init",
                "--out",
                key_type,
                "--key-type",
                key_type,
                "--pkcs11",
                &uri,
            ],
        );
        assert!(out.contains(&uri), "{out}");
        // The key file names the key; it holds no key.
        let key_file = std::fs::read_to_string(d.join(key_type).join("ca-key.pem")).unwrap();
        assert_eq!(key_file.trim(), uri);
        let chain = ok(
            &hsm,
            d,
            &[
                "ca",
                "sign",
                "--ca",
                key_type,
                "--csr",
                "w.csr",
                "--identity",
                "spiffe://cluster.local/ns/default/sa/hsm",
            ],
        );
        std::fs::write(d.join("chain.pem"), &chain).unwrap();
        let root = format!("{key_type}/root-cert.pem");
        let verified = openssl(d, &["verify", "-CAfile", &root, "chain.pem"]);
        assert!(
            verified.status.success(),
            "{key_type}: {}{}",
            String::from_utf8_lossy(&verified.stdout),
            String::from_utf8_lossy(&verified.stderr)
        );
        let text = String::from_utf8(openssl(d, &["x509", "-in", &root, "-noout", "-text"]).stdout)
            .unwrap();
        let algorithm = match key_type {
            "ecdsa-p384" => "ecdsa-with-SHA384",
            "ecdsa-p256" => "ecdsa-with-SHA256",
            _ => "sha256WithRSAEncryption",
        };
        assert!(text.contains(algorithm), "{key_type}: {text}");
    }
    // An intermediate in the token under a root in the token.
    let uri = hsm.uri("intermediate");
    ok(
        &hsm,
        d,
        &[
            "ca",
            "init",
            "--out",
            "int",
            "--intermediate-of",
            "ecdsa-p256",
            "--key-type",
            "ecdsa-p256",
            "--pkcs11",
            &uri,
        ],
    );
    let chain = ok(
        &hsm,
        d,
        &[
            "ca",
            "sign",
            "--ca",
            "int",
            "--csr",
            "w.csr",
            "--identity",
            "spiffe://cluster.local/ns/default/sa/hsm",
        ],
    );
    std::fs::write(d.join("chain.pem"), &chain).unwrap();
    let verified = openssl(
        d,
        &[
            "verify",
            "-CAfile",
            "ecdsa-p256/root-cert.pem",
            "-untrusted",
            "chain.pem",
            "chain.pem",
        ],
    );
    assert!(
        verified.status.success(),
        "{}",
        String::from_utf8_lossy(&verified.stderr)
    );

    // The same name twice is refused, and nothing is overwritten.
    let again = meshca(
        &hsm,
        d,
        &[
            "ca",
            "init",
            "--out",
            "again",
            "--key-type",
            "ecdsa-p256",
            "--pkcs11",
            &uri,
        ],
    );
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));
}

#[test]
fn ca_sign_without_the_token_fails_with_one_line_and_no_output() {
    let hsm = SoftHsm::new("ca-missing", "1357");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_csr(d);
    ok(
        &hsm,
        d,
        &[
            "ca",
            "init",
            "--out",
            "ca",
            "--key-type",
            "ecdsa-p256",
            "--pkcs11",
            &hsm.uri("k"),
        ],
    );
    hsm.remove_tokens();
    let out = meshca(
        &hsm,
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
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("no token matching"), "{stderr}");
    assert!(
        !stderr.contains("1357"),
        "the PIN is never printed: {stderr}"
    );
}

struct Server {
    _proc: Proc,
    addr: String,
}

fn start_server(hsm: &SoftHsm, d: &Path, ca: &str) -> Server {
    let addr = format!("127.0.0.1:{}", free_port());
    let monitoring = format!("127.0.0.1:{}", free_port());
    let child = Command::new(env!("CARGO_BIN_EXE_meshca"))
        .current_dir(d)
        .envs(hsm.env())
        .env("MESHCA_PKCS11_PIN_FILE", hsm.pin_file())
        .env_remove("KUBECONFIG")
        .args([
            "server",
            "--listen",
            &addr,
            "--monitoring-listen",
            &monitoring,
        ])
        .args([
            "--root-ca-dir",
            ca,
            "--state-dir",
            "state",
            "--reload-interval",
            "200ms",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let server = Server {
        _proc: Proc(child),
        addr,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(&server.addr).is_err() {
        assert!(Instant::now() < deadline, "meshca server did not listen");
        std::thread::sleep(Duration::from_millis(100));
    }
    server
}

fn request(hsm: &SoftHsm, d: &Path, server: &Server, root: &str) -> Output {
    let token = ok(
        hsm,
        d,
        &[
            "token",
            "--state-dir",
            "state",
            "--namespace",
            "default",
            "--service-account",
            "hsm",
        ],
    );
    std::fs::write(d.join("hsm.token"), token).unwrap();
    let _ = std::fs::remove_dir_all(d.join("out"));
    meshca(
        hsm,
        d,
        &[
            "request",
            "--addr",
            &server.addr,
            "--root",
            root,
            "--token-file",
            "hsm.token",
            "--out",
            "out",
            "--key-type",
            "ecdsa-p256",
        ],
    )
}

#[test]
fn the_server_signs_with_a_token_key_and_survives_the_token_being_removed() {
    let hsm = SoftHsm::new("server", "9753");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(
        &hsm,
        d,
        &[
            "ca",
            "init",
            "--out",
            "plugged",
            "--key-type",
            "rsa-2048",
            "--pkcs11",
            &hsm.uri("ca"),
        ],
    );
    let server = start_server(&hsm, d, "plugged");
    let root = "plugged/root-cert.pem";

    let out = request(&hsm, d, &server, root);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let verified = openssl(d, &["verify", "-CAfile", root, "out/cert-chain.pem"]);
    assert!(
        verified.status.success(),
        "{}",
        String::from_utf8_lossy(&verified.stderr)
    );

    hsm.remove_tokens();
    for _ in 0..3 {
        let out = request(&hsm, d, &server, root);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "signed without the token");
        assert!(stderr.contains("Internal"), "{stderr}");
        assert!(stderr.contains("[ca_key_unavailable]"), "{stderr}");
    }

    hsm.restore_tokens();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let out = request(&hsm, d, &server, root);
        if out.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "service did not come back with the token: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let verified = openssl(d, &["verify", "-CAfile", root, "out/cert-chain.pem"]);
    assert!(verified.status.success());
}

#[test]
fn the_server_moves_from_a_file_key_to_a_token_key_without_a_restart() {
    let hsm = SoftHsm::new("rotate", "8642");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // The root signs two intermediates: one with a file key, then one in the token.
    ok(
        &hsm,
        d,
        &["ca", "init", "--out", "root", "--key-type", "ecdsa-p256"],
    );
    ok(
        &hsm,
        d,
        &[
            "ca",
            "init",
            "--out",
            "plugged",
            "--intermediate-of",
            "root",
            "--key-type",
            "ecdsa-p256",
        ],
    );
    let server = start_server(&hsm, d, "plugged");
    let root = "root/root-cert.pem";
    let out = request(&hsm, d, &server, root);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let first = std::fs::read(d.join("out/cert-chain.pem")).unwrap();

    ok(
        &hsm,
        d,
        &[
            "ca",
            "init",
            "--out",
            "next",
            "--intermediate-of",
            "root",
            "--key-type",
            "ecdsa-p384",
            "--pkcs11",
            &hsm.uri("next"),
        ],
    );
    for f in [
        "ca-key.pem",
        "ca-cert.pem",
        "cert-chain.pem",
        "root-cert.pem",
    ] {
        std::fs::rename(d.join("next").join(f), d.join("plugged").join(f)).unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let out = request(&hsm, d, &server, root);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(
            openssl(d, &["x509", "-in", "out/cert-chain.pem", "-noout", "-text"]).stdout,
        )
        .unwrap();
        if text.contains("ecdsa-with-SHA384") {
            assert_ne!(std::fs::read(d.join("out/cert-chain.pem")).unwrap(), first);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the token key was not picked up: {text}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}
