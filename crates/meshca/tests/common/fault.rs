//! The fault suite's tools (issue 13, part 1): break the shared control
//! plane (SIGKILL and restart the kube-apiserver, SIGSTOP etcd) and always
//! mend it, drive a burst of requests and classify every answer, and read
//! a meshca process's own gauges (memory, fds, tasks, requests in flight).
//!
//! Every answer is one of:
//! - **ok**: a chain whose leaf names the caller and verifies to the root;
//! - **clean**: a gRPC code istio-agent retries (Canceled,
//!   DeadlineExceeded, ResourceExhausted, Aborted, Internal, Unavailable);
//! - **wrong**: anything else (a chain that does not verify or names
//!   someone else, or a code the agent gives up on, e.g. Unauthenticated
//!   for a good token). Must be 0.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use meshca_proto::IstioCertificateResponse;
use meshca_testsupport::TestEnv;
use x509_parser::prelude::*;

/// Scenarios that break the shared apiserver or etcd hold this: the tests
/// of one binary run in parallel threads.
pub static CONTROL_PLANE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The codes Istio's CA client retries (5 tries, exponential backoff).
pub fn retried(code: tonic::Code) -> bool {
    use tonic::Code::*;
    matches!(
        code,
        Cancelled | DeadlineExceeded | ResourceExhausted | Aborted | Internal | Unavailable
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Clean,
    Wrong,
}

/// One request of a burst.
#[derive(Debug, Clone)]
pub struct Answer {
    /// Sent, since the burst started.
    pub sent: Duration,
    /// Answered, since the burst started.
    pub done: Duration,
    pub outcome: Outcome,
    /// For an error: `<code>/<meshca-reason>`.
    pub why: Option<String>,
}

impl Answer {
    pub fn took(&self) -> Duration {
        self.done.saturating_sub(self.sent)
    }
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    pub ok: usize,
    pub clean: usize,
    pub wrong: usize,
}

impl Tally {
    pub fn of<'a>(answers: impl IntoIterator<Item = &'a Answer>) -> Tally {
        let mut t = Tally::default();
        for a in answers {
            match a.outcome {
                Outcome::Ok => t.ok += 1,
                Outcome::Clean => t.clean += 1,
                Outcome::Wrong => t.wrong += 1,
            }
        }
        t
    }

    pub fn total(&self) -> usize {
        self.ok + self.clean + self.wrong
    }
}

/// Answers sent in `[from, to)`.
pub fn sent_between(answers: &[Answer], from: Duration, to: Duration) -> Vec<&Answer> {
    answers
        .iter()
        .filter(|a| a.sent >= from && a.sent < to)
        .collect()
}

/// How many of each error (`<code>/<reason>`), for the report.
pub fn reasons<'a>(answers: impl IntoIterator<Item = &'a Answer>) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for a in answers {
        if let Some(why) = &a.why {
            *out.entry(why.clone()).or_default() += 1;
        }
    }
    out
}

/// Does `chain` (leaf first, root last) name `spiffe` and verify to `root_der`?
pub fn verifies(chain: &[String], root_der: &[u8], spiffe: &str) -> bool {
    let Ok(ders) = chain
        .iter()
        .map(|c| {
            meshca_pki::pem::parse_all(c.as_bytes())
                .ok()
                .and_then(|b| b.into_iter().next())
                .map(|b| b.der.to_vec())
                .context("not PEM")
        })
        .collect::<Result<Vec<_>>>()
    else {
        return false;
    };
    if ders.len() < 2 || ders.last().map(Vec::as_slice) != Some(root_der) {
        return false;
    }
    let Ok((_, leaf)) = X509Certificate::from_der(&ders[0]) else {
        return false;
    };
    let uris: Vec<String> = match leaf.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                GeneralName::URI(u) => Some((*u).to_owned()),
                _ => None,
            })
            .collect(),
        _ => return false,
    };
    if uris != [spiffe.to_string()] {
        return false;
    }
    ders.windows(2).all(|pair| {
        match (
            X509Certificate::from_der(&pair[0]),
            X509Certificate::from_der(&pair[1]),
        ) {
            (Ok((_, child)), Ok((_, parent))) => {
                child.verify_signature(Some(parent.public_key())).is_ok()
            }
            _ => false,
        }
    })
}

/// The verdict on one CreateCertificate answer for `spiffe`.
pub fn classify(
    answer: Result<tonic::Response<IstioCertificateResponse>, tonic::Status>,
    root_der: &[u8],
    spiffe: &str,
) -> (Outcome, Option<String>) {
    match answer {
        Ok(resp) if verifies(&resp.get_ref().cert_chain, root_der, spiffe) => (Outcome::Ok, None),
        Ok(_) => (Outcome::Wrong, Some("a chain that does not verify".into())),
        Err(status) => {
            let reason = status
                .metadata()
                .get("meshca-reason")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-");
            let why = format!("{:?}/{reason}", status.code());
            let outcome = if retried(status.code()) {
                Outcome::Clean
            } else {
                Outcome::Wrong
            };
            (outcome, Some(why))
        }
    }
}

/// An outcome, and for an error `<code>/<reason>`.
pub type Verdict = (Outcome, Option<String>);
/// A request on its way to its verdict.
pub type Pending = Pin<Box<dyn Future<Output = Verdict> + Send>>;
/// One request by worker `i`.
pub type Call = Arc<dyn Fn(usize) -> Pending + Send + Sync>;

/// How requests are sent.
#[derive(Debug, Clone, Copy)]
pub enum Load {
    /// `workers` each ask, wait for the answer, pause, ask again.
    Closed { workers: usize, pause: Duration },
    /// One request every `1/per_second` s whatever the answers, round robin
    /// over `workers`: what piles up while something hangs is the server's.
    Open { workers: usize, per_second: u32 },
}

/// A burst running until [`Burst::finish`].
pub struct Burst {
    pub start: Instant,
    stop: Arc<AtomicBool>,
    answers: Arc<Mutex<Vec<Answer>>>,
    driver: tokio::task::JoinHandle<()>,
}

impl Burst {
    pub fn start(load: Load, call: Call) -> Burst {
        let start = Instant::now();
        let stop = Arc::new(AtomicBool::new(false));
        let answers: Arc<Mutex<Vec<Answer>>> = Arc::default();
        let one = {
            let answers = answers.clone();
            move |i: usize| {
                let (call, answers) = (call.clone(), answers.clone());
                async move {
                    let sent = start.elapsed();
                    let (outcome, why) = call(i).await;
                    answers.lock().unwrap().push(Answer {
                        sent,
                        done: start.elapsed(),
                        outcome,
                        why,
                    });
                }
            }
        };
        let driver = {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut tasks = tokio::task::JoinSet::new();
                match load {
                    Load::Closed { workers, pause } => {
                        for i in 0..workers {
                            let (one, stop) = (one.clone(), stop.clone());
                            tasks.spawn(async move {
                                while !stop.load(Ordering::SeqCst) {
                                    one(i).await;
                                    tokio::time::sleep(pause).await;
                                }
                            });
                        }
                    }
                    Load::Open {
                        workers,
                        per_second,
                    } => {
                        let mut tick = tokio::time::interval(Duration::from_secs_f64(
                            1.0 / f64::from(per_second.max(1)),
                        ));
                        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                        let mut i = 0;
                        while !stop.load(Ordering::SeqCst) {
                            tick.tick().await;
                            tasks.spawn(one(i % workers.max(1)));
                            i += 1;
                            // Reap what has ended as we go.
                            while tasks.try_join_next().is_some() {}
                        }
                    }
                }
                while tasks.join_next().await.is_some() {}
            })
        };
        Burst {
            start,
            stop,
            answers,
            driver,
        }
    }

    /// Since the burst started.
    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    /// Waits (at most `within`) for a request sent after `from` to end ok;
    /// when it ended, since the burst started.
    pub async fn first_ok_sent_after(&self, from: Duration, within: Duration) -> Result<Duration> {
        let deadline = Instant::now() + within;
        loop {
            let first = self
                .answers
                .lock()
                .unwrap()
                .iter()
                .filter(|a| a.outcome == Outcome::Ok && a.sent >= from)
                .map(|a| a.done)
                .min();
            if let Some(done) = first {
                return Ok(done);
            }
            ensure!(
                Instant::now() < deadline,
                "no successful request within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops sending, waits for every request to end, returns all answers
    /// in the order they were sent.
    pub async fn finish(self) -> Result<Vec<Answer>> {
        self.stop.store(true, Ordering::SeqCst);
        self.driver.await?;
        let mut answers = std::mem::take(&mut *self.answers.lock().unwrap());
        answers.sort_by_key(|a| a.sent);
        Ok(answers)
    }
}

/// The testenv control plane this test runs on (shared with every test).
pub struct ControlPlane {
    dir: PathBuf,
}

impl ControlPlane {
    pub fn of(env: &TestEnv) -> ControlPlane {
        ControlPlane {
            dir: env.config().dir.clone(),
        }
    }

    /// The pid testenv recorded for `name`, checked to be that testenv's
    /// process (its command line names the testenv directory).
    pub fn pid(&self, name: &str) -> Result<u32> {
        let file = self.dir.join(format!("pids/{name}.pid"));
        let pid: u32 = std::fs::read_to_string(&file)
            .with_context(|| format!("reading {}", file.display()))?
            .trim()
            .parse()?;
        let args = cmdline(pid)?;
        let dir = self.dir.to_string_lossy();
        ensure!(
            args.iter().any(|a| a.contains(dir.as_ref())),
            "pid {pid} of {name} is not this testenv's: {args:?}"
        );
        Ok(pid)
    }

    /// SIGKILLs the kube-apiserver; started again by [`ApiserverDown::restart`]
    /// or, whatever happens to the test, when the guard is dropped.
    pub fn kill_apiserver(&self) -> Result<ApiserverDown> {
        let pid = self.pid("kube-apiserver")?;
        let args = cmdline(pid)?;
        signal(pid, "KILL")?;
        wait_gone(pid, Duration::from_secs(10))?;
        Ok(ApiserverDown {
            dir: self.dir.clone(),
            args,
            restarted: false,
        })
    }

    /// SIGSTOPs etcd; SIGCONT by [`EtcdFrozen::thaw`] or when dropped.
    pub fn freeze_etcd(&self) -> Result<EtcdFrozen> {
        let pid = self.pid("etcd")?;
        signal(pid, "STOP")?;
        Ok(EtcdFrozen { pid, thawed: false })
    }
}

fn cmdline(pid: u32) -> Result<Vec<String>> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline"))
        .with_context(|| format!("pid {pid} is not running"))?;
    Ok(raw
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect())
}

fn signal(pid: u32, sig: &str) -> Result<()> {
    let status = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()?;
    ensure!(status.success(), "kill -{sig} {pid}: {status}");
    Ok(())
}

/// Waits until `pid` is gone or a zombie.
fn wait_gone(pid: u32, within: Duration) -> Result<()> {
    let deadline = Instant::now() + within;
    loop {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => return Ok(()),
            Ok(stat)
                if stat
                    .rsplit(')')
                    .next()
                    .is_some_and(|s| s.trim_start().starts_with('Z')) =>
            {
                return Ok(());
            }
            Ok(_) if Instant::now() > deadline => bail!("pid {pid} still running after {within:?}"),
            Ok(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// The kube-apiserver, killed; remembers its command line to start it again.
pub struct ApiserverDown {
    dir: PathBuf,
    args: Vec<String>,
    restarted: bool,
}

impl ApiserverDown {
    /// Starts it again, as testenv did (same command line, same log, same
    /// etcd), and records the new pid where `testenv/down` looks.
    pub fn restart(mut self) -> Result<()> {
        self.restarted = true;
        start_apiserver(&self.dir, &self.args)
    }
}

impl Drop for ApiserverDown {
    fn drop(&mut self) {
        if !self.restarted
            && let Err(e) = start_apiserver(&self.dir, &self.args)
        {
            eprintln!("restarting the kube-apiserver after a failed test: {e:#}");
        }
    }
}

fn start_apiserver(dir: &Path, args: &[String]) -> Result<()> {
    let log = std::fs::OpenOptions::new()
        .append(true)
        .open(dir.join("logs/kube-apiserver.log"))?;
    let child = Command::new(&args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("restarting kube-apiserver")?;
    std::fs::write(dir.join("pids/kube-apiserver.pid"), child.id().to_string())?;
    // It outlives this test (testenv/down stops it by the pid file).
    std::mem::forget(child);
    Ok(())
}

/// etcd, stopped.
pub struct EtcdFrozen {
    pid: u32,
    thawed: bool,
}

impl EtcdFrozen {
    pub fn thaw(mut self) -> Result<()> {
        self.thawed = true;
        signal(self.pid, "CONT")
    }
}

impl Drop for EtcdFrozen {
    fn drop(&mut self) {
        if !self.thawed
            && let Err(e) = signal(self.pid, "CONT")
        {
            eprintln!("SIGCONT to etcd after a failed test: {e:#}");
        }
    }
}

/// Polls the apiserver's /readyz (admin client certificate) until it
/// answers ok; returns how long that took.
pub async fn wait_apiserver_ready(within: Duration) -> Result<Duration> {
    let var = |k: &str| std::env::var(k).with_context(|| k.to_string());
    let (url, ca, cert, key) = (
        var("MESHCA_TESTENV_APISERVER")?,
        var("MESHCA_TESTENV_CA")?,
        var("MESHCA_TESTENV_ADMIN_CERT")?,
        var("MESHCA_TESTENV_ADMIN_KEY")?,
    );
    let t = Instant::now();
    loop {
        let ok = tokio::process::Command::new("curl")
            .args(["-fsS", "--max-time", "2", "--cacert", &ca, "--cert", &cert])
            .args(["--key", &key])
            .arg(format!("{url}/readyz"))
            .output()
            .await?
            .status
            .success();
        if ok {
            return Ok(t.elapsed());
        }
        ensure!(t.elapsed() < within, "apiserver not ready after {within:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A meshca process's own gauges, from its /metrics.
#[derive(Debug, Clone, Copy, Default)]
pub struct Gauges {
    pub rss_mib: f64,
    pub open_fds: f64,
    pub tasks: f64,
    /// `meshca_server_requests_in_flight` (servers only).
    pub in_flight: Option<f64>,
}

impl std::fmt::Display for Gauges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "RSS {:.1} MiB, {} fds, {} tasks",
            self.rss_mib, self.open_fds, self.tasks
        )?;
        if let Some(n) = self.in_flight {
            write!(f, ", {n} in flight")?;
        }
        Ok(())
    }
}

/// Scrapes `monitoring` (`127.0.0.1:<port>`).
pub async fn gauges(monitoring: &str) -> Result<Gauges> {
    let (code, text) = meshca_testsupport::http_get(monitoring.parse()?, "/metrics").await?;
    ensure!(code == 200, "/metrics answered {code}");
    let get = |name: &str| {
        meshca_testsupport::metric(&text, &format!("{name} "))
            .with_context(|| format!("no {name} in /metrics"))
    };
    Ok(Gauges {
        rss_mib: get("process_resident_memory_bytes")? / 1048576.0,
        open_fds: get("process_open_fds")?,
        tasks: get("meshca_runtime_alive_tasks")?,
        in_flight: get("meshca_server_requests_in_flight").ok(),
    })
}

/// Polls `monitoring` until `settled` holds for its gauges (after a burst,
/// connections and tasks wind down), at most `within`; the last gauges
/// either way.
pub async fn settle(
    monitoring: &str,
    within: Duration,
    settled: impl Fn(&Gauges) -> bool,
) -> Result<Gauges> {
    let deadline = Instant::now() + within;
    loop {
        let g = gauges(monitoring).await?;
        if settled(&g) || Instant::now() > deadline {
            return Ok(g);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Once idle again, a process holds no more fds and tasks than before the
/// burst plus its Kubernetes client's pool of idle connections (at most
/// --kube-api-concurrency, 64, each an fd and a task, closed after 90 s
/// idle) and the burst's connections: a leak of one per failed request
/// would be several hundred. Nothing is in flight.
pub async fn back_to_idle(what: &str, monitoring: &str, idle_before: &Gauges) -> Result<Gauges> {
    // The Kubernetes client's pool, and the burst's own connections (up to
    // 100) that a loaded machine may not have closed yet.
    const POOL: f64 = 64.0 + 100.0 + 16.0;
    let settled = |g: &Gauges| {
        g.in_flight.unwrap_or(0.0) == 0.0
            && g.open_fds <= idle_before.open_fds + POOL
            && g.tasks <= idle_before.tasks + POOL
    };
    let g = settle(monitoring, Duration::from_secs(20), settled).await?;
    ensure!(
        settled(&g),
        "{what}: not back to idle 20 s after the burst: before {idle_before}, now {g}"
    );
    Ok(g)
}
