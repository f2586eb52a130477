//! `--ssh` on the client: buildx's spelling parsed ([`parse`], **pure**), each id resolved to a
//! local ssh-agent socket ([`resolve`]: `$SSH_AUTH_SOCK`, a socket the user names, or a private
//! `ssh-agent` holding the key files the user names, [`LocalAgent`]). The sockets and keys never
//! leave this machine: the agent that runs the build relays each connection its builder makes to
//! the socket for an id through the coordinator to this client (`Request::SshForward`).

use std::path::{Path, PathBuf};

/// What one `--ssh` flag asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshFlag {
    pub id: String,
    /// Empty: the user's own agent (`$SSH_AUTH_SOCK`). One socket, or key files.
    pub paths: Vec<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum SshError {
    #[error("--ssh {flag:?}: {why}")]
    Flag { flag: String, why: String },
    #[error("--ssh {id}: {why}")]
    Source { id: String, why: String },
}

/// `default`, `ID`, `ID=SOCKET` or `ID=KEY[,KEY...]` (buildx's syntax). Ids may hold letters,
/// digits, '-', '_' and '.'; each may be given once.
pub fn parse(flags: &[String]) -> Result<Vec<SshFlag>, SshError> {
    let mut out: Vec<SshFlag> = Vec::new();
    for f in flags {
        let bad = |why: &str| SshError::Flag { flag: f.clone(), why: why.into() };
        let (id, rest) = match f.split_once('=') {
            Some((id, rest)) => (id, Some(rest)),
            None => (f.as_str(), None),
        };
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) {
            return Err(bad(
                "expected default, ID, ID=SOCKET or ID=KEYFILE[,KEYFILE]; the id may hold letters, digits, '-', '_' and '.'",
            ));
        }
        let paths: Vec<PathBuf> = match rest {
            None => vec![],
            Some(rest) => {
                if rest.split(',').any(str::is_empty) {
                    return Err(bad("an empty path; expected ID=SOCKET or ID=KEYFILE[,KEYFILE]"));
                }
                rest.split(',').map(PathBuf::from).collect()
            }
        };
        if out.iter().any(|o| o.id == id) {
            return Err(bad(&format!("the id {id} is given twice; give each id once")));
        }
        out.push(SshFlag { id: id.to_string(), paths });
    }
    Ok(out)
}

/// Where connections for one id go on this machine.
pub struct Resolved {
    pub id: String,
    pub socket: PathBuf,
    /// The private agent holding the id's key files, if it has some; it stops when dropped.
    pub agent: Option<LocalAgent>,
}

/// Checks each flag's source and makes a socket for it: `$SSH_AUTH_SOCK` (`auth_sock`) when no
/// path is given, the socket named, or a private ssh-agent holding the key files named. Nothing
/// is sent anywhere.
pub fn resolve(flags: Vec<SshFlag>, auth_sock: Option<PathBuf>) -> Result<Vec<Resolved>, SshError> {
    let mut out = Vec::new();
    for f in flags {
        let id = f.id.clone();
        let fail = |why: String| SshError::Source { id: id.clone(), why };
        if f.paths.is_empty() {
            let Some(sock) = auth_sock.clone().filter(|s| !s.as_os_str().is_empty()) else {
                return Err(fail(
                    "SSH_AUTH_SOCK is not set, so there is no ssh-agent to forward; start one (`eval \"$(ssh-agent)\" && \
                     ssh-add`) or name a socket or key file: --ssh ID=SOCKET or --ssh ID=~/.ssh/id_ed25519"
                        .into(),
                ));
            };
            out.push(Resolved { id: f.id, socket: check_socket(&sock).map_err(fail)?, agent: None });
            continue;
        }
        let sockets = f.paths.iter().filter(|p| is_socket(p)).count();
        if sockets > 0 {
            if f.paths.len() > 1 {
                return Err(fail("give one socket, or key files, not both".into()));
            }
            out.push(Resolved { id: f.id, socket: check_socket(&f.paths[0]).map_err(fail)?, agent: None });
            continue;
        }
        for key in &f.paths {
            if let Err(e) = std::fs::File::open(key) {
                let why = if e.kind() == std::io::ErrorKind::NotFound {
                    format!("{} does not exist: name an ssh-agent socket or a private key file", key.display())
                } else {
                    format!("cannot read the key file {}: {e}; check its permissions", key.display())
                };
                return Err(fail(why));
            }
        }
        let agent = LocalAgent::start(&f.paths).map_err(fail)?;
        out.push(Resolved { id: f.id, socket: agent.socket.clone(), agent: Some(agent) });
    }
    Ok(out)
}

fn is_socket(p: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(p).map(|m| m.file_type().is_socket()).unwrap_or(false)
}

fn check_socket(p: &Path) -> Result<PathBuf, String> {
    match std::fs::metadata(p) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(format!(
            "{} does not exist: is the ssh-agent running? (`ssh-add -l` with SSH_AUTH_SOCK={0} tells)",
            p.display()
        )),
        Err(e) => Err(format!("cannot reach {}: {e}", p.display())),
        Ok(_) if !is_socket(p) => Err(format!("{} is not a socket", p.display())),
        Ok(_) => Ok(p.to_path_buf()),
    }
}

/// A private `ssh-agent` holding key files for one build, listening in a directory only this
/// user can read; killed and removed when dropped.
pub struct LocalAgent {
    child: std::process::Child,
    dir: PathBuf,
    pub socket: PathBuf,
}

impl LocalAgent {
    pub fn start(keys: &[PathBuf]) -> Result<LocalAgent, String> {
        use std::os::unix::fs::DirBuilderExt;
        let dir = std::env::temp_dir().join(format!("farm-ssh-{}-{:016x}", std::process::id(), random()));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let socket = dir.join("agent.sock");
        let mut command = std::process::Command::new("ssh-agent");
        // It goes with this process however that ends (Ctrl-C included).
        // SAFETY: prctl is async-signal-safe and touches only the child.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut command, || {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let child = command
            .arg("-D")
            .arg("-a")
            .arg(&socket)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
        let child = match child {
            Ok(c) => c,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(format!(
                    "cannot start ssh-agent to hold the key file ({e}); install openssh-client, or add the key to \
                     your own agent and pass --ssh ID=$SSH_AUTH_SOCK"
                ));
            }
        };
        let agent = LocalAgent { child, dir, socket };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !is_socket(&agent.socket) {
            if std::time::Instant::now() > deadline {
                return Err("ssh-agent did not create its socket within 5 s".into());
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        for key in keys {
            let out = std::process::Command::new("ssh-add")
                .arg(key)
                .env("SSH_AUTH_SOCK", &agent.socket)
                .env_remove("SSH_ASKPASS")
                .env_remove("DISPLAY")
                .stdin(std::process::Stdio::null())
                .output()
                .map_err(|e| format!("cannot run ssh-add ({e}); install openssh-client"))?;
            if !out.status.success() {
                let said = String::from_utf8_lossy(&out.stderr).trim().to_string();
                return Err(format!(
                    "{} is not a private key farm can load ({said}); name a private key without a passphrase, or \
                     add a key with one to your own agent (`ssh-add {0}`) and pass --ssh ID=$SSH_AUTH_SOCK",
                    key.display()
                ));
            }
        }
        Ok(agent)
    }
}

impl Drop for LocalAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn random() -> u64 {
    let mut b = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).expect("the OS has randomness");
    u64::from_le_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn buildx_spellings_parse() {
        let got = parse(&flags(&["default", "git=/run/a.sock", "keys=/k/a,/k/b"])).unwrap();
        assert_eq!(
            got,
            vec![
                SshFlag { id: "default".into(), paths: vec![] },
                SshFlag { id: "git".into(), paths: vec!["/run/a.sock".into()] },
                SshFlag { id: "keys".into(), paths: vec!["/k/a".into(), "/k/b".into()] },
            ]
        );
    }

    #[test]
    fn bad_flags_are_named() {
        let e = |v: &[&str]| parse(&flags(v)).unwrap_err().to_string();
        assert_eq!(
            e(&["a b=/x"]),
            "--ssh \"a b=/x\": expected default, ID, ID=SOCKET or ID=KEYFILE[,KEYFILE]; the id may hold letters, \
             digits, '-', '_' and '.'"
        );
        assert_eq!(e(&["x="]), "--ssh \"x=\": an empty path; expected ID=SOCKET or ID=KEYFILE[,KEYFILE]");
        assert_eq!(e(&["x", "x=/s"]), "--ssh \"x=/s\": the id x is given twice; give each id once");
    }

    #[test]
    fn sources_are_checked_before_anything_is_sent() {
        let dir = tempfile::tempdir().unwrap();
        let e = |f: &[&str], sock: Option<PathBuf>| resolve(parse(&flags(f)).unwrap(), sock).err().unwrap().to_string();
        assert!(e(&["default"], None).starts_with("--ssh default: SSH_AUTH_SOCK is not set"));
        let missing = dir.path().join("nope.sock");
        assert_eq!(
            e(&["default"], Some(missing.clone())),
            format!(
                "--ssh default: {0} does not exist: is the ssh-agent running? (`ssh-add -l` with SSH_AUTH_SOCK={0} tells)",
                missing.display()
            )
        );
        let m = missing.display().to_string();
        assert_eq!(
            e(&[&format!("git={m}")], None),
            format!("--ssh git: {m} does not exist: name an ssh-agent socket or a private key file")
        );
        let file = dir.path().join("plain");
        std::fs::write(&file, "x").unwrap();
        assert_eq!(e(&["default"], Some(file.clone())), format!("--ssh default: {} is not a socket", file.display()));
    }
}
