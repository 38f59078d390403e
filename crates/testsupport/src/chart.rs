//! The Helm chart (`deploy/charts/meshca`), rendered by testenv's `helm`: the
//! one source of meshca's Kubernetes objects. Tests install it, dry-run it,
//! or take a component's RBAC from it (see
//! [`TestNamespace::identity_from_manifest`](crate::TestNamespace::identity_from_manifest)).

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail};
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};

use crate::env::bin;

/// The chart's directory in this repository.
pub fn chart_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../deploy/charts/meshca")
}

/// A values profile shipped with the chart (`profiles/<name>.yaml`).
pub fn profile(name: &str) -> PathBuf {
    chart_dir().join("profiles").join(format!("{name}.yaml"))
}

/// `helm <args>` with testenv's helm; its stdout, or an error with its stderr.
pub fn helm(args: &[&str]) -> Result<String> {
    let out = Command::new(bin("helm"))
        .args(args)
        .output()
        .context("running helm")?;
    if !out.status.success() {
        bail!(
            "helm {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// `helm template` of the chart into `namespace`, with values files (`-f`)
/// and `--set` values, as one multi-document YAML stream.
pub fn render(namespace: &str, files: &[PathBuf], sets: &[&str]) -> Result<String> {
    let chart = chart_dir();
    let mut args = vec![
        "template".to_string(),
        "meshca".into(),
        chart.display().to_string(),
        "--namespace".into(),
        namespace.into(),
    ];
    for f in files {
        args.extend(["--values".into(), f.display().to_string()]);
    }
    for s in sets {
        args.extend(["--set".into(), (*s).to_string()]);
    }
    helm(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

/// The server's objects for a server in `namespace` configured by `sets`
/// (e.g. `server.rootConfigMap=false`), without the signer.
pub fn server(namespace: &str, sets: &[&str]) -> Result<String> {
    let mut all = vec!["server.enabled=true", "signer.enabled=false"];
    all.extend(sets);
    render(namespace, &[], &all)
}

/// The signer's objects: installed in `namespace`, cluster-scoped names
/// prefixed with `name`, signing for `signer_names`, publishing its roots to
/// `istio_namespace` (where istiod's RA RBAC also points).
pub fn signer(
    namespace: &str,
    name: &str,
    signer_names: &[&str],
    istio_namespace: &str,
    sets: &[&str],
) -> Result<String> {
    let names = format!("signer.signerNames={{{}}}", signer_names.join(","));
    let name = format!("signer.name={name}");
    let istio = format!("istioNamespace={istio_namespace}");
    let mut all = vec![
        "server.enabled=false",
        "signer.enabled=true",
        &names,
        &name,
        &istio,
    ];
    all.extend(sets);
    render(namespace, &[], &all)
}

/// The objects of a rendered YAML stream (empty documents dropped).
pub fn documents(yaml: &str) -> Result<Vec<serde_json::Value>> {
    let docs: Vec<serde_json::Value> =
        serde_saphyr::from_multiple(yaml).context("parsing rendered YAML")?;
    Ok(docs.into_iter().filter(|d| !d.is_null()).collect())
}

/// The objects `keep` selects, as a YAML stream again.
pub fn select(yaml: &str, keep: impl Fn(&serde_json::Value) -> bool) -> Result<String> {
    let mut out = Vec::new();
    for doc in documents(yaml)? {
        if keep(&doc) {
            out.push(serde_json::to_string(&doc)?);
        }
    }
    Ok(out.join("\n---\n"))
}

/// Only the objects of these kinds (e.g. the RBAC of a component, for an
/// identity that a test runs meshca as).
pub fn only_kinds(yaml: &str, kinds: &[&str]) -> Result<String> {
    select(yaml, |doc| {
        kinds.contains(&doc["kind"].as_str().unwrap_or_default())
    })
}

/// A server-side dry run (apply) of every object; returns their kinds.
pub async fn dry_run_apply(client: &kube::Client, yaml: &str) -> Result<Vec<String>> {
    let mut kinds = Vec::new();
    for value in documents(yaml)? {
        let obj: DynamicObject = serde_json::from_value(value.clone())?;
        let types = obj
            .types
            .clone()
            .context("an object without apiVersion/kind")?;
        let (group, version) = types
            .api_version
            .split_once('/')
            .unwrap_or(("", &types.api_version));
        let ar = ApiResource::from_gvk(&GroupVersionKind::gvk(group, version, &types.kind));
        let name = obj
            .metadata
            .name
            .clone()
            .context("an object without a name")?;
        let api: Api<DynamicObject> = match obj.metadata.namespace.as_deref() {
            Some(n) => Api::namespaced_with(client.clone(), n, &ar),
            None => Api::all_with(client.clone(), &ar),
        };
        let mut pp = PatchParams::apply("meshca-chart-test").force();
        pp.dry_run = true;
        api.patch(&name, &pp, &Patch::Apply(&value))
            .await
            .with_context(|| format!("dry-run apply of {} {name}", types.kind))?;
        kinds.push(types.kind);
    }
    Ok(kinds)
}

/// The server's RBAC (Roles and ClusterRoles) for a server in `namespace`,
/// starting from the least a server needs (TokenReview only: plugged CA, no
/// root ConfigMaps, no impersonation, no Lease) plus what `sets` turn on,
/// e.g. `server.rootConfigMap=true`.
pub fn server_rbac(namespace: &str, sets: &[&str]) -> Result<String> {
    let mut all = vec![
        "server.ca=plugged",
        "server.rootConfigMap=false",
        "server.trustedNodeAccounts={}",
        "leaderElection.enabled=false",
    ];
    all.extend(sets);
    only_kinds(&server(namespace, &all)?, &["Role", "ClusterRole"])
}

/// The signer's own RBAC (Roles and ClusterRoles, istiod's left out), as
/// [`signer`] renders it.
pub fn signer_rbac(
    namespace: &str,
    name: &str,
    signer_names: &[&str],
    istio_namespace: &str,
    sets: &[&str],
) -> Result<String> {
    let mut all = vec!["signer.istiodRBAC=false"];
    all.extend(sets);
    let yaml = signer(namespace, name, signer_names, istio_namespace, &all)?;
    only_kinds(&yaml, &["Role", "ClusterRole"])
}

/// What the signer's chart grants istiod in RA mode (its ClusterRole).
pub fn istiod_ra_rbac(
    namespace: &str,
    name: &str,
    signer_names: &[&str],
    istio_namespace: &str,
) -> Result<String> {
    let yaml = signer(namespace, name, signer_names, istio_namespace, &[])?;
    let role = format!("{name}-istiod-ra");
    select(&yaml, |doc| {
        doc["kind"] == "ClusterRole" && doc["metadata"]["name"] == role.as_str()
    })
}
