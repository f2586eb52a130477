//! One assignment, start to finish: fetch the context's missing files from the coordinator,
//! recreate it in a private directory, build it for the task's platform, push the image to the
//! registry by digest, and report the manifest. Log lines stream out as they happen.

use std::path::PathBuf;
use std::sync::Arc;

use shared::client::{Link, LinkError};
use shared::context::{materialise, BlobStore, ContextError, ContextLimits, ValidManifest};
use shared::oci::{self, ImageRef};
use shared::proto::{AgentMsg, Assignment, ManifestRef, Phase};
use shared::registry::Registry;
use shared::Digest;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::builder::{Builder, BuilderError, Job};

#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error("build context: {0}")]
    Context(#[from] ContextError),
    /// A request to the coordinator failed (fetching the context, uploading the image).
    #[error(transparent)]
    Link(LinkError),
    #[error(transparent)]
    Builder(#[from] BuilderError),
    #[error("reading the built image: {0}")]
    Oci(#[from] oci::OciError),
    #[error("pushing the image: {0}")]
    Registry(#[from] shared::registry::RegistryError),
    /// This agent's disk is full: not the build's fault, so the task may run on another agent.
    #[error("{0}")]
    NoSpace(String),
    #[error("{0}")]
    Other(String),
}

/// Phase timings, one lap at a time.
struct Laps {
    clock: std::time::Instant,
    timings: Vec<Phase>,
}

impl Laps {
    fn lap(&mut self, name: &str) {
        self.timings.push(Phase { name: name.into(), ms: self.clock.elapsed().as_millis() as u64 });
        self.clock = std::time::Instant::now();
    }
}

/// The agent's current session with the coordinator, if any; it changes with every session.
pub type Conn = tokio::sync::watch::Receiver<Option<Link>>;

/// How long a task waits for a session to fetch its context.
pub const FETCH_PATIENCE: std::time::Duration = std::time::Duration::from_secs(120);

impl From<LinkError> for TaskError {
    fn from(e: LinkError) -> Self {
        match e {
            LinkError::Context(e) => TaskError::Context(e),
            LinkError::NoSpace(message) => TaskError::NoSpace(message),
            e => TaskError::Link(e),
        }
    }
}

impl TaskError {
    /// Whether a write failed because the disk is full (a full disk is not a flaky link).
    fn is_no_space(&self) -> bool {
        match self {
            TaskError::NoSpace(_) => true,
            TaskError::Link(e) => e.is_no_space(),
            TaskError::Context(e) => e.is_no_space(),
            _ => false,
        }
    }

    /// Failures of the link, not of the build.
    fn is_transient(&self) -> bool {
        matches!(self, TaskError::Link(e) if e.is_transient())
    }
}

/// The images the Dockerfile at `path` names in its `FROM` lines, as references (what cannot be
/// read or parsed is left out: these are only mount sources).
fn base_image_refs(path: &std::path::Path, build_args: &[(String, String)]) -> Vec<ImageRef> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    shared::dockerfile::base_images(&text, build_args).iter().filter_map(|b| b.parse().ok()).collect()
}

/// How many `PutBlobs` streams an image's blobs go to the coordinator on at once.
const PARALLEL_BLOB_STREAMS: usize = 4;

/// `blobs` in at most `n` groups of about equal bytes (the biggest first, each to the lightest
/// group), each group in the order given; no empty group.
fn spread(blobs: &[(Digest, u64)], n: usize) -> Vec<Vec<(Digest, u64)>> {
    let n = n.clamp(1, blobs.len().max(1));
    let mut order: Vec<usize> = (0..blobs.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(blobs[i].1));
    let mut groups: Vec<(u64, Vec<usize>)> = vec![(0, Vec::new()); n];
    for i in order {
        let lightest = groups.iter_mut().min_by_key(|(bytes, _)| *bytes).expect("n >= 1");
        lightest.0 += blobs[i].1;
        lightest.1.push(i);
    }
    groups
        .into_iter()
        .filter(|(_, g)| !g.is_empty())
        .map(|(_, mut g)| {
            g.sort_unstable();
            g.into_iter().map(|i| blobs[i].clone()).collect()
        })
        .collect()
}

pub struct Runner {
    /// Builds hold it shared; pruning the layer cache holds it alone.
    pub cache_lock: tokio::sync::RwLock<()>,
    /// The layer cache is trimmed to this many bytes when the agent is idle.
    pub cache_limit: u64,
    pub name: String,
    pub work_dir: PathBuf,
    pub store: BlobStore,
    pub builder: Arc<dyn Builder>,
    pub max_frame: usize,
    /// Registry host → mirror for base images.
    pub mirrors: crate::mirrors::Mirrors,
    /// Each build's memory limit, if configured.
    pub memory: Option<crate::cgroup::MemoryLimit>,
    /// The entitlements this agent's config allows; a task asking for more is refused.
    pub allowed: Vec<shared::proto::Entitlement>,
    /// Which registry repositories hold which blobs, as this agent learnt pushing: blobs another
    /// build pushed elsewhere in the same registry are mounted rather than uploaded again.
    pub locations: shared::registry::BlobLocations,
}

impl Runner {
    pub async fn run(
        &self,
        a: &Assignment,
        conn: &Conn,
        out: &mpsc::UnboundedSender<AgentMsg>,
        cancel: CancellationToken,
    ) -> Result<(ManifestRef, Vec<Phase>), TaskError> {
        let dir = self.work_dir.join("tasks").join(format!("{}-{}", a.task, a.attempt));
        let _cache = self.cache_lock.read().await;
        let result = self.steps(a, conn, out, cancel, &dir).await;
        // Success or not, the task's files go: the layer cache lives in the builder's storage.
        let _ = std::fs::remove_dir_all(&dir);
        result
    }

    async fn steps(
        &self,
        a: &Assignment,
        conn: &Conn,
        out: &mpsc::UnboundedSender<AgentMsg>,
        cancel: CancellationToken,
        dir: &std::path::Path,
    ) -> Result<(ManifestRef, Vec<Phase>), TaskError> {
        let mut laps = Laps { clock: std::time::Instant::now(), timings: Vec::new() };
        let (task, attempt) = (a.task, a.attempt);
        let say = |line: String| {
            let _ = out.send(AgentMsg::TaskLog { task, attempt, line });
        };
        let mode = if a.emulated { "emulated with QEMU" } else { "native" };
        // The coordinator places a build only on agents that allow its entitlements; an agent
        // whose config changed since it registered still refuses.
        if let Some(e) = a.entitlements.iter().find(|e| !self.allowed.contains(e)) {
            return Err(TaskError::Other(format!(
                "the build asks for {e}, which agent {} does not allow (its config key {} is false)",
                self.name,
                e.config_key()
            )));
        }
        say(format!("farm: building {} on agent {} ({mode})", a.platform, self.name));
        let _ = std::fs::remove_dir_all(dir);
        let limits = a.context_limits.into();
        let full = |e: TaskError| self.no_space_in("fetching the build context", e);
        let manifest = self.fetch_context(conn, &a.context, &limits).await.map_err(full)?;
        // Named contexts (`--build-context NAME=DIR`) come the same way, each into its own directory.
        let mut named = Vec::new();
        for c in &a.inputs.contexts {
            named.push(self.fetch_context(conn, &c.context, &limits).await.map_err(full)?);
        }
        laps.lap("context sync");
        let context = dir.join("context");
        let mut contexts = Vec::new();
        let mut todo = vec![(manifest, context.clone())];
        for (i, (c, m)) in a.inputs.contexts.iter().zip(named).enumerate() {
            let path = dir.join(format!("named-context-{i}"));
            contexts.push((c.name.clone(), path.clone()));
            todo.push((m, path));
        }
        // Thousands of files: off the runtime's threads, so heartbeats keep going meanwhile.
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || todo.iter().try_for_each(|(m, dest)| materialise(m, &store, dest)))
            .await
            .map_err(|e| TaskError::Other(format!("materialising the context: {e}")))?
            .map_err(|e| self.no_space_in("copying the build context into place", e.into()))?;
        laps.lap("materialise");

        let (log, mut lines) = mpsc::unbounded_channel();
        let forward = {
            let out = out.clone();
            tokio::spawn(async move {
                while let Some(line) = lines.recv().await {
                    let _ = out.send(AgentMsg::TaskLog { task, attempt, line });
                }
            })
        };
        // `--ssh`: a socket per id, each connection relayed to the client's ssh-agent.
        let forwards = if a.ssh.is_empty() {
            None
        } else {
            let f = crate::ssh::Forwards::start(
                &dir.join("ssh"),
                &a.build,
                &a.ssh,
                conn.clone(),
                self.max_frame,
                log.clone(),
            )
            .map_err(|e| TaskError::Other(format!("cannot create the --ssh sockets in {}: {e}", dir.display())))?;
            Some(f)
        };
        let output = dir.join("layout");
        let name = format!("farm-task-{task}-{attempt}");
        let job = Job {
            context: &context,
            dockerfile: &a.dockerfile,
            platform: &a.platform,
            build_args: &a.build_args,
            target: a.target.as_deref(),
            no_cache: a.no_cache,
            insecure_registries: &a.insecure_registries,
            output: &output,
            name: &name,
            cancel: cancel.clone(),
            secrets: &a.secrets,
            mirrors: &self.mirrors,
            memory: self.memory.as_ref(),
            entitlements: &a.entitlements,
            annotations: &a.annotations,
            labels: &a.labels,
            ssh: forwards.as_ref().map_or(&[], |f| &f.sockets[..]),
            inputs: &a.inputs,
            contexts: &contexts,
            cache_to: a.cache_to.as_deref(),
            cache_from: &a.cache_from,
            cache_import: &a.cache_import,
            cache_credentials: a.credentials.as_ref().filter(|_| {
                let image_registry = shared::cache::registry_of(&a.repository);
                a.cache_to.iter().chain(&a.cache_from).any(|r| shared::cache::registry_of(r) == image_registry)
            }),
        };
        let built = self.builder.build(job, log).await;
        drop(forwards);
        let _ = forward.await;
        laps.timings.extend(built?);
        laps.clock = std::time::Instant::now();

        let layout = oci::read_layout(&output)?;
        // A task cancelled from here on (a stale attempt, a cancelled build) publishes nothing: the
        // push or upload stops where it is, before its manifest (which goes last) is written.
        let cancelled = || TaskError::Builder(BuilderError::Cancelled);
        if cancel.is_cancelled() {
            return Err(cancelled());
        }
        if a.repository.is_empty() {
            // A build without tags pushes nothing: the image goes to the coordinator's store.
            let (sent, bytes, had) = tokio::select! {
                r = self.upload_layout(conn, &layout) => r?,
                () = cancel.cancelled() => return Err(cancelled()),
            };
            laps.lap("upload");
            say(format!(
                "farm: uploaded {} to the coordinator ({sent} blobs, {bytes} bytes; {had} already there)",
                layout.manifest.digest
            ));
            let m = &layout.manifest;
            return Ok((
                ManifestRef { media_type: m.media_type.clone(), digest: m.digest.clone(), size: m.size },
                laps.timings,
            ));
        }
        let repo: ImageRef = a.repository.parse().map_err(|e: oci::ImageRefError| TaskError::Other(e.to_string()))?;
        let registry =
            Registry::new(&a.insecure_registries, a.credentials.clone()).with_locations(self.locations.clone());
        // The base images' layers may be in their repositories of the same registry: mounted from there.
        let sources = base_image_refs(&context.join(&a.dockerfile), &a.build_args);
        let report = tokio::select! {
            r = registry.push_layout_from(&layout, &repo, &sources) => r?,
            () = cancel.cancelled() => return Err(cancelled()),
        };
        laps.lap("push");
        let mut retried = String::new();
        if report.resumed + report.restarted > 0 {
            retried = format!("; after failed requests {} resumed, {} sent again", report.resumed, report.restarted);
        }
        say(format!(
            "farm: pushed {}@{} ({} blobs uploaded, {} mounted, {} already there{retried})",
            a.repository, report.manifest.digest, report.blobs_uploaded, report.blobs_mounted, report.blobs_skipped
        ));
        let manifest = ManifestRef {
            media_type: report.manifest.media_type,
            digest: report.manifest.digest,
            size: report.manifest.size,
        };
        Ok((manifest, laps.timings))
    }

    /// Uploads the layout's config, layers and manifest (manifest last, so that a manifest in
    /// the store always has its blobs) that the coordinator's store lacks, over the current
    /// session; a session lost on the way is waited for and the upload resumes with what is
    /// still missing, for up to [`FETCH_PATIENCE`]. Returns blobs and bytes sent, and how many
    /// were already there.
    async fn upload_layout(&self, conn: &Conn, layout: &oci::Layout) -> Result<(usize, u64, usize), TaskError> {
        let mut blobs: Vec<(Digest, u64)> = vec![(layout.config.digest.clone(), layout.config.size)];
        blobs.extend(layout.layers.iter().map(|l| (l.digest.clone(), l.size)));
        blobs.push((layout.manifest.digest.clone(), layout.manifest.size));
        let blobs = &blobs;
        across_sessions(conn, "upload the image", |c| async move { self.upload_once(&c, &layout.dir, blobs).await })
            .await
    }

    async fn upload_once(
        &self,
        link: &Link,
        dir: &std::path::Path,
        blobs: &[(Digest, u64)],
    ) -> Result<(usize, u64, usize), TaskError> {
        let digests: Vec<Digest> = blobs.iter().map(|(d, _)| d.clone()).collect();
        let missing = link.missing_blobs(digests).await?;
        let mut unique = std::collections::HashSet::new();
        let total = blobs.iter().filter(|(d, _)| unique.insert(d.clone())).count();
        if missing.is_empty() {
            return Ok((0, 0, total));
        }
        // In the layout's order, whatever order the answer came in; the manifest (last) goes
        // alone once the rest are stored, so that a manifest in the store always has its blobs.
        let mut sent = std::collections::HashSet::new();
        let mut todo: Vec<(Digest, u64)> =
            blobs.iter().filter(|(d, _)| missing.contains(d) && sent.insert(d.clone())).cloned().collect();
        let manifest_missing = todo.last().map(|(d, _)| d) == blobs.last().map(|(d, _)| d);
        let manifest = if manifest_missing { todo.pop() } else { None };
        let streams = spread(&todo, PARALLEL_BLOB_STREAMS);
        let uploads = streams.iter().map(|group| link.put_layout_blobs(dir, group));
        let mut bytes: u64 = futures_util::future::try_join_all(uploads).await?.into_iter().sum();
        if let Some(manifest) = manifest {
            bytes += link.put_layout_blobs(dir, std::slice::from_ref(&manifest)).await?;
        }
        Ok((missing.len(), bytes, total - missing.len()))
    }

    /// Trims the layer cache to its limit if no build is running (else the next idle moment will).
    pub async fn prune_if_idle(&self) {
        let Ok(_alone) = self.cache_lock.try_write() else { return };
        if let Err(e) = self.builder.prune(self.cache_limit).await {
            tracing::warn!("pruning the layer cache: {e}");
        }
    }

    /// The context's manifest and every file this agent does not hold yet, fetched over the
    /// current session. A connection lost on the way (a coordinator restarting, Wi-Fi dropping)
    /// is not the build's fault: the fetch waits for the next session and resumes, for up to
    /// [`FETCH_PATIENCE`].
    /// The manifest is checked against `limits`, the coordinator's (under which it accepted the
    /// context), before any file is fetched.
    async fn fetch_context(
        &self,
        conn: &Conn,
        digest: &Digest,
        limits: &ContextLimits,
    ) -> Result<ValidManifest, TaskError> {
        across_sessions(conn, "fetch the context", |c| async move { self.fetch_once(&c, digest, limits).await }).await
    }

    async fn fetch_once(
        &self,
        link: &Link,
        digest: &Digest,
        limits: &ContextLimits,
    ) -> Result<ValidManifest, TaskError> {
        // Room for the missing files and for the copy the build reads: refused before fetching
        // a byte, rather than half way through.
        let room = |needed| match shared::disk::free_bytes(self.store.root()) {
            Ok(free) => match shared::disk::shortfall(needed, free) {
                Some(short) => Err(self.no_space_message("fetching the build context", free, Some(short))),
                None => Ok(()),
            },
            Err(_) => Ok(()),
        };
        Ok(link.fetch_context(digest, &self.store, limits, room).await?)
    }

    /// `e`, or if it says the disk is full, what is full, how much is free, and the fix.
    fn no_space_in(&self, doing: &str, e: TaskError) -> TaskError {
        if !e.is_no_space() || matches!(e, TaskError::NoSpace(_)) {
            return e;
        }
        let free = shared::disk::free_bytes(self.store.root()).unwrap_or(0);
        TaskError::NoSpace(self.no_space_message(doing, free, None))
    }

    fn no_space_message(&self, doing: &str, free: u64, short: Option<u64>) -> String {
        let needs = short.map(|s| format!(", needs {} MB more", shared::disk::mb_up(s))).unwrap_or_default();
        format!(
            "agent {} is out of disk space in its work directory {} ({} MB free{needs}) {doing}; free space \
             there (or lower its cache_limit) or move its --work-dir to a larger disk",
            self.name,
            self.work_dir.display(),
            shared::disk::mb_down(free)
        )
    }
}

/// Runs `attempt` over the current session; when the link fails on the way (a coordinator
/// restarting, Wi-Fi dropping: not the build's fault), waits for the next session and tries again,
/// for up to [`FETCH_PATIENCE`]. `what` completes "no connection to the coordinator to ...".
async fn across_sessions<T, F, Fut>(conn: &Conn, what: &str, mut attempt: F) -> Result<T, TaskError>
where
    F: FnMut(Link) -> Fut,
    Fut: std::future::Future<Output = Result<T, TaskError>>,
{
    let deadline = tokio::time::Instant::now() + FETCH_PATIENCE;
    let mut conns = conn.clone();
    loop {
        let current = match tokio::time::timeout_at(deadline, conns.wait_for(Option::is_some)).await {
            Ok(Ok(c)) => c.clone().expect("waited for Some"),
            _ => return Err(TaskError::Other(format!("no connection to the coordinator to {what}"))),
        };
        let id = current.session_id();
        match attempt(current).await {
            Err(e) if e.is_transient() && tokio::time::Instant::now() < deadline => {
                tracing::info!("{what}: {e}; resuming on the next session");
                let changed = conns.wait_for(|c| c.as_ref().is_none_or(|c| c.session_id() != id));
                let _ = tokio::time::timeout_at(deadline, changed).await;
            }
            r => return r,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blobs_spread_over_streams_by_size_in_order() {
        let b = |s: &str, size: u64| (Digest::of(s.as_bytes()), size);
        let blobs = [b("config", 1), b("a", 100), b("b", 60), b("c", 50), b("d", 10)];
        let groups = spread(&blobs, 2);
        let names = |g: &Vec<(Digest, u64)>| g.iter().map(|(_, s)| *s).collect::<Vec<_>>();
        assert_eq!(groups.iter().map(names).collect::<Vec<_>>(), [vec![1, 100, 10], vec![60, 50]]);
        assert_eq!(spread(&blobs, 9).len(), 5, "never more streams than blobs");
        assert_eq!(spread(&blobs, 0).len(), 1);
        assert!(spread(&[], 4).is_empty());
    }
}
