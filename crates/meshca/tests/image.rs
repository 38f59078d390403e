//! `deploy/image/build` makes reproducible OCI image archives from local files:
//! the same inputs give byte-identical archives (so the same digest), and the
//! meshca image holds exactly the binary, the libraries `ldd` names, the
//! loader and a passwd for uid 65532, all owned by root, with fixed mtimes.
//! (`tests/node.rs` runs the image on the real node.)

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};
use meshca_testsupport::{Image, build_image};

const EPOCH: &str = "1767225600"; // 2026-01-01T00:00:00Z

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("{cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// blob `digest` of the OCI layout extracted at `dir`, as JSON.
fn blob_json(dir: &Path, digest: &str) -> Result<serde_json::Value> {
    let hex = digest.strip_prefix("sha256:").context("not sha256")?;
    Ok(serde_json::from_slice(&std::fs::read(
        dir.join("blobs/sha256").join(hex),
    )?)?)
}

fn build_twice(preset: &str, args: &[&str], dir: &Path) -> Result<Image> {
    let a = build_image(preset, args, &dir.join(format!("{preset}-a.tar")))?;
    let b = build_image(preset, args, &dir.join(format!("{preset}-b.tar")))?;
    assert_eq!(a.digest, b.digest, "{preset}: two builds, two digests");
    assert_eq!(
        std::fs::read(&a.archive)?,
        std::fs::read(&b.archive)?,
        "{preset}: archives differ"
    );
    Ok(a)
}

#[test]
fn meshca_image_is_reproducible_and_minimal() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let bin = env!("CARGO_BIN_EXE_meshca");
    let image = build_twice(
        "meshca",
        &["--bin", bin, "--tag", "repro", "--epoch", EPOCH],
        tmp.path(),
    )?;
    assert_eq!(image.name, "docker.io/library/meshca:repro");

    let oci = tmp.path().join("oci");
    std::fs::create_dir(&oci)?;
    run(Command::new("tar")
        .arg("-xf")
        .arg(&image.archive)
        .arg("-C")
        .arg(&oci))?;
    let index: serde_json::Value = serde_json::from_slice(&std::fs::read(oci.join("index.json"))?)?;
    let m = &index["manifests"][0];
    assert_eq!(m["digest"], image.digest.as_str());
    assert_eq!(
        m["annotations"]["io.containerd.image.name"],
        "docker.io/library/meshca:repro"
    );
    let manifest = blob_json(&oci, &image.digest)?;
    let config = blob_json(&oci, manifest["config"]["digest"].as_str().unwrap())?;
    let c = &config["config"];
    assert_eq!(c["User"], "65532:65532");
    assert_eq!(
        c["Entrypoint"],
        serde_json::json!(["/usr/local/bin/meshca"])
    );
    assert_eq!(config["created"], "2026-01-01T00:00:00Z");
    let head = run(Command::new("git").args(["rev-parse", "HEAD"]))?;
    let revision = c["Labels"]["org.opencontainers.image.revision"]
        .as_str()
        .unwrap_or_default();
    assert!(
        revision.starts_with(head.trim()),
        "revision label {revision:?}, HEAD {head}"
    );
    for l in ["version", "source", "revision"] {
        assert!(
            c["Labels"][format!("org.opencontainers.image.{l}")].is_string(),
            "label {l} missing"
        );
    }

    // The layer: exactly the binary, what ldd names, passwd/group and /tmp.
    let layer = manifest["layers"][0]["digest"].as_str().unwrap();
    let listing = run(Command::new("tar")
        .args(["--numeric-owner", "--full-time", "-tvzf"])
        .arg(oci.join("blobs/sha256").join(&layer[7..])))?;
    let mut files = BTreeMap::new();
    for line in listing.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        // perms owner/group size date time name [-> target]
        assert_eq!(f[1], "0/0", "not owned by root: {line}");
        assert_eq!(f[3], "2026-01-01", "mtime not the epoch: {line}");
        files.insert(f[5].trim_end_matches('/').to_owned(), f[0].to_owned());
    }
    let ldd = run(Command::new("ldd").arg(bin))?;
    let mut want: Vec<String> = vec![
        "usr/local/bin/meshca".into(),
        "etc/passwd".into(),
        "etc/group".into(),
        "tmp".into(),
    ];
    for line in ldd.lines() {
        let path = line
            .split("=>")
            .last()
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap_or_default();
        if path.starts_with('/') {
            want.push(path.trim_start_matches('/').to_owned());
        }
    }
    let regular: Vec<&String> = files
        .iter()
        .filter(|(_, mode)| !mode.starts_with('d'))
        .map(|(name, _)| name)
        .collect();
    for w in &want {
        assert!(
            files.contains_key(w),
            "{w} missing from the layer: {files:?}"
        );
    }
    assert_eq!(
        regular.len(),
        want.len() - 1, // tmp is a directory
        "unexpected files in the layer: {regular:?}, want {want:?}"
    );
    assert_eq!(files["tmp"], "drwxrwxrwt");
    Ok(())
}

#[test]
fn pause_image_is_reproducible_and_static() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let image = build_twice("pause", &["--epoch", EPOCH], tmp.path())?;
    assert_eq!(image.name, "docker.io/library/pause:meshca");
    Ok(())
}
