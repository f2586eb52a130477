//! `memory_limit`: each build's process tree in a memory cgroup of its own, so that a RUN that
//! allocates too much is killed by the kernel (and its build fails, saying which limit it hit)
//! instead of taking the agent, or a Raspberry Pi, down with it.
//!
//! buildah's own `--memory` is not applied with `--isolation chroot`, so the agent does it itself:
//! a child cgroup of the agent's own cgroup per build (`farm-<agent pid>-<task>`), with the limit
//! and no swap; the builder's first process joins it before it executes (see
//! [`BuildCgroup::join`]), and everything it starts inherits it. Both hierarchies are supported:
//! cgroup v2 (`memory.max`, `memory.swap.max`, `memory.events`; Raspberry Pi OS bookworm, Debian
//! 12 with systemd) and the v1 memory controller (`memory.limit_in_bytes`,
//! `memory.memsw.limit_in_bytes`, `memory.oom_control`; hybrid setups).
//!
//! The parsers of `/proc/self/cgroup`, `/proc/self/mountinfo`, sizes and OOM counters are pure;
//! [`MemoryLimit::setup`] and [`BuildCgroup`] do the file system work.

use std::path::{Path, PathBuf};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const TIB: u64 = 1 << 40;

/// Reads a size: `512MiB`, `2GiB`, `1.5G`, `2048M`, `1073741824` (bytes). `K`/`M`/`G`/`T` and
/// `KiB`.. are powers of 1024 (as docker's `--memory`), `KB`/`MB`/`GB`/`TB` powers of 1000.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (number, unit) = (&t[..split], t[split..].trim());
    let bad = || format!("{text:?} is not a size: write a number with a unit, e.g. 512MiB, 2GiB or 1.5G");
    let value: f64 = number.parse().map_err(|_| bad())?;
    let scale = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => KIB,
        "m" | "mib" => MIB,
        "g" | "gib" => GIB,
        "t" | "tib" => TIB,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        _ => return Err(bad()),
    };
    let bytes = value * scale as f64;
    if !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return Err(format!("{text:?} is too large"));
    }
    let bytes = bytes.round() as u64;
    if bytes == 0 {
        return Err(format!("{text:?} is zero: a build needs some memory (leave the key out for no limit)"));
    }
    Ok(bytes)
}

/// A size as people read it: `256 MiB`, `2 GiB`, `1.5 GiB`, `1000 B`.
pub fn format_size(bytes: u64) -> String {
    for (unit, name) in [(TIB, "TiB"), (GIB, "GiB"), (MIB, "MiB"), (KIB, "KiB")] {
        if bytes >= unit {
            if bytes.is_multiple_of(unit) {
                return format!("{} {name}", bytes / unit);
            }
            let v = bytes as f64 / unit as f64;
            if bytes < 1024 * unit {
                return format!("{} {name}", trim_float(v));
            }
        }
    }
    format!("{bytes} B")
}

fn trim_float(v: f64) -> String {
    let s = format!("{v:.2}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// Which cgroup hierarchy a directory belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

/// A mounted cgroup hierarchy, from a `/proc/self/mountinfo` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupMount {
    pub version: Version,
    /// Where it is mounted.
    pub mount_point: PathBuf,
    /// The cgroup shown at the mount point (`/` unless a container mounted a subtree).
    pub root: String,
}

/// The memory-capable hierarchies from `/proc/self/mountinfo`: every cgroup2 mount, and v1
/// mounts whose options include `memory`.
pub fn parse_mountinfo(text: &str) -> Vec<CgroupMount> {
    text.lines()
        .filter_map(|line| {
            // ID PARENT MAJ:MIN ROOT MOUNT_POINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER_OPTIONS
            let (left, right) = line.split_once(" - ")?;
            let l: Vec<&str> = left.split(' ').collect();
            let r: Vec<&str> = right.split(' ').collect();
            let (root, mount_point) = (*l.get(3)?, *l.get(4)?);
            let version = match *r.first()? {
                "cgroup2" => Version::V2,
                "cgroup" if r.get(2).is_some_and(|o| o.split(',').any(|o| o == "memory")) => Version::V1,
                _ => return None,
            };
            Some(CgroupMount { version, mount_point: PathBuf::from(unescape(mount_point)), root: unescape(root) })
        })
        .collect()
}

/// mountinfo writes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b.get(i + 1..i + 4).filter(|d| b[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c))) {
            Some(d) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// This process's cgroups from `/proc/self/cgroup`: (the v1 memory controller's, the v2 one's).
pub fn parse_proc_cgroup(text: &str) -> (Option<String>, Option<String>) {
    let (mut v1, mut v2) = (None, None);
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next()) else { continue };
        if id == "0" && controllers.is_empty() {
            v2 = Some(path.to_string());
        } else if controllers.split(',').any(|c| c == "memory") {
            v1 = Some(path.to_string());
        }
    }
    (v1, v2)
}

/// The directory of the cgroup `path` (as `/proc/self/cgroup` names it) under `mount`, if the
/// mount shows it.
pub fn cgroup_dir(mount: &CgroupMount, path: &str) -> Option<PathBuf> {
    let rel = if mount.root == "/" {
        path
    } else {
        let rest = path.strip_prefix(mount.root.as_str())?;
        if !(rest.is_empty() || rest.starts_with('/')) {
            return None;
        }
        rest
    };
    Some(mount.mount_point.join(rel.trim_start_matches('/')))
}

/// Where this process's own cgroups are, per hierarchy: (v1 memory, v2).
pub fn own_cgroups(mountinfo: &str, proc_cgroup: &str) -> (Option<PathBuf>, Option<PathBuf>) {
    let mounts = parse_mountinfo(mountinfo);
    let (v1, v2) = parse_proc_cgroup(proc_cgroup);
    let find = |version: Version, path: Option<String>| {
        let path = path?;
        mounts.iter().filter(|m| m.version == version).find_map(|m| cgroup_dir(m, &path))
    };
    (find(Version::V1, v1), find(Version::V2, v2))
}

/// The `oom_kill N` count of a v1 `memory.oom_control` or a v2 `memory.events`.
pub fn oom_kills(text: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let mut w = l.split_whitespace();
        (w.next()? == "oom_kill").then(|| w.next()?.parse().ok())?
    })
}

/// A space-separated controller list (`cgroup.controllers`, `cgroup.subtree_control`) has `name`.
pub fn lists(controllers: &str, name: &str) -> bool {
    controllers.split_whitespace().any(|c| c == name)
}

/// Build cgroups of agent `pid`, named `farm-<pid>-<task>`: the pid, if `name` is one.
fn owner(name: &str) -> Option<u32> {
    name.strip_prefix("farm-")?.split('-').next()?.parse().ok()
}

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error(
        "memory_limit = {limit} needs the kernel's memory cgroup controller, and none is usable here: {why}. \
         {fix}"
    )]
    Unusable { limit: String, why: String, fix: &'static str },
    #[error("cannot set up the build's memory cgroup {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

const FIX: &str = "On a Raspberry Pi add `cgroup_enable=memory` to /boot/firmware/cmdline.txt (one line) and \
                   reboot; elsewhere boot with the memory controller enabled (cgroup v2: `memory` in \
                   /sys/fs/cgroup/cgroup.controllers), run the agent as root (systemd: Delegate=yes), or remove \
                   memory_limit / --memory-limit";

/// A usable memory limit: the bytes, the agent it is configured on (for messages), and the
/// cgroup that builds' cgroups are created in.
#[derive(Debug, Clone)]
pub struct MemoryLimit {
    pub bytes: u64,
    pub agent: String,
    version: Version,
    parent: PathBuf,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io { path: path.to_path_buf(), source }
}

impl MemoryLimit {
    /// Finds a memory controller this agent can create limited child cgroups with (v2 first,
    /// then v1), and checks by creating one. An error says why none is usable and how to fix it.
    pub fn setup(bytes: u64, agent: &str) -> Result<MemoryLimit, CgroupError> {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let proc_cgroup = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        let (v1, v2) = own_cgroups(&mountinfo, &proc_cgroup);
        let mut why = Vec::new();
        match &v2 {
            Some(dir) => match v2_parent(dir) {
                Ok(parent) => match Self::probe(bytes, agent, Version::V2, parent) {
                    Ok(limit) => return Ok(limit),
                    Err(e) => why.push(format!("cgroup v2: {e}")),
                },
                Err(e) => why.push(format!("cgroup v2: {e}")),
            },
            None => why.push("cgroup v2: not mounted".into()),
        }
        match v1 {
            Some(dir) => match Self::probe(bytes, agent, Version::V1, dir) {
                Ok(limit) => return Ok(limit),
                Err(e) => why.push(format!("cgroup v1: {e}")),
            },
            None => why.push("cgroup v1: no memory hierarchy mounted".into()),
        }
        Err(CgroupError::Unusable { limit: format_size(bytes), why: why.join("; "), fix: FIX })
    }

    fn probe(bytes: u64, agent: &str, version: Version, parent: PathBuf) -> Result<MemoryLimit, String> {
        let limit = MemoryLimit { bytes, agent: agent.into(), version, parent };
        limit.sweep();
        let probe = limit.create("probe").map_err(|e| e.to_string())?;
        probe.remove_now();
        Ok(limit)
    }

    /// Removes build cgroups that agents no longer running left behind (killed mid-build).
    fn sweep(&self) {
        for e in std::fs::read_dir(&self.parent).into_iter().flatten().filter_map(Result::ok) {
            let name = e.file_name().to_string_lossy().to_string();
            if let Some(pid) = owner(&name) {
                if !Path::new(&format!("/proc/{pid}")).exists() || pid == std::process::id() {
                    let _ = std::fs::remove_dir(e.path());
                }
            }
        }
    }

    /// A cgroup of its own for the build `name`, with this limit and no swap.
    pub fn create(&self, name: &str) -> Result<BuildCgroup, CgroupError> {
        let dir = self.parent.join(format!("farm-{}-{name}", std::process::id()));
        if dir.exists() {
            let _ = std::fs::remove_dir(&dir);
        }
        std::fs::create_dir(&dir).map_err(io(&dir))?;
        let cgroup = BuildCgroup { dir: dir.clone(), version: self.version, limit: self.clone(), removed: false };
        let write = |file: &str, value: String| {
            let path = dir.join(file);
            std::fs::write(&path, value).map_err(io(&path))
        };
        match self.version {
            Version::V1 => {
                write("memory.limit_in_bytes", self.bytes.to_string())?;
                // Memory + swap at the same limit: no swapping past it (absent without swap accounting).
                if dir.join("memory.memsw.limit_in_bytes").exists() {
                    write("memory.memsw.limit_in_bytes", self.bytes.to_string())?;
                }
            }
            Version::V2 => {
                write("memory.max", self.bytes.to_string())?;
                if dir.join("memory.swap.max").exists() {
                    write("memory.swap.max", "0".into())?;
                }
            }
        }
        Ok(cgroup)
    }

    /// The message of a build the kernel killed for using more than this limit.
    pub fn out_of_memory(&self) -> String {
        format!(
            "the build ran out of memory: it used more than memory_limit = {} (agent {}'s config, memory_limit); \
             raise it or build on a bigger agent",
            format_size(self.bytes),
            self.agent
        )
    }
}

/// The cgroup v2 directory builds' cgroups go in: the agent's own, with the memory controller
/// enabled for its children. A v2 cgroup with processes cannot enable controllers for children
/// (the "no internal processes" rule), so the agent first moves itself into a leaf
/// `farm-agent-<pid>` below it; another process there makes it fail with what to do.
fn v2_parent(dir: &Path) -> Result<PathBuf, String> {
    let controllers = std::fs::read_to_string(dir.join("cgroup.controllers"))
        .map_err(|e| format!("{}: {e}", dir.join("cgroup.controllers").display()))?;
    if !lists(&controllers, "memory") {
        return Err(format!(
            "the memory controller is not enabled for {} (cgroup.controllers: {:?})",
            dir.display(),
            controllers.trim()
        ));
    }
    let subtree = dir.join("cgroup.subtree_control");
    if lists(&std::fs::read_to_string(&subtree).unwrap_or_default(), "memory") {
        return Ok(dir.to_path_buf());
    }
    if std::fs::write(&subtree, "+memory").is_ok() {
        return Ok(dir.to_path_buf());
    }
    let leaf = dir.join(format!("farm-agent-{}", std::process::id()));
    let _ = std::fs::create_dir(&leaf);
    // Writing 0 moves the writing process (all its threads, in v2).
    std::fs::write(leaf.join("cgroup.procs"), "0")
        .map_err(|e| format!("moving the agent into {}: {e}", leaf.display()))?;
    std::fs::write(&subtree, "+memory").map_err(|e| {
        format!(
            "cannot enable memory for the children of {} ({e}): other processes share the agent's cgroup; run \
             the agent in a cgroup of its own (systemd: a service with Delegate=yes)",
            dir.display()
        )
    })?;
    Ok(dir.to_path_buf())
}

/// One build's memory cgroup. The builder's process joins it before it executes
/// ([`BuildCgroup::join`]); once the build is over, [`BuildCgroup::remove`] kills whatever is
/// still in it and removes it (dropped, it is removed if it is already empty).
#[derive(Debug)]
pub struct BuildCgroup {
    dir: PathBuf,
    version: Version,
    limit: MemoryLimit,
    removed: bool,
}

impl BuildCgroup {
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Makes `cmd`'s process join this cgroup between fork and exec (writing `0` to
    /// `cgroup.procs` moves the writer), so that nothing it starts runs outside it.
    pub fn join(&self, cmd: &mut tokio::process::Command) {
        let procs = std::ffi::CString::new(self.dir.join("cgroup.procs").as_os_str().as_encoded_bytes())
            .expect("no NUL in a cgroup path");
        // SAFETY: open/write/close are async-signal-safe; the path was allocated before the fork.
        unsafe {
            cmd.pre_exec(move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let written = libc::write(fd, b"0".as_ptr().cast(), 1);
                let error = std::io::Error::last_os_error();
                libc::close(fd);
                if written != 1 {
                    return Err(error);
                }
                Ok(())
            });
        }
    }

    /// Whether the kernel killed a process of this build for exceeding the limit.
    pub fn oom_killed(&self) -> bool {
        let read = |f: &str| std::fs::read_to_string(self.dir.join(f)).unwrap_or_default();
        match self.version {
            Version::V2 => oom_kills(&read("memory.events")).unwrap_or(0) > 0,
            // Kernels before 4.13 have no oom_kill count: hitting the limit is the best sign.
            Version::V1 => match oom_kills(&read("memory.oom_control")) {
                Some(n) => n > 0,
                None => read("memory.failcnt").trim().parse::<u64>().unwrap_or(0) > 0,
            },
        }
    }

    /// Whether the build's memory use reached the limit at least once (v1 `memory.failcnt` or
    /// `memory.memsw.failcnt`, v2 `max` in `memory.events`; charges of the cgroup's descendants,
    /// such as runc's cgroup of a RUN, count here).
    pub fn hit_limit(&self) -> bool {
        let read = |f: &str| std::fs::read_to_string(self.dir.join(f)).unwrap_or_default();
        match self.version {
            Version::V2 => read("memory.events").lines().any(|l| {
                l.split_whitespace().collect::<Vec<_>>().as_slice().first() == Some(&"max") && !l.ends_with(" 0")
            }),
            // The peak reaching the limit is the sign that holds here (the failure counters can
            // stay at 0 when a descendant's task is the one killed).
            Version::V1 => {
                let num = |f: &str| read(f).trim().parse::<u64>().ok();
                let peaked = matches!(
                    (num("memory.max_usage_in_bytes"), num("memory.limit_in_bytes")),
                    (Some(peak), Some(limit)) if peak >= limit
                );
                peaked || ["memory.failcnt", "memory.memsw.failcnt"].iter().any(|f| num(f).unwrap_or(0) > 0)
            }
        }
    }

    /// The limit this cgroup enforces.
    pub fn limit(&self) -> &MemoryLimit {
        &self.limit
    }

    fn pids(&self) -> Vec<i32> {
        let text = std::fs::read_to_string(self.dir.join("cgroup.procs")).unwrap_or_default();
        text.lines().filter_map(|l| l.trim().parse().ok()).collect()
    }

    fn remove_now(mut self) {
        self.removed = std::fs::remove_dir(&self.dir).is_ok();
    }

    /// Kills what is left in the cgroup, waits until its processes are gone (up to 10 s) and
    /// removes it.
    pub async fn remove(mut self) {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            for pid in self.pids() {
                // SAFETY: kill(2); the pid is in this build's own cgroup.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            match std::fs::remove_dir(&self.dir) {
                Ok(()) => {
                    self.removed = true;
                    return;
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    self.removed = true;
                    return;
                }
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    tracing::warn!("cannot remove the build's memory cgroup {}: {e}", self.dir.display());
                    return;
                }
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
            }
        }
    }
}

impl Drop for BuildCgroup {
    fn drop(&mut self) {
        if !self.removed {
            let _ = std::fs::remove_dir(&self.dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("2 gib"), Ok(2 << 30));
        assert_eq!(parse_size("1000000"), Ok(1_000_000));
        assert_eq!(parse_size("1GB"), Ok(1_000_000_000));
        assert_eq!(parse_size("100k"), Ok(102_400));
        assert_eq!(
            parse_size("2 gigs").unwrap_err(),
            "\"2 gigs\" is not a size: write a number with a unit, e.g. 512MiB, 2GiB or 1.5G"
        );
        assert!(parse_size("GiB").is_err());
        assert!(parse_size("-1G").is_err());
        assert!(parse_size("0").unwrap_err().contains("zero"));
    }

    #[test]
    fn sizes_format_for_people() {
        assert_eq!(format_size(256 << 20), "256 MiB");
        assert_eq!(format_size(2 << 30), "2 GiB");
        assert_eq!(format_size(3 << 29), "1.5 GiB");
        assert_eq!(format_size(1000), "1000 B");
        assert_eq!(format_size(1_000_000), "976.56 KiB");
    }

    const HYBRID_MOUNTINFO: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime shared:9 - cgroup cgroup rw,memory
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    const HYBRID_CGROUP: &str = "\
9:name=systemd:/
4:memory:/process_api/10beca
1:cpu:/
0::/
";

    #[test]
    fn hybrid_hierarchies_are_found() {
        let mounts = parse_mountinfo(HYBRID_MOUNTINFO);
        assert_eq!(
            mounts,
            [
                CgroupMount { version: Version::V1, mount_point: "/sys/fs/cgroup/memory".into(), root: "/".into() },
                CgroupMount { version: Version::V2, mount_point: "/sys/fs/cgroup/unified".into(), root: "/".into() },
            ]
        );
        assert_eq!(parse_proc_cgroup(HYBRID_CGROUP), (Some("/process_api/10beca".into()), Some("/".into())));
        assert_eq!(
            own_cgroups(HYBRID_MOUNTINFO, HYBRID_CGROUP),
            (Some("/sys/fs/cgroup/memory/process_api/10beca".into()), Some("/sys/fs/cgroup/unified".into()))
        );
    }

    #[test]
    fn unified_hierarchy_is_found() {
        // Raspberry Pi OS bookworm: cgroup v2 only.
        let mountinfo = "25 20 0:23 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot\n";
        let cgroup = "0::/system.slice/farm-agent.service\n";
        assert_eq!(
            own_cgroups(mountinfo, cgroup),
            (None, Some("/sys/fs/cgroup/system.slice/farm-agent.service".into()))
        );
    }

    #[test]
    fn a_mounted_subtree_and_escapes_are_resolved() {
        let mountinfo = "41 31 0:38 /docker/abc /sys/fs/cgroup/my\\040mem rw - cgroup cgroup rw,memory,hugetlb\n";
        let m = &parse_mountinfo(mountinfo)[0];
        assert_eq!(m.mount_point, PathBuf::from("/sys/fs/cgroup/my mem"));
        assert_eq!(cgroup_dir(m, "/docker/abc/build"), Some("/sys/fs/cgroup/my mem/build".into()));
        assert_eq!(cgroup_dir(m, "/docker/abc"), Some("/sys/fs/cgroup/my mem/".into()));
        assert_eq!(cgroup_dir(m, "/docker/abcd"), None);
        assert_eq!(cgroup_dir(m, "/other"), None);
        // A v1 mount without the memory controller is not a candidate.
        assert!(parse_mountinfo("32 31 0:29 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu,cpuacct\n").is_empty());
    }

    #[test]
    fn oom_kills_are_counted() {
        assert_eq!(oom_kills("oom_kill_disable 0\nunder_oom 0\noom_kill 1\n"), Some(1));
        assert_eq!(oom_kills("low 0\nhigh 0\nmax 12\noom 1\noom_kill 2\noom_group_kill 0\n"), Some(2));
        assert_eq!(oom_kills("oom_kill_disable 0\nunder_oom 0\n"), None);
        assert!(lists("cpuset cpu io memory pids", "memory"));
        assert!(!lists("cpuset cpu io pids", "memory"));
    }

    #[test]
    fn build_cgroups_name_their_agent() {
        assert_eq!(owner("farm-1234-farm-task-7-1"), Some(1234));
        assert_eq!(owner("farm-agent-1234"), None);
        assert_eq!(owner("user.slice"), None);
    }

    #[test]
    fn the_out_of_memory_message_names_the_limit_and_the_key() {
        let limit = MemoryLimit { bytes: 256 << 20, agent: "pi-4".into(), version: Version::V2, parent: "/x".into() };
        assert_eq!(
            limit.out_of_memory(),
            "the build ran out of memory: it used more than memory_limit = 256 MiB (agent pi-4's config, \
             memory_limit); raise it or build on a bigger agent"
        );
    }
}
