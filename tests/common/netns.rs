//! A network namespace of the test's own, joined to the root namespace by veth pairs ("links"), so
//! that a test can put a real agent across a link and cut that link. Each link has 10.213.N.1/30 on
//! the root side and 10.213.N.2/30 inside, with N picked so that no interface here uses that
//! subnet; no traffic ever leaves these ends. Plus a registry bound to the root side of the link, and
//! a guard that removes what an agent's builds leave behind. Everything is undone on drop, panics
//! included.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use super::poll_until;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// `ip ARGS`, which must succeed; returns stdout.
fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "`ip {}` failed (these tests need root, i.e. CAP_NET_ADMIN): {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Fails loudly, with the fix, when `ip` (iproute2) is missing.
pub fn require_ip() {
    let found = Command::new("sh").args(["-c", "command -v ip"]).output().is_ok_and(|o| o.status.success());
    assert!(found, "`ip` is required by this test but not installed: install iproute2 (`apt-get install iproute2`)");
}

/// One veth pair between the root namespace and a [`Netns`].
pub struct Link {
    /// The end in the root namespace.
    pub host_veth: String,
    /// The end inside the namespace.
    pub ns_veth: String,
    pub host_ip: Ipv4Addr,
    pub ns_ip: Ipv4Addr,
}

pub struct Netns {
    pub name: String,
    pub links: Vec<Link>,
}

impl Netns {
    /// A namespace with `lo` up and one link to the root namespace.
    pub fn create() -> Netns {
        require_ip();
        let k = NEXT.fetch_add(1, Ordering::Relaxed);
        let mut ns = Netns { name: format!("farm-test-{}-{k}", std::process::id()), links: vec![] };
        // From here on, drop undoes whatever part of the setup happened.
        ip(&["netns", "add", &ns.name]);
        ip(&["-n", &ns.name, "link", "set", "lo", "up"]);
        ns.add_link();
        ns
    }

    /// Adds one more link (veth pair, its own /30); returns its index in `links`.
    pub fn add_link(&mut self) -> usize {
        let k = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let used = ip(&["-o", "-4", "addr", "show"]);
        let subnet = (0..250)
            .map(|i| (pid + k * 37 + i) % 250 + 1)
            .find(|n| !used.contains(&format!(" 10.213.{n}.")))
            .expect("a free 10.213.N.0/30 subnet");
        let link = Link {
            host_veth: format!("fm{pid}h{k}"),
            ns_veth: format!("fm{pid}n{k}"),
            host_ip: Ipv4Addr::new(10, 213, subnet as u8, 1),
            ns_ip: Ipv4Addr::new(10, 213, subnet as u8, 2),
        };
        ip(&["link", "add", &link.host_veth, "type", "veth", "peer", "name", &link.ns_veth]);
        let (host_veth, ns_veth) = (link.host_veth.clone(), link.ns_veth.clone());
        let (host_ip, ns_ip) = (link.host_ip, link.ns_ip);
        self.links.push(link);
        ip(&["link", "set", &ns_veth, "netns", &self.name]);
        ip(&["addr", "add", &format!("{host_ip}/30"), "dev", &host_veth]);
        ip(&["link", "set", &host_veth, "up"]);
        ip(&["-n", &self.name, "addr", "add", &format!("{ns_ip}/30"), "dev", &ns_veth]);
        ip(&["-n", &self.name, "link", "set", &ns_veth, "up"]);
        self.links.len() - 1
    }

    /// A command that runs `program` inside the namespace. Only the network namespace changes
    /// (`nsenter`, not `ip netns exec`, which also remounts /sys and so hides the cgroup mounts
    /// runc needs to run a build's RUN steps).
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.name)).arg(program);
        cmd
    }

    /// Cuts (`false`) or restores (`true`) link `i` by setting its root-side end down or up.
    pub fn set_link(&self, i: usize, up: bool) {
        ip(&["link", "set", &self.links[i].host_veth, if up { "up" } else { "down" }]);
    }

    /// Processes inside the namespace.
    pub fn pids(&self) -> Vec<u32> {
        let out = Command::new("ip").args(["netns", "pids", &self.name]).output().expect("run ip");
        String::from_utf8_lossy(&out.stdout).split_whitespace().filter_map(|p| p.parse().ok()).collect()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Whatever still runs in the namespace was started by this test; end it, by pid.
        for pid in self.pids() {
            kill(pid);
        }
        for link in &self.links {
            let _ = Command::new("ip").args(["link", "del", &link.host_veth]).output();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}

fn kill(pid: u32) {
    let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).output();
}

/// On drop, ends (by pid) every process whose command line, working directory or root lies in
/// `dir` (builds an agent left behind), then lazily unmounts whatever is still mounted there.
/// Declare it after the owner of `dir`, so that it runs first.
pub struct Leftovers {
    pub dir: PathBuf,
}

impl Leftovers {
    pub fn new(dir: &Path) -> Leftovers {
        Leftovers { dir: dir.to_path_buf() }
    }
}

impl Drop for Leftovers {
    fn drop(&mut self) {
        // Killed processes may have children of their own start meanwhile: kill until none is left.
        poll_until(Duration::from_secs(5), || {
            let left = processes_in(&self.dir);
            for (pid, _) in &left {
                kill(*pid);
            }
            left.is_empty().then_some(())
        });
        let mut mounts = mounts_in(&self.dir);
        mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in mounts {
            let _ = Command::new("umount").args(["-l", &m]).output();
        }
    }
}

/// Whether `path` is `dir` or lies under it.
fn within(path: &str, dir: &str) -> bool {
    path == dir || path.strip_prefix(dir).is_some_and(|rest| rest.starts_with('/'))
}

/// Processes (pid, description) whose command line mentions `dir` (or a path under it), or whose
/// working directory or root lies in it. Never this process.
pub fn processes_in(dir: &Path) -> Vec<(u32, String)> {
    let dir = dir.to_string_lossy().into_owned();
    let me = std::process::id();
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else { return found };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        if pid == me {
            continue;
        }
        let Ok(raw) = std::fs::read(e.path().join("cmdline")) else { continue };
        let args: Vec<String> =
            raw.split(|b| *b == 0).filter(|a| !a.is_empty()).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
        let mentions = args.iter().any(|a| a.split(['=', ':', ',']).any(|part| within(part, &dir)));
        let link = |l: &str| std::fs::read_link(e.path().join(l)).ok().map(|p| p.to_string_lossy().into_owned());
        let (cwd, root) = (link("cwd"), link("root"));
        let inside = [&cwd, &root].into_iter().flatten().any(|p| within(p, &dir));
        if mentions || inside {
            // stat: "pid (comm) state ppid pgrp ...", comm may hold spaces.
            let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
            let rest: Vec<&str> = stat.rsplit_once(") ").map(|(_, r)| r.split(' ').collect()).unwrap_or_default();
            let (ppid, pgrp) = (rest.get(1).copied().unwrap_or("?"), rest.get(2).copied().unwrap_or("?"));
            found.push((
                pid,
                format!(
                    "pid {pid} (parent {ppid}, process group {pgrp}): {} (cwd {}, root {})",
                    args.join(" "),
                    cwd.unwrap_or_default(),
                    root.unwrap_or_default()
                ),
            ));
        }
    }
    found
}

/// Mount points in this mount namespace that lie in `dir`.
fn mounts_in(dir: &Path) -> Vec<String> {
    let dir = dir.to_string_lossy().into_owned();
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines().filter_map(|l| l.split(' ').nth(4)).map(unescape).filter(|m| within(m, &dir)).collect()
}

/// mountinfo escapes space, tab, newline and backslash as \ooo.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
