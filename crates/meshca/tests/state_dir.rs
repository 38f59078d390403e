//! A full or read-only state directory under the standalone `meshca server`
//! (issue 13, part 1): it stops at startup with an error naming the file and
//! the cause, leaves no half-written key or root behind, and starts on the
//! same directory once it has room; a read-only directory that already holds
//! a CA (a read-only root filesystem in a pod) serves.
//!
//! "Full" is a tmpfs of one page, "read-only" a tmpfs mounted `ro` (chmod
//! does not stop root): the test needs root to mount them, and says so.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use common::{Proc, free_port};

/// A tmpfs mounted for the test, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, options: &str) -> Result<Tmpfs> {
        std::fs::create_dir_all(at)?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, "meshca-test"])
            .arg(at)
            .output()
            .context("running mount")?;
        if !out.status.success() {
            bail!(
                "mount -t tmpfs -o {options} {}: {}\nThis test mounts small tmpfs file systems \
                 (a full and a read-only state directory) and needs root (CAP_SYS_ADMIN): run it \
                 as root, e.g. `sudo -E cargo test -p meshca --features meshca/testenv --test state_dir`",
                at.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(Tmpfs(at.to_owned()))
    }

    fn remount(&self, options: &str) -> Result<()> {
        let out = Command::new("mount")
            .args(["-o", &format!("remount,{options}")])
            .arg(&self.0)
            .output()?;
        ensure!(
            out.status.success(),
            "remount {options}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn server(state: &Path, monitoring: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_meshca"));
    cmd.args(["server", "--standalone"])
        .args(["--listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--monitoring-listen", monitoring])
        .arg("--root-ca-dir")
        .arg(state.with_extension("no-plugged-ca"))
        .arg("--state-dir")
        .arg(state)
        .args(["--self-signed-key-type", "ecdsa-p256"]);
    cmd
}

/// Starts the server on `state`; it must exit with an error within 30 s.
fn fails_to_start(state: &Path) -> Result<Output> {
    let mut child = server(state, "none")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let t = Instant::now();
    while child.try_wait()?.is_none() {
        if t.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            bail!("meshca server still running after 30 s on a state directory it cannot write");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output()?;
    ensure!(!out.status.success(), "meshca server exited with success");
    Ok(out)
}

/// Starts the server on `state` and waits for /readyz.
fn starts(state: &Path) -> Result<Proc> {
    let monitoring = format!("127.0.0.1:{}", free_port());
    let mut proc = Proc(
        server(state, &monitoring)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()?,
    );
    common::wait_ready_blocking(&mut proc, &monitoring)?;
    Ok(proc)
}

/// Every file under `dir` (relative paths), directories left out.
fn files(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                todo.push(path);
            } else {
                out.push(path.strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    out.sort();
    out
}

#[test]
fn a_full_state_dir_fails_cleanly_and_the_same_dir_works_once_it_has_room() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let state = tmp.path().join("state");
    // One page: the first file fits, the second does not.
    let fs = Tmpfs::mount(&state, "size=4k,mode=0700")?;

    let out = fails_to_start(&state)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("the failed start said: {}", stderr.trim());
    ensure!(
        stderr.contains("No space left on device") && stderr.contains(&*state.to_string_lossy()),
        "the error names neither the cause nor the place: {stderr}"
    );
    let left = files(&state);
    ensure!(
        left.is_empty(),
        "a failed start left files behind (a half-written CA or key): {left:?}"
    );

    // Room again: the same directory works, with the whole CA.
    fs.remount("size=1m")?;
    let proc = starts(&state)?;
    drop(proc);
    let left = files(&state);
    for f in [
        "ca/ca-cert.pem",
        "ca/ca-key.pem",
        "ca/cert-chain.pem",
        "ca/root-cert.pem",
        "jwt/jwt-signing-key.pem",
        "jwt/jwt-public-key.pem",
    ] {
        ensure!(left.contains(&f.to_string()), "{f} missing: {left:?}");
    }
    ensure!(left.len() == 6, "temporary files left: {left:?}");
    use std::os::unix::fs::PermissionsExt;
    for key in ["ca/ca-key.pem", "jwt/jwt-signing-key.pem"] {
        let mode = std::fs::metadata(state.join(key))?.permissions().mode() & 0o777;
        ensure!(mode == 0o600, "{key} has mode {mode:o}");
    }
    let root = std::fs::read(state.join("ca/root-cert.pem"))?;

    // Read-only with the CA in it (a pod's read-only root filesystem): it
    // only reads, and serves the same root.
    fs.remount("ro")?;
    let proc = starts(&state)?;
    drop(proc);
    ensure!(std::fs::read(state.join("ca/root-cert.pem"))? == root);
    Ok(())
}

#[test]
fn a_read_only_empty_state_dir_fails_cleanly() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let state = tmp.path().join("state");
    let _fs = Tmpfs::mount(&state, "size=1m,ro")?;
    let out = fails_to_start(&state)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("the failed start said: {}", stderr.trim());
    ensure!(
        stderr.contains("Read-only file system") && stderr.contains(&*state.to_string_lossy()),
        "the error names neither the cause nor the place: {stderr}"
    );
    ensure!(files(&state).is_empty());
    Ok(())
}
