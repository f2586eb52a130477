//! The coordinator's state machine: agents, builds and their per-platform tasks.
//!
//! As in quinn-proto and raft-rs, nothing here performs I/O or reads a clock: the driver calls the
//! `handle` methods with the current time, then takes the changed records ([`Core::take_batch`])
//! and commits them, and only then carries out the [`Action`]s (send this to that agent, tell that
//! client, push this index). Every acknowledgement therefore follows the write it acknowledges,
//! and every rule of scheduling, retrying and fencing is testable with a virtual clock.
//!
//! Fencing: a task's `attempt` grows each time it is handed out again. A log line or result that
//! names an older attempt, or comes from an agent that no longer holds the task, is ignored, so an
//! agent presumed lost can never overwrite the attempt that replaced it.
//!
//! Recovery: after a restart, or when an agent reconnects, its running tasks are not requeued at
//! once: the agent gets a grace period to come back and say which tasks it still holds
//! (`AgentMsg::Holding`). What it holds carries on; what it does not is requeued.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use shared::annotation::{self, AnnotationKind};
use shared::cache::CacheRef;
use shared::oci::{Descriptor, ImageRef};
use shared::proto::ProvenanceMode;
use shared::proto::{
    AgentInfo, AgentMsg, AgentView, Assignment, BuildEvent, BuildSpec, BuildView, ContextLimits, CoordMsg, Held,
    ManifestRef, Phase, PlatformResult, Secret, TaskId, TaskView,
};
use shared::provenance;
use shared::registry::Credentials;
use shared::{Digest, Platform};

use crate::fleet::{AgentRecord, ConnId, Fleet, Registered};
use crate::sched::{self, Candidate, Emulation, Placement};
use crate::store::{Batch, Loaded};

/// Lines of a task's log kept to explain a failure.
const TAIL_LINES: usize = 20;

/// How many (platform, context) pairs `--emulation fastest` remembers durations for.
const HISTORY_KEYS: usize = 4096;

/// With a duration recorded only in the other mode, an emulated build is expected to take this
/// many times a native one (a compile under QEMU is several times slower).
const EMULATION_SLOWDOWN: u64 = 5;

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
    /// Refuse a registration: tell the agent on `conn` why (`CoordMsg::Refused`), let that reach
    /// it, then close the connection.
    Refuse {
        conn: ConnId,
        reason: String,
    },
    Emit {
        build: String,
        event: BuildEvent,
    },
    /// Push `published`'s blobs, attestation manifests and referrers (with their fallback tags),
    /// then `index` under every tag (no tags: keep it in the content store); report back with
    /// [`Core::stitched`]. `attestations`: each platform's provenance (none with
    /// `--provenance=false` or without a registry), for a signer.
    Stitch {
        build: String,
        index: Vec<u8>,
        published: Box<provenance::Published>,
        attestations: Vec<provenance::Attestation>,
        tags: Vec<ImageRef>,
        insecure: Vec<String>,
        credentials: Option<Credentials>,
        /// `--sign`: sign the pushed index (the coordinator's `sign = true` signs every one).
        sign: bool,
    },
    /// Does the registry (an empty repository: the content store) still hold this earlier
    /// result? Report with [`Core::cache_checked`].
    CheckCached {
        task: TaskId,
        repository: String,
        digest: Digest,
        insecure: Vec<String>,
        credentials: Option<Credentials>,
    },
}

/// An earlier successful result, reusable by a task with the same inputs.
#[derive(Debug, Clone, PartialEq, Eq)]
struct CacheEntry {
    manifest: ManifestRef,
    builder_version: String,
    /// The provenance statement of the build that made it (the same bytes its task holds).
    statement: Option<Arc<[u8]>>,
}

/// Names everything a task's result depends on: context, Dockerfile, args, target, platform, the
/// digest every base image tag resolved to when the build was submitted, the secrets' hashes, and
/// what the builder writes into the image: the labels and this platform's manifest annotations.
/// (Index and descriptor annotations are added at stitching, outside the cached result.)
/// the inputs that change what RUN steps see (named contexts by manifest digest, `--network
/// none`, `--add-host`). `--pull` is not in it: the base digests already are.
pub fn cache_key(spec: &BuildSpec, platform: &Platform, bases: &[(String, Digest)]) -> String {
    let secrets: Vec<(&String, String)> =
        spec.secrets.iter().map(|s| (&s.id, shared::digest::sha256_hex(&s.value))).collect();
    let inputs = (
        "farm result cache v1",
        &spec.context,
        &spec.dockerfile,
        &spec.build_args,
        &spec.target,
        platform,
        bases,
        secrets,
        &spec.entitlements,
        &spec.labels,
        annotation::for_platform(&spec.annotations, AnnotationKind::Manifest, platform),
        &spec.inputs.contexts,
        spec.inputs.no_network,
        &spec.inputs.add_hosts,
    );
    shared::digest::sha256_hex(&postcard::to_allocvec(&inputs).expect("plain data encodes"))
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum BuildState {
    Running,
    Stitching,
    Succeeded { index: Digest },
    Failed { error: String },
    Cancelled,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Build {
    spec: BuildSpec,
    tags: Vec<ImageRef>,
    repository: String,
    tasks: Vec<TaskId>,
    state: BuildState,
    client: String,
    created_ms: u64,
    /// The Dockerfile's digest (text for mode=max) and the resolved bases, for provenance.
    source: provenance::Source,
    /// Held in memory only: never persisted, never logged.
    #[serde(skip)]
    credentials: Option<Credentials>,
    #[serde(skip)]
    secrets: Vec<Secret>,
}

/// What one build, and one client, may ask for. Each has a config key, named in its error.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_builds_per_client: usize,
    pub max_platforms_per_build: usize,
    pub max_build_args: usize,
    pub max_build_arg_bytes: usize,
    pub max_tags: usize,
    pub max_secrets: usize,
    pub max_secret_bytes: usize,
    /// The coordinator's `max_context_files` / `max_context_bytes`, handed to agents with each
    /// assignment so that they check a context against the limits it was accepted under.
    pub context: ContextLimits,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_builds_per_client: 16,
            max_platforms_per_build: 16,
            max_build_args: 64,
            max_build_arg_bytes: 64 << 10,
            max_tags: 16,
            max_secrets: 16,
            max_secret_bytes: 512 << 10,
            context: shared::context::ContextLimits::default().wire(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum TaskState {
    Queued,
    /// `conn` is the agent connection that holds it; `None` while the agent has yet to confirm
    /// it after a restart or a reconnection (see [`Core`]'s grace period).
    Running {
        agent: String,
        #[serde(skip)]
        conn: Option<ConnId>,
        emulated: bool,
        since: u64,
    },
    Done(PlatformResult),
    Failed(String),
    Cancelled,
    /// An earlier identical result is being checked in the registry.
    Verifying(ManifestRef),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Task {
    build: String,
    platform: Platform,
    attempt: u32,
    state: TaskState,
    /// The result cache's key for this task's inputs; `None` when they could not all be known
    /// (a base image that did not resolve), which disables the cache for it.
    cache_key: Option<String>,
    /// The builder version that produced a `Done` result, for the cache.
    #[serde(default)]
    builder_version: Option<String>,
    /// The in-toto statement of the build that made a `Done` result (a cached one: the earlier
    /// build's). Shared with the result cache's entry: one copy per result, not two.
    #[serde(default)]
    statement: Option<Arc<[u8]>>,
    /// The last wait reason told to the client, so it is told once, not at every pass.
    #[serde(skip)]
    waiting: Option<String>,
    #[serde(skip)]
    tail: VecDeque<String>,
}

pub struct Core {
    fleet: Fleet,
    builds: BTreeMap<String, Build>,
    tasks: BTreeMap<TaskId, Task>,
    next_task: TaskId,
    /// (platform, context) → the agent that last built it: its layer cache is warm.
    warm: HashMap<(Platform, Digest), String>,
    /// (platform, context) → agent → (emulated, how long its last build took): what
    /// `--emulation fastest` expects. In memory only, at most [`HISTORY_KEYS`] keys.
    history: HashMap<(Platform, Digest), BTreeMap<String, (bool, u64)>>,
    /// Results refused because their attempt was no longer current (for the metrics).
    stale_refused: u64,
    /// The result cache: at most [`HISTORY_KEYS`] entries in memory (rebuilt from the store's
    /// tasks at start).
    cache: HashMap<String, CacheEntry>,
    /// Running tasks whose agent must confirm them by this time, or lose them.
    claims: BTreeMap<TaskId, u64>,
    /// Agents that said they cannot run a task (`AgentMsg::Unfit`: a full disk): it is not placed
    /// on them again. In memory only.
    unfit: HashMap<TaskId, BTreeSet<String>>,
    grace_ms: u64,
    max_attempts: u32,
    limits: Limits,
    /// The coordinator's `cache_repo`: every build's layer cache, per platform, unless the build
    /// names its own (`--cache-to` / `--cache-from`).
    cache_repo: Option<CacheRef>,
    /// (cache repository, image repository, Dockerfile, target) → the cache images a cold agent
    /// imports before building it: what the last build of it exported for its layer-less steps
    /// ([`shared::cache::StepLog::imports`]). In memory only, at most [`HISTORY_KEYS`] keys.
    cache_chains: HashMap<ChainKey, Vec<String>>,
    /// Running tasks that export a layer cache: their chain's key and their log so far.
    step_logs: HashMap<TaskId, (ChainKey, shared::cache::StepLog)>,
    actions: VecDeque<Action>,
    dirty_builds: BTreeSet<String>,
    dirty_tasks: BTreeSet<TaskId>,
    dirty_agents: BTreeSet<String>,
    /// Ended builds in the order they ended; past `keep_ended`, the oldest leave memory (they
    /// stay in the store), so a coordinator's memory does not grow with every build it ever ran.
    ended: VecDeque<String>,
    keep_ended: usize,
    /// This coordinator's certificate name, and each agent's certificate digest (provenance).
    identity: String,
    certificates: HashMap<String, String>,
}

/// Which builds share a cache chain: the platform's cache repository, the image's repository,
/// the Dockerfile and the target.
type ChainKey = (String, String, String, Option<String>);

/// The repositories one platform's layer cache is exported to and imported from: the build's
/// `--cache-to` / `--cache-from`, else the coordinator's `cache_repo` (for both), each below its
/// reference in a repository of the platform's own ([`CacheRef::for_platform`]). `--no-cache`
/// imports nothing (the fresh layers are still exported).
pub fn cache_for(spec: &BuildSpec, default: Option<&CacheRef>, platform: &Platform) -> (Option<String>, Vec<String>) {
    let parse = |r: &String| CacheRef::parse_ref(r, "cache").ok();
    let to = spec.cache_to.as_ref().and_then(parse).or_else(|| default.cloned());
    let mut from: Vec<CacheRef> = spec.cache_from.iter().filter_map(parse).collect();
    if from.is_empty() {
        from.extend(default.cloned());
    }
    if spec.no_cache {
        from.clear();
    }
    let mut from: Vec<String> = from.iter().map(|c| c.for_platform(platform)).collect();
    from.dedup();
    (to.map(|c| c.for_platform(platform)), from)
}

/// Ended builds kept in memory: as many as `farm builds` can list at once.
pub const KEEP_ENDED_BUILDS: usize = 1000;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SubmitError {
    #[error("no platform given: pass --platform, e.g. --platform linux/amd64,linux/arm64")]
    NoPlatforms,
    #[error("{0}")]
    BadTag(String),
    #[error("tags {0} and {1} name different repositories; all tags of one build must share one repository")]
    MixedRepositories(String, String),
    #[error("a build with id {0} exists already")]
    Duplicate(String),
    #[error(
        "--sign signs the image in the registry it is pushed to, and this build pushes to none: push it (-t \
         REGISTRY/REPOSITORY:TAG) or drop --sign"
    )]
    SignWithoutRegistry,
    #[error("{what} is {got}, over the limit of {limit} (config key {key})")]
    Limit { what: String, got: usize, limit: usize, key: &'static str },
    #[error("{0}")]
    BadCache(String),
}

impl Core {
    pub fn new(heartbeat_timeout_ms: u64, max_attempts: u32) -> Self {
        Core {
            fleet: Fleet::new(heartbeat_timeout_ms),
            builds: BTreeMap::new(),
            tasks: BTreeMap::new(),
            next_task: 1,
            warm: HashMap::new(),
            history: HashMap::new(),
            stale_refused: 0,
            cache: HashMap::new(),
            claims: BTreeMap::new(),
            unfit: HashMap::new(),
            grace_ms: heartbeat_timeout_ms,
            max_attempts: max_attempts.max(1),
            limits: Limits::default(),
            cache_repo: None,
            cache_chains: HashMap::new(),
            step_logs: HashMap::new(),
            actions: VecDeque::new(),
            dirty_builds: BTreeSet::new(),
            dirty_tasks: BTreeSet::new(),
            dirty_agents: BTreeSet::new(),
            ended: VecDeque::new(),
            keep_ended: KEEP_ENDED_BUILDS,
            identity: shared::tls::COORDINATOR_NAME.into(),
            certificates: HashMap::new(),
        }
    }

    /// The coordinator's certificate name, as provenance names it.
    pub fn with_identity(mut self, name: &str) -> Self {
        self.identity = name.into();
        self
    }

    /// The certificate an agent connected with (`sha256:<hex>`), as provenance names it.
    pub fn agent_certificate(&mut self, name: &str, certificate: Option<String>) {
        match certificate {
            Some(c) => self.certificates.insert(name.into(), c),
            None => self.certificates.remove(name),
        };
    }

    /// For a build whose platforms are done: each platform manifest's digest and its in-toto
    /// statement (SLSA provenance v1) as JSON bytes, in platform order; what a signer signs.
    /// Empty with `--provenance=false`. A cached platform's is the build's that made it.
    pub fn statements(&self, build: &str) -> Vec<(Digest, Vec<u8>)> {
        provenance::statements(&self.attestations(build))
    }

    fn attestations(&self, build: &str) -> Vec<provenance::Attestation> {
        let Some(b) = self.builds.get(build) else { return vec![] };
        if b.spec.provenance == ProvenanceMode::Off {
            return vec![];
        }
        b.tasks
            .iter()
            .filter_map(|id| match &self.tasks[id] {
                Task { state: TaskState::Done(r), statement: Some(s), .. } => Some(provenance::Attestation {
                    subject: Descriptor::new(&r.manifest.media_type, r.manifest.digest.clone(), r.manifest.size),
                    statement: s.to_vec(),
                }),
                _ => None,
            })
            .collect()
    }

    /// Task ids of this run start at `epoch << 40` (see [`crate::store::Store::begin_epoch`]):
    /// the driver sends assignments while their commit is still under way, so an id must never
    /// be reused, not even one a crashed run handed out without writing it down.
    pub fn start_epoch(&mut self, epoch: u64) {
        self.next_task = self.next_task.max(epoch << 40);
    }

    /// Keeps at most `n` ended builds in memory (the rest remain in the store).
    pub fn with_ended_builds_kept(mut self, n: usize) -> Self {
        self.keep_ended = n;
        self
    }

    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// The `cache_repo` every build's platforms import and export their layer cache under.
    pub fn with_cache_repo(mut self, cache_repo: Option<CacheRef>) -> Self {
        self.cache_repo = cache_repo;
        self
    }

    /// Rebuilds the state a previous coordinator persisted. Running tasks wait a grace period
    /// for their agents; builds that were stitching stitch again (the same bytes, so the same
    /// digest: pushing again is harmless).
    pub fn recover(&mut self, now: u64, loaded: Loaded<Build, Task, AgentRecord>) {
        for (name, record) in loaded.agents {
            self.fleet.restore(&name, record);
        }
        for (id, mut task) in loaded.tasks {
            if let TaskState::Running { .. } = task.state {
                self.claims.insert(id, now + self.grace_ms);
            }
            if let TaskState::Verifying(_) = task.state {
                task.state = TaskState::Queued;
                self.dirty_tasks.insert(id);
            }
            self.remember(&task);
            task.waiting = None;
            self.next_task = self.next_task.max(id + 1);
            self.tasks.insert(id, task);
        }
        let mut ended = vec![];
        for (id, build) in loaded.builds {
            let stitching = matches!(build.state, BuildState::Stitching);
            if !matches!(build.state, BuildState::Running | BuildState::Stitching) {
                ended.push((build.created_ms, id.clone()));
            }
            self.builds.insert(id.clone(), build);
            if stitching {
                self.stitch(&id);
            }
        }
        ended.sort();
        self.ended.extend(ended.into_iter().map(|(_, id)| id));
        self.schedule(now);
    }

    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// The records changed since the last call, to commit before any action is carried out.
    pub fn take_batch(&mut self) -> Batch {
        let mut batch = Batch::default();
        for id in std::mem::take(&mut self.dirty_builds) {
            match self.builds.get(&id) {
                Some(b) => batch.put_build(&id, b),
                None => batch.delete_build(&id),
            };
        }
        for id in std::mem::take(&mut self.dirty_tasks) {
            match self.tasks.get(&id) {
                Some(t) => batch.put_task(id, t),
                None => batch.delete_task(id),
            };
        }
        for name in std::mem::take(&mut self.dirty_agents) {
            if let Some(r) = self.fleet.record(&name) {
                batch.put_agent(&name, &r);
            }
        }
        // Only now, with every change collected: a build leaving memory is not a deletion.
        self.forget_oldest_ended();
        batch
    }

    fn forget_oldest_ended(&mut self) {
        while self.ended.len() > self.keep_ended {
            let Some(id) = self.ended.pop_front() else { break };
            if let Some(b) = self.builds.remove(&id) {
                for t in &b.tasks {
                    self.tasks.remove(t);
                    self.claims.remove(t);
                    self.unfit.remove(t);
                }
            }
        }
    }

    /// When [`Core::handle_timeout`] next has something to do.
    pub fn poll_timeout(&self) -> Option<u64> {
        let claim = self.claims.values().min().copied();
        match (self.fleet.next_deadline(), claim) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    pub fn handle_timeout(&mut self, now: u64) {
        for (name, conn) in self.fleet.expire(now) {
            self.dirty_agents.insert(name.clone());
            self.actions.push_back(Action::Close { conn, reason: "no heartbeat within the timeout".into() });
            self.agent_lost(&name, conn, "stopped sending heartbeats");
        }
        let expired: Vec<TaskId> = self.claims.iter().filter(|(_, d)| **d <= now).map(|(t, _)| *t).collect();
        for id in expired {
            self.claims.remove(&id);
            let agent = match &self.tasks[&id].state {
                TaskState::Running { agent, conn: None, .. } => agent.clone(),
                _ => continue,
            };
            self.requeue(id, &format!("agent {agent} did not confirm the task within {} s", self.grace_ms / 1000));
        }
        self.schedule(now);
    }

    /// An agent registered on `conn` from `address`. `Err` (the reason, also sent to the agent)
    /// if another connection alive with the same identity holds the name: the second process is
    /// refused, the first keeps running its builds, and is told who was refused.
    pub fn agent_up(
        &mut self,
        now: u64,
        name: &str,
        conn: ConnId,
        address: String,
        info: AgentInfo,
    ) -> Result<(), String> {
        let registered = self.fleet.register(now, name, conn, address.clone(), info);
        if let Registered::Refused { holder, address: holder_address } = registered {
            let reason = format!(
                "agent identity {name:?} is already connected from {holder_address} and answering heartbeats: \
                 two agents are running with the same certificate (a config copied to a second machine?); stop \
                 one of them, or give this one its own identity (`farm agent join --name NEW_NAME`)"
            );
            self.actions.push_back(Action::Refuse { conn, reason: reason.clone() });
            self.actions.push_back(Action::Send { conn: holder, msg: CoordMsg::Duplicate { address } });
            return Err(reason);
        }
        let interval = self.fleet.heartbeat_interval_ms();
        self.actions.push_back(Action::Send { conn, msg: CoordMsg::Registered { heartbeat_interval_ms: interval } });
        self.dirty_agents.insert(name.into());
        if let Registered::Replaced(old) = registered {
            self.actions.push_back(Action::Close {
                conn: old,
                reason: "replaced by a newer connection of the same agent".into(),
            });
            // Its tasks may still be running on it: let it confirm them.
            for (id, t) in &mut self.tasks {
                if let TaskState::Running { agent, conn: c @ Some(_), .. } = &mut t.state {
                    if agent == name && *c == Some(old) {
                        *c = None;
                        self.claims.insert(*id, now + self.grace_ms);
                    }
                }
            }
        }
        self.schedule(now);
        Ok(())
    }

    pub fn agent_down(&mut self, now: u64, name: &str, conn: ConnId) -> bool {
        let offline = self.fleet.disconnect(name, conn);
        if offline {
            self.dirty_agents.insert(name.into());
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
            AgentMsg::Holding(held) => self.holding(now, name, conn, &held),
            AgentMsg::Draining => self.fleet.drain(name, conn),
            AgentMsg::Release { task, attempt } => {
                if self.current(task, attempt, name, conn).is_some() {
                    self.requeue(task, &format!("agent {name} shut down"));
                    self.schedule(now);
                }
            }
            AgentMsg::TaskLog { task, attempt, line } => {
                if let Some(t) = self.current(task, attempt, name, conn) {
                    if t.tail.len() == TAIL_LINES {
                        t.tail.pop_front();
                    }
                    t.tail.push_back(line.clone());
                    let event = BuildEvent::Log { platform: t.platform.clone(), line };
                    let build = t.build.clone();
                    if let (Some((_, steps)), BuildEvent::Log { line, .. }) = (self.step_logs.get_mut(&task), &event) {
                        steps.line(line);
                    }
                    self.actions.push_back(Action::Emit { build, event });
                }
            }
            AgentMsg::TaskDone { task, attempt, manifest, timings } => {
                self.task_done(now, task, attempt, name, conn, manifest, timings)
            }
            AgentMsg::Unfit { task, attempt, error } => {
                if self.current(task, attempt, name, conn).is_none() {
                    self.stale_refused += 1;
                    return;
                }
                self.unfit.entry(task).or_default().insert(name.to_string());
                if self.another_agent_could_run(task) {
                    self.requeue(task, &format!("agent {name} cannot run it: {error}"));
                    self.schedule(now);
                } else {
                    self.agent_msg(now, name, conn, AgentMsg::TaskFailed { task, attempt, error });
                }
            }
            AgentMsg::TaskFailed { task, attempt, error } => {
                let Some(t) = self.current(task, attempt, name, conn) else {
                    self.stale_refused += 1;
                    return;
                };
                t.state = TaskState::Failed(error.clone());
                let (build, platform) = (t.build.clone(), t.platform.clone());
                let last_lines = t.tail.iter().cloned().collect();
                self.step_logs.remove(&task);
                self.dirty_tasks.insert(task);
                self.emit(
                    &build,
                    BuildEvent::PlatformFailed { platform: platform.clone(), error: error.clone(), last_lines },
                );
                self.fail_build(&build, BuildState::Failed { error: format!("{platform} failed: {error}") });
                self.schedule(now);
            }
        }
    }

    /// Adds a finished task's result to the cache.
    fn remember(&mut self, t: &Task) {
        if let (TaskState::Done(r), Some(key), Some(version)) = (&t.state, &t.cache_key, &t.builder_version) {
            let entry = CacheEntry {
                manifest: r.manifest.clone(),
                builder_version: version.clone(),
                statement: t.statement.clone(),
            };
            if self.cache.len() >= HISTORY_KEYS && !self.cache.contains_key(key) {
                let evict = self.cache.keys().next().cloned().expect("not empty");
                self.cache.remove(&evict);
            }
            self.cache.insert(key.clone(), entry);
        }
    }

    /// An earlier result is usable if an agent that could build the platform, with the labels the
    /// build requires (`builder=docker`, ...), now runs the same builder version that produced it.
    fn cached(&self, key: &str, platform: &Platform, require: &BTreeMap<String, String>) -> Option<ManifestRef> {
        let e = self.cache.get(key)?;
        self.fleet
            .online()
            .any(|(_, i)| {
                (i.native.contains(platform) || i.emulated.contains(platform))
                    && i.builder_version == e.builder_version
                    && require.iter().all(|(k, v)| i.labels.get(k) == Some(v))
            })
            .then(|| e.manifest.clone())
    }

    /// The registry's answer on a cached result.
    pub fn cache_checked(&mut self, now: u64, task: TaskId, present: bool) {
        let Some(t) = self.tasks.get_mut(&task) else { return };
        let TaskState::Verifying(manifest) = &t.state else { return };
        self.dirty_tasks.insert(task);
        if present {
            t.statement = t
                .cache_key
                .as_ref()
                .and_then(|k| self.cache.get(k))
                .filter(|e| e.manifest == *manifest)
                .and_then(|e| e.statement.clone());
            let result = PlatformResult {
                platform: t.platform.clone(),
                manifest: manifest.clone(),
                agent: "cache".into(),
                emulated: false,
                duration_ms: 0,
                cached: true,
                timings: vec![],
            };
            t.state = TaskState::Done(result.clone());
            let build = t.build.clone();
            self.emit(&build, BuildEvent::PlatformDone(result));
            self.maybe_stitch(&build);
        } else {
            t.state = TaskState::Queued;
        }
        self.schedule(now);
    }

    /// Accepts a build: one task per platform, queued, or checked against the result cache.
    /// `bases` are the build's base images resolved to digests (`None`: the cache is not used).
    pub fn submit(
        &mut self,
        now: u64,
        id: &str,
        client: &str,
        spec: BuildSpec,
        bases: Option<Vec<(String, Digest)>>,
    ) -> Result<(), SubmitError> {
        self.submit_with_source(now, id, client, spec, bases, provenance::Source::default())
    }

    /// [`Core::submit`] with what provenance records beyond the spec: the Dockerfile's digest
    /// (and text) and the resolved base images.
    pub fn submit_with_source(
        &mut self,
        now: u64,
        id: &str,
        client: &str,
        mut spec: BuildSpec,
        bases: Option<Vec<(String, Digest)>>,
        source: provenance::Source,
    ) -> Result<(), SubmitError> {
        if self.builds.contains_key(id) {
            return Err(SubmitError::Duplicate(id.into()));
        }
        if spec.platforms.is_empty() {
            return Err(SubmitError::NoPlatforms);
        }
        if spec.sign && spec.tags.is_empty() {
            return Err(SubmitError::SignWithoutRegistry);
        }
        let l = &self.limits;
        let running = self
            .builds
            .values()
            .filter(|b| b.client == client && matches!(b.state, BuildState::Running | BuildState::Stitching))
            .count();
        let arg_bytes = spec.build_args.iter().map(|(k, v)| k.len() + v.len()).sum();
        let secret_bytes = spec.secrets.iter().map(|s| s.value.len()).max().unwrap_or(0);
        let checks = [
            (
                format!("the number of builds {client} has running"),
                running + 1,
                l.max_builds_per_client,
                "max_builds_per_client",
            ),
            (
                "the number of platforms".into(),
                spec.platforms.len(),
                l.max_platforms_per_build,
                "max_platforms_per_build",
            ),
            ("the number of build args".into(), spec.build_args.len(), l.max_build_args, "max_build_args"),
            ("the size of the build args in bytes".into(), arg_bytes, l.max_build_arg_bytes, "max_build_arg_bytes"),
            ("the number of tags".into(), spec.tags.len(), l.max_tags, "max_tags"),
            ("the number of secrets".into(), spec.secrets.len(), l.max_secrets, "max_secrets"),
            ("the size of a secret in bytes".into(), secret_bytes, l.max_secret_bytes, "max_secret_bytes"),
        ];
        if let Some((what, got, limit, key)) = checks.into_iter().find(|(_, got, limit, _)| got > limit) {
            return Err(SubmitError::Limit { what, got, limit, key });
        }
        for (flag, r) in
            spec.cache_to.iter().map(|r| ("--cache-to", r)).chain(spec.cache_from.iter().map(|r| ("--cache-from", r)))
        {
            CacheRef::parse_ref(r, flag).map_err(|e| SubmitError::BadCache(e.to_string()))?;
        }
        let tags: Vec<ImageRef> = spec
            .tags
            .iter()
            .map(|t| shared::oci::push_tag(t))
            .collect::<Result<_, _>>()
            .map_err(|e| SubmitError::BadTag(e.to_string()))?;
        // No tags: nothing goes to a registry; the agents upload to the content store and the
        // index is kept there (an empty repository says so to the agents and the driver).
        let repository = match tags.first() {
            Some(first) => {
                if let Some(other) = tags.iter().find(|t| !t.same_repository(first)) {
                    return Err(SubmitError::MixedRepositories(first.to_string(), other.to_string()));
                }
                format!("{}/{}", first.registry, first.repository)
            }
            None => String::new(),
        };
        let mut task_ids = Vec::new();
        for platform in &spec.platforms {
            let tid = self.next_task;
            self.next_task += 1;
            let cache_key = bases.as_ref().map(|b| cache_key(&spec, platform, b));
            let hit =
                cache_key.as_ref().filter(|_| !spec.no_cache).and_then(|k| self.cached(k, platform, &spec.require));
            let state = match hit {
                Some(manifest) => {
                    self.actions.push_back(Action::CheckCached {
                        task: tid,
                        repository: repository.clone(),
                        digest: manifest.digest.clone(),
                        insecure: spec.insecure_registries.clone(),
                        credentials: spec.credentials.clone(),
                    });
                    TaskState::Verifying(manifest)
                }
                None => TaskState::Queued,
            };
            let task = Task {
                build: id.into(),
                platform: platform.clone(),
                attempt: 1,
                state,
                cache_key,
                builder_version: None,
                statement: None,
                waiting: None,
                tail: VecDeque::new(),
            };
            self.tasks.insert(tid, task);
            self.dirty_tasks.insert(tid);
            task_ids.push(tid);
        }
        let credentials = spec.credentials.take();
        let secrets = std::mem::take(&mut spec.secrets);
        let build = Build {
            spec,
            tags,
            repository,
            tasks: task_ids,
            state: BuildState::Running,
            client: client.into(),
            created_ms: now,
            source,
            credentials,
            secrets,
        };
        self.builds.insert(id.into(), build);
        self.dirty_builds.insert(id.into());
        self.schedule(now);
        Ok(())
    }

    /// The driver's report on pushing a build's index, and how long it took.
    pub fn stitched(&mut self, build: &str, result: Result<Digest, String>, stitch_ms: u64) {
        let Some(b) = self.builds.get_mut(build) else { return };
        if !matches!(b.state, BuildState::Stitching) {
            return;
        }
        self.dirty_builds.insert(build.into());
        match result {
            Ok(index) => {
                b.state = BuildState::Succeeded { index: index.clone() };
                let platforms = b
                    .tasks
                    .iter()
                    .filter_map(|t| match &self.tasks[t].state {
                        TaskState::Done(r) => Some(r.clone()),
                        _ => None,
                    })
                    .collect();
                let tags = b.spec.tags.clone();
                self.emit(build, BuildEvent::Succeeded { index, tags, platforms, stitch_ms });
            }
            Err(e) => {
                let error = format!("pushing the image index failed: {e}");
                b.state = BuildState::Failed { error: error.clone() };
                self.emit(build, BuildEvent::Failed { error });
            }
        }
    }

    /// Stops a build: its running tasks are cancelled on their agents, nothing is pushed.
    pub fn cancel(&mut self, now: u64, build: &str) -> Result<(), String> {
        let b = self.builds.get(build).ok_or_else(|| format!("no build {build}; `farm builds` lists them"))?;
        if !matches!(b.state, BuildState::Running | BuildState::Stitching) {
            return Err(format!("build {build} has already ended ({})", state_name(&b.state)));
        }
        self.fail_build(build, BuildState::Cancelled);
        self.schedule(now);
        Ok(())
    }

    /// What a build asked for, while the core holds it (running, or among the recently ended).
    pub fn build_spec(&self, build: &str) -> Option<&BuildSpec> {
        self.builds.get(build).map(|b| &b.spec)
    }

    /// Whether a build exists and has not ended.
    pub fn build_state(&self, build: &str) -> Option<&BuildState> {
        self.builds.get(build).map(|b| &b.state)
    }

    pub fn builds(&self, limit: usize) -> Vec<BuildView> {
        let mut all: Vec<(&String, &Build)> = self.builds.iter().collect();
        all.sort_by_key(|(id, b)| (std::cmp::Reverse(b.created_ms), (*id).clone()));
        all.into_iter().take(limit).map(|(id, b)| self.view(id, b)).collect()
    }

    /// One build in memory, as `farm builds` shows it.
    pub fn build_view(&self, id: &str) -> Option<BuildView> {
        self.builds.get(id).map(|b| self.view(id, b))
    }

    /// Whether `agent` runs a task of `build` right now (who may use the build's `--ssh`).
    pub fn runs_task_of(&self, agent: &str, build: &str) -> bool {
        let Some(b) = self.builds.get(build) else { return false };
        b.tasks.iter().any(|t| matches!(&self.tasks[t].state, TaskState::Running { agent: a, .. } if a == agent))
    }

    /// Whether `client` submitted any build still in memory.
    pub fn has_client(&self, client: &str) -> bool {
        self.builds.values().any(|b| b.client == client)
    }

    /// Ids of the builds in memory that start with `prefix`.
    pub fn builds_with_prefix(&self, prefix: &str) -> Vec<String> {
        self.builds.keys().filter(|id| id.starts_with(prefix)).cloned().collect()
    }

    fn view(&self, id: &str, b: &Build) -> BuildView {
        let platforms: Vec<TaskView> = b.tasks.iter().map(|t| task_view(&self.tasks[t])).collect();
        let state = match &b.state {
            // Nothing has reached an agent yet: the build waits in the queue.
            BuildState::Running
                if platforms.iter().all(|t| matches!(t.state.as_str(), "queued" | "checking cache")) =>
            {
                "queued"
            }
            s => state_name(s),
        };
        BuildView { platforms, state: state.into(), ..stored_view(id, b) }
    }

    /// The results of a build's platforms that are done (or cached), for the dashboard's
    /// timelines: phases, placement, cached.
    pub fn results(&self, build: &str) -> Vec<PlatformResult> {
        let Some(b) = self.builds.get(build) else { return vec![] };
        b.tasks
            .iter()
            .filter_map(|t| match &self.tasks[t].state {
                TaskState::Done(r) => Some(r.clone()),
                _ => None,
            })
            .collect()
    }

    /// For a metrics scrape: the agents, one platform per queued task, and how many stale results
    /// were refused so far.
    pub fn metrics_snapshot(&self) -> (Vec<AgentView>, Vec<Platform>, u64) {
        let queued =
            self.tasks.values().filter(|t| matches!(t.state, TaskState::Queued)).map(|t| t.platform.clone()).collect();
        (self.agents(), queued, self.stale_refused)
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

    /// The task if `agent`, on connection `conn`, holds its current `attempt`; `None` for anything stale.
    fn current(&mut self, task: TaskId, attempt: u32, agent: &str, conn: ConnId) -> Option<&mut Task> {
        self.tasks.get_mut(&task).filter(|t| {
            t.attempt == attempt
                && matches!(&t.state, TaskState::Running { agent: a, conn: c, .. } if a == agent && *c == Some(conn))
        })
    }

    /// The agent said which tasks it holds: confirm those, requeue the rest, cancel stale ones.
    fn holding(&mut self, now: u64, agent: &str, conn: ConnId, held: &[Held]) {
        if self.fleet.conn_of(agent) != Some(conn) {
            return;
        }
        for h in held {
            let current = self.tasks.get_mut(&h.task).is_some_and(|t| {
                t.attempt == h.attempt && matches!(&t.state, TaskState::Running { agent: a, .. } if a == agent)
            });
            if current {
                if let Some(TaskState::Running { conn: c, .. }) = self.tasks.get_mut(&h.task).map(|t| &mut t.state) {
                    *c = Some(conn);
                }
                self.claims.remove(&h.task);
            } else {
                let msg = CoordMsg::Cancel { task: h.task, attempt: h.attempt };
                self.actions.push_back(Action::Send { conn, msg });
            }
        }
        let forgotten: Vec<TaskId> = self
            .tasks
            .iter()
            .filter(|(id, t)| {
                matches!(&t.state, TaskState::Running { agent: a, conn: None, .. } if a == agent)
                    && !held.iter().any(|h| h.task == **id)
            })
            .map(|(id, _)| *id)
            .collect();
        for id in forgotten {
            self.claims.remove(&id);
            self.requeue(id, &format!("agent {agent} came back without it"));
        }
        self.schedule(now);
    }

    #[allow(clippy::too_many_arguments)]
    fn task_done(
        &mut self,
        now: u64,
        task: TaskId,
        attempt: u32,
        agent: &str,
        conn: ConnId,
        manifest: ManifestRef,
        timings: Vec<Phase>,
    ) {
        let version = self.fleet.builder_version(agent);
        let builder = self.fleet.builder(agent);
        let certificate = self.certificates.get(agent).cloned();
        let identity = self.identity.clone();
        let Some(t) = self.current(task, attempt, agent, conn) else {
            self.stale_refused += 1;
            return;
        };
        let TaskState::Running { emulated, since, .. } = t.state else { return };
        let (build_id, platform) = (t.build.clone(), t.platform.clone());
        let b = &self.builds[&build_id];
        let unknown = || "unknown".to_string();
        let (builder, builder_version, farm_version) = builder.unwrap_or_else(|| (unknown(), unknown(), unknown()));
        let run = provenance::Run {
            build: &build_id,
            platform: &platform,
            coordinator: &identity,
            agent,
            agent_certificate: certificate.as_deref(),
            builder: &builder,
            builder_version: &builder_version,
            farm_version: &farm_version,
            emulated,
            started_ms: since,
            finished_ms: now,
        };
        let statement = provenance::statement(&manifest.digest, &b.spec, &b.source, &run);
        if let Some((key, steps)) = self.step_logs.remove(&task) {
            // A build that exported nothing (buildah's cache export failed and it ran again
            // without) leaves the last chain as it was.
            if steps.pushed().next().is_some() {
                if self.cache_chains.len() >= HISTORY_KEYS && !self.cache_chains.contains_key(&key) {
                    let evict = self.cache_chains.keys().next().cloned().expect("not empty");
                    self.cache_chains.remove(&evict);
                }
                self.cache_chains.insert(key, steps.imports());
            }
        }
        let t = self.tasks.get_mut(&task).expect("the current task exists");
        t.statement = Some(statement.into());
        let result = PlatformResult {
            platform: t.platform.clone(),
            manifest,
            agent: agent.into(),
            emulated,
            duration_ms: now.saturating_sub(since),
            cached: false,
            timings,
        };
        t.state = TaskState::Done(result.clone());
        t.builder_version = version;
        let t = t.clone();
        self.remember(&t);
        let build_id = t.build.clone();
        self.dirty_tasks.insert(task);
        self.emit(&build_id, BuildEvent::PlatformDone(result.clone()));
        let b = self.builds.get_mut(&build_id).expect("a task's build exists");
        let key = (result.platform, b.spec.context.clone());
        if self.history.len() >= HISTORY_KEYS && !self.history.contains_key(&key) {
            let evict = self.history.keys().next().cloned().expect("not empty");
            self.history.remove(&evict);
        }
        self.history.entry(key.clone()).or_default().insert(agent.into(), (emulated, result.duration_ms));
        self.warm.insert(key, agent.into());
        self.maybe_stitch(&build_id);
        self.schedule(now);
    }

    /// Once every platform of a running build is done, its index is pushed.
    fn maybe_stitch(&mut self, build_id: &str) {
        let b = self.builds.get_mut(build_id).expect("a task's build exists");
        let all_done = b.tasks.iter().all(|id| matches!(self.tasks[id].state, TaskState::Done(_)));
        if all_done && matches!(b.state, BuildState::Running) {
            b.state = BuildState::Stitching;
            self.dirty_builds.insert(build_id.into());
            self.stitch(build_id);
        }
    }

    /// Emits the action that pushes the build's index: platforms in the order the user gave.
    fn stitch(&mut self, build: &str) {
        let b = &self.builds[build];
        let entries: Vec<(Platform, Descriptor)> = b
            .tasks
            .iter()
            .filter_map(|id| match &self.tasks[id].state {
                TaskState::Done(r) => Some((
                    r.platform.clone(),
                    Descriptor::new(&r.manifest.media_type, r.manifest.digest.clone(), r.manifest.size),
                )),
                _ => None,
            })
            .collect();
        // Without a registry the CLI writes the index itself from the platforms (`-o type=oci`):
        // attestations go only with a pushed index.
        let attestations = if b.tags.is_empty() { vec![] } else { self.attestations(build) };
        let published = provenance::stitch(&entries, &b.spec.annotations, &attestations);
        self.actions.push_back(Action::Stitch {
            build: build.into(),
            index: published.index.clone(),
            published: Box::new(published),
            attestations,
            tags: b.tags.clone(),
            insecure: b.spec.insecure_registries.clone(),
            credentials: b.credentials.clone(),
            sign: b.spec.sign,
        });
    }

    /// The agent's tasks on `conn` go back to the queue.
    fn agent_lost(&mut self, agent: &str, conn: ConnId, why: &str) {
        let lost: Vec<TaskId> = self
            .tasks
            .iter()
            .filter(|(_, t)| {
                matches!(&t.state, TaskState::Running { agent: a, conn: c, .. } if a == agent && *c == Some(conn))
            })
            .map(|(id, _)| *id)
            .collect();
        for id in lost {
            self.requeue(id, &format!("agent {agent} {why}"));
        }
    }

    /// Hands a running task out again with the next attempt number, or fails its build when it
    /// has had all its attempts.
    fn requeue(&mut self, id: TaskId, why: &str) {
        let max = self.max_attempts;
        let t = self.tasks.get_mut(&id).expect("requeued tasks exist");
        let (build, platform) = (t.build.clone(), t.platform.clone());
        self.dirty_tasks.insert(id);
        if t.attempt >= max {
            let error = format!("{why}; gave up after {} attempts", t.attempt);
            t.state = TaskState::Failed(error.clone());
            self.emit(
                &build,
                BuildEvent::PlatformFailed { platform: platform.clone(), error: error.clone(), last_lines: vec![] },
            );
            self.fail_build(&build, BuildState::Failed { error: format!("{platform} failed: {error}") });
        } else {
            t.attempt += 1;
            t.state = TaskState::Queued;
            t.waiting = None;
            t.tail.clear();
            let reason = format!("{why}; retrying (attempt {} of {max})", t.attempt);
            self.emit(&build, BuildEvent::Retrying { platform, reason });
        }
    }

    /// Whether an online agent other than those that said they cannot run `task` could take it
    /// (platform, emulation policy, labels, entitlements), busy or not.
    fn another_agent_could_run(&self, task: TaskId) -> bool {
        let t = &self.tasks[&task];
        let b = &self.builds[&t.build];
        let unfit = self.unfit.get(&task);
        let need = sched::Need {
            platform: &t.platform,
            require: &b.spec.require,
            emulation: if b.spec.emulation == Emulation::Fastest { Emulation::Fallback } else { b.spec.emulation },
            entitlements: &b.spec.entitlements,
            warm: None,
        };
        let candidates = self
            .fleet
            .online()
            .filter(|(name, _)| !unfit.is_some_and(|u| u.contains(*name)))
            .map(|(name, info)| Candidate::of(name, info, 1, None));
        matches!(sched::place(&need, candidates), Placement::Run { .. })
    }

    /// Ends a build that has not succeeded: its other tasks are cancelled, on their agents too.
    fn fail_build(&mut self, build: &str, end: BuildState) {
        let Some(b) = self.builds.get_mut(build) else { return };
        if !matches!(b.state, BuildState::Running | BuildState::Stitching) {
            return;
        }
        let event = match &end {
            BuildState::Failed { error } => BuildEvent::Failed { error: error.clone() },
            _ => BuildEvent::Cancelled,
        };
        b.state = end;
        self.dirty_builds.insert(build.into());
        for id in b.tasks.clone() {
            let t = self.tasks.get_mut(&id).expect("a build's tasks exist");
            match &t.state {
                TaskState::Running { conn, agent, .. } => {
                    let conn = conn.or_else(|| self.fleet.conn_of(agent));
                    if let Some(conn) = conn {
                        let msg = CoordMsg::Cancel { task: id, attempt: t.attempt };
                        self.actions.push_back(Action::Send { conn, msg });
                    }
                    t.state = TaskState::Cancelled;
                }
                TaskState::Queued | TaskState::Verifying(_) => t.state = TaskState::Cancelled,
                _ => continue,
            }
            self.claims.remove(&id);
            self.dirty_tasks.insert(id);
        }
        self.emit(build, event);
    }

    fn emit(&mut self, build: &str, event: BuildEvent) {
        if event.is_terminal() {
            self.ended.push_back(build.to_owned());
        }
        self.actions.push_back(Action::Emit { build: build.into(), event });
    }

    /// How long building `context` for `platform` on `agent` (emulated or not) is expected to take:
    /// its own last duration; else the mean of other agents' in the same mode; else theirs in the
    /// other mode, scaled by [`EMULATION_SLOWDOWN`]; `None` when nothing was recorded.
    fn expected_ms(&self, platform: &Platform, context: &Digest, agent: &str, emulated: bool) -> Option<u64> {
        let runs = self.history.get(&(platform.clone(), context.clone()))?;
        if let Some(&(e, ms)) = runs.get(agent) {
            if e == emulated {
                return Some(ms);
            }
        }
        let mean = |want: bool| {
            let v: Vec<u64> = runs.values().filter(|(e, _)| *e == want).map(|(_, ms)| *ms).collect();
            (!v.is_empty()).then(|| v.iter().sum::<u64>() / v.len() as u64)
        };
        mean(emulated).or_else(|| {
            mean(!emulated).map(|ms| if emulated { ms * EMULATION_SLOWDOWN } else { ms / EMULATION_SLOWDOWN })
        })
    }

    /// Hands every queued task that can run now to its agent, in submission order.
    fn schedule(&mut self, now: u64) {
        let queued: Vec<TaskId> =
            self.tasks.iter().filter(|(_, t)| matches!(t.state, TaskState::Queued)).map(|(id, _)| *id).collect();
        if queued.is_empty() {
            return;
        }
        // Tasks running per agent: as many entries as busy agents, not one per agent online.
        let mut running: HashMap<String, u32> = HashMap::new();
        // `--emulation fastest` also needs what each busy agent runs, to expect when it frees.
        let fastest = queued.iter().any(|id| self.builds[&self.tasks[id].build].spec.emulation == Emulation::Fastest);
        let mut holding: HashMap<String, Vec<(u64, Platform, Digest, bool)>> = HashMap::new();
        for t in self.tasks.values() {
            if let TaskState::Running { agent, since, emulated, .. } = &t.state {
                *running.entry(agent.clone()).or_default() += 1;
                if fastest {
                    let context = self.builds[&t.build].spec.context.clone();
                    holding.entry(agent.clone()).or_default().push((*since, t.platform.clone(), context, *emulated));
                }
            }
        }
        for id in queued {
            let t = &self.tasks[&id];
            let b = &self.builds[&t.build];
            let warm = self.warm.get(&(t.platform.clone(), b.spec.context.clone())).map(String::as_str);
            let need = sched::Need {
                platform: &t.platform,
                require: &b.spec.require,
                emulation: b.spec.emulation,
                entitlements: &b.spec.entitlements,
                warm,
            };
            let unfit = self.unfit.get(&id);
            let candidates =
                self.fleet.online().filter(move |(name, _)| !unfit.is_some_and(|u| u.contains(*name))).map(
                    |(name, info)| {
                        let busy = running.get(name).copied().unwrap_or(0);
                        let free = info.capacity.saturating_sub(busy);
                        let estimate = (b.spec.emulation == Emulation::Fastest)
                            .then(|| {
                                let emulated = !info.native.contains(&t.platform);
                                let build_ms = self.expected_ms(&t.platform, &b.spec.context, name, emulated)?;
                                let busy_ms = if free > 0 {
                                    0
                                } else {
                                    let held = holding.get(name).map(Vec::as_slice).unwrap_or_default();
                                    held.iter()
                                        .map(|(since, p, c, e)| {
                                            // How long a task with no recorded duration has left is
                                            // anyone's guess: as long as this one, say.
                                            self.expected_ms(p, c, name, *e)
                                                .map_or(build_ms, |expected| (since + expected).saturating_sub(now))
                                        })
                                        .min()
                                        .unwrap_or(0)
                                };
                                Some(sched::Estimate { build_ms, busy_ms, running: busy })
                            })
                            .flatten();
                        Candidate::of(name, info, free, estimate)
                    },
                );
            match sched::place(&need, candidates) {
                Placement::Run { agent, emulated, why } => {
                    let conn = self.fleet.conn_of(&agent).expect("candidates are online");
                    *running.entry(agent.clone()).or_default() += 1;
                    if fastest {
                        let held = (now, t.platform.clone(), b.spec.context.clone(), emulated);
                        holding.entry(agent.clone()).or_default().push(held);
                    }
                    let (cache_to, cache_from) = cache_for(&b.spec, self.cache_repo.as_ref(), &t.platform);
                    let chain = |repo: &String| {
                        (repo.clone(), b.repository.clone(), b.spec.dockerfile.clone(), b.spec.target.clone())
                    };
                    let cache_import =
                        cache_from.first().and_then(|r| self.cache_chains.get(&chain(r))).cloned().unwrap_or_default();
                    match &cache_to {
                        Some(to) => {
                            // Tasks that ended without a result (cancelled, requeued) leave theirs.
                            if self.step_logs.len() >= HISTORY_KEYS {
                                let tasks = &self.tasks;
                                self.step_logs.retain(|t, _| {
                                    tasks.get(t).is_some_and(|t| matches!(t.state, TaskState::Running { .. }))
                                });
                            }
                            self.step_logs.insert(id, (chain(to), shared::cache::StepLog::default()));
                        }
                        None => {
                            self.step_logs.remove(&id);
                        }
                    }
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
                        credentials: b.credentials.clone(),
                        secrets: b.secrets.clone(),
                        entitlements: b.spec.entitlements.clone(),
                        context_limits: self.limits.context,
                        annotations: annotation::for_platform(
                            &b.spec.annotations,
                            AnnotationKind::Manifest,
                            &t.platform,
                        ),
                        labels: b.spec.labels.clone(),
                        ssh: b.spec.ssh.clone(),
                        inputs: b.spec.inputs.clone(),
                        cache_to,
                        cache_from,
                        cache_import,
                    };
                    let event = BuildEvent::Started {
                        platform: t.platform.clone(),
                        agent: agent.clone(),
                        emulated,
                        attempt: t.attempt,
                    };
                    let build = t.build.clone();
                    if let Some(why) = why {
                        self.emit(
                            &build,
                            BuildEvent::Log { platform: t.platform.clone(), line: format!("farm: {why}") },
                        );
                    }
                    self.actions.push_back(Action::Send { conn, msg: CoordMsg::Assign(Box::new(assignment)) });
                    self.emit(&build, event);
                    let t = self.tasks.get_mut(&id).expect("queued task");
                    t.state = TaskState::Running { agent, conn: Some(conn), emulated, since: now };
                    t.waiting = None;
                    self.dirty_tasks.insert(id);
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

pub fn state_name(s: &BuildState) -> &'static str {
    match s {
        BuildState::Running => "running",
        BuildState::Stitching => "stitching",
        BuildState::Succeeded { .. } => "succeeded",
        BuildState::Failed { .. } => "failed",
        BuildState::Cancelled => "cancelled",
    }
}

/// A build as its stored record shows it (a build that has left memory: no platform detail).
pub fn stored_view(id: &str, b: &Build) -> BuildView {
    BuildView {
        id: id.to_string(),
        state: state_name(&b.state).into(),
        client: b.client.clone(),
        created_ms: b.created_ms,
        tags: b.spec.tags.clone(),
        index: match &b.state {
            BuildState::Succeeded { index } => Some(index.clone()),
            _ => None,
        },
        error: match &b.state {
            BuildState::Failed { error } => Some(error.clone()),
            _ => None,
        },
        platforms: vec![],
    }
}

fn task_view(t: &Task) -> TaskView {
    let (manifest, duration_ms) = match &t.state {
        TaskState::Done(r) => (Some(r.manifest.digest.clone()), Some(r.duration_ms)),
        _ => (None, None),
    };
    let (state, agent, emulated) = match &t.state {
        TaskState::Queued => ("queued", None, false),
        TaskState::Running { agent, emulated, .. } => ("running", Some(agent.clone()), *emulated),
        TaskState::Done(r) if r.cached => ("cached", None, false),
        TaskState::Done(r) => ("done", Some(r.agent.clone()), r.emulated),
        TaskState::Verifying(_) => ("checking cache", None, false),
        TaskState::Failed(_) => ("failed", None, false),
        TaskState::Cancelled => ("cancelled", None, false),
    };
    TaskView {
        platform: t.platform.clone(),
        state: state.into(),
        agent,
        emulated,
        attempt: t.attempt,
        manifest,
        duration_ms,
    }
}

#[cfg(test)]
mod sim;
#[cfg(test)]
pub(crate) mod tests;
