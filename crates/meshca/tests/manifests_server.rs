//! `meshca manifests server` renders objects the apiserver accepts
//! (server-side dry run: validated and admitted, nothing stored) and Istio
//! install values that point the mesh at meshca's Service.

use std::process::Command;

use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use meshca_testsupport::TestEnv;

fn meshca(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_meshca"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "meshca {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Server-side dry run of every document (each must be in `namespace` or
/// cluster-scoped); returns the kinds.
async fn dry_run_apply(admin: &kube::Client, namespace: &str, yaml: &str) -> Vec<String> {
    let mut kinds = Vec::new();
    for doc in yaml.split("\n---\n") {
        let value: serde_json::Value = serde_saphyr::from_str(doc).unwrap();
        let obj: DynamicObject = serde_json::from_value(value.clone()).unwrap();
        let types = obj.types.clone().expect("apiVersion and kind");
        let (group, version) = types
            .api_version
            .split_once('/')
            .unwrap_or(("", &types.api_version));
        let ar = ApiResource::from_gvk(&GroupVersionKind::gvk(group, version, &types.kind));
        let name = obj.metadata.name.clone().unwrap();
        let api: Api<DynamicObject> = match obj.metadata.namespace.as_deref() {
            Some(n) => {
                assert_eq!(n, namespace, "{} {name}", types.kind);
                Api::namespaced_with(admin.clone(), n, &ar)
            }
            None => Api::all_with(admin.clone(), &ar),
        };
        let mut pp = PatchParams::apply("meshca-server-manifest-test").force();
        pp.dry_run = true;
        api.patch(&name, &pp, &Patch::Apply(&value))
            .await
            .unwrap_or_else(|e| panic!("{} {name}: {e}", types.kind));
        kinds.push(types.kind);
    }
    kinds
}

/// The rules of every Role and ClusterRole that grant `verb` on Secrets
/// (a wildcard counts), as (kind/name, resourceNames).
fn secret_rules(yaml: &str, verb: &str) -> Vec<(String, serde_json::Value)> {
    let mut found = Vec::new();
    for doc in yaml.split("\n---\n") {
        let v: serde_json::Value = serde_saphyr::from_str(doc).unwrap();
        if !matches!(v["kind"].as_str(), Some("Role" | "ClusterRole")) {
            continue;
        }
        let has = |list: &serde_json::Value, want: &str| {
            list.as_array()
                .is_some_and(|l| l.iter().any(|x| x == want || x == "*"))
        };
        for rule in v["rules"].as_array().into_iter().flatten() {
            if has(&rule["resources"], "secrets") && has(&rule["verbs"], verb) {
                found.push((
                    format!(
                        "{}/{}",
                        v["kind"].as_str().unwrap_or_default(),
                        v["metadata"]["name"].as_str().unwrap_or_default()
                    ),
                    rule["resourceNames"].clone(),
                ));
            }
        }
    }
    found
}

/// The least-privilege installs: with a plugged-in CA (Secret `cacerts`)
/// or a pre-created `istio-ca-secret`, no rule lets meshca create Secrets.
#[tokio::test]
async fn server_manifests_without_create_secrets() {
    let env = TestEnv::get().await;
    let admin = env.client();
    let ns = env.namespace("srv-manifests-lp").await.unwrap();
    let render = |flag: &str| {
        meshca(&[
            "manifests",
            "server",
            "--namespace",
            ns.name(),
            "--image",
            "meshca:test",
            flag,
        ])
    };
    let default = meshca(&["manifests", "server", "--namespace", ns.name()]);
    assert_eq!(secret_rules(&default, "create").len(), 1, "{default}");

    let plugged = render("--plugged-ca");
    dry_run_apply(&admin, ns.name(), &plugged).await;
    assert_eq!(secret_rules(&plugged, "create"), vec![], "{plugged}");
    assert_eq!(secret_rules(&plugged, "update"), vec![], "{plugged}");
    assert!(
        !plugged.contains("# deploy/server/rbac-ca-secret.yaml"),
        "{plugged}"
    );
    assert!(
        plugged.contains("name: MESHCA_NO_CA_SECRET\n              value: \"true\""),
        "{plugged}"
    );
    assert!(
        plugged.contains("secretName: cacerts\n            optional: false"),
        "{plugged}"
    );

    let precreated = render("--ca-secret-precreated");
    dry_run_apply(&admin, ns.name(), &precreated).await;
    assert_eq!(secret_rules(&precreated, "create"), vec![], "{precreated}");
    assert_eq!(
        secret_rules(&precreated, "update"),
        vec![(
            "Role/meshca-server-ca-secret".to_string(),
            serde_json::json!(["istio-ca-secret"])
        )],
        "{precreated}"
    );
    assert!(!precreated.contains("MESHCA_NO_CA_SECRET"), "{precreated}");
    ns.cleanup().await.unwrap();
}

#[tokio::test]
async fn server_manifests_apply_with_server_side_dry_run() {
    let env = TestEnv::get().await;
    let admin = env.client();
    // Rendered into the test namespace (the dry run needs it to exist).
    let ns = env.namespace("srv-manifests").await.unwrap();
    let yaml = meshca(&[
        "manifests",
        "server",
        "--namespace",
        ns.name(),
        "--image",
        "meshca:test",
    ]);
    assert!(!yaml.contains("{{"), "{yaml}");
    let kinds = dry_run_apply(&admin, ns.name(), &yaml).await;
    for k in [
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
    ] {
        assert!(kinds.iter().any(|x| x == k), "no {k} in {kinds:?}");
    }
    assert!(yaml.contains("resources: [\"pods\"]"), "impersonation RBAC");
    assert!(yaml.contains("port: 15012") && yaml.contains("port: 15014"));

    let values = meshca(&[
        "manifests",
        "server",
        "--namespace",
        ns.name(),
        "--istio-values",
    ]);
    let v: serde_json::Value = serde_saphyr::from_str(&values).unwrap();
    assert_eq!(v["kind"], "IstioOperator");
    let addr = format!("meshca.{}.svc:15012", ns.name());
    assert_eq!(v["spec"]["values"]["global"]["caAddress"], addr.as_str());
    assert_eq!(
        v["spec"]["meshConfig"]["defaultConfig"]["caAddress"],
        addr.as_str()
    );

    // RA mode and the ClusterTrustBundle add their RBAC and settings.
    let yaml = meshca(&[
        "manifests",
        "server",
        "--namespace",
        ns.name(),
        "--k8s-signer",
        "example.org/mesh",
        "--cluster-trust-bundle",
    ]);
    assert!(!yaml.contains("{{"), "{yaml}");
    dry_run_apply(&admin, ns.name(), &yaml).await;
    for needle in [
        "# deploy/server/rbac-ra.yaml",
        "resourceNames: [\"example.org/mesh\"]",
        "value: \"ISTIOD_RA_KUBERNETES_API\"",
        "name: K8S_SIGNER\n              value: \"example.org/mesh\"",
        "secretName: external-ca-cert",
        "# deploy/server/rbac-cluster-trust-bundle.yaml",
        "name: ENABLE_CLUSTER_TRUST_BUNDLE_API\n              value: \"true\"",
    ] {
        assert!(yaml.contains(needle), "no {needle:?} in\n{yaml}");
    }
    assert!(!yaml.contains("example.com/foo"), "{yaml}");
    ns.cleanup().await.unwrap();
}
