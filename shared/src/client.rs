//! The connecting side of a farm connection, shared by agents and the CLI: connect, prove the
//! version, then talk. Requests use one QUIC stream each, so a slow answer never blocks another.

use crate::proto::io::{expect_msg, write_msg};
use crate::proto::{Hello, HelloReply, ProtoError, Request, Response};
use crate::quic::{self, QuicError, TransportLimits};
use crate::tls::Credentials;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Quic(#[from] QuicError),
    #[error("coordinator at {target}: {source}")]
    Proto { target: String, source: ProtoError },
    #[error("coordinator at {target} answered with an error: {message}")]
    Remote { target: String, message: String },
}

/// Opens the connection's first stream and exchanges hellos. The stream stays open: agents use
/// it as their control stream, clients simply finish it.
pub async fn handshake(
    conn: &quinn::Connection,
    max_frame: usize,
) -> Result<(quinn::SendStream, quinn::RecvStream), HandshakeError> {
    let (mut send, mut recv) = conn.open_bi().await?;
    write_msg(&mut send, &Hello::ours(), max_frame).await?;
    let reply: HelloReply = expect_msg(&mut recv, max_frame, "a hello reply").await?;
    reply.into_result()?;
    Ok((send, recv))
}

#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error(transparent)]
    Connection(#[from] quinn::ConnectionError),
    #[error(transparent)]
    Proto(#[from] ProtoError),
}

/// A CLI's connection to its coordinator.
pub struct Client {
    target: String,
    _endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    max_frame: usize,
}

impl Client {
    pub async fn connect(
        target: &str,
        creds: &Credentials,
        limits: &TransportLimits,
        max_frame: usize,
    ) -> Result<Self, ClientError> {
        let (endpoint, conn) = quic::connect(target, creds, limits).await?;
        let (mut send, _recv) = handshake(&conn, max_frame).await.map_err(|e| match (e, conn.close_reason()) {
            (_, Some(reason)) | (HandshakeError::Connection(reason), None) => {
                QuicError::connection(target, reason).into()
            }
            (HandshakeError::Proto(source), None) => ClientError::Proto { target: target.into(), source },
        })?;
        let _ = send.finish();
        Ok(Self { target: target.into(), _endpoint: endpoint, conn, max_frame })
    }

    /// Sends one request and waits for its single response; `Response::Error` becomes an error.
    pub async fn request(&self, req: &Request) -> Result<Response, ClientError> {
        let target = || self.target.clone();
        let lost = |source| ClientError::from(QuicError::connection(target(), source));
        let (mut send, mut recv) = self.conn.open_bi().await.map_err(lost)?;
        // A stream error is reported as the connection's, when the connection is what failed.
        let proto = |source| match self.conn.close_reason() {
            Some(reason) => lost(reason),
            None => ClientError::Proto { target: target(), source },
        };
        write_msg(&mut send, req, self.max_frame).await.map_err(proto)?;
        let _ = send.finish();
        match expect_msg(&mut recv, self.max_frame, "a response").await.map_err(proto)? {
            Response::Error(message) => Err(ClientError::Remote { target: target(), message }),
            resp => Ok(resp),
        }
    }

    pub fn close(&self) {
        self.conn.close(0u32.into(), b"bye");
    }
}
