//! The Helm chart (deploy/charts/meshca): `helm lint` is clean, and every
//! values profile renders objects the real apiserver accepts (server-side dry
//! run: validated and admitted, nothing stored), with least-privilege RBAC.

use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams};
use meshca_testsupport::{TestEnv, chart};
use serde_json::{Value, json};

const PROFILES: [&str; 4] = ["local-ca", "plugged-ca", "ra", "signer"];
const MONITORING: [&str; 3] = [
    "monitoring.serviceMonitor.enabled=true",
    "monitoring.prometheusRule.enabled=true",
    "monitoring.dashboard.enabled=true",
];

/// prometheus-operator's two kinds, schema-less: enough for the apiserver to
/// admit the chart's ServiceMonitor and PrometheusRule in a dry run.
async fn install_monitoring_crds(client: &kube::Client) {
    let api = Api::<CustomResourceDefinition>::all(client.clone());
    for (kind, plural) in [
        ("ServiceMonitor", "servicemonitors"),
        ("PrometheusRule", "prometheusrules"),
    ] {
        let name = format!("{plural}.monitoring.coreos.com");
        let crd = json!({
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            "metadata": {"name": name},
            "spec": {
                "group": "monitoring.coreos.com",
                "scope": "Namespaced",
                "names": {
                    "kind": kind,
                    "listKind": format!("{kind}List"),
                    "plural": plural,
                    "singular": kind.to_lowercase(),
                },
                "versions": [{
                    "name": "v1", "served": true, "storage": true,
                    "schema": {"openAPIV3Schema": {
                        "type": "object", "x-kubernetes-preserve-unknown-fields": true
                    }}
                }]
            }
        });
        api.patch(
            &name,
            &PatchParams::apply("meshca-chart-test").force(),
            &Patch::Apply(&crd),
        )
        .await
        .unwrap();
        for _ in 0..100 {
            let crd = api.get(&name).await.unwrap();
            let established = crd
                .status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True");
            if established {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn objects(yaml: &str) -> Vec<Value> {
    chart::documents(yaml).unwrap()
}

fn find<'a>(objs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objs.iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

/// The container's env as name -> value.
fn env_of(deployment: &Value) -> std::collections::BTreeMap<String, String> {
    deployment["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| {
            Some((
                e["name"].as_str()?.to_owned(),
                e["value"].as_str()?.to_owned(),
            ))
        })
        .collect()
}

/// The rules of every Role and ClusterRole that grant `verb` on Secrets
/// (a wildcard counts), as (kind/name, resourceNames).
fn secret_rules(objs: &[Value], verb: &str) -> Vec<(String, Value)> {
    let has = |list: &Value, want: &str| {
        list.as_array()
            .is_some_and(|l| l.iter().any(|x| x == want || x == "*"))
    };
    let mut found = Vec::new();
    for v in objs {
        if !matches!(v["kind"].as_str(), Some("Role" | "ClusterRole")) {
            continue;
        }
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

#[tokio::test]
async fn helm_lint_is_clean_for_every_profile() {
    let dir = chart::chart_dir().display().to_string();
    for p in PROFILES {
        let profile = chart::profile(p).display().to_string();
        let mut args = vec!["lint", "--strict", &dir, "--values", &profile];
        for m in MONITORING {
            args.extend(["--set", m]);
        }
        let out = chart::helm(&args).unwrap();
        assert!(out.contains("0 chart(s) failed"), "{p}: {out}");
        assert!(!out.contains("[WARNING]"), "{p}: {out}");
    }
}

#[tokio::test]
async fn every_profile_applies_with_server_side_dry_run() {
    let env = TestEnv::get().await;
    let admin = env.client();
    install_monitoring_crds(&admin).await;
    // Rendered into the test namespace (the dry run needs it to exist), which
    // also stands for istiod's.
    let ns = env.namespace("chart").await.unwrap();
    let istio = format!("istioNamespace={}", ns.name());
    for p in PROFILES {
        let mut sets = vec![
            istio.as_str(),
            "image.tag=test",
            "server.spiffeBundle.enabled=true",
            "server.spiffeBundle.tlsSecret=bundle-tls",
        ];
        sets.extend(MONITORING);
        let yaml = chart::render(ns.name(), &[chart::profile(p)], &sets).unwrap();
        let kinds = chart::dry_run_apply(&admin, &yaml)
            .await
            .unwrap_or_else(|e| panic!("{p}: {e:#}"));
        for k in [
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "Role",
            "RoleBinding",
            "Deployment",
            "Service",
            "PodDisruptionBudget",
            "ServiceMonitor",
            "PrometheusRule",
            "ConfigMap",
        ] {
            assert!(kinds.iter().any(|x| x == k), "{p}: no {k} in {kinds:?}");
        }
        // Every pod runs restricted: non-root 65532, read-only root, no capabilities.
        for d in objects(&yaml).iter().filter(|o| o["kind"] == "Deployment") {
            let pod = &d["spec"]["template"]["spec"];
            assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{p}");
            assert_eq!(pod["securityContext"]["runAsUser"], 65532, "{p}");
            assert_eq!(
                pod["securityContext"]["seccompProfile"]["type"],
                "RuntimeDefault"
            );
            let c = &pod["containers"][0];
            assert_eq!(c["image"], "meshca:test", "{p}");
            assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true, "{p}");
            assert_eq!(
                c["securityContext"]["allowPrivilegeEscalation"], false,
                "{p}"
            );
            assert_eq!(
                c["securityContext"]["capabilities"]["drop"],
                json!(["ALL"]),
                "{p}"
            );
            assert!(c["readinessProbe"]["httpGet"]["path"] == "/readyz", "{p}");
            assert!(c["livenessProbe"]["httpGet"]["path"] == "/healthz", "{p}");
            assert_eq!(d["spec"]["replicas"], 2, "{p}: HA by default");
        }
        let objs = objects(&yaml);
        let dashboard = objs.iter().find(|o| o["kind"] == "ConfigMap").unwrap();
        assert_eq!(dashboard["metadata"]["labels"]["grafana_dashboard"], "1");
        let json: Value =
            serde_json::from_str(dashboard["data"]["meshca.json"].as_str().unwrap()).unwrap();
        assert_eq!(json["uid"], "meshca", "{p}");
    }
    ns.cleanup().await.unwrap();
}

/// The least-privilege installs: with a plugged-in CA (Secret `cacerts`) or a
/// pre-created `istio-ca-secret`, no rule lets meshca create Secrets.
#[test]
fn server_profiles_grant_secrets_only_as_needed() {
    let ns = "istio-system";
    let default = objects(&chart::render(ns, &[chart::profile("local-ca")], &[]).unwrap());
    assert_eq!(secret_rules(&default, "create").len(), 1);

    let plugged = objects(&chart::render(ns, &[chart::profile("plugged-ca")], &[]).unwrap());
    assert_eq!(secret_rules(&plugged, "create"), vec![]);
    assert_eq!(secret_rules(&plugged, "update"), vec![]);
    assert_eq!(secret_rules(&plugged, "get"), vec![]);
    let server = find(&plugged, "Deployment", "meshca");
    assert_eq!(env_of(server)["MESHCA_NO_CA_SECRET"], "true");
    let volumes = &server["spec"]["template"]["spec"]["volumes"];
    assert_eq!(volumes[0]["secret"]["secretName"], "cacerts");
    assert_eq!(volumes[0]["secret"]["optional"], false);

    let precreated = objects(&chart::server(ns, &["server.caSecretPrecreated=true"]).unwrap());
    assert_eq!(secret_rules(&precreated, "create"), vec![]);
    assert_eq!(
        secret_rules(&precreated, "update"),
        vec![(
            "Role/meshca-ca-secret".to_string(),
            json!(["istio-ca-secret"])
        )]
    );
    assert!(!env_of(find(&precreated, "Deployment", "meshca")).contains_key("MESHCA_NO_CA_SECRET"));
}

#[test]
fn ra_profile_and_cluster_trust_bundle_add_their_rbac_and_settings() {
    let yaml = chart::render(
        "mesh",
        &[chart::profile("ra")],
        &[
            "server.ra.signer=example.org/mesh",
            "server.clusterTrustBundle=true",
        ],
    )
    .unwrap();
    let objs = objects(&yaml);
    let ra = find(&objs, "ClusterRole", "meshca-mesh-ra");
    assert_eq!(ra["rules"][2]["resourceNames"], json!(["example.org/mesh"]));
    assert_eq!(ra["rules"][2]["verbs"], json!(["approve"]));
    find(&objs, "ClusterRole", "meshca-mesh-cluster-trust-bundle");
    let env = env_of(find(&objs, "Deployment", "meshca"));
    assert_eq!(env["EXTERNAL_CA"], "ISTIOD_RA_KUBERNETES_API");
    assert_eq!(env["K8S_SIGNER"], "example.org/mesh");
    assert_eq!(env["ENABLE_CLUSTER_TRUST_BUNDLE_API"], "true");
    assert_eq!(env["CA_TRUSTED_NODE_ACCOUNTS"], "istio-system/ztunnel");
    assert!(yaml.contains("secretName: external-ca-cert"));
    assert!(!yaml.contains("example.com/foo"), "{yaml}");
}

#[test]
fn signer_profile_is_the_seeds_shape() {
    let objs =
        objects(&chart::render("signer-ca-system", &[chart::profile("signer")], &[]).unwrap());
    assert!(
        objs.iter()
            .all(|o| o["metadata"]["labels"]["app.kubernetes.io/component"] != "server")
    );
    let d = find(&objs, "Deployment", "signer-ca-controller-manager");
    let args = &d["spec"]["template"]["spec"]["containers"][0]["args"];
    for want in [
        "--signer-name=example.com/foo",
        "--ca-secret=signer-ca-system/signer-ca-keypair",
        "--trust-bundle-namespace=istio-system",
        "--leader-election-namespace=signer-ca-system",
    ] {
        assert!(
            args.as_array().unwrap().iter().any(|a| a == want),
            "{want}: {args}"
        );
    }
    let sign = find(&objs, "ClusterRole", "signer-ca-signer");
    assert_eq!(
        sign["rules"][2]["resourceNames"],
        json!(["example.com/foo"])
    );
    assert_eq!(sign["rules"][2]["verbs"], json!(["sign"]));
    let publish = find(&objs, "Role", "signer-ca-signer-trust-bundle");
    assert_eq!(publish["metadata"]["namespace"], "istio-system");
    assert_eq!(
        publish["rules"][0]["resourceNames"],
        json!(["external-ca-cert"])
    );
    let istiod = find(&objs, "ClusterRoleBinding", "signer-ca-istiod-ra");
    assert_eq!(istiod["subjects"][0]["name"], "istiod");
    // The CA Secret is the user's: the chart never writes (or wipes) it.
    assert!(objs.iter().all(|o| o["kind"] != "Secret"));
}

#[test]
fn signer_pod_certificates_add_their_rbac_flags_and_bundle() {
    let render = |sets: &[&str]| {
        objects(&chart::render("signer-ca-system", &[chart::profile("signer")], sets).unwrap())
    };
    let args_of = |objs: &[Value]| {
        find(objs, "Deployment", "signer-ca-controller-manager")["spec"]["template"]["spec"]
            ["containers"][0]["args"]
            .clone()
    };
    let rules_of = |objs: &[Value]| find(objs, "ClusterRole", "signer-ca-signer")["rules"].clone();
    let off = render(&[]);
    assert!(
        args_of(&off)
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a == "--no-cluster-trust-bundle")
    );
    let text = rules_of(&off).to_string();
    assert!(!text.contains("podcertificaterequests") && !text.contains("clustertrustbundles"));

    let on = render(&[
        "signer.podCertificates.enabled=true",
        "signer.podCertificates.keyTypes={ECDSAP256,ED25519}",
        "signer.signerNames={example.com/foo,example.com/bar}",
    ]);
    let args = args_of(&on);
    for want in [
        "--pod-certificates",
        "--pod-certificate-max-duration=24h",
        "--pod-certificate-key-types=ECDSAP256,ED25519",
        "--cluster-trust-bundle",
    ] {
        assert!(
            args.as_array().unwrap().iter().any(|a| a == want),
            "{want}: {args}"
        );
    }
    let rules = rules_of(&on);
    let rule = |resource: &str, verb: &str| {
        rules.as_array().unwrap().iter().find(|r| {
            r["resources"]
                .as_array()
                .unwrap()
                .iter()
                .any(|x| x == resource)
                && r["verbs"].as_array().unwrap().iter().any(|x| x == verb)
        })
    };
    assert!(rule("podcertificaterequests", "watch").is_some());
    assert!(rule("podcertificaterequests/status", "update").is_some());
    for r in ["pods", "serviceaccounts", "nodes"] {
        assert!(rule(r, "get").is_some(), "{r}");
    }
    assert_eq!(
        rule("clustertrustbundles", "patch").unwrap()["resourceNames"],
        json!(["example.com:foo:roots", "example.com:bar:roots"])
    );
    assert_eq!(
        rule("signers", "attest").unwrap()["resourceNames"],
        json!(["example.com/foo", "example.com/bar"])
    );
}

#[test]
fn istio_values_point_the_mesh_at_meshca() {
    let show = ["--set", "istioValues.render=true"];
    let render = |profile: &str, ns: &str| {
        let p = chart::profile(profile).display().to_string();
        let dir = chart::chart_dir().display().to_string();
        let yaml = chart::helm(&[
            "template",
            "meshca",
            &dir,
            "-n",
            ns,
            "-f",
            &p,
            show[0],
            show[1],
            "--show-only",
            "templates/istio-values.yaml",
        ])
        .unwrap();
        serde_saphyr::from_str::<Value>(&yaml).unwrap()
    };
    let v = render("local-ca", "mesh-ca");
    assert_eq!(v["kind"], "IstioOperator");
    let addr = "meshca.mesh-ca.svc:15012";
    assert_eq!(v["spec"]["values"]["global"]["caAddress"], addr);
    assert_eq!(v["spec"]["meshConfig"]["defaultConfig"]["caAddress"], addr);
    assert_eq!(
        v["spec"]["values"]["pilot"]["env"]["ENABLE_CA_SERVER"],
        "false"
    );

    let v = render("signer", "signer-ca-system");
    let env = &v["spec"]["components"]["pilot"]["k8s"]["env"];
    assert_eq!(env[0]["value"], "ISTIOD_RA_KUBERNETES_API");
    assert_eq!(env[1]["value"], "example.com/foo");
}

#[test]
fn pkcs11_values_mount_the_module_and_the_pin_secret_in_both_components() {
    let sets = [
        "signer.enabled=true",
        "pkcs11.module=/usr/lib/softhsm/libsofthsm2.so",
        "pkcs11.pinSecret=hsm-pin",
        "pkcs11.env[0].name=SOFTHSM2_CONF",
        "pkcs11.env[0].value=/var/lib/softhsm/softhsm2.conf",
        "pkcs11.volumes[0].name=softhsm",
        "pkcs11.volumes[0].hostPath.path=/var/lib/softhsm",
        "pkcs11.volumeMounts[0].name=softhsm",
        "pkcs11.volumeMounts[0].mountPath=/var/lib/softhsm",
    ];
    let objs = objects(&chart::render("istio-system", &[], &sets).unwrap());
    for name in ["meshca", "signer-ca-controller-manager"] {
        let d = find(&objs, "Deployment", name);
        let env = env_of(d);
        assert_eq!(
            env["MESHCA_PKCS11_MODULE"], "/usr/lib/softhsm/libsofthsm2.so",
            "{name}"
        );
        assert_eq!(
            env["MESHCA_PKCS11_PIN_FILE"], "/var/run/secrets/meshca/pkcs11/pin",
            "{name}"
        );
        assert_eq!(
            env["SOFTHSM2_CONF"], "/var/lib/softhsm/softhsm2.conf",
            "{name}"
        );
        let pod = &d["spec"]["template"]["spec"];
        let pin = pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == "pkcs11-pin")
            .unwrap_or_else(|| panic!("{name}: no PIN volume"));
        assert_eq!(pin["secret"]["secretName"], "hsm-pin");
        assert_eq!(pin["secret"]["defaultMode"], 0o400);
        let mounts = pod["containers"][0]["volumeMounts"].as_array().unwrap();
        assert!(mounts.iter().any(|m| m["name"] == "softhsm"), "{name}");
        assert!(
            mounts.iter().any(
                |m| m["mountPath"] == "/var/run/secrets/meshca/pkcs11" && m["readOnly"] == true
            ),
            "{name}"
        );
    }
    // Off by default: nothing about PKCS#11.
    let plain = chart::render("istio-system", &[], &["signer.enabled=true"]).unwrap();
    assert!(
        !plain.contains("PKCS11") && !plain.contains("pkcs11"),
        "{plain}"
    );
}
