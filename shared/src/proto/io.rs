//! Frames over any async byte stream. Kept generic so tests drive it with in-memory pipes and
//! production with quinn streams, and so that no other module needs to know the frame layout.

use serde::{de::DeserializeOwned, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{frame, ProtoError};

/// Reads one frame's payload. `Ok(None)` when the stream ended cleanly between frames.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R, max: usize) -> Result<Option<Vec<u8>>, ProtoError> {
    let mut header = [0u8; 4];
    let mut got = 0;
    while got < header.len() {
        let n = r.read(&mut header[got..]).await?;
        if n == 0 {
            return if got == 0 { Ok(None) } else { Err(ProtoError::Truncated { expected: 4, got }) };
        }
        got += n;
    }
    let size = frame::payload_len(header, max)?;
    let mut payload = vec![0u8; size];
    let mut got = 0;
    while got < size {
        let n = r.read(&mut payload[got..]).await?;
        if n == 0 {
            return Err(ProtoError::Truncated { expected: 4 + size, got: 4 + got });
        }
        got += n;
    }
    Ok(Some(payload))
}

/// Reads one message; `Ok(None)` at a clean end of stream.
pub async fn read_msg<T: DeserializeOwned, R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
) -> Result<Option<T>, ProtoError> {
    match read_frame(r, max).await? {
        Some(payload) => frame::decode(&payload).map(Some),
        None => Ok(None),
    }
}

/// Reads one message where the stream must not end; `what` names it in the error.
pub async fn expect_msg<T: DeserializeOwned, R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
    what: &'static str,
) -> Result<T, ProtoError> {
    read_msg(r, max).await?.ok_or(ProtoError::Closed(what))
}

pub async fn write_msg<T: Serialize, W: AsyncWrite + Unpin>(w: &mut W, msg: &T, max: usize) -> Result<(), ProtoError> {
    let bytes = frame::encode(msg, max)?;
    w.write_all(&bytes).await?;
    Ok(())
}

/// Copies exactly `size` raw bytes that follow a frame (a blob's contents) into `sink`.
pub async fn read_raw<R: AsyncRead + Unpin>(
    r: &mut R,
    size: u64,
    sink: &mut impl std::io::Write,
) -> Result<(), ProtoError> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = size;
    while left > 0 {
        let want = buf.len().min(left as usize);
        let n = r.read(&mut buf[..want]).await?;
        if n == 0 {
            return Err(ProtoError::Truncated { expected: size as usize, got: (size - left) as usize });
        }
        sink.write_all(&buf[..n])?;
        left -= n as u64;
    }
    Ok(())
}

/// Copies exactly `size` bytes from `source` to `w`, failing if the source is shorter (a file
/// that changed since it was hashed).
pub async fn write_raw<W: AsyncWrite + Unpin, S: AsyncRead + Unpin>(
    w: &mut W,
    source: &mut S,
    size: u64,
) -> Result<(), ProtoError> {
    let copied = tokio::io::copy(&mut source.take(size), w).await?;
    if copied != size {
        return Err(ProtoError::Truncated { expected: size as usize, got: copied as usize });
    }
    Ok(())
}

/// Reads messages from `r` on a task of its own and hands them over a channel. A read raced
/// against timers in `select!` would lose the bytes of a half-read frame when another branch
/// wins; a channel receive loses nothing. The channel closes after the end of the stream, which
/// is sent as `Ok(None)`, or after the first error. Drop the handle to stop reading.
pub fn reader<T, R>(mut r: R, max: usize) -> (Incoming<T>, ReaderHandle)
where
    T: DeserializeOwned + Send + 'static,
    R: AsyncRead + Unpin + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let task = tokio::spawn(async move {
        loop {
            let msg = read_msg(&mut r, max).await;
            let last = !matches!(msg, Ok(Some(_)));
            if tx.send(Box::new(msg)).await.is_err() || last {
                return;
            }
        }
    });
    (Incoming(rx), ReaderHandle(task))
}

/// The receiving end of [`reader`]. Messages travel boxed: a channel allocates its slots in
/// blocks of 32 of the item's size, and a coordinator holds one per agent connection, so an
/// unboxed 150-byte message would cost every idle agent 5 KiB.
pub struct Incoming<T>(tokio::sync::mpsc::Receiver<Box<Result<Option<T>, ProtoError>>>);

impl<T> Incoming<T> {
    /// The next message; `None` once the reader has stopped (after the end or an error).
    pub async fn recv(&mut self) -> Option<Result<Option<T>, ProtoError>> {
        self.0.recv().await.map(|b| *b)
    }
}

/// Stops the reader task when dropped.
pub struct ReaderHandle(tokio::task::JoinHandle<()>);

impl Drop for ReaderHandle {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Relays raw bytes both ways between two byte streams (`a_in`→`b_out` and `b_in`→`a_out`) until
/// both directions have ended; an end of stream on one side is passed on as a shutdown (a QUIC
/// finish) of the other. A failed direction ends the relay at once: dropping the streams resets
/// them, so a peer that went away never leaves the other side waiting. Returns the bytes moved
/// each way.
pub async fn splice<A, B, C, D>(mut a_in: A, mut a_out: B, mut b_in: C, mut b_out: D) -> std::io::Result<(u64, u64)>
where
    A: AsyncRead + Unpin,
    B: AsyncWrite + Unpin,
    C: AsyncRead + Unpin,
    D: AsyncWrite + Unpin,
{
    let there = async {
        let n = tokio::io::copy(&mut a_in, &mut b_out).await?;
        b_out.shutdown().await?;
        Ok::<_, std::io::Error>(n)
    };
    let back = async {
        let n = tokio::io::copy(&mut b_in, &mut a_out).await?;
        a_out.shutdown().await?;
        Ok::<_, std::io::Error>(n)
    };
    tokio::try_join!(there, back)
}

#[cfg(test)]
mod splice_tests {
    use super::*;

    #[tokio::test]
    async fn splice_relays_both_ways_and_passes_on_the_end() {
        let (mut a, a_far) = tokio::io::duplex(64);
        let (mut b, b_far) = tokio::io::duplex(64);
        let (ar, aw) = tokio::io::split(a_far);
        let (br, bw) = tokio::io::split(b_far);
        let relay = tokio::spawn(splice(ar, aw, br, bw));
        a.write_all(b"request").await.unwrap();
        a.shutdown().await.unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 7];
        b.read_exact(&mut buf).await.unwrap();
        got.extend_from_slice(&buf);
        b.write_all(b"answer!").await.unwrap();
        b.shutdown().await.unwrap();
        let mut back = Vec::new();
        a.read_to_end(&mut back).await.unwrap();
        assert_eq!((got.as_slice(), back.as_slice()), (&b"request"[..], &b"answer!"[..]));
        assert_eq!(relay.await.unwrap().unwrap(), (7, 7));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::msg::Request;

    #[tokio::test]
    async fn messages_cross_a_pipe() {
        let (mut a, mut b) = tokio::io::duplex(64);
        let writer = tokio::spawn(async move {
            for i in 0..50 {
                write_msg(&mut a, &Request::Echo(format!("message {i} {}", "x".repeat(i))), 1024).await.unwrap();
            }
        });
        for i in 0..50 {
            let got: Request = expect_msg(&mut b, 1024, "an echo").await.unwrap();
            assert_eq!(got, Request::Echo(format!("message {i} {}", "x".repeat(i))));
        }
        writer.await.unwrap();
        assert!(read_msg::<Request, _>(&mut b, 1024).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn truncated_and_oversize_streams_refused() {
        let wire = crate::proto::encode(&Request::Echo("hello".into()), 1024).unwrap();
        let mut short = &wire[..wire.len() - 1];
        assert!(matches!(read_frame(&mut short, 1024).await, Err(ProtoError::Truncated { .. })));
        let mut header_only = &wire[..2];
        assert!(matches!(read_frame(&mut header_only, 1024).await, Err(ProtoError::Truncated { expected: 4, got: 2 })));
        let mut big = &wire[..];
        assert!(matches!(read_frame(&mut big, 3).await, Err(ProtoError::FrameTooLarge { .. })));
        let mut empty: &[u8] = &[];
        assert!(matches!(
            expect_msg::<Request, _>(&mut empty, 1024, "a request").await,
            Err(ProtoError::Closed("a request"))
        ));
    }
}
