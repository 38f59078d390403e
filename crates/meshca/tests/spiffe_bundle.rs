//! The SPIFFE bundle endpoint (federation, `https_web`) as a real consumer
//! sees it: go-spiffe's federation client (testenv's `spiffe-client`) fetches
//! the bundle over HTTPS, verifies a meshca-issued SVID against it, and sees
//! the sequence grow when the root changes.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Proc, free_port, meshca};
use meshca_testsupport::{bin, openssl};

/// `spiffe-client ARGS`: (success, stdout + stderr).
fn spiffe_client(args: &[&str]) -> (bool, String) {
    let out = Command::new(bin("spiffe-client"))
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn field(output: &str, name: &str) -> u64 {
    output
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no {name} in {output}"))
        .trim()
        .parse()
        .unwrap()
}

/// A web PKI certificate for 127.0.0.1 (its own root), for the endpoint.
fn web_certificate(dir: &Path) {
    openssl::run(
        dir,
        &[
            "req",
            "-x509",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "web.key",
            "-subj",
            "/CN=bundle.example",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "-days",
            "2",
            "-out",
            "web.crt",
        ],
    )
    .unwrap();
}

fn wait_port(addr: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {addr}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn go_spiffe_fetches_the_bundle_verifies_an_svid_and_sees_the_sequence_grow() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let s = |p: &Path| p.display().to_string();
    let (ca, next, state) = (dir.join("cacerts"), dir.join("next"), dir.join("state"));
    meshca(&[
        "ca",
        "init",
        "--out",
        &s(&ca),
        "--key-type",
        "ecdsa-p256",
        "--org",
        "cluster.local",
    ])
    .unwrap();
    web_certificate(dir);
    let grpc = format!("127.0.0.1:{}", free_port());
    let bundle_addr = format!("127.0.0.1:{}", free_port());
    let _server = Proc(
        Command::new(env!("CARGO_BIN_EXE_meshca"))
            .args([
                "server",
                "--standalone",
                "--listen",
                &grpc,
                "--monitoring-listen",
                "none",
            ])
            .args([
                "--root-ca-dir",
                &s(&ca),
                "--state-dir",
                &s(&state),
                "--reload-interval",
                "1s",
            ])
            .args(["--spiffe-bundle-listen", &bundle_addr])
            .args(["--spiffe-bundle-cert", &s(&dir.join("web.crt"))])
            .args(["--spiffe-bundle-key", &s(&dir.join("web.key"))])
            .args(["--spiffe-bundle-refresh-hint", "1m"])
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_port(&grpc);
    wait_port(&bundle_addr);

    // An SVID from meshca, as a workload gets one.
    let token = Command::new(env!("CARGO_BIN_EXE_meshca"))
        .args(["token", "--state-dir", &s(&state), "--namespace", "default"])
        .args(["--service-account", "demo"])
        .output()
        .unwrap();
    assert!(token.status.success());
    std::fs::write(dir.join("demo.token"), &token.stdout).unwrap();
    let certs = dir.join("certs");
    meshca(&[
        "request",
        "--addr",
        &grpc,
        "--root",
        &s(&ca.join("root-cert.pem")),
        "--token-file",
        &s(&dir.join("demo.token")),
        "--key-type",
        "ecdsa-p256",
        "--out",
        &s(&certs),
    ])
    .unwrap();

    let url = format!("https://{bundle_addr}/");
    let web_root = s(&dir.join("web.crt"));
    let svid = s(&certs.join("cert-chain.pem"));
    let fetch = |svid: Option<&str>| {
        let mut args = vec![
            "-trust-domain",
            "cluster.local",
            "-url",
            &url,
            "-web-roots",
            &web_root,
        ];
        if let Some(svid) = svid {
            args.extend(["-svid", svid]);
        }
        spiffe_client(&args)
    };
    let (ok, first) = fetch(Some(&svid));
    assert!(ok, "{first}");
    assert!(
        first.contains("verified spiffe://cluster.local/ns/default/sa/demo"),
        "{first}"
    );
    assert_eq!(field(&first, "x509_authorities"), 1, "{first}");
    assert_eq!(field(&first, "refresh_hint"), 60, "{first}");
    let first_sequence = field(&first, "sequence");

    // The endpoint is authenticated: other web roots refuse it.
    openssl::self_signed(dir, "other", "/CN=other", 1).unwrap();
    let (ok, text) = spiffe_client(&[
        "-trust-domain",
        "cluster.local",
        "-url",
        &url,
        "-web-roots",
        &s(&dir.join("other.crt")),
    ]);
    assert!(!ok, "{text}");
    // The bundle is for its own trust domain only.
    let (ok, text) = spiffe_client(&[
        "-trust-domain",
        "example.org",
        "-url",
        &url,
        "-web-roots",
        &web_root,
        "-svid",
        &svid,
    ]);
    assert!(
        !ok,
        "an SVID of cluster.local verified against example.org's bundle: {text}"
    );

    // A new root (plugged cacerts replaced): a new bundle with a larger
    // sequence, which no longer trusts the old root's SVID.
    meshca(&[
        "ca",
        "init",
        "--out",
        &s(&next),
        "--key-type",
        "ecdsa-p256",
        "--org",
        "cluster.local",
    ])
    .unwrap();
    for f in [
        "ca-key.pem",
        "cert-chain.pem",
        "root-cert.pem",
        "ca-cert.pem",
    ] {
        std::fs::copy(next.join(f), dir.join(f)).unwrap();
        std::fs::rename(dir.join(f), ca.join(f)).unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let rotated = loop {
        let (ok, text) = fetch(None);
        assert!(ok, "{text}");
        if field(&text, "sequence") > first_sequence {
            break text;
        }
        assert!(Instant::now() < deadline, "the sequence never grew: {text}");
        std::thread::sleep(Duration::from_millis(300));
    };
    assert_eq!(field(&rotated, "x509_authorities"), 1, "{rotated}");
    let (ok, text) = fetch(Some(&svid));
    assert!(!ok, "the old root's SVID still verifies: {text}");
}
