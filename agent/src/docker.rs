//! The Docker Engine as a builder, for hosts that run Docker rather than buildah (Jetsons,
//! Graviton instances). The build runs in the engine's built-in BuildKit (`DOCKER_BUILDKIT=1
//! docker build`), driven by a docker client that supports it; the image is then saved
//! (`docker save`, the docker-archive format of dockerd 20.10) and turned into the OCI image
//! layout the agent pushes by digest, and the task's tag is removed from the engine at once. The
//! build cache stays in the engine's BuildKit between builds and is trimmed with `docker builder
//! prune`.
//!
//! Killing the `docker build` client ends its BuildKit session, and the engine then cancels the
//! build and kills its RUN processes: cancel needs nothing more than `crate::builder::run`'s
//! SIGTERM.

use std::collections::{BTreeSet, HashMap};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use shared::oci::{self, Descriptor, OCI_MANIFEST};
use shared::Digest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;
use tokio::sync::mpsc;

use crate::builder::{run, BuildFuture, Builder, BuilderError, BuilderInfo, Job, SecretFiles, Timed};

/// Where docker looks for its engine when neither `docker_host` nor DOCKER_HOST says.
pub const DEFAULT_HOST: &str = "unix:///var/run/docker.sock";
/// The client that comes with Debian's dockerd (docker.io): it builds with the engine's BuildKit
/// by itself. Newer clients (23+) hand `docker build` to the buildx plugin and fail without it.
pub const DEBIAN_CLI: &str = "/usr/bin/docker";
const CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";
const LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// How long the engine has to answer an API request.
const API_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    #[error(
        "unsupported Docker host {0:?}: farm reaches engines at unix:///PATH or tcp://HOST:PORT; set \
         `docker_host` (or --docker-host) to one"
    )]
    Host(String),
    #[error(
        "no Docker Engine answers at {host} ({reason}); start it (`systemctl start docker`) or point \
         `docker_host` (--docker-host, or DOCKER_HOST) at the engine's socket"
    )]
    Unreachable { host: String, reason: String },
    #[error(
        "the Docker Engine at {host} answers, but no docker client here builds with its BuildKit: {tried}; \
         install Debian's docker.io (client {DEBIAN_CLI}) or the docker buildx plugin"
    )]
    NoClient { host: String, tried: String },
    #[error("converting the saved image {path} to an OCI layout: {reason}")]
    Archive { path: PathBuf, reason: String },
}

/// A Docker Engine and the client that drives its builds.
pub struct Docker {
    info: BuilderInfo,
    host: String,
    cli: PathBuf,
    root: PathBuf,
}

/// The engine docker would use: `configured` (farm's `docker_host`), else `DOCKER_HOST`, else
/// [`DEFAULT_HOST`].
pub fn engine_host(configured: Option<&str>, docker_host_env: Option<&str>) -> String {
    [configured, docker_host_env].into_iter().flatten().find(|h| !h.trim().is_empty()).unwrap_or(DEFAULT_HOST).into()
}

#[derive(Debug, PartialEq, Eq)]
enum Endpoint {
    Unix(PathBuf),
    Tcp(String),
}

fn endpoint(host: &str) -> Result<Endpoint, DockerError> {
    if let Some(path) = host.strip_prefix("unix://").filter(|p| p.starts_with('/')) {
        return Ok(Endpoint::Unix(path.into()));
    }
    if let Some(addr) = host.strip_prefix("tcp://").map(|a| a.trim_end_matches('/')).filter(|a| a.contains(':')) {
        return Ok(Endpoint::Tcp(addr.into()));
    }
    Err(DockerError::Host(host.into()))
}

/// One request to the Engine API (HTTP/1.0, so the engine answers unchunked and closes):
/// (status, body).
async fn api(host: &str, method: &str, path: &str) -> Result<(u16, Vec<u8>), String> {
    let request = format!("{method} {path} HTTP/1.0\r\nHost: docker\r\n\r\n");
    let exchange = async {
        let mut bytes = Vec::new();
        match endpoint(host).map_err(|e| e.to_string())? {
            Endpoint::Unix(p) => {
                let mut s = tokio::net::UnixStream::connect(&p).await.map_err(|e| format!("{}: {e}", p.display()))?;
                s.write_all(request.as_bytes()).await.map_err(|e| e.to_string())?;
                s.read_to_end(&mut bytes).await.map_err(|e| e.to_string())?;
            }
            Endpoint::Tcp(a) => {
                let mut s = tokio::net::TcpStream::connect(&a).await.map_err(|e| format!("{a}: {e}"))?;
                s.write_all(request.as_bytes()).await.map_err(|e| e.to_string())?;
                s.read_to_end(&mut bytes).await.map_err(|e| e.to_string())?;
            }
        }
        parse_response(&bytes)
    };
    tokio::time::timeout(API_TIMEOUT, exchange).await.map_err(|_| format!("no answer within {API_TIMEOUT:?}"))?
}

fn parse_response(bytes: &[u8]) -> Result<(u16, Vec<u8>), String> {
    let split = bytes.windows(4).position(|w| w == b"\r\n\r\n").ok_or("not an HTTP answer")?;
    let head = String::from_utf8_lossy(&bytes[..split]);
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .filter(|_| head.starts_with("HTTP/"))
        .ok_or_else(|| format!("not an HTTP answer: {:?}", head.lines().next().unwrap_or("")))?;
    Ok((status, bytes[split + 4..].to_vec()))
}

/// The engine's version from `GET /version`.
fn engine_version(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    v["Version"].as_str().map(str::to_string)
}

/// Does this `docker build --help` (run with DOCKER_BUILDKIT=1) offer what farm passes?
fn help_supports(help: &str) -> Result<(), String> {
    let missing: Vec<&str> =
        ["--platform", "--secret", "--progress", "--network"].into_iter().filter(|f| !help.contains(f)).collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!("its `docker build` has no {}", missing.join(", ")))
    }
}

/// The docker clients worth trying, Debian's first, then each `docker` on PATH.
fn cli_candidates() -> Vec<PathBuf> {
    let mut out = vec![PathBuf::from(DEBIAN_CLI)];
    for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
        let p = dir.join("docker");
        let known = |q: &PathBuf| std::fs::canonicalize(q).ok() == std::fs::canonicalize(&p).ok() || *q == p;
        if p.is_file() && !out.iter().any(known) {
            out.push(p);
        }
    }
    out
}

/// Checks that `cli` builds with BuildKit and the flags farm uses.
async fn probe_cli(cli: &Path) -> Result<(), String> {
    let out = Command::new(cli)
        .args(["build", "--help"])
        .env("DOCKER_BUILDKIT", "1")
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| format!("cannot run it: {e}"))?;
    if !out.status.success() {
        let text = String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
        let first = text.lines().map(str::trim).find(|l| !l.is_empty()).unwrap_or("no output");
        return Err(format!("`DOCKER_BUILDKIT=1 docker build` fails ({}): {first}", out.status));
    }
    help_supports(&String::from_utf8_lossy(&out.stdout))
}

/// Finds the engine (`configured`, else DOCKER_HOST, else the default socket), its version, and
/// a client that builds with its BuildKit.
pub async fn connect(work_dir: &Path, configured: Option<&str>) -> Result<Docker, DockerError> {
    let host = engine_host(configured, std::env::var("DOCKER_HOST").ok().as_deref());
    endpoint(&host)?;
    let unreachable = |reason: String| DockerError::Unreachable { host: host.clone(), reason };
    let (status, body) = api(&host, "GET", "/version").await.map_err(unreachable)?;
    if status != 200 {
        return Err(unreachable(format!("GET /version answered HTTP {status}")));
    }
    let version = engine_version(&body).ok_or_else(|| unreachable("GET /version has no \"Version\"".into()))?;
    let mut tried = Vec::new();
    for cli in cli_candidates() {
        match probe_cli(&cli).await {
            Ok(()) => {
                return Ok(Docker {
                    info: BuilderInfo { name: "docker".into(), version },
                    host,
                    cli,
                    root: work_dir.join("docker"),
                })
            }
            Err(why) => tried.push(format!("{}: {why}", cli.display())),
        }
    }
    Err(DockerError::NoClient { host, tried: tried.join("; ") })
}

impl Docker {
    /// The engine this builder uses, e.g. `unix:///var/run/docker.sock`.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The client it drives.
    pub fn cli(&self) -> &Path {
        &self.cli
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.cli);
        cmd.arg("--host").arg(&self.host).env("DOCKER_BUILDKIT", "1").stdin(Stdio::null()).kill_on_drop(true);
        cmd
    }

    async fn output(&self, args: &[&str]) -> Result<String, BuilderError> {
        let out = self.command().args(args).output().await.map_err(BuilderError::Spawn)?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
            return Err(BuilderError::Failed(format!("docker {}: {err}", args.join(" "))));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Bytes of the engine's build cache (`BuilderSize` of `GET /system/df`).
    pub async fn cache_bytes(&self) -> Result<u64, BuilderError> {
        let failed = |why: String| {
            BuilderError::Failed(format!("asking the Docker Engine at {} for its disk use: {why}", self.host))
        };
        let (status, body) = api(&self.host, "GET", "/system/df").await.map_err(failed)?;
        if status != 200 {
            return Err(failed(format!("HTTP {status}")));
        }
        builder_size(&body).ok_or_else(|| failed("no BuilderSize in the answer".into()))
    }

    /// Removes the task's tag (`--no-prune`: nothing else); the build cache keeps the layers.
    async fn untag(&self, name: &str) {
        let _ = self.output(&["image", "rm", "--no-prune", name]).await;
    }
}

fn builder_size(df: &[u8]) -> Option<u64> {
    let v: serde_json::Value = serde_json::from_slice(df).ok()?;
    if let Some(n) = v["BuilderSize"].as_u64() {
        return Some(n);
    }
    let records = v["BuildCache"].as_array()?;
    Some(records.iter().filter(|r| !r["Shared"].as_bool().unwrap_or(false)).filter_map(|r| r["Size"].as_u64()).sum())
}

/// The network of a build's RUN steps: the host's only with the `network.host` entitlement; else
/// the engine's bridge (`default`), or `none` when the engine has no bridge (`dockerd
/// --bridge=none`), where BuildKit's default would fail every RUN with "network bridge not found".
fn network(job: &Job<'_>, has_bridge: bool) -> &'static str {
    if job.entitlements.contains(&shared::proto::Entitlement::NetworkHost) {
        "host"
    } else if job.inputs.no_network {
        "none"
    } else if has_bridge {
        "default"
    } else {
        "none"
    }
}

/// Named contexts need `docker buildx build --build-context` (Docker 23+ with buildx); the
/// classic `docker build` of Debian's docker.io 20.10, which the agent drives, has no such flag.
fn named_contexts_refused(job: &Job<'_>) -> Option<String> {
    let first = job.contexts.first()?;
    Some(format!(
        "the build uses named contexts (--build-context {}=...), which farm's Docker builder cannot pass: the \
         docker build of Docker 20.10 has no --build-context; build it on a buildah agent (farm build --require \
         builder=buildah)",
        first.0
    ))
}

/// `docker build` arguments (after the global ones) for `job`, with `dockerfile` (the job's, or
/// its copy with base images pointed at mirrors). BuildKit runs each RUN in its own namespaces
/// with a private /proc; `network` is [`network`]'s.
fn build_args(job: &Job<'_>, dockerfile: &Path, secrets: &[String], network: &str) -> Vec<String> {
    let mut a: Vec<String> =
        ["build", "--progress", "plain", "--network", network, "--platform"].map(String::from).into();
    a.push(job.platform.to_string());
    a.push("-f".into());
    a.push(dockerfile.display().to_string());
    for (k, v) in job.build_args {
        a.push("--build-arg".into());
        a.push(format!("{k}={v}"));
    }
    if let Some(t) = job.target {
        a.push("--target".into());
        a.push(t.into());
    }
    if job.no_cache {
        a.push("--no-cache".into());
    }
    for (k, v) in job.labels {
        a.push("--label".into());
        a.push(format!("{k}={v}"));
    }
    if job.inputs.pull {
        a.push("--pull".into());
    }
    for (host, ip) in &job.inputs.add_hosts {
        a.push("--add-host".into());
        a.push(format!("{host}:{ip}"));
    }
    for s in secrets {
        a.push("--secret".into());
        a.push(s.clone());
    }
    for (id, socket) in job.ssh {
        a.push("--ssh".into());
        a.push(format!("{id}={}", socket.display()));
    }
    a.push("--tag".into());
    a.push(job.name.into());
    a.push(job.context.display().to_string());
    a
}

/// Plain-HTTP registries the build mentions that the engine will not treat as such unless its
/// own configuration says so (it trusts only 127.0.0.0/8 by default; farm cannot tell it more).
fn insecure_notes(job: &Job<'_>) -> Vec<String> {
    let dockerfile = std::fs::read_to_string(job.context.join(job.dockerfile)).unwrap_or_default();
    job.insecure_registries
        .iter()
        .filter(|r| !r.starts_with("127.") && !r.starts_with("localhost"))
        .filter(|r| dockerfile.contains(r.as_str()) || job.build_args.iter().any(|(_, v)| v.contains(r.as_str())))
        .map(|r| {
            format!(
                "farm: note: the Docker Engine pulls from the plain-HTTP registry {r} only if its daemon.json \
                 lists it in \"insecure-registries\""
            )
        })
        .collect()
}

/// With `[mirrors]`: a copy of the job's Dockerfile whose `FROM` images on mirrored registries
/// point at their mirrors (the engine pulls them from there), written beside the task's output,
/// outside the context; `None` if nothing is mirrored.
fn mirrored_dockerfile(job: &Job<'_>) -> Result<Option<PathBuf>, BuilderError> {
    if job.mirrors.is_empty() {
        return Ok(None);
    }
    let original = job.context.join(job.dockerfile);
    let text = std::fs::read_to_string(&original).map_err(|source| BuilderError::Io { path: original, source })?;
    let Some(rewritten) = crate::mirrors::rewrite_dockerfile(&text, job.build_args, job.mirrors) else {
        return Ok(None);
    };
    let path = job.output.with_extension("Dockerfile");
    std::fs::write(&path, rewritten).map_err(|source| BuilderError::Io { path: path.clone(), source })?;
    Ok(Some(path))
}

impl Builder for Docker {
    fn info(&self) -> &BuilderInfo {
        &self.info
    }

    fn prune(&self, limit: u64) -> BuildFuture<'_> {
        Box::pin(async move {
            if limit == 0 {
                self.output(&["builder", "prune", "--all", "--force"]).await?;
            } else if self.cache_bytes().await? > limit {
                self.output(&["builder", "prune", "--all", "--force", "--keep-storage", &limit.to_string()]).await?;
            }
            // Images left untagged (none of farm's stay tagged) hold layers too.
            self.output(&["image", "prune", "--force"]).await?;
            Ok(())
        })
    }

    fn build<'a>(&'a self, job: Job<'a>, log: mpsc::UnboundedSender<String>) -> Timed<'a> {
        Box::pin(async move {
            if job.entitlements.contains(&shared::proto::Entitlement::SecurityInsecure) {
                return Err(BuilderError::Failed(
                    "the build asks for security.insecure, which farm's Docker builder cannot grant (`docker build` \
                     has no --allow): build it on a buildah agent with allow_insecure = true"
                        .into(),
                ));
            }
            if let Some(refusal) = named_contexts_refused(&job) {
                return Err(BuilderError::Failed(refusal));
            }
            let started = std::time::Instant::now();
            let tmp = self.root.join("tmp");
            std::fs::create_dir_all(&tmp).map_err(|source| BuilderError::Io { path: tmp.clone(), source })?;
            for note in insecure_notes(&job) {
                let _ = log.send(note);
            }
            if job.cache_to.is_some() || !job.cache_from.is_empty() {
                let _ = log.send(
                    "farm: note: the Docker builder does not import or export the registry layer cache \
                     (--cache-to/--cache-from, cache_repo); it uses the engine's own build cache"
                        .into(),
                );
            }
            let dockerfile = mirrored_dockerfile(&job)?;
            let secrets = SecretFiles::write(&tmp, job.name, job.secrets)?;
            let has_bridge = matches!(api(&self.host, "GET", "/networks/bridge").await, Ok((200, _)));
            let network = network(&job, has_bridge);
            if network == "none" && !job.inputs.no_network {
                let _ = log.send(
                    "farm: note: the Docker Engine has no bridge network, so RUN steps have no network; give \
                     dockerd a bridge for outbound access"
                        .into(),
                );
            }
            let mut build = self.command();
            build.args(build_args(
                &job,
                dockerfile.as_deref().unwrap_or(&job.context.join(job.dockerfile)),
                &secrets.args,
                network,
            ));
            let built = run(build, &log, "docker build", &job.cancel).await;
            drop(secrets);
            if let Some(path) = dockerfile {
                let _ = std::fs::remove_file(path);
            }
            if let Err(e) = built {
                // A build cancelled as it finished may have tagged its image.
                self.untag(job.name).await;
                return Err(e);
            }
            let build_ms = started.elapsed().as_millis() as u64;

            let exporting = std::time::Instant::now();
            let archive = job.output.with_extension("docker.tar");
            let mut save = self.command();
            save.args(["save", "--output"]).arg(&archive).arg(job.name);
            let saved = run(save, &log, "docker save", &job.cancel).await;
            self.untag(job.name).await;
            let converted = match saved {
                Ok(()) => {
                    let (from, to) = (archive.clone(), job.output.to_path_buf());
                    // `docker save` keeps no manifest annotations: they go on the OCI manifest
                    // written here.
                    let annotations = job.annotations.clone();
                    tokio::task::spawn_blocking(move || archive_to_layout(&from, &to, &annotations))
                        .await
                        .map_err(|e| BuilderError::Failed(format!("converting the saved image: {e}")))
                        .and_then(|r| r.map_err(BuilderError::from))
                }
                Err(e) => Err(e),
            };
            let _ = std::fs::remove_file(&archive);
            let manifest = converted?;
            if job.cancel.is_cancelled() {
                return Err(BuilderError::Cancelled);
            }
            let _ = log.send(format!("farm: image {} for {} (docker {})", manifest, job.platform, self.info.version));
            let phase = |name: &str, ms| shared::proto::Phase { name: name.into(), ms };
            Ok(vec![phase("build", build_ms), phase("export", exporting.elapsed().as_millis() as u64)])
        })
    }
}

/// One image of a docker-archive's manifest.json.
#[derive(serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ArchiveImage {
    config: String,
    #[serde(default)]
    layers: Vec<String>,
}

/// A path inside the archive, without `./` and with `..` resolved.
fn clean(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for p in path.split('/') {
        match p {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    parts.join("/")
}

/// Where a link at `at` pointing to `target` leads (symlinks are relative to the link's directory).
fn link_target(at: &str, target: &str, symbolic: bool) -> String {
    if !symbolic || target.starts_with('/') {
        return clean(target);
    }
    let dir = at.rsplit_once('/').map(|(d, _)| d).unwrap_or("");
    clean(&format!("{dir}/{target}"))
}

/// Follows links (docker save links a layer already written for another image).
fn resolve(links: &HashMap<String, String>, path: &str) -> String {
    let mut p = clean(path);
    for _ in 0..16 {
        match links.get(&p) {
            Some(next) => p = next.clone(),
            None => break,
        }
    }
    p
}

/// Writes what passes through it to `inner`, hashing and counting it.
struct Hashing<W> {
    inner: W,
    hasher: shared::digest::Hasher,
    bytes: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// A layer as stored in the layout: its uncompressed digest (the config's diff_id) and the blob.
struct LayerBlob {
    diff_id: Digest,
    blob: Descriptor,
}

/// Largest metadata file (manifest.json, image config) read into memory.
const MAX_METADATA: u64 = 16 << 20;

/// Turns a docker-archive (`docker save` of one image: manifest.json, the config JSON, one
/// uncompressed tar per layer, possibly links between them) into an OCI image layout in `out`
/// (oci-layout, index.json with one manifest, blobs/sha256 with the config as it was and each
/// layer gzipped). Layers are streamed, never held in memory; each is checked against the
/// config's `rootfs.diff_ids`. Returns the manifest's digest.
pub fn archive_to_layout(
    archive: &Path,
    out: &Path,
    annotations: &std::collections::BTreeMap<String, String>,
) -> Result<Digest, DockerError> {
    let fail = |reason: String| DockerError::Archive { path: archive.to_path_buf(), reason };
    let io = |what: &str, e: std::io::Error| fail(format!("{what}: {e}"));
    let open = || std::fs::File::open(archive).map(|f| tar::Archive::new(std::io::BufReader::new(f)));

    // Pass 1: manifest.json and the links.
    let mut links = HashMap::new();
    let mut manifest_json = None;
    for entry in open().map_err(|e| io("opening", e))?.entries().map_err(|e| io("reading", e))? {
        let mut entry = entry.map_err(|e| io("reading", e))?;
        let path = clean(&entry.path().map_err(|e| io("reading an entry name", e))?.to_string_lossy());
        let kind = entry.header().entry_type();
        if kind.is_symlink() || kind.is_hard_link() {
            let target = entry.link_name().map_err(|e| io("reading a link", e))?.unwrap_or_default();
            links.insert(path.clone(), link_target(&path, &target.to_string_lossy(), kind.is_symlink()));
        } else if kind.is_file() && path == "manifest.json" {
            manifest_json = Some(read_small(&mut entry).map_err(|e| io("reading manifest.json", e))?);
        }
    }
    let manifest_json = manifest_json.ok_or_else(|| fail("no manifest.json (is it a docker-archive?)".into()))?;
    let images: Vec<ArchiveImage> =
        serde_json::from_slice(&manifest_json).map_err(|e| fail(format!("manifest.json: {e}")))?;
    let [image] = images.as_slice() else {
        return Err(fail(format!("manifest.json lists {} images; expected exactly one", images.len())));
    };
    let config_path = resolve(&links, &image.config);
    let layer_paths: Vec<String> = image.layers.iter().map(|l| resolve(&links, l)).collect();
    let wanted: BTreeSet<&str> = layer_paths.iter().map(String::as_str).collect();

    // Pass 2: the config and the layers.
    let blobs_dir = out.join("blobs").join("sha256");
    std::fs::create_dir_all(&blobs_dir).map_err(|e| io(&format!("creating {}", blobs_dir.display()), e))?;
    let mut config = None;
    let mut layers: HashMap<String, LayerBlob> = HashMap::new();
    for entry in open().map_err(|e| io("opening", e))?.entries().map_err(|e| io("reading", e))? {
        let mut entry = entry.map_err(|e| io("reading", e))?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let path = clean(&entry.path().map_err(|e| io("reading an entry name", e))?.to_string_lossy());
        if path == config_path {
            config = Some(read_small(&mut entry).map_err(|e| io(&format!("reading {path}"), e))?);
        }
        if wanted.contains(path.as_str()) && !layers.contains_key(&path) {
            let layer = gzip_layer(&mut entry, &blobs_dir).map_err(|e| io(&format!("writing layer {path}"), e))?;
            layers.insert(path, layer);
        }
    }
    let config = config.ok_or_else(|| fail(format!("the image config {config_path} is missing")))?;
    let diff_ids: Vec<Digest> = serde_json::from_slice::<serde_json::Value>(&config)
        .ok()
        .and_then(|c| c["rootfs"]["diff_ids"].as_array().cloned())
        .ok_or_else(|| fail("the image config has no rootfs.diff_ids".into()))?
        .iter()
        .map(|d| d.as_str().and_then(|s| s.parse().ok()))
        .collect::<Option<_>>()
        .ok_or_else(|| fail("the image config's rootfs.diff_ids are not digests".into()))?;
    if diff_ids.len() != layer_paths.len() {
        return Err(fail(format!("{} layers but the config lists {} diff_ids", layer_paths.len(), diff_ids.len())));
    }
    let mut descriptors = Vec::new();
    for (path, want) in layer_paths.iter().zip(&diff_ids) {
        let layer = layers.get(path).ok_or_else(|| fail(format!("layer {path} is missing")))?;
        if &layer.diff_id != want {
            return Err(fail(format!("layer {path} is {} but the config says {want}", layer.diff_id)));
        }
        descriptors.push(layer.blob.clone());
    }
    let write = |bytes: &[u8], media_type: &str| -> Result<Descriptor, DockerError> {
        let d = Digest::of(bytes);
        let path = oci::blob_path(out, &d);
        std::fs::write(&path, bytes).map_err(|e| io(&format!("writing {}", path.display()), e))?;
        Ok(Descriptor::new(media_type, d, bytes.len() as u64))
    };
    let config = write(&config, CONFIG_MEDIA_TYPE)?;
    let mut manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config,
        "layers": descriptors,
    });
    if !annotations.is_empty() {
        manifest["annotations"] = serde_json::json!(annotations);
    }
    let manifest = write(&serde_json::to_vec(&manifest).expect("JSON"), OCI_MANIFEST)?;
    let index = serde_json::json!({ "schemaVersion": 2, "manifests": [manifest] });
    let files = [
        ("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec()),
        ("index.json", serde_json::to_vec(&index).expect("JSON")),
    ];
    for (name, bytes) in files {
        std::fs::write(out.join(name), bytes).map_err(|e| io(&format!("writing {name}"), e))?;
    }
    Ok(manifest.digest)
}

fn read_small(r: &mut impl Read) -> std::io::Result<Vec<u8>> {
    let mut v = Vec::new();
    r.take(MAX_METADATA).read_to_end(&mut v)?;
    Ok(v)
}

/// Streams one uncompressed layer into a gzipped blob in `blobs_dir`.
fn gzip_layer(layer: &mut impl Read, blobs_dir: &Path) -> std::io::Result<LayerBlob> {
    let tmp = tempfile_in(blobs_dir);
    let file = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
    let compressed = Hashing { inner: file, hasher: Default::default(), bytes: 0 };
    // The fastest level: the export is overhead on every build, and a Pi's CPU is the bottleneck.
    let gz = flate2::GzBuilder::new().write(compressed, flate2::Compression::fast());
    let mut plain = Hashing { inner: gz, hasher: Default::default(), bytes: 0 };
    std::io::copy(layer, &mut plain)?;
    let diff_id = plain.hasher.finish();
    let mut compressed = plain.inner.finish()?;
    compressed.flush()?;
    let digest = compressed.hasher.finish();
    let size = compressed.bytes;
    compressed.inner.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    std::fs::rename(&tmp, blobs_dir.join(digest.hex()))?;
    Ok(LayerBlob { diff_id, blob: Descriptor::new(LAYER_MEDIA_TYPE, digest, size) })
}

fn tempfile_in(dir: &Path) -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    dir.join(format!(".partial-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_engine_is_found_as_docker_finds_it() {
        assert_eq!(engine_host(Some("unix:///x.sock"), Some("tcp://h:1")), "unix:///x.sock");
        assert_eq!(engine_host(None, Some("tcp://h:1")), "tcp://h:1");
        assert_eq!(engine_host(None, Some("")), DEFAULT_HOST);
        assert_eq!(engine_host(None, None), "unix:///var/run/docker.sock");
        assert_eq!(endpoint("unix:///run/d.sock").unwrap(), Endpoint::Unix("/run/d.sock".into()));
        assert_eq!(endpoint("tcp://10.0.0.2:2375").unwrap(), Endpoint::Tcp("10.0.0.2:2375".into()));
        let e = endpoint("ssh://me@host").unwrap_err().to_string();
        assert!(e.starts_with("unsupported Docker host \"ssh://me@host\"") && e.contains("docker_host"), "{e}");
    }

    #[test]
    fn api_answers_and_versions_parse() {
        let (status, body) =
            parse_response(b"HTTP/1.0 200 OK\r\nApi-Version: 1.41\r\n\r\n{\"Version\":\"20.10.24+dfsg1\"}").unwrap();
        assert_eq!(status, 200);
        assert_eq!(engine_version(&body).as_deref(), Some("20.10.24+dfsg1"));
        assert!(parse_response(b"SSH-2.0-OpenSSH\r\n").is_err());
        assert_eq!(builder_size(br#"{"BuilderSize":1234,"BuildCache":[]}"#), Some(1234));
        assert_eq!(
            builder_size(br#"{"BuildCache":[{"Size":10,"Shared":false},{"Size":5,"Shared":true},{"Size":1}]}"#),
            Some(11)
        );
    }

    #[test]
    fn a_client_that_needs_buildx_is_refused_with_why() {
        assert!(help_supports("--platform string\n--secret stringArray\n--progress\n--network").is_ok());
        assert_eq!(help_supports("--platform --progress --network").unwrap_err(), "its `docker build` has no --secret");
    }

    #[test]
    fn inputs_become_docker_build_flags_and_named_contexts_are_refused() {
        let platform: shared::Platform = "linux/amd64".parse().unwrap();
        let mirrors = crate::mirrors::Mirrors::default();
        let inputs = shared::proto::Inputs {
            pull: true,
            no_network: true,
            add_hosts: vec![("db.internal".into(), "10.1.2.3".into())],
            ..Default::default()
        };
        let networked = shared::proto::Inputs { no_network: false, ..inputs.clone() };
        let contexts = vec![("extra".to_string(), PathBuf::from("/x"))];
        let no_annotations = std::collections::BTreeMap::new();
        let job = |inputs, contexts| Job {
            context: Path::new("/ctx"),
            dockerfile: "Dockerfile",
            platform: &platform,
            build_args: &[],
            target: None,
            no_cache: false,
            insecure_registries: &[],
            output: Path::new("/out"),
            name: "t",
            cancel: Default::default(),
            secrets: &[],
            mirrors: &mirrors,
            memory: None,
            entitlements: &[],
            annotations: &no_annotations,
            labels: &[],
            ssh: &[],
            inputs,
            contexts,
            cache_to: None,
            cache_from: &[],
            cache_import: &[],
            cache_credentials: None,
        };
        let plain = job(&inputs, &[]);
        assert_eq!(network(&plain, true), "none");
        assert_eq!(
            build_args(&plain, Path::new("/ctx/Dockerfile"), &[], "none").join(" "),
            "build --progress plain --network none --platform linux/amd64 -f /ctx/Dockerfile --pull --add-host \
             db.internal:10.1.2.3 --tag t /ctx"
        );
        assert_eq!(named_contexts_refused(&plain), None);
        assert_eq!(network(&job(&networked, &[]), true), "default");
        assert_eq!(
            named_contexts_refused(&job(&networked, &contexts)).unwrap(),
            "the build uses named contexts (--build-context extra=...), which farm's Docker builder cannot pass: the \
             docker build of Docker 20.10 has no --build-context; build it on a buildah agent (farm build --require \
             builder=buildah)"
        );
    }

    #[test]
    fn archive_paths_and_links_resolve() {
        assert_eq!(clean("./a/./b/../c"), "a/c");
        assert_eq!(link_target("b/layer.tar", "../a/layer.tar", true), "a/layer.tar");
        assert_eq!(link_target("b/layer.tar", "a/layer.tar", false), "a/layer.tar");
        let links = HashMap::from([("c/layer.tar".to_string(), "b/layer.tar".to_string())]);
        assert_eq!(resolve(&links, "./c/layer.tar"), "b/layer.tar");
    }

    /// A tar of `files` (path, contents) and `symlinks` (path, target).
    fn tar_of(files: &[(&str, Vec<u8>)], symlinks: &[(&str, &str)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, data) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, path, &data[..]).unwrap();
        }
        for (path, target) in symlinks {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Symlink);
            h.set_size(0);
            b.append_link(&mut h, path, target).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn gunzip_files(gz: &[u8]) -> Vec<(String, Vec<u8>)> {
        let mut a = tar::Archive::new(flate2::read::GzDecoder::new(gz));
        a.entries()
            .unwrap()
            .map(|e| {
                let mut e = e.unwrap();
                let mut v = Vec::new();
                e.read_to_end(&mut v).unwrap();
                (e.path().unwrap().to_string_lossy().to_string(), v)
            })
            .collect()
    }

    #[test]
    fn a_docker_archive_becomes_an_oci_layout_the_agent_can_push() {
        let dir = tempfile::tempdir().unwrap();
        let layer1 = tar_of(&[("etc/hello", b"hello\n".to_vec())], &[]);
        let layer2 = tar_of(&[("hello/uname", b"armv7l\n".to_vec())], &[]);
        let config = format!(
            r#"{{"architecture":"arm","variant":"v7","os":"linux","rootfs":{{"type":"layers","diff_ids":["{}","{}","{}"]}}}}"#,
            Digest::of(&layer1),
            Digest::of(&layer2),
            Digest::of(&layer1)
        );
        let config_name = format!("{}.json", Digest::of(config.as_bytes()).hex());
        // As dockerd 20.10 writes it: layer directories, the config, manifest.json last; a layer
        // repeated in the image is a symlink to the first copy.
        let manifest = format!(
            r#"[{{"Config":"{config_name}","RepoTags":["farm-task-1-1:latest"],"Layers":["aaa/layer.tar","bbb/layer.tar","ccc/layer.tar"]}}]"#
        );
        let archive = tar_of(
            &[
                ("aaa/VERSION", b"1.0".to_vec()),
                ("aaa/layer.tar", layer1.clone()),
                ("bbb/layer.tar", layer2.clone()),
                (&config_name, config.clone().into_bytes()),
                ("manifest.json", manifest.into_bytes()),
                ("repositories", b"{}".to_vec()),
            ],
            &[("ccc/layer.tar", "../aaa/layer.tar")],
        );
        let path = dir.path().join("image.docker.tar");
        std::fs::write(&path, archive).unwrap();
        let out = dir.path().join("layout");
        let digest = archive_to_layout(&path, &out, &Default::default()).unwrap();

        let layout = oci::read_layout(&out).unwrap();
        assert_eq!(layout.manifest.digest, digest);
        assert_eq!(layout.manifest.media_type, OCI_MANIFEST);
        assert_eq!(layout.platform().unwrap().to_string(), "linux/arm/v7");
        assert_eq!(layout.config.media_type, CONFIG_MEDIA_TYPE);
        assert_eq!(std::fs::read(oci::blob_path(&out, &layout.config.digest)).unwrap(), config.as_bytes());
        assert_eq!(layout.layers.len(), 3);
        assert_eq!(layout.layers[0], layout.layers[2], "the linked layer is the same blob");
        let contents: Vec<_> = layout
            .layers
            .iter()
            .map(|l| {
                assert_eq!(l.media_type, LAYER_MEDIA_TYPE);
                gunzip_files(&std::fs::read(oci::blob_path(&out, &l.digest)).unwrap())
            })
            .collect();
        assert_eq!(contents[0], [("etc/hello".to_string(), b"hello\n".to_vec())]);
        assert_eq!(contents[1], [("hello/uname".to_string(), b"armv7l\n".to_vec())]);
        assert_eq!(std::fs::read_to_string(out.join("oci-layout")).unwrap(), r#"{"imageLayoutVersion":"1.0.0"}"#);
        let left: Vec<_> = std::fs::read_dir(out.join("blobs/sha256"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .filter(|n| n.starts_with('.'))
            .collect();
        assert!(left.is_empty(), "partial files left: {left:?}");

        // Converting the same archive again gives the same manifest (gzip output is stable).
        let again = archive_to_layout(&path, &dir.path().join("again"), &Default::default()).unwrap();
        assert_eq!(again, digest);

        // `--annotation manifest:...`: on the manifest, the rest unchanged.
        let annotations = [("org.example.arm".to_string(), "yes".to_string())].into();
        let annotated = archive_to_layout(&path, &dir.path().join("annotated"), &annotations).unwrap();
        assert_ne!(annotated, digest);
        let bytes = std::fs::read(oci::blob_path(&dir.path().join("annotated"), &annotated)).unwrap();
        let json: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(json["annotations"], serde_json::json!({"org.example.arm": "yes"}));
        assert_eq!(json["config"]["digest"], layout.config.digest.to_string());
    }

    #[test]
    fn a_layer_that_does_not_match_its_diff_id_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let layer = tar_of(&[("a", b"a".to_vec())], &[]);
        let config =
            format!(r#"{{"os":"linux","architecture":"amd64","rootfs":{{"diff_ids":["{}"]}}}}"#, Digest::of(b"other"));
        let archive = tar_of(
            &[
                ("l/layer.tar", layer.clone()),
                ("c.json", config.into_bytes()),
                ("manifest.json", br#"[{"Config":"c.json","Layers":["l/layer.tar"]}]"#.to_vec()),
            ],
            &[],
        );
        let path = dir.path().join("x.tar");
        std::fs::write(&path, archive).unwrap();
        let e = archive_to_layout(&path, &dir.path().join("out"), &Default::default()).unwrap_err().to_string();
        assert!(e.contains(&format!("layer l/layer.tar is {} but the config says", Digest::of(&layer))), "{e}");

        std::fs::write(&path, tar_of(&[("manifest.json", b"[]".to_vec())], &[])).unwrap();
        let e = archive_to_layout(&path, &dir.path().join("out2"), &Default::default()).unwrap_err().to_string();
        assert!(e.ends_with("manifest.json lists 0 images; expected exactly one"), "{e}");
    }
}
