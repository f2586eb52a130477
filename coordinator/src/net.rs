//! Where QUIC connections become driver events. Every connection first proves its identity (the
//! TLS layer has already checked its certificate against the farm's CA), then passes the version
//! handshake, then is served by role: agents hold one control stream, clients open one stream per
//! request. A misbehaving connection only ever costs its own task.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use shared::proto::io::{expect_msg, read_msg, write_msg};
use shared::proto::{AgentMsg, Hello, HelloReply, ProtoError, Request, Response};
use shared::tls::{Identity, Role};
use tokio::sync::{mpsc, oneshot};

use crate::driver::{Event, Outbound};
use crate::fleet::ConnId;

/// How long a new connection may take to open its first stream and say hello.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Net {
    pub max_frame: usize,
    pub events: mpsc::Sender<Event>,
}

static NEXT_CONN: AtomicU64 = AtomicU64::new(1);

impl Net {
    pub async fn serve(&self, endpoint: quinn::Endpoint) {
        while let Some(incoming) = endpoint.accept().await {
            let conn_id = NEXT_CONN.fetch_add(1, Ordering::Relaxed);
            let peer = Peer { max_frame: self.max_frame, events: self.events.clone(), conn_id };
            tokio::spawn(async move {
                let remote = incoming.remote_address();
                if let Err(e) = peer.handle(incoming).await {
                    tracing::warn!(%remote, "connection ended: {e}");
                }
            });
        }
    }
}

struct Peer {
    max_frame: usize,
    events: mpsc::Sender<Event>,
    conn_id: ConnId,
}

#[derive(Debug, thiserror::Error)]
enum PeerError {
    #[error("TLS handshake failed: {0}")]
    Handshake(quinn::ConnectionError),
    #[error("{0}")]
    Quic(#[from] shared::quic::QuicError),
    #[error("{0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("{0}")]
    Proto(#[from] ProtoError),
    #[error("no hello within {0:?}")]
    HandshakeTimeout(Duration),
    #[error("{0}")]
    Refused(String),
}

impl Peer {
    async fn handle(self, incoming: quinn::Incoming) -> Result<(), PeerError> {
        let conn = incoming.await.map_err(PeerError::Handshake)?;
        let identity = shared::quic::peer_identity(&conn)?;
        let address = conn.remote_address().to_string();
        let (mut send, mut recv) = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
            let (mut send, mut recv) = conn.accept_bi().await?;
            let hello: Hello = expect_msg(&mut recv, self.max_frame, "a hello").await?;
            let reply = HelloReply::to(&hello);
            write_msg(&mut send, &reply, self.max_frame).await?;
            if !reply.accepted {
                let _ = send.finish();
                return Err(PeerError::Refused(format!(
                    "{} {:?} refused: {}",
                    identity.role, identity.name, reply.message
                )));
            }
            Ok::<_, PeerError>((send, recv))
        })
        .await
        .map_err(|_| PeerError::HandshakeTimeout(HANDSHAKE_TIMEOUT))??;

        match identity.role {
            Role::Agent => self.agent(conn, identity, address, &mut send, &mut recv).await,
            Role::Client | Role::Admin => {
                let _ = send.finish();
                self.client(conn, identity).await
            }
            Role::Coordinator => {
                conn.close(1u32.into(), b"a coordinator certificate cannot connect to a coordinator");
                Err(PeerError::Refused(format!("peer {:?} presented a coordinator certificate", identity.name)))
            }
        }
    }

    /// One agent's control stream: registration, then heartbeats up and commands down.
    async fn agent(
        &self,
        conn: quinn::Connection,
        identity: Identity,
        address: String,
        send: &mut quinn::SendStream,
        recv: &mut quinn::RecvStream,
    ) -> Result<(), PeerError> {
        let name = identity.name;
        let info = match expect_msg(recv, self.max_frame, "a registration").await? {
            AgentMsg::Register(info) => info,
            other => {
                return Err(PeerError::Proto(ProtoError::Unexpected {
                    expected: "Register",
                    got: format!("{other:?}"),
                }));
            }
        };
        let (link, mut outbound) = mpsc::channel(64);
        let conn_id = self.conn_id;
        let up = Event::AgentUp { name: name.clone(), conn: conn_id, address, info, link };
        if self.events.send(up).await.is_err() {
            return Ok(());
        }
        let result = loop {
            tokio::select! {
                msg = read_msg::<AgentMsg, _>(recv, self.max_frame) => match msg {
                    Ok(Some(msg)) => {
                        if self.events.send(Event::Agent { name: name.clone(), conn: conn_id, msg }).await.is_err() {
                            break Ok(());
                        }
                    }
                    Ok(None) => break Ok(()),
                    Err(e) => break Err(e.into()),
                },
                out = outbound.recv() => match out {
                    Some(Outbound::Send(msg)) => {
                        if let Err(e) = write_msg(send, &msg, self.max_frame).await {
                            break Err(e.into());
                        }
                    }
                    Some(Outbound::Close(reason)) => {
                        conn.close(2u32.into(), reason.as_bytes());
                        break Ok(());
                    }
                    None => break Ok(()),
                },
            }
        };
        let _ = self.events.send(Event::AgentDown { name, conn: conn_id }).await;
        result
    }

    /// A client opens one bi-stream per request.
    async fn client(&self, conn: quinn::Connection, identity: Identity) -> Result<(), PeerError> {
        loop {
            let (mut send, mut recv) = match conn.accept_bi().await {
                Ok(s) => s,
                Err(quinn::ConnectionError::ApplicationClosed(_) | quinn::ConnectionError::LocallyClosed) => {
                    return Ok(())
                }
                Err(e) => return Err(e.into()),
            };
            let events = self.events.clone();
            let peer = identity.clone();
            let max = self.max_frame;
            tokio::spawn(async move {
                let result = async {
                    let req: Request = expect_msg(&mut recv, max, "a request").await?;
                    let (reply, rx) = oneshot::channel();
                    let resp = match events.send(Event::Request { peer, req, reply }).await {
                        Ok(()) => rx.await.unwrap_or_else(|_| Response::Error("coordinator is shutting down".into())),
                        Err(_) => Response::Error("coordinator is shutting down".into()),
                    };
                    write_msg(&mut send, &resp, max).await?;
                    let _ = send.finish();
                    Ok::<_, ProtoError>(())
                }
                .await;
                if let Err(e) = result {
                    tracing::debug!("request stream failed: {e}");
                }
            });
        }
    }
}
