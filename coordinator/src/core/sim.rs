//! The core in virtual time with scripted agents, as quinn-proto tests its connections with a
//! `Pair`: [`Sim::step`] jumps the clock to the next deadline (the core's [`Core::poll_timeout`]
//! or the next scripted agent event), delivers it, and carries the core's actions to the agents
//! the way the driver and a real agent would. No wall clock, no sleeps, no runtime: the
//! control-plane faults (lost agents, stale results, drains, restarts) run here in milliseconds.

use std::collections::{BTreeMap, BTreeSet};

use shared::oci;
use shared::proto::{Heartbeat, Held};

use super::tests::{info, spec};
use super::*;

/// What a scripted agent does at a scripted time.
#[derive(Debug, Clone)]
pub(super) enum Script {
    /// Stops heartbeating and sending anything (a cut link): results wait until it returns.
    Silence,
    /// Its connection drops (the driver sees it close): it keeps building what it holds.
    Vanish,
    /// Reconnects on a new connection. `holding`: it kept its tasks (and finished results) and
    /// says so; otherwise it restarted and holds nothing.
    Return { holding: bool },
    /// Says it is shutting down: takes no new work, disconnects once it holds nothing.
    Drain,
    /// Sends this message on its current connection, whatever it holds.
    Send(AgentMsg),
}

#[derive(Debug, Clone)]
enum Ev {
    Agent(usize, Script),
    Beat(usize),
    /// The agent's build of this attempt finishes.
    Answer(usize, TaskId, u32),
    Submit(String, Vec<String>),
    Restart,
}

/// One task attempt the agent holds; `done`: finished, its result not yet sent.
#[derive(Debug, Clone)]
struct HeldTask {
    attempt: u32,
    done: Option<AgentMsg>,
}

#[derive(Debug)]
struct SimAgent {
    name: String,
    info: AgentInfo,
    conn: Option<ConnId>,
    /// How long a build takes it; `None`: it never answers.
    answer_after: Option<u64>,
    beat_every: Option<u64>,
    silent: bool,
    draining: bool,
    held: BTreeMap<TaskId, HeldTask>,
    /// Assignments that reached it while it was draining (it releases them).
    refused_while_draining: u32,
}

/// One assignment an agent received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Run {
    pub at: u64,
    pub agent: String,
    pub task: TaskId,
    pub attempt: u32,
    pub build: String,
    pub platform: String,
}

pub(super) struct Sim {
    pub core: Core,
    pub now: u64,
    heartbeat_timeout_ms: u64,
    max_attempts: u32,
    agents: Vec<SimAgent>,
    queue: BTreeMap<(u64, u64), Ev>,
    seq: u64,
    next_conn: ConnId,
    conns: HashMap<ConnId, usize>,
    store: Option<crate::store::Store>,
    /// Every event of every build, with the virtual time it was emitted at.
    pub events: BTreeMap<String, Vec<(u64, BuildEvent)>>,
    /// Every assignment delivered to an agent, in order.
    pub runs: Vec<Run>,
    /// Records committed to the store (or that would have been, without one).
    pub writes: usize,
    /// Messages the core sent to agents (assignments, cancels, ...).
    pub sent: Vec<(u64, String, CoordMsg)>,
    /// Broken invariants seen along the way (e.g. one attempt held by two agents at once).
    pub violations: Vec<String>,
    trace: Vec<String>,
}

impl Sim {
    pub fn new(heartbeat_timeout_ms: u64, max_attempts: u32) -> Sim {
        Sim {
            core: Core::new(heartbeat_timeout_ms, max_attempts),
            now: 0,
            heartbeat_timeout_ms,
            max_attempts,
            agents: vec![],
            queue: BTreeMap::new(),
            seq: 0,
            next_conn: 1,
            conns: HashMap::new(),
            store: None,
            events: BTreeMap::new(),
            runs: vec![],
            writes: 0,
            sent: vec![],
            violations: vec![],
            trace: vec![],
        }
    }

    /// Commits every batch to `store` before carrying out its actions, as the driver does.
    pub fn with_store(mut self, store: crate::store::Store) -> Sim {
        self.core.start_epoch(store.begin_epoch().unwrap());
        self.store = Some(store);
        self
    }

    /// An agent that registers now: `native` platforms, `capacity` slots, answering every
    /// assignment after `answer_after` ms (`None`: never), heartbeating at the interval the
    /// coordinator asks for.
    pub fn agent(&mut self, name: &str, native: &[&str], capacity: u32, answer_after: Option<u64>) {
        let mut info = info(native, &[], &[]);
        info.capacity = capacity;
        let i = self.agents.len();
        self.agents.push(SimAgent {
            name: name.into(),
            info,
            conn: None,
            answer_after,
            beat_every: Some(self.core.fleet.heartbeat_interval_ms()),
            silent: false,
            draining: false,
            held: BTreeMap::new(),
            refused_while_draining: 0,
        });
        self.connect(i, false);
        let every = self.agents[i].beat_every.expect("set above");
        self.schedule(self.now + every, Ev::Beat(i));
        self.flush();
    }

    fn index(&self, name: &str) -> usize {
        self.agents.iter().position(|a| a.name == name).unwrap_or_else(|| panic!("no agent {name} in the sim"))
    }

    fn schedule(&mut self, at: u64, ev: Ev) {
        self.seq += 1;
        self.queue.insert((at, self.seq), ev);
    }

    /// `name` does `what` at virtual time `at`.
    pub fn at(&mut self, at: u64, name: &str, what: Script) {
        let i = self.index(name);
        self.schedule(at, Ev::Agent(i, what));
    }

    /// A client submits build `id` for `platforms` at `at` (no result cache: no base digests).
    pub fn submit_at(&mut self, at: u64, id: &str, platforms: &[&str]) {
        self.schedule(at, Ev::Submit(id.into(), platforms.iter().map(|p| p.to_string()).collect()));
    }

    /// The coordinator process dies at `at` and a new one recovers from the store: every agent
    /// connection breaks (the agents keep what they hold, and return as scripted).
    pub fn restart_at(&mut self, at: u64) {
        assert!(self.store.is_some(), "a restart needs a store: Sim::with_store");
        self.schedule(at, Ev::Restart);
    }

    /// Advances to the next deadline and delivers it; `false` when nothing is left to happen.
    pub fn step(&mut self) -> bool {
        let core_at = self.core.poll_timeout();
        let agent_at = self.queue.keys().next().map(|(t, _)| *t);
        let core_first = match (core_at, agent_at) {
            (None, None) => return false,
            (Some(c), Some(a)) => c <= a,
            (c, _) => c.is_some(),
        };
        if core_first {
            self.now = self.now.max(core_at.expect("chosen"));
            self.log(format!("handle_timeout({})", self.now));
            self.core.handle_timeout(self.now);
            // A deadline handled must not be asked for again: the driver would spin on it.
            if let Some(again) = self.core.poll_timeout().filter(|t| *t <= self.now) {
                self.fail(&format!("poll_timeout() is still {again} after handle_timeout({})", self.now));
            }
        } else {
            let ((at, _), ev) = self.queue.pop_first().expect("chosen");
            self.now = self.now.max(at);
            self.deliver(ev);
        }
        self.flush();
        true
    }

    /// Steps until `done` holds; panics with the trace if it does not within `max_virtual_ms`
    /// of virtual time from now (or if nothing is left to happen).
    pub fn run_until(&mut self, what: &str, max_virtual_ms: u64, done: impl Fn(&Sim) -> bool) {
        let limit = self.now + max_virtual_ms;
        while !done(self) {
            let next =
                [self.core.poll_timeout(), self.queue.keys().next().map(|(t, _)| *t)].into_iter().flatten().min();
            if next.is_none_or(|t| t > limit) || !self.step() {
                self.fail(&format!("{what}: not reached by virtual time {limit} ms (next event {next:?})"));
            }
        }
    }

    fn fail(&self, why: &str) -> ! {
        let trace = self.trace.iter().rev().take(60).rev().cloned().collect::<Vec<_>>().join("\n");
        panic!("{why} (now {} ms); last of the trace:\n{trace}", self.now)
    }

    fn log(&mut self, line: String) {
        self.trace.push(format!("{:>8} {line}", self.now));
    }

    fn connect(&mut self, i: usize, kept: bool) {
        let conn = self.next_conn;
        self.next_conn += 1;
        self.conns.insert(conn, i);
        let (name, info) = (self.agents[i].name.clone(), self.agents[i].info.clone());
        self.log(format!("{name} registers on conn {conn}"));
        if let Err(e) = self.core.agent_up(self.now, &name, conn, format!("sim:{name}"), info) {
            self.log(format!("{name} refused: {e}"));
            return;
        }
        let a = &mut self.agents[i];
        a.conn = Some(conn);
        a.silent = false;
        if !kept {
            a.held.clear();
        }
        // As a real agent: `Holding` names every task held, finished or not; then queued results go.
        let held: Vec<Held> = a.held.iter().map(|(task, h)| Held { task: *task, attempt: h.attempt }).collect();
        let queued: Vec<AgentMsg> = a.held.values().filter_map(|h| h.done.clone()).collect();
        a.held.retain(|_, h| h.done.is_none());
        self.agent_says(i, AgentMsg::Holding(held));
        for msg in queued {
            self.agent_says(i, msg);
        }
    }

    fn agent_says(&mut self, i: usize, msg: AgentMsg) {
        let Some(conn) = self.agents[i].conn else { return };
        let name = self.agents[i].name.clone();
        if !matches!(msg, AgentMsg::Heartbeat(_)) {
            self.log(format!("{name} (conn {conn}) says {msg:?}"));
        }
        self.core.agent_msg(self.now, &name, conn, msg);
    }

    fn disconnect(&mut self, i: usize, why: &str) {
        if let Some(conn) = self.agents[i].conn.take() {
            let name = self.agents[i].name.clone();
            self.log(format!("{name} (conn {conn}) disconnected: {why}"));
            self.core.agent_down(self.now, &name, conn);
        }
    }

    fn deliver(&mut self, ev: Ev) {
        match ev {
            Ev::Beat(i) => {
                let a = &self.agents[i];
                if a.conn.is_some() && !a.silent {
                    let busy = a.held.values().filter(|h| h.done.is_none()).count() as u32;
                    self.agent_says(i, AgentMsg::Heartbeat(Heartbeat { busy }));
                }
                if let Some(every) = self.agents[i].beat_every {
                    self.schedule(self.now + every, Ev::Beat(i));
                }
            }
            Ev::Answer(i, task, attempt) => {
                let a = &mut self.agents[i];
                let Some(h) = a.held.get_mut(&task).filter(|h| h.attempt == attempt && h.done.is_none()) else {
                    return; // cancelled, or dropped by a restart
                };
                let digest = Digest::of(format!("{task}/{attempt}/{}", a.name).as_bytes());
                let manifest = ManifestRef { media_type: oci::OCI_MANIFEST.into(), digest, size: 100 };
                let msg = AgentMsg::TaskDone { task, attempt, manifest, timings: vec![] };
                if a.conn.is_some() && !a.silent {
                    a.held.remove(&task);
                    self.agent_says(i, msg);
                    let a = &self.agents[i];
                    if a.draining && a.held.is_empty() {
                        self.disconnect(i, "drained");
                    }
                } else {
                    h.done = Some(msg);
                    let name = a.name.clone();
                    self.log(format!("{name} finished task {task} attempt {attempt} while cut off"));
                }
            }
            Ev::Agent(i, script) => {
                let name = self.agents[i].name.clone();
                self.log(format!("{name}: {script:?}"));
                match script {
                    Script::Silence => self.agents[i].silent = true,
                    Script::Vanish => self.disconnect(i, "vanished"),
                    Script::Return { holding } => {
                        if self.agents[i].conn.is_some() {
                            self.disconnect(i, "reconnecting");
                        }
                        self.connect(i, holding);
                    }
                    Script::Drain => {
                        self.agents[i].draining = true;
                        self.agent_says(i, AgentMsg::Draining);
                        if self.agents[i].held.is_empty() {
                            self.disconnect(i, "drained");
                        }
                    }
                    Script::Send(msg) => self.agent_says(i, msg),
                }
            }
            Ev::Submit(id, platforms) => {
                let platforms: Vec<&str> = platforms.iter().map(String::as_str).collect();
                let mut s = spec(&platforms);
                // Each build its own context: no warm-cache preference ties them to one agent.
                s.context = Digest::of(id.as_bytes());
                self.log(format!("submit {id} {platforms:?}"));
                self.core.submit(self.now, &id, "sim", s, None).unwrap();
            }
            Ev::Restart => {
                self.log("coordinator restarts".into());
                for i in 0..self.agents.len() {
                    self.agents[i].conn = None;
                }
                let store = self.store.as_ref().expect("restart_at checked");
                let mut core = Core::new(self.heartbeat_timeout_ms, self.max_attempts);
                core.recover(self.now, store.load().unwrap());
                core.start_epoch(store.begin_epoch().unwrap());
                self.core = core;
            }
        }
    }

    /// Commits what changed (persist before acknowledge), then carries out the core's actions
    /// until it has none left.
    fn flush(&mut self) {
        loop {
            let batch = self.core.take_batch();
            self.writes += batch.len();
            if let Some(store) = &self.store {
                store.commit(&batch).unwrap();
            }
            let actions: Vec<Action> = std::iter::from_fn(|| self.core.poll_action()).collect();
            if actions.is_empty() {
                return;
            }
            for action in actions {
                self.act(action);
            }
        }
    }

    fn act(&mut self, action: Action) {
        match action {
            Action::Emit { build, event } => {
                self.log(format!("{build}: {event:?}"));
                self.events.entry(build).or_default().push((self.now, event));
            }
            Action::Stitch { build, index, .. } => {
                self.log(format!("{build}: stitched"));
                self.core.stitched(&build, Ok(Digest::of(&index)), 0);
            }
            Action::CheckCached { task, .. } => self.core.cache_checked(self.now, task, false),
            Action::Close { conn, reason } | Action::Refuse { conn, reason } => {
                let Some(&i) = self.conns.get(&conn) else { return };
                if self.agents[i].conn == Some(conn) {
                    self.disconnect(i, &format!("closed by the coordinator: {reason}"));
                }
            }
            Action::Send { conn, msg } => {
                let Some(&i) = self.conns.get(&conn) else { return };
                if self.agents[i].conn != Some(conn) {
                    return; // lost on a dead connection
                }
                let name = self.agents[i].name.clone();
                self.log(format!("to {name} (conn {conn}): {}", short(&msg)));
                self.sent.push((self.now, name.clone(), msg.clone()));
                match msg {
                    CoordMsg::Assign(a) => self.assigned(i, *a),
                    CoordMsg::Cancel { task, attempt } => {
                        let a = &mut self.agents[i];
                        if a.held.get(&task).is_some_and(|h| h.attempt == attempt && h.done.is_none()) {
                            a.held.remove(&task);
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    fn assigned(&mut self, i: usize, a: Assignment) {
        let name = self.agents[i].name.clone();
        if self.agents[i].draining {
            self.agents[i].refused_while_draining += 1;
            self.agent_says(i, AgentMsg::Release { task: a.task, attempt: a.attempt });
            return;
        }
        for other in self.agents.iter().filter(|o| o.name != name) {
            if other.held.get(&a.task).is_some_and(|h| h.attempt == a.attempt && h.done.is_none()) {
                self.violations.push(format!(
                    "at {}: task {} attempt {} assigned to {name} while {} runs it",
                    self.now, a.task, a.attempt, other.name
                ));
            }
        }
        self.runs.push(Run {
            at: self.now,
            agent: name,
            task: a.task,
            attempt: a.attempt,
            build: a.build.clone(),
            platform: a.platform.to_string(),
        });
        self.agents[i].held.insert(a.task, HeldTask { attempt: a.attempt, done: None });
        if let Some(d) = self.agents[i].answer_after {
            self.schedule(self.now + d, Ev::Answer(i, a.task, a.attempt));
        }
    }

    /// The build's state name (`running`, `succeeded`, ...).
    pub fn state(&self, build: &str) -> &'static str {
        self.core.build_state(build).map(state_name).unwrap_or("unknown")
    }

    /// Results refused as stale so far.
    pub fn stale_refused(&self) -> u64 {
        self.core.stale_refused
    }

    /// (virtual time, agent, attempt) of every `Started` event of `build`.
    pub fn started(&self, build: &str) -> Vec<(u64, String, u32)> {
        self.events
            .get(build)
            .into_iter()
            .flatten()
            .filter_map(|(at, e)| match e {
                BuildEvent::Started { agent, attempt, .. } => Some((*at, agent.clone(), *attempt)),
                _ => None,
            })
            .collect()
    }

    /// (virtual time, reason) of every `Retrying` event of `build`.
    pub fn retries(&self, build: &str) -> Vec<(u64, String)> {
        self.events
            .get(build)
            .into_iter()
            .flatten()
            .filter_map(|(at, e)| match e {
                BuildEvent::Retrying { reason, .. } => Some((*at, reason.clone())),
                _ => None,
            })
            .collect()
    }

    /// (platform, agent) of every `PlatformDone` event of `build`, in order.
    pub fn done_by(&self, build: &str) -> Vec<(String, String)> {
        self.events
            .get(build)
            .into_iter()
            .flatten()
            .filter_map(|(_, e)| match e {
                BuildEvent::PlatformDone(r) => Some((r.platform.to_string(), r.agent.clone())),
                _ => None,
            })
            .collect()
    }

    /// The task id of `build`'s only (or first) run.
    pub fn task_of(&self, build: &str) -> TaskId {
        self.runs.iter().find(|r| r.build == build).unwrap_or_else(|| panic!("{build} never ran")).task
    }

    pub fn ended(&self, build: &str) -> bool {
        !matches!(self.state(build), "running" | "stitching" | "unknown")
    }

    pub fn agent_state(&self, name: &str) -> shared::proto::AgentState {
        self.core.agents().into_iter().find(|a| a.name == name).map(|a| a.state).expect("a known agent")
    }

    pub fn refused_while_draining(&self, name: &str) -> u32 {
        self.agents[self.index(name)].refused_while_draining
    }

    /// Tasks `name` holds right now (task, attempt).
    pub fn holds(&self, name: &str) -> BTreeSet<(TaskId, u32)> {
        self.agents[self.index(name)].held.iter().map(|(t, h)| (*t, h.attempt)).collect()
    }
}

fn short(msg: &CoordMsg) -> String {
    match msg {
        CoordMsg::Assign(a) => format!("Assign task {} attempt {} ({}, {})", a.task, a.attempt, a.build, a.platform),
        other => format!("{other:?}"),
    }
}

// The control-plane faults, in virtual time. Each names the end-to-end test it mirrors.

/// Mirrors `tests/faults.rs` `a_cut_link_moves_the_task_and_the_late_result_is_refused` and
/// `an_agent_killed_mid_run_loses_its_task_to_the_other_agent`.
#[test]
fn sim_a_lost_agent_s_task_moves_at_the_heartbeat_timeout_and_its_late_result_is_refused() {
    let mut sim = Sim::new(15_000, 3);
    sim.agent("lost", &["linux/arm64"], 1, Some(20_000));
    sim.submit_at(0, "b1", &["linux/arm64"]);
    sim.run_until("b1 to reach lost", 0, |s| s.runs.len() == 1);
    sim.agent("heir", &["linux/arm64"], 1, Some(1_000));
    // Its link is cut at 1 s (last heartbeat: registration at 0); it builds on and finishes
    // attempt 1 at 20 s, cut off; it comes back at 25 s still holding that result.
    sim.at(1_000, "lost", Script::Silence);
    sim.at(25_000, "lost", Script::Return { holding: true });
    sim.run_until("b1 to end", 60_000, |s| s.ended("b1"));
    assert_eq!(sim.state("b1"), "succeeded");
    assert_eq!(sim.started("b1"), [(0, "lost".into(), 1), (15_000, "heir".into(), 2)]);
    assert_eq!(
        sim.retries("b1"),
        [(15_000, "agent lost stopped sending heartbeats; retrying (attempt 2 of 3)".into())]
    );
    assert_eq!(sim.done_by("b1"), [("linux/arm64".into(), "heir".into())]);
    assert!(matches!(sim.events["b1"].last(), Some((16_000, BuildEvent::Succeeded { .. }))), "{:?}", sim.events);
    let task = sim.task_of("b1");
    let events = sim.events["b1"].len();

    sim.run_until("the late result to be refused", 30_000, |s| s.stale_refused() == 1);
    assert_eq!(sim.now, 25_000);
    // Told to drop the attempt it still named; its result changed nothing.
    let told: Vec<&(u64, String, CoordMsg)> = sim.sent.iter().filter(|(_, a, _)| a == "lost").collect();
    assert!(
        matches!(told.last(), Some((25_000, _, CoordMsg::Cancel { task: t, attempt: 1 })) if *t == task),
        "{told:?}"
    );
    assert_eq!(sim.events["b1"].len(), events);
    assert_eq!(sim.state("b1"), "succeeded");
    assert!(sim.holds("lost").is_empty(), "{:?}", sim.holds("lost"));
    assert_eq!(sim.runs.iter().map(|r| (r.agent.as_str(), r.attempt)).collect::<Vec<_>>(), [("lost", 1), ("heir", 2)]);
    assert!(sim.violations.is_empty(), "{:?}", sim.violations);
}

/// Mirrors `tests/faults.rs` `stale_results_from_a_presumed_dead_agent_are_all_refused`.
#[test]
fn sim_stale_results_for_an_attempt_no_longer_current_change_nothing() {
    let mut sim = Sim::new(15_000, 3);
    sim.agent("a", &["linux/riscv64"], 1, None);
    sim.submit_at(0, "b1", &["linux/riscv64"]);
    sim.run_until("b1 to reach a", 0, |s| s.runs.len() == 1);
    sim.agent("b", &["linux/riscv64"], 1, None);
    let task = sim.task_of("b1");
    sim.at(1_000, "a", Script::Silence);
    sim.run_until("attempt 2 on b", 20_000, |s| s.runs.len() == 2);
    assert_eq!((sim.now, sim.runs[1].agent.as_str(), sim.runs[1].attempt), (15_000, "b", 2));
    // a comes back saying it holds attempt 1: told to drop it.
    sim.at(16_000, "a", Script::Return { holding: true });
    sim.run_until("a to be told", 2_000, |s| {
        s.sent.iter().any(|(_, to, m)| to == "a" && matches!(m, CoordMsg::Cancel { .. }))
    });
    assert!(matches!(sim.sent.last(), Some((16_000, _, CoordMsg::Cancel { task: t, attempt: 1 })) if *t == task));

    let stale = |n: u8| {
        let manifest = ManifestRef { media_type: oci::OCI_MANIFEST.into(), digest: Digest::of(&[n]), size: 1 };
        let done = AgentMsg::TaskDone { task, attempt: 1, manifest, timings: vec![] };
        let failed = AgentMsg::TaskFailed { task, attempt: 1, error: "stale failure".into() };
        let log = AgentMsg::TaskLog { task, attempt: 1, line: "stale line".into() };
        [done, failed, log]
    };
    let (writes, events, sent, view) =
        (sim.writes, sim.events["b1"].clone(), sim.sent.len(), sim.core.build_view("b1"));
    for n in 0..250 {
        for msg in stale(n as u8) {
            sim.at(17_000, "a", Script::Send(msg.clone()));
            sim.at(17_000, "b", Script::Send(msg));
        }
    }
    sim.run_until("1,000 stale results refused", 1_000, |s| s.stale_refused() == 1_000);
    assert_eq!(sim.writes, writes, "a stale result wrote to the store");
    assert_eq!(sim.events["b1"], events, "a stale result reached the client");
    assert_eq!(sim.sent.len(), sent, "a stale result made the coordinator tell an agent something");
    assert_eq!(sim.core.build_view("b1"), view);
    assert_eq!(sim.state("b1"), "running");

    // b's result for attempt 2 is the result.
    let manifest = ManifestRef { media_type: oci::OCI_MANIFEST.into(), digest: Digest::of(b"fresh"), size: 2 };
    let done = AgentMsg::TaskDone { task, attempt: 2, manifest: manifest.clone(), timings: vec![] };
    sim.at(18_000, "b", Script::Send(done));
    sim.run_until("b1 to end", 1_000, |s| s.ended("b1"));
    assert_eq!(sim.state("b1"), "succeeded");
    let Some((18_000, BuildEvent::Succeeded { platforms, .. })) = sim.events["b1"].last() else {
        panic!("{:?}", sim.events["b1"])
    };
    assert_eq!((platforms[0].agent.as_str(), &platforms[0].manifest), ("b", &manifest));
    // And 1,000 more stale results after the end change nothing either.
    let (writes, events) = (sim.writes, sim.events["b1"].clone());
    for n in 0..500 {
        let [done, failed, _] = stale(n as u8);
        sim.at(19_000, "a", Script::Send(done));
        sim.at(19_000, "a", Script::Send(failed));
    }
    sim.run_until("2,000 stale results refused", 1_000, |s| s.stale_refused() == 2_000);
    assert_eq!((sim.writes, &sim.events["b1"]), (writes, &events));
    assert_eq!(sim.state("b1"), "succeeded");
}

/// Mirrors `tests/durability.rs` `a_sigtermed_agent_finishes_its_task_and_one_past_its_drain_limit_hands_it_back`
/// (its first half: the drain that finishes).
#[test]
fn sim_a_draining_agent_finishes_its_task_takes_no_new_work_and_queued_work_goes_elsewhere() {
    let mut sim = Sim::new(15_000, 3);
    sim.agent("leaving", &["linux/arm64"], 2, Some(10_000));
    sim.submit_at(0, "b1", &["linux/arm64"]);
    sim.run_until("b1 to reach leaving", 0, |s| s.runs.len() == 1);
    sim.agent("other", &["linux/arm64"], 1, Some(3_000));
    sim.at(1_000, "leaving", Script::Drain);
    // leaving has a free slot, other has one: b2 goes to other, b3 waits for it.
    sim.submit_at(2_000, "b2", &["linux/arm64"]);
    sim.submit_at(2_000, "b3", &["linux/arm64"]);
    sim.run_until("the submissions", 2_000, |s| s.now >= 2_000 && s.events.contains_key("b3"));
    assert_eq!(sim.agent_state("leaving"), shared::proto::AgentState::Draining);
    sim.run_until("every build to end", 60_000, |s| ["b1", "b2", "b3"].iter().all(|b| s.ended(b)));
    let runs: Vec<(u64, &str, &str, u32)> =
        sim.runs.iter().map(|r| (r.at, r.agent.as_str(), r.build.as_str(), r.attempt)).collect();
    assert_eq!(runs, [(0, "leaving", "b1", 1), (2_000, "other", "b2", 1), (5_000, "other", "b3", 1)]);
    for (b, agent) in [("b1", "leaving"), ("b2", "other"), ("b3", "other")] {
        assert_eq!(sim.state(b), "succeeded", "{b}");
        assert_eq!(sim.done_by(b), [("linux/arm64".into(), agent.into())], "{b}");
        assert!(sim.retries(b).is_empty(), "{b}: {:?}", sim.retries(b));
    }
    assert!(matches!(sim.events["b1"].last(), Some((10_000, BuildEvent::Succeeded { .. }))));
    assert_eq!(sim.refused_while_draining("leaving"), 0, "the coordinator assigned to a draining agent");
    // Done, it left; leaving with nothing held requeued nothing.
    assert_eq!(sim.agent_state("leaving"), shared::proto::AgentState::Offline);
}

/// Mirrors `tests/durability.rs` `a_coordinator_killed_at_each_step_of_a_build_ends_every_build_with_a_correct_index`
/// (step 2: killed while tasks run, they are kept, not rerun) and
/// `ten_concurrent_builds_across_a_coordinator_restart_all_end_none_lost`. No end-to-end test
/// waits out the grace period of an agent that never returns: only this one and the core's.
#[test]
fn sim_after_a_restart_an_agent_back_within_the_grace_keeps_its_task_and_a_missing_one_s_moves_at_the_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let store = crate::store::Store::open(dir.path()).unwrap();
    let mut sim = Sim::new(15_000, 3).with_store(store);
    sim.agent("keeps", &["linux/arm64"], 1, Some(30_000));
    sim.agent("gone", &["linux/amd64"], 1, None);
    sim.submit_at(0, "b1", &["linux/arm64", "linux/amd64"]);
    sim.run_until("both platforms to start", 0, |s| s.runs.len() == 2);
    sim.agent("spare", &["linux/amd64"], 1, Some(1_000));
    sim.restart_at(10_000);
    sim.at(11_000, "spare", Script::Return { holding: true });
    sim.at(12_000, "keeps", Script::Return { holding: true });
    sim.run_until("the restart", 10_000, |s| s.now >= 10_000);
    assert_eq!(sim.core.poll_timeout(), Some(10_000 + 15_000), "the grace deadline");
    sim.run_until("b1 to end", 60_000, |s| s.ended("b1"));
    assert_eq!(sim.state("b1"), "succeeded");
    assert_eq!(sim.started("b1"), [(0, "keeps".into(), 1), (0, "gone".into(), 1), (25_000, "spare".into(), 2)]);
    assert_eq!(
        sim.retries("b1"),
        [(25_000, "agent gone did not confirm the task within 15 s; retrying (attempt 2 of 3)".into())]
    );
    assert_eq!(sim.done_by("b1"), [("linux/amd64".into(), "spare".into()), ("linux/arm64".into(), "keeps".into())]);
    assert!(matches!(sim.events["b1"].last(), Some((30_000, BuildEvent::Succeeded { .. }))));
    // keeps was never told to drop its attempt, nor handed another.
    assert!(!sim.sent.iter().any(|(_, to, m)| to == "keeps" && matches!(m, CoordMsg::Cancel { .. })));
    assert_eq!(sim.runs.iter().filter(|r| r.agent == "keeps").count(), 1);
    assert!(sim.violations.is_empty(), "{:?}", sim.violations);
}

/// Mirrors `tests/durability.rs` `ten_concurrent_builds_across_a_coordinator_restart_all_end_none_lost`
/// and `tests/faults.rs` `two_missed_heartbeats_do_not_mark_an_agent_lost`, at fifty builds.
#[test]
fn sim_fifty_builds_on_three_agents_one_flapping_all_succeed_and_no_attempt_runs_twice() {
    let real = std::time::Instant::now();
    let mut sim = Sim::new(15_000, 3);
    let both = ["linux/amd64", "linux/arm64"];
    sim.agent("steady-a", &both, 2, Some(800));
    sim.agent("steady-b", &both, 2, Some(1_300));
    sim.agent("flappy", &both, 2, Some(900));
    // Away one second in every six, coming back alternately holding its tasks and restarted.
    for k in 0..20u64 {
        sim.at(5_000 + 6_000 * k, "flappy", Script::Vanish);
        sim.at(6_000 + 6_000 * k, "flappy", Script::Return { holding: k % 2 == 0 });
    }
    let ids: Vec<String> = (0..50).map(|i| format!("b{i:02}")).collect();
    for (i, id) in ids.iter().enumerate() {
        let platforms: &[&str] = if i % 2 == 0 { &both[..1] } else { &both };
        sim.submit_at(250 * i as u64, id, platforms);
    }
    sim.run_until("every build to end", 600_000, |s| ids.iter().all(|b| s.ended(b)));
    let failed: Vec<(&String, &str)> =
        ids.iter().map(|b| (b, sim.state(b))).filter(|(_, s)| *s != "succeeded").collect();
    assert!(failed.is_empty(), "{failed:?}");
    assert!(sim.violations.is_empty(), "{:?}", sim.violations);
    let mut attempts = BTreeSet::new();
    for r in &sim.runs {
        assert!(attempts.insert((r.task, r.attempt)), "task {} attempt {} handed out twice", r.task, r.attempt);
    }
    let retries: usize = ids.iter().map(|b| sim.retries(b).len()).sum();
    let on_flappy = sim.runs.iter().filter(|r| r.agent == "flappy").count();
    assert!(retries > 0 && on_flappy > 0, "the flapping never cost a task: {retries} retries, {on_flappy} on flappy");
    assert_eq!(sim.runs.len(), 75 + retries, "one run per platform plus one per retry");
    let elapsed = real.elapsed();
    eprintln!(
        "50 builds, {} runs ({retries} retries, {on_flappy} on flappy, {} stale results refused) in {} virtual ms, {elapsed:?} real",
        sim.runs.len(),
        sim.stale_refused(),
        sim.now
    );
    assert!(elapsed < std::time::Duration::from_secs(1), "took {elapsed:?} of real time");
}
