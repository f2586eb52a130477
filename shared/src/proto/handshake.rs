//! The first exchange on every connection. These two types are frozen: never change their fields,
//! so that any two farm releases can read each other's hello and say precisely why they disagree.

use serde::{Deserialize, Serialize};

use super::ProtoError;

/// Bumped whenever a message changes incompatibly. ALPN (`farm/1`) gates the transport; this
/// gates the messages. 3: `AgentInfo` and `AgentView` gained `memory_limit`; `BuildSpec`,
/// `Assignment` and `AgentInfo` gained entitlements. 4: a build without tags (and an assignment
/// with an empty repository) means "push nothing: results to the coordinator". 5: `BuildSpec` and
/// `Assignment` gained annotations and labels; `TaskView` the manifest and duration; `Assignment`
/// carries the coordinator's context limits; `BuildSpec` and `Assignment` gained `ssh` (ids),
/// `inputs` (named contexts, `--pull`, `--network none`, `--add-host`), `cache_to` and
/// `cache_from` (the layer cache shared through a registry); `Request::SshForward` relays `RUN
/// --mount=type=ssh`. 6: `BuildSpec` gained `sign`, `notify` and `provenance`. 7: `AgentView`
/// gained `conflict`, `CoordMsg::Duplicate` (a second agent with the same identity was refused)
/// and `AgentMsg::Unfit` (an agent that cannot run a task, e.g. its disk is full, hands it on).
pub const PROTOCOL_VERSION: u32 = 7;

const MAGIC: [u8; 4] = *b"FARM";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub magic: [u8; 4],
    pub protocol: u32,
    pub farm_version: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloReply {
    pub accepted: bool,
    pub protocol: u32,
    pub farm_version: String,
    /// Why the peer was refused; empty when accepted.
    pub message: String,
}

impl Hello {
    pub fn ours() -> Self {
        Self { magic: MAGIC, protocol: PROTOCOL_VERSION, farm_version: crate::FARM_VERSION.to_string() }
    }

    /// Checks a peer's hello against ours: the answer the coordinator sends back.
    pub fn check(&self) -> Result<(), ProtoError> {
        if self.magic != MAGIC {
            return Err(ProtoError::NotFarm);
        }
        if self.protocol != PROTOCOL_VERSION {
            return Err(ProtoError::VersionMismatch {
                ours: PROTOCOL_VERSION,
                our_farm: crate::FARM_VERSION.to_string(),
                theirs: self.protocol,
                their_farm: self.farm_version.clone(),
            });
        }
        Ok(())
    }
}

impl HelloReply {
    pub fn to(hello: &Hello) -> Self {
        let (accepted, message) = match hello.check() {
            Ok(()) => (true, String::new()),
            Err(e) => (false, e.to_string()),
        };
        Self { accepted, protocol: PROTOCOL_VERSION, farm_version: crate::FARM_VERSION.to_string(), message }
    }

    /// What the connecting side makes of the reply.
    pub fn into_result(self) -> Result<(), ProtoError> {
        if self.protocol != PROTOCOL_VERSION {
            return Err(ProtoError::VersionMismatch {
                ours: PROTOCOL_VERSION,
                our_farm: crate::FARM_VERSION.to_string(),
                theirs: self.protocol,
                their_farm: self.farm_version,
            });
        }
        if !self.accepted {
            return Err(ProtoError::Refused(self.message));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{decode, encode, DEFAULT_MAX_FRAME};

    #[test]
    fn same_version_accepted() {
        let hello = Hello::ours();
        let back: Hello = decode(&encode(&hello, DEFAULT_MAX_FRAME).unwrap()[4..]).unwrap();
        assert_eq!(back, hello);
        HelloReply::to(&back).into_result().unwrap();
    }

    #[test]
    fn unknown_version_refused_naming_both() {
        let hello = Hello { protocol: PROTOCOL_VERSION + 1, farm_version: "9.9.9".into(), ..Hello::ours() };
        let reply = HelloReply::to(&hello);
        assert!(!reply.accepted);
        let msg = reply.message.clone();
        assert!(msg.contains("9.9.9") && msg.contains(crate::FARM_VERSION), "{msg}");
        assert!(msg.contains(&format!("protocol {}", PROTOCOL_VERSION + 1)), "{msg}");
        // A reply from a newer coordinator is refused by us too, naming both versions.
        let newer = HelloReply {
            protocol: PROTOCOL_VERSION + 1,
            farm_version: "2.0.0".into(),
            ..HelloReply::to(&Hello::ours())
        };
        let err = newer.into_result().unwrap_err().to_string();
        assert!(err.contains("2.0.0") && err.contains(&format!("protocol {}", PROTOCOL_VERSION + 1)), "{err}");
    }

    #[test]
    fn wrong_magic_refused() {
        let hello = Hello { magic: *b"HTTP", ..Hello::ours() };
        assert!(matches!(hello.check(), Err(ProtoError::NotFarm)));
    }

    #[test]
    fn hello_layout_is_frozen() {
        // The exact bytes of a hello must never change: older and newer peers depend on it.
        let hello = Hello { magic: *b"FARM", protocol: 1, farm_version: "0.1.0".into() };
        let wire = encode(&hello, DEFAULT_MAX_FRAME).unwrap();
        assert_eq!(wire, [0, 0, 0, 11, b'F', b'A', b'R', b'M', 1, 5, b'0', b'.', b'1', b'.', b'0']);
    }
}
