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

use crate::annotation::Annotation;
use crate::digest::Digest;
use crate::platform::Platform;
use crate::registry::Credentials;
use crate::tls::Role;

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
    /// Bytes each build may use (`memory_limit`); `None`: no limit.
    pub memory_limit: Option<u64>,
    /// The entitlements this agent's config allows builds to ask for (`allow_host_network`,
    /// `allow_insecure`); a build asking for others is not placed on it.
    pub allowed: Vec<Entitlement>,
}

/// What a build may ask for beyond the default sandbox, as buildx's `--allow` spells it. Each
/// needs the agent's config to allow it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Entitlement {
    /// `network.host`: RUN steps share the agent host's network, its loopback services included.
    NetworkHost,
    /// `security.insecure`: RUN steps run with every capability and no seccomp filter.
    SecurityInsecure,
}

impl Entitlement {
    pub const ALL: [Entitlement; 2] = [Entitlement::NetworkHost, Entitlement::SecurityInsecure];

    /// buildx's name: `network.host`, `security.insecure`.
    pub fn name(self) -> &'static str {
        match self {
            Entitlement::NetworkHost => "network.host",
            Entitlement::SecurityInsecure => "security.insecure",
        }
    }

    /// The agent config key that allows it.
    pub fn config_key(self) -> &'static str {
        match self {
            Entitlement::NetworkHost => "allow_host_network",
            Entitlement::SecurityInsecure => "allow_insecure",
        }
    }
}

impl std::fmt::Display for Entitlement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Entitlement {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Entitlement::ALL
            .into_iter()
            .find(|e| e.name() == s)
            .ok_or_else(|| format!("unknown entitlement {s:?}: farm knows network.host and security.insecure"))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// Slots in use right now.
    pub busy: u32,
}

/// Coordinator-wide task identity; with the attempt number it fences results: a result for an
/// older attempt than the current one is refused.
pub type TaskId = u64;

/// Agent → coordinator, on the control stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentMsg {
    Register(AgentInfo),
    Heartbeat(Heartbeat),
    TaskLog {
        task: TaskId,
        attempt: u32,
        line: String,
    },
    TaskDone {
        task: TaskId,
        attempt: u32,
        manifest: ManifestRef,
        timings: Vec<Phase>,
    },
    TaskFailed {
        task: TaskId,
        attempt: u32,
        error: String,
    },
    /// Sent right after `Register`: the tasks this agent still holds (running, or finished with
    /// a result not yet delivered). The coordinator keeps those, cancels stale ones, and
    /// requeues what the agent no longer has.
    Holding(Vec<Held>),
    /// The agent is shutting down: assign it nothing more; its running tasks may still finish.
    Draining,
    /// The agent gives a task back unfinished (it is shutting down); run it elsewhere.
    Release {
        task: TaskId,
        attempt: u32,
    },
    /// The agent cannot run this task through no fault of the build (its disk is full): run it on
    /// another agent if one can take it, else fail it with `error`.
    Unfit {
        task: TaskId,
        attempt: u32,
        error: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Held {
    pub task: TaskId,
    pub attempt: u32,
}

/// Coordinator → agent, on the control stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CoordMsg {
    /// Registration accepted; send a heartbeat at least this often.
    Registered {
        heartbeat_interval_ms: u64,
    },
    /// Registration refused; the agent should log the reason.
    Refused {
        reason: String,
    },
    Assign(Box<Assignment>),
    Cancel {
        task: TaskId,
        attempt: u32,
    },
    /// Another agent with this agent's identity tried to register from `address` and was refused
    /// (this connection holds the name): the agent should log it, naming that address.
    Duplicate {
        address: String,
    },
}

/// Whether a build may fall back to QEMU when no native agent is connected, or (`Fastest`) go to
/// whichever agent is expected to finish first, native or emulated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Emulation {
    #[default]
    Fallback,
    Never,
    Fastest,
}

/// What a client asks to build. Credentials travel only inside the mutual-TLS connection and
/// are held in memory; they are never logged or written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildSpec {
    pub platforms: Vec<Platform>,
    /// Full image references with tags, all in one repository. None: nothing is pushed to any
    /// registry; the agents upload each platform's image to the coordinator's content store, and
    /// the index is kept there, for the client to fetch (`GetBlobs`) and write out.
    pub tags: Vec<String>,
    /// The Dockerfile's path inside the context.
    pub dockerfile: String,
    pub build_args: Vec<(String, String)>,
    pub target: Option<String>,
    pub no_cache: bool,
    pub emulation: Emulation,
    pub require: BTreeMap<String, String>,
    /// Digest of the context manifest, uploaded before the build is submitted.
    pub context: Digest,
    /// `host:port` registries spoken to over plain HTTP.
    pub insecure_registries: Vec<String>,
    pub credentials: Option<Credentials>,
    /// `--secret id=ID,src=FILE`: handed to the RUN steps that mount them, held in memory only.
    pub secrets: Vec<Secret>,
    /// `--allow` / `--network host`: what the build asks for beyond the default sandbox.
    pub entitlements: Vec<Entitlement>,
    /// `--annotation`: on the index, its entries and the platforms' manifests.
    pub annotations: Vec<Annotation>,
    /// `--label KEY=VALUE`: image config labels, on every platform's image.
    pub labels: Vec<(String, String)>,
    /// `--ssh` ids, for `RUN --mount=type=ssh[,id=ID]`. Only the ids travel: the sockets and keys
    /// stay on the client, which answers each connection the builder makes
    /// ([`Request::SshForward`]) while it follows the build.
    pub ssh: Vec<String>,
    /// Named contexts, `--pull`, `--network none`, `--add-host`.
    pub inputs: Inputs,
    /// `--notify URL`: told (a JSON POST) when this build ends, besides the coordinator's webhooks.
    pub notify: Vec<String>,
    /// `--sign`: the coordinator signs the pushed index with the farm's key (cosign's format).
    /// Needs tags (a registry to sign in) and a coordinator with a signing key.
    pub sign: bool,
    /// `--provenance`: SLSA provenance attached to each platform (default: `min`).
    pub provenance: ProvenanceMode,
    /// `--cache-to type=registry,ref=REF`: `REGISTRY/REPOSITORY[:TAG]` (a
    /// [`crate::cache::CacheRef`]); each platform exports its layer cache below it. None: the
    /// coordinator's `cache_repo`, if it names one.
    pub cache_to: Option<String>,
    /// `--cache-from`: references as `cache_to`, imported from in order. Empty: the coordinator's
    /// `cache_repo`, if it names one.
    pub cache_from: Vec<String>,
}

/// `--provenance`: whether each platform gets a SLSA provenance attestation, and how much it
/// records (`max` adds the Dockerfile's text), as buildx's `mode=min|max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ProvenanceMode {
    Off,
    #[default]
    Min,
    Max,
}

/// What a build takes in besides its context, Dockerfile and arguments: buildx's
/// `--build-context`, `--pull`, `--network none` and `--add-host`. The same in the build spec
/// and in every assignment.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Inputs {
    /// `--build-context NAME=DIR`: each uploaded like the main context, by manifest digest.
    pub contexts: Vec<NamedContext>,
    /// `--pull`: pull every base image again, even if the builder holds its tag.
    pub pull: bool,
    /// `--network none`: RUN steps have no network at all (only loopback).
    pub no_network: bool,
    /// `--add-host HOST:IP`: extra `/etc/hosts` lines for RUN steps, IPs already validated.
    pub add_hosts: Vec<(String, String)>,
}

/// A named build context (`COPY --from=NAME`, `RUN --mount=...,from=NAME`, `FROM NAME`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamedContext {
    pub name: String,
    /// Digest of its uploaded manifest.
    pub context: Digest,
}

/// A build secret. Its value never appears in Debug output, logs or the state file.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Secret {
    pub id: String,
    pub value: Vec<u8>,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret({}, {} bytes <redacted>)", self.id, self.value.len())
    }
}

/// One platform of one build, as sent to the agent that runs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    pub task: TaskId,
    pub attempt: u32,
    pub build: String,
    pub platform: Platform,
    pub emulated: bool,
    /// Where to push the image by digest: `registry/repository`, no tag. Empty: push nothing;
    /// upload the image's blobs and manifest to the coordinator's content store instead.
    pub repository: String,
    pub context: Digest,
    pub dockerfile: String,
    pub build_args: Vec<(String, String)>,
    pub target: Option<String>,
    pub no_cache: bool,
    pub insecure_registries: Vec<String>,
    pub credentials: Option<Credentials>,
    pub secrets: Vec<Secret>,
    /// The build's entitlements; the agent was chosen because its config allows them.
    pub entitlements: Vec<Entitlement>,
    /// The `manifest` annotations for this platform: the builder puts them on the image manifest.
    pub annotations: BTreeMap<String, String>,
    /// `--label`: image config labels.
    pub labels: Vec<(String, String)>,
    /// The limits under which the coordinator accepted the context (its `max_context_files` and
    /// `max_context_bytes`); the agent checks the fetched manifest against these, not its own
    /// defaults, so a context the coordinator accepted is one every agent accepts.
    pub context_limits: ContextLimits,
    /// The build's `--ssh` ids: the agent offers the builder a socket for each and relays every
    /// connection to it through the coordinator to the client ([`Request::SshForward`]).
    pub ssh: Vec<String>,
    /// `--build-context`, `--pull`, `--network none`, `--add-host`: what the build reads beyond its
    /// context and how its RUN steps see the network.
    pub inputs: Inputs,
    /// The repository (no tag) this platform's layer cache is exported to (buildah
    /// `--cache-to`): the build's or the coordinator's cache reference, per platform.
    pub cache_to: Option<String>,
    /// The repositories this platform's layer cache is imported from, in order.
    pub cache_from: Vec<String>,
    /// Cache images (`REPOSITORY:KEY` under `cache_from`) to pull before building, unless the
    /// agent's store has them: the layer-less steps of the previous build of this Dockerfile
    /// that buildah 1.28 does not pull itself ([`crate::cache::StepLog`]).
    pub cache_import: Vec<String>,
}

/// How big a context may be: the coordinator's configuration, as sent to agents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContextLimits {
    pub max_files: u64,
    pub max_bytes: u64,
}

/// How long one phase of a task took (context sync, materialise, build, export, push).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Phase {
    pub name: String,
    pub ms: u64,
}

/// A pushed per-platform image manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestRef {
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
}

/// Client → coordinator: one per request stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Answered with the same text: a cheap liveness and framing check.
    Echo(String),
    ListAgents,
    /// Offers a context by its manifest's digest; answered with [`Response::Missing`]: just that
    /// digest while the coordinator lacks the manifest (send it with `PutBlobs`, it is a blob like
    /// any other, then offer it again), else the files it lacks once the manifest is validated.
    PutContext(Digest),
    /// Followed on the same stream by [`BlobHeader`] frames, each followed by exactly `size`
    /// raw bytes, until the sender finishes the stream; answered with [`Response::Stored`].
    PutBlobs,
    /// Submits a build; answered with [`Response::Accepted`] then [`Response::Event`]s until the
    /// build ends.
    Build(Box<BuildSpec>),
    /// (Agents) blobs by digest; answered with a [`BlobHeader`] frame plus raw bytes for each.
    GetBlobs(Vec<Digest>),
    /// Recent builds, newest first; answered with [`Response::Builds`].
    ListBuilds {
        limit: u32,
    },
    /// A build's stored log lines ([`Response::LogLine`]s), then, with `follow`, live ones until
    /// the build ends; the stream then ends.
    Logs {
        build: String,
        platform: Option<Platform>,
        follow: bool,
    },
    /// Stops every task of a build and marks it cancelled; answered with [`Response::Ok`].
    Cancel {
        build: String,
    },
    /// Follows a build's events from now on (as `Build` does after `Accepted`).
    Follow {
        build: String,
    },
    /// (Peers without a certificate) joins the farm with a token: the coordinator signs `csr`
    /// for `name` with the token's role; answered with [`Response::Joined`].
    Join {
        token_id: String,
        secret: String,
        name: String,
        csr: Vec<u8>,
        role: Role,
    },
    /// (Admins) a new join token; answered with [`Response::Token`].
    CreateToken {
        role: Role,
        ttl_secs: Option<u64>,
        uses: Option<u32>,
    },
    /// (Admins) a token can no longer be used.
    RevokeToken {
        id: String,
    },
    /// (Admins) an identity is refused from now on; its live connections are closed.
    Revoke {
        name: String,
    },
    /// One build, by id or unique id prefix; answered with [`Response::Builds`] holding it.
    GetBuild {
        build: String,
    },
    /// (Admins) as `Revoke`, but a name the coordinator has never seen is refused unless `force`
    /// (for a stolen certificate that has not connected yet).
    RevokeIdentity {
        name: String,
        force: bool,
    },
    /// Which of these blobs the coordinator's content store lacks; answered with
    /// [`Response::Missing`]. Agents ask it before uploading a build's result (a build without
    /// tags pushes nothing to a registry: its image goes to the coordinator), so each blob
    /// travels once.
    HaveBlobs(Vec<Digest>),
    /// One connection to a build's `--ssh` socket. (Agents) opened for a connection the builder
    /// made to the socket for `id`, allowed only while the agent runs a task of `build`; the
    /// coordinator opens the same request on a stream to the client that submitted the build
    /// (and follows it), which connects it to its local socket for `id`. Each side answers
    /// [`Response::Ok`] or [`Response::Error`]; after `Ok` the stream carries the raw bytes of
    /// the ssh-agent protocol both ways (relayed, never read or stored).
    SshForward {
        build: String,
        id: String,
    },
    /// (Admins and clients) a one-time login token for the web dashboard, for the caller's
    /// identity; answered with [`Response::Dashboard`].
    DashboardLogin,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobHeader {
    pub digest: Digest,
    pub size: u64,
}

/// Coordinator → client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Response {
    Echo(String),
    Agents(Vec<AgentView>),
    Error(String),
    Missing(Vec<Digest>),
    Stored {
        blobs: u64,
        bytes: u64,
    },
    Accepted {
        build: String,
    },
    Event(BuildEvent),
    Builds(Vec<BuildView>),
    LogLine {
        platform: Platform,
        line: String,
    },
    Ok,
    Joined {
        role: Role,
        cert_pem: String,
        ca_pem: String,
    },
    Token {
        token: String,
        id: String,
        expires_ms: Option<u64>,
    },
    /// The dashboard's port (on the coordinator's host) and a login token valid once, for
    /// `expires_secs` seconds: `https://HOST:PORT/login?token=TOKEN`.
    Dashboard {
        port: u16,
        token: String,
        expires_secs: u64,
    },
}

/// One build as `farm builds` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildView {
    pub id: String,
    /// running, stitching, succeeded, failed, cancelled
    pub state: String,
    pub client: String,
    pub created_ms: u64,
    pub tags: Vec<String>,
    pub index: Option<Digest>,
    pub error: Option<String>,
    pub platforms: Vec<TaskView>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskView {
    pub platform: Platform,
    /// queued, running, done, failed, cancelled
    pub state: String,
    pub agent: Option<String>,
    pub emulated: bool,
    pub attempt: u32,
    /// The image manifest it made (done or cached).
    pub manifest: Option<Digest>,
    /// How long it took, once done.
    pub duration_ms: Option<u64>,
}

/// What happened to a build, streamed to the client that submitted it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BuildEvent {
    Waiting { platform: Platform, reason: String },
    Started { platform: Platform, agent: String, emulated: bool, attempt: u32 },
    Log { platform: Platform, line: String },
    Retrying { platform: Platform, reason: String },
    PlatformDone(PlatformResult),
    PlatformFailed { platform: Platform, error: String, last_lines: Vec<String> },
    Succeeded { index: Digest, tags: Vec<String>, platforms: Vec<PlatformResult>, stitch_ms: u64 },
    Failed { error: String },
    Cancelled,
}

impl BuildEvent {
    /// The build ends with this event.
    pub fn is_terminal(&self) -> bool {
        matches!(self, BuildEvent::Succeeded { .. } | BuildEvent::Failed { .. } | BuildEvent::Cancelled)
    }

    /// The line a person reads for this event, with the platform it concerns. The live CLI and
    /// the stored log both use it, so `farm logs` shows what `farm build` showed.
    pub fn describe(&self) -> Option<(Platform, String)> {
        Some(match self {
            BuildEvent::Waiting { platform, reason } => (platform.clone(), reason.clone()),
            BuildEvent::Started { platform, agent, emulated, attempt } => {
                let mode = if *emulated { "emulated" } else { "native" };
                let again = if *attempt > 1 { format!(", attempt {attempt}") } else { String::new() };
                (platform.clone(), format!("started on {agent} ({mode}{again})"))
            }
            BuildEvent::Log { platform, line } => (platform.clone(), line.clone()),
            BuildEvent::Retrying { platform, reason } => (platform.clone(), reason.clone()),
            BuildEvent::PlatformDone(r) => {
                (r.platform.clone(), format!("done: {} on {} ({})", r.manifest.digest, r.agent, r.mode()))
            }
            BuildEvent::PlatformFailed { platform, error, .. } => (platform.clone(), format!("failed: {error}")),
            BuildEvent::Succeeded { .. } | BuildEvent::Failed { .. } | BuildEvent::Cancelled => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlatformResult {
    pub platform: Platform,
    pub manifest: ManifestRef,
    pub agent: String,
    pub emulated: bool,
    pub duration_ms: u64,
    /// Answered from the result cache: nothing was built.
    pub cached: bool,
    /// Where the agent's time went.
    pub timings: Vec<Phase>,
}

impl PlatformResult {
    /// How it was made: `cached` (answered from the result cache), `emulated` (under QEMU) or
    /// `native`.
    pub fn mode(&self) -> &'static str {
        if self.cached {
            "cached"
        } else if self.emulated {
            "emulated"
        } else {
            "native"
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AgentState {
    Online,
    Offline,
    /// Shutting down: finishing its tasks, taking no new ones.
    Draining,
}

impl std::fmt::Display for AgentState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AgentState::Online => "online",
            AgentState::Offline => "offline",
            AgentState::Draining => "draining",
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
    /// Bytes each build may use (`memory_limit`); `None`: no limit.
    pub memory_limit: Option<u64>,
    /// Another process with this identity tried to register while this one was connected, and
    /// was refused: two agents run with the same certificate.
    pub conflict: Option<AgentConflict>,
}

/// The last refused registration of a second agent with an online agent's identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentConflict {
    /// Where the refused one connected from.
    pub address: String,
    /// Unix time in milliseconds of its last refused attempt.
    pub at_ms: u64,
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
            memory_limit: Some(2 << 30),
            allowed: vec![Entitlement::NetworkHost],
        };
        round_trip(AgentMsg::Register(info.clone()));
        round_trip(AgentMsg::Heartbeat(Heartbeat { busy: 3 }));
        round_trip(CoordMsg::Registered { heartbeat_interval_ms: 3000 });
        round_trip(CoordMsg::Refused { reason: "no".into() });
        round_trip(CoordMsg::Duplicate { address: "127.0.0.1:4000".into() });
        round_trip(AgentMsg::Unfit { task: 1, attempt: 2, error: "disk full".into() });
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
            memory_limit: Some(2 << 30),
            conflict: Some(AgentConflict { address: "127.0.0.1:5001".into(), at_ms: 1_700_000_000_500 }),
        }]));
    }

    #[test]
    fn unknown_variant_refused() {
        // A variant index from a future release is an error, not a misread.
        assert!(decode::<AgentMsg>(&[200]).is_err());
        assert!(decode::<Request>(&[77, 1, 2]).is_err());
    }
}
