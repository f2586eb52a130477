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
//!
//! Which tasks are held, and the drain, are decided by `session::Tasks` (pure, behind one lock);
//! this module only does what it returns.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shared::client::{handshake, HandshakeError};
use shared::proto::io::{reader, write_msg};
use shared::proto::{AgentInfo, AgentMsg, Assignment, CoordMsg, Heartbeat, ProtoError};
use shared::quic::QuicError;
use shared::tls::Credentials;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::builder::BuilderError;
use crate::session::{Assigned, Backoff, DrainStep};
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

/// Tasks this agent holds (each with what cancels it) and its drain limit.
type Tasks = Arc<Mutex<crate::session::Tasks<CancellationToken, Instant>>>;

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
    tasks: Tasks,
    out: mpsc::UnboundedSender<AgentMsg>,
    outbox: mpsc::UnboundedReceiver<AgentMsg>,
    /// Changes when the drain starts (the limit itself is in `tasks`).
    drain: watch::Receiver<()>,
}

impl Agent<'_> {
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send + 'static) {
        let mut backoff = Backoff::new(Duration::from_millis(200), self.config.reconnect_max);
        let (drain_tx, drain) = watch::channel(());
        let limit = self.config.drain_timeout;
        let tasks = Tasks::default();
        let draining = tasks.clone();
        tokio::spawn(async move {
            shutdown.await;
            tracing::info!("shutting down: finishing running tasks (drain limit {} s)", limit.as_secs());
            draining.lock().unwrap().drain(Instant::now() + limit);
            drain_tx.send_replace(());
        });
        let (out, outbox) = mpsc::unbounded_channel();
        let mut sh = Shared { conn: watch::channel(None).0, tasks, out, outbox, drain };
        loop {
            match self.session(&mut backoff, &mut sh).await {
                Ok(Ended::Drained) => break,
                Err(e) => tracing::warn!(coordinator = %self.config.coordinator, "session ended: {e}"),
            }
            if sh.tasks.lock().unwrap().done_draining(Instant::now()) {
                break;
            }
            let delay = backoff.next(rand::random());
            tracing::info!(coordinator = %self.config.coordinator, "reconnecting in {:.1}s", delay.as_secs_f64());
            tokio::time::sleep(delay).await;
        }
        let stop = sh.tasks.lock().unwrap().stop_all();
        for cancel in stop {
            cancel.cancel();
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
        let held = sh.tasks.lock().unwrap().reconnected();
        write_msg(&mut send, &AgentMsg::Holding(held), max).await?;
        tracing::info!(coordinator = %self.config.coordinator, "registered as {:?}", self.config.name);
        sh.conn.send_replace(Some(shared::client::Link::new(conn.clone(), max)));
        backoff.reset();
        let beat = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(beat);
        let mut told_draining = false;
        loop {
            let step = sh.tasks.lock().unwrap().drain_step(Instant::now());
            if step != DrainStep::No && !told_draining {
                write_msg(&mut send, &AgentMsg::Draining, max).await?;
                told_draining = true;
            }
            let deadline = match step {
                DrainStep::No => Instant::now() + Duration::from_secs(3600),
                DrainStep::Wait(limit) => limit,
                DrainStep::Finished => {
                    Self::goodbye(conn, &mut send).await;
                    return Ok(Ended::Drained);
                }
                DrainStep::LimitReached => {
                    self.hand_back(&mut send, sh).await?;
                    Self::goodbye(conn, &mut send).await;
                    return Ok(Ended::Drained);
                }
            };
            tokio::select! {
                () = &mut beat => {
                    beat.as_mut().reset(tokio::time::Instant::now() + crate::session::heartbeat_delay(interval, rand::random()));
                    let busy = sh.tasks.lock().unwrap().busy();
                    write_msg(&mut send, &AgentMsg::Heartbeat(Heartbeat { busy }), max).await?;
                }
                _ = sh.drain.changed() => {}
                () = tokio::time::sleep_until(deadline) => {}
                Some(msg) = sh.outbox.recv() => {
                    write_msg(&mut send, &msg, max).await?;
                    if let AgentMsg::TaskDone { task, attempt, .. }
                    | AgentMsg::TaskFailed { task, attempt, .. }
                    | AgentMsg::Unfit { task, attempt, .. } = &msg
                    {
                        sh.tasks.lock().unwrap().sent(*task, *attempt);
                    }
                }
                msg = incoming.recv() => match msg.unwrap_or(Ok(None))? {
                    Some(CoordMsg::Assign(a)) => {
                        let cancel = CancellationToken::new();
                        let assigned = sh.tasks.lock().unwrap().assigned(a.task, a.attempt, cancel.clone());
                        match assigned {
                            Assigned::Start => self.start(*a, cancel, sh),
                            Assigned::Refuse => {
                                // The drain may have begun since the top of the loop: the
                                // coordinator hears of it first, so it does not assign it here again.
                                if !told_draining {
                                    write_msg(&mut send, &AgentMsg::Draining, max).await?;
                                    told_draining = true;
                                }
                                write_msg(&mut send, &AgentMsg::Release { task: a.task, attempt: a.attempt }, max).await?;
                            }
                        }
                    }
                    Some(CoordMsg::Cancel { task, attempt }) => {
                        let stop = sh.tasks.lock().unwrap().cancelled(task, attempt);
                        if let Some(cancel) = stop {
                            cancel.cancel();
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
        let back = sh.tasks.lock().unwrap().hand_back();
        for cancel in back.stop {
            cancel.cancel();
        }
        for held in back.release {
            tracing::info!(task = held.task, "drain limit reached: handing the task back");
            write_msg(send, &AgentMsg::Release { task: held.task, attempt: held.attempt }, max).await?;
        }
        Ok(())
    }

    /// Runs an assignment `Tasks` has taken (`Assigned::Start`), stopped by `cancel`.
    fn start(&self, a: Assignment, cancel: CancellationToken, sh: &Shared) {
        let conn = sh.conn.subscribe();
        let (task, attempt) = (a.task, a.attempt);
        tracing::info!(task, attempt, platform = %a.platform, emulated = a.emulated, "task assigned");
        let runner = self.runner.clone();
        let tasks = sh.tasks.clone();
        let out = sh.out.clone();
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
            let idle = tasks.lock().unwrap().finished(task, attempt);
            let _ = out.send(msg);
            if idle {
                runner.prune_if_idle().await;
            }
        });
    }
}
