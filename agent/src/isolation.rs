//! What keeps one build from touching another build or its agent.
//!
//! buildah runs each RUN step through an OCI runtime (`--isolation oci`, Debian's `runc`; `crun`
//! refuses hybrid cgroup hosts), so a RUN has its own PID, mount, IPC and UTS namespaces with a
//! private `/proc`: it sees only its own processes, and `/proc/<pid>/root` of another build does
//! not exist for it. The runtime gives it the default OCI capability set (no `CAP_SYS_ADMIN`,
//! `CAP_SYS_PTRACE`, `CAP_NET_ADMIN`) and buildah's default seccomp profile; farm adds
//! `no_new_privs` (buildah 1.28 has no `--security-opt no-new-privileges` for `build`, so the
//! agent sets it on buildah itself, and the runtime's processes inherit it).
//!
//! Network: each build gets a network namespace of its own ([`BuildNetwork`]) with outbound
//! access through `slirp4netns --disable-host-loopback` (user-mode NAT: connections leave from
//! the agent host as ordinary sockets, so whatever the host can reach, except its loopback, the
//! build can; DNS through slirp's forwarder 10.0.2.3). Nothing listens in it, so builds cannot
//! reach each other. Host networking only with the `network.host` entitlement, which the agent's
//! config must allow.

use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;

use shared::proto::Entitlement;
use tokio::process::Command;

/// slirp4netns' built-in DNS forwarder.
const SLIRP_DNS: &str = "10.0.2.3";

/// How long slirp4netns may take to configure a namespace.
const READY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum IsolationError {
    #[error("cannot create the build's network namespace {path}: {why}")]
    Netns { path: PathBuf, why: String },
    #[error(
        "cannot give the build a network: slirp4netns {0}; install it (`apt-get install slirp4netns`, \
         deploy/install.sh does)"
    )]
    Slirp(String),
}

/// The sandbox of one build, held for as long as the build runs.
pub struct Isolation {
    network: Option<BuildNetwork>,
    args: Vec<String>,
    no_new_privs: bool,
}

impl Isolation {
    /// The sandbox `entitlements` leave: a private network under `dir` unless `network.host`
    /// (or none at all, only loopback, with `no_network`: `--network none`); `no_new_privs`,
    /// default capabilities and seccomp unless `security.insecure`.
    pub async fn prepare(
        dir: &Path,
        name: &str,
        entitlements: &[Entitlement],
        no_network: bool,
    ) -> Result<Isolation, IsolationError> {
        let (network, mut args) = if entitlements.contains(&Entitlement::NetworkHost) {
            (None, vec!["--network".to_string(), "host".to_string()])
        } else if no_network {
            (None, vec!["--network".to_string(), "none".to_string()])
        } else {
            let net = BuildNetwork::create(dir, name).await?;
            let args = vec![
                "--network".to_string(),
                format!("ns:{}", net.path.display()),
                "--dns".to_string(),
                SLIRP_DNS.to_string(),
            ];
            (Some(net), args)
        };
        let insecure = entitlements.contains(&Entitlement::SecurityInsecure);
        if insecure {
            args.extend(["--cap-add", "ALL", "--security-opt", "seccomp=unconfined"].map(String::from));
        }
        Ok(Isolation { network, args, no_new_privs: !insecure })
    }

    /// Adds the isolation flags to a `buildah build` command line (and `no_new_privs` to its
    /// process).
    pub fn apply(&self, build: &mut Command) {
        build.args(&self.args);
        if let Some(net) = &self.network {
            let fd = net.netns.as_raw_fd();
            // SAFETY: dup2 and fcntl are async-signal-safe and touch only the child.
            unsafe {
                build.pre_exec(move || {
                    let done =
                        if fd == NETNS_FD { libc::fcntl(fd, libc::F_SETFD, 0) } else { libc::dup2(fd, NETNS_FD) };
                    if done < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        if self.no_new_privs {
            // SAFETY: prctl is async-signal-safe and touches only the calling (child) process.
            unsafe {
                build.pre_exec(|| {
                    if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
    }

    /// The build's network namespace, if it has its own.
    pub fn netns(&self) -> Option<&Path> {
        self.network.as_ref().map(|n| n.path.as_path())
    }

    /// What buildah's wrapper runs inside buildah's own mount namespace before it execs buildah:
    /// bind-mounts the build's network namespace (passed as descriptor 7) at its path, where
    /// `--network ns:PATH` finds it. The mount ends with that namespace.
    pub fn prelude(&self) -> Vec<String> {
        match &self.network {
            None => vec![],
            Some(net) => vec![
                "sh".into(),
                "-c".into(),
                format!("mount --bind /proc/self/fd/{NETNS_FD} \"$0\" && exec \"$@\""),
                net.path.display().to_string(),
            ],
        }
    }
}

/// The environment of buildah's RUN steps: the OCI runtime `runc` (each RUN in its own
/// namespaces with a private /proc), not chroot isolation (which shares the host's).
pub const BUILDAH_ENV: [(&str, &str); 2] = [("BUILDAH_ISOLATION", "oci"), ("BUILDAH_RUNTIME", "runc")];

/// The descriptor by which buildah's wrapper receives the build's network namespace.
const NETNS_FD: i32 = 7;

/// A network namespace, held open by the agent, with slirp4netns giving it outbound access but
/// not the host's loopback. It is never mounted on the host: buildah's wrapper bind-mounts it at
/// `path` inside buildah's own private mount namespace (see [`Isolation::prelude`]), so the mount
/// ends with buildah however buildah ends. Dropped: slirp4netns and the holder are killed and the
/// namespace ends with its last user. Both die with the agent (PR_SET_PDEATHSIG).
pub struct BuildNetwork {
    /// An empty file, the mount point inside buildah's mount namespace.
    path: PathBuf,
    netns: std::fs::File,
    _holder: tokio::process::Child,
    _slirp: tokio::process::Child,
}

fn die_with_parent(cmd: &mut Command) {
    // SAFETY: prctl is async-signal-safe and touches only the child.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}

impl BuildNetwork {
    pub async fn create(dir: &Path, name: &str) -> Result<BuildNetwork, IsolationError> {
        let path = dir.join(name);
        let netns = |why: String| IsolationError::Netns { path: path.clone(), why };
        std::fs::create_dir_all(dir).map_err(|e| netns(e.to_string()))?;
        std::fs::File::create(&path).map_err(|e| netns(e.to_string()))?;
        // A process that holds the new namespace until it is opened; it says when it is inside.
        let mut holder = Command::new("unshare");
        holder
            .args(["--net", "sh", "-c", "echo ready; exec sleep infinity"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        die_with_parent(&mut holder);
        let mut holder = holder.spawn().map_err(|e| netns(format!("unshare: {e}")))?;
        let mut line = String::new();
        let out = holder.stdout.take().expect("piped");
        let mut out = tokio::io::BufReader::new(out);
        let read = tokio::io::AsyncBufReadExt::read_line(&mut out, &mut line);
        let _ = tokio::time::timeout(READY_TIMEOUT, read).await;
        let pid = holder
            .id()
            .filter(|_| line.trim() == "ready")
            .ok_or_else(|| netns("`unshare --net` did not start (are we root, with CAP_SYS_ADMIN?)".to_string()))?;
        let file = std::fs::File::open(format!("/proc/{pid}/ns/net")).map_err(|e| netns(e.to_string()))?;

        let (ready_read, ready_write) = pipe().map_err(|e| IsolationError::Slirp(format!("pipe: {e}")))?;
        let write_fd = ready_write.as_raw_fd();
        let mut cmd = Command::new("slirp4netns");
        cmd.args(["--configure", "--mtu=65520", "--disable-host-loopback", "--enable-sandbox", "--enable-seccomp"])
            .arg("--ready-fd=3")
            .arg(pid.to_string())
            .arg("tap0")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        die_with_parent(&mut cmd);
        // SAFETY: dup2 and fcntl are async-signal-safe and touch only the child.
        unsafe {
            cmd.pre_exec(move || {
                // dup2 onto itself would keep close-on-exec: clear it instead.
                let done = if write_fd == 3 { libc::fcntl(3, libc::F_SETFD, 0) } else { libc::dup2(write_fd, 3) };
                if done < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut slirp = cmd.spawn().map_err(|e| IsolationError::Slirp(e.to_string()))?;
        drop(ready_write);
        let stderr = slirp.stderr.take();
        // slirp4netns writes "1" once the interface is up; EOF means it died.
        let ready = tokio::time::timeout(READY_TIMEOUT, async {
            let mut f = tokio::fs::File::from_std(std::fs::File::from(ready_read));
            let mut b = [0u8; 1];
            tokio::io::AsyncReadExt::read(&mut f, &mut b).await.map(|n| n == 1 && b[0] == b'1')
        })
        .await;
        if !matches!(ready, Ok(Ok(true))) {
            let _ = slirp.start_kill();
            let mut why = String::new();
            if let Some(mut e) = stderr {
                let _ = tokio::time::timeout(
                    std::time::Duration::from_secs(2),
                    tokio::io::AsyncReadExt::read_to_string(&mut e, &mut why),
                )
                .await;
            }
            let _ = std::fs::remove_file(&path);
            let why = why.lines().rfind(|l| !l.contains("experimental")).unwrap_or("").trim().to_string();
            return Err(IsolationError::Slirp(if why.is_empty() {
                "did not configure the namespace within 10 s".to_string()
            } else {
                why
            }));
        }
        if let Some(mut e) = stderr {
            // Keep draining what it says, so that it never blocks on a full pipe.
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut e, &mut tokio::io::sink()).await;
            });
        }
        Ok(BuildNetwork { path, netns: file, _holder: holder, _slirp: slirp })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for BuildNetwork {
    fn drop(&mut self) {
        // The children are killed on drop; the mount point is a plain file on the host.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A pipe whose read end is close-on-exec; the write end is dup'ed to fd 3 in the child.
fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two new descriptors that we then own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned by no one else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn entitlements_decide_the_flags() {
        // Host networking needs no namespace, so this runs without privileges.
        let dir = std::env::temp_dir();
        let host = Isolation::prepare(&dir, "unused", &[Entitlement::NetworkHost], false).await.unwrap();
        assert_eq!(host.args, ["--network", "host"]);
        assert!(host.no_new_privs);
        assert!(host.netns().is_none());
        let all = Isolation::prepare(&dir, "unused", &[Entitlement::NetworkHost, Entitlement::SecurityInsecure], false)
            .await
            .unwrap();
        assert_eq!(all.args, ["--network", "host", "--cap-add", "ALL", "--security-opt", "seccomp=unconfined"]);
        assert!(!all.no_new_privs);
        // --network none: no namespace of farm's, no slirp4netns; the runtime's own, with only lo.
        let none = Isolation::prepare(&dir, "unused", &[], true).await.unwrap();
        assert_eq!(none.args, ["--network", "none"]);
        assert!(none.netns().is_none() && none.prelude().is_empty());
    }
}
