//! The coordinator's view of its agents, as a plain state machine.
//!
//! Time comes in as an argument (`now`, Unix milliseconds) and nothing here touches a socket, so
//! heartbeat expiry is tested with a virtual clock. Each live agent is tied to the connection it
//! registered on ([`ConnId`]): events from an older connection of the same agent are stale and
//! ignored, so a slow disconnect can never take down the agent's newer session.

use std::collections::BTreeMap;

use shared::proto::{AgentConflict, AgentInfo, AgentState, AgentView, Heartbeat};

/// Identifies one accepted connection for the lifetime of the coordinator process.
pub type ConnId = u64;

/// What is persisted of an agent, so that `farm agents` still lists it after a restart.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct AgentRecord {
    pub info: AgentInfo,
    pub last_seen: u64,
    pub address: String,
}

#[derive(Debug)]
struct Agent {
    info: AgentInfo,
    /// The connection the agent is registered on; `None` while offline.
    conn: Option<ConnId>,
    last_seen: u64,
    busy: u32,
    address: String,
    /// Shutting down: takes no new work.
    draining: bool,
    /// The last second connection with this identity refused while this one held the name.
    conflict: Option<AgentConflict>,
}

#[derive(Debug)]
pub struct Fleet {
    agents: BTreeMap<String, Agent>,
    timeout_ms: u64,
    /// No online agent expires before this (`None`: none was online at the last count). Kept
    /// as a bound, not exact, because heartbeats only move deadlines later: it costs nothing per
    /// heartbeat, and [`Fleet::expire`] makes it exact again when it is reached.
    earliest: Option<u64>,
}

/// What registering an agent displaced.
#[derive(Debug, PartialEq, Eq)]
pub enum Registered {
    New,
    Returned,
    /// The same name was on another connection that has gone quiet, which must now be closed.
    Replaced(ConnId),
    /// The same name is live on another connection (it answers heartbeats): two processes run with
    /// one identity. This registration is refused; the holder keeps the name and its work.
    Refused {
        /// The connection that holds the name.
        holder: ConnId,
        /// Where the holder connected from.
        address: String,
    },
}

impl Fleet {
    pub fn new(timeout_ms: u64) -> Self {
        Self { agents: BTreeMap::new(), timeout_ms, earliest: None }
    }

    /// How often agents should heartbeat: a few beats fit in one timeout, so one or two lost
    /// beats never mark an agent offline.
    pub fn heartbeat_interval_ms(&self) -> u64 {
        (self.timeout_ms / 5).clamp(100, 5_000)
    }

    /// How recently an agent's connection must have heartbeaten to count as alive when a second
    /// connection claims its name: two lost beats are weather (as for expiry), three are not.
    pub fn alive_ms(&self) -> u64 {
        3 * self.heartbeat_interval_ms()
    }

    /// Registers `name` on `conn`. If another connection holds the name and is alive (it
    /// heartbeated within [`Fleet::alive_ms`]), this one is refused: two processes run with one
    /// identity, and evicting each other would take both out of service. A holder gone quiet (an
    /// agent that lost its link, or was killed, and comes back) is replaced, as it should be.
    pub fn register(&mut self, now: u64, name: &str, conn: ConnId, address: String, info: AgentInfo) -> Registered {
        let alive_ms = self.alive_ms();
        if let Some(a) = self.agents.get_mut(name) {
            if let Some(holder) = a.conn.filter(|c| *c != conn) {
                if now.saturating_sub(a.last_seen) < alive_ms {
                    a.conflict = Some(AgentConflict { address, at_ms: now });
                    return Registered::Refused { holder, address: a.address.clone() };
                }
            }
        }
        let fresh = Agent { info, conn: Some(conn), last_seen: now, busy: 0, address, draining: false, conflict: None };
        let deadline = now + self.timeout_ms;
        self.earliest = Some(self.earliest.map_or(deadline, |e| e.min(deadline)));
        match self.agents.insert(name.to_string(), fresh) {
            None => Registered::New,
            Some(Agent { conn: Some(old), .. }) if old != conn => Registered::Replaced(old),
            Some(_) => Registered::Returned,
        }
    }

    /// Records a heartbeat; `false` if it came from a connection the agent no longer uses.
    pub fn heartbeat(&mut self, now: u64, name: &str, conn: ConnId, hb: &Heartbeat) -> bool {
        match self.agents.get_mut(name) {
            Some(a) if a.conn == Some(conn) => {
                a.last_seen = now;
                a.busy = hb.busy;
                true
            }
            _ => false,
        }
    }

    /// The agent's connection ended; `true` if that took the agent offline.
    pub fn disconnect(&mut self, name: &str, conn: ConnId) -> bool {
        match self.agents.get_mut(name) {
            Some(a) if a.conn == Some(conn) => {
                a.conn = None;
                a.busy = 0;
                true
            }
            _ => false,
        }
    }

    /// Marks offline every agent silent for the timeout; returns them with the connection to close.
    pub fn expire(&mut self, now: u64) -> Vec<(String, ConnId)> {
        let mut lost = Vec::new();
        let mut earliest = None::<u64>;
        for (name, a) in &mut self.agents {
            if let Some(conn) = a.conn {
                if now.saturating_sub(a.last_seen) >= self.timeout_ms {
                    a.conn = None;
                    a.busy = 0;
                    lost.push((name.clone(), conn));
                } else {
                    let deadline = a.last_seen + self.timeout_ms;
                    earliest = Some(earliest.map_or(deadline, |e| e.min(deadline)));
                }
            }
        }
        self.earliest = earliest;
        lost
    }

    /// When [`Fleet::expire`] may next have something to do: never later than the first online
    /// agent's deadline, possibly earlier (then `expire` finds nothing and looks again later).
    pub fn next_deadline(&self) -> Option<u64> {
        self.earliest
    }

    /// An agent known from a previous run, offline until it connects.
    pub fn restore(&mut self, name: &str, r: AgentRecord) {
        let agent = Agent {
            info: r.info,
            conn: None,
            last_seen: r.last_seen,
            busy: 0,
            address: r.address,
            draining: false,
            conflict: None,
        };
        self.agents.entry(name.to_string()).or_insert(agent);
    }

    pub fn record(&self, name: &str) -> Option<AgentRecord> {
        self.agents.get(name).map(|a| AgentRecord {
            info: a.info.clone(),
            last_seen: a.last_seen,
            address: a.address.clone(),
        })
    }

    /// The connection an online agent is registered on.
    pub fn conn_of(&self, name: &str) -> Option<ConnId> {
        self.agents.get(name).and_then(|a| a.conn)
    }

    /// Online agents that take work, with what they registered.
    pub fn online(&self) -> impl Iterator<Item = (&str, &AgentInfo)> + Clone {
        self.agents.iter().filter(|(_, a)| a.conn.is_some() && !a.draining).map(|(n, a)| (n.as_str(), &a.info))
    }

    /// The builder an agent registered with, its version and the agent's farm version
    /// (`buildah`, `1.28.2`, `0.1.0`).
    pub fn builder(&self, name: &str) -> Option<(String, String, String)> {
        self.agents
            .get(name)
            .map(|a| (a.info.builder.clone(), a.info.builder_version.clone(), a.info.farm_version.clone()))
    }

    pub fn builder_version(&self, name: &str) -> Option<String> {
        self.agents.get(name).map(|a| a.info.builder_version.clone())
    }

    /// The agent on `conn` is shutting down.
    pub fn drain(&mut self, name: &str, conn: ConnId) {
        if let Some(a) = self.agents.get_mut(name).filter(|a| a.conn == Some(conn)) {
            a.draining = true;
        }
    }

    pub fn is_online(&self, name: &str) -> bool {
        self.agents.get(name).is_some_and(|a| a.conn.is_some())
    }

    pub fn view(&self) -> Vec<AgentView> {
        self.agents
            .iter()
            .map(|(name, a)| AgentView {
                name: name.clone(),
                state: match (a.conn, a.draining) {
                    (None, _) => AgentState::Offline,
                    (Some(_), false) => AgentState::Online,
                    (Some(_), true) => AgentState::Draining,
                },
                native: a.info.native.clone(),
                emulated: a.info.emulated.clone(),
                labels: a.info.labels.clone(),
                capacity: a.info.capacity,
                busy: a.busy,
                last_seen_ms: a.last_seen,
                address: a.address.clone(),
                builder: a.info.builder.clone(),
                builder_version: a.info.builder_version.clone(),
                farm_version: a.info.farm_version.clone(),
                memory_limit: a.info.memory_limit,
                conflict: a.conflict.clone().filter(|_| a.conn.is_some()),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> AgentInfo {
        AgentInfo {
            native: vec!["linux/amd64".parse().unwrap()],
            emulated: vec![],
            labels: Default::default(),
            capacity: 1,
            builder: "buildah".into(),
            builder_version: "1.28".into(),
            farm_version: "0.1.0".into(),
            memory_limit: None,
            allowed: vec![],
        }
    }

    #[test]
    fn silent_agent_goes_offline_at_the_timeout_not_before() {
        let mut f = Fleet::new(15_000);
        assert_eq!(f.register(1_000, "pi", 1, "a".into(), info()), Registered::New);
        assert_eq!(f.next_deadline(), Some(16_000));
        assert!(f.expire(15_999).is_empty());
        assert!(f.is_online("pi"));
        assert_eq!(f.expire(16_000), vec![("pi".to_string(), 1)]);
        assert!(!f.is_online("pi"));
        assert_eq!(f.next_deadline(), None);
        assert_eq!(f.view()[0].state, AgentState::Offline);
    }

    #[test]
    fn the_next_deadline_is_never_late_and_expire_makes_it_exact() {
        let mut f = Fleet::new(15_000);
        f.register(0, "a", 1, "x".into(), info());
        f.register(1_000, "b", 2, "y".into(), info());
        assert_eq!(f.next_deadline(), Some(15_000));
        // A heartbeat moves a's deadline later; the bound may stay early, never late.
        f.heartbeat(5_000, "a", 1, &Heartbeat { busy: 0 });
        assert!(f.next_deadline().unwrap() <= 16_000);
        // Woken at the bound, expire finds nobody silent and tightens it to b's deadline.
        assert!(f.expire(15_000).is_empty());
        assert_eq!(f.next_deadline(), Some(16_000));
        assert_eq!(f.expire(16_000), vec![("b".to_string(), 2)]);
        assert_eq!(f.next_deadline(), Some(20_000));
    }

    #[test]
    fn heartbeats_keep_an_agent_online_and_two_missed_beats_do_not_expire_it() {
        let mut f = Fleet::new(15_000);
        f.register(0, "pi", 1, "a".into(), info());
        let beat = f.heartbeat_interval_ms();
        assert_eq!(beat, 3_000);
        // Beats at 3 s and 6 s arrive, the next two are lost; at 6 s + 3 beats it is still online.
        assert!(f.heartbeat(3_000, "pi", 1, &Heartbeat { busy: 1 }));
        assert!(f.heartbeat(6_000, "pi", 1, &Heartbeat { busy: 1 }));
        assert!(f.expire(6_000 + 3 * beat).is_empty());
        assert_eq!(f.view()[0].busy, 1);
        assert_eq!(f.expire(21_000).len(), 1);
    }

    #[test]
    fn stale_connection_cannot_touch_the_new_session() {
        let mut f = Fleet::new(10_000);
        f.register(0, "pi", 1, "a".into(), info());
        let quiet = f.alive_ms();
        assert_eq!(f.register(quiet, "pi", 2, "b".into(), info()), Registered::Replaced(1));
        assert!(!f.heartbeat(quiet + 1, "pi", 1, &Heartbeat { busy: 0 }));
        assert!(!f.disconnect("pi", 1));
        assert!(f.is_online("pi"));
        assert!(f.disconnect("pi", 2));
        assert!(!f.is_online("pi"));
        assert_eq!(f.register(quiet + 2, "pi", 3, "c".into(), info()), Registered::Returned);
        assert_eq!(f.view()[0].address, "c");
    }

    #[test]
    fn a_second_connection_of_a_live_identity_is_refused_and_the_first_keeps_it() {
        let mut f = Fleet::new(15_000);
        let alive = f.alive_ms();
        assert_eq!(alive, 9_000);
        f.register(0, "pi", 1, "10.0.0.1:5000".into(), info());
        assert!(f.heartbeat(3_000, "pi", 1, &Heartbeat { busy: 1 }));
        let refused = f.register(3_000 + alive - 1, "pi", 2, "10.0.0.2:6000".into(), info());
        assert_eq!(refused, Registered::Refused { holder: 1, address: "10.0.0.1:5000".into() });
        // The holder keeps the name, its address and its work; the conflict is shown.
        assert_eq!(f.conn_of("pi"), Some(1));
        let v = &f.view()[0];
        assert_eq!((v.state, v.address.as_str(), v.busy), (AgentState::Online, "10.0.0.1:5000", 1));
        assert_eq!(v.conflict, Some(AgentConflict { address: "10.0.0.2:6000".into(), at_ms: 3_000 + alive - 1 }));
        assert!(f.heartbeat(6_000, "pi", 1, &Heartbeat { busy: 1 }));
        assert!(matches!(f.register(7_000, "pi", 2, "10.0.0.2:6000".into(), info()), Registered::Refused { .. }));
    }

    #[test]
    fn a_holder_gone_quiet_is_replaced_by_the_returning_agent() {
        let mut f = Fleet::new(15_000);
        f.register(0, "pi", 1, "10.0.0.1:5000".into(), info());
        assert!(matches!(f.register(1_000, "pi", 2, "10.0.0.1:5001".into(), info()), Registered::Refused { .. }));
        // No beat for three intervals: the first connection is presumed gone (a killed agent, a
        // dropped link), and the agent coming back takes over at once, before the expiry.
        assert_eq!(f.register(f.alive_ms(), "pi", 2, "10.0.0.1:5001".into(), info()), Registered::Replaced(1));
        let v = &f.view()[0];
        assert_eq!((v.address.as_str(), v.conflict.clone()), ("10.0.0.1:5001", None));
        // Offline: nobody holds the name, so anyone with the identity gets in.
        assert!(f.disconnect("pi", 2));
        assert_eq!(f.register(f.alive_ms() + 1, "pi", 3, "x".into(), info()), Registered::Returned);
    }

    #[test]
    fn unknown_agent_heartbeat_ignored() {
        let mut f = Fleet::new(10_000);
        assert!(!f.heartbeat(0, "ghost", 9, &Heartbeat { busy: 0 }));
        assert!(f.view().is_empty());
    }
}
