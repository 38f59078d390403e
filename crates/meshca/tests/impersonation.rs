//! ztunnel impersonation in `meshca server` against a real kube-apiserver,
//! with exactly the Helm chart's RBAC for impersonation. There is
//! no kubelet or scheduler: Pods are created with `spec.nodeName` set (they
//! stay Pending) and tokens are bound to them with TokenRequest
//! `boundObjectRef`, so TokenReview names the caller's pod as on a node.

mod common;

use common::{free_port, leaf_uris};

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use kube::api::{Api, DeleteParams, PostParams};
use meshca_proto::IstioCertificateRequest;
use meshca_proto::istio_certificate_service_client::IstioCertificateServiceClient;
use meshca_testsupport::{TestEnv, TestNamespace, chart};
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// A running `meshca server`, killed on drop.
struct Server {
    child: Child,
    addr: String,
    monitoring: String,
    state: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    async fn start(ns: &TestNamespace, trusted: &str) -> Result<Server> {
        Self::start_with(ns, trusted, &[]).await
    }

    async fn start_with(ns: &TestNamespace, trusted: &str, extra: &[&str]) -> Result<Server> {
        let rbac = chart::server_rbac(ns.name(), &["server.trustedNodeAccounts={ns/ztunnel}"])?;
        let identity = ns.identity_from_manifest("meshca", &rbac).await?;
        let state = tempfile::tempdir()?;
        let addr = format!("127.0.0.1:{}", free_port());
        let monitoring = format!("127.0.0.1:{}", free_port());
        let mut child = Command::new(env!("CARGO_BIN_EXE_meshca"))
            .args(["server", "--listen", &addr])
            .args(["--monitoring-listen", &monitoring])
            .arg("--root-ca-dir")
            .arg(state.path().join("no-plugged-ca"))
            .arg("--state-dir")
            .arg(state.path())
            .arg("--no-root-configmap")
            .arg("--no-ca-secret")
            .arg("--kubeconfig")
            .arg(identity.kubeconfig_path())
            .args(["--self-signed-key-type", "ecdsa-p256"])
            .args(["--trusted-node-accounts", trusted])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting meshca server")?;
        // Ready only once the pods are listed.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait()? {
                bail!("meshca server exited with {status} before becoming ready");
            }
            let ok = Command::new("curl")
                .args(["-sf", &format!("http://{monitoring}/readyz")])
                .output()
                .is_ok_and(|o| o.status.success());
            if ok {
                break;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("meshca server did not become ready within 20 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(Server {
            child,
            addr,
            monitoring,
            state,
        })
    }

    /// The value of a metric without labels on /metrics.
    fn metric(&self, name: &str) -> Result<f64> {
        let out = Command::new("curl")
            .args(["-sf", &format!("http://{}/metrics", self.monitoring)])
            .output()?;
        let text = String::from_utf8(out.stdout)?;
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .with_context(|| format!("no metric {name}"))
    }

    async fn grpc(
        &self,
        client_identity: Option<Identity>,
    ) -> Result<IstioCertificateServiceClient<Channel>> {
        let root = std::fs::read(self.state.path().join("ca/root-cert.pem"))?;
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(root))
            .domain_name("istiod.istio-system.svc");
        if let Some(id) = client_identity {
            tls = tls.identity(id);
        }
        let channel = Endpoint::from_shared(format!("https://{}", self.addr))?
            .tls_config(tls)?
            .connect()
            .await?;
        Ok(IstioCertificateServiceClient::new(channel))
    }
}

/// A Pod of `sa` on `node`, never started (there is no kubelet); its UID.
async fn pod_on_node(ns: &TestNamespace, name: &str, sa: &str, node: &str) -> Result<String> {
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "nodeName": node,
            "serviceAccountName": sa,
            "automountServiceAccountToken": false,
            "containers": [{"name": "app", "image": "example.invalid/app:1"}],
        },
    }))?;
    let created = Api::<Pod>::namespaced(ns.env().client(), ns.name())
        .create(&PostParams::default(), &pod)
        .await
        .with_context(|| format!("creating Pod {name}"))?;
    created.metadata.uid.context("Pod without UID")
}

/// A token of `sa` for audience istio-ca, bound to Pod `pod` (so that
/// TokenReview's user.extra names the pod).
async fn pod_token(ns: &TestNamespace, sa: &str, pod: &str, uid: &str) -> Result<String> {
    let tr = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![meshca_testsupport::ISTIO_CA_AUDIENCE.into()],
            expiration_seconds: Some(600),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: Some(pod.into()),
                uid: Some(uid.into()),
            }),
        },
        ..Default::default()
    };
    let out = Api::<ServiceAccount>::namespaced(ns.env().client(), ns.name())
        .create_token_request(sa, &PostParams::default(), &tr)
        .await
        .with_context(|| format!("TokenRequest for {sa} bound to Pod {pod}"))?;
    Ok(out.status.context("TokenRequest without status")?.token)
}

fn request(
    csr: &str,
    token: Option<&str>,
    impersonate: &str,
) -> tonic::Request<IstioCertificateRequest> {
    let body =
        IstioCertificateRequest::from_agent(csr.to_owned(), 3600, "").impersonating(impersonate);
    let mut req = tonic::Request::new(body);
    if let Some(t) = token {
        req.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    req
}

#[track_caller]
fn refused(
    result: Result<tonic::Response<meshca_proto::IstioCertificateResponse>, tonic::Status>,
    reason: &str,
    what: &str,
) {
    let status = match result {
        Ok(_) => panic!("{what}: a certificate was issued"),
        Err(s) => s,
    };
    assert_eq!(status.code(), Code::Unauthenticated, "{what}: {status:?}");
    assert_eq!(
        status.message(),
        "request impersonation authentication failure",
        "{what}"
    );
    assert_eq!(
        status
            .metadata()
            .get("meshca-reason")
            .and_then(|v| v.to_str().ok()),
        Some(reason),
        "{what}"
    );
}

#[tokio::test]
async fn only_a_trusted_node_agent_gets_certificates_of_workloads_on_its_node() -> Result<()> {
    let env = TestEnv::get().await;
    let ns = env.namespace("imp").await?;
    let n = ns.name().to_owned();
    for sa in ["ztunnel", "web", "db", "intruder"] {
        ns.create_service_account(sa).await?;
    }
    let node_a = ns.unique_name("node-a");
    let node_b = ns.unique_name("node-b");
    let zt_uid = pod_on_node(&ns, "ztunnel-a", "ztunnel", &node_a).await?;
    pod_on_node(&ns, "web-1", "web", &node_a).await?;
    pod_on_node(&ns, "db-1", "db", &node_b).await?;
    let intruder_uid = pod_on_node(&ns, "intruder-a", "intruder", &node_a).await?;
    // Pods exist before the server starts: they come from the first list.
    let server = Server::start(&ns, &format!("{n}/ztunnel")).await?;

    let ztunnel = pod_token(&ns, "ztunnel", "ztunnel-a", &zt_uid).await?;
    let intruder = pod_token(&ns, "intruder", "intruder-a", &intruder_uid).await?;
    let web = format!("spiffe://cluster.local/ns/{n}/sa/web");
    let key = meshca_pki::SigningKey::generate(meshca_pki::KeyType::EcdsaP256)?;
    let csr = meshca_pki::csr::build_csr(&key, meshca_pki::cert::EMPTY_NAME, &[])
        .map_err(anyhow::Error::msg)?;
    let mut client = server.grpc(None).await?;

    // The trusted account, for a workload with a pod on its node.
    let chain = client
        .create_certificate(request(&csr, Some(&ztunnel), &web))
        .await
        .context("trusted ztunnel impersonating web")?
        .into_inner()
        .cert_chain;
    assert_eq!(leaf_uris(&chain), vec![web.clone()]);

    // A pod created after the start reaches the server through the watch.
    let cache = format!("spiffe://cluster.local/ns/{n}/sa/cache");
    ns.create_service_account("cache").await?;
    refused(
        client
            .create_certificate(request(&csr, Some(&ztunnel), &cache))
            .await,
        "impersonation_no_pod_on_node",
        "no cache pod yet",
    );
    pod_on_node(&ns, "cache-1", "cache", &node_a).await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match client
            .create_certificate(request(&csr, Some(&ztunnel), &cache))
            .await
        {
            Ok(r) => {
                assert_eq!(leaf_uris(&r.into_inner().cert_chain), vec![cache.clone()]);
                break;
            }
            Err(e) if Instant::now() > deadline => bail!("cache pod never seen: {e:?}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }

    // The same request from an account that is not trusted.
    refused(
        client
            .create_certificate(request(&csr, Some(&intruder), &web))
            .await,
        "impersonation_not_allowed",
        "untrusted account",
    );
    // A service account without a pod on the caller's node.
    refused(
        client
            .create_certificate(request(
                &csr,
                Some(&ztunnel),
                &format!("spiffe://cluster.local/ns/{n}/sa/db"),
            ))
            .await,
        "impersonation_no_pod_on_node",
        "db runs on node-b only",
    );
    // Not a SPIFFE ID, or one of another trust domain.
    for requested in [
        "web".to_owned(),
        format!("spiffe://other.example/ns/{n}/sa/web"),
    ] {
        refused(
            client
                .create_certificate(request(&csr, Some(&ztunnel), &requested))
                .await,
            "impersonation_invalid_identity",
            &requested,
        );
    }
    // A trusted account's token not bound to its pod proves no pod.
    let unbound = ns.token("ztunnel").await?;
    refused(
        client
            .create_certificate(request(&csr, Some(&unbound), &web))
            .await,
        "impersonation_pod_mismatch",
        "token not bound to a pod",
    );

    // A client-certificate caller (here: web's own certificate) may not impersonate.
    let identity = Identity::from_pem(
        chain[..chain.len() - 1].concat(),
        key.to_pkcs8_pem()?.as_bytes(),
    );
    let mut mtls = server.grpc(Some(identity)).await?;
    refused(
        mtls.create_certificate(request(&csr, None, &web)).await,
        "impersonation_not_allowed",
        "client certificate caller",
    );
    // ...while the same connection without impersonation renews as usual.
    let mut plain = request(&csr, None, "");
    plain.get_mut().metadata = None;
    let renewed = mtls
        .create_certificate(plain)
        .await?
        .into_inner()
        .cert_chain;
    assert_eq!(leaf_uris(&renewed), vec![web]);

    drop(server);
    ns.cleanup().await
}

/// A cached token bound to a pod stops being served from the cache when the
/// pod is deleted, not when its cache entry would end (the TTL here is 5
/// minutes), and is refused once the apiserver refuses it.
#[tokio::test]
async fn a_cached_pod_bound_token_is_refused_once_its_pod_is_deleted() -> Result<()> {
    let env = TestEnv::get().await;
    let ns = env.namespace("imp-cache").await?;
    let n = ns.name().to_owned();
    ns.create_service_account("web").await?;
    let web_uid = pod_on_node(&ns, "web-1", "web", &ns.unique_name("node")).await?;
    let server =
        Server::start_with(&ns, &format!("{n}/ztunnel"), &["--token-cache-ttl", "300s"]).await?;
    let token = pod_token(&ns, "web", "web-1", &web_uid).await?;
    let key = meshca_pki::SigningKey::generate(meshca_pki::KeyType::EcdsaP256)?;
    let csr = meshca_pki::csr::build_csr(&key, meshca_pki::cert::EMPTY_NAME, &[])
        .map_err(anyhow::Error::msg)?;
    let plain = || {
        let mut req = request(&csr, Some(&token), "");
        req.get_mut().metadata = None;
        req
    };
    let mut client = server.grpc(None).await?;
    let web = format!("spiffe://cluster.local/ns/{n}/sa/web");
    for _ in 0..2 {
        let chain = client
            .create_certificate(plain())
            .await
            .context("web's pod-bound token")?
            .into_inner()
            .cert_chain;
        assert_eq!(leaf_uris(&chain), vec![web.clone()]);
    }
    assert_eq!(
        server.metric("meshca_server_token_cache_hits_total")?,
        1.0,
        "the second request was answered from the cache"
    );

    // Gone at once (no kubelet to wait for).
    Api::<Pod>::namespaced(ns.env().client(), ns.name())
        .delete("web-1", &DeleteParams::default().grace_period(0))
        .await?;
    // meshca stops answering the token from its cache as soon as the watch
    // brings the delete event...
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let hits = server.metric("meshca_server_token_cache_hits_total")?;
        let _ = client.create_certificate(plain()).await;
        if server.metric("meshca_server_token_cache_hits_total")? == hits {
            break;
        }
        if Instant::now() > deadline {
            bail!("the token of a deleted pod is still served from the cache 3 s later");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // ...and asks the apiserver, which itself accepts a token for up to
    // 10 s after it last checked it (kube-apiserver's token success cache).
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        match client.create_certificate(plain()).await {
            Err(status) => break status,
            Ok(_) if Instant::now() > deadline => {
                bail!("the token of a deleted pod still gets certificates 20 s later")
            }
            Ok(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert_eq!(
        status
            .metadata()
            .get("meshca-reason")
            .and_then(|v| v.to_str().ok()),
        Some("unauthenticated")
    );

    drop(server);
    ns.cleanup().await
}
