//! The program that turns a context into an image. buildah for now (daemonless: one plain
//! process tree per build, its own storage root per agent); the [`Builder`] trait is small so that
//! docker buildx or BuildKit can follow, and so that control-plane tests can use a scripted double.

use std::collections::HashMap;
use std::future::Future;
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use shared::Platform;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::Command;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

// A child module, so that it builds with the stores and runner below.
#[path = "crossbuild.rs"]
mod crossbuild;

/// How long a cancelled build gets between SIGTERM and SIGKILL.
pub const CANCEL_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuilderInfo {
    pub name: String,
    pub version: String,
}

#[derive(Debug, thiserror::Error)]
pub enum BuilderError {
    #[error("buildah not found ({0}); install it with `deploy/install.sh` or `apt-get install buildah`")]
    Missing(std::io::Error),
    #[error("`buildah --version` failed: {0}")]
    Version(String),
    #[error("cannot start buildah: {0}")]
    Spawn(std::io::Error),
    #[error("{0}")]
    Failed(String),
    #[error("cannot prepare the build in {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("cancelled")]
    Cancelled,
    #[error(transparent)]
    Docker(#[from] crate::docker::DockerError),
    #[error(transparent)]
    Memory(#[from] crate::cgroup::CgroupError),
}

/// One platform's build, as the agent hands it to its builder.
#[derive(Debug, Clone)]
pub struct Job<'a> {
    pub context: &'a Path,
    pub dockerfile: &'a str,
    pub platform: &'a Platform,
    pub build_args: &'a [(String, String)],
    pub target: Option<&'a str>,
    pub no_cache: bool,
    pub insecure_registries: &'a [String],
    /// Where to write the result as an OCI image layout.
    pub output: &'a Path,
    /// A name unique to this task, for the builder's local image.
    pub name: &'a str,
    /// Cancelled: stop the build (SIGTERM, then SIGKILL after [`CANCEL_GRACE`]).
    pub cancel: CancellationToken,
    /// Build secrets, for `RUN --mount=type=secret,id=...`.
    pub secrets: &'a [shared::proto::Secret],
    /// Registry host → mirror to pull base images from (`[mirrors]`).
    pub mirrors: &'a crate::mirrors::Mirrors,
    /// `memory_limit`: the build runs in a memory cgroup of its own with this limit.
    pub memory: Option<&'a crate::cgroup::MemoryLimit>,
    /// What the build may have beyond the default sandbox (the agent allows it).
    pub entitlements: &'a [shared::proto::Entitlement],
    /// `--annotation manifest:...` for this platform: on the image manifest.
    pub annotations: &'a std::collections::BTreeMap<String, String>,
    /// `--label`: image config labels.
    pub labels: &'a [(String, String)],
    /// `--ssh` ids and the sockets that relay them to the client's ssh-agent.
    pub ssh: &'a [(String, std::path::PathBuf)],
    /// `--pull`, `--network none`, `--add-host` (and the named contexts' names and digests).
    pub inputs: &'a shared::proto::Inputs,
    /// The named contexts, materialised: name and directory.
    pub contexts: &'a [(String, PathBuf)],
    /// The registry repository (no tag) this platform's layer cache is exported to.
    pub cache_to: Option<&'a str>,
    /// Repositories the layer cache is imported from, in order.
    pub cache_from: &'a [String],
    /// Cache images to pull before the build unless the store has them (see
    /// [`shared::cache::StepLog`]).
    pub cache_import: &'a [String],
    /// Credentials for the cache registry: the build's push credentials, when the cache lives
    /// on the same registry as the image.
    pub cache_credentials: Option<&'a shared::registry::Credentials>,
}

/// Secret files for one build, in memory-backed storage where there is some (/dev/shm), 0600
/// in a 0700 directory, removed when the build ends however it ends.
pub(crate) struct SecretFiles {
    dir: Option<PathBuf>,
    pub(crate) args: Vec<String>,
}

impl SecretFiles {
    pub(crate) fn write(
        fallback: &Path,
        name: &str,
        secrets: &[shared::proto::Secret],
    ) -> Result<SecretFiles, BuilderError> {
        use std::io::Write as _;
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        if secrets.is_empty() {
            return Ok(SecretFiles { dir: None, args: vec![] });
        }
        let shm = Path::new("/dev/shm");
        let base = if shm.is_dir() { shm.to_path_buf() } else { fallback.to_path_buf() };
        let dir = base.join(format!("farm-secrets-{name}"));
        let io = |source| BuilderError::Io { path: dir.clone(), source };
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::DirBuilder::new().mode(0o700).recursive(true).create(&dir).map_err(io)?;
        let mut files = SecretFiles { dir: Some(dir.clone()), args: vec![] };
        for (i, s) in secrets.iter().enumerate() {
            let path = dir.join(format!("s{i}"));
            let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path).map_err(io)?;
            f.write_all(&s.value).map_err(io)?;
            files.args.push(format!("id={},src={}", s.id, path.display()));
        }
        Ok(files)
    }
}

impl Drop for SecretFiles {
    fn drop(&mut self) {
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

pub type BuildFuture<'a> = Pin<Box<dyn Future<Output = Result<(), BuilderError>> + Send + 'a>>;

/// Builds report how long their phases took.
pub type Timed<'a> = Pin<Box<dyn Future<Output = Result<Vec<shared::proto::Phase>, BuilderError>> + Send + 'a>>;

pub trait Builder: Send + Sync {
    fn info(&self) -> &BuilderInfo;
    /// Frees the layer cache down to `limit` bytes, oldest images first (`0`: everything). Only
    /// called while no build runs.
    fn prune(&self, limit: u64) -> BuildFuture<'_> {
        let _ = limit;
        Box::pin(async { Ok(()) })
    }
    /// Builds `job`, sending log lines as they happen, until done or `job.cancel` fires; returns
    /// the time its phases took (`build`, `export`). However the build ends, it leaves nothing
    /// behind on this machine but its layer cache.
    fn build<'a>(&'a self, job: Job<'a>, log: mpsc::UnboundedSender<String>) -> Timed<'a>;
    /// Removes what builds of an earlier run of this agent left when it was killed (containers,
    /// mounts, temporary files). Called once at agent start, before any build. Resolves to
    /// whether this agent has its work directory to itself, so that the caller may sweep its own
    /// leftovers there too (another agent sharing it may be building: then nothing is swept).
    fn sweep(&self) -> Pin<Box<dyn Future<Output = bool> + Send + '_>> {
        Box::pin(async { true })
    }
}

/// buildah with its own storage under the agent's work directory, each RUN in its own
/// namespaces through runc (`--isolation oci`, see [`crate::isolation`]), and layer caching
/// between builds.
///
/// Nothing outlives a build: buildah runs in its own PID and mount namespaces (see
/// `Buildah::command`), so its processes and overlay mounts end with it however it ends;
/// `--force-rm` removes its containers when a step fails; its temporary files are in a
/// directory of its own, removed after it. What a killed buildah leaves in its store (containers
/// and their mount counts) is swept once no build of this agent uses that store, and at agent
/// start (see [`Builder::sweep`]).
pub struct Buildah {
    info: BuilderInfo,
    root: PathBuf,
    /// Names this work directory's secret files in /dev/shm (a hash of its path).
    tag: String,
    /// `<root>/lock`, flocked shared while this agent runs; exclusively to sweep, so that two
    /// agents sharing one work directory (embedded farms started side by side) never sweep
    /// under each other's builds. Set by [`Builder::sweep`].
    lock: OnceLock<std::fs::File>,
    stores: Mutex<HashMap<PathBuf, Arc<StoreUse>>>,
    /// One store sweep at a time (they share the exclusive lock).
    sweeping: tokio::sync::Mutex<()>,
    /// This machine's own platform: `FROM --platform=$BUILDPLATFORM` stages run on it (see
    /// [`crossbuild`]). Unset: every stage runs as the task's platform.
    native: Option<Platform>,
}

/// This agent's use of one platform's store.
#[derive(Default)]
struct StoreUse {
    /// Held shared by each build in this store, exclusively by a sweep.
    builds: tokio::sync::RwLock<()>,
    /// A build here did not succeed: it may have left containers.
    dirty: AtomicBool,
}

/// Marks a store dirty when dropped before the build was known to succeed (failed, cancelled,
/// or the build's future dropped).
struct Outcome<'a> {
    dirty: &'a AtomicBool,
    succeeded: bool,
}

impl Drop for Outcome<'_> {
    fn drop(&mut self) {
        if !self.succeeded {
            self.dirty.store(true, Ordering::SeqCst);
        }
    }
}

/// A build's own TMPDIR (buildah keeps copies of the context and its RUN scripts there), removed
/// when the build ends however it ends.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// flock(2) on `file`; whether it was granted.
fn flock(file: &std::fs::File, op: libc::c_int) -> bool {
    // SAFETY: flock on a file descriptor we own.
    unsafe { libc::flock(file.as_raw_fd(), op) == 0 }
}

/// Finds buildah and its version (`buildah version 1.28.2 (image-spec ...)`).
pub fn detect(work_dir: &Path) -> Result<Buildah, BuilderError> {
    let out = std::process::Command::new("buildah").arg("--version").output().map_err(BuilderError::Missing)?;
    if !out.status.success() {
        return Err(BuilderError::Version(String::from_utf8_lossy(&out.stderr).trim().to_string()));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let version = parse_version(&text).ok_or_else(|| BuilderError::Version(format!("unexpected output {text:?}")))?;
    let root = work_dir.join("buildah");
    let tag = shared::Digest::of(root.as_os_str().as_encoded_bytes()).hex()[..12].to_string();
    Ok(Buildah {
        info: BuilderInfo { name: "buildah".into(), version },
        root,
        tag,
        lock: OnceLock::new(),
        stores: Mutex::default(),
        sweeping: tokio::sync::Mutex::const_new(()),
        native: None,
    })
}

fn parse_version(text: &str) -> Option<String> {
    let mut words = text.split_whitespace();
    (words.next()? == "buildah" && words.next()? == "version").then(|| words.next().map(str::to_string))?
}

impl Buildah {
    /// buildah runs as PID 1 of its own PID namespace (`unshare --pid --fork --kill-child`):
    /// when it dies, however it dies, the kernel kills every process of the build with it (a
    /// RUN step's processes would otherwise outlive a killed agent, reparented to init).
    ///
    /// And in its own mount namespace, private (`--mount --propagation private`): the overlay
    /// mounts it makes are seen by no one else and go with the namespace when its last process
    /// ends, SIGKILL included (they would otherwise stay on the host, one `merged` per killed or
    /// failed RUN). The mount counts a killed buildah leaves in the store's run root are harmless:
    /// `buildah rm` of its container finds nothing to unmount and goes on.
    ///
    /// With a /proc of that PID namespace (`--mount-proc`): runc, which runs each RUN step, finds
    /// its container's processes by the PIDs it sees.
    ///
    /// Each platform has its own store (see [`Buildah::store`]).
    fn command(&self, store: &Path) -> Command {
        self.command_in(store, &[])
    }

    /// As [`Buildah::command`], with `prelude` run inside the namespaces before it execs buildah
    /// (see [`crate::isolation::Isolation::prelude`]).
    fn command_in(&self, store: &Path, prelude: &[String]) -> Command {
        let mut cmd = Command::new("unshare");
        cmd.args(["--pid", "--fork", "--kill-child", "--mount", "--propagation", "private", "--mount-proc"])
            .args(prelude)
            .arg("buildah")
            .arg("--root")
            .arg(store.join("storage"))
            .arg("--runroot")
            .arg(store.join("run"))
            .arg("--storage-driver")
            .arg("overlay")
            .envs(crate::isolation::BUILDAH_ENV)
            .env("TMPDIR", self.root.join("tmp"))
            .stdin(Stdio::null())
            .kill_on_drop(true);
        cmd
    }

    /// buildah reads plain-HTTP registries and mirrors from a registries.conf; this one lists the
    /// build's.
    fn registries_conf(&self, job: &Job<'_>) -> Result<PathBuf, BuilderError> {
        let path = job.output.with_extension("registries.conf");
        let text = crate::mirrors::registries_conf(job.insecure_registries, job.mirrors);
        std::fs::write(&path, text).map_err(|source| BuilderError::Io { path: path.clone(), source })?;
        Ok(path)
    }
}

impl Buildah {
    /// The store for one platform's builds. A multi-platform base tag pulled for two platforms at
    /// once into one store races on its local name (buildah 1.28 then fails with "image not
    /// known"); layers differ per platform anyway, so nothing is lost by keeping them apart.
    fn store(&self, platform: &Platform) -> PathBuf {
        self.root.join("stores").join(platform.to_string().replace('/', "-"))
    }

    /// Every platform's store that exists.
    fn stores(&self) -> Vec<PathBuf> {
        std::fs::read_dir(self.root.join("stores"))
            .map(|d| d.filter_map(Result::ok).map(|e| e.path()).filter(|p| p.is_dir()).collect())
            .unwrap_or_default()
    }

    /// Bytes used by this agent's buildah storage.
    pub fn cache_bytes(&self) -> u64 {
        fn walk(dir: &Path) -> u64 {
            let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
            entries
                .filter_map(Result::ok)
                .map(|e| match e.file_type() {
                    Ok(t) if t.is_dir() => walk(&e.path()),
                    Ok(t) if t.is_file() => e.metadata().map(|m| m.len()).unwrap_or(0),
                    _ => 0,
                })
                .sum()
        }
        walk(&self.root.join("stores"))
    }

    async fn output(&self, store: &Path, args: &[&str]) -> Result<String, BuilderError> {
        let out = self.command(store).args(args).output().await.map_err(BuilderError::Spawn)?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
            return Err(BuilderError::Failed(format!("buildah {}: {err}", args.join(" "))));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// Images in a store with their creation time, oldest first, from `buildah images --json`.
fn images_oldest_first(json: &str) -> Vec<(i64, String)> {
    let Ok(serde_json::Value::Array(images)) = serde_json::from_str::<serde_json::Value>(json) else { return vec![] };
    // `created` is Unix seconds in buildah's JSON.
    let mut v: Vec<(i64, String)> = images
        .iter()
        .filter_map(|i| Some((i["created"].as_i64().unwrap_or(0), i["id"].as_str()?.to_string())))
        .collect();
    v.sort();
    v
}

impl Builder for Buildah {
    fn info(&self) -> &BuilderInfo {
        &self.info
    }

    fn prune(&self, limit: u64) -> BuildFuture<'_> {
        Box::pin(async move {
            if limit == 0 {
                for store in self.stores() {
                    // What the store held of the registry cache goes with its images.
                    let _ = std::fs::remove_file(store.join(CACHE_KNOWN));
                    let _ = self.output(&store, &["rm", "--all"]).await;
                    self.output(&store, &["rmi", "--all", "--force"]).await?;
                }
                return Ok(());
            }
            if self.cache_bytes() <= limit {
                return Ok(());
            }
            // Oldest images first, across every platform's store.
            let mut images = Vec::new();
            for store in self.stores() {
                let json = self.output(&store, &["images", "--json"]).await?;
                images.extend(images_oldest_first(&json).into_iter().map(|(t, id)| (t, id, store.clone())));
            }
            images.sort();
            for (_, id, store) in images {
                let _ = std::fs::remove_file(store.join(CACHE_KNOWN));
                let _ = self.output(&store, &["rmi", "--force", &id]).await;
                if self.cache_bytes() <= limit {
                    break;
                }
            }
            for store in self.stores() {
                let _ = std::fs::remove_file(store.join(CACHE_KNOWN));
                let _ = self.output(&store, &["rmi", "--prune"]).await;
            }
            Ok(())
        })
    }

    fn build<'a>(&'a self, job: Job<'a>, log: mpsc::UnboundedSender<String>) -> Timed<'a> {
        Box::pin(async move {
            let store = self.store(self.store_platform(&job));
            let used = self.store_use(&store);
            let mut outcome = Outcome { dirty: &used.dirty, succeeded: false };
            let result = {
                let _building = used.builds.read().await;
                // A registry cache that cannot be written fails buildah's build ("failed pushing
                // cache"): the build runs again without it (its steps are in the local cache by
                // then), as buildx's `ignore-error=true` would have it.
                let uncached = (job.cache_to.is_some() || !job.cache_from.is_empty()).then(|| Job {
                    cache_to: None,
                    cache_from: &[],
                    cache_import: &[],
                    ..job.clone()
                });
                match (self.build_in(&store, job, log.clone()).await, uncached) {
                    (Err(BuilderError::Failed(e)), Some(again)) if e.contains("failed pushing cache") => {
                        let _ = log.send(format!(
                            "farm: the registry cache failed ({e}); building again without it (check the cache \
                             registry, --insecure-registry and its credentials)"
                        ));
                        self.build_in(&store, again, log).await
                    }
                    (result, _) => result,
                }
            };
            outcome.succeeded = result.is_ok();
            drop(outcome);
            if used.dirty.load(Ordering::SeqCst) {
                self.sweep_store(&store, &used).await;
            }
            result
        })
    }

    fn sweep(&self) -> Pin<Box<dyn Future<Output = bool> + Send + '_>> {
        Box::pin(self.sweep_at_start())
    }
}

impl Buildah {
    fn store_use(&self, store: &Path) -> Arc<StoreUse> {
        self.stores.lock().unwrap().entry(store.to_path_buf()).or_default().clone()
    }

    /// Removes the containers of builds that did not succeed in `store` (those buildah could not
    /// remove itself: killed on cancel, or dying), once no build of this agent uses the store and
    /// no other agent shares the work directory; else a later build's end does it.
    async fn sweep_store(&self, store: &Path, used: &StoreUse) {
        let _one = self.sweeping.lock().await;
        let Ok(_alone_in_store) = used.builds.try_write() else { return };
        let Some(lock) = self.lock.get() else { return };
        if !flock(lock, libc::LOCK_EX | libc::LOCK_NB) {
            return;
        }
        if used.dirty.swap(false, Ordering::SeqCst) {
            match self.output(store, &["rm", "--all"]).await {
                Ok(removed) if !removed.trim().is_empty() => {
                    tracing::info!(store = %store.display(), "removed {} leftover container(s)", removed.lines().count());
                }
                Ok(_) => {}
                Err(e) => {
                    used.dirty.store(true, Ordering::SeqCst);
                    tracing::warn!("removing leftover containers: {e}");
                }
            }
        }
        flock(lock, libc::LOCK_SH);
    }

    /// At agent start, with the work directory to itself (an exclusive lock), removes what a
    /// killed agent's builds left: every store's run root (mount counts of mounts that died with
    /// their namespaces, as after a reboot) and containers, mounts of older farm versions under
    /// the root, temporary files, and this work directory's secret files. Then holds the lock
    /// shared for as long as the agent runs.
    async fn sweep_at_start(&self) -> bool {
        let path = self.root.join("lock");
        let file = std::fs::create_dir_all(&self.root)
            .and_then(|()| std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path));
        let file = match file {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!("cannot open {}: {e}; not sweeping leftovers of earlier builds", path.display());
                return false;
            }
        };
        let alone = flock(&file, libc::LOCK_EX | libc::LOCK_NB);
        if alone {
            for target in mounts_under(&std::fs::canonicalize(&self.root).unwrap_or_else(|_| self.root.clone())) {
                let c = std::ffi::CString::new(target.as_os_str().as_encoded_bytes()).expect("no NUL in a path");
                // SAFETY: umount2 on a path under our own root.
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
                tracing::info!("unmounted leftover {}", target.display());
            }
            for store in self.stores() {
                let _ = std::fs::remove_dir_all(store.join("run"));
                match self.output(&store, &["rm", "--all"]).await {
                    Ok(removed) if !removed.trim().is_empty() => tracing::info!(
                        store = %store.display(),
                        "removed {} container(s) left by an earlier run",
                        removed.lines().count()
                    ),
                    Ok(_) => {}
                    Err(e) => tracing::warn!("removing containers left by an earlier run: {e}"),
                }
            }
            let _ = std::fs::remove_dir_all(self.root.join("netns"));
            let tmp = self.root.join("tmp");
            let _ = std::fs::remove_dir_all(&tmp);
            let _ = std::fs::create_dir_all(&tmp);
            let prefix = format!("farm-secrets-{}-", self.tag);
            for e in std::fs::read_dir("/dev/shm").into_iter().flatten().filter_map(Result::ok) {
                if e.file_name().to_string_lossy().starts_with(&prefix) {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        } else {
            tracing::info!(
                "another agent is using {}: leftovers of earlier builds are swept when an agent starts alone",
                self.root.display()
            );
        }
        // Shared from now on; waits if another agent is sweeping.
        let file = tokio::task::spawn_blocking(move || {
            flock(&file, libc::LOCK_SH);
            file
        })
        .await
        .expect("flock does not panic");
        let _ = self.lock.set(file);
        alone
    }

    /// Pulls the cache images the coordinator named (`cache_import`: the previous build's
    /// layer-less steps, see [`shared::cache::StepLog`]) that this store does not have, one
    /// `buildah pull` each, before the build: buildah 1.28 never pulls those itself, and a cold
    /// store that misses one takes nothing from the registry for the rest of its stage. The layer
    /// steps are left to `--cache-from`, which pulls them lazily while they hit. The store's
    /// `cache-known` file lists what it imported or exported itself (a warm store pulls nothing).
    /// A failed pull only costs the cache.
    async fn import_cache(
        &self,
        store: &Path,
        job: &Job<'_>,
        conf: &Path,
        tmp: &Path,
        authfile: Option<&Path>,
        log: &mpsc::UnboundedSender<String>,
    ) {
        let Some(repo) = job.cache_from.first() else { return };
        let known = std::fs::read_to_string(store.join(CACHE_KNOWN)).unwrap_or_default();
        let known: std::collections::HashSet<&str> = known.lines().collect();
        let wanted: Vec<&String> = job
            .cache_import
            .iter()
            .filter(|r| r.strip_prefix(repo.as_str()).is_some_and(|key| key.starts_with(':')))
            .filter(|r| !known.contains(r.as_str()))
            .collect();
        if wanted.is_empty() {
            return;
        }
        let started = std::time::Instant::now();
        let mut imported = vec![];
        for r in wanted {
            let mut pull = self.command(store);
            pull.env("CONTAINERS_REGISTRIES_CONF", conf).env("TMPDIR", tmp).args(["pull", "--quiet"]);
            if let Some(a) = authfile {
                pull.arg("--authfile").arg(a);
            }
            pull.arg(format!("docker://{r}")).stdout(Stdio::null()).stderr(Stdio::piped());
            let out = tokio::select! {
                out = pull.output() => out,
                _ = job.cancel.cancelled() => return,
            };
            match out {
                Ok(o) if o.status.success() => imported.push(r.clone()),
                Ok(o) => {
                    let err = String::from_utf8_lossy(&o.stderr);
                    let why = err.lines().rev().find_map(error_line).unwrap_or("buildah pull failed").to_string();
                    let _ = log.send(format!("farm: no layer cache imported from {r}: {why}"));
                }
                Err(e) => {
                    let _ = log.send(format!("farm: no layer cache imported from {r}: {e}"));
                }
            }
        }
        if !imported.is_empty() {
            remember_cache(store, imported.iter().map(String::as_str));
            let _ = log.send(format!(
                "farm: imported the layer cache {repo} into this agent: {} step image(s) of the previous build ({:.1} s)",
                imported.len(),
                started.elapsed().as_secs_f64()
            ));
        }
    }

    async fn build_in(
        &self,
        store: &Path,
        job: Job<'_>,
        log: mpsc::UnboundedSender<String>,
    ) -> Result<Vec<shared::proto::Phase>, BuilderError> {
        {
            let started = std::time::Instant::now();
            let tmp = TempDir(self.root.join("tmp").join(job.name));
            let _ = std::fs::remove_dir_all(&tmp.0);
            std::fs::create_dir_all(&tmp.0).map_err(|source| BuilderError::Io { path: tmp.0.clone(), source })?;
            let conf = self.registries_conf(&job)?;
            let sandbox = crate::isolation::Isolation::prepare(
                &self.root.join("netns"),
                job.name,
                job.entitlements,
                job.inputs.no_network,
            )
            .await
            .map_err(|e| BuilderError::Failed(e.to_string()))?;
            let cross = self.prepare(&job, &tmp.0, &conf, &log, &sandbox).await?;
            let mut build = self.command_in(store, &sandbox.prelude());
            // --force-rm: a failed step's container goes too (buildah 1.28 keeps it by default).
            // buildah makes the sockets of `--ssh` under TMPDIR (`.buildah-ssh-sockN/ssh_auth_sock`):
            // a short link to the same directory keeps their paths within a socket's 108 bytes.
            let short_tmp = (!job.ssh.is_empty())
                .then(|| crate::ssh::ShortLink::to(&tmp.0))
                .transpose()
                .map_err(|source| BuilderError::Io { path: tmp.0.clone(), source })?;
            build.env("CONTAINERS_REGISTRIES_CONF", &conf).env("TMPDIR", short_tmp.as_ref().map_or(&tmp.0, |l| &l.0));
            build.arg("build").arg("--rm").arg("--force-rm");
            // Each step is committed as an image of its own only where it can serve as a cache:
            // `--no-cache` with nothing to export builds as `buildah build --no-cache` does,
            // committing the final image alone.
            if !job.no_cache || job.cache_to.is_some() {
                build.arg("--layers");
            }
            cross.add_args(&mut build, &job);
            input_args(&mut build, &job);
            for (k, v) in job.build_args {
                build.arg("--build-arg").arg(format!("{k}={v}"));
            }
            if let Some(t) = job.target {
                build.arg("--target").arg(t);
            }
            if job.no_cache {
                build.arg("--no-cache");
            }
            // Labels go into the image config, annotations into the OCI manifest `buildah push`
            // writes (its default format is OCI).
            for (k, v) in job.labels {
                build.arg("--label").arg(format!("{k}={v}"));
            }
            for (k, v) in job.annotations {
                build.arg("--annotation").arg(format!("{k}={v}"));
            }
            let authfile = registry_cache(&mut build, &job, &tmp.0, &log)?;
            self.import_cache(store, &job, &conf, &tmp.0, authfile.as_deref(), &log).await;
            let secrets = SecretFiles::write(&tmp.0, &format!("{}-{}", self.tag, job.name), job.secrets)?;
            for s in &secrets.args {
                build.arg("--secret").arg(s);
            }
            for (id, socket) in job.ssh {
                build.arg("--ssh").arg(format!("{id}={}", socket.display()));
            }
            sandbox.apply(&mut build);
            build.arg("--tag").arg(job.name).arg(job.context);
            let cgroup = job.memory.map(|m| m.create(job.name)).transpose().map_err(BuilderError::Memory)?;
            if let Some(c) = &cgroup {
                c.join(&mut build);
            }
            // The cache images this build exports are in the store: the next build needs not
            // import them.
            let (tee, mut lines) = mpsc::unbounded_channel::<String>();
            let exported = async {
                let mut steps = shared::cache::StepLog::default();
                while let Some(line) = lines.recv().await {
                    steps.line(&line);
                    let _ = log.send(line);
                }
                steps
            };
            let cancel = &job.cancel;
            let (built, steps) = tokio::join!(
                async move {
                    let built = run(build, &tee, "buildah build", cancel).await;
                    drop(tee);
                    built
                },
                exported
            );
            if job.cache_to.is_some() && built.is_ok() {
                remember_cache(store, steps.pushed());
            }
            drop(sandbox);
            drop(secrets);
            drop(short_tmp);
            match cgroup {
                Some(c) => out_of_memory(c, built).await?,
                None => built?,
            }
            let build_ms = started.elapsed().as_millis() as u64;
            let exporting = std::time::Instant::now();
            let mut push = self.command(store);
            push.env("TMPDIR", &tmp.0)
                .arg("push")
                .arg("--format")
                .arg("oci")
                .arg(job.name)
                .arg(format!("oci:{}", job.output.display()));
            // The image stays: its layers are the cache of the next build. Removing it here would
            // race with other tasks' pushes (containers/storage finds layers by digest), so the
            // store is trimmed only when the agent is idle (see `prune`).
            run(push, &log, "buildah push", &job.cancel).await?;
            let phase = |name: &str, ms| shared::proto::Phase { name: name.into(), ms };
            Ok(vec![phase("build", build_ms), phase("export", exporting.elapsed().as_millis() as u64)])
        }
    }
}

/// The file in a store that lists the cache images (`REPOSITORY:KEY`) it holds.
const CACHE_KNOWN: &str = "cache-known";

/// Adds `refs` to the store's list of the cache images it holds.
fn remember_cache<'a>(store: &Path, refs: impl Iterator<Item = &'a str>) {
    use std::io::Write as _;
    let text: String = refs.map(|r| format!("{r}\n")).collect();
    if text.is_empty() {
        return;
    }
    let path = store.join(CACHE_KNOWN);
    let appended = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| f.write_all(text.as_bytes()));
    if let Err(e) = appended {
        tracing::warn!("recording the cache images of {}: {e}", store.display());
    }
}

/// What the build's inputs add to a `buildah build` (also the native stages' builds): named
/// contexts, `--pull-always` (buildah 1.28's spelling of "always pull"), `--add-host`.
pub(crate) fn input_args(build: &mut Command, job: &Job<'_>) {
    for (name, dir) in job.contexts {
        build.arg("--build-context").arg(format!("{name}={}", dir.display()));
    }
    if job.inputs.pull {
        build.arg("--pull-always");
    }
    for (host, ip) in &job.inputs.add_hosts {
        build.arg("--add-host").arg(format!("{host}:{ip}"));
    }
}

/// The layer cache shared through a registry (every build has `--layers`, which buildah needs
/// for it): `--cache-to REPO` pushes each step's image tagged by its cache key, `--cache-from
/// REPO` pulls a step's image by key before running it ("Cache pulled from remote", then "Using
/// cache"). buildah 1.28 reads one `--cache-from`: the first is used, and the log says so of
/// the others. Plain HTTP comes from the build's registries.conf (`--insecure-registry`);
/// credentials, when the cache shares the image's registry, from an auth file in the build's
/// private temporary directory.
fn registry_cache(
    build: &mut Command,
    job: &Job<'_>,
    dir: &Path,
    log: &mpsc::UnboundedSender<String>,
) -> Result<Option<PathBuf>, BuilderError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(to) = job.cache_to {
        build.arg("--cache-to").arg(to);
    }
    if let Some((from, rest)) = job.cache_from.split_first() {
        build.arg("--cache-from").arg(from);
        if !rest.is_empty() {
            let _ = log.send(format!(
                "farm: buildah 1.28 reads one --cache-from: importing from {from}, not {}",
                rest.join(", ")
            ));
        }
    }
    let cache_registry = job.cache_to.or(job.cache_from.first().map(String::as_str)).map(shared::cache::registry_of);
    if let (Some(registry), Some(c)) = (cache_registry, job.cache_credentials) {
        let path = dir.join("cache-auth.json");
        let io = |source| BuilderError::Io { path: path.clone(), source };
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path).map_err(io)?;
        f.write_all(shared::registry::auth_file(registry, c).as_bytes()).map_err(io)?;
        build.arg("--authfile").arg(&path);
        return Ok(Some(path));
    }
    Ok(None)
}

/// A build that ran in `cgroup`: failed because the kernel killed a process for using more
/// than the memory limit, its error says so first. The cgroup is removed.
async fn out_of_memory(
    cgroup: crate::cgroup::BuildCgroup,
    built: Result<(), BuilderError>,
) -> Result<(), BuilderError> {
    let built = built.map_err(|e| match e {
        // A RUN killed by the kernel (SIGKILL: 137) in a build that hit its limit: under runc the
        // RUN has a cgroup of its own below the build's, where v1 counts the kill.
        BuilderError::Failed(why) if cgroup.oom_killed() || (killed(&why) && cgroup.hit_limit()) => {
            BuilderError::Failed(format!("{} ({why})", cgroup.limit().out_of_memory()))
        }
        e => e,
    });
    cgroup.remove().await;
    built
}

/// Whether a builder's error says its process was killed (SIGKILL, exit status 137).
fn killed(error: &str) -> bool {
    error.contains("exit status 137") || error.contains("signal: killed")
}

/// Mount points under `root` in this mount namespace, deepest first (`/proc/self/mountinfo`'s
/// fifth field, octal escapes decoded).
fn mounts_under(root: &Path) -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut found: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(unescape_mountinfo(m)))
        .filter(|p| p.starts_with(root) && p != root)
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found.dedup();
    found
}

/// mountinfo writes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b.get(i + 1..i + 4).filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) if b[i] == b'\\' => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            _ => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Runs a builder command in its own process group, streaming its stdout and stderr line by
/// line. Cancelled, the whole group gets SIGTERM, then SIGKILL after [`CANCEL_GRACE`]. If the
/// agent itself dies, the kernel kills the builder too (PR_SET_PDEATHSIG), so a lost agent does
/// not leave a build running that nobody will collect.
pub(crate) async fn run(
    mut cmd: Command,
    log: &mpsc::UnboundedSender<String>,
    what: &str,
    cancel: &CancellationToken,
) -> Result<(), BuilderError> {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0);
    // SAFETY: prctl is async-signal-safe and touches only the calling (child) process.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(BuilderError::Spawn)?;
    let pgid = child.id().map(|p| p as i32);
    let out = pump(child.stdout.take().expect("piped"), log.clone());
    let err = pump(child.stderr.take().expect("piped"), log.clone());
    let signal = |sig| {
        if let Some(pgid) = pgid {
            // SAFETY: kill(2) on our own child's process group.
            unsafe { libc::kill(-pgid, sig) };
        }
    };
    let waited = async {
        tokio::select! {
            status = child.wait() => Some(status),
            () = cancel.cancelled() => {
                signal(libc::SIGTERM);
                if tokio::time::timeout(CANCEL_GRACE, child.wait()).await.is_err() {
                    signal(libc::SIGKILL);
                    let _ = child.wait().await;
                }
                None
            }
        }
    };
    let (status, out_error, err_error) = tokio::join!(waited, out, err);
    // Whatever the builder started in its group goes with it.
    signal(libc::SIGKILL);
    match status {
        None => Err(BuilderError::Cancelled),
        Some(status) => {
            let status = status.map_err(BuilderError::Spawn)?;
            if status.success() {
                Ok(())
            } else {
                // The builder's own last error line says which step failed and why; the exit
                // status only that it did.
                Err(BuilderError::Failed(match err_error.or(out_error) {
                    Some(line) => with_hint(line),
                    None => format!("{what} failed ({status})"),
                }))
            }
        }
    }
}

/// Forwards a builder's output line by line; returns its last error line.
async fn pump(stream: impl AsyncRead + Unpin, log: mpsc::UnboundedSender<String>) -> Option<String> {
    let mut lines = BufReader::new(stream).lines();
    let mut last_error = None;
    while let Ok(Some(line)) = lines.next_line().await {
        let Some(line) = clean(line) else { continue };
        if let Some(e) = error_line(&line) {
            last_error = Some(e.to_string());
        }
        let _ = log.send(line);
    }
    last_error
}

/// The build arguments builders set themselves (BuildKit's automatic platform arguments).
const AUTOMATIC_ARGS: [&str; 8] = [
    "TARGETPLATFORM",
    "TARGETOS",
    "TARGETARCH",
    "TARGETVARIANT",
    "BUILDPLATFORM",
    "BUILDOS",
    "BUILDARCH",
    "BUILDVARIANT",
];

/// A builder's output line as the user should see it, or `None` for noise about what farm or
/// the builder itself did (not the user's Dockerfile).
fn clean(line: String) -> Option<String> {
    if is_noise(&line) {
        return None;
    }
    // buildah: `[Warning] one or more build args were not consumed: [TARGETOS TARGETPLATFORM]`
    const UNCONSUMED: &str = "one or more build args were not consumed: [";
    if let Some(i) = line.find(UNCONSUMED) {
        let list = line[i + UNCONSUMED.len()..].trim_end().trim_end_matches(']');
        let user: Vec<&str> = list.split_whitespace().filter(|a| !AUTOMATIC_ARGS.contains(a)).collect();
        if user.is_empty() {
            return None;
        }
        return Some(format!("{}{UNCONSUMED}{}]", &line[..i], user.join(" ")));
    }
    Some(line)
}

/// The message of a builder's error line: buildah's `Error: ...`, BuildKit's `ERROR: ...` /
/// `error: ...`.
fn error_line(line: &str) -> Option<&str> {
    let line = line.trim();
    ["Error: ", "ERROR: ", "error: "].iter().find_map(|p| line.strip_prefix(p)).map(str::trim).filter(|m| !m.is_empty())
}

/// Adds what to do to builder errors whose fix farm knows.
fn with_hint(error: String) -> String {
    if error.contains("server gave HTTP response to HTTPS client") {
        // `Get "https://HOST/v2/": http: server gave HTTP response to HTTPS client`
        let host = error.split("https://").nth(1).and_then(|rest| rest.split('/').next()).unwrap_or("REGISTRY");
        return format!(
            "{error}: the registry {host} answered in plain HTTP, not HTTPS: name it with --insecure-registry {host}"
        );
    }
    error
}

/// buildah 1.28 warns that the automatic platform arguments are "missing" although it sets them.
fn is_noise(line: &str) -> bool {
    line.contains("missing \\\"TARGET") || line.contains("missing \\\"BUILD")
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_buildah_version() {
        let v = super::parse_version("buildah version 1.28.2 (image-spec 1.0.2-dev, runtime-spec 1.0.2-dev)\n");
        assert_eq!(v.as_deref(), Some("1.28.2"));
        assert_eq!(super::parse_version("podman version 4"), None);
    }

    #[test]
    fn images_are_pruned_oldest_first() {
        let json = r#"[{"id":"b","created":200},{"id":"a","created":100},{"id":"c","created":300}]"#;
        let ids: Vec<String> = super::images_oldest_first(json).into_iter().map(|(_, id)| id).collect();
        assert_eq!(ids, ["a", "b", "c"]);
        assert!(super::images_oldest_first("not json").is_empty());
    }

    #[test]
    fn the_builder_s_error_line_is_the_error() {
        let l = r#"Error: error building at STEP "RUN false": error while running runtime: exit status 1"#;
        assert_eq!(
            super::error_line(l),
            Some(r#"error building at STEP "RUN false": error while running runtime: exit status 1"#)
        );
        assert_eq!(
            super::error_line(
                "ERROR: failed to solve: process \"/bin/sh -c false\" did not complete successfully: exit code: 1"
            ),
            Some("failed to solve: process \"/bin/sh -c false\" did not complete successfully: exit code: 1")
        );
        assert_eq!(super::error_line("STEP 2/3: RUN false"), None);
        let http = r#"creating build container: initializing source docker://127.0.0.1:5000/busybox:1: pinging container registry 127.0.0.1:5000: Get "https://127.0.0.1:5000/v2/": http: server gave HTTP response to HTTPS client"#;
        assert!(super::with_hint(http.into()).ends_with(
            "the registry 127.0.0.1:5000 answered in plain HTTP, not HTTPS: name it with --insecure-registry 127.0.0.1:5000"
        ));
    }

    #[test]
    fn warnings_about_automatic_args_are_dropped() {
        let w = |l: &str| super::clean(l.to_string());
        assert_eq!(w("[Warning] one or more build args were not consumed: [TARGETOS TARGETPLATFORM]"), None);
        assert_eq!(
            w("[Warning] one or more build args were not consumed: [TARGETARCH VERSION]").as_deref(),
            Some("[Warning] one or more build args were not consumed: [VERSION]")
        );
        assert_eq!(w("STEP 1/2: FROM x").as_deref(), Some("STEP 1/2: FROM x"));
    }

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(super::unescape_mountinfo(r"/w/a\040b/merged"), "/w/a b/merged");
        assert_eq!(super::unescape_mountinfo(r"/w/a\134b"), r"/w/a\b");
        assert_eq!(super::unescape_mountinfo(r"/w/\04"), r"/w/\04");
    }

    #[test]
    fn buildah_noise_is_filtered() {
        assert!(super::is_noise(r#"level=warning msg="missing \"TARGETPLATFORM\" build argument. Try adding ...""#));
        assert!(!super::is_noise("STEP 1/3: FROM busybox"));
    }
}
