//! The agent: one per build machine. It tells the coordinator what it can build (its native
//! platforms first, then what QEMU lets it emulate), keeps that registration alive with
//! heartbeats, and comes back by itself whenever the coordinator or the network does.
//!
//! - [`session`]: pure pieces: the registration an agent sends, reconnect backoff;
//! - [`builder`]: the builder this agent drives (buildah), behind a small interface;
//! - [`docker`]: the same interface over a Docker Engine's BuildKit;
//! - [`cgroup`]: `memory_limit`, each build in a memory cgroup of its own;
//! - [`mirrors`]: `[mirrors]`, base images pulled from a mirror;
//! - [`task`]: one assignment: context, build, push by digest;
//! - [`net`]: the connection loop over QUIC, running assignments as they come.
//!
//! Entry point: [`run`] with a shutdown future, used alike by the binary, tests and the
//! embedded single-machine mode.

pub mod builder;
pub mod cgroup;
pub mod docker;
pub mod isolation;
pub mod mirrors;
pub mod net;
pub mod session;
pub mod ssh;
pub mod task;

use std::{collections::BTreeMap, future::Future, path::PathBuf, time::Duration};

use std::sync::Arc;

use builder::Builder as _;
use shared::context::{BlobStore, ContextError};
use shared::quic::TransportLimits;
use shared::tls::{self, Role, TlsError};
use shared::Platform;

/// Platforms as configured, on top of (or instead of) what the host detects. For hosts where
/// detection is wrong: a board whose kernel hides AArch32 support, a binfmt_misc mounted
/// elsewhere, an agent that should not offer emulation at all.
#[derive(Debug, Clone, Default)]
pub struct PlatformConfig {
    /// Replaces the detected native platforms.
    pub native: Option<Vec<Platform>>,
    /// Replaces the detected emulated platforms (an empty list: emulate nothing).
    pub emulated: Option<Vec<Platform>>,
    pub extra_native: Vec<Platform>,
    pub extra_emulated: Vec<Platform>,
}

/// Which builder an agent drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BuilderChoice {
    /// buildah if it is installed, else a Docker Engine if one answers.
    #[default]
    Auto,
    Buildah,
    Docker,
}

impl std::str::FromStr for BuilderChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(BuilderChoice::Auto),
            "buildah" => Ok(BuilderChoice::Buildah),
            "docker" => Ok(BuilderChoice::Docker),
            other => Err(format!("unknown builder {other:?}: expected buildah, docker or auto")),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    /// `HOST:PORT` of the coordinator.
    pub coordinator: String,
    pub ca_dir: PathBuf,
    pub name: String,
    pub work_dir: PathBuf,
    pub labels: BTreeMap<String, String>,
    pub capacity: u32,
    pub platforms: PlatformConfig,
    pub binfmt_dir: PathBuf,
    pub reconnect_max: Duration,
    /// On shutdown, how long running tasks may take to finish before they are handed back.
    pub drain_timeout: Duration,
    /// The layer cache (buildah storage) is trimmed to this many bytes, oldest images first.
    pub cache_limit: u64,
    pub max_frame_bytes: usize,
    pub transport: TransportLimits,
    pub builder: BuilderChoice,
    /// The Docker Engine to build with (`unix:///PATH` or `tcp://HOST:PORT`); else DOCKER_HOST,
    /// else the default socket.
    pub docker_host: Option<String>,
    /// `memory_limit`: bytes each build may use (its process tree, in a memory cgroup of its own).
    pub memory_limit: Option<u64>,
    /// `[mirrors]`: registry host → mirror that base images are pulled from.
    pub mirrors: mirrors::Mirrors,
    /// `allow_host_network`: builds may ask for the host's network (`--network host`).
    pub allow_host_network: bool,
    /// `allow_insecure`: builds may ask for every capability and no seccomp (`--allow security.insecure`).
    pub allow_insecure: bool,
}

impl Config {
    /// The entitlements this agent's config allows.
    pub fn allowed(&self) -> Vec<shared::proto::Entitlement> {
        use shared::proto::Entitlement;
        let mut out = vec![];
        if self.allow_host_network {
            out.push(Entitlement::NetworkHost);
        }
        if self.allow_insecure {
            out.push(Entitlement::SecurityInsecure);
        }
        out
    }
}

impl Config {
    pub fn new(coordinator: String, ca_dir: PathBuf, name: String, work_dir: PathBuf) -> Self {
        Self {
            coordinator,
            ca_dir,
            name,
            work_dir,
            labels: BTreeMap::new(),
            capacity: 1,
            platforms: PlatformConfig::default(),
            binfmt_dir: shared::host::DEFAULT_BINFMT_DIR.into(),
            reconnect_max: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(120),
            cache_limit: 20 << 30,
            max_frame_bytes: shared::proto::DEFAULT_MAX_FRAME,
            transport: TransportLimits::default(),
            builder: BuilderChoice::Auto,
            docker_host: None,
            memory_limit: None,
            mirrors: mirrors::Mirrors::new(),
            allow_host_network: false,
            allow_insecure: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(
        "the certificate for {name:?} has role {role}, but agents need role agent; issue one with \
         `farm ca issue --role agent --name {name}`"
    )]
    WrongRole { name: String, role: Role },
    #[error("cannot create work directory {path}: {source}")]
    WorkDir { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Builder(#[from] builder::BuilderError),
    #[error("agent work directory: {0}")]
    Store(#[from] ContextError),
    #[error(
        "no builder on this machine: buildah is not installed ({buildah}), and {docker}. Install buildah \
         (`deploy/install.sh`), or start Docker / set `docker_host`; `builder = \"buildah\"|\"docker\"` picks one"
    )]
    NoBuilder { buildah: String, docker: String },
    #[error("agent {name:?} can build no platform: nothing native detected or configured")]
    NoPlatforms { name: String },
    #[error(transparent)]
    Memory(#[from] cgroup::CgroupError),
    #[error(
        "memory_limit is not supported with the Docker builder: BuildKit (`docker build`) applies no per-build \
         memory limit, so a RUN could still take the host down. Remove memory_limit / --memory-limit, or use \
         buildah (`builder = \"buildah\"`); with Docker, limit the engine itself (e.g. systemd MemoryMax= for \
         docker.service)"
    )]
    MemoryLimitWithDocker,
}

/// Runs the agent until `shutdown` resolves. Connection failures are retried forever with capped
/// backoff; only local misconfiguration (no certificate, no builder) is an error.
pub async fn run(config: Config, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), AgentError> {
    let creds = tls::load_credentials(&config.ca_dir, &config.name)?;
    if creds.identity.role != Role::Agent {
        return Err(AgentError::WrongRole { name: config.name.clone(), role: creds.identity.role });
    }
    std::fs::create_dir_all(&config.work_dir)
        .map_err(|source| AgentError::WorkDir { path: config.work_dir.clone(), source })?;
    if config.memory_limit.is_some() && config.builder == BuilderChoice::Docker {
        return Err(AgentError::MemoryLimitWithDocker);
    }
    let mut builder = select(config.builder, &config.work_dir, config.docker_host.as_deref()).await?;
    let memory = match config.memory_limit {
        Some(_) if matches!(builder, Chosen::Docker(_)) => return Err(AgentError::MemoryLimitWithDocker),
        Some(bytes) => Some(cgroup::MemoryLimit::setup(bytes, &config.name)?),
        None => None,
    };
    let host = shared::host::detect(&config.binfmt_dir);
    let info = session::agent_info(&config, host, builder.info());
    if let Chosen::Buildah(b) = &mut builder {
        b.set_native(info.native.first().cloned());
    }
    if info.native.is_empty() && info.emulated.is_empty() {
        return Err(AgentError::NoPlatforms { name: config.name.clone() });
    }
    tracing::info!(
        agent = %config.name,
        native = %session::list(&info.native),
        emulated = %session::list(&info.emulated),
        builder = %format!("{} {}", info.builder, info.builder_version),
        memory_limit = %config.memory_limit.map(cgroup::format_size).unwrap_or_else(|| "none".into()),
        mirrors = ?config.mirrors,
        "agent starting"
    );
    let builder = builder.into_builder();
    if builder.sweep().await {
        sweep_tasks(&config.work_dir);
    }
    let store = BlobStore::open(&config.work_dir.join("blobs"))?;
    let runner = Arc::new(task::Runner {
        cache_lock: tokio::sync::RwLock::new(()),
        cache_limit: config.cache_limit,
        name: config.name.clone(),
        work_dir: config.work_dir.clone(),
        store,
        builder,
        max_frame: config.max_frame_bytes,
        mirrors: config.mirrors.clone(),
        memory,
        allowed: config.allowed(),
        locations: Default::default(),
    });
    net::Agent { config: &config, creds: &creds, info: &info, runner }.run(shutdown).await;
    Ok(())
}

/// Removes the directories of tasks an earlier run of this agent was killed in the middle of
/// (a task removes its own however it ends, as long as the agent lives).
fn sweep_tasks(work_dir: &std::path::Path) {
    let tasks = work_dir.join("tasks");
    for e in std::fs::read_dir(&tasks).into_iter().flatten().filter_map(Result::ok) {
        tracing::info!("removing {}, left by an earlier run", e.path().display());
        let _ = std::fs::remove_dir_all(e.path());
    }
}

/// The builder an agent drives.
pub enum Chosen {
    Buildah(builder::Buildah),
    Docker(docker::Docker),
}

impl Chosen {
    pub fn info(&self) -> &builder::BuilderInfo {
        match self {
            Chosen::Buildah(b) => b.info(),
            Chosen::Docker(d) => d.info(),
        }
    }

    pub fn into_builder(self) -> Arc<dyn builder::Builder> {
        match self {
            Chosen::Buildah(b) => Arc::new(b),
            Chosen::Docker(d) => Arc::new(d),
        }
    }

    /// Bytes held by the layer cache.
    pub async fn cache_bytes(&self) -> Result<u64, AgentError> {
        Ok(match self {
            Chosen::Buildah(b) => b.cache_bytes(),
            Chosen::Docker(d) => d.cache_bytes().await?,
        })
    }

    async fn prune(&self, limit: u64) -> Result<(), AgentError> {
        match self {
            Chosen::Buildah(b) => b.prune(limit).await?,
            Chosen::Docker(d) => d.prune(limit).await?,
        }
        Ok(())
    }
}

/// The builder `choice` names; `Auto`: buildah if it is installed, else the Docker Engine if one
/// answers, else an error naming both fixes.
pub async fn select(
    choice: BuilderChoice,
    work_dir: &std::path::Path,
    docker_host: Option<&str>,
) -> Result<Chosen, AgentError> {
    let docker = || async { docker::connect(work_dir, docker_host).await.map(Chosen::Docker) };
    match choice {
        BuilderChoice::Buildah => Ok(Chosen::Buildah(builder::detect(work_dir)?)),
        BuilderChoice::Docker => Ok(docker().await.map_err(builder::BuilderError::from)?),
        BuilderChoice::Auto => match builder::detect(work_dir) {
            Ok(b) => Ok(Chosen::Buildah(b)),
            Err(builder::BuilderError::Missing(missing)) => docker()
                .await
                .map_err(|e| AgentError::NoBuilder { buildah: missing.to_string(), docker: e.to_string() }),
            Err(e) => Err(e.into()),
        },
    }
}

/// `farm agent prune`: empties this work directory's layer cache (the engine's build cache, for
/// Docker). Run it while the agent is stopped.
pub async fn prune(
    work_dir: &std::path::Path,
    choice: BuilderChoice,
    docker_host: Option<&str>,
) -> Result<u64, AgentError> {
    let b = select(choice, work_dir, docker_host).await?;
    let before = b.cache_bytes().await?;
    b.prune(0).await?;
    Ok(before.saturating_sub(b.cache_bytes().await?))
}

/// This host's default capacity ([`session::default_capacity`] of its cores and memory).
pub fn default_capacity() -> u32 {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let memory = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| session::mem_total(&m)).unwrap_or(0);
    session::default_capacity(cores, memory)
}
