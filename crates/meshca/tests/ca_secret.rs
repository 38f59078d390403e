//! The self-signed CA of `meshca server` in Secret `istio-ca-secret`, against
//! a real kube-apiserver with exactly deploy/server/rbac.yaml +
//! rbac-ca-secret.yaml (its Role moved to the test namespace, which is the
//! CA namespace here): replicas racing at start end up with one Secret and
//! one root; a Secret in Istio's format is used as is; a root near its end
//! is re-issued with the same key and subject, and leaves issued before
//! verify with the new root.

mod common;

use common::{Proc, free_port, meshca};

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ListParams, ObjectMeta, PostParams};
use meshca_server::ca::istio_secret::Origin;
use meshca_testsupport::{Identity, RbacSpec, TestEnv, TestNamespace, chart, rule};

const SECRET: &str = "istio-ca-secret";

struct Server {
    child: Child,
    addr: String,
    _state: tempfile::TempDir,
    /// Its stderr so far (also passed through to the test's stderr).
    log: Arc<Mutex<String>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The server's identity: the chart's RBAC for a self-signed CA in the test
/// namespace.
async fn server_identity(ns: &TestNamespace) -> Result<Identity> {
    let rbac = chart::server_rbac(ns.name(), &["server.ca=selfSigned"])?;
    ns.identity_from_manifest("meshca", &rbac).await
}

impl Server {
    /// Starts `meshca server` with its CA Secret in the test namespace.
    fn spawn(ns: &TestNamespace, identity: &Identity, extra: &[&str]) -> Result<(Server, String)> {
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
            .arg("--no-impersonation")
            .args(["--ca-secret-namespace", ns.name()])
            .arg("--kubeconfig")
            .arg(identity.kubeconfig_path())
            .args(["--self-signed-key-type", "ecdsa-p256"])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting meshca server")?;
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().context("stderr")?;
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("{line}");
                let mut log = sink.lock().unwrap_or_else(|e| e.into_inner());
                log.push_str(&line);
                log.push('\n');
            }
        });
        Ok((
            Server {
                child,
                addr,
                _state: state,
                log,
            },
            monitoring,
        ))
    }

    fn logged(&self, text: &str) -> bool {
        self.log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(text)
    }

    async fn wait_ready(&mut self, monitoring: &str) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("meshca server exited: {status}");
            }
            let ready = Command::new("curl")
                .args(["-sf", &format!("http://{monitoring}/readyz")])
                .output()
                .is_ok_and(|o| o.status.success());
            if ready {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("meshca server not ready");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn start(ns: &TestNamespace, identity: &Identity, extra: &[&str]) -> Result<Server> {
        let (mut server, monitoring) = Self::spawn(ns, identity, extra)?;
        server.wait_ready(&monitoring).await?;
        Ok(server)
    }

    /// A workload certificate: `meshca request` into `out` (key.pem,
    /// cert-chain.pem, root-cert.pem), trusting `root` for TLS.
    fn request(&self, token: &Path, root: &Path, out: &Path) -> Result<()> {
        meshca(&[
            "request",
            "--addr",
            &self.addr,
            "--root",
            root.to_str().unwrap(),
            "--token-file",
            token.to_str().unwrap(),
            "--key-type",
            "ecdsa-p256",
            "--out",
            out.to_str().unwrap(),
        ])
    }
}

fn data(secret: &Secret, key: &str) -> Vec<u8> {
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|b| b.0.clone())
        .unwrap_or_default()
}

async fn get_secret(ns: &TestNamespace) -> Result<Secret> {
    Ok(Api::<Secret>::namespaced(ns.env().client(), ns.name())
        .get(SECRET)
        .await?)
}

/// Places a `meshca ca init` directory in the namespace as Istio's Secret.
async fn put_secret(ns: &TestNamespace, dir: &Path) -> Result<Secret> {
    let mut data = BTreeMap::new();
    for key in [
        "ca-cert.pem",
        "ca-key.pem",
        "cert-chain.pem",
        "root-cert.pem",
    ] {
        data.insert(key.to_owned(), ByteString(std::fs::read(dir.join(key))?));
    }
    data.insert("key.pem".to_owned(), ByteString(Vec::new()));
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(SECRET.into()),
            ..Default::default()
        },
        type_: Some("istio.io/ca-root".into()),
        data: Some(data),
        ..Default::default()
    };
    Ok(Api::<Secret>::namespaced(ns.env().client(), ns.name())
        .create(&PostParams::default(), &secret)
        .await?)
}

async fn token_file(ns: &TestNamespace) -> Result<PathBuf> {
    ns.create_service_account("app").await?;
    let path = ns.temp_dir().join("app.token");
    std::fs::write(&path, ns.token("app").await?)?;
    Ok(path)
}

fn write(path: &Path, bytes: &[u8]) -> PathBuf {
    std::fs::write(path, bytes).unwrap();
    path.to_owned()
}

fn parse(pem: &[u8]) -> (Vec<u8>, Vec<u8>, i64) {
    let block = meshca_pki::pem::parse_all(pem).unwrap().remove(0);
    let (_, cert) = x509_parser::parse_x509_certificate(&block.der).unwrap();
    (
        cert.subject().as_raw().to_vec(),
        cert.public_key().raw.to_vec(),
        cert.validity().not_after.timestamp(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_starting_at_once_share_one_secret_and_one_root() {
    tokio::time::timeout(Duration::from_secs(120), async {
        let env = TestEnv::get().await;
        let ns = env.namespace("cas-race").await.unwrap();
        let identity = server_identity(&ns).await.unwrap();
        let token = token_file(&ns).await.unwrap();
        // Both start before either is ready: they race to create the Secret.
        let (mut a, mon_a) = Server::spawn(&ns, &identity, &[]).unwrap();
        let (mut b, mon_b) = Server::spawn(&ns, &identity, &[]).unwrap();
        a.wait_ready(&mon_a).await.unwrap();
        b.wait_ready(&mon_b).await.unwrap();
        // Exactly one created the CA; the other took the winner's, after a
        // 409 or having found it (which one depends on the two processes'
        // timing; the in-process test below forces the conflict).
        let created = "created a self-signed root CA in the Secret";
        let adopted = [
            "another replica created the CA Secret; using it",
            "using the self-signed CA in the Secret",
        ];
        let decided = |s: &Server| s.logged(created) || adopted.iter().any(|t| s.logged(t));
        let deadline = Instant::now() + Duration::from_secs(5);
        while !(decided(&a) && decided(&b)) {
            assert!(Instant::now() < deadline, "no CA Secret log line");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let (winner, loser) = match (a.logged(created), b.logged(created)) {
            (true, false) => (&a, &b),
            (false, true) => (&b, &a),
            both => panic!("created by (a, b): {both:?}; exactly one expected"),
        };
        assert!(!adopted.iter().any(|t| winner.logged(t)));
        assert!(adopted.iter().any(|t| loser.logged(t)));

        let all = Api::<Secret>::namespaced(env.client(), ns.name())
            .list(&ListParams::default())
            .await
            .unwrap();
        let ca_secrets: Vec<_> = all
            .items
            .iter()
            .filter(|s| s.type_.as_deref() == Some("istio.io/ca-root"))
            .collect();
        assert_eq!(ca_secrets.len(), 1, "exactly one CA Secret");
        let secret = get_secret(&ns).await.unwrap();
        for key in ["ca-cert.pem", "ca-key.pem", "root-cert.pem"] {
            assert!(!data(&secret, key).is_empty(), "{key} filled");
        }
        assert!(data(&secret, "cert-chain.pem").is_empty());
        let root = data(&secret, "root-cert.pem");
        assert_eq!(data(&secret, "ca-cert.pem"), root);

        let dir = ns.temp_dir().to_path_buf();
        let root_file = write(&dir.join("root.pem"), &root);
        for (i, server) in [&a, &b].into_iter().enumerate() {
            let out = dir.join(format!("leaf-{i}"));
            server.request(&token, &root_file, &out).unwrap();
            assert_eq!(
                std::fs::read(out.join("root-cert.pem")).unwrap(),
                root,
                "server {i} serves the Secret's root"
            );
        }
        drop((a, b));
        ns.cleanup().await.unwrap();
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_istio_secret_is_used_as_is() {
    tokio::time::timeout(Duration::from_secs(120), async {
        let env = TestEnv::get().await;
        let ns = env.namespace("cas-migrate").await.unwrap();
        let dir = ns.temp_dir().to_path_buf();
        let ca = dir.join("istiod-ca");
        meshca(&[
            "ca",
            "init",
            "--key-type",
            "ecdsa-p256",
            "--org",
            "migrate.example",
            "--out",
            ca.to_str().unwrap(),
        ])
        .unwrap();
        let before = put_secret(&ns, &ca).await.unwrap();
        let identity = server_identity(&ns).await.unwrap();
        let token = token_file(&ns).await.unwrap();
        let server = Server::start(&ns, &identity, &[]).await.unwrap();

        let out = dir.join("leaf");
        server
            .request(&token, &ca.join("root-cert.pem"), &out)
            .unwrap();
        assert_eq!(
            std::fs::read(out.join("root-cert.pem")).unwrap(),
            std::fs::read(ca.join("root-cert.pem")).unwrap(),
            "the served root is the Secret's"
        );
        let after = get_secret(&ns).await.unwrap();
        assert_eq!(
            after.metadata.resource_version, before.metadata.resource_version,
            "the Secret is not rewritten"
        );
        drop(server);
        ns.cleanup().await.unwrap();
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_root_near_its_end_is_reissued_with_the_same_key_and_subject() {
    tokio::time::timeout(Duration::from_secs(150), async {
        let env = TestEnv::get().await;
        let ns = env.namespace("cas-rotate").await.unwrap();
        let dir = ns.temp_dir().to_path_buf();
        let ca = dir.join("short-ca");
        meshca(&[
            "ca",
            "init",
            "--key-type",
            "ecdsa-p256",
            "--org",
            "rotate.example",
            "--ttl",
            "10m",
            "--out",
            ca.to_str().unwrap(),
        ])
        .unwrap();
        let before = put_secret(&ns, &ca).await.unwrap();
        let old_root = data(&before, "root-cert.pem");
        let identity = server_identity(&ns).await.unwrap();
        let token = token_file(&ns).await.unwrap();

        // A leaf from the current root, before any rotation (default grace:
        // the root, backdated 2 min, has ~83% of its life left).
        let leaf = dir.join("leaf-before");
        {
            let server = Server::start(&ns, &identity, &[]).await.unwrap();
            server
                .request(&token, &ca.join("root-cert.pem"), &leaf)
                .unwrap();
        }
        assert_eq!(
            get_secret(&ns).await.unwrap().metadata.resource_version,
            before.metadata.resource_version
        );

        // Grace 90%: the root is due; checked every second.
        let server = Server::start(
            &ns,
            &identity,
            &[
                "--self-signed-root-grace-percentile",
                "90",
                "--self-signed-root-check-interval",
                "1s",
            ],
        )
        .await
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let after = loop {
            let s = get_secret(&ns).await.unwrap();
            if data(&s, "ca-cert.pem") != old_root {
                break s;
            }
            assert!(Instant::now() < deadline, "the root was not rotated");
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        assert_eq!(after.type_.as_deref(), Some("istio.io/ca-root"));
        let new_root = data(&after, "root-cert.pem");
        assert_eq!(data(&after, "ca-cert.pem"), new_root);
        assert!(data(&after, "cert-chain.pem").is_empty());
        let (old_subject, old_key, old_end) = parse(&old_root);
        let (new_subject, new_key, new_end) = parse(&new_root);
        assert_eq!(new_subject, old_subject, "same subject");
        assert_eq!(new_key, old_key, "same key");
        assert!(new_end > old_end + 3600, "a fresh life");

        // The leaf from before verifies with the new root.
        let new_root_file = write(&dir.join("new-root.pem"), &new_root);
        let verify = Command::new("openssl")
            .arg("verify")
            .arg("-CAfile")
            .arg(&new_root_file)
            .arg(leaf.join("cert-chain.pem"))
            .output()
            .unwrap();
        assert!(
            verify.status.success(),
            "openssl verify: {}{}",
            String::from_utf8_lossy(&verify.stdout),
            String::from_utf8_lossy(&verify.stderr)
        );

        // The running server swapped to the new root.
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut n = 0;
        loop {
            n += 1;
            let out = dir.join(format!("leaf-after-{n}"));
            server.request(&token, &new_root_file, &out).unwrap();
            if std::fs::read(out.join("root-cert.pem")).unwrap() == new_root {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the server still serves the old root"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // Not rotated again: the new root has its full life.
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(
            data(&get_secret(&ns).await.unwrap(), "ca-cert.pem"),
            new_root
        );
        drop(server);
        ns.cleanup().await.unwrap();
    })
    .await
    .expect("test timed out");
}

/// `client` with every POST held until `n` POSTs are waiting.
fn creates_held_until(client: kube::Client, n: usize) -> kube::Client {
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(n));
    let service = tower::service_fn(move |req: http::Request<kube::client::Body>| {
        let (client, barrier) = (client.clone(), barrier.clone());
        async move {
            if req.method() == http::Method::POST {
                barrier.wait().await;
            }
            client.send(req).await
        }
    });
    kube::Client::new(service, "default")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_creators_all_use_the_one_secret_that_won() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let env = TestEnv::get().await;
        let ns = env.namespace("cas-create").await.unwrap();
        let identity = server_identity(&ns).await.unwrap();
        let client = identity.client().await.unwrap();
        let config = meshca_server::ca::istio_secret::CaSecretConfig {
            namespace: ns.name().to_owned(),
            check_interval: Duration::from_secs(3600),
            grace_percentile: 20,
        };
        let spec = meshca_server::ca::istio_secret::RootSpec {
            key_type: meshca_pki::KeyType::EcdsaP256,
            org: "race.example",
            ttl: Duration::from_secs(86_400),
        };
        // All look before any creates: each POST waits until all four have
        // been sent, so every GET has answered "missing" by then. One create
        // wins; the losers get 409 and read the winner's.
        let client = creates_held_until(client, 4);
        let load =
            || meshca_server::ca::istio_secret::load_or_create(client.clone(), &config, &spec);
        let (a, b, c, d) = tokio::join!(load(), load(), load(), load());
        let (certs, mut origins): (Vec<Vec<u8>>, Vec<Origin>) = [a, b, c, d]
            .into_iter()
            .map(|r| {
                let (bundle, origin) = r.unwrap();
                (bundle.signing_cert_der().to_vec(), origin)
            })
            .unzip();
        assert!(certs.windows(2).all(|w| w[0] == w[1]), "one root for all");
        origins.sort_by_key(|o| *o != Origin::Created);
        assert_eq!(
            origins,
            [
                Origin::Created,
                Origin::LostRace,
                Origin::LostRace,
                Origin::LostRace
            ],
            "one winner, three losers that saw the conflict"
        );
        let secret = get_secret(&ns).await.unwrap();
        let stored = meshca_pki::pem::parse_all(&data(&secret, "ca-cert.pem"))
            .unwrap()
            .remove(0);
        assert_eq!(stored.der.to_vec(), certs[0]);
        ns.cleanup().await.unwrap();
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_ca_namespace_is_named_with_the_ways_out() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let env = TestEnv::get().await;
        let ns = env.namespace("cas-no-ns").await.unwrap();
        // Secrets everywhere (as an admin kubeconfig has): what stops the
        // server is the namespace, not RBAC.
        let identity = ns
            .identity(
                "meshca",
                &[RbacSpec::Rules(vec![
                    rule(&[""], &["secrets"], &[], &["get", "create", "update"]),
                    rule(
                        &["authentication.k8s.io"],
                        &["tokenreviews"],
                        &[],
                        &["create"],
                    ),
                ])],
            )
            .await
            .unwrap();
        let missing = ns.unique_name("absent");
        let state = tempfile::tempdir().unwrap();
        let mut child = Proc(
            Command::new(env!("CARGO_BIN_EXE_meshca"))
                .args(["server", "--listen", &format!("127.0.0.1:{}", free_port())])
                .args(["--monitoring-listen", "none"])
                .arg("--root-ca-dir")
                .arg(state.path().join("no-plugged-ca"))
                .arg("--state-dir")
                .arg(state.path())
                .arg("--no-root-configmap")
                .arg("--no-impersonation")
                .args(["--ca-secret-namespace", &missing])
                .arg("--kubeconfig")
                .arg(identity.kubeconfig_path())
                .args(["--self-signed-key-type", "ecdsa-p256"])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = child.0.try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < deadline, "the server kept running");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut child.0.stderr.take().unwrap(), &mut stderr).unwrap();
        assert!(!status.success(), "{stderr}");
        for needle in [
            format!("namespace {missing} does not exist"),
            format!("kubectl create namespace {missing}"),
            "POD_NAMESPACE".into(),
            "--ca-secret-namespace".into(),
            "--no-ca-secret".into(),
        ] {
            assert!(stderr.contains(&needle), "{needle:?} not in: {stderr}");
        }
        assert!(!stderr.contains("rbac-ca-secret.yaml"), "{stderr}");
        ns.cleanup().await.unwrap();
    })
    .await
    .expect("test timed out");
}
