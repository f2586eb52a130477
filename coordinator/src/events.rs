//! What connection tasks tell the driver ([`Event`]) and what the driver tells them
//! ([`Outbound`]): the only things `net` and `driver` share, so neither imports the other.

use shared::proto::{AgentInfo, AgentMsg, BuildEvent, BuildSpec, CoordMsg, Request, Response};
use shared::tls::{Identity, Role};
use shared::{Digest, Platform};
use tokio::sync::{mpsc, oneshot};

use crate::fleet::ConnId;

/// What the driver tells a connection task to do.
#[derive(Debug)]
pub enum Outbound {
    Send(CoordMsg),
    Close(String),
    /// Refuse the registration: send `CoordMsg::Refused`, let it reach the agent, then close.
    Refuse(String),
}

/// Where a build's log lines go for `farm logs`.
pub type LogSink = mpsc::UnboundedSender<(Platform, String)>;

#[derive(Debug)]
pub enum Event {
    AgentUp {
        name: String,
        conn: ConnId,
        address: String,
        info: AgentInfo,
        /// `sha256:<hex>` of the agent's certificate, for provenance.
        certificate: Option<String>,
        link: mpsc::UnboundedSender<Outbound>,
    },
    Agent {
        name: String,
        conn: ConnId,
        msg: AgentMsg,
    },
    AgentDown {
        name: String,
        conn: ConnId,
    },
    Request {
        peer: Identity,
        req: Request,
        reply: oneshot::Sender<Response>,
    },
    /// A build to accept; its events go to `events` until it ends.
    Submit {
        peer: Identity,
        spec: Box<BuildSpec>,
        /// Base images resolved to digests at submission (`None`: the result cache is not used).
        bases: Option<Vec<(String, Digest)>>,
        /// The Dockerfile's digest (and text) and the bases, for provenance.
        source: shared::provenance::Source,
        events: mpsc::UnboundedSender<BuildEvent>,
        reply: oneshot::Sender<Result<String, String>>,
    },
    /// Follow an existing build's events.
    Follow {
        build: String,
        events: mpsc::UnboundedSender<BuildEvent>,
        reply: oneshot::Sender<Result<(), String>>,
    },
    /// Stored log lines, then live ones if `follow`; the sink is dropped when there are no more.
    Logs {
        build: String,
        platform: Option<Platform>,
        follow: bool,
        sink: LogSink,
        reply: oneshot::Sender<Result<(), String>>,
    },
    Stitched {
        build: String,
        result: Result<Digest, String>,
        ms: u64,
    },
    Join {
        token_id: String,
        secret: String,
        name: String,
        csr: Vec<u8>,
        role: Role,
        reply: oneshot::Sender<Response>,
    },
    CacheChecked {
        task: shared::proto::TaskId,
        present: bool,
    },
    /// The dashboard: agents, queue and builds (only `owner`'s, unless `None`; only `build`, if
    /// named).
    Dashboard {
        owner: Option<String>,
        build: Option<String>,
        reply: oneshot::Sender<crate::dashboard::Snapshot>,
    },
    /// A metrics scrape: what the core holds now.
    Metrics {
        reply: oneshot::Sender<crate::metrics::Snapshot>,
    },
}
