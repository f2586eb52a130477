//! The agent's side of the connection: connect, hello, register, say which tasks it holds,
//! heartbeat, run what it is assigned; on any failure, back off and do it again. The coordinator
//! may restart or the Wi-Fi may drop at any moment, so a lost session is routine, never fatal.
//!
//! Tasks outlive sessions: their messages queue in one channel that whichever session is current
//! drains, and the coordinator's fencing discards what has become stale. A task stays listed as
//! held until its result has been written to a session, so a reconnecting agent can tell the
//! coordinator what it is still working on.
//!
//! Shutdown (SIGTERM) drains: the coordinator is told to assign nothing more, running tasks get
//! until the drain limit to finish, and what is left is cancelled and handed back.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shared::client::{handshake, HandshakeError};
use shared::proto::io::{reader, write_msg};
use shared::proto::{AgentInfo, AgentMsg, Assignment, CoordMsg, Heartbeat, Held, ProtoError, TaskId};
use shared::quic::QuicError;
use shared::tls::Credentials;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::builder::BuilderError;
use crate::session::Backoff;
use crate::task::{Runner, TaskError};
use crate::Config;

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Quic(#[from] shared::quic::QuicError),
    #[error("{0}")]
    Handshake(#[from] HandshakeError),
    #[error("{0}")]
    Proto(#[from] ProtoError),
    #[error("coordinator refused registration: {0}")]
    Refused(String),
    #[error("coordinator closed the session")]
    Closed,
}

struct Entry {
    attempt: u32,
    cancel: CancellationToken,
    /// The result is queued in the outbox, not yet written to a session.
    finished: bool,
}

/// Tasks this agent holds, by id.
type Running = Arc<Mutex<HashMap<TaskId, Entry>>>;

pub(crate) struct Agent<'a> {
    pub config: &'a Config,
    pub creds: &'a Credentials,
    pub info: &'a AgentInfo,
    pub runner: Arc<Runner>,
}

/// Why a session stopped without an error.
enum Ended {
    Drained,
}

struct Shared {
    /// The current session, for tasks fetching their context and uploading images.
    conn: watch::Sender<Option<shared::client::Link>>,
    running: Running,
    out: mpsc::UnboundedSender<AgentMsg>,
    outbox: mpsc::UnboundedReceiver<AgentMsg>,
    drain: watch::Receiver<Option<Instant>>,
}

impl Agent<'_> {
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send + 'static) {
        let mut backoff = Backoff::new(Duration::from_millis(200), self.config.reconnect_max);
        let (drain_tx, drain) = watch::channel(None);
        let limit = self.config.drain_timeout;
        tokio::spawn(async move {
            shutdown.await;
            tracing::info!("shutting down: finishing running tasks (drain limit {} s)", limit.as_secs());
            let _ = drain_tx.send(Some(Instant::now() + limit));
        });
        let (out, outbox) = mpsc::unbounded_channel();
        let mut sh = Shared { conn: watch::channel(None).0, running: Arc::default(), out, outbox, drain };
        loop {
            match self.session(&mut backoff, &mut sh).await {
                Ok(Ended::Drained) => break,
                Err(e) => tracing::warn!(coordinator = %self.config.coordinator, "session ended: {e}"),
            }
            let deadline = *sh.drain.borrow();
            if let Some(deadline) = deadline {
                if sh.running.lock().unwrap().is_empty() || Instant::now() >= deadline {
                    break;
                }
            }
            let delay = backoff.next(rand::random());
            tracing::info!(coordinator = %self.config.coordinator, "reconnecting in {:.1}s", delay.as_secs_f64());
            tokio::time::sleep(delay).await;
        }
        for (_, e) in sh.running.lock().unwrap().drain() {
            e.cancel.cancel();
        }
        tracing::info!("agent stopped");
    }

    /// One session; returns only with the reason it ended. When the connection itself was closed
    /// (a refused certificate, a coordinator going away), that reason is the one reported.
    async fn session(&self, backoff: &mut Backoff, sh: &mut Shared) -> Result<Ended, SessionError> {
        let config = self.config;
        let (_endpoint, conn) = shared::quic::connect(&config.coordinator, self.creds, &config.transport).await?;
        let result = self.registered(backoff, &conn, sh).await;
        sh.conn.send_replace(None);
        if let Ok(Ended::Drained) = result {
            conn.close(0u32.into(), b"agent shut down");
            return result;
        }
        let err = result.err().unwrap_or(SessionError::Closed);
        Err(match conn.close_reason() {
            Some(reason) if !matches!(err, SessionError::Refused(_)) => {
                SessionError::Quic(QuicError::connection(config.coordinator.clone(), reason))
            }
            _ => err,
        })
    }

    async fn registered(
        &self,
        backoff: &mut Backoff,
        conn: &quinn::Connection,
        sh: &mut Shared,
    ) -> Result<Ended, SessionError> {
        let max = self.config.max_frame_bytes;
        let (mut send, recv) = handshake(conn, max).await?;
        write_msg(&mut send, &AgentMsg::Register(self.info.clone()), max).await?;
        let (mut incoming, _reader) = reader::<CoordMsg, _>(recv, max);
        let first = incoming.recv().await.unwrap_or(Ok(None))?.ok_or(ProtoError::Closed("a registration answer"))?;
        let interval = match first {
            CoordMsg::Registered { heartbeat_interval_ms } => Duration::from_millis(heartbeat_interval_ms.max(50)),
            CoordMsg::Refused { reason } => return Err(SessionError::Refused(reason)),
            other => return Err(ProtoError::Unexpected { expected: "Registered", got: format!("{other:?}") }.into()),
        };
        let held: Vec<Held> =
            sh.running.lock().unwrap().iter().map(|(task, e)| Held { task: *task, attempt: e.attempt }).collect();
        write_msg(&mut send, &AgentMsg::Holding(held), max).await?;
        tracing::info!(coordinator = %self.config.coordinator, "registered as {:?}", self.config.name);
        sh.conn.send_replace(Some(shared::client::Link::new(conn.clone(), max)));
        backoff.reset();
        let beat = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(beat);
        let mut told_draining = false;
        loop {
            let drain_at = *sh.drain.borrow();
            if let Some(deadline) = drain_at {
                if !told_draining {
                    write_msg(&mut send, &AgentMsg::Draining, max).await?;
                    told_draining = true;
                }
                if sh.running.lock().unwrap().is_empty() {
                    Self::goodbye(conn, &mut send).await;
                    return Ok(Ended::Drained);
                }
                if Instant::now() >= deadline {
                    self.hand_back(&mut send, sh).await?;
                    Self::goodbye(conn, &mut send).await;
                    return Ok(Ended::Drained);
                }
            }
            let deadline = drain_at.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                () = &mut beat => {
                    beat.as_mut().reset(tokio::time::Instant::now() + crate::session::heartbeat_delay(interval, rand::random()));
                    let busy = sh.running.lock().unwrap().values().filter(|e| !e.finished).count() as u32;
                    write_msg(&mut send, &AgentMsg::Heartbeat(Heartbeat { busy }), max).await?;
                }
                _ = sh.drain.changed() => {}
                () = tokio::time::sleep_until(deadline) => {}
                Some(msg) = sh.outbox.recv() => {
                    write_msg(&mut send, &msg, max).await?;
                    if let AgentMsg::TaskDone { task, .. } | AgentMsg::TaskFailed { task, .. } | AgentMsg::Unfit { task, .. } = &msg {
                        let mut r = sh.running.lock().unwrap();
                        if r.get(task).is_some_and(|e| e.finished) {
                            r.remove(task);
                        }
                    }
                }
                msg = incoming.recv() => match msg.unwrap_or(Ok(None))? {
                    Some(CoordMsg::Assign(a)) if drain_at.is_some() => {
                        write_msg(&mut send, &AgentMsg::Release { task: a.task, attempt: a.attempt }, max).await?;
                    }
                    Some(CoordMsg::Assign(a)) => self.start(*a, sh),
                    Some(CoordMsg::Cancel { task, attempt }) => {
                        let mut r = sh.running.lock().unwrap();
                        if r.get(&task).is_some_and(|e| e.attempt == attempt && !e.finished) {
                            let e = r.remove(&task).expect("checked");
                            e.cancel.cancel();
                            tracing::info!(task, attempt, "task cancelled by the coordinator");
                        }
                    }
                    Some(CoordMsg::Refused { reason }) => return Err(SessionError::Refused(reason)),
                    Some(CoordMsg::Duplicate { address }) => tracing::warn!(
                        "another agent with this identity ({:?}) tried to connect to the coordinator from {address} \
                         and was refused: two agents are running with the same certificate; stop that one, or \
                         give it its own identity (`farm agent join --name NEW_NAME` on that machine)",
                        self.config.name
                    ),
                    Some(other) => tracing::debug!("ignoring {other:?}"),
                    None => return Err(SessionError::Closed),
                },
            }
        }
    }

    /// Ends the control stream and waits (briefly) for the coordinator to close the connection,
    /// which it does only after reading everything sent, so a last `Release` is never lost.
    async fn goodbye(conn: &quinn::Connection, send: &mut quinn::SendStream) {
        let _ = send.finish();
        let _ = tokio::time::timeout(Duration::from_secs(3), conn.closed()).await;
    }

    /// The drain limit is up: cancel what still runs and give it back to the coordinator.
    async fn hand_back(&self, send: &mut quinn::SendStream, sh: &mut Shared) -> Result<(), SessionError> {
        let max = self.config.max_frame_bytes;
        while let Ok(msg) = sh.outbox.try_recv() {
            write_msg(send, &msg, max).await?;
        }
        let left: Vec<(TaskId, Entry)> = sh.running.lock().unwrap().drain().collect();
        for (task, e) in left {
            e.cancel.cancel();
            if !e.finished {
                tracing::info!(task, "drain limit reached: handing the task back");
                write_msg(send, &AgentMsg::Release { task, attempt: e.attempt }, max).await?;
            }
        }
        Ok(())
    }

    fn start(&self, a: Assignment, sh: &Shared) {
        let conn = sh.conn.subscribe();
        let (task, attempt) = (a.task, a.attempt);
        tracing::info!(task, attempt, platform = %a.platform, emulated = a.emulated, "task assigned");
        let runner = self.runner.clone();
        let running = sh.running.clone();
        let out = sh.out.clone();
        let cancel = CancellationToken::new();
        running.lock().unwrap().insert(task, Entry { attempt, cancel: cancel.clone(), finished: false });
        tokio::spawn(async move {
            let msg = match runner.run(&a, &conn, &out, cancel).await {
                Ok((manifest, timings)) => {
                    tracing::info!(task, attempt, digest = %manifest.digest, "task succeeded");
                    AgentMsg::TaskDone { task, attempt, manifest, timings }
                }
                Err(TaskError::Builder(BuilderError::Cancelled)) => {
                    tracing::info!(task, attempt, "task stopped");
                    return;
                }
                Err(TaskError::NoSpace(error)) => {
                    tracing::warn!(task, attempt, "cannot run the task, handing it on: {error}");
                    AgentMsg::Unfit { task, attempt, error }
                }
                Err(e) => {
                    tracing::warn!(task, attempt, "task failed: {e}");
                    AgentMsg::TaskFailed { task, attempt, error: e.to_string() }
                }
            };
            let idle = {
                let mut r = running.lock().unwrap();
                if let Some(e) = r.get_mut(&task).filter(|e| e.attempt == attempt) {
                    e.finished = true;
                }
                r.values().all(|e| e.finished)
            };
            let _ = out.send(msg);
            if idle {
                runner.prune_if_idle().await;
            }
        });
    }
}
