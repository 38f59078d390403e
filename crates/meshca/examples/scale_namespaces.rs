//! Benchmark (issue 14, axis 1): root distribution to ConfigMap
//! `istio-ca-root-cert` in 1,000, 5,000 and 10,000 namespaces, meshca
//! server against istiod's namespace controller, on one kube-apiserver in
//! the same run. istiod runs with ISTIO_MULTIROOT_MESH=true: without it,
//! it ignores a changed root-cert.pem.
//!
//! ```text
//! testenv/build all && testenv/build istiod
//! env="$(testenv/up)" && eval "$env"
//! cargo build --release -p meshca --examples
//! target/release/examples/scale_namespaces [SIZES...]     # default 1000 5000 10000
//! testenv/down
//! ```
//!
//! For each size, in increasing order (the namespaces `scale-ns-NNNNN` are
//! created 64 at a time and kept for the next size and the next run on the
//! same testenv), first meshca, then
//! istiod, one at a time (both write the same ConfigMaps):
//! 1. start (meshca: the Helm chart's RBAC, plugged-in CA; istiod: admin
//!    kubeconfig, the same CA in `./etc/cacerts`, its defaults) and wait
//!    until every namespace's ConfigMap holds the current roots;
//! 2. the root change: `root-cert.pem` goes from root A to A+B or back
//!    (the only root change istiod accepts without a restart: one bundle
//!    containing the other), swapped as a Secret volume does it (`..data`
//!    symlink renamed); time until every ConfigMap holds the new roots;
//! 3. a new namespace; time until its ConfigMap holds the roots;
//! 4. RSS now and peak; CPU seconds of the CA, kube-apiserver, etcd and
//!    this bench during step 2 (where the time goes).
//!
//! The bench watches the ConfigMaps itself (admin client) and timestamps
//! each namespace's change as it arrives. meshca polls the CA files every
//! 200 ms here (`--reload-interval`, default 5 s); istiod watches them with
//! inotify and a 100 ms debounce. Everything listens on 127.0.0.1 and stops
//! by itself.

mod bench_common;

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bench_common::{
    IstiodOptions, Proc, control_plane, cpu_seconds, create_all, free_port, load_average,
    meshca_bin, own_cpu_seconds, rss_mib, rss_now_mib, start_istiod, terminate, wait_http,
};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, ListParams};
use kube::runtime::{WatchStreamExt, watcher};
use meshca_server::distribution::configmap::{CONFIGMAP_NAME, DATA_KEY, manages};
use meshca_testsupport::{TestEnv, chart};

const PREFIX: &str = "scale-ns-";
const CREATE_CONCURRENCY: usize = 64;
const LIMIT: Duration = Duration::from_secs(600);

/// A hash of a root bundle's certificates, in any order.
fn roots_hash(pem: &str) -> u64 {
    let mut ders: Vec<Vec<u8>> = meshca_pki::pem::parse_all(pem.as_bytes())
        .unwrap_or_default()
        .into_iter()
        .filter(|b| b.label == "CERTIFICATE")
        .map(|b| b.der.to_vec())
        .collect();
    ders.sort();
    let mut h = DefaultHasher::new();
    ders.hash(&mut h);
    h.finish()
}

#[derive(Default)]
struct Seen {
    /// Namespace -> (hash of the roots its ConfigMap holds, when it last changed).
    by_ns: HashMap<String, (u64, Instant)>,
    events: u64,
    last_event: Option<Instant>,
}

/// Every `istio-ca-root-cert` as the apiserver reports it, with arrival times.
#[derive(Clone)]
struct Tracker(Arc<Mutex<Seen>>);

impl Tracker {
    fn start(client: kube::Client) -> Tracker {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let writer = seen.clone();
        let events = watcher(
            Api::<ConfigMap>::all(client),
            watcher::Config::default().fields(&format!("metadata.name={CONFIGMAP_NAME}")),
        )
        .default_backoff();
        tokio::spawn(async move {
            let mut events = std::pin::pin!(events);
            while let Some(event) = events.next().await {
                let now = Instant::now();
                let mut seen = writer.lock().unwrap_or_else(|p| p.into_inner());
                match event {
                    Ok(watcher::Event::Apply(cm) | watcher::Event::InitApply(cm)) => {
                        let ns = cm.metadata.namespace.clone().unwrap_or_default();
                        let hash = cm
                            .data
                            .as_ref()
                            .and_then(|d| d.get(DATA_KEY))
                            .map_or(0, |p| roots_hash(p));
                        let entry = seen.by_ns.entry(ns).or_insert((0, now));
                        if entry.0 != hash {
                            *entry = (hash, now);
                        }
                        seen.events += 1;
                        seen.last_event = Some(now);
                    }
                    Ok(watcher::Event::Delete(cm)) => {
                        let ns = cm.metadata.namespace.clone().unwrap_or_default();
                        seen.by_ns.insert(ns, (0, now));
                        seen.events += 1;
                        seen.last_event = Some(now);
                    }
                    Ok(_) => {}
                    Err(e) => eprintln!("bench watch: {e}"),
                }
            }
        });
        Tracker(seen)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn events(&self) -> u64 {
        self.lock().events
    }

    /// Waits until each of `namespaces` holds `want`; returns when the last
    /// one changed to it, as time since `since` (zero if all held it already).
    async fn wait_all(&self, namespaces: &[String], want: u64, since: Instant) -> Result<f64> {
        let deadline = Instant::now() + LIMIT;
        loop {
            let (missing, last) = {
                let seen = self.lock();
                let mut missing = 0usize;
                let mut last = since;
                for ns in namespaces {
                    match seen.by_ns.get(ns) {
                        Some((h, at)) if *h == want => last = last.max(*at),
                        _ => missing += 1,
                    }
                }
                (missing, last)
            };
            if missing == 0 {
                return Ok((last - since).as_secs_f64());
            }
            if Instant::now() > deadline {
                bail!(
                    "{missing} of {} namespaces still without the roots after {LIMIT:?}",
                    namespaces.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until no ConfigMap changed for `quiet` (startup writes done).
    async fn settle(&self, quiet: Duration) {
        let deadline = Instant::now() + LIMIT;
        loop {
            let last = self.lock().last_event;
            if last.is_none_or(|l| l.elapsed() >= quiet) || Instant::now() > deadline {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// A cacerts directory laid out as a Secret volume: files are symlinks
/// through `..data`, which points at one version directory.
struct Cacerts {
    dir: PathBuf,
    /// Roots (PEM) of version 0 and 1.
    roots: [String; 2],
    current: usize,
}

impl Cacerts {
    /// `ca` holds ca-cert.pem, ca-key.pem, cert-chain.pem and root-cert.pem
    /// (root A); version 1 has root-cert.pem = A + `extra_root`.
    fn new(dir: &Path, ca: &Path, extra_root: &Path) -> Result<Cacerts> {
        std::fs::create_dir_all(dir)?;
        let a = std::fs::read_to_string(ca.join("root-cert.pem"))?;
        let both = format!("{a}{}", std::fs::read_to_string(extra_root)?);
        for (v, root) in [(0, &a), (1, &both)] {
            let vdir = dir.join(format!("..v{v}"));
            std::fs::create_dir_all(&vdir)?;
            for f in ["ca-cert.pem", "ca-key.pem", "cert-chain.pem"] {
                std::fs::copy(ca.join(f), vdir.join(f))?;
            }
            std::fs::write(vdir.join("root-cert.pem"), root)?;
        }
        std::os::unix::fs::symlink("..v0", dir.join("..data"))?;
        for f in [
            "ca-cert.pem",
            "ca-key.pem",
            "cert-chain.pem",
            "root-cert.pem",
        ] {
            std::os::unix::fs::symlink(format!("..data/{f}"), dir.join(f))?;
        }
        Ok(Cacerts {
            dir: dir.to_owned(),
            roots: [a, both],
            current: 0,
        })
    }

    fn hash(&self) -> u64 {
        roots_hash(&self.roots[self.current])
    }

    /// Switches to the other version at once (rename of `..data`).
    fn swap(&mut self) -> Result<()> {
        self.current = 1 - self.current;
        let tmp = self.dir.join("..data_tmp");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(format!("..v{}", self.current), &tmp)?;
        std::fs::rename(&tmp, self.dir.join("..data"))?;
        Ok(())
    }
}

/// The namespaces that get the ConfigMap (all but kube-system & co).
async fn managed_namespaces(client: &kube::Client) -> Result<Vec<String>> {
    let list = Api::<Namespace>::all(client.clone())
        .list_metadata(&ListParams::default())
        .await?;
    Ok(list
        .items
        .into_iter()
        .filter(|n| manages(&n.metadata))
        .filter_map(|n| n.metadata.name)
        .collect())
}

fn namespace(name: String) -> Namespace {
    Namespace {
        metadata: ObjectMeta {
            name: Some(name),
            ..Default::default()
        },
        ..Default::default()
    }
}

struct Figures {
    start_sync_s: f64,
    change_s: f64,
    change_writes: u64,
    new_ns_s: f64,
    rss_now: f64,
    rss_peak: f64,
    /// CPU seconds spent during the root change (until all updated) by
    /// the CA, kube-apiserver, etcd and this bench (its watch).
    change_cpu: [f64; 4],
}

/// CPU seconds used so far by the CA, the control plane and this bench.
fn cpu_now(ca: u32, control_plane: &[(&str, u32)]) -> [f64; 4] {
    let of = |name: &str| {
        control_plane
            .iter()
            .find(|(n, _)| *n == name)
            .and_then(|(_, pid)| cpu_seconds(*pid))
            .unwrap_or(0.0)
    };
    [
        cpu_seconds(ca).unwrap_or(0.0),
        of("kube-apiserver"),
        of("etcd"),
        own_cpu_seconds(),
    ]
}

/// Steps 1-4 for one running CA; `pid` is its process.
async fn measure(
    client: &kube::Client,
    tracker: &Tracker,
    cacerts: &mut Cacerts,
    started: Instant,
    pid: u32,
    label: &str,
    control_plane: &[(&str, u32)],
) -> Result<Figures> {
    let namespaces = managed_namespaces(client).await?;
    let start_sync_s = tracker
        .wait_all(&namespaces, cacerts.hash(), started)
        .await
        .with_context(|| format!("{label}: initial sync"))?;
    tracker.settle(Duration::from_secs(3)).await;

    let before = tracker.events();
    let t0 = Instant::now();
    let cpu0 = cpu_now(pid, control_plane);
    cacerts.swap()?;
    let change_s = tracker
        .wait_all(&namespaces, cacerts.hash(), t0)
        .await
        .with_context(|| format!("{label}: root change"))?;
    let cpu1 = cpu_now(pid, control_plane);
    let change_cpu = std::array::from_fn(|i| cpu1[i] - cpu0[i]);
    tracker.settle(Duration::from_secs(3)).await;
    let change_writes = tracker.events() - before;

    let name = format!("scale-new-{label}-{}-{}", namespaces.len(), free_port());
    let t1 = Instant::now();
    Api::<Namespace>::all(client.clone())
        .create(&Default::default(), &namespace(name.clone()))
        .await?;
    let new_ns_s = tracker
        .wait_all(&[name], cacerts.hash(), t1)
        .await
        .with_context(|| format!("{label}: new namespace"))?;
    Ok(Figures {
        start_sync_s,
        change_s,
        change_writes,
        new_ns_s,
        rss_now: rss_now_mib(pid),
        rss_peak: rss_mib(pid),
        change_cpu,
    })
}

async fn start_meshca(kubeconfig: &Path, plugged: &Path, state: &Path) -> Result<Proc> {
    let monitoring = format!("127.0.0.1:{}", free_port());
    let proc = Proc(
        Command::new(meshca_bin()?)
            .args(["server", "--listen", &format!("127.0.0.1:{}", free_port())])
            .args(["--monitoring-listen", &monitoring])
            .arg("--root-ca-dir")
            .arg(plugged)
            .args(["--reload-interval", "200ms"])
            .arg("--state-dir")
            .arg(state)
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args(["--no-impersonation", "--no-leader-election"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()?,
    );
    wait_http(
        &format!("http://{monitoring}/readyz"),
        "meshca",
        Duration::from_secs(60),
    )
    .await?;
    Ok(proc)
}

fn row(what: &str, n: usize, f: &Figures) {
    let [ca, api, etcd, bench] = f.change_cpu;
    println!(
        "| {what} | {n} | {:.2} | {:.2} | {} | {:.2} | {:.0} | {:.0} | {ca:.1} / {api:.1} / {etcd:.1} / {bench:.1} | {} |",
        f.change_s,
        f.start_sync_s,
        f.change_writes,
        f.new_ns_s,
        f.rss_now,
        f.rss_peak,
        load_average(),
    );
}

#[tokio::main]
async fn main() -> Result<()> {
    let mut sizes: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    if sizes.is_empty() {
        sizes = vec![1000, 5000, 10000];
    }
    sizes.sort_unstable();

    let env = TestEnv::get().await;
    let client = env.client();
    let home = env.namespace("scale-ns-bench").await?;
    let tmp = home.temp_dir().to_owned();

    // Root A with the issuing intermediate, and root B for the change.
    let meshca = |args: &[&str]| -> Result<()> {
        let out = Command::new(meshca_bin()?).args(args).output()?;
        anyhow::ensure!(
            out.status.success(),
            "meshca {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    };
    let path = |p: &str| tmp.join(p).to_string_lossy().into_owned();
    let init = ["ca", "init", "--key-type", "ecdsa-p256"];
    meshca(&[&init[..], &["--out", &path("root-a"), "--org", "scale-a"]].concat())?;
    meshca(&[&init[..], &["--out", &path("root-b"), "--org", "scale-b"]].concat())?;
    meshca(
        &[
            &init[..],
            &[
                "--out",
                &path("ca-a"),
                "--intermediate-of",
                &path("root-a"),
                "--org",
                "scale-a",
            ],
        ]
        .concat(),
    )?;
    let extra = tmp.join("root-b/root-cert.pem");
    let mut meshca_cacerts = Cacerts::new(&tmp.join("meshca-cacerts"), &tmp.join("ca-a"), &extra)?;
    let istiod_dir = tmp.join("istiod");
    let mut istiod_cacerts =
        Cacerts::new(&istiod_dir.join("etc/cacerts"), &tmp.join("ca-a"), &extra)?;

    let rbac = chart::server_rbac(home.name(), &["server.rootConfigMap=true"])?;
    let identity = home.identity_from_manifest("meshca", &rbac).await?;
    let admin_kubeconfig = PathBuf::from(std::env::var("KUBECONFIG").context("KUBECONFIG")?);
    let tracker = Tracker::start(client.clone());
    let with_istiod = env.config().bin("pilot-discovery").is_ok();
    if !with_istiod {
        eprintln!("pilot-discovery is not built (testenv/build istiod): meshca only");
    }

    println!(
        "| CA | namespaces | root change: all updated, s | start: all in sync, s | ConfigMap writes | new namespace, s | RSS MiB | peak RSS MiB | root change CPU s: CA / apiserver / etcd / bench | load |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let namespaces = Api::<Namespace>::all(client.clone());
    // Namespaces of an earlier run on this testenv are kept: each size can
    // run as its own invocation.
    let mut made: std::collections::HashSet<String> =
        managed_namespaces(&client).await?.into_iter().collect();
    let mut in_configmaps: Option<u64> = None;
    for &size in &sizes {
        let missing: Vec<String> = (0..size)
            .map(|i| format!("{PREFIX}{i:05}"))
            .filter(|n| !made.contains(n))
            .collect();
        let took = create_all(0..missing.len(), CREATE_CONCURRENCY, |k| {
            (namespaces.clone(), namespace(missing[k].clone()))
        })
        .await?;
        eprintln!(
            "created {} namespaces (now {size}) in {took:.1} s ({:.0}/s)",
            missing.len(),
            missing.len() as f64 / took.max(0.001)
        );
        made.extend(missing);
        let total = managed_namespaces(&client).await?.len();

        // Each CA starts with the roots the ConfigMaps do not hold, so that
        // its start is a full sync too.
        if Some(meshca_cacerts.hash()) == in_configmaps {
            meshca_cacerts.swap()?;
        }
        let started = Instant::now();
        let proc = start_meshca(
            identity.kubeconfig_path(),
            &meshca_cacerts.dir,
            &tmp.join(format!("meshca-state-{size}")),
        )
        .await?;
        let pid = proc.0.id();
        let m = measure(
            &client,
            &tracker,
            &mut meshca_cacerts,
            started,
            pid,
            "meshca",
            &control_plane(&env),
        )
        .await?;
        terminate(proc);
        row("meshca", total, &m);
        in_configmaps = Some(meshca_cacerts.hash());

        if !with_istiod {
            continue;
        }
        if Some(istiod_cacerts.hash()) == in_configmaps {
            istiod_cacerts.swap()?;
        }
        let started = Instant::now();
        let istiod = start_istiod(
            client.clone(),
            &IstiodOptions {
                namespace: "istio-system",
                pod_name: "istiod-scale",
                kubeconfig: &admin_kubeconfig,
                dir: istiod_dir.clone(),
                args: &[],
                // Without it istiod ignores a change of root-cert.pem.
                env: &[("ISTIO_MULTIROOT_MESH", "true")],
            },
        )
        .await?;
        let pid = istiod.proc.0.id();
        let i = measure(
            &client,
            &tracker,
            &mut istiod_cacerts,
            started,
            pid,
            "istiod",
            &control_plane(&env),
        )
        .await
        .with_context(|| format!("istiod log: {}", istiod.log.display()))?;
        terminate(istiod.proc);
        row("istiod", total, &i);
        in_configmaps = Some(istiod_cacerts.hash());
        println!(
            "| istiod/meshca | {total} | {:.1}x | | | {:.1}x | {:.1}x | | | |",
            i.change_s / m.change_s.max(0.001),
            i.new_ns_s / m.new_ns_s.max(0.001),
            i.rss_now / m.rss_now.max(0.001),
        );
    }
    Ok(())
}
