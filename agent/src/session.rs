//! The decisions an agent makes about its session, as plain functions: what it registers as, how
//! long it waits before trying again, and which tasks it holds (`Tasks`).

use std::collections::BTreeMap;
use std::time::Duration;

use shared::host::HostPlatforms;
use shared::proto::{AgentInfo, Held, TaskId};
use shared::Platform;

use crate::builder::BuilderInfo;
use crate::Config;

/// The registration: detected platforms, corrected by configuration. A platform listed as native
/// is never also offered as emulated. The label `builder=<name>` is added, so that builds can
/// `--require builder=docker`; it names the builder actually used, over a configured one.
pub fn agent_info(config: &Config, host: HostPlatforms, builder: &BuilderInfo) -> AgentInfo {
    let pc = &config.platforms;
    let mut native = pc.native.clone().unwrap_or(host.native);
    extend_unique(&mut native, &pc.extra_native);
    let mut emulated = pc.emulated.clone().unwrap_or(host.emulated);
    extend_unique(&mut emulated, &pc.extra_emulated);
    emulated.retain(|p| !native.contains(p));
    let mut labels = config.labels.clone();
    labels.insert("builder".into(), builder.name.clone());
    AgentInfo {
        native,
        emulated,
        labels,
        capacity: config.capacity.max(1),
        builder: builder.name.clone(),
        builder_version: builder.version.clone(),
        farm_version: shared::FARM_VERSION.to_string(),
        memory_limit: config.memory_limit,
        // farm's Docker builder cannot grant security.insecure (`docker build` has no --allow).
        allowed: config
            .allowed()
            .into_iter()
            .filter(|e| builder.name != "docker" || *e != shared::proto::Entitlement::SecurityInsecure)
            .collect(),
    }
}

/// How many builds a host runs at once unless told: one more than its cores (builds also wait on
/// the network and the disk), but no more than one per GiB of memory, and at least one. A Pi Zero 2 W
/// (4 cores, 512 MiB) gets 1, a Pi 4 with 2 GiB gets 2, an 8-core box with 32 GiB gets 9.
pub fn default_capacity(cores: usize, memory_bytes: u64) -> u32 {
    let by_cpu = cores as u64 + 1;
    let by_memory = memory_bytes / (1 << 30);
    by_cpu.min(by_memory).clamp(1, 32) as u32
}

/// `MemTotal` from /proc/meminfo's text, in bytes.
pub fn mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn extend_unique(list: &mut Vec<Platform>, more: &[Platform]) {
    for p in more {
        if !list.contains(p) {
            list.push(p.clone());
        }
    }
}

pub fn list(ps: &[Platform]) -> String {
    if ps.is_empty() {
        return "-".into();
    }
    ps.iter().map(ToString::to_string).collect::<Vec<_>>().join(",")
}

/// The wait before the next heartbeat: between 3/4 of the coordinator's `interval` and all of it,
/// `jitter` in [0, 1] picking where. Agents that connected together (after a coordinator restart)
/// then drift apart instead of beating in one burst every interval, and no beat is ever later
/// than the coordinator asked.
pub fn heartbeat_delay(interval: Duration, jitter: f64) -> Duration {
    interval.mul_f64(0.75 + 0.25 * jitter.clamp(0.0, 1.0))
}

/// Capped exponential backoff with jitter, so that a farm of agents does not reconnect in one
/// burst when its coordinator comes back.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self { initial, max, attempt: 0 }
    }

    /// The next delay; `jitter` in [0, 1] picks a point in the upper half of the window.
    pub fn next(&mut self, jitter: f64) -> Duration {
        let exp = self.initial.saturating_mul(1u32 << self.attempt.min(20));
        let ceiling = exp.min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        ceiling.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// The tasks this agent holds, across sessions, and its drain on shutdown. Pure: `net.rs` keeps it
/// behind one lock and does what its methods return. `H` is what stops a running task (a
/// cancellation token); `T` a point in time, passed in, never read here.
///
/// A task is held from its assignment until its result has been written to a session (or it is
/// cancelled, or handed back), so a reconnecting agent can say what it is still working on.
#[derive(Debug)]
pub struct Tasks<H, T> {
    held: BTreeMap<TaskId, Entry<H>>,
    /// Set on shutdown: the drain limit, after which what still runs is handed back.
    drain: Option<T>,
}

#[derive(Debug)]
struct Entry<H> {
    attempt: u32,
    stop: H,
    /// The result is queued for the coordinator, not yet written to a session.
    finished: bool,
}

/// What to do with an assignment.
#[derive(Debug, PartialEq, Eq)]
pub enum Assigned {
    /// Run it: it is now held.
    Start,
    /// The agent is draining: give it straight back (`Release`); it is not held.
    Refuse,
}

/// Where a drain stands (`Tasks::drain_step`).
#[derive(Debug, PartialEq, Eq)]
pub enum DrainStep<T> {
    /// Not draining.
    No,
    /// Tasks still run and the limit is not reached: wait, at the latest until this.
    Wait(T),
    /// Nothing is held any more: the session can end.
    Finished,
    /// The limit is up with tasks still held: flush the queued results, then `hand_back`.
    LimitReached,
}

/// The drain limit is up (`Tasks::hand_back`): nothing is held any more.
#[derive(Debug, PartialEq, Eq)]
pub struct HandBack<H> {
    /// Stop each of these (every task that was held, finished or not).
    pub stop: Vec<H>,
    /// Tell the coordinator these were not done (`Release`): the tasks with no result queued.
    pub release: Vec<Held>,
}

impl<H, T: Copy + Ord> Default for Tasks<H, T> {
    fn default() -> Self {
        Self { held: BTreeMap::new(), drain: None }
    }
}

impl<H, T: Copy + Ord> Tasks<H, T> {
    /// The coordinator assigned `task`: run it (now held, stopped through `stop`), unless draining.
    /// An assignment of a task already held replaces its entry.
    pub fn assigned(&mut self, task: TaskId, attempt: u32, stop: H) -> Assigned {
        if self.drain.is_some() {
            return Assigned::Refuse;
        }
        self.held.insert(task, Entry { attempt, stop, finished: false });
        Assigned::Start
    }

    /// `attempt` of `task` produced its result, now queued for the coordinator; the task stays held
    /// until `sent`. Returns whether the agent is now idle (every held task has a result).
    pub fn finished(&mut self, task: TaskId, attempt: u32) -> bool {
        if let Some(e) = self.held.get_mut(&task).filter(|e| e.attempt == attempt) {
            e.finished = true;
        }
        self.held.values().all(|e| e.finished)
    }

    /// The result of `attempt` of `task` was written to a session: it is no longer held.
    pub fn sent(&mut self, task: TaskId, attempt: u32) {
        if self.held.get(&task).is_some_and(|e| e.attempt == attempt && e.finished) {
            self.held.remove(&task);
        }
    }

    /// The coordinator cancelled `attempt` of `task`: what to stop, if it is held and still running
    /// (a result already queued goes anyway; an unknown or stale attempt changes nothing).
    pub fn cancelled(&mut self, task: TaskId, attempt: u32) -> Option<H> {
        if !self.held.get(&task).is_some_and(|e| e.attempt == attempt && !e.finished) {
            return None;
        }
        self.held.remove(&task).map(|e| e.stop)
    }

    /// A session was registered: the `Holding` it announces, every task held (finished or not).
    pub fn reconnected(&self) -> Vec<Held> {
        self.held.iter().map(|(task, e)| Held { task: *task, attempt: e.attempt }).collect()
    }

    /// Tasks running, for heartbeats (those with a result queued are done).
    pub fn busy(&self) -> u32 {
        self.held.values().filter(|e| !e.finished).count() as u32
    }

    /// Shutdown: take no more work; what still runs at `limit` is handed back. A second call keeps
    /// the first limit.
    pub fn drain(&mut self, limit: T) {
        self.drain.get_or_insert(limit);
    }

    /// The drain limit, if draining.
    pub fn draining(&self) -> Option<T> {
        self.drain
    }

    /// Where the drain stands at `now`.
    pub fn drain_step(&self, now: T) -> DrainStep<T> {
        match self.drain {
            None => DrainStep::No,
            Some(_) if self.held.is_empty() => DrainStep::Finished,
            Some(limit) if now >= limit => DrainStep::LimitReached,
            Some(limit) => DrainStep::Wait(limit),
        }
    }

    /// Between sessions: whether to stop reconnecting (draining, and nothing held or the limit up).
    pub fn done_draining(&self, now: T) -> bool {
        matches!(self.drain_step(now), DrainStep::Finished | DrainStep::LimitReached)
    }

    /// The drain limit is up: stop everything held, hand back what has no result.
    pub fn hand_back(&mut self) -> HandBack<H> {
        let mut out = HandBack { stop: Vec::new(), release: Vec::new() };
        for (task, e) in std::mem::take(&mut self.held) {
            if !e.finished {
                out.release.push(Held { task, attempt: e.attempt });
            }
            out.stop.push(e.stop);
        }
        out
    }

    /// The agent stops: everything held, to stop.
    pub fn stop_all(&mut self) -> Vec<H> {
        std::mem::take(&mut self.held).into_values().map(|e| e.stop).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Platform {
        s.parse().unwrap()
    }

    fn host() -> HostPlatforms {
        HostPlatforms {
            native: vec![p("linux/amd64"), p("linux/386")],
            emulated: vec![p("linux/arm64"), p("linux/arm/v7"), p("linux/arm/v6")],
        }
    }

    fn builder() -> BuilderInfo {
        BuilderInfo { name: "buildah".into(), version: "1.28.2".into() }
    }

    fn config() -> Config {
        Config::new("127.0.0.1:1".into(), "/ca".into(), "a".into(), "/w".into())
    }

    #[test]
    fn detected_platforms_pass_through() {
        let info = agent_info(&config(), host(), &builder());
        assert_eq!(info.native, host().native);
        assert_eq!(info.emulated, host().emulated);
        assert_eq!(info.builder_version, "1.28.2");
        assert_eq!(info.labels.get("builder").map(String::as_str), Some("buildah"));
        let docker = BuilderInfo { name: "docker".into(), version: "20.10.24".into() };
        let mut c = config();
        c.labels.insert("builder".into(), "configured".into());
        c.labels.insert("gpu".into(), "nvidia".into());
        let info = agent_info(&c, host(), &docker);
        assert_eq!(info.labels.get("builder").map(String::as_str), Some("docker"));
        assert_eq!(info.labels.get("gpu").map(String::as_str), Some("nvidia"));
    }

    #[test]
    fn configured_native_replaces_detection_and_wins_over_emulation() {
        let mut c = config();
        c.platforms.native = Some(vec![p("linux/arm64")]);
        let info = agent_info(&c, host(), &builder());
        assert_eq!(info.native, vec![p("linux/arm64")]);
        assert_eq!(info.emulated, vec![p("linux/arm/v7"), p("linux/arm/v6")]);
    }

    #[test]
    fn extras_add_and_empty_override_disables_emulation() {
        let mut c = config();
        c.platforms.extra_native = vec![p("linux/arm/v7"), p("linux/amd64")];
        c.platforms.emulated = Some(vec![]);
        let info = agent_info(&c, host(), &builder());
        assert_eq!(info.native, vec![p("linux/amd64"), p("linux/386"), p("linux/arm/v7")]);
        assert!(info.emulated.is_empty());
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let mut b = Backoff::new(Duration::from_millis(200), Duration::from_secs(2));
        let full: Vec<_> = (0..6).map(|_| b.next(1.0)).collect();
        assert_eq!(full, [200, 400, 800, 1600, 2000, 2000].map(Duration::from_millis).to_vec());
        b.reset();
        assert_eq!(b.next(0.0), Duration::from_millis(100));
    }

    #[test]
    fn heartbeats_are_jittered_but_never_late() {
        let interval = Duration::from_secs(4);
        assert_eq!(super::heartbeat_delay(interval, 0.0), Duration::from_secs(3));
        assert_eq!(super::heartbeat_delay(interval, 1.0), interval);
        assert_eq!(super::heartbeat_delay(interval, 7.0), interval);
    }

    /// Tasks whose stop handle names them, on a clock of seconds.
    type T = Tasks<&'static str, u64>;

    fn held(list: &[(TaskId, u32)]) -> Vec<Held> {
        list.iter().map(|&(task, attempt)| Held { task, attempt }).collect()
    }

    #[test]
    fn a_task_is_held_until_its_result_is_sent() {
        let mut t = T::default();
        assert_eq!(t.assigned(1, 1, "t1"), Assigned::Start);
        assert_eq!(t.assigned(2, 3, "t2"), Assigned::Start);
        assert_eq!(t.busy(), 2);
        assert!(!t.finished(1, 1), "task 2 still runs");
        assert_eq!(t.busy(), 1);
        assert_eq!(t.reconnected(), held(&[(1, 1), (2, 3)]), "a queued result is still held");
        t.sent(1, 1);
        assert_eq!(t.reconnected(), held(&[(2, 3)]));
        assert!(t.finished(2, 3), "idle");
        t.sent(2, 3);
        assert_eq!(t.reconnected(), held(&[]));
        assert_eq!(t.busy(), 0);
    }

    #[test]
    fn results_of_other_attempts_change_nothing() {
        let mut t = T::default();
        t.assigned(1, 2, "t1");
        assert!(!t.finished(1, 1), "attempt 1 is not the one held");
        assert_eq!(t.busy(), 1);
        t.sent(1, 1);
        t.sent(1, 2);
        assert_eq!(t.reconnected(), held(&[(1, 2)]), "attempt 2 has no result yet");
        t.finished(1, 2);
        t.sent(1, 1);
        assert_eq!(t.reconnected(), held(&[(1, 2)]), "attempt 1's message is not attempt 2's");
        t.sent(1, 2);
        assert!(t.reconnected().is_empty());
    }

    #[test]
    fn a_reconnect_reports_exactly_the_held_tasks() {
        let mut t = T::default();
        assert!(t.reconnected().is_empty());
        t.assigned(7, 1, "t7");
        t.assigned(3, 2, "t3");
        t.assigned(5, 1, "t5");
        t.finished(5, 1);
        assert_eq!(t.cancelled(3, 2), Some("t3"));
        assert_eq!(t.reconnected(), held(&[(5, 1), (7, 1)]));
        t.assigned(7, 2, "t7'");
        assert_eq!(t.reconnected(), held(&[(5, 1), (7, 2)]), "a reassignment replaces the entry");
    }

    #[test]
    fn cancelling_stops_a_running_task_only() {
        let mut t = T::default();
        assert_eq!(t.cancelled(9, 1), None, "unknown task: no-op");
        t.assigned(1, 2, "t1");
        assert_eq!(t.cancelled(1, 1), None, "a stale attempt: no-op");
        assert_eq!(t.cancelled(1, 2), Some("t1"));
        assert_eq!(t.cancelled(1, 2), None, "twice: no-op");
        assert!(t.reconnected().is_empty());
        t.assigned(2, 1, "t2");
        t.finished(2, 1);
        assert_eq!(t.cancelled(2, 1), None, "its result is already queued");
        assert_eq!(t.reconnected(), held(&[(2, 1)]));
        assert_eq!(t.busy(), 0);
    }

    #[test]
    fn a_draining_agent_refuses_work_and_waits_for_its_tasks() {
        let mut t = T::default();
        assert_eq!(t.drain_step(100), DrainStep::No);
        assert!(!t.done_draining(100));
        t.assigned(1, 1, "t1");
        t.drain(60);
        t.drain(90);
        assert_eq!(t.draining(), Some(60), "the first limit stands");
        assert_eq!(t.assigned(2, 1, "t2"), Assigned::Refuse);
        assert_eq!(t.reconnected(), held(&[(1, 1)]), "a refused task is not held");
        assert_eq!(t.drain_step(10), DrainStep::Wait(60));
        assert!(!t.done_draining(10));
        t.finished(1, 1);
        assert_eq!(t.drain_step(10), DrainStep::Wait(60), "until its result is sent");
        t.sent(1, 1);
        assert_eq!(t.drain_step(10), DrainStep::Finished);
        assert!(t.done_draining(10));
    }

    #[test]
    fn past_the_drain_limit_running_tasks_are_handed_back() {
        let mut t = T::default();
        t.assigned(1, 1, "t1");
        t.assigned(2, 4, "t2");
        t.finished(1, 1);
        t.drain(60);
        assert_eq!(t.drain_step(59), DrainStep::Wait(60));
        assert_eq!(t.drain_step(60), DrainStep::LimitReached);
        assert!(t.done_draining(60));
        let back = t.hand_back();
        assert_eq!(back, HandBack { stop: vec!["t1", "t2"], release: held(&[(2, 4)]) }, "task 1 has its result");
        assert!(t.reconnected().is_empty());
        assert_eq!(t.drain_step(61), DrainStep::Finished);
    }

    #[test]
    fn stopping_stops_everything_held() {
        let mut t = T::default();
        t.assigned(1, 1, "t1");
        t.assigned(2, 1, "t2");
        t.finished(2, 1);
        assert_eq!(t.stop_all(), vec!["t1", "t2"]);
        assert!(t.reconnected().is_empty());
        assert_eq!(t.stop_all(), Vec::<&str>::new());
    }

    #[test]
    fn default_capacity_follows_cores_and_memory() {
        const GIB: u64 = 1 << 30;
        assert_eq!(super::default_capacity(4, 512 << 20), 1, "Pi Zero 2 W");
        assert_eq!(super::default_capacity(4, 2 * GIB), 2, "Pi 4, 2 GiB");
        assert_eq!(super::default_capacity(4, 8 * GIB), 5, "Pi 5, 8 GiB");
        assert_eq!(super::default_capacity(2, 24 * GIB), 3, "a 2-core x86 box");
        assert_eq!(super::default_capacity(64, 512 * GIB), 32, "capped");
        assert_eq!(super::default_capacity(0, 0), 1);
        assert_eq!(super::mem_total("MemTotal:       24576000 kB\nMemFree: 1 kB\n"), Some(24576000 * 1024));
        assert_eq!(super::mem_total("nonsense"), None);
    }
}
