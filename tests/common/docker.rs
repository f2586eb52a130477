//! A Docker Engine of the test's own: Debian's dockerd 20.10 (docker.io) with its data, exec
//! root, containerd and socket in a temporary directory, no bridge and no iptables rules, so
//! nothing else on the machine sees or depends on it. Stopped and unmounted on drop.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use super::{poll_until, require_tool, wait_until, Proc};

/// The client that comes with dockerd (the `docker` first on PATH may be a newer one without buildx).
pub const DOCKER_CLI: &str = "/usr/bin/docker";

pub struct Engine {
    /// `unix://<dir>/docker.sock`.
    pub host: String,
    pub dir: tempfile::TempDir,
    proc: Proc,
}

impl Engine {
    /// Starts dockerd and waits until `/_ping` answers.
    pub fn start() -> Engine {
        require_tool("dockerd");
        assert!(Path::new(DOCKER_CLI).is_file(), "{DOCKER_CLI} is required: apt-get install docker.io");
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let socket = d.join("docker.sock");
        let host = format!("unix://{}", socket.display());
        let mut cmd = Command::new("dockerd");
        cmd.arg("--data-root")
            .arg(d.join("data"))
            .arg("--exec-root")
            .arg(d.join("exec"))
            .arg("--pidfile")
            .arg(d.join("docker.pid"))
            .args(["--host", &host])
            .args(["--bridge=none", "--iptables=false", "--ip6tables=false", "--ip-masq=false"])
            // No daemon.json of the machine's: this engine is the test's alone.
            .arg("--config-file")
            .arg(d.join("daemon.json"));
        std::fs::write(d.join("daemon.json"), "{}").unwrap();
        let proc = Proc::spawn("dockerd", &mut cmd);
        let engine = Engine { host, dir, proc };
        wait_until("dockerd to answer /_ping", Duration::from_secs(60), || {
            (engine.api("/_ping").as_deref() == Some("OK")).then_some(())
        });
        engine
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("docker.sock")
    }

    /// GET `path` from the Engine API; the body, if it answered 200.
    pub fn api(&self, path: &str) -> Option<String> {
        let mut s = UnixStream::connect(self.socket()).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: docker\r\n\r\n").ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).ok()?;
        let (head, body) = text.split_once("\r\n\r\n")?;
        (head.split_whitespace().nth(1)? == "200").then(|| body.to_string())
    }

    /// `docker --host <this engine> ARGS` with Debian's client.
    pub fn docker(&self, args: &[&str]) -> Output {
        Command::new(DOCKER_CLI).args(["--host", &self.host]).args(args).output().unwrap()
    }

    /// Every image reference the engine holds (`REPOSITORY:TAG`, dangling ones as `<none>:<none>`).
    pub fn images(&self) -> Vec<String> {
        let out = self.docker(&["images", "--all", "--format", "{{.Repository}}:{{.Tag}}"]);
        assert!(out.status.success(), "docker images: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).lines().map(String::from).collect()
    }

    /// The engine's log so far.
    pub fn log(&self) -> String {
        self.proc.log()
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        // SIGTERM: dockerd stops its containerd and unmounts what it mounted.
        if self.proc.alive() {
            self.proc.signal("TERM");
            let _ = poll_until(Duration::from_secs(30), || (!self.proc.alive()).then_some(()));
        }
        self.proc.kill();
        // Whatever is still mounted below the directory (a killed daemon's overlays, its
        // data-root bind mount), deepest first, so that the directory can be removed.
        let root = self.dir.path().to_string_lossy().to_string();
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut below: Vec<&str> =
            mounts.lines().filter_map(|l| l.split_whitespace().nth(4)).filter(|m| m.starts_with(&root)).collect();
        below.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in below {
            let _ = Command::new("umount").args(["-l", m]).status();
        }
    }
}
