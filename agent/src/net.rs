//! The agent's side of the connection: connect, hello, register, heartbeat; on any failure, back
//! off and do it again. The coordinator may restart or the Wi-Fi may drop at any moment, so a
//! lost session is routine, logged once per attempt, never fatal.

use std::future::Future;
use std::time::Duration;

use shared::client::{handshake, HandshakeError};
use shared::proto::io::{expect_msg, read_msg, write_msg};
use shared::proto::{AgentInfo, AgentMsg, CoordMsg, Heartbeat, ProtoError};
use shared::quic::QuicError;
use shared::tls::Credentials;

use crate::session::Backoff;
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

pub async fn run(config: &Config, creds: &Credentials, info: &AgentInfo, shutdown: impl Future<Output = ()>) {
    let mut backoff = Backoff::new(Duration::from_millis(200), config.reconnect_max);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => return,
            r = session(config, creds, info, &mut backoff) => {
                let e = r.unwrap_err();
                tracing::warn!(coordinator = %config.coordinator, "session ended: {e}");
            }
        }
        let delay = backoff.next(rand::random());
        tracing::info!(coordinator = %config.coordinator, "reconnecting in {:.1}s", delay.as_secs_f64());
        tokio::select! {
            () = &mut shutdown => return,
            () = tokio::time::sleep(delay) => {}
        }
    }
}

/// One session; returns only with the reason it ended. When the connection itself was closed
/// (a refused certificate, a coordinator going away), that reason is the one reported.
async fn session(
    config: &Config,
    creds: &Credentials,
    info: &AgentInfo,
    backoff: &mut Backoff,
) -> Result<(), SessionError> {
    let (_endpoint, conn) = shared::quic::connect(&config.coordinator, creds, &config.transport).await?;
    let err = registered(config, info, backoff, &conn).await.unwrap_err();
    Err(match conn.close_reason() {
        Some(reason) if !matches!(err, SessionError::Refused(_)) => {
            SessionError::Quic(QuicError::connection(config.coordinator.clone(), reason))
        }
        _ => err,
    })
}

async fn registered(
    config: &Config,
    info: &AgentInfo,
    backoff: &mut Backoff,
    conn: &quinn::Connection,
) -> Result<(), SessionError> {
    let max = config.max_frame_bytes;
    let (mut send, mut recv) = handshake(conn, max).await?;
    write_msg(&mut send, &AgentMsg::Register(info.clone()), max).await?;
    let interval = match expect_msg(&mut recv, max, "a registration answer").await? {
        CoordMsg::Registered { heartbeat_interval_ms } => Duration::from_millis(heartbeat_interval_ms.max(50)),
        CoordMsg::Refused { reason } => return Err(SessionError::Refused(reason)),
    };
    tracing::info!(coordinator = %config.coordinator, "registered as {:?}", config.name);
    backoff.reset();
    let mut beat = tokio::time::interval(interval);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = beat.tick() => {
                write_msg(&mut send, &AgentMsg::Heartbeat(Heartbeat { busy: 0 }), max).await?;
            }
            msg = read_msg::<CoordMsg, _>(&mut recv, max) => match msg? {
                Some(CoordMsg::Refused { reason }) => return Err(SessionError::Refused(reason)),
                Some(other) => tracing::debug!("ignoring {other:?}"),
                None => return Err(SessionError::Closed),
            },
        }
    }
}
