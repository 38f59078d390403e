//! Proof that the test environment is a real Kubernetes control plane with the
//! behaviour meshca relies on. Needs a running testenv (`eval "$(testenv/up)"`);
//! without one every test fails with instructions, none is skipped.

use std::process::Command;

use k8s_openapi::ByteString;
use k8s_openapi::api::certificates::v1::{
    CertificateSigningRequest, CertificateSigningRequestCondition, CertificateSigningRequestSpec,
    CertificateSigningRequestStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, PostParams};
use meshca_testsupport::{
    ISTIO_CA_AUDIENCE, RbacSpec, TestEnv, TokenOptions, api_status_code, openssl, rule,
    token_review,
};

const SIGNER: &str = "example.com/foo";

#[tokio::test]
async fn apiserver_reports_v1_35_4() {
    let env = TestEnv::get().await;
    let v = env.client().apiserver_version().await.unwrap();
    assert_eq!(v.git_version, "v1.35.4");
    assert_eq!((v.major.as_str(), v.minor.as_str()), ("1", "35"));
}

#[tokio::test]
async fn csr_with_custom_signer_needs_approve_and_sign_permissions() {
    let env = TestEnv::get().await;
    let ns = env.namespace("csr-flow").await.unwrap();
    let dir = ns.temp_dir().to_path_buf();

    let requester = ns
        .identity(
            "requester",
            &[RbacSpec::Rules(vec![rule(
                &["certificates.k8s.io"],
                &["certificatesigningrequests"],
                &[],
                &["create", "get"],
            )])],
        )
        .await
        .unwrap();
    let approver = ns
        .identity(
            "approver",
            &[RbacSpec::Rules(vec![
                rule(
                    &["certificates.k8s.io"],
                    &["certificatesigningrequests"],
                    &[],
                    &["get", "list", "watch"],
                ),
                rule(
                    &["certificates.k8s.io"],
                    &["certificatesigningrequests/approval"],
                    &[],
                    &["update"],
                ),
                rule(
                    &["certificates.k8s.io"],
                    &["signers"],
                    &[SIGNER],
                    &["approve"],
                ),
            ])],
        )
        .await
        .unwrap();
    let status_rules = vec![
        rule(
            &["certificates.k8s.io"],
            &["certificatesigningrequests"],
            &[],
            &["get", "list", "watch"],
        ),
        rule(
            &["certificates.k8s.io"],
            &["certificatesigningrequests/status"],
            &[],
            &["update", "patch"],
        ),
    ];
    let mut signer_rules = status_rules.clone();
    signer_rules.push(rule(
        &["certificates.k8s.io"],
        &["signers"],
        &[SIGNER],
        &["sign"],
    ));
    let signer = ns
        .identity("signer", &[RbacSpec::Rules(signer_rules)])
        .await
        .unwrap();
    // Same status permissions, but no `sign` on the signer.
    let impostor = ns
        .identity("impostor", &[RbacSpec::Rules(status_rules)])
        .await
        .unwrap();

    // 1. create, as the requester, with a real PKCS#10 request made by openssl.
    let csr_pem = openssl::csr_pem(&dir, "workload", "/CN=workload/O=example").unwrap();
    let name = ns.unique_name("csr");
    ns.delete_csr_on_cleanup(&name);
    let csr = CertificateSigningRequest {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            ..Default::default()
        },
        spec: CertificateSigningRequestSpec {
            request: ByteString(csr_pem.into_bytes()),
            signer_name: SIGNER.to_string(),
            expiration_seconds: Some(600),
            usages: Some(vec!["digital signature".into(), "client auth".into()]),
            ..Default::default()
        },
        status: None,
    };
    let requester_api = Api::<CertificateSigningRequest>::all(requester.client().await.unwrap());
    let created = requester_api
        .create(&PostParams::default(), &csr)
        .await
        .unwrap();
    assert_eq!(
        created.spec.username.as_deref(),
        Some(requester.username().as_str()),
        "the apiserver records who asked"
    );

    // 2. approve through the /approval subresource, as the approver.
    let approver_api = Api::<CertificateSigningRequest>::all(approver.client().await.unwrap());
    let mut to_approve = approver_api.get(&name).await.unwrap();
    to_approve.status = Some(CertificateSigningRequestStatus {
        conditions: Some(vec![CertificateSigningRequestCondition {
            type_: "Approved".into(),
            status: "True".into(),
            reason: Some("TestApproved".into()),
            message: Some("approved by the testsupport proof test".into()),
            ..Default::default()
        }]),
        certificate: None,
    });
    let approved = approver_api
        .replace_subresource("approval", &name, &PostParams::default(), &to_approve)
        .await
        .unwrap();
    let conditions = approved.status.unwrap().conditions.unwrap();
    assert!(
        conditions
            .iter()
            .any(|c| c.type_ == "Approved" && c.status == "True"),
        "{conditions:?}"
    );

    // A certificate to put in status (any valid PEM certificate will do here).
    let (crt, _key) = openssl::self_signed(&dir, "issued", "/CN=workload", 1).unwrap();
    let cert_pem = std::fs::read(&crt).unwrap();

    // 3. an identity without `sign` on the signer is refused by admission.
    let impostor_api = Api::<CertificateSigningRequest>::all(impostor.client().await.unwrap());
    let mut forged = impostor_api.get(&name).await.unwrap();
    forged.status.as_mut().unwrap().certificate = Some(ByteString(cert_pem.clone()));
    let err = impostor_api
        .replace_status(&name, &PostParams::default(), &forged)
        .await
        .expect_err("status.certificate written without `sign` permission");
    assert_eq!(api_status_code(&err), Some(403), "{err}");
    assert!(err.to_string().contains(SIGNER), "{err}");

    // 4. the signer (with `sign`) writes status.certificate via /status.
    let signer_api = Api::<CertificateSigningRequest>::all(signer.client().await.unwrap());
    let mut to_sign = signer_api.get(&name).await.unwrap();
    to_sign.status.as_mut().unwrap().certificate = Some(ByteString(cert_pem.clone()));
    signer_api
        .replace_status(&name, &PostParams::default(), &to_sign)
        .await
        .unwrap();

    let done = requester_api.get(&name).await.unwrap();
    assert_eq!(done.status.unwrap().certificate, Some(ByteString(cert_pem)));

    ns.cleanup().await.unwrap();
}

#[tokio::test]
async fn token_request_and_review_with_istio_ca_audience() {
    let env = TestEnv::get().await;
    let ns = env.namespace("tokens").await.unwrap();
    ns.create_service_account("workload").await.unwrap();
    // The reviewer runs with only the permission a CA needs for this.
    let reviewer = ns
        .identity(
            "reviewer",
            &[RbacSpec::Rules(vec![rule(
                &["authentication.k8s.io"],
                &["tokenreviews"],
                &[],
                &["create"],
            )])],
        )
        .await
        .unwrap();
    let reviewer_client = reviewer.client().await.unwrap();

    let token = ns.token("workload").await.unwrap();
    let status = token_review(&reviewer_client, &token, &[ISTIO_CA_AUDIENCE])
        .await
        .unwrap();
    assert_eq!(status.authenticated, Some(true), "{status:?}");
    let user = status.user.unwrap();
    assert_eq!(
        user.username.as_deref(),
        Some(format!("system:serviceaccount:{}:workload", ns.name()).as_str())
    );
    assert_eq!(status.audiences, Some(vec![ISTIO_CA_AUDIENCE.to_string()]));

    // The same token is not valid for another audience...
    let wrong = token_review(&reviewer_client, &token, &["not-istio-ca"])
        .await
        .unwrap();
    assert_ne!(wrong.authenticated, Some(true), "{wrong:?}");

    // ...and a token minted for another audience is not valid for istio-ca.
    let other = ns
        .token_with(
            "workload",
            &TokenOptions {
                audiences: vec!["some-other-audience".into()],
                expiration_seconds: 600,
            },
        )
        .await
        .unwrap();
    let status = token_review(&reviewer_client, &other, &[ISTIO_CA_AUDIENCE])
        .await
        .unwrap();
    assert_ne!(status.authenticated, Some(true), "{status:?}");

    // A reviewer without the permission is refused.
    let nobody = ns.identity("nobody", &[]).await.unwrap();
    let err = token_review(
        &nobody.client().await.unwrap(),
        &token,
        &[ISTIO_CA_AUDIENCE],
    )
    .await
    .expect_err("TokenReview without permission");
    let kube_err = err.downcast_ref::<kube::Error>().expect("a kube error");
    assert_eq!(api_status_code(kube_err), Some(403), "{err:#}");

    ns.cleanup().await.unwrap();
}

#[tokio::test]
async fn istio_client_runs_and_reports_grpc_status() {
    let env = TestEnv::get().await;
    let client = env.bin("istio-client");

    let help = Command::new(&client).arg("-help").output().unwrap();
    assert!(help.status.success(), "{help:?}");
    let usage = String::from_utf8_lossy(&help.stderr);
    assert!(usage.contains("-addr"), "{usage}");

    // A port that nothing listens on: the Istio client fails with Unavailable.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let ns = env.namespace("istio-client").await.unwrap();
    ns.create_service_account("workload").await.unwrap();
    let token = ns
        .token_file("workload", &TokenOptions::default())
        .await
        .unwrap();
    let out = Command::new(&client)
        .args(["-addr", &format!("127.0.0.1:{port}")])
        .arg("-root-cert")
        .arg(env.ca_pem_path())
        .arg("-token")
        .arg(&token)
        .args(["-key-type", "ecdsa-p256", "-ttl", "1h", "-timeout", "30s"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.starts_with("Unavailable: "), "{stderr}");
    assert!(out.stdout.is_empty(), "{out:?}");
    ns.cleanup().await.unwrap();
}

#[tokio::test]
async fn zlint_lints_a_certificate_and_prints_json() {
    let env = TestEnv::get().await;
    let tmp = tempfile::tempdir().unwrap();
    let (crt, _key) =
        openssl::self_signed(tmp.path(), "leaf", "/CN=zlint.example.com", 30).unwrap();
    let out = Command::new(env.bin("zlint")).arg(&crt).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("zlint output is not JSON ({e}): {out:?}"));
    let lints = report.as_object().expect("a JSON object of lint results");
    assert!(lints.len() > 50, "only {} lints", lints.len());
    assert!(
        lints
            .values()
            .all(|r| r.get("result").and_then(|v| v.as_str()).is_some()),
        "{report}"
    );
}

#[tokio::test]
async fn identity_from_manifest_has_exactly_the_manifest_rbac() {
    use k8s_openapi::api::core::v1::{ConfigMap, Secret};
    let env = TestEnv::get().await;
    let ns = env.namespace("manifest").await.unwrap();
    let manifest = r#"
apiVersion: v1
kind: ServiceAccount
metadata:
  name: component
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: meshca-testsupport-proof-reviewer
rules:
- apiGroups: ["authentication.k8s.io"]
  resources: ["tokenreviews"]
  verbs: ["create"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata:
  name: component-configmaps
rules:
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "list"]
"#;
    let id = ns
        .identity_from_manifest("component", manifest)
        .await
        .unwrap();
    let client = id.client().await.unwrap();

    ns.create_service_account("workload").await.unwrap();
    let token = ns.token("workload").await.unwrap();
    let review = token_review(&client, &token, &[ISTIO_CA_AUDIENCE])
        .await
        .unwrap();
    assert_eq!(review.authenticated, Some(true));

    Api::<ConfigMap>::namespaced(client.clone(), ns.name())
        .list(&Default::default())
        .await
        .unwrap();
    let err = Api::<Secret>::namespaced(client.clone(), ns.name())
        .list(&Default::default())
        .await
        .expect_err("secrets are not in the manifest");
    assert_eq!(api_status_code(&err), Some(403), "{err}");
    let err = Api::<ConfigMap>::namespaced(client, "kube-system")
        .list(&Default::default())
        .await
        .expect_err("the Role is bound in the test namespace only");
    assert_eq!(api_status_code(&err), Some(403), "{err}");

    ns.cleanup().await.unwrap();
}
