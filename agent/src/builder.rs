//! The program that turns a context into an image. buildah for now (daemonless: one plain
//! process tree per build, its own storage root per agent); the [`Builder`] trait is small so that
//! docker buildx or BuildKit can follow, and so that control-plane tests can use a scripted double.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::Stdio;

use shared::Platform;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::Command;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

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
}

/// One platform's build, as the agent hands it to its builder.
#[derive(Debug)]
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
    /// the time its phases took (`build`, `export`).
    fn build<'a>(&'a self, job: Job<'a>, log: mpsc::UnboundedSender<String>) -> Timed<'a>;
}

/// buildah with its own storage under the agent's work directory, chroot isolation (works as
/// root without cgroup delegation), and layer caching between builds.
pub struct Buildah {
    info: BuilderInfo,
    root: PathBuf,
}

/// Finds buildah and its version (`buildah version 1.28.2 (image-spec ...)`).
pub fn detect(work_dir: &Path) -> Result<Buildah, BuilderError> {
    let out = std::process::Command::new("buildah").arg("--version").output().map_err(BuilderError::Missing)?;
    if !out.status.success() {
        return Err(BuilderError::Version(String::from_utf8_lossy(&out.stderr).trim().to_string()));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let version = parse_version(&text).ok_or_else(|| BuilderError::Version(format!("unexpected output {text:?}")))?;
    Ok(Buildah { info: BuilderInfo { name: "buildah".into(), version }, root: work_dir.join("buildah") })
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
    /// Each platform has its own store (see [`Buildah::store`]).
    fn command(&self, store: &Path) -> Command {
        let mut cmd = Command::new("unshare");
        cmd.args(["--pid", "--fork", "--kill-child", "buildah"])
            .arg("--root")
            .arg(store.join("storage"))
            .arg("--runroot")
            .arg(store.join("run"))
            .arg("--storage-driver")
            .arg("overlay")
            .env("BUILDAH_ISOLATION", "chroot")
            .env("TMPDIR", self.root.join("tmp"))
            .stdin(Stdio::null())
            .kill_on_drop(true);
        cmd
    }

    /// buildah reads plain-HTTP registries from a registries.conf; this one lists the build's.
    fn registries_conf(&self, job: &Job<'_>) -> Result<PathBuf, BuilderError> {
        let path = job.output.with_extension("registries.conf");
        let mut text =
            String::from("unqualified-search-registries = [\"docker.io\"]\nshort-name-mode = \"permissive\"\n");
        for r in job.insecure_registries {
            text += &format!("\n[[registry]]\nlocation = {r:?}\ninsecure = true\n");
        }
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
                let _ = self.output(&store, &["rmi", "--force", &id]).await;
                if self.cache_bytes() <= limit {
                    break;
                }
            }
            for store in self.stores() {
                let _ = self.output(&store, &["rmi", "--prune"]).await;
            }
            Ok(())
        })
    }

    fn build<'a>(&'a self, job: Job<'a>, log: mpsc::UnboundedSender<String>) -> Timed<'a> {
        Box::pin(async move {
            let started = std::time::Instant::now();
            let tmp = self.root.join("tmp");
            std::fs::create_dir_all(&tmp).map_err(|source| BuilderError::Io { path: tmp, source })?;
            let conf = self.registries_conf(&job)?;
            for warning in dockerfile_warnings(&job.context.join(job.dockerfile)) {
                let _ = log.send(warning);
            }
            let store = self.store(job.platform);
            let mut build = self.command(&store);
            build.env("CONTAINERS_REGISTRIES_CONF", &conf).arg("build").arg("--layers");
            build.arg("--platform").arg(job.platform.to_string());
            build.arg("-f").arg(job.context.join(job.dockerfile));
            for (k, v) in job.build_args {
                build.arg("--build-arg").arg(format!("{k}={v}"));
            }
            if let Some(t) = job.target {
                build.arg("--target").arg(t);
            }
            if job.no_cache {
                build.arg("--no-cache");
            }
            let secrets = SecretFiles::write(&self.root.join("tmp"), job.name, job.secrets)?;
            for s in &secrets.args {
                build.arg("--secret").arg(s);
            }
            build.arg("--tag").arg(job.name).arg(job.context);
            let built = run(build, &log, "buildah build", &job.cancel).await;
            drop(secrets);
            built?;
            let build_ms = started.elapsed().as_millis() as u64;
            let exporting = std::time::Instant::now();
            let mut push = self.command(&store);
            push.arg("push").arg("--format").arg("oci").arg(job.name).arg(format!("oci:{}", job.output.display()));
            // The image stays: its layers are the cache of the next build. Removing it here would
            // race with other tasks' pushes (containers/storage finds layers by digest), so the
            // store is trimmed only when the agent is idle (see `prune`).
            run(push, &log, "buildah push", &job.cancel).await?;
            let phase = |name: &str, ms| shared::proto::Phase { name: name.into(), ms };
            Ok(vec![phase("build", build_ms), phase("export", exporting.elapsed().as_millis() as u64)])
        })
    }
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
    let (status, _, _) = tokio::join!(waited, out, err);
    // Whatever the builder started in its group goes with it.
    signal(libc::SIGKILL);
    match status {
        None => Err(BuilderError::Cancelled),
        Some(status) => {
            let status = status.map_err(BuilderError::Spawn)?;
            if status.success() {
                Ok(())
            } else {
                Err(BuilderError::Failed(format!("{what} failed ({status})")))
            }
        }
    }
}

async fn pump(stream: impl AsyncRead + Unpin, log: mpsc::UnboundedSender<String>) {
    let mut lines = BufReader::new(stream).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if !is_noise(&line) {
            let _ = log.send(line);
        }
    }
}

/// buildah 1.28 warns that the automatic platform arguments are "missing" although it sets them.
fn is_noise(line: &str) -> bool {
    line.contains("missing \\\"TARGET") || line.contains("missing \\\"BUILD")
}

/// Known buildah pitfalls, told to the user in the build log.
fn dockerfile_warnings(dockerfile: &Path) -> Vec<String> {
    let Ok(text) = std::fs::read_to_string(dockerfile) else { return vec![] };
    let from_platform = text.lines().any(|l| {
        let l = l.trim_start().to_ascii_uppercase();
        l.starts_with("FROM") && l.contains("--PLATFORM")
    });
    if from_platform {
        vec!["farm: warning: buildah 1.28 ignores `FROM --platform=...`; every stage builds for the target platform"
            .into()]
    } else {
        vec![]
    }
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
    fn buildah_noise_is_filtered() {
        assert!(super::is_noise(r#"level=warning msg="missing \"TARGETPLATFORM\" build argument. Try adding ...""#));
        assert!(!super::is_noise("STEP 1/3: FROM busybox"));
    }
}
