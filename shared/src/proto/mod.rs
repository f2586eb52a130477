//! The only types that cross the wire, and how they are framed.
//!
//! Every message is a postcard-encoded value behind a 4-byte big-endian length, with a hard maximum
//! so that a peer can never make us buffer more than we agreed to. Framing ([`frame`]) is pure, so
//! round trips, truncation, oversize and garbage are unit-tested without sockets; [`io`] is the thin
//! async layer over any `AsyncRead`/`AsyncWrite` (quinn streams in production, in-memory pipes in
//! tests).
//!
//! The first exchange on every connection is the [`handshake`]: its two types are frozen, so that
//! peers of different versions can always read each other's `Hello` and refuse with a message that
//! names both versions instead of misreading bytes.

pub mod frame;
pub mod handshake;
pub mod io;
pub mod msg;

pub use frame::{decode, encode, FrameDecoder, DEFAULT_MAX_FRAME};
pub use handshake::{Hello, HelloReply, PROTOCOL_VERSION};
pub use msg::*;

/// What can go wrong between two farm peers at the protocol level.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error("frame of {size} bytes exceeds the limit of {max} bytes (config key `max_frame_bytes`)")]
    FrameTooLarge { size: usize, max: usize },
    #[error("connection ended in the middle of a frame ({got} of {expected} bytes received)")]
    Truncated { expected: usize, got: usize },
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("could not encode message: {0}")]
    Encode(String),
    #[error("the peer is not speaking the farm protocol (bad handshake magic)")]
    NotFarm,
    #[error(
        "protocol version mismatch: this is farm {our_farm} speaking protocol {ours}, the peer is farm \
         {their_farm} speaking protocol {theirs}; run the same farm release on both sides"
    )]
    VersionMismatch { ours: u32, our_farm: String, theirs: u32, their_farm: String },
    #[error("refused by the peer: {0}")]
    Refused(String),
    #[error("the peer closed the stream before sending {0}")]
    Closed(&'static str),
    #[error("unexpected message: expected {expected}, got {got}")]
    Unexpected { expected: &'static str, got: String },
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}
