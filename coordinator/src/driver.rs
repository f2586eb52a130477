//! The one task that owns the coordinator's state. Connection tasks send it [`Event`]s; it feeds
//! them to the pure [`Core`] with the current time and carries out the actions the core returns:
//! messages to agents, events to the clients following a build, index pushes to registries.
//! Being the only owner, it needs no locks and sees events in one order.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use shared::proto::{AgentInfo, AgentMsg, BuildEvent, BuildSpec, CoordMsg, Request, Response};
use shared::registry::Registry;
use shared::tls::Identity;
use shared::Digest;
use tokio::sync::{mpsc, oneshot};

use crate::core::{Action, Core};
use crate::fleet::ConnId;

/// What the driver tells a connection task to do.
#[derive(Debug)]
pub enum Outbound {
    Send(CoordMsg),
    Close(String),
}

#[derive(Debug)]
pub enum Event {
    AgentUp {
        name: String,
        conn: ConnId,
        address: String,
        info: AgentInfo,
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
        events: mpsc::UnboundedSender<BuildEvent>,
        reply: oneshot::Sender<Result<String, String>>,
    },
    Stitched {
        build: String,
        result: Result<Digest, String>,
    },
}

pub struct Driver {
    core: Core,
    links: HashMap<ConnId, mpsc::UnboundedSender<Outbound>>,
    followers: HashMap<String, Vec<mpsc::UnboundedSender<BuildEvent>>>,
    events: mpsc::Sender<Event>,
}

pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// A short random build id, unique enough to name builds across restarts.
fn new_build_id() -> String {
    format!("{:012x}", rand::random::<u64>() >> 16)
}

impl Driver {
    pub fn new(config: &crate::Config, events: mpsc::Sender<Event>) -> Self {
        Self {
            core: Core::new(config.heartbeat_timeout.as_millis() as u64, config.max_attempts),
            links: HashMap::new(),
            followers: HashMap::new(),
            events,
        }
    }

    pub async fn run(mut self, mut events: mpsc::Receiver<Event>) {
        loop {
            let wake = self.core.poll_timeout().map(|d| Duration::from_millis(d.saturating_sub(now_ms())));
            tokio::select! {
                ev = events.recv() => match ev {
                    Some(ev) => self.handle(ev),
                    None => return,
                },
                () = sleep_opt(wake) => self.core.handle_timeout(now_ms()),
            }
            self.execute();
        }
    }

    fn handle(&mut self, ev: Event) {
        let now = now_ms();
        match ev {
            Event::AgentUp { name, conn, address, info, link } => {
                tracing::info!(
                    agent = %name, %address,
                    native = %join(&info.native), emulated = %join(&info.emulated),
                    capacity = info.capacity, "agent online"
                );
                self.links.insert(conn, link);
                self.core.agent_up(now, &name, conn, address, info);
            }
            Event::Agent { name, conn, msg } => self.core.agent_msg(now, &name, conn, msg),
            Event::AgentDown { name, conn } => {
                self.links.remove(&conn);
                if self.core.agent_down(now, &name, conn) {
                    tracing::warn!(agent = %name, "agent offline: connection closed");
                }
            }
            Event::Request { peer: _, req, reply } => {
                let resp = match req {
                    Request::Echo(s) => Response::Echo(s),
                    Request::ListAgents => Response::Agents(self.core.agents()),
                    other => Response::Error(format!("request {other:?} is not handled here")),
                };
                let _ = reply.send(resp);
            }
            Event::Submit { peer, spec, events, reply } => {
                let id = new_build_id();
                let platforms = join(&spec.platforms);
                match self.core.submit(now, &id, *spec) {
                    Ok(()) => {
                        tracing::info!(build = %id, client = %peer.name, %platforms, "build accepted");
                        self.followers.entry(id.clone()).or_default().push(events);
                        let _ = reply.send(Ok(id));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e.to_string()));
                    }
                }
            }
            Event::Stitched { build, result } => {
                match &result {
                    Ok(d) => tracing::info!(%build, index = %d, "image index pushed"),
                    Err(e) => tracing::warn!(%build, "pushing the image index failed: {e}"),
                }
                self.core.stitched(&build, result);
            }
        }
    }

    fn execute(&mut self) {
        while let Some(action) = self.core.poll_action() {
            match action {
                Action::Send { conn, msg } => {
                    if let Some(link) = self.links.get(&conn) {
                        let _ = link.send(Outbound::Send(msg));
                    }
                }
                Action::Close { conn, reason } => {
                    if let Some(link) = self.links.remove(&conn) {
                        let _ = link.send(Outbound::Close(reason));
                    }
                }
                Action::Emit { build, event } => {
                    let end = matches!(event, BuildEvent::Succeeded { .. } | BuildEvent::Failed { .. });
                    if let BuildEvent::Failed { error } = &event {
                        tracing::warn!(%build, "build failed: {error}");
                    }
                    if let Some(f) = self.followers.get_mut(&build) {
                        f.retain(|tx| tx.send(event.clone()).is_ok());
                    }
                    if end {
                        self.followers.remove(&build);
                    }
                }
                Action::Stitch { build, index, tags, insecure, credentials } => {
                    let events = self.events.clone();
                    tokio::spawn(async move {
                        let registry = Registry::new(&insecure, credentials);
                        let result = registry.push_index(&index, &tags).await.map_err(|e| e.to_string());
                        let _ = events.send(Event::Stitched { build, result }).await;
                    });
                }
            }
        }
    }
}

async fn sleep_opt(d: Option<Duration>) {
    match d {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

fn join(ps: &[shared::Platform]) -> String {
    if ps.is_empty() {
        return "-".into();
    }
    ps.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(",")
}
