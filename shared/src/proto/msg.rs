//! Every message farm peers exchange after the handshake.
//!
//! Three conversations share one connection type:
//! - an agent's **control stream** (the first bi-stream it opens): [`AgentMsg`] up, [`CoordMsg`] down;
//! - a client's **request streams** (one bi-stream per request): one [`Request`] up, one or more
//!   [`Response`]s down;
//! - the handshake that precedes both (see `handshake`).
//!
//! Append new enum variants at the end: postcard encodes variants by index, so appending keeps
//! older peers' messages readable. Anything else is a [`super::PROTOCOL_VERSION`] bump.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::platform::Platform;

/// What an agent says about itself when it registers. Its name and role come from its
/// certificate, never from here, so an agent cannot claim to be another.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentInfo {
    pub native: Vec<Platform>,
    pub emulated: Vec<Platform>,
    pub labels: BTreeMap<String, String>,
    /// Concurrent tasks this agent accepts.
    pub capacity: u32,
    pub builder: String,
    pub builder_version: String,
    pub farm_version: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// Slots in use right now.
    pub busy: u32,
}

/// Agent → coordinator, on the control stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentMsg {
    Register(AgentInfo),
    Heartbeat(Heartbeat),
}

/// Coordinator → agent, on the control stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CoordMsg {
    /// Registration accepted; send a heartbeat at least this often.
    Registered { heartbeat_interval_ms: u64 },
    /// Registration refused; the agent should log the reason.
    Refused { reason: String },
}

/// Client → coordinator: one per request stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Answered with the same text: a cheap liveness and framing check.
    Echo(String),
    ListAgents,
}

/// Coordinator → client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Response {
    Echo(String),
    Agents(Vec<AgentView>),
    Error(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AgentState {
    Online,
    Offline,
}

impl std::fmt::Display for AgentState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AgentState::Online => "online",
            AgentState::Offline => "offline",
        })
    }
}

/// One agent as `farm agents` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentView {
    pub name: String,
    pub state: AgentState,
    pub native: Vec<Platform>,
    pub emulated: Vec<Platform>,
    pub labels: BTreeMap<String, String>,
    pub capacity: u32,
    pub busy: u32,
    /// Unix time in milliseconds of the last message from this agent.
    pub last_seen_ms: u64,
    pub address: String,
    pub builder: String,
    pub builder_version: String,
    pub farm_version: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{decode, encode, DEFAULT_MAX_FRAME};

    fn p(s: &str) -> Platform {
        s.parse().unwrap()
    }

    fn round_trip<T: Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug>(msg: T) {
        let wire = encode(&msg, DEFAULT_MAX_FRAME).unwrap();
        assert_eq!(decode::<T>(&wire[4..]).unwrap(), msg);
    }

    #[test]
    fn every_message_round_trips() {
        let info = AgentInfo {
            native: vec![p("linux/amd64"), p("linux/386")],
            emulated: vec![p("linux/arm64"), p("linux/arm/v7"), p("linux/arm/v6")],
            labels: [("board".to_string(), "pi4".to_string())].into(),
            capacity: 2,
            builder: "buildah".into(),
            builder_version: "1.28.2".into(),
            farm_version: "0.1.0".into(),
        };
        round_trip(AgentMsg::Register(info.clone()));
        round_trip(AgentMsg::Heartbeat(Heartbeat { busy: 3 }));
        round_trip(CoordMsg::Registered { heartbeat_interval_ms: 3000 });
        round_trip(CoordMsg::Refused { reason: "no".into() });
        round_trip(Request::Echo("hi".into()));
        round_trip(Request::ListAgents);
        round_trip(Response::Error("bad".into()));
        round_trip(Response::Agents(vec![AgentView {
            name: "pi-4".into(),
            state: AgentState::Online,
            native: info.native,
            emulated: info.emulated,
            labels: info.labels,
            capacity: 2,
            busy: 1,
            last_seen_ms: 1_700_000_000_000,
            address: "127.0.0.1:5000".into(),
            builder: "buildah".into(),
            builder_version: "1.28.2".into(),
            farm_version: "0.1.0".into(),
        }]));
    }

    #[test]
    fn unknown_variant_refused() {
        // A variant index from a future release is an error, not a misread.
        assert!(decode::<AgentMsg>(&[200]).is_err());
        assert!(decode::<Request>(&[77, 1, 2]).is_err());
    }
}
