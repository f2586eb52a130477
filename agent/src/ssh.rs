//! `RUN --mount=type=ssh` for one task: a socket per `--ssh` id in a directory only the agent's
//! user can enter (0700), handed to the builder (`--ssh ID=SOCKET`). Each connection the builder
//! makes to it is relayed over the agent's current session to the coordinator, which passes it
//! on to the client that submitted the build (`Request::SshForward`); the client connects it to
//! its own ssh-agent. Keys never reach this host: only the agent protocol's bytes pass through,
//! never read, logged or written.

use std::path::{Path, PathBuf};

use tokio::sync::mpsc;

use crate::task::Conn;

/// How long a connection waits for a session when the agent is between sessions.
const SESSION_PATIENCE: std::time::Duration = std::time::Duration::from_secs(30);

/// The sockets of one task; they stop listening, and their directory goes, when dropped.
pub struct Forwards {
    dir: PathBuf,
    _link: ShortLink,
    /// (id, socket) as the builder's `--ssh` wants them.
    pub sockets: Vec<(String, PathBuf)>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Forwards {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Forwards {
    /// Listens on `dir/0`, `dir/1`, ... for `ids` of `build`; `log` gets a line for every
    /// connection that could not be relayed, saying why.
    pub fn start(
        dir: &Path,
        build: &str,
        ids: &[String],
        conn: Conn,
        max_frame: usize,
        log: mpsc::UnboundedSender<String>,
    ) -> std::io::Result<Forwards> {
        use std::os::unix::fs::DirBuilderExt;
        let _ = std::fs::remove_dir_all(dir);
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
        let link = ShortLink::to(dir)?;
        let short = link.0.clone();
        let mut forwards = Forwards { dir: dir.to_path_buf(), _link: link, sockets: Vec::new(), tasks: Vec::new() };
        for (i, id) in ids.iter().enumerate() {
            let path = short.join(i.to_string());
            let listener = tokio::net::UnixListener::bind(&path)?;
            forwards.sockets.push((id.clone(), path));
            let (build, id, conn, log) = (build.to_string(), id.clone(), conn.clone(), log.clone());
            forwards.tasks.push(tokio::spawn(async move {
                let mut relays = tokio::task::JoinSet::new();
                while let Ok((stream, _)) = listener.accept().await {
                    let (build, id, conn, log) = (build.clone(), id.clone(), conn.clone(), log.clone());
                    relays.spawn(async move {
                        if let Err(e) = relay(stream, &build, &id, conn, max_frame).await {
                            let _ = log.send(format!("farm: --ssh {id}: {e}"));
                        }
                    });
                }
            }));
        }
        Ok(forwards)
    }
}

async fn relay(
    stream: tokio::net::UnixStream,
    build: &str,
    id: &str,
    mut conn: Conn,
    max: usize,
) -> Result<(), String> {
    let session = tokio::time::timeout(SESSION_PATIENCE, conn.wait_for(Option::is_some))
        .await
        .map_err(|_| "no connection to the coordinator to reach the client's ssh-agent".to_string())?
        .map_err(|_| "the agent is shutting down".to_string())?
        .clone()
        .expect("waited for a session");
    let (send, recv) = shared::client::open_ssh_forward(session.connection(), build, id, max).await?;
    let (r, w) = stream.into_split();
    shared::proto::io::splice(r, w, recv, send).await.map(|_| ()).map_err(|e| format!("relay ended: {e}"))
}

/// A short path (`$TMPDIR/farm-ssh-<random>`, a symbolic link) to a directory of ours. A unix
/// socket's path must fit in 108 bytes, which one in a deep work directory may not (the embedded
/// farm's is under `~/.local/state`); through the link it does. The link is made with
/// `symlink(2)`, which never follows or replaces an existing name, and leads into a directory
/// only our user can enter; it is removed when dropped.
pub struct ShortLink(pub PathBuf);

impl ShortLink {
    pub fn to(target: &Path) -> std::io::Result<ShortLink> {
        let base = std::env::temp_dir();
        loop {
            let link = base.join(format!("farm-ssh-{:016x}", rand::random::<u64>()));
            match std::os::unix::fs::symlink(target, &link) {
                Ok(()) => return Ok(ShortLink(link)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

impl Drop for ShortLink {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
