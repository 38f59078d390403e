//! The real pilot-agent (Istio's own, built from its module) fetches its
//! workload certificate from `meshca server` with a real ServiceAccount token.
//! meshca runs as in a cluster, with exactly the Helm chart's RBAC: its
//! self-signed CA in Secret `istio-ca-secret`, its roots in ConfigMap
//! `istio-ca-root-cert` in every namespace; pilot-agent trusts the root it
//! finds in that ConfigMap, as a pod that mounts it does.
//!
//! pilot-agent runs in its own network namespace with only a loopback
//! interface: its status server (which binds every interface) stays private,
//! and it cannot reach anything but meshca, which it sees at
//! 127.0.0.1:15012 through a relay over a Unix socket.

mod common;

use common::free_port;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret};
use kube::api::{Api, DeleteParams, ListParams};
use meshca_testsupport::{TestEnv, TokenOptions, chart};
use tokio::net::{TcpStream, UnixListener};

/// Waits until ConfigMap istio-ca-root-cert holds one and the same root in
/// every namespace istiod would serve; returns it.
async fn root_in_every_namespace(client: &kube::Client) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut roots = std::collections::BTreeMap::new();
        for ns in Api::<Namespace>::all(client.clone())
            .list(&ListParams::default())
            .await?
        {
            if !meshca_server::distribution::configmap::manages(&ns.metadata) {
                continue;
            }
            let name = ns.metadata.name.unwrap_or_default();
            let pem = Api::<ConfigMap>::namespaced(client.clone(), &name)
                .get_opt("istio-ca-root-cert")
                .await?
                .and_then(|cm| cm.data?.remove("root-cert.pem"));
            roots.insert(name, pem);
        }
        let distinct: std::collections::BTreeSet<_> = roots.values().collect();
        if let [Some(root)] = distinct.into_iter().collect::<Vec<_>>()[..] {
            return Ok(root.clone());
        }
        if Instant::now() > deadline {
            bail!("istio-ca-root-cert differs or is missing: {roots:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Inside the namespace: 127.0.0.1:15012 -> the Unix socket.
const INNER_RELAY: &str = r#"
import socket, sys, threading
def pipe(a, b):
    try:
        while True:
            data = a.recv(65536)
            if not data:
                break
            b.sendall(data)
    except OSError:
        pass
    finally:
        for s in (a, b):
            try: s.shutdown(socket.SHUT_RDWR)
            except OSError: pass
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", 15012))
srv.listen(16)
while True:
    c, _ = srv.accept()
    u = socket.socket(socket.AF_UNIX)
    u.connect(sys.argv[1])
    threading.Thread(target=pipe, args=(c, u), daemon=True).start()
    threading.Thread(target=pipe, args=(u, c), daemon=True).start()
"#;

/// Kills a child process when dropped, so a failed assertion leaves nothing behind.
struct Reaper(std::process::Child);

impl Drop for Reaper {
    fn drop(&mut self) {
        // Kill the children first (unshare's namespace init) so that the
        // parent reaps them: killing only the parent would leave zombies.
        let pid = self.0.id();
        if let Ok(children) = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")) {
            for child in children.split_whitespace() {
                let _ = Command::new("kill").args(["-9", child]).status();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Outside: the Unix socket -> meshca's TCP port.
fn spawn_outer_relay(socket: &Path, target: String) -> Result<tokio::task::JoinHandle<()>> {
    let listener = UnixListener::bind(socket)?;
    Ok(tokio::spawn(async move {
        while let Ok((mut unix, _)) = listener.accept().await {
            let target = target.clone();
            tokio::spawn(async move {
                if let Ok(mut tcp) = TcpStream::connect(&target).await {
                    let _ = tokio::io::copy_bidirectional(&mut unix, &mut tcp).await;
                }
            });
        }
    }))
}

#[tokio::test]
async fn pilot_agent_fetches_and_writes_a_workload_certificate_from_meshca() -> Result<()> {
    let env = TestEnv::get().await;
    let ns = env.namespace("agent").await?;
    let dir = ns.temp_dir().to_owned();

    // meshca as the mesh CA, with the Helm chart's RBAC (namespace: this test's).
    let rbac = chart::server_rbac(
        ns.name(),
        &[
            "server.ca=selfSigned",
            "server.rootConfigMap=true",
            "leaderElection.enabled=true",
        ],
    )?;
    let identity = ns.identity_from_manifest("meshca", &rbac).await?;
    let (addr, monitoring) = (
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    );
    let server = Reaper(
        Command::new(env!("CARGO_BIN_EXE_meshca"))
            .args([
                "server",
                "--listen",
                &addr,
                "--monitoring-listen",
                &monitoring,
            ])
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--root-ca-dir")
            .arg(dir.join("none"))
            .arg("--kubeconfig")
            .arg(identity.kubeconfig_path())
            .arg("--no-impersonation")
            .env("POD_NAMESPACE", ns.name())
            .env("POD_NAME", "meshca-0")
            .stdout(Stdio::null())
            .spawn()?,
    );
    let result = async {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !Command::new("curl")
            .args(["-sf", &format!("http://{monitoring}/readyz")])
            .status()?
            .success()
        {
            anyhow::ensure!(Instant::now() < deadline, "meshca server not ready");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // The root every namespace gets is the one in istio-ca-secret.
        let admin = env.client();
        let distributed = root_in_every_namespace(&admin).await?;
        let secret = Api::<Secret>::namespaced(admin.clone(), ns.name())
            .get("istio-ca-secret")
            .await?;
        let secret_root = secret
            .data
            .and_then(|mut d| d.remove("ca-cert.pem"))
            .context("istio-ca-secret has no ca-cert.pem")?;
        anyhow::ensure!(
            distributed.as_bytes() == secret_root.0.as_slice(),
            "istio-ca-root-cert is not the root in istio-ca-secret"
        );
        let root = dir.join("root-cert.pem");
        std::fs::write(&root, &distributed)?;

        ns.create_service_account("productpage").await?;
        let token = ns
            .token_with(
                "productpage",
                &TokenOptions {
                    expiration_seconds: 3600,
                    ..Default::default()
                },
            )
            .await?;
        let work = dir.join("agent");
        std::fs::create_dir_all(work.join("var/run/secrets/tokens"))?;
        std::fs::write(work.join("var/run/secrets/tokens/istio-token"), token)?;
        // Where pods mount the istio-ca-root-cert ConfigMap; pilot-agent
        // insists on it for its xDS connection even with DISABLE_ENVOY.
        std::fs::create_dir_all(work.join("var/run/secrets/istio"))?;
        std::fs::copy(&root, work.join("var/run/secrets/istio/root-cert.pem"))?;
        let out = work.join("out");
        std::fs::create_dir_all(&out)?;
        std::fs::write(dir.join("relay.py"), INNER_RELAY)?;
        let socket = dir.join("ca.sock");
        let relay = spawn_outer_relay(&socket, addr.clone())?;

        let script = format!(
            "ip link set lo up && (python3 {relay} {socket} &) && sleep 0.5 && exec {agent} proxy",
            relay = dir.join("relay.py").display(),
            socket = socket.display(),
            agent = meshca_testsupport::bin("pilot-agent").display(),
        );
        let log = std::fs::File::create(dir.join("pilot-agent.log"))?;
        // A new network namespace (loopback only) and PID namespace: when
        // unshare goes, the kernel ends every process inside, relay included.
        let mut agent = Reaper(
            Command::new("unshare")
                .args([
                    "--net",
                    "--pid",
                    "--fork",
                    "--kill-child",
                    "--",
                    "sh",
                    "-c",
                    &script,
                ])
                .current_dir(&work)
                .env("DISABLE_ENVOY", "true")
                .env("CLOUD_PLATFORM", "none")
                .env("CA_ADDR", "127.0.0.1:15012")
                .env("CA_ROOT_CA", &root)
                .env("OUTPUT_CERTS", &out)
                .env("POD_NAMESPACE", ns.name())
                .env("POD_NAME", "productpage-v1-0")
                .env("SERVICE_ACCOUNT", "productpage")
                .env("TRUST_DOMAIN", "cluster.local")
                .env("PROXY_CONFIG", r#"{"discoveryAddress":"127.0.0.1:15010"}"#)
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .context("starting pilot-agent under unshare --net")?,
        );
        let chain_path = out.join("cert-chain.pem");
        let deadline = Instant::now() + Duration::from_secs(60);
        let outcome = loop {
            if chain_path.exists()
                && out.join("key.pem").exists()
                && out.join("root-cert.pem").exists()
            {
                break Ok(());
            }
            if let Some(status) = agent.0.try_wait()? {
                break Err(anyhow::anyhow!("pilot-agent exited with {status}"));
            }
            if Instant::now() > deadline {
                break Err(anyhow::anyhow!(
                    "pilot-agent wrote no certificate within 60 s"
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        drop(agent);
        relay.abort();
        if let Err(e) = outcome {
            let log = std::fs::read_to_string(dir.join("pilot-agent.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            bail!(
                "{e}; pilot-agent log tail:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        // A moment for the files to be complete.
        tokio::time::sleep(Duration::from_millis(300)).await;

        // What pilot-agent wrote verifies to meshca's root and names the workload.
        let verify = Command::new(env!("CARGO_BIN_EXE_meshca"))
            .arg("verify")
            .arg("--root")
            .arg(&root)
            .arg("--chain")
            .arg(&chain_path)
            .output()?;
        let text = String::from_utf8_lossy(&verify.stdout);
        anyhow::ensure!(verify.status.success(), "meshca verify: {text}");
        let expected = format!("spiffe://cluster.local/ns/{}/sa/productpage", ns.name());
        anyhow::ensure!(text.contains(&expected), "{text}");
        // pilot-agent trims the trailing newline; compare the certificate.
        let written_root = std::fs::read_to_string(out.join("root-cert.pem"))?;
        anyhow::ensure!(
            written_root.trim() == std::fs::read_to_string(&root)?.trim(),
            "pilot-agent's root-cert.pem is not meshca's root"
        );
        Ok(())
    }
    .await;
    drop(server);
    // The server wrote into namespaces outside this test: remove those
    // ConfigMaps (the ones in this test's namespace go with it).
    for other in Api::<Namespace>::all(env.client())
        .list(&ListParams::default())
        .await?
    {
        let name = other.metadata.name.unwrap_or_default();
        if name != ns.name() {
            let _ = Api::<ConfigMap>::namespaced(env.client(), &name)
                .delete("istio-ca-root-cert", &DeleteParams::default())
                .await;
        }
    }
    result?;
    ns.cleanup().await
}
