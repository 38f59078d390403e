//! [`TestNode`]: the real node of `testenv/up node` (kubelet `127.0.0.1` on a
//! private containerd, with kube-controller-manager and kube-scheduler), and
//! the container images its pods run: built from local files by
//! `deploy/image/build`, imported with `testenv/node-import`, never pulled.
//!
//! Pods on this node use `hostNetwork: true`, listen on 127.0.0.1 only, and
//! use `imagePullPolicy: Never`. A pod that talks to the apiserver sets
//! `KUBERNETES_SERVICE_HOST=127.0.0.1` and `KUBERNETES_SERVICE_PORT` to
//! [`TestNode::apiserver_port`] (the `kubernetes` Service's ClusterIP leads
//! nowhere: there is no kube-proxy).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

const HOW_TO_START_NODE: &str = "no testenv node: MESHCA_TESTENV_NODE / MESHCA_TESTENV_CTR / \
MESHCA_TESTENV_NODE_IMPORT / MESHCA_TESTENV_APISERVER_PORT are not set.\n\
This test needs the real node (kubelet, containerd, scheduler, controller-manager). \
Start a testenv with it from the repository root and run the tests in the same shell:\n\
\n    env=\"$(testenv/up node)\" && eval \"$env\"\n    cargo test ...\n    testenv/down\n\n\
or run the whole suite with ./test (it starts the node). These tests never skip.";

/// The running node's settings, from the variables `testenv/up node` exports.
#[derive(Debug, Clone)]
pub struct TestNode {
    /// `MESHCA_TESTENV_NODE`: the Node's name (and its InternalIP), `127.0.0.1`.
    pub name: String,
    /// `MESHCA_TESTENV_CTR`: `ctr` on the node's containerd, namespace k8s.io.
    pub ctr: PathBuf,
    /// `MESHCA_TESTENV_NODE_IMPORT`: `testenv/node-import`.
    pub import: PathBuf,
    /// `MESHCA_TESTENV_APISERVER_PORT`: for `KUBERNETES_SERVICE_PORT` in pods.
    pub apiserver_port: u16,
    /// `MESHCA_TESTENV_KUBELET_DIR`: the kubelet's root dir (pods' volumes are
    /// under `pods/<uid>/volumes/`).
    pub kubelet_dir: PathBuf,
}

impl TestNode {
    /// Reads the variables; errors with the instructions when they are absent.
    pub fn from_env() -> Result<Self> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let (Some(name), Some(ctr), Some(import), Some(port), Some(kubelet_dir)) = (
            var("MESHCA_TESTENV_NODE"),
            var("MESHCA_TESTENV_CTR"),
            var("MESHCA_TESTENV_NODE_IMPORT"),
            var("MESHCA_TESTENV_APISERVER_PORT"),
            var("MESHCA_TESTENV_KUBELET_DIR"),
        ) else {
            bail!("{HOW_TO_START_NODE}");
        };
        let node = TestNode {
            name,
            ctr: ctr.into(),
            import: import.into(),
            apiserver_port: port
                .parse()
                .context("MESHCA_TESTENV_APISERVER_PORT is not a port")?,
            kubelet_dir: kubelet_dir.into(),
        };
        if !node.ctr.is_file() {
            bail!(
                "MESHCA_TESTENV_CTR={} does not exist (the node was stopped?).\n{HOW_TO_START_NODE}",
                node.ctr.display()
            );
        }
        Ok(node)
    }

    /// The node; panics with instructions how to start it when there is none.
    pub fn get() -> Self {
        Self::from_env().unwrap_or_else(|e| panic!("meshca-testsupport: {e:#}"))
    }

    /// Imports an OCI image archive into the node's containerd; returns the
    /// image name (`docker.io/library/NAME:TAG`) pods can use.
    pub fn import(&self, archive: &Path) -> Result<String> {
        let out = Command::new(&self.import)
            .arg(archive)
            .output()
            .with_context(|| format!("running {}", self.import.display()))?;
        if !out.status.success() {
            bail!(
                "node-import {}: {}",
                archive.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let name = String::from_utf8(out.stdout)?;
        name.lines()
            .next()
            .map(str::to_owned)
            .context("node-import printed no image name")
    }

    /// The directory of volume `volume` (plugin dir such as
    /// `kubernetes.io~projected`) of pod `uid`, as the kubelet wrote it: the
    /// same files the pod's containers see at their mount points.
    pub fn pod_volume(&self, uid: &str, plugin: &str, volume: &str) -> PathBuf {
        self.kubelet_dir
            .join("pods")
            .join(uid)
            .join("volumes")
            .join(plugin)
            .join(volume)
    }
}

/// An image built by `deploy/image/build` (OCI layout archive).
#[derive(Debug, Clone)]
pub struct Image {
    /// `docker.io/library/NAME:TAG` (the name in the archive's index).
    pub name: String,
    /// The manifest digest, `sha256:...`.
    pub digest: String,
    /// The archive.
    pub archive: PathBuf,
}

/// The repository root (where `deploy/` and `testenv/` are).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Runs `deploy/image/build PRESET ARGS... --out OUT`; see that script for the
/// presets (`meshca --bin FILE`, `pause`, `istio`, `custom ...`).
pub fn build_image(preset: &str, args: &[&str], out: &Path) -> Result<Image> {
    let script = repo_root().join("deploy/image/build");
    let res = Command::new(&script)
        .arg(preset)
        .args(args)
        .arg("--out")
        .arg(out)
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !res.status.success() {
        bail!(
            "deploy/image/build {preset} {args:?}: {}",
            String::from_utf8_lossy(&res.stderr).trim()
        );
    }
    let stdout = String::from_utf8(res.stdout)?;
    let mut words = stdout.split_whitespace();
    let (Some(digest), Some(name)) = (words.next(), words.next()) else {
        bail!("deploy/image/build printed {stdout:?}, not `DIGEST NAME ARCHIVE`");
    };
    Ok(Image {
        name: name.to_owned(),
        digest: digest.to_owned(),
        archive: out.to_owned(),
    })
}
