//! Length-prefixed frames: `u32` big-endian length, then a postcard payload.
//!
//! The length is checked against the limit before a single payload byte is buffered, so an
//! oversize or hostile length costs nothing.

use serde::{de::DeserializeOwned, Serialize};

use super::ProtoError;

/// Default ceiling for one frame (4 MiB): large enough for a 10,000-file context manifest,
/// small enough that a peer cannot make us allocate much. Configurable per side.
pub const DEFAULT_MAX_FRAME: usize = 4 << 20;

const HEADER: usize = 4;

/// Encodes `msg` as one frame (header + payload), refusing to produce a frame over `max`.
pub fn encode<T: Serialize>(msg: &T, max: usize) -> Result<Vec<u8>, ProtoError> {
    let mut out = postcard::to_extend(msg, vec![0u8; HEADER]).map_err(|e| ProtoError::Encode(e.to_string()))?;
    let size = out.len() - HEADER;
    if size > max {
        return Err(ProtoError::FrameTooLarge { size, max });
    }
    out[..HEADER].copy_from_slice(&(size as u32).to_be_bytes());
    Ok(out)
}

/// Decodes one payload (without its header) into a message. Trailing bytes are refused: a
/// payload that decodes to a value but has bytes left over was not written by a farm peer.
pub fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<T, ProtoError> {
    let (value, rest) = postcard::take_from_bytes(payload).map_err(|e| ProtoError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(ProtoError::Malformed(format!("{} unexpected trailing bytes", rest.len())));
    }
    Ok(value)
}

/// Reads the payload length from a frame header.
pub fn payload_len(header: [u8; HEADER], max: usize) -> Result<usize, ProtoError> {
    let size = u32::from_be_bytes(header) as usize;
    if size > max {
        return Err(ProtoError::FrameTooLarge { size, max });
    }
    Ok(size)
}

/// Incremental decoder: push bytes as they arrive, pull whole frames out.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    max: usize,
}

impl FrameDecoder {
    pub fn new(max: usize) -> Self {
        Self { buf: Vec::new(), max }
    }

    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete payload, `None` if more bytes are needed, an error if the header
    /// announces a frame over the limit.
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>, ProtoError> {
        let Some(header) = self.buf.first_chunk::<HEADER>() else { return Ok(None) };
        let size = payload_len(*header, self.max)?;
        if self.buf.len() < HEADER + size {
            return Ok(None);
        }
        let payload = self.buf[HEADER..HEADER + size].to_vec();
        self.buf.drain(..HEADER + size);
        Ok(Some(payload))
    }

    /// Call at end of input: leftover bytes mean the peer stopped mid-frame.
    pub fn finish(&self) -> Result<(), ProtoError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let expected = match self.buf.first_chunk::<HEADER>() {
            Some(h) => HEADER.saturating_add(u32::from_be_bytes(*h) as usize),
            None => HEADER,
        };
        Err(ProtoError::Truncated { expected, got: self.buf.len() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::msg::{AgentMsg, Heartbeat, Request};

    #[test]
    fn round_trip_through_decoder_in_small_pieces() {
        let msgs = vec![AgentMsg::Heartbeat(Heartbeat { busy: 1 }), AgentMsg::Heartbeat(Heartbeat { busy: 7 })];
        let mut wire = Vec::new();
        for m in &msgs {
            wire.extend(encode(m, DEFAULT_MAX_FRAME).unwrap());
        }
        let mut dec = FrameDecoder::new(DEFAULT_MAX_FRAME);
        let mut got = Vec::new();
        for chunk in wire.chunks(3) {
            dec.push(chunk);
            while let Some(p) = dec.next_frame().unwrap() {
                got.push(decode::<AgentMsg>(&p).unwrap());
            }
        }
        dec.finish().unwrap();
        assert_eq!(got, msgs);
    }

    #[test]
    fn oversize_frame_refused_on_encode_and_on_header() {
        let big = Request::Echo("x".repeat(100));
        assert!(matches!(encode(&big, 50), Err(ProtoError::FrameTooLarge { max: 50, .. })));
        let mut dec = FrameDecoder::new(16);
        dec.push(&1000u32.to_be_bytes());
        let err = dec.next_frame().unwrap_err();
        assert!(matches!(err, ProtoError::FrameTooLarge { size: 1000, max: 16 }));
        assert!(err.to_string().contains("max_frame_bytes"), "{err}");
    }

    #[test]
    fn truncated_frame_refused() {
        let wire = encode(&Request::Echo("hello".into()), DEFAULT_MAX_FRAME).unwrap();
        let mut dec = FrameDecoder::new(DEFAULT_MAX_FRAME);
        dec.push(&wire[..wire.len() - 2]);
        assert!(dec.next_frame().unwrap().is_none());
        assert!(matches!(dec.finish(), Err(ProtoError::Truncated { got, .. }) if got == wire.len() - 2));
        let mut dec = FrameDecoder::new(DEFAULT_MAX_FRAME);
        dec.push(&[0, 0]);
        assert!(matches!(dec.finish(), Err(ProtoError::Truncated { expected: 4, got: 2 })));
        // A maximal length header, then the end: no overflow (32-bit agents), just truncation.
        let mut dec = FrameDecoder::new(DEFAULT_MAX_FRAME);
        dec.push(&[0xff; 4]);
        assert!(matches!(dec.finish(), Err(ProtoError::Truncated { got: 4, .. })));
    }

    #[test]
    fn garbage_refused_without_panic() {
        // A deterministic pseudo-random sweep: no input may panic; each either decodes or errors.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for len in 0..400usize {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            let _ = decode::<AgentMsg>(&bytes);
            let _ = decode::<Request>(&bytes);
            let _ = decode::<crate::proto::Hello>(&bytes);
            let mut dec = FrameDecoder::new(1024);
            dec.push(&bytes);
            while let Ok(Some(p)) = dec.next_frame() {
                let _ = decode::<AgentMsg>(&p);
            }
        }
        assert!(decode::<AgentMsg>(&[0xff, 0xff, 0xff]).is_err());
    }

    #[test]
    fn trailing_bytes_refused() {
        let wire = encode(&Request::Echo("a".into()), DEFAULT_MAX_FRAME).unwrap();
        let mut payload = wire[4..].to_vec();
        payload.push(0);
        assert!(matches!(decode::<Request>(&payload), Err(ProtoError::Malformed(m)) if m.contains("trailing")));
    }
}
