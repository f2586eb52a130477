//! The coordinator's state machine: agents, builds and their per-platform tasks.
//!
//! As in quinn-proto, nothing here performs I/O or reads a clock: the driver calls the `handle`
//! methods with the current time and then drains [`Action`]s (send this to that agent, tell
//! that client, push this index) and carries them out. Every rule of scheduling, retrying and
//! fencing is therefore testable with a virtual clock and no sockets.
//!
//! Fencing: a task's `attempt` grows each time it is handed out again. A log line or result that
//! names an older attempt, or comes from an agent that no longer holds the task, is ignored, so
//! an agent presumed lost can never overwrite the attempt that replaced it.

use std::collections::{BTreeMap, HashMap, VecDeque};

use shared::oci::{self, Descriptor, ImageRef};
use shared::proto::{
    AgentInfo, AgentMsg, AgentView, Assignment, BuildEvent, BuildSpec, CoordMsg, ManifestRef, PlatformResult, TaskId,
};
use shared::registry::Credentials;
use shared::{Digest, Platform};

use crate::fleet::{ConnId, Fleet, Registered};
use crate::sched::{self, Candidate, Placement};

/// Lines of a task's log kept to explain a failure.
const TAIL_LINES: usize = 20;

#[derive(Debug)]
pub enum Action {
    Send {
        conn: ConnId,
        msg: CoordMsg,
    },
    Close {
        conn: ConnId,
        reason: String,
    },
    Emit {
        build: String,
        event: BuildEvent,
    },
    /// Push `index` under every tag; report back with [`Core::stitched`].
    Stitch {
        build: String,
        index: Vec<u8>,
        tags: Vec<ImageRef>,
        insecure: Vec<String>,
        credentials: Option<Credentials>,
    },
}

#[derive(Debug)]
enum BuildState {
    Running,
    Stitching,
    Succeeded,
    Failed,
}

#[derive(Debug)]
struct Build {
    spec: BuildSpec,
    tags: Vec<ImageRef>,
    repository: String,
    tasks: Vec<TaskId>,
    state: BuildState,
}

#[derive(Debug)]
enum TaskState {
    Queued,
    Running { agent: String, conn: ConnId, emulated: bool, since: u64 },
    Done(PlatformResult),
    Failed,
    Cancelled,
}

#[derive(Debug)]
struct Task {
    build: String,
    platform: Platform,
    attempt: u32,
    state: TaskState,
    /// The last wait reason told to the client, so it is told once, not at every pass.
    waiting: Option<String>,
    tail: VecDeque<String>,
}

pub struct Core {
    fleet: Fleet,
    builds: BTreeMap<String, Build>,
    tasks: BTreeMap<TaskId, Task>,
    next_task: TaskId,
    /// (platform, context) → the agent that last built it: its layer cache is warm.
    warm: HashMap<(Platform, Digest), String>,
    max_attempts: u32,
    actions: VecDeque<Action>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SubmitError {
    #[error("no platform given: pass --platform, e.g. --platform linux/amd64,linux/arm64")]
    NoPlatforms,
    #[error("no tag given: pass -t REGISTRY/REPOSITORY:TAG; farm pushes every build to a registry")]
    NoTags,
    #[error("{0}")]
    BadTag(String),
    #[error("tags {0} and {1} name different repositories; all tags of one build must share one repository")]
    MixedRepositories(String, String),
    #[error("a build with id {0} exists already")]
    Duplicate(String),
}

impl Core {
    pub fn new(heartbeat_timeout_ms: u64, max_attempts: u32) -> Self {
        Core {
            fleet: Fleet::new(heartbeat_timeout_ms),
            builds: BTreeMap::new(),
            tasks: BTreeMap::new(),
            next_task: 1,
            warm: HashMap::new(),
            max_attempts: max_attempts.max(1),
            actions: VecDeque::new(),
        }
    }

    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// When [`Core::handle_timeout`] next has something to do.
    pub fn poll_timeout(&self) -> Option<u64> {
        self.fleet.next_deadline()
    }

    pub fn handle_timeout(&mut self, now: u64) {
        for (name, conn) in self.fleet.expire(now) {
            self.actions.push_back(Action::Close { conn, reason: "no heartbeat within the timeout".into() });
            self.agent_lost(&name, conn, "stopped sending heartbeats");
        }
        self.schedule(now);
    }

    pub fn agent_up(&mut self, now: u64, name: &str, conn: ConnId, address: String, info: AgentInfo) {
        let interval = self.fleet.heartbeat_interval_ms();
        self.actions.push_back(Action::Send { conn, msg: CoordMsg::Registered { heartbeat_interval_ms: interval } });
        if let Registered::Replaced(old) = self.fleet.register(now, name, conn, address, info) {
            self.actions.push_back(Action::Close {
                conn: old,
                reason: "replaced by a newer connection of the same agent".into(),
            });
            self.agent_lost(name, old, "reconnected");
        }
        self.schedule(now);
    }

    pub fn agent_down(&mut self, now: u64, name: &str, conn: ConnId) -> bool {
        let offline = self.fleet.disconnect(name, conn);
        if offline {
            self.agent_lost(name, conn, "disconnected");
            self.schedule(now);
        }
        offline
    }

    pub fn agent_msg(&mut self, now: u64, name: &str, conn: ConnId, msg: AgentMsg) {
        match msg {
            AgentMsg::Register(_) => {
                self.actions.push_back(Action::Close { conn, reason: "already registered on this connection".into() });
            }
            AgentMsg::Heartbeat(hb) => {
                self.fleet.heartbeat(now, name, conn, &hb);
            }
            AgentMsg::TaskLog { task, attempt, line } => {
                if let Some(t) = self.current(task, attempt, name) {
                    if t.tail.len() == TAIL_LINES {
                        t.tail.pop_front();
                    }
                    t.tail.push_back(line.clone());
                    let event = BuildEvent::Log { platform: t.platform.clone(), line };
                    let build = t.build.clone();
                    self.actions.push_back(Action::Emit { build, event });
                }
            }
            AgentMsg::TaskDone { task, attempt, manifest } => self.task_done(now, task, attempt, name, manifest),
            AgentMsg::TaskFailed { task, attempt, error } => {
                let Some(t) = self.current(task, attempt, name) else { return };
                t.state = TaskState::Failed;
                let (build, platform) = (t.build.clone(), t.platform.clone());
                let last_lines = t.tail.iter().cloned().collect();
                self.emit(
                    &build,
                    BuildEvent::PlatformFailed { platform: platform.clone(), error: error.clone(), last_lines },
                );
                self.fail_build(&build, format!("{platform} failed: {error}"));
                self.schedule(now);
            }
        }
    }

    /// Accepts a build: one queued task per platform.
    pub fn submit(&mut self, now: u64, id: &str, spec: BuildSpec) -> Result<(), SubmitError> {
        if self.builds.contains_key(id) {
            return Err(SubmitError::Duplicate(id.into()));
        }
        if spec.platforms.is_empty() {
            return Err(SubmitError::NoPlatforms);
        }
        let tags: Vec<ImageRef> = spec
            .tags
            .iter()
            .map(|t| t.parse::<ImageRef>())
            .collect::<Result<_, _>>()
            .map_err(|e| SubmitError::BadTag(e.to_string()))?;
        let first = tags.first().ok_or(SubmitError::NoTags)?.clone();
        if let Some(other) = tags.iter().find(|t| !t.same_repository(&first)) {
            return Err(SubmitError::MixedRepositories(first.to_string(), other.to_string()));
        }
        let mut task_ids = Vec::new();
        for platform in &spec.platforms {
            let id_ = self.next_task;
            self.next_task += 1;
            self.tasks.insert(
                id_,
                Task {
                    build: id.into(),
                    platform: platform.clone(),
                    attempt: 1,
                    state: TaskState::Queued,
                    waiting: None,
                    tail: VecDeque::new(),
                },
            );
            task_ids.push(id_);
        }
        let repository = format!("{}/{}", first.registry, first.repository);
        self.builds.insert(id.into(), Build { spec, tags, repository, tasks: task_ids, state: BuildState::Running });
        self.schedule(now);
        Ok(())
    }

    /// The driver's report on pushing a build's index.
    pub fn stitched(&mut self, build: &str, result: Result<Digest, String>) {
        let Some(b) = self.builds.get_mut(build) else { return };
        if !matches!(b.state, BuildState::Stitching) {
            return;
        }
        match result {
            Ok(index) => {
                b.state = BuildState::Succeeded;
                let platforms = b
                    .tasks
                    .iter()
                    .filter_map(|t| match &self.tasks[t].state {
                        TaskState::Done(r) => Some(r.clone()),
                        _ => None,
                    })
                    .collect();
                let tags = b.spec.tags.clone();
                self.emit(build, BuildEvent::Succeeded { index, tags, platforms });
            }
            Err(e) => {
                b.state = BuildState::Failed;
                self.emit(build, BuildEvent::Failed { error: format!("pushing the image index failed: {e}") });
            }
        }
    }

    pub fn agents(&self) -> Vec<AgentView> {
        let mut busy: HashMap<&str, u32> = HashMap::new();
        for t in self.tasks.values() {
            if let TaskState::Running { agent, .. } = &t.state {
                *busy.entry(agent).or_default() += 1;
            }
        }
        let mut view = self.fleet.view();
        for a in &mut view {
            a.busy = busy.get(a.name.as_str()).copied().unwrap_or(0);
        }
        view
    }

    /// The task if `agent` holds its current `attempt` and it is running; `None` for anything stale.
    fn current(&mut self, task: TaskId, attempt: u32, agent: &str) -> Option<&mut Task> {
        self.tasks
            .get_mut(&task)
            .filter(|t| t.attempt == attempt && matches!(&t.state, TaskState::Running { agent: a, .. } if a == agent))
    }

    fn task_done(&mut self, now: u64, task: TaskId, attempt: u32, agent: &str, manifest: ManifestRef) {
        let Some(t) = self.current(task, attempt, agent) else { return };
        let TaskState::Running { emulated, since, .. } = t.state else { return };
        let result = PlatformResult {
            platform: t.platform.clone(),
            manifest,
            agent: agent.into(),
            emulated,
            duration_ms: now.saturating_sub(since),
        };
        t.state = TaskState::Done(result.clone());
        let build_id = t.build.clone();
        self.emit(&build_id, BuildEvent::PlatformDone(result.clone()));
        let b = self.builds.get_mut(&build_id).expect("a task's build exists");
        self.warm.insert((result.platform, b.spec.context.clone()), agent.into());
        let done: Option<Vec<Descriptor>> = b
            .tasks
            .iter()
            .map(|id| match &self.tasks[id].state {
                TaskState::Done(r) => Some(Descriptor {
                    media_type: r.manifest.media_type.clone(),
                    digest: r.manifest.digest.clone(),
                    size: r.manifest.size,
                    platform: Some((&r.platform).into()),
                    annotations: Default::default(),
                }),
                _ => None,
            })
            .collect();
        if let (Some(descriptors), BuildState::Running) = (done, &b.state) {
            b.state = BuildState::Stitching;
            self.actions.push_back(Action::Stitch {
                build: build_id,
                index: oci::image_index(&descriptors),
                tags: b.tags.clone(),
                insecure: b.spec.insecure_registries.clone(),
                credentials: b.spec.credentials.clone(),
            });
        }
        self.schedule(now);
    }

    /// The agent's tasks on `conn` go back to the queue, or fail their build after too many attempts.
    fn agent_lost(&mut self, agent: &str, conn: ConnId, why: &str) {
        let lost: Vec<TaskId> = self
            .tasks
            .iter()
            .filter(
                |(_, t)| matches!(&t.state, TaskState::Running { agent: a, conn: c, .. } if a == agent && *c == conn),
            )
            .map(|(id, _)| *id)
            .collect();
        for id in lost {
            let t = self.tasks.get_mut(&id).expect("listed above");
            let (build, platform) = (t.build.clone(), t.platform.clone());
            if t.attempt >= self.max_attempts {
                t.state = TaskState::Failed;
                let error = format!("agent {agent} {why}; gave up after {} attempts", t.attempt);
                self.emit(
                    &build,
                    BuildEvent::PlatformFailed { platform: platform.clone(), error: error.clone(), last_lines: vec![] },
                );
                self.fail_build(&build, format!("{platform} failed: {error}"));
            } else {
                t.attempt += 1;
                t.state = TaskState::Queued;
                t.waiting = None;
                t.tail.clear();
                let reason = format!("agent {agent} {why}; retrying (attempt {} of {})", t.attempt, self.max_attempts);
                self.emit(&build, BuildEvent::Retrying { platform, reason });
            }
        }
    }

    fn fail_build(&mut self, build: &str, error: String) {
        let Some(b) = self.builds.get_mut(build) else { return };
        if matches!(b.state, BuildState::Failed | BuildState::Succeeded) {
            return;
        }
        b.state = BuildState::Failed;
        for id in &b.tasks {
            let t = self.tasks.get_mut(id).expect("a build's tasks exist");
            match &t.state {
                TaskState::Running { conn, .. } => {
                    let msg = CoordMsg::Cancel { task: *id, attempt: t.attempt };
                    self.actions.push_back(Action::Send { conn: *conn, msg });
                    t.state = TaskState::Cancelled;
                }
                TaskState::Queued => t.state = TaskState::Cancelled,
                _ => {}
            }
        }
        self.emit(build, BuildEvent::Failed { error });
    }

    fn emit(&mut self, build: &str, event: BuildEvent) {
        self.actions.push_back(Action::Emit { build: build.into(), event });
    }

    /// Hands every queued task that can run now to its agent, in submission order.
    fn schedule(&mut self, now: u64) {
        let mut free: HashMap<String, u32> = self.fleet.online().map(|(n, i)| (n.to_string(), i.capacity)).collect();
        for t in self.tasks.values() {
            if let TaskState::Running { agent, .. } = &t.state {
                if let Some(f) = free.get_mut(agent) {
                    *f = f.saturating_sub(1);
                }
            }
        }
        let queued: Vec<TaskId> =
            self.tasks.iter().filter(|(_, t)| matches!(t.state, TaskState::Queued)).map(|(id, _)| *id).collect();
        for id in queued {
            let t = &self.tasks[&id];
            let b = &self.builds[&t.build];
            let warm = self.warm.get(&(t.platform.clone(), b.spec.context.clone())).map(String::as_str);
            let need =
                sched::Need { platform: &t.platform, require: &b.spec.require, emulation: b.spec.emulation, warm };
            let candidates = self.fleet.online().map(|(name, info)| Candidate {
                name,
                native: &info.native,
                emulated: &info.emulated,
                labels: &info.labels,
                free: free.get(name).copied().unwrap_or(0),
            });
            let placement = sched::place(&need, candidates);
            match placement {
                Placement::Run { agent, emulated } => {
                    let conn = self.fleet.conn_of(&agent).expect("candidates are online");
                    *free.get_mut(&agent).expect("candidates have slots") -= 1;
                    let assignment = Assignment {
                        task: id,
                        attempt: t.attempt,
                        build: t.build.clone(),
                        platform: t.platform.clone(),
                        emulated,
                        repository: b.repository.clone(),
                        context: b.spec.context.clone(),
                        dockerfile: b.spec.dockerfile.clone(),
                        build_args: b.spec.build_args.clone(),
                        target: b.spec.target.clone(),
                        no_cache: b.spec.no_cache,
                        insecure_registries: b.spec.insecure_registries.clone(),
                        credentials: b.spec.credentials.clone(),
                    };
                    let event = BuildEvent::Started {
                        platform: t.platform.clone(),
                        agent: agent.clone(),
                        emulated,
                        attempt: t.attempt,
                    };
                    let build = t.build.clone();
                    self.actions.push_back(Action::Send { conn, msg: CoordMsg::Assign(Box::new(assignment)) });
                    self.emit(&build, event);
                    let t = self.tasks.get_mut(&id).expect("queued task");
                    t.state = TaskState::Running { agent, conn, emulated, since: now };
                    t.waiting = None;
                }
                Placement::Wait(reason) => {
                    let t = self.tasks.get_mut(&id).expect("queued task");
                    if t.waiting.as_ref() != Some(&reason) {
                        t.waiting = Some(reason.clone());
                        let (build, platform) = (t.build.clone(), t.platform.clone());
                        self.emit(&build, BuildEvent::Waiting { platform, reason });
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
