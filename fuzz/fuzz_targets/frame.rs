//! `FrameDecoder` fed an arbitrary byte stream in arbitrary chunks, with frames pulled at arbitrary
//! points. Whatever the chunking, it must yield exactly the frames (and the error, or the truncation
//! reported by `finish`) that a one-shot reference parse of the whole stream yields; every payload is
//! then decoded as each message type (`frame::decode`), and what decodes must round-trip.

#![no_main]

use std::fmt::Debug;

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use serde::{de::DeserializeOwned, Serialize};
use shared::proto::{
    frame, AgentMsg, CoordMsg, FrameDecoder, Hello, HelloReply, ProtoError, Request, Response, DEFAULT_MAX_FRAME,
};

#[derive(Debug, Arbitrary)]
struct Plan {
    /// `None`: the default limit; otherwise a small one, so that oversize headers are common.
    max: Option<u16>,
    /// Chunk lengths and whether to pull frames after pushing each chunk; the rest of the stream is
    /// pushed in one go at the end.
    chunks: Vec<(u8, bool)>,
}

/// The reference: the whole stream parsed at once.
struct Expected {
    frames: Vec<Vec<u8>>,
    /// The oversize size announced by the first bad header, if any.
    too_large: Option<usize>,
    leftover: Vec<u8>,
}

fn reference(stream: &[u8], max: usize) -> Expected {
    let mut frames = Vec::new();
    let mut rest = stream;
    loop {
        if rest.len() < 4 {
            return Expected { frames, too_large: None, leftover: rest.to_vec() };
        }
        let size = u32::from_be_bytes(rest[..4].try_into().unwrap()) as usize;
        if size > max {
            return Expected { frames, too_large: Some(size), leftover: rest.to_vec() };
        }
        if rest.len() < 4 + size {
            return Expected { frames, too_large: None, leftover: rest.to_vec() };
        }
        frames.push(rest[4..4 + size].to_vec());
        rest = &rest[4 + size..];
    }
}

/// Pulls every complete frame; `Err` on the first error.
fn drain(dec: &mut FrameDecoder, out: &mut Vec<Vec<u8>>) -> Result<(), ProtoError> {
    while let Some(p) = dec.next_frame()? {
        out.push(p);
    }
    Ok(())
}

fn round_trip<T: Serialize + DeserializeOwned + PartialEq + Debug>(payload: &[u8]) {
    let Ok(msg) = frame::decode::<T>(payload) else { return };
    let wire = frame::encode(&msg, usize::MAX).expect("a decoded frame re-encodes");
    let mut dec = FrameDecoder::new(usize::MAX);
    dec.push(&wire);
    let again = dec.next_frame().expect("own frame within the limit").expect("own frame complete");
    dec.finish().expect("nothing left over");
    assert_eq!(frame::decode::<T>(&again).expect("own frame decodes"), msg);
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let Ok(plan) = Plan::arbitrary(&mut u) else { return };
    let stream = u.take_rest();
    let max = plan.max.map_or(DEFAULT_MAX_FRAME, usize::from);
    let expected = reference(stream, max);

    let mut dec = FrameDecoder::new(max);
    let mut got = Vec::new();
    let mut result = Ok(());
    let mut at = 0;
    for (len, pull) in plan.chunks {
        let end = (at + usize::from(len)).min(stream.len());
        dec.push(&stream[at..end]);
        at = end;
        if pull {
            result = drain(&mut dec, &mut got);
            if result.is_err() {
                break;
            }
        }
    }
    if result.is_ok() {
        dec.push(&stream[at..]);
        result = drain(&mut dec, &mut got);
    }

    assert_eq!(got, expected.frames, "chunked decoding differs from a one-shot parse");
    match (result, expected.too_large) {
        (Err(ProtoError::FrameTooLarge { size, max: m }), Some(s)) => {
            assert_eq!((size, m), (s, max));
            // The error is sticky: the decoder does not skip past a bad header.
            assert!(matches!(dec.next_frame(), Err(ProtoError::FrameTooLarge { .. })));
        }
        (Ok(()), None) => {
            // Everything was pushed (a pull that errs stops early, and none did).
            match dec.finish() {
                Ok(()) => assert!(expected.leftover.is_empty()),
                Err(ProtoError::Truncated { expected: e, got: g }) => {
                    assert_eq!(g, expected.leftover.len());
                    assert!(g > 0);
                    let want = match expected.leftover.first_chunk::<4>() {
                        Some(h) => 4 + u32::from_be_bytes(*h) as usize,
                        None => 4,
                    };
                    assert_eq!(e, want);
                    assert!(g < e, "a truncated frame has fewer bytes than it announced");
                }
                Err(other) => panic!("finish: unexpected {other:?}"),
            }
        }
        (result, too_large) => panic!("decoder said {result:?}, reference says too large: {too_large:?}"),
    }

    for payload in &got {
        round_trip::<AgentMsg>(payload);
        round_trip::<CoordMsg>(payload);
        round_trip::<Request>(payload);
        round_trip::<Response>(payload);
        round_trip::<Hello>(payload);
        round_trip::<HelloReply>(payload);
    }
});
