//! The one task that owns the coordinator's state. Connection tasks send it [`Event`]s; it feeds
//! them to the pure core with the current time and carries out what the core decides (reply,
//! close a connection). Being the only owner, it needs no locks and sees events in one order.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use shared::proto::{AgentInfo, AgentMsg, CoordMsg, Request, Response};
use shared::tls::Identity;
use tokio::sync::{mpsc, oneshot};

use crate::fleet::{ConnId, Fleet, Registered};

/// What the driver tells a connection task to do.
#[derive(Debug)]
pub enum Outbound {
    Send(CoordMsg),
    Close(String),
}

#[derive(Debug)]
pub enum Event {
    AgentUp { name: String, conn: ConnId, address: String, info: AgentInfo, link: mpsc::Sender<Outbound> },
    Agent { name: String, conn: ConnId, msg: AgentMsg },
    AgentDown { name: String, conn: ConnId },
    Request { peer: Identity, req: Request, reply: oneshot::Sender<Response> },
}

pub struct Driver {
    fleet: Fleet,
    links: HashMap<ConnId, mpsc::Sender<Outbound>>,
}

pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl Driver {
    pub fn new(config: &crate::Config) -> Self {
        Self { fleet: Fleet::new(config.heartbeat_timeout.as_millis() as u64), links: HashMap::new() }
    }

    pub async fn run(mut self, mut events: mpsc::Receiver<Event>) {
        loop {
            let wake = self.fleet.next_deadline().map(|d| Duration::from_millis(d.saturating_sub(now_ms())));
            tokio::select! {
                ev = events.recv() => match ev {
                    Some(ev) => self.handle(ev),
                    None => return,
                },
                () = sleep_opt(wake) => {}
            }
            for (name, conn) in self.fleet.expire(now_ms()) {
                tracing::warn!(agent = %name, "agent offline: no heartbeat within the timeout");
                self.close(conn, "no heartbeat within the timeout");
            }
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
                let _ = link.try_send(Outbound::Send(CoordMsg::Registered {
                    heartbeat_interval_ms: self.fleet.heartbeat_interval_ms(),
                }));
                self.links.insert(conn, link);
                if let Registered::Replaced(old) = self.fleet.register(now, &name, conn, address, info) {
                    self.close(old, "replaced by a newer connection of the same agent");
                }
            }
            Event::Agent { name, conn, msg } => match msg {
                AgentMsg::Heartbeat(hb) => {
                    self.fleet.heartbeat(now, &name, conn, &hb);
                }
                AgentMsg::Register(_) => self.close(conn, "already registered on this connection"),
            },
            Event::AgentDown { name, conn } => {
                self.links.remove(&conn);
                if self.fleet.disconnect(&name, conn) {
                    tracing::warn!(agent = %name, "agent offline: connection closed");
                }
            }
            Event::Request { peer, req, reply } => {
                let _ = reply.send(self.request(&peer, req));
            }
        }
    }

    fn request(&mut self, _peer: &Identity, req: Request) -> Response {
        match req {
            Request::Echo(s) => Response::Echo(s),
            Request::ListAgents => Response::Agents(self.fleet.view()),
        }
    }

    fn close(&mut self, conn: ConnId, reason: &str) {
        if let Some(link) = self.links.remove(&conn) {
            let _ = link.try_send(Outbound::Close(reason.to_string()));
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
