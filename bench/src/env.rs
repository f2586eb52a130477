//! The bench's own world on loopback: a temporary directory, a farm CA, a registry
//! (Debian's docker-registry on 127.0.0.1:random) seeded with the multi-arch busybox fixture, and
//! coordinators and agents as real `farm` processes with their own directories. Everything is
//! stopped and removed on drop.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use shared::client::Client;
use shared::proto::{AgentState, Request, Response};

use crate::procs::{self, Service};

pub struct Env {
    /// Removed on drop unless `keep`.
    pub root: PathBuf,
    pub keep: bool,
    pub farm_bin: PathBuf,
    pub repo: PathBuf,
    pub ca_dir: PathBuf,
    pub home: PathBuf,
    pub registry: Option<Registry>,
    pub services: BTreeMap<String, Service>,
}

pub struct Registry {
    pub addr: String,
    svc: Service,
}

impl Env {
    pub fn new(farm_bin: PathBuf, repo: PathBuf, keep: bool) -> Result<Env> {
        let parent = Path::new("/var/tmp");
        let root = tempfile::Builder::new()
            .prefix("farm-bench.")
            .tempdir_in(if parent.is_dir() { parent } else { Path::new("/tmp") })
            .context("creating the bench's temporary directory")?
            .keep();
        let home = root.join("home");
        std::fs::create_dir_all(&home)?;
        let env = Env {
            ca_dir: root.join("ca"),
            root,
            keep,
            farm_bin,
            repo,
            home,
            registry: None,
            services: BTreeMap::new(),
        };
        procs::run_ok(&mut env.farm(&["ca", "init", "--dir", path(&env.ca_dir)]), "farm ca init")?;
        Ok(env)
    }

    /// `farm ARGS` with a clean environment: its own HOME, no FARM_* from the caller's shell.
    pub fn farm(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.farm_bin);
        cmd.args(args);
        self.isolate(&mut cmd);
        cmd.env("FARM_LOG", "warn");
        cmd
    }

    /// The environment every child gets: the bench's HOME, and nothing of farm's configuration
    /// from the caller's shell.
    pub fn isolate(&self, cmd: &mut Command) {
        cmd.env("HOME", &self.home).env("NO_COLOR", "1").env_remove("XDG_CONFIG_HOME").env_remove("XDG_STATE_HOME");
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("FARM_") {
                cmd.env_remove(k);
            }
        }
    }

    pub fn issue(&self, role: &str, name: &str) -> Result<()> {
        procs::run_ok(
            &mut self.farm(&["ca", "issue", "--dir", path(&self.ca_dir), "--role", role, "--name", name]),
            "farm ca issue",
        )?;
        Ok(())
    }

    pub fn start_registry(&mut self) -> Result<String> {
        if !procs::have_tool("docker-registry") {
            bail!("docker-registry is not installed: run `deploy/install.sh --test-deps` (as root)");
        }
        let (svc, addr) = self.spawn_registry(&self.root.join("registry"), "registry")?;
        self.registry = Some(Registry { addr: addr.clone(), svc });
        Ok(addr)
    }

    /// A docker-registry on a free loopback port, its storage under `dir`, answering before this
    /// returns; `name` names it in logs and errors.
    pub fn spawn_registry(&self, dir: &Path, name: &str) -> Result<(Service, String)> {
        std::fs::create_dir_all(dir)?;
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let addr = format!("127.0.0.1:{port}");
        let config = dir.join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    \
                 rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n",
                dir.join("data").display()
            ),
        )?;
        let mut cmd = Command::new("docker-registry");
        cmd.arg("serve").arg(&config);
        self.isolate(&mut cmd);
        let svc = Service::spawn(name, &mut cmd)?;
        procs::wait_until(&format!("the {name} to answer"), Duration::from_secs(30), || {
            (http_get(&addr, "/v2/").map(|(s, _)| s) == Some(200)).then_some(())
        })?;
        Ok((svc, addr))
    }

    pub fn registry_addr(&self) -> &str {
        &self.registry.as_ref().expect("registry started").addr
    }

    /// Pushes the multi-arch busybox fixture as `REF` (e.g. `busybox:latest`) into the bench's
    /// registry; returns the full reference.
    pub fn seed_busybox(&self, reference: &str) -> Result<String> {
        let script = self.repo.join("tests/fixtures/busybox-image.sh");
        let mut cmd = Command::new("bash");
        cmd.arg(&script).args(["push", self.registry_addr(), reference]);
        self.isolate(&mut cmd);
        procs::run_ok(&mut cmd, "tests/fixtures/busybox-image.sh push (run `deploy/install.sh --test-deps`)")?;
        Ok(format!("{}/{reference}", self.registry_addr()))
    }

    /// Starts a coordinator on 127.0.0.1:random with its own state directory; returns its address.
    pub fn start_coordinator(&mut self, name: &str) -> Result<String> {
        self.start_coordinator_with(name, None)
    }

    /// As [`Env::start_coordinator`], reading `config` (TOML) if given.
    pub fn start_coordinator_with(&mut self, name: &str, config: Option<&str>) -> Result<String> {
        let port = UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port();
        let listen = format!("127.0.0.1:{port}");
        let state = self.root.join(name);
        let mut cmd = Command::new(&self.farm_bin);
        cmd.args(["coordinator", "--listen", &listen, "--ca-dir", path(&self.ca_dir), "--state-dir", path(&state)]);
        if let Some(text) = config {
            let file = self.root.join(format!("{name}.toml"));
            std::fs::write(&file, text)?;
            cmd.arg("--config").arg(&file);
        }
        self.isolate(&mut cmd);
        cmd.env("FARM_LOG", "info");
        let mut svc = Service::spawn(name, &mut cmd)?;
        svc.wait_for_line(&["coordinator listening", &listen], Duration::from_secs(30))?;
        self.services.insert(name.to_string(), svc);
        Ok(listen)
    }

    /// Starts agent `name` (certificate issued here, work directory of its own) with `extra`
    /// flags. Wait for it with [`Env::wait_online`].
    pub fn start_agent(&mut self, coordinator: &str, name: &str, extra: &[&str]) -> Result<()> {
        self.issue("agent", name)?;
        let work = self.root.join(format!("agent-{name}"));
        let mut cmd = Command::new(&self.farm_bin);
        cmd.args(["agent", "--coordinator", coordinator, "--ca-dir", path(&self.ca_dir), "--name", name]);
        cmd.args(["--work-dir", path(&work)]).args(extra);
        self.isolate(&mut cmd);
        cmd.env("FARM_LOG", "info");
        let svc = Service::spawn(&format!("agent {name}"), &mut cmd)?;
        self.services.insert(format!("agent {name}"), svc);
        Ok(())
    }

    pub fn agent_pid(&self, name: &str) -> Option<u32> {
        self.services.get(&format!("agent {name}")).map(Service::pid)
    }

    pub fn service_pid(&self, name: &str) -> Option<u32> {
        self.services.get(name).map(Service::pid)
    }

    pub fn stop_service(&mut self, name: &str) {
        if let Some(mut s) = self.services.remove(name) {
            s.stop(Duration::from_secs(10));
        }
    }

    /// The admin identity's client connection to `coordinator`.
    pub async fn client(&self, coordinator: &str) -> Result<Client> {
        let creds = shared::tls::load_credentials(&self.ca_dir, "admin")?;
        Ok(Client::connect(coordinator, &creds, &Default::default(), shared::proto::DEFAULT_MAX_FRAME).await?)
    }

    /// Waits until every agent in `names` is online at `coordinator`.
    pub async fn wait_online(&mut self, coordinator: &str, names: &[&str], timeout: Duration) -> Result<()> {
        let client = self.client(coordinator).await?;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let online: Vec<String> = match client.request(&Request::ListAgents).await? {
                Response::Agents(list) => {
                    list.into_iter().filter(|a| a.state == AgentState::Online).map(|a| a.name).collect()
                }
                other => bail!("ListAgents answered {other:?}"),
            };
            let missing: Vec<&&str> = names.iter().filter(|n| !online.iter().any(|o| o == **n)).collect();
            if missing.is_empty() {
                client.close();
                return Ok(());
            }
            procs::check_interrupted()?;
            for n in &missing {
                if let Some(s) = self.services.get_mut(&format!("agent {n}")) {
                    if let Some(status) = s.exited() {
                        bail!("agent {n} exited ({status}):\n{}", s.tail(30));
                    }
                }
            }
            if tokio::time::Instant::now() >= deadline {
                bail!("agents {missing:?} not online within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        for (_, mut s) in std::mem::take(&mut self.services) {
            s.stop(Duration::from_secs(5));
        }
        if let Some(mut r) = self.registry.take() {
            r.svc.stop(Duration::from_secs(5));
        }
        procs::unmount_under(&self.root);
        if self.keep {
            eprintln!("farm-bench: kept {}", self.root.display());
        } else if let Err(e) = std::fs::remove_dir_all(&self.root) {
            eprintln!("farm-bench: could not remove {}: {e}", self.root.display());
        }
    }
}

pub fn path(p: &Path) -> &str {
    p.to_str().expect("the bench's paths are UTF-8")
}

/// A minimal HTTP/1.0 GET on loopback: (status, body).
pub fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Some((status, body))
}
