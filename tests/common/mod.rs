//! Helpers for end-to-end tests: real `farm` processes on loopback, each with its own temporary
//! directory, killed and cleaned up on drop. Waiting is always "until a condition holds, or fail
//! at a deadline", never a fixed sleep.

#![allow(dead_code)]

pub mod docker;
pub mod faults;
pub mod registry;

use std::io::{BufRead, BufReader};
use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

pub fn farm_bin() -> &'static str {
    env!("CARGO_BIN_EXE_farm")
}

/// A free UDP port on 127.0.0.1 (the coordinator listens on UDP).
pub fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Runs `farm ARGS` to completion.
pub fn farm(args: &[&str]) -> Output {
    let out = Command::new(farm_bin()).args(args).env("FARM_LOG", "warn").output().expect("run farm");
    out
}

/// Runs `farm ARGS`, which must succeed; returns stdout.
pub fn farm_ok(args: &[&str]) -> String {
    let out = farm(args);
    assert!(
        out.status.success(),
        "farm {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A tool the test needs. Missing tools fail the test loudly with the fix.
pub fn require_tool(tool: &str) {
    let found = Command::new("sh").arg("-c").arg(format!("command -v {tool}")).output().unwrap().status.success();
    assert!(found, "{tool} is required by this test but not installed: run `deploy/install.sh` (as root)");
}

/// A running process whose stderr lines are kept and can be waited on.
pub struct Proc {
    pub name: String,
    child: Option<Child>,
    lines: Arc<Mutex<Vec<String>>>,
    rx: mpsc::Receiver<String>,
}

impl Proc {
    /// Starts `cmd`; its stdout and stderr lines are both kept and can be waited on.
    pub fn spawn(name: &str, cmd: &mut Command) -> Proc {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let (tx, rx) = mpsc::channel();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let readers: [Box<dyn std::io::Read + Send>; 2] =
            [Box::new(child.stdout.take().unwrap()), Box::new(child.stderr.take().unwrap())];
        for stream in readers {
            let (keep, tx, tag) = (lines.clone(), tx.clone(), name.to_string());
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if std::env::var_os("FARM_TEST_ECHO").is_some() {
                        eprintln!("[{tag}] {line}");
                    }
                    keep.lock().unwrap().push(line.clone());
                    let _ = tx.send(line);
                }
            });
        }
        Proc { name: name.to_string(), child: Some(child), lines, rx }
    }

    /// Starts `farm ARGS` with logs at info level.
    pub fn farm(name: &str, args: &[&str]) -> Proc {
        let mut cmd = Command::new(farm_bin());
        cmd.args(args).env("FARM_LOG", "info").env("NO_COLOR", "1");
        Proc::spawn(name, &mut cmd)
    }

    /// Waits for a stderr line containing every one of `needles`; returns it.
    pub fn wait_for_line(&self, needles: &[&str], timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        let matches = |l: &str| needles.iter().all(|n| l.contains(n));
        if let Some(l) = self.lines.lock().unwrap().iter().find(|l| matches(l)) {
            return l.clone();
        }
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(l) if matches(&l) => return l,
                Ok(_) => {}
                Err(_) => {
                    panic!("{}: no log line with {needles:?} within {timeout:?}; its log:\n{}", self.name, self.log())
                }
            }
        }
    }

    pub fn log(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn signal(&self, sig: &str) {
        let st = Command::new("kill").args([&format!("-{sig}"), &self.pid().to_string()]).status().unwrap();
        assert!(st.success());
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// How it exited, once it has.
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().unwrap())
    }

    /// Still running?
    pub fn alive(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().unwrap().is_none())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Re-evaluates `probe` until it returns `Some`, or panics at the deadline with `what`.
pub fn wait_until<T>(what: &str, timeout: Duration, probe: impl FnMut() -> Option<T>) -> T {
    poll_until(timeout, probe).unwrap_or_else(|| panic!("timed out after {timeout:?} waiting for {what}"))
}

/// Re-evaluates `probe` until it returns `Some`; `None` if the deadline passes first (for callers
/// to whom running out of time is an outcome, not a failure). The short pause between probes is
/// a poll interval, not a synchronisation: the condition decides.
pub fn poll_until<T>(timeout: Duration, mut probe: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = probe() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The arguments of `farm agent join` with `token`, as `name`, storing the identity in `dir`.
pub fn join_args<'a>(token: &'a str, coordinator: &'a str, name: &'a str, dir: &'a Path) -> [&'a str; 10] {
    let dir = dir.to_str().unwrap();
    ["agent", "join", "--token", token, "--coordinator", coordinator, "--name", name, "--ca-dir", dir]
}

/// A farm CA in a temporary directory, with identities issued on demand.
pub struct Ca {
    pub dir: PathBuf,
}

impl Ca {
    pub fn init(root: &Path) -> Ca {
        let dir = root.join("ca");
        farm_ok(&["ca", "init", "--dir", dir.to_str().unwrap()]);
        Ca { dir }
    }

    pub fn issue(&self, role: &str, name: &str) {
        farm_ok(&["ca", "issue", "--dir", self.dir.to_str().unwrap(), "--role", role, "--name", name]);
    }

    pub fn path(&self) -> &str {
        self.dir.to_str().unwrap()
    }
}

/// `farm agents --format json` as parsed JSON.
pub fn agents_json(addr: &str, ca: &Ca) -> serde_json::Value {
    let out = farm_ok(&["agents", "--coordinator", addr, "--ca-dir", ca.path(), "--name", "admin", "--format", "json"]);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("farm agents printed invalid JSON ({e}): {out}"))
}

/// The agent named `name` in a `farm agents` listing, if present.
pub fn agent<'a>(list: &'a serde_json::Value, name: &str) -> Option<&'a serde_json::Value> {
    list.as_array().unwrap().iter().find(|a| a["name"] == name)
}

pub fn strings(v: &serde_json::Value) -> Vec<String> {
    v.as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_string()).collect()
}

/// A coordinator and agents as separate `farm` processes on loopback, with their own CA.
pub struct Farm {
    pub tmp: tempfile::TempDir,
    pub ca: Ca,
    pub addr: String,
    pub port: u16,
    pub timeout_secs: u64,
    pub coordinator: Proc,
    pub agents: std::collections::HashMap<String, Proc>,
}

impl Farm {
    pub fn start(timeout_secs: u64) -> Farm {
        Self::start_prepared(timeout_secs, |_| ())
    }

    /// [`Farm::start`], with `prepare` called on the coordinator's state directory (not yet
    /// created) before the coordinator starts: e.g. to mount a small file system there.
    pub fn start_prepared(timeout_secs: u64, prepare: impl FnOnce(&Path)) -> Farm {
        let tmp = tempfile::tempdir().unwrap();
        prepare(&tmp.path().join("coordinator"));
        let ca = Ca::init(tmp.path());
        let port = free_udp_port();
        let addr = format!("127.0.0.1:{port}");
        let coordinator = Self::spawn_coordinator(&ca, tmp.path(), port, timeout_secs);
        Farm { tmp, ca, addr, port, timeout_secs, coordinator, agents: Default::default() }
    }

    /// Starts a coordinator on `port` with its state under `root/coordinator`, and waits until it listens.
    pub fn spawn_coordinator(ca: &Ca, root: &Path, port: u16, timeout_secs: u64) -> Proc {
        Self::spawn_coordinator_env(ca, root, port, timeout_secs, &[])
    }

    fn spawn_coordinator_env(ca: &Ca, root: &Path, port: u16, timeout_secs: u64, env: &[(&str, &str)]) -> Proc {
        let listen = format!("127.0.0.1:{port}");
        let state = root.join("coordinator");
        let mut cmd = Command::new(farm_bin());
        cmd.env("FARM_LOG", "info").env("NO_COLOR", "1").envs(env.iter().copied()).args([
            "coordinator",
            "--listen",
            &listen,
            "--ca-dir",
            ca.path(),
            "--state-dir",
            state.to_str().unwrap(),
            "--heartbeat-timeout",
            &timeout_secs.to_string(),
        ]);
        let p = Proc::spawn("coordinator", &mut cmd);
        p.wait_for_line(&["coordinator listening", &listen], Duration::from_secs(20));
        p
    }

    /// SIGKILLs the coordinator and starts it again on the same port and state.
    pub fn restart_coordinator(&mut self) {
        self.restart_coordinator_env(&[]);
    }

    pub fn restart_coordinator_env(&mut self, env: &[(&str, &str)]) {
        self.coordinator.kill();
        self.coordinator = Self::spawn_coordinator_env(&self.ca, self.tmp.path(), self.port, self.timeout_secs, env);
    }

    /// `farm builds --format json`.
    pub fn builds(&self) -> serde_json::Value {
        let mut args = vec!["builds".to_string(), "--format".into(), "json".into(), "--limit".into(), "100".into()];
        args.extend(self.client_args());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        serde_json::from_str(&farm_ok(&args)).unwrap()
    }

    /// Waits until build `id` is in a terminal state; returns its entry.
    pub fn wait_build_end(&self, id: &str, timeout: Duration) -> serde_json::Value {
        wait_until(&format!("build {id} to end"), timeout, || {
            let all = self.builds();
            all.as_array()
                .unwrap()
                .iter()
                .find(|b| b["id"] == id && ["succeeded", "failed", "cancelled"].contains(&b["state"].as_str().unwrap()))
                .cloned()
        })
    }

    /// Starts agent `name` with extra flags and waits until it is online.
    pub fn agent(&mut self, name: &str, extra: &[&str]) -> serde_json::Value {
        self.ca.issue("agent", name);
        let work = self.tmp.path().join(format!("agent-{name}"));
        let mut args = vec!["agent", "--coordinator", &self.addr, "--ca-dir", self.ca.path(), "--name", name];
        args.extend(["--work-dir", work.to_str().unwrap()]);
        args.extend(extra);
        self.agents.insert(name.into(), Proc::farm(&format!("agent {name}"), &args));
        self.wait_agent(name, "online")
    }

    /// Starts another `farm agent` process with agent `name`'s existing identity (no new
    /// certificate) and work directory `work`; it is not waited for.
    pub fn spawn_agent(&self, label: &str, name: &str, work: &Path, extra: &[&str]) -> Proc {
        let mut args = vec!["agent", "--coordinator", &self.addr, "--ca-dir", self.ca.path(), "--name", name];
        args.extend(["--work-dir", work.to_str().unwrap()]);
        args.extend(extra);
        Proc::farm(label, &args)
    }

    pub fn wait_agent(&self, name: &str, state: &str) -> serde_json::Value {
        wait_until(&format!("agent {name} to be {state}"), Duration::from_secs(self.timeout_secs + 20), || {
            let list = agents_json(&self.addr, &self.ca);
            agent(&list, name).filter(|a| a["state"] == state).cloned()
        })
    }

    /// The flags that point a CLI command at this farm.
    pub fn client_args(&self) -> Vec<String> {
        ["--coordinator", &self.addr, "--ca-dir", self.ca.path(), "--name", "admin"].map(String::from).to_vec()
    }
}

/// `farm build --wait=false ARGS`: submits without waiting; returns the build id.
pub fn submit(a: &[String]) -> String {
    let mut full = vec!["build".to_string(), "--wait=false".into()];
    full.extend(a.iter().cloned());
    let full: Vec<&str> = full.iter().map(String::as_str).collect();
    let id = farm_ok(&full).trim().to_string();
    assert_eq!(id.len(), 12, "expected a build id, got {id:?}");
    id
}

/// `farm build --progress plain ARGS` as a user with nothing configured would run it: HOME is
/// `home`, no farm variables, so the farm runs inside the command (embedded).
pub fn embedded_build(home: &Path, args: &[String]) -> Output {
    Command::new(farm_bin())
        .args(["build", "--progress", "plain"])
        .args(args)
        .env("HOME", home)
        .env_remove("XDG_CONFIG_HOME")
        .env_remove("XDG_STATE_HOME")
        .env_remove("FARM_COORDINATOR")
        .env("FARM_LOG", "warn")
        .output()
        .unwrap()
}

/// `farm build` with `args`; returns (success, stdout, stderr).
pub fn build(args: &[String]) -> (bool, String, String) {
    let mut full = vec!["build".to_string(), "--progress".into(), "plain".into()];
    full.extend(args.iter().cloned());
    let out = Command::new(farm_bin()).args(&full).env("FARM_LOG", "warn").output().unwrap();
    let (so, se) = (String::from_utf8_lossy(&out.stdout).to_string(), String::from_utf8_lossy(&out.stderr).to_string());
    (out.status.success(), so, se)
}

/// The rows of a successful build's summary: platform → (agent, mode).
pub fn summary(stdout: &str) -> std::collections::BTreeMap<String, (String, String)> {
    stdout
        .lines()
        .skip_while(|l| !l.starts_with("PLATFORM"))
        .skip(1)
        .take_while(|l| !l.starts_with("PLATFORM") && !l.is_empty())
        .map(|l| {
            let c: Vec<&str> = l.split_whitespace().collect();
            (c[0].to_string(), (c[2].to_string(), c[3].to_string()))
        })
        .collect()
}

/// A copy of `examples/NAME` in a fresh directory, to build and change freely.
pub fn example(name: &str, into: &Path) -> PathBuf {
    let from = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples").join(name);
    let to = into.join(name);
    let st = Command::new("cp").arg("-a").arg(&from).arg(&to).status().unwrap();
    assert!(st.success());
    to
}
pub mod netns;

/// A containers-storage of its own (vfs, in a temporary directory) for buildah or skopeo run by
/// a test: `CONTAINERS_STORAGE_CONF` = the returned path. Removed with the returned directory.
pub fn private_storage() -> (tempfile::TempDir, PathBuf) {
    let store = tempfile::tempdir().unwrap();
    let conf = store.path().join("storage.conf");
    std::fs::write(
        &conf,
        format!(
            "[storage]\ndriver = \"vfs\"\ngraphroot = \"{}\"\nrunroot = \"{}\"\n",
            store.path().join("graph").display(),
            store.path().join("run").display()
        ),
    )
    .unwrap();
    (store, conf)
}
