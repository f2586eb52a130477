//! The agent's side of the connection: connect, hello, register, heartbeat, run what it is
//! assigned; on any failure, back off and do it again. The coordinator may restart or the Wi-Fi
//! may drop at any moment, so a lost session is routine, logged once per attempt, never fatal.
//!
//! Tasks outlive sessions: their messages queue in one channel that whichever session is current
//! drains, and the coordinator's fencing discards what has become stale.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shared::client::{handshake, HandshakeError};
use shared::proto::io::{expect_msg, read_msg, write_msg};
use shared::proto::{AgentInfo, AgentMsg, Assignment, CoordMsg, Heartbeat, ProtoError, TaskId};
use shared::quic::QuicError;
use shared::tls::Credentials;
use tokio::sync::mpsc;

use crate::session::Backoff;
use crate::task::Runner;
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

/// Tasks this agent is running, by id: (attempt, handle to stop it).
type Running = Arc<Mutex<HashMap<TaskId, (u32, tokio::task::AbortHandle)>>>;

pub(crate) struct Agent<'a> {
    pub config: &'a Config,
    pub creds: &'a Credentials,
    pub info: &'a AgentInfo,
    pub runner: Arc<Runner>,
}

impl Agent<'_> {
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let mut backoff = Backoff::new(Duration::from_millis(200), self.config.reconnect_max);
        let running: Running = Arc::default();
        let (out, mut outbox) = mpsc::unbounded_channel();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                r = self.session(&mut backoff, &running, &out, &mut outbox) => {
                    let e = r.unwrap_err();
                    tracing::warn!(coordinator = %self.config.coordinator, "session ended: {e}");
                }
            }
            let delay = backoff.next(rand::random());
            tracing::info!(coordinator = %self.config.coordinator, "reconnecting in {:.1}s", delay.as_secs_f64());
            tokio::select! {
                () = &mut shutdown => break,
                () = tokio::time::sleep(delay) => {}
            }
        }
        for (_, (_, handle)) in running.lock().unwrap().drain() {
            handle.abort();
        }
    }

    /// One session; returns only with the reason it ended. When the connection itself was closed
    /// (a refused certificate, a coordinator going away), that reason is the one reported.
    async fn session(
        &self,
        backoff: &mut Backoff,
        running: &Running,
        out: &mpsc::UnboundedSender<AgentMsg>,
        outbox: &mut mpsc::UnboundedReceiver<AgentMsg>,
    ) -> Result<(), SessionError> {
        let config = self.config;
        let (_endpoint, conn) = shared::quic::connect(&config.coordinator, self.creds, &config.transport).await?;
        let err = self.registered(backoff, &conn, running, out, outbox).await.unwrap_err();
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
        running: &Running,
        out: &mpsc::UnboundedSender<AgentMsg>,
        outbox: &mut mpsc::UnboundedReceiver<AgentMsg>,
    ) -> Result<(), SessionError> {
        let max = self.config.max_frame_bytes;
        let (mut send, mut recv) = handshake(conn, max).await?;
        write_msg(&mut send, &AgentMsg::Register(self.info.clone()), max).await?;
        let interval = match expect_msg(&mut recv, max, "a registration answer").await? {
            CoordMsg::Registered { heartbeat_interval_ms } => Duration::from_millis(heartbeat_interval_ms.max(50)),
            CoordMsg::Refused { reason } => return Err(SessionError::Refused(reason)),
            other => return Err(ProtoError::Unexpected { expected: "Registered", got: format!("{other:?}") }.into()),
        };
        tracing::info!(coordinator = %self.config.coordinator, "registered as {:?}", self.config.name);
        backoff.reset();
        let mut beat = tokio::time::interval(interval);
        beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = beat.tick() => {
                    let busy = running.lock().unwrap().len() as u32;
                    write_msg(&mut send, &AgentMsg::Heartbeat(Heartbeat { busy }), max).await?;
                }
                Some(msg) = outbox.recv() => write_msg(&mut send, &msg, max).await?,
                msg = read_msg::<CoordMsg, _>(&mut recv, max) => match msg? {
                    Some(CoordMsg::Assign(a)) => self.start(*a, conn.clone(), running, out.clone()),
                    Some(CoordMsg::Cancel { task, attempt }) => {
                        let mut r = running.lock().unwrap();
                        if r.get(&task).is_some_and(|(a, _)| *a == attempt) {
                            let (_, handle) = r.remove(&task).expect("checked");
                            handle.abort();
                            tracing::info!(task, attempt, "task cancelled by the coordinator");
                        }
                    }
                    Some(CoordMsg::Refused { reason }) => return Err(SessionError::Refused(reason)),
                    Some(other) => tracing::debug!("ignoring {other:?}"),
                    None => return Err(SessionError::Closed),
                },
            }
        }
    }

    fn start(&self, a: Assignment, conn: quinn::Connection, running: &Running, out: mpsc::UnboundedSender<AgentMsg>) {
        let (task, attempt) = (a.task, a.attempt);
        tracing::info!(task, attempt, platform = %a.platform, emulated = a.emulated, "task assigned");
        let runner = self.runner.clone();
        let done = running.clone();
        let handle = tokio::spawn(async move {
            let msg = match runner.run(&a, &conn, &out).await {
                Ok(manifest) => {
                    tracing::info!(task, attempt, digest = %manifest.digest, "task succeeded");
                    AgentMsg::TaskDone { task, attempt, manifest }
                }
                Err(e) => {
                    tracing::warn!(task, attempt, "task failed: {e}");
                    AgentMsg::TaskFailed { task, attempt, error: e.to_string() }
                }
            };
            done.lock().unwrap().remove(&task);
            let _ = out.send(msg);
        });
        running.lock().unwrap().insert(task, (attempt, handle.abort_handle()));
    }
}
