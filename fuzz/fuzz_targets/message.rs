//! Every message type a peer can send, decoded from arbitrary payload bytes (what
//! `shared::proto::decode` sees after framing). Decoding must never panic, and whatever decodes must
//! re-encode and decode to an equal value, with a re-encoding that is a fixed point.

#![no_main]

use std::fmt::Debug;

use libfuzzer_sys::fuzz_target;
use serde::{de::DeserializeOwned, Serialize};
use shared::proto::{decode, encode, AgentMsg, CoordMsg, Hello, HelloReply, Request, Response};

fn round_trip<T: Serialize + DeserializeOwned + PartialEq + Debug>(payload: &[u8]) {
    let Ok(msg) = decode::<T>(payload) else { return };
    let wire = encode(&msg, usize::MAX).expect("a decoded message re-encodes");
    let len = u32::from_be_bytes(wire[..4].try_into().unwrap()) as usize;
    assert_eq!(len, wire.len() - 4, "header names the payload length");
    let again: T = decode(&wire[4..]).unwrap_or_else(|e| panic!("re-encoded {msg:?} does not decode: {e}"));
    assert_eq!(again, msg, "round trip changed the message");
    assert_eq!(encode(&again, usize::MAX).unwrap(), wire, "re-encoding is not stable");
}

fuzz_target!(|data: &[u8]| {
    round_trip::<AgentMsg>(data);
    round_trip::<CoordMsg>(data);
    round_trip::<Request>(data);
    round_trip::<Response>(data);
    round_trip::<Hello>(data);
    round_trip::<HelloReply>(data);
});
