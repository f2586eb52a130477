//! Talking to OCI registries, through `oci-client`. Agents push their one platform by digest only,
//! so an unfinished multi-arch build never leaves a half-true tag behind; the coordinator then
//! pushes the index under the user's tags in one step. Blobs are checked with HEAD before they
//! are uploaded, so retrying after a restart costs no bandwidth, and errors name the registry and
//! what to do about it, because "error sending request" is all a user would otherwise see.
//!
//! Credentials come from Docker's config.json (inline `auth` or `username`/`password` only) and
//! never appear in `Debug`, `Display` or error messages.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use base64::Engine as _;
use futures_util::FutureExt as _;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference, RegistryOperation};
use reqwest::header::HeaderValue;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::digest::Digest;
use crate::oci::{
    blob_path, parse_index, Descriptor, ImageRef, Layout, OciError, DOCKER_HUB, DOCKER_LIST, DOCKER_MANIFEST,
    OCI_INDEX, OCI_MANIFEST,
};
use crate::provenance::{self, Published};

mod upload;

pub use upload::BlobLocations;
use upload::{after_failure, chunk_body, content_range, next_chunk, parse_range, Next, CHUNK, MAX_FAILURES};

/// How many blobs of one image are pushed at once.
const PARALLEL_BLOBS: usize = 4;

/// Registry credentials. `Debug` and `Display` print `<redacted>` for the password; never logged.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials").field("username", &self.username).field("password", &"<redacted>").finish()
    }
}

impl fmt::Display for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:<redacted>", self.username)
    }
}

/// What a registry operation went wrong with; every message names the registry (or the file) and,
/// where there is one, the fix. None contains a password.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("registry {registry} unreachable: {reason} ({hint})")]
    Unreachable { registry: String, reason: String, hint: String },
    #[error("registry {registry} answered in plain HTTP, not HTTPS: name it with --insecure-registry {registry}")]
    PlainHttp { registry: String },
    #[error("registry {registry} refused the credentials for user {user:?}: check ~/.docker/config.json or run docker login")]
    BadCredentials { registry: String, user: String },
    #[error(
        "registry {registry} requires credentials and none were found for it: \
         add them to ~/.docker/config.json (docker login {registry})"
    )]
    NeedCredentials { registry: String },
    #[error(
        "registry {registry} denied {action} access to {repository}{who}: check that the account may {action} there",
        who = user.as_ref().map(|u| format!(" for user {u:?}")).unwrap_or_default()
    )]
    Denied { registry: String, repository: String, user: Option<String>, action: &'static str },
    #[error("{what} not found")]
    NotFound { what: String },
    #[error("registry {registry}: {message}")]
    Protocol { registry: String, message: String },
    #[error(transparent)]
    Layout(#[from] OciError),
    #[error("reading {path}: {source}", path = path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Usage(String),
    #[error("{file}: {reason}")]
    DockerConfig { file: String, reason: String },
}

/// What [`Registry::push_layout`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushReport {
    /// The pushed manifest (media type, digest, size); no platform, the caller adds it.
    pub manifest: Descriptor,
    pub blobs_uploaded: usize,
    /// Blobs the registry already had.
    pub blobs_skipped: usize,
    /// Blobs mounted from another repository of the same registry instead of uploaded.
    pub blobs_mounted: usize,
    /// The sizes of the blobs uploaded (bytes sent again after a failure not counted).
    pub bytes_uploaded: u64,
    /// Failed requests recovered from by continuing where the registry had got to.
    pub resumed: u32,
    /// Failed requests recovered from by sending a blob again from its start.
    pub restarted: u32,
}

/// A containers auth file (`buildah --authfile`) holding `credentials` for `registry`
/// (`host[:port]`) only.
pub fn auth_file(registry: &str, credentials: &Credentials) -> String {
    let auth =
        base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", credentials.username, credentials.password));
    serde_json::json!({ "auths": { registry: { "auth": auth } } }).to_string()
}

/// The name of the file [`docker_config_credentials`] errors are attributed to when the caller did not
/// read it from a file.
const CONFIG_JSON: &str = "docker config.json";

/// The registry host[:port] a config.json `auths` key names, as Docker's `ConvertToHostname`
/// reads it: `https://reg.lan:5000/v2/` is `reg.lan:5000`.
fn auths_key_host(key: &str) -> String {
    let rest = key.strip_prefix("https://").or_else(|| key.strip_prefix("http://")).unwrap_or(key);
    rest.split('/').next().unwrap_or_default().to_ascii_lowercase()
}

/// Finds credentials for `registry` (`host[:port]`, as in an [`ImageRef`]) in the text of a Docker
/// config.json: `auths[<key>].auth` (base64 of `user:pass`) or `auths[<key>].username`/`password`,
/// where the key is the registry itself, or it with `https://`/`http://` in front and/or a path such
/// as `/v1/` or `/v2/` behind; for docker.io also `index.docker.io` (`https://index.docker.io/v1/`,
/// as `docker login` writes it) and `registry-1.docker.io`.
///
/// Credential helpers (`credsStore`, `credHelpers`) and identity tokens are not supported: an entry
/// without inline credentials gives `Ok(None)`. Errors name the `auths` key, never the secret.
pub fn docker_config_credentials(config_json: &str, registry: &str) -> Result<Option<Credentials>, RegistryError> {
    let bad = |reason: String| RegistryError::DockerConfig { file: CONFIG_JSON.into(), reason };
    // Parsed as a Value first: serde's type errors can quote the offending value, which may be a secret.
    let config: Value = serde_json::from_str(config_json).map_err(|e| bad(format!("invalid JSON: {e}")))?;
    let Some(auths) = config.get("auths") else {
        return Ok(None);
    };
    let auths = auths.as_object().ok_or_else(|| bad("\"auths\" is not an object".into()))?;
    let registry = registry.to_ascii_lowercase();
    let wanted: &[&str] = if registry == DOCKER_HUB {
        &[DOCKER_HUB, "index.docker.io", "registry-1.docker.io"]
    } else {
        &[registry.as_str()]
    };
    let key = auths
        .keys()
        .find(|k| k.to_ascii_lowercase() == registry)
        .or_else(|| auths.keys().find(|k| wanted.contains(&auths_key_host(k).as_str())));
    let Some(key) = key else {
        return Ok(None);
    };
    let entry = auths[key].as_object().ok_or_else(|| bad(format!("auths[{key:?}] is not an object")))?;
    match entry.get("auth") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) if s.is_empty() => {}
        Some(Value::String(auth)) => {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(auth.trim())
                .map_err(|_| bad(format!("auths[{key:?}].auth is not valid base64")))?;
            let text = String::from_utf8(decoded)
                .map_err(|_| bad(format!("auths[{key:?}].auth does not decode to UTF-8 text")))?;
            let (username, password) = text
                .split_once(':')
                .ok_or_else(|| bad(format!("auths[{key:?}].auth does not decode to \"username:password\"")))?;
            return Ok(Some(Credentials { username: username.to_owned(), password: password.to_owned() }));
        }
        Some(_) => return Err(bad(format!("auths[{key:?}].auth is not a string"))),
    }
    match (entry.get("username").and_then(Value::as_str), entry.get("password").and_then(Value::as_str)) {
        (Some(username), Some(password)) if !username.is_empty() => {
            Ok(Some(Credentials { username: username.to_owned(), password: password.to_owned() }))
        }
        _ => Ok(None),
    }
}

/// Where Docker keeps its config: `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`.
fn docker_config_path() -> Option<PathBuf> {
    match std::env::var_os("DOCKER_CONFIG") {
        Some(dir) if !dir.is_empty() => Some(PathBuf::from(dir).join("config.json")),
        _ => std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".docker").join("config.json")),
    }
}

/// Reads `$DOCKER_CONFIG/config.json` or `~/.docker/config.json` (an absent file is `Ok(None)`) and
/// finds the credentials for `registry` in it, see [`docker_config_credentials`].
pub fn load_docker_credentials(registry: &str) -> Result<Option<Credentials>, RegistryError> {
    match docker_config_path() {
        Some(path) => credentials_from_file(&path, registry),
        None => Ok(None),
    }
}

fn credentials_from_file(path: &Path, registry: &str) -> Result<Option<Credentials>, RegistryError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(RegistryError::Io { path: path.to_owned(), source }),
    };
    let found = docker_config_credentials(&text, registry).map_err(|e| match e {
        RegistryError::DockerConfig { reason, .. } => {
            RegistryError::DockerConfig { file: path.display().to_string(), reason }
        }
        other => other,
    })?;
    if found.is_none() {
        let config: Value = serde_json::from_str(&text).unwrap_or_default();
        if config.get("credsStore").is_some() || config.get("credHelpers").is_some() {
            tracing::warn!(
                "{}: credential helpers (credsStore, credHelpers) are not supported; \
                 no inline credentials for {registry}, so farm pushes to it anonymously",
                path.display()
            );
        }
    }
    Ok(found)
}

impl ImageRef {
    /// The same reference as oci-client spells it; without tag or digest it is `:latest`.
    pub fn to_oci_client(&self) -> Reference {
        let (registry, repository) = (self.registry.clone(), self.repository.clone());
        match (&self.tag, &self.digest) {
            (Some(t), Some(d)) => Reference::with_tag_and_digest(registry, repository, t.clone(), d.to_string()),
            (None, Some(d)) => Reference::with_digest(registry, repository, d.to_string()),
            (Some(t), None) => Reference::with_tag(registry, repository, t.clone()),
            (None, None) => Reference::with_tag(registry, repository, "latest".into()),
        }
    }
}

/// A registry client for one set of credentials; it serves every registry. Cloning is cheap and
/// shares the HTTP connection pool and the bearer-token cache.
#[derive(Clone)]
pub struct Registry {
    client: Client,
    auth: RegistryAuth,
    user: Option<String>,
    insecure: Vec<String>,
    /// The HTTP client blob uploads use, made on the first upload.
    http: Arc<OnceLock<reqwest::Client>>,
    locations: BlobLocations,
    chunk: u64,
    /// Registries (host) that answered 404 to the referrers API: their referrers are read from
    /// the `sha256-<hex>` fallback tag straight away, without asking the API again.
    no_referrers_api: Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
}

/// Registry clients kept for reuse, one per (plain-HTTP registries, credentials): building one
/// loads TLS roots and costs milliseconds of CPU, so a coordinator that built one per build spent
/// more on that than on scheduling. Clients are never shared between credentials, because a
/// client caches the bearer tokens it was given. At most [`RegistryPool::CAPACITY`] are kept;
/// past that the pool starts over (a cold client costs time, never correctness).
#[derive(Default)]
pub struct RegistryPool {
    clients: std::sync::Mutex<std::collections::HashMap<PoolKey, Registry>>,
}

#[derive(Hash, PartialEq, Eq)]
struct PoolKey {
    insecure: Vec<String>,
    /// The username and a SHA-256 of the password: the pool does not keep a second copy of it.
    credentials: Option<(String, [u8; 32])>,
}

impl RegistryPool {
    pub const CAPACITY: usize = 64;

    /// The pooled client for these settings, made on first use.
    pub fn get(&self, insecure: &[String], credentials: Option<&Credentials>) -> Registry {
        use sha2::Digest as _;
        let mut sorted = insecure.to_vec();
        sorted.sort();
        sorted.dedup();
        let key = PoolKey {
            insecure: sorted,
            credentials: credentials.map(|c| (c.username.clone(), sha2::Sha256::digest(c.password.as_bytes()).into())),
        };
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(r) = clients.get(&key) {
            return r.clone();
        }
        if clients.len() >= Self::CAPACITY {
            clients.clear();
        }
        let r = Registry::new(insecure, credentials.cloned());
        clients.insert(key, r.clone());
        r
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.clients.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry").field("insecure", &self.insecure).field("user", &self.user).finish_non_exhaustive()
    }
}

/// The innermost cause of an error, in a few words.
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    if let Some(io) = cause.downcast_ref::<std::io::Error>() {
        match io.kind() {
            std::io::ErrorKind::ConnectionRefused => return "connection refused".into(),
            std::io::ErrorKind::TimedOut => return "timed out".into(),
            _ => {}
        }
    }
    cause.to_string()
}

/// An answer worth asking again: the registry failed (5xx), timed out (408) or is rate-limiting (429).
fn transient_status(code: u16) -> bool {
    code >= 500 || matches!(code, 408 | 429)
}

/// The HTTP status an oci-client error stands for, if any.
fn status_of(e: &OciDistributionError) -> Option<u16> {
    match e {
        OciDistributionError::UnauthorizedError { .. } | OciDistributionError::AuthenticationFailure(_) => Some(401),
        OciDistributionError::ServerError { code, .. } => Some(*code),
        OciDistributionError::RequestError(e) => e.status().map(|s| s.as_u16()),
        OciDistributionError::RegistryError { envelope, .. } => envelope.errors.iter().find_map(|err| match err.code {
            OciErrorCode::Unauthorized => Some(401),
            OciErrorCode::Denied => Some(403),
            OciErrorCode::NameUnknown
            | OciErrorCode::ManifestUnknown
            | OciErrorCode::BlobUnknown
            | OciErrorCode::NotFound => Some(404),
            _ => None,
        }),
        _ => None,
    }
}

/// The media type a manifest or index declares; without a `mediaType` field, an index if it has
/// `manifests`, else an image manifest.
fn declared_media_type(bytes: &[u8]) -> String {
    let value: Value = serde_json::from_slice(bytes).unwrap_or_default();
    match value.get("mediaType").and_then(Value::as_str) {
        Some(t) => t.to_owned(),
        None if value.get("manifests").is_some() => OCI_INDEX.to_owned(),
        None => OCI_MANIFEST.to_owned(),
    }
}

impl Registry {
    /// A client speaking HTTPS to every registry except those in `insecure` ("host:port"), which
    /// are spoken to over plain HTTP. `credentials`, if any, are offered to every registry that asks.
    pub fn new(insecure: &[String], credentials: Option<Credentials>) -> Self {
        // reqwest is built without a crypto provider of its own (see Cargo.toml) and takes the
        // process default; ring is what the rest of farm uses. Already installed is fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let config = ClientConfig {
            protocol: if insecure.is_empty() {
                ClientProtocol::Https
            } else {
                ClientProtocol::HttpsExcept(insecure.to_vec())
            },
            platform_resolver: None,
            connect_timeout: Some(Duration::from_secs(30)),
            user_agent: concat!("farm/", env!("CARGO_PKG_VERSION")),
            ..ClientConfig::default()
        };
        // Client::new would fall back to a default configuration (HTTPS everywhere) on failure;
        // building only fails if the TLS backend cannot start, which no later call could survive.
        let client = Client::try_from(config).expect("the HTTP client for registries could not be built");
        let (auth, user) = match credentials {
            Some(c) => (RegistryAuth::Basic(c.username.clone(), c.password), Some(c.username)),
            None => (RegistryAuth::Anonymous, None),
        };
        Registry {
            client,
            auth,
            user,
            insecure: insecure.to_vec(),
            http: Arc::default(),
            locations: BlobLocations::default(),
            chunk: CHUNK,
            no_referrers_api: Arc::default(),
        }
    }

    /// This client with `locations` as its table of which repositories hold which blobs (mount
    /// candidates), e.g. one an agent keeps for all its pushes.
    pub fn with_locations(mut self, locations: BlobLocations) -> Self {
        self.locations = locations;
        self
    }

    /// This client with uploads in PATCHes of `bytes` (at least 1).
    pub fn with_chunk_size(mut self, bytes: u64) -> Self {
        self.chunk = bytes.max(1);
        self
    }

    /// The table of which repositories hold which blobs.
    pub fn locations(&self) -> &BlobLocations {
        &self.locations
    }

    /// Turns an oci-client error about `target` into one that says what to do.
    fn error(&self, target: &ImageRef, action: &'static str, what: &str, e: OciDistributionError) -> RegistryError {
        let registry = target.registry.clone();
        if let OciDistributionError::RequestError(re) = &e {
            let cause = root_cause(re);
            if !self.insecure.contains(&registry)
                && (cause.contains("InvalidContentType") || cause.contains("http request to an https"))
            {
                return RegistryError::PlainHttp { registry };
            }
            if re.is_connect() || re.is_timeout() {
                let hint = if self.insecure.contains(&registry) {
                    "is it running?".to_owned()
                } else {
                    format!("is it running? a plain-HTTP registry must be named with --insecure-registry {registry}")
                };
                return RegistryError::Unreachable { registry, reason: root_cause(re), hint };
            }
        }
        match status_of(&e) {
            Some(401) => match &self.user {
                Some(user) => RegistryError::BadCredentials { registry, user: user.clone() },
                None => RegistryError::NeedCredentials { registry },
            },
            Some(403) => RegistryError::Denied {
                registry,
                repository: target.repository.clone(),
                user: self.user.clone(),
                action,
            },
            Some(404) => RegistryError::NotFound { what: what.to_owned() },
            _ => RegistryError::Protocol { registry, message: e.to_string() },
        }
    }

    /// Authenticates for `op` on `target`'s repository (a bearer token, basic credentials or
    /// nothing, as the registry asks), which also tells early whether the registry is reachable.
    async fn authorize(&self, target: &ImageRef, op: RegistryOperation) -> Result<(), RegistryError> {
        let action = if matches!(op, RegistryOperation::Push) { "push" } else { "pull" };
        self.client
            .auth(&target.to_oci_client(), &self.auth, op)
            .await
            .map(drop)
            .map_err(|e| self.error(target, action, &target.name(), e))
    }

    /// For calls that do not take credentials themselves: offer ours for `target`'s registry.
    async fn offer_auth(&self, target: &ImageRef) {
        self.client.store_auth_if_needed(target.to_oci_client().resolve_registry(), &self.auth).await;
    }

    /// Pushes an OCI layout to `repo` by digest, see [`Registry::push_layout_from`], with no
    /// mount sources but those this client knows.
    pub async fn push_layout(&self, layout: &Layout, repo: &ImageRef) -> Result<PushReport, RegistryError> {
        self.push_layout_from(layout, repo, &[]).await
    }

    /// Pushes an OCI layout to `repo` by digest: the layers and the config blob, up to
    /// `PARALLEL_BLOBS` at once, each first checked with a HEAD and sent only if the registry
    /// lacks it; a missing blob is mounted from another repository of the same registry when one
    /// is known to hold it (this client's [`BlobLocations`], then `sources`, e.g. the base images'
    /// repositories), else uploaded in chunks streamed from disk, resumed after a failure. Then
    /// the manifest is PUT by digest (`repo@sha256:…`), never by tag. `repo`'s own tag and digest
    /// are ignored.
    ///
    /// The report's manifest is the descriptor (media type, digest, size; no platform, the caller
    /// adds it).
    pub async fn push_layout_from(
        &self,
        layout: &Layout,
        repo: &ImageRef,
        sources: &[ImageRef],
    ) -> Result<PushReport, RegistryError> {
        use futures_util::{StreamExt as _, TryStreamExt as _};
        let target = repo.with_digest(&layout.manifest.digest);
        let auth = self.upload_auth(&target).await?;
        let mut report = PushReport {
            manifest: layout.manifest.clone(),
            blobs_uploaded: 0,
            blobs_skipped: 0,
            blobs_mounted: 0,
            bytes_uploaded: 0,
            resumed: 0,
            restarted: 0,
        };
        report.manifest.platform = None;
        report.manifest.annotations.clear();
        let mut seen = HashSet::new();
        let blobs: Vec<&Descriptor> =
            layout.layers.iter().chain([&layout.config]).filter(|b| seen.insert(&b.digest)).collect();
        let (target, auth) = (&target, &auth);
        // The futures made beforehand, not in a closure of the stream: a stream of closures over
        // borrowed arguments trips the compiler's `Send` check for callers that spawn this.
        let pushes: Vec<_> =
            blobs.into_iter().map(|blob| self.push_layout_blob(target, &layout.dir, blob, sources, auth)).collect();
        let outcomes: Vec<Pushed> =
            futures_util::stream::iter(pushes).buffer_unordered(PARALLEL_BLOBS).try_collect().await?;
        for outcome in outcomes {
            match outcome {
                Pushed::Present => report.blobs_skipped += 1,
                Pushed::Mounted => report.blobs_mounted += 1,
                Pushed::Uploaded { size, resumed, restarted } => {
                    report.blobs_uploaded += 1;
                    report.bytes_uploaded += size;
                    report.resumed += resumed;
                    report.restarted += restarted;
                }
            }
        }
        self.put_manifest(target, layout.manifest_bytes.clone(), &layout.manifest.media_type).await?;
        tracing::debug!(
            "pushed {target} ({} blobs uploaded, {} mounted, {} present; {} resumed, {} restarted)",
            report.blobs_uploaded,
            report.blobs_mounted,
            report.blobs_skipped,
            report.resumed,
            report.restarted
        );
        Ok(report)
    }

    /// The Authorization header blob uploads to `target`'s repository carry: the bearer token the
    /// registry gave for pushing, else the basic credentials, else none.
    async fn upload_auth(&self, target: &ImageRef) -> Result<Option<HeaderValue>, RegistryError> {
        let token = self
            .client
            .auth(&target.to_oci_client(), &self.auth, RegistryOperation::Push)
            .await
            .map_err(|e| self.error(target, "push", &target.name(), e))?;
        let value = match (token, &self.auth) {
            (Some(token), _) => format!("Bearer {token}"),
            (None, RegistryAuth::Basic(user, password)) => {
                format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}")))
            }
            (None, _) => return Ok(None),
        };
        let mut value = HeaderValue::from_str(&value)
            .map_err(|_| RegistryError::Usage("the registry credentials are not valid in an HTTP header".into()))?;
        value.set_sensitive(true);
        Ok(Some(value))
    }

    fn http(&self) -> &reqwest::Client {
        self.http.get_or_init(|| {
            reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(30))
                .user_agent(concat!("farm/", env!("CARGO_PKG_VERSION")))
                .build()
                .expect("the HTTP client for registries could not be built")
        })
    }

    /// `scheme://host[:port]` of `target`'s registry.
    fn base_url(&self, target: &ImageRef) -> String {
        let reference = target.to_oci_client();
        let host = reference.resolve_registry();
        let scheme = if self.insecure.iter().any(|i| i == host || *i == target.registry) { "http" } else { "https" };
        format!("{scheme}://{host}")
    }

    /// A request to `url` with the credentials, which go only to the registry itself (an upload
    /// URL may point elsewhere, e.g. to storage).
    fn request(
        &self,
        method: reqwest::Method,
        url: reqwest::Url,
        target: &ImageRef,
        auth: &Option<HeaderValue>,
    ) -> reqwest::RequestBuilder {
        let same_origin = reqwest::Url::parse(&self.base_url(target)).is_ok_and(|base| base.origin() == url.origin());
        let mut request = self.http().request(method, url);
        if let (true, Some(auth)) = (same_origin, auth) {
            request = request.header(reqwest::header::AUTHORIZATION, auth.clone());
        }
        request
    }

    /// A failure of an upload request: worth retrying (the connection, a 5xx) or not.
    async fn classify(&self, target: &ImageRef, what: &str, result: reqwest::Result<reqwest::Response>) -> Failure {
        match result {
            Err(e) => Failure::Retry(root_cause(&e)),
            Ok(response) => {
                let code = response.status().as_u16();
                let url = response.url().to_string();
                let message = response.text().await.unwrap_or_default();
                if transient_status(code) || code == 416 {
                    return Failure::Retry(format!("HTTP {code} {}", message.trim()));
                }
                Failure::Fatal(self.error(
                    target,
                    "push",
                    what,
                    OciDistributionError::ServerError { code, url, message },
                ))
            }
        }
    }

    /// The URL of the upload a 202 answer names (its `Location`, relative to the request's URL).
    fn location(target: &ImageRef, response: &reqwest::Response) -> Result<reqwest::Url, RegistryError> {
        let location = response.headers().get(reqwest::header::LOCATION).and_then(|l| l.to_str().ok());
        location.and_then(|l| response.url().join(l).ok()).ok_or_else(|| RegistryError::Protocol {
            registry: target.registry.clone(),
            message: format!("answered {} to {} without a usable Location", response.status(), response.url()),
        })
    }

    /// Starts an upload to `target`'s repository; with `mount`, as a mount of that digest from
    /// that repository, which the registry may answer with the blob mounted.
    async fn start_upload(
        &self,
        target: &ImageRef,
        auth: &Option<HeaderValue>,
        mount: Option<(&Digest, &str)>,
        what: &str,
    ) -> Result<Started, Failure> {
        let mut url =
            reqwest::Url::parse(&format!("{}/v2/{}/blobs/uploads/", self.base_url(target), target.repository))
                .map_err(|e| Failure::Fatal(RegistryError::Usage(format!("{}: {e}", target.name()))))?;
        if let Some((digest, from)) = mount {
            url.query_pairs_mut().append_pair("mount", digest.as_str()).append_pair("from", from);
        }
        let sent = self
            .request(reqwest::Method::POST, url, target, auth)
            .header(reqwest::header::CONTENT_LENGTH, 0)
            .send()
            .await;
        match sent {
            Ok(r) if r.status() == reqwest::StatusCode::CREATED && mount.is_some() => Ok(Started::Mounted),
            Ok(r) if r.status() == reqwest::StatusCode::ACCEPTED => {
                Ok(Started::Session(Self::location(target, &r).map_err(Failure::Fatal)?))
            }
            other => Err(self.classify(target, what, other).await),
        }
    }

    /// Sends `range` of the file at `path` to the upload at `url`; the URL to go on with.
    async fn patch(
        &self,
        target: &ImageRef,
        auth: &Option<HeaderValue>,
        url: &reqwest::Url,
        path: &Path,
        range: &std::ops::Range<u64>,
        what: &str,
    ) -> Result<reqwest::Url, Failure> {
        let body = chunk_body(path, range)
            .await
            .map_err(|source| Failure::Fatal(RegistryError::Io { path: path.to_owned(), source }))?;
        let sent = self
            .request(reqwest::Method::PATCH, url.clone(), target, auth)
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .header(reqwest::header::CONTENT_RANGE, content_range(range))
            .header(reqwest::header::CONTENT_LENGTH, range.end - range.start)
            .body(body)
            .send()
            .await;
        match sent {
            Ok(r) if r.status() == reqwest::StatusCode::ACCEPTED => Self::location(target, &r).map_err(Failure::Fatal),
            other => Err(self.classify(target, what, other).await),
        }
    }

    /// Commits the upload at `url` as `digest`; the registry checks the digest.
    async fn commit(
        &self,
        target: &ImageRef,
        auth: &Option<HeaderValue>,
        url: &reqwest::Url,
        digest: &Digest,
        what: &str,
    ) -> Result<(), Failure> {
        let mut url = url.clone();
        url.query_pairs_mut().append_pair("digest", digest.as_str());
        let sent = self
            .request(reqwest::Method::PUT, url, target, auth)
            .header(reqwest::header::CONTENT_LENGTH, 0)
            .send()
            .await;
        match sent {
            Ok(r) if r.status() == reqwest::StatusCode::CREATED => Ok(()),
            other => Err(self.classify(target, what, other).await),
        }
    }

    /// Where the upload at `url` stands (`GET`): the offset it has reached and the URL to go on
    /// with, or `None` if the registry no longer has it.
    async fn upload_status(
        &self,
        target: &ImageRef,
        auth: &Option<HeaderValue>,
        url: &reqwest::Url,
    ) -> Option<(u64, reqwest::Url)> {
        let r = self.request(reqwest::Method::GET, url.clone(), target, auth).send().await.ok()?;
        if r.status() != reqwest::StatusCode::NO_CONTENT {
            return None;
        }
        let offset = parse_range(r.headers().get(reqwest::header::RANGE)?.to_str().ok()?)?;
        let next = Self::location(target, &r).unwrap_or_else(|_| url.clone());
        Some((offset, next))
    }

    /// Whether `target`'s repository has blob `digest` (HEAD). A 5xx or a dropped connection is
    /// asked again a few times and then taken as "no": distribution 2.8's filesystem storage
    /// rewrites a repository's blob link in place, so a HEAD that meets another push of the same
    /// blob (another build's) can get a 500, and uploading a blob that is there is harmless.
    async fn blob_present(&self, target: &ImageRef, digest: &Digest, what: &str) -> Result<bool, RegistryError> {
        const ATTEMPTS: u32 = 3;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let e = match self.client.blob_exists(&target.to_oci_client(), digest.as_str()).await {
                Ok(exists) => return Ok(exists),
                Err(e) => e,
            };
            let transient = match status_of(&e) {
                Some(code) => transient_status(code),
                None => matches!(e, OciDistributionError::RequestError(_)),
            };
            if !transient {
                return Err(self.error(target, "push", what, e));
            }
            let why = root_cause(&e);
            if attempt >= ATTEMPTS {
                tracing::warn!("asking whether {what} exists: {why} ({attempt} times); uploading it");
                return Ok(false);
            }
            tracing::debug!("asking whether {what} exists: {why}; asking again");
            tokio::time::sleep(Duration::from_millis(50 << attempt)).await;
        }
    }

    /// Pushes one blob of the layout at `dir` unless `target`'s repository has it: a mount if a
    /// source may hold it, else an upload.
    async fn push_layout_blob(
        &self,
        target: &ImageRef,
        dir: &Path,
        blob: &Descriptor,
        sources: &[ImageRef],
        auth: &Option<HeaderValue>,
    ) -> Result<Pushed, RegistryError> {
        let what = format!("blob {} in {}", blob.digest, target.name());
        if self.blob_present(target, &blob.digest, &what).await? {
            self.locations.remember(target, &blob.digest);
            return Ok(Pushed::Present);
        }
        let mut failures = 0;
        let mut failed = |why: String| {
            failures += 1;
            tracing::warn!("uploading {what}: {why} (failure {failures} of at most {MAX_FAILURES})");
            if failures >= MAX_FAILURES {
                Err(RegistryError::Protocol {
                    registry: target.registry.clone(),
                    message: format!(
                        "uploading {what} failed {failures} times, the last: {why}; check the connection to the                          registry and push again"
                    ),
                })
            } else {
                Ok(Duration::from_millis(100 << failures))
            }
        };
        // A mount the registry declines opens an upload session (202): the last one is used.
        let mut session = None;
        let candidates = self.locations.sources(target, &blob.digest, sources);
        for (i, from) in candidates.iter().enumerate() {
            let started = match self.start_upload(target, auth, Some((&blob.digest, from)), &what).await {
                Ok(started) => started,
                Err(Failure::Fatal(e)) => return Err(e),
                // Mounts are an optimisation: on to a plain upload.
                Err(Failure::Retry(why)) => {
                    failed(why)?;
                    break;
                }
            };
            match started {
                Started::Mounted => {
                    tracing::debug!("mounted {what} from {from}");
                    self.locations.remember(target, &blob.digest);
                    return Ok(Pushed::Mounted);
                }
                Started::Session(url) if i + 1 == candidates.len() => session = Some(url),
                Started::Session(url) => {
                    let _ = self.request(reqwest::Method::DELETE, url, target, auth).send().await;
                }
            }
        }
        let mut url = match session {
            Some(url) => url,
            None => loop {
                match self.start_upload(target, auth, None, &what).await {
                    Ok(Started::Session(url)) => break url,
                    Ok(Started::Mounted) => unreachable!("a plain upload is never answered with a mount"),
                    Err(Failure::Fatal(e)) => return Err(e),
                    Err(Failure::Retry(why)) => tokio::time::sleep(failed(why)?).await,
                }
            },
        };
        let path = blob_path(dir, &blob.digest);
        let (mut offset, mut resumed, mut restarted) = (0, 0, 0);
        loop {
            let step = match next_chunk(offset, blob.size, self.chunk) {
                Some(range) => self.patch(target, auth, &url, &path, &range, &what).await.map(|next| {
                    offset = range.end;
                    Some(next)
                }),
                None => self.commit(target, auth, &url, &blob.digest, &what).await.map(|()| None),
            };
            let why = match step {
                Ok(Some(next)) => {
                    url = next;
                    continue;
                }
                Ok(None) => break,
                Err(Failure::Fatal(e)) => return Err(e),
                Err(Failure::Retry(why)) => why,
            };
            let backoff = failed(why)?;
            // A commit whose answer was lost may have stored the blob.
            if offset == blob.size && self.blob_present(target, &blob.digest, &what).await.unwrap_or(false) {
                break;
            }
            let status = self.upload_status(target, auth, &url).await;
            match after_failure(status.as_ref().map(|s| s.0), offset, blob.size) {
                Next::Resume(at) => {
                    tracing::info!("uploading {what}: resuming at byte {at} of {}", blob.size);
                    offset = at;
                    url = status.map(|s| s.1).unwrap_or(url);
                    resumed += 1;
                }
                Next::Restart => {
                    tracing::info!("uploading {what}: the registry no longer has the upload; sending it again");
                    tokio::time::sleep(backoff).await;
                    url = loop {
                        match self.start_upload(target, auth, None, &what).await {
                            Ok(Started::Session(url)) => break url,
                            Ok(Started::Mounted) => unreachable!("a plain upload is never answered with a mount"),
                            Err(Failure::Fatal(e)) => return Err(e),
                            Err(Failure::Retry(why)) => tokio::time::sleep(failed(why)?).await,
                        }
                    };
                    offset = 0;
                    restarted += 1;
                }
            }
        }
        self.locations.remember(target, &blob.digest);
        Ok(Pushed::Uploaded { size: blob.size, resumed, restarted })
    }

    /// PUTs a manifest or index under `target` (its digest if it has one, else its tag).
    async fn put_manifest(&self, target: &ImageRef, body: Vec<u8>, media_type: &str) -> Result<(), RegistryError> {
        // A registry may answer MANIFEST_BLOB_UNKNOWN for a blob that is there: distribution 2.8's
        // filesystem storage rewrites a repository's blob link in place, so a manifest checked
        // while another push of the same blob (another build's) rewrites it sees an empty link.
        // That passes in moments; a blob really missing fails every try.
        let mut pause = std::time::Duration::from_millis(50);
        for _ in 0..3 {
            match self.put_manifest_once(target, body.clone(), media_type).await {
                Err(RegistryError::Protocol { message, .. }) if message.contains("MANIFEST_BLOB_UNKNOWN") => {
                    tokio::time::sleep(pause).await;
                    pause *= 4;
                }
                other => return other,
            }
        }
        self.put_manifest_once(target, body, media_type).await
    }

    async fn put_manifest_once(&self, target: &ImageRef, body: Vec<u8>, media_type: &str) -> Result<(), RegistryError> {
        let content_type =
            media_type.parse().map_err(|_| RegistryError::Usage(format!("invalid media type {media_type:?}")))?;
        let reference = target.to_oci_client();
        let put = AssertUnwindSafe(self.client.push_manifest_raw(&reference, body, content_type)).catch_unwind().await;
        match put {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(self.error(target, "push", &target.to_string(), e)),
            // oci-client 0.18 panics after a *successful* PUT by digest when the registry answers
            // without a Location header (as ECR does): it looks for the tag at the end of the URL.
            // The manifest is stored then; make sure of it.
            Err(_) => match &target.digest {
                Some(d) if self.has_manifest(target, d).await? => Ok(()),
                _ => Err(RegistryError::Protocol {
                    registry: target.registry.clone(),
                    message: format!("pushing the manifest {target} failed: the registry answered without a Location"),
                }),
            },
        }
    }

    /// Pushes an index (bytes from [`crate::oci::image_index`]) under each tag in `tags` (all in one
    /// repository; a reference without a tag means `latest`), with media type [`OCI_INDEX`].
    /// Returns the index's digest.
    pub async fn push_index(&self, index: &[u8], tags: &[ImageRef]) -> Result<Digest, RegistryError> {
        let first = tags.first().ok_or_else(|| RegistryError::Usage("no tag to push the image index under".into()))?;
        let mut targets: Vec<ImageRef> = Vec::new();
        for t in tags {
            if !t.same_repository(first) {
                return Err(RegistryError::Usage(format!(
                    "the tags of one image index must be in one repository: {} and {} are not",
                    first.name(),
                    t.name()
                )));
            }
            if t.tag.is_none() && t.digest.is_some() {
                return Err(RegistryError::Usage(format!(
                    "{t} names a digest, not a tag to push the image index under"
                )));
            }
            let target = t.with_tag(t.tag.as_deref().unwrap_or("latest"));
            if !targets.contains(&target) {
                targets.push(target);
            }
        }
        self.authorize(first, RegistryOperation::Push).await?;
        for target in &targets {
            self.put_manifest(target, index.to_vec(), OCI_INDEX).await?;
        }
        Ok(Digest::of(index))
    }

    /// Uploads `bytes` as a blob of `repo` unless the registry already has it; returns its digest.
    pub async fn push_blob(&self, repo: &ImageRef, bytes: &[u8]) -> Result<Digest, RegistryError> {
        let digest = Digest::of(bytes);
        let target = repo.with_digest(&digest);
        let reference = target.to_oci_client();
        self.authorize(&target, RegistryOperation::Push).await?;
        let what = format!("blob {digest} in {}", repo.name());
        let exists = self
            .client
            .blob_exists(&reference, digest.as_str())
            .await
            .map_err(|e| self.error(&target, "push", &what, e))?;
        if !exists {
            self.client
                .push_blob(&reference, bytes.to_vec(), digest.as_str())
                .await
                .map_err(|e| self.error(&target, "push", &what, e))?;
        }
        Ok(digest)
    }

    /// PUTs a manifest of `media_type` under `target` (its tag, or its digest); its blobs must be
    /// in the repository already. Returns the manifest's digest.
    pub async fn push_manifest(
        &self,
        target: &ImageRef,
        body: &[u8],
        media_type: &str,
    ) -> Result<Digest, RegistryError> {
        self.authorize(target, RegistryOperation::Push).await?;
        self.put_manifest(target, body.to_vec(), media_type).await?;
        Ok(Digest::of(body))
    }

    /// Pushes a build's provenance to `repo` (see [`crate::provenance::stitch`]): the blobs it
    /// lacks, the attestation manifests and the referrer artifacts by digest; then, unless the
    /// registry's referrers API (`GET /v2/<name>/referrers/<digest>`) lists the artifact already,
    /// each platform manifest's `sha256-<hex>` fallback tag: the index found there with the
    /// artifact added.
    pub async fn push_provenance(&self, repo: &ImageRef, published: &Published) -> Result<(), RegistryError> {
        if published.manifests.is_empty() && published.referrers.is_empty() {
            return Ok(());
        }
        self.authorize(repo, RegistryOperation::Push).await?;
        let reference = repo.to_oci_client();
        for blob in &published.blobs {
            let digest = blob.digest();
            let what = format!("blob {digest} in {}", repo.name());
            let exists = self
                .client
                .blob_exists(&reference, digest.as_str())
                .await
                .map_err(|e| self.error(repo, "push", &what, e))?;
            if !exists {
                self.client
                    .push_blob(&reference, blob.bytes.clone(), digest.as_str())
                    .await
                    .map_err(|e| self.error(repo, "push", &what, e))?;
            }
        }
        for m in published.manifests.iter().chain(published.referrers.iter().map(|(_, m)| m)) {
            self.put_manifest(&repo.with_digest(&m.digest()), m.bytes.clone(), &m.media_type).await?;
        }
        for (subject, artifact) in &published.referrers {
            // The fallback tag is read, changed and written back: builds of this process whose
            // platform manifests are the same (a reproducible or cached result) take turns, or
            // one would overwrite the other's referrer (and distribution answers 500 to
            // concurrent writes of one tag).
            let turn = fallback_tag_turn(&format!("{}/{}@{subject}", repo.registry, repo.repository));
            let _turn = turn.lock().await;
            // A registry with the referrers API lists the artifact already (it read its subject);
            // so does a fallback tag that lists it.
            let artifact_digest = artifact.digest().as_str().to_owned();
            if self.referrers_api(repo, subject).await.is_some_and(|listed| listed.contains(&artifact_digest)) {
                continue;
            }
            let tag = repo.with_tag(&provenance::fallback_tag(subject));
            let existing = match self.fetch_manifest(&tag).await {
                Ok((bytes, _, _)) => Some(bytes),
                Err(RegistryError::NotFound { .. }) => None,
                Err(e) => return Err(e),
            };
            if existing.as_deref().is_some_and(|index| {
                parse_index(index).is_ok_and(|listed| listed.iter().any(|d| d.digest.as_str() == artifact_digest))
            }) {
                continue;
            }
            let index = provenance::referrers_index(existing.as_deref(), artifact);
            self.put_manifest(&tag, index, OCI_INDEX).await?;
        }
        Ok(())
    }

    /// The digests of `repo@subject`'s referrers as the registry's referrers API
    /// (`GET /v2/<name>/referrers/<digest>`) lists them; `None` if it has no such API (a 404,
    /// remembered for this registry) or did not answer.
    async fn referrers_api(&self, repo: &ImageRef, subject: &Digest) -> Option<Vec<String>> {
        let host = self.base_url(repo);
        if self.no_referrers_api.lock().expect("not poisoned").contains(&host) {
            return None;
        }
        let url = reqwest::Url::parse(&format!("{host}/v2/{}/referrers/{subject}", repo.repository)).ok()?;
        let auth = self.upload_auth(repo).await.ok()?;
        let r = self
            .request(reqwest::Method::GET, url, repo, &auth)
            .header(reqwest::header::ACCEPT, OCI_INDEX)
            .send()
            .await
            .ok()?;
        if r.status() == reqwest::StatusCode::NOT_FOUND {
            self.no_referrers_api.lock().expect("not poisoned").insert(host);
            return None;
        }
        if !r.status().is_success() {
            return None;
        }
        let body = r.bytes().await.ok()?;
        Some(parse_index(&body).ok()?.into_iter().map(|d| d.digest.as_str().to_owned()).collect())
    }

    /// Whether `repo@digest` exists (HEAD on the manifest).
    pub async fn has_manifest(&self, repo: &ImageRef, digest: &Digest) -> Result<bool, RegistryError> {
        let target = repo.with_digest(digest);
        match self.client.fetch_manifest_digest(&target.to_oci_client(), &self.auth).await {
            Ok(_) => Ok(true),
            Err(e) => match self.error(&target, "pull", &target.to_string(), e) {
                RegistryError::NotFound { .. } => Ok(false),
                other => Err(other),
            },
        }
    }

    /// GETs a manifest or index by tag or digest: its bytes, media type (as it declares it) and digest.
    pub async fn fetch_manifest(&self, r: &ImageRef) -> Result<(Vec<u8>, String, Digest), RegistryError> {
        let accepted = [OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST];
        let (bytes, _) = self
            .client
            .pull_manifest_raw(&r.to_oci_client(), &self.auth, &accepted)
            .await
            .map_err(|e| self.error(r, "pull", &r.to_string(), e))?;
        let digest = Digest::of(&bytes);
        if r.digest.as_ref().is_some_and(|want| *want != digest) {
            return Err(RegistryError::Protocol {
                registry: r.registry.clone(),
                message: format!("{r} answered with content whose digest is {digest}"),
            });
        }
        Ok((bytes.to_vec(), declared_media_type(&bytes), digest))
    }

    /// GETs the blob `d` of `repo`, checked against its digest.
    pub async fn fetch_blob(&self, repo: &ImageRef, d: &Digest) -> Result<Vec<u8>, RegistryError> {
        let target = repo.with_digest(d);
        self.offer_auth(&target).await;
        let mut out = Vec::new();
        self.client
            .pull_blob(&target.to_oci_client(), d.as_str(), &mut out)
            .await
            .map_err(|e| self.error(&target, "pull", &format!("blob {d} in {}", repo.name()), e))?;
        self.locations.remember(repo, d);
        Ok(out)
    }
}

/// How one blob got to the registry.
enum Pushed {
    Present,
    Mounted,
    Uploaded { size: u64, resumed: u32, restarted: u32 },
}

/// How an upload request answered, when not as hoped.
enum Failure {
    /// The connection failed or the registry answered 5xx, 408, 416 or 429: worth another try.
    Retry(String),
    Fatal(RegistryError),
}

/// How an upload began.
enum Started {
    Mounted,
    Session(reqwest::Url),
}

/// The lock that orders this process's updates of one `sha256-<hex>` fallback tag (keyed by
/// registry, repository and subject); kept only while someone holds or waits for it.
fn fallback_tag_turn(key: &str) -> std::sync::Arc<tokio::sync::Mutex<()>> {
    use std::sync::{Arc, Mutex, Weak};
    static TURNS: std::sync::LazyLock<Mutex<HashMap<String, Weak<tokio::sync::Mutex<()>>>>> =
        std::sync::LazyLock::new(Default::default);
    let mut turns = TURNS.lock().unwrap_or_else(|e| e.into_inner());
    turns.retain(|_, w| w.strong_count() > 0);
    if let Some(turn) = turns.get(key).and_then(Weak::upgrade) {
        return turn;
    }
    let turn = Arc::new(tokio::sync::Mutex::new(()));
    turns.insert(key.to_string(), Arc::downgrade(&turn));
    turn
}

#[cfg(test)]
mod tests {
    use std::io::{Read as _, Write as _};
    use std::net::{TcpListener, TcpStream};
    use std::process::{Child, Command, Stdio};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Instant;

    use super::*;
    use crate::oci::{config_platform, image_index, read_layout, OciPlatform};
    use crate::platform::Platform;
    use crate::provenance;

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    #[test]
    fn an_auth_file_holds_one_registry() {
        let c = Credentials { username: "u".into(), password: "p:w".into() };
        let text = auth_file("reg.lan:5000", &c);
        assert_eq!(docker_config_credentials(&text, "reg.lan:5000").unwrap(), Some(c));
        assert_eq!(text, format!("{{\"auths\":{{\"reg.lan:5000\":{{\"auth\":\"{}\"}}}}}}", b64("u:p:w")));
    }

    fn creds(u: &str, p: &str) -> Option<Credentials> {
        Some(Credentials { username: u.into(), password: p.into() })
    }

    #[test]
    fn docker_config_credentials_cases() {
        let auth = b64("bob:s3cr:et");
        let config = format!(
            r#"{{"auths":{{
                "reg.lan:5000":{{"auth":"{auth}"}},
                "https://other.lan/v2/":{{"username":"alice","password":"pw"}},
                "http://plain.lan:80":{{"auth":"{plain}"}},
                "https://index.docker.io/v1/":{{"auth":"{hub}"}},
                "helper.lan":{{}},
                "empty.lan":{{"auth":""}}
              }},
              "credsStore":"desktop"}}"#,
            plain = b64("p:q"),
            hub = b64("hubuser:hubpw"),
        );
        let get = |r: &str| docker_config_credentials(&config, r).unwrap();
        assert_eq!(get("reg.lan:5000"), creds("bob", "s3cr:et"));
        assert_eq!(get("REG.lan:5000"), creds("bob", "s3cr:et"));
        assert_eq!(get("other.lan"), creds("alice", "pw"));
        assert_eq!(get("plain.lan:80"), creds("p", "q"));
        assert_eq!(get("docker.io"), creds("hubuser", "hubpw"));
        assert_eq!(get("reg.lan"), None, "the port is part of the key");
        assert_eq!(get("missing.lan"), None);
        assert_eq!(get("helper.lan"), None, "credential helpers are not supported");
        assert_eq!(get("empty.lan"), None);
        assert_eq!(docker_config_credentials("{}", "reg.lan").unwrap(), None);

        // An exact key wins over a normalised one.
        let both = format!(
            r#"{{"auths":{{"https://reg.lan/v1/":{{"auth":"{}"}},"reg.lan":{{"auth":"{}"}}}}}}"#,
            b64("a:1"),
            b64("b:2")
        );
        assert_eq!(docker_config_credentials(&both, "reg.lan").unwrap(), creds("b", "2"));

        let secret = "c2VjcmV0!!notbase64";
        let broken = format!(r#"{{"auths":{{"reg.lan:5000":{{"auth":"{secret}"}}}}}}"#);
        let err = docker_config_credentials(&broken, "reg.lan:5000").unwrap_err().to_string();
        assert_eq!(err, r#"docker config.json: auths["reg.lan:5000"].auth is not valid base64"#);
        let no_colon = format!(r#"{{"auths":{{"r.lan":{{"auth":"{}"}}}}}}"#, b64("justapassword"));
        let err = docker_config_credentials(&no_colon, "r.lan").unwrap_err().to_string();
        assert!(err.contains(r#"auths["r.lan"].auth does not decode to "username:password""#), "{err}");
        assert!(!err.contains("justapassword"));
        let err = docker_config_credentials(r#"{"auths":{"r.lan":{"auth":12345}}}"#, "r.lan").unwrap_err();
        assert!(err.to_string().ends_with("auths[\"r.lan\"].auth is not a string"), "{err}");
        let err = docker_config_credentials("{\"auths\":", "r.lan").unwrap_err().to_string();
        assert!(err.starts_with("docker config.json: invalid JSON"), "{err}");

        // Read from a file, errors name the file; an absent file is no credentials.
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("config.json");
        assert_eq!(credentials_from_file(&path, "reg.lan:5000").unwrap(), None);
        std::fs::write(&path, &config).unwrap();
        assert_eq!(credentials_from_file(&path, "reg.lan:5000").unwrap(), creds("bob", "s3cr:et"));
        std::fs::write(&path, &broken).unwrap();
        let err = credentials_from_file(&path, "reg.lan:5000").unwrap_err().to_string();
        assert_eq!(err, format!(r#"{}: auths["reg.lan:5000"].auth is not valid base64"#, path.display()));
        assert!(!err.contains(secret));
    }

    #[test]
    fn credentials_never_show_the_password() {
        let c = Credentials { username: "bob".into(), password: "hunter2".into() };
        assert_eq!(c.to_string(), "bob:<redacted>");
        assert_eq!(format!("{c:?}"), r#"Credentials { username: "bob", password: "<redacted>" }"#);
        let r = Registry::new(&[], Some(c));
        assert!(!format!("{r:?}").contains("hunter2"));
    }

    #[test]
    fn the_pool_reuses_a_client_per_credentials_and_never_mixes_them() {
        let pool = RegistryPool::default();
        let a = pool.get(&["r:1".into(), "q:2".into()], None);
        let _ = pool.get(&["q:2".into(), "r:1".into(), "r:1".into()], None);
        assert_eq!(pool.len(), 1, "the same settings in another order are the same client");
        let bob = pool.get(&[], creds("bob", "pw").as_ref());
        assert_eq!(bob.user.as_deref(), Some("bob"));
        let _ = pool.get(&[], creds("bob", "other").as_ref());
        let _ = pool.get(&[], creds("eve", "pw").as_ref());
        assert_eq!(pool.len(), 4, "another password or user is another client");
        assert!(a.user.is_none());
        for i in 0..RegistryPool::CAPACITY {
            let _ = pool.get(&[format!("r{i}:5000")], None);
        }
        assert!(pool.len() <= RegistryPool::CAPACITY, "the pool is bounded");
    }

    #[test]
    fn errors_name_the_registry_and_the_fix() {
        let target: ImageRef = "reg.lan:5000/app:1".parse().unwrap();
        let unauthorized = || OciDistributionError::UnauthorizedError { url: "https://reg.lan:5000/v2/app".into() };
        let with_user = Registry::new(&[], creds("bob", "hunter2"));
        let err = with_user.error(&target, "push", "x", unauthorized()).to_string();
        assert_eq!(
            err,
            r#"registry reg.lan:5000 refused the credentials for user "bob": check ~/.docker/config.json or run docker login"#
        );
        let anonymous = Registry::new(&[], None);
        assert_eq!(
            anonymous.error(&target, "push", "x", unauthorized()).to_string(),
            "registry reg.lan:5000 requires credentials and none were found for it: \
             add them to ~/.docker/config.json (docker login reg.lan:5000)"
        );
        let denied = OciDistributionError::ServerError { code: 403, url: "u".into(), message: "denied".into() };
        assert_eq!(
            with_user.error(&target, "push", "x", denied).to_string(),
            r#"registry reg.lan:5000 denied push access to app for user "bob": check that the account may push there"#
        );
        let missing = OciDistributionError::ServerError { code: 404, url: "u".into(), message: String::new() };
        assert_eq!(
            anonymous.error(&target, "pull", "reg.lan:5000/app:1", missing).to_string(),
            "reg.lan:5000/app:1 not found"
        );
    }

    /// A docker-registry on a free loopback port, killed on drop.
    struct TestRegistry {
        child: Child,
        addr: String,
        _dir: tempfile::TempDir,
    }

    impl TestRegistry {
        fn start() -> TestRegistry {
            let dir = tempfile::tempdir().unwrap();
            let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            let addr = format!("127.0.0.1:{port}");
            let config = dir.path().join("config.yml");
            std::fs::write(
                &config,
                format!(
                    "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  \
                     delete:\n    enabled: true\nhttp:\n  addr: {addr}\n",
                    dir.path().join("data").display()
                ),
            )
            .unwrap();
            let log = std::fs::File::create(dir.path().join("registry.log")).unwrap();
            let child = Command::new("docker-registry")
                .arg("serve")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| {
                    panic!("cannot start docker-registry ({e}): this test needs Debian's docker-registry package")
                });
            let mut registry = TestRegistry { child, addr, _dir: dir };
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if matches!(http_get(&registry.addr, "/v2/"), Some((200, _))) {
                    return registry;
                }
                if let Ok(Some(status)) = registry.child.try_wait() {
                    let log = std::fs::read_to_string(registry._dir.path().join("registry.log")).unwrap_or_default();
                    panic!("docker-registry exited ({status}):\n{log}");
                }
                assert!(Instant::now() < deadline, "docker-registry did not answer on {} within 30s", registry.addr);
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    impl Drop for TestRegistry {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    /// A plain HTTP/1.0 GET on loopback: (status, body), or None if nothing answers.
    fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
        let mut stream = TcpStream::connect(addr).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).ok()?;
        let (head, body) = response.split_once("\r\n\r\n")?;
        let status = head.split(' ').nth(1)?.parse().ok()?;
        Some((status, body.to_owned()))
    }

    fn tags(addr: &str, repository: &str) -> Vec<String> {
        let (status, body) = http_get(addr, &format!("/v2/{repository}/tags/list")).expect("registry answers");
        // docker-registry knows a repository's name only once it has a tag.
        if status == 404 && body.contains("NAME_UNKNOWN") {
            return Vec::new();
        }
        assert_eq!(status, 200, "{body}");
        let value: Value = serde_json::from_str(&body).unwrap();
        let mut tags: Vec<String> = value["tags"]
            .as_array()
            .map(|a| a.iter().map(|t| t.as_str().unwrap().to_owned()).collect())
            .unwrap_or_default();
        tags.sort();
        tags
    }

    /// Runs buildah on a private storage under `t`.
    fn buildah(t: &Path, args: &[&str]) -> String {
        let out = Command::new("buildah")
            .arg("--root")
            .arg(t.join("root"))
            .arg("--runroot")
            .arg(t.join("runroot"))
            .args(["--storage-driver", "vfs"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run buildah ({e}): this test needs buildah installed"));
        assert!(out.status.success(), "buildah {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }

    /// A real one-file linux/arm64 image, exported by buildah as an OCI layout at `t/layout`. The
    /// file is 9 MiB of incompressible bytes, so its layer takes several chunks to upload.
    fn buildah_layout(t: &Path) -> PathBuf {
        let mut x = 0x2545_f491_4f6c_dd1d_u64;
        let noise: Vec<u8> = (0..9 << 20)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect();
        std::fs::write(t.join("somefile"), noise).unwrap();
        let ctr = buildah(t, &["from", "scratch"]);
        buildah(t, &["copy", &ctr, t.join("somefile").to_str().unwrap(), "/somefile"]);
        buildah(t, &["config", "--arch", "arm64", "--os", "linux", &ctr]);
        buildah(t, &["commit", "--quiet", &ctr, "img"]);
        let layout = t.join("layout");
        buildah(t, &["push", "--quiet", "--format", "oci", "img", &format!("oci:{}", layout.display())]);
        buildah(t, &["rm", &ctr]);
        layout
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn push_layouts_by_digest_and_indexes_by_tag() {
        let server = TestRegistry::start();
        let addr = server.addr.clone();
        let t = tempfile::tempdir().unwrap();
        let layout = read_layout(&buildah_layout(t.path())).unwrap();
        assert_eq!(layout.manifest.media_type, OCI_MANIFEST);
        assert_eq!(layout.platform().unwrap().to_string(), "linux/arm64");
        assert_eq!(layout.layers.len(), 1);
        assert!(layout.layers[0].size > 8 << 20, "{:?}", layout.layers[0]);

        let registry = Registry::new(std::slice::from_ref(&addr), None);
        let repo: ImageRef = format!("{addr}/farm/hello").parse().unwrap();
        let blob_bytes = layout.config.size + layout.layers[0].size;

        // By digest: everything uploaded once, nothing the second time, no tag left behind.
        let first = registry.push_layout(&layout, &repo).await.unwrap();
        assert_eq!(first.manifest, layout.manifest);
        assert_eq!((first.blobs_uploaded, first.blobs_skipped, first.bytes_uploaded), (2, 0, blob_bytes));
        assert_eq!((first.blobs_mounted, first.resumed, first.restarted), (0, 0, 0));
        let again = registry.push_layout(&layout, &repo.with_tag("ignored")).await.unwrap();
        assert_eq!(again.manifest, layout.manifest);
        assert_eq!((again.blobs_uploaded, again.blobs_skipped, again.bytes_uploaded), (0, 2, 0));
        assert_eq!(tags(&addr, "farm/hello"), Vec::<String>::new());
        let digest = &layout.manifest.digest;
        assert!(registry.has_manifest(&repo, digest).await.unwrap());
        assert!(!registry.has_manifest(&repo, &Digest::of(b"no such manifest")).await.unwrap());
        let elsewhere: ImageRef = format!("{addr}/farm/other").parse().unwrap();
        assert!(!registry.has_manifest(&elsewhere, digest).await.unwrap());

        // What went up is what comes down.
        let (bytes, media_type, got) = registry.fetch_manifest(&repo.with_digest(digest)).await.unwrap();
        assert_eq!(
            (bytes.as_slice(), media_type.as_str(), &got),
            (layout.manifest_bytes.as_slice(), OCI_MANIFEST, digest)
        );
        let config = registry.fetch_blob(&repo, &layout.config.digest).await.unwrap();
        assert_eq!(config_platform(&config).unwrap().to_string(), "linux/arm64");

        // In many small chunks, by a client that knows nothing of farm/hello: the same bytes.
        let chunked = Registry::new(std::slice::from_ref(&addr), None).with_chunk_size(1 << 20);
        let streamed: ImageRef = format!("{addr}/farm/streamed").parse().unwrap();
        let report = chunked.push_layout(&layout, &streamed).await.unwrap();
        assert_eq!((report.blobs_uploaded, report.blobs_mounted, report.bytes_uploaded), (2, 0, blob_bytes));
        let layer = chunked.fetch_blob(&streamed, &layout.layers[0].digest).await.unwrap();
        assert_eq!(layer, std::fs::read(blob_path(&layout.dir, &layout.layers[0].digest)).unwrap());

        // The first client pushed these blobs to farm/hello: into another repository they are mounted.
        let mounted: ImageRef = format!("{addr}/farm/mounted").parse().unwrap();
        let report = registry.push_layout(&layout, &mounted).await.unwrap();
        assert_eq!((report.blobs_uploaded, report.blobs_mounted, report.bytes_uploaded), (0, 2, 0));
        assert!(registry.has_manifest(&mounted, digest).await.unwrap());
        // A client that knows nothing mounts from the sources it is given, in the same registry.
        let hinted: ImageRef = format!("{addr}/farm/hinted").parse().unwrap();
        let fresh = Registry::new(std::slice::from_ref(&addr), None);
        let sources = [format!("{addr}/farm/nothing-here:1").parse().unwrap(), streamed.clone()];
        let report = fresh.push_layout_from(&layout, &hinted, &sources).await.unwrap();
        assert_eq!((report.blobs_uploaded, report.blobs_mounted), (0, 2), "{report:?}");

        // One index under two tags: identical bytes under each, and no other tag.
        let mut arm64 = first.manifest.clone();
        arm64.platform = Some(OciPlatform::from(&"linux/arm64".parse::<Platform>().unwrap()));
        let mut armv7 = first.manifest.clone();
        armv7.platform = Some(OciPlatform::from(&"linux/arm/v7".parse::<Platform>().unwrap()));
        let descriptors = vec![arm64, armv7];
        let index = image_index(&descriptors);
        let tagged = [repo.with_tag("1.0"), repo.with_tag("latest"), repo.with_tag("1.0")];
        let index_digest = registry.push_index(&index, &tagged).await.unwrap();
        assert_eq!(index_digest, Digest::of(&index));
        for tag in &tagged {
            let (bytes, media_type, got) = registry.fetch_manifest(tag).await.unwrap();
            assert_eq!(bytes, index, "{tag}");
            assert_eq!((media_type.as_str(), &got), (OCI_INDEX, &index_digest), "{tag}");
            assert_eq!(parse_index(&bytes).unwrap(), descriptors);
        }
        assert_eq!(tags(&addr, "farm/hello"), ["1.0", "latest"]);
        assert!(registry.has_manifest(&repo, &index_digest).await.unwrap());

        // Mistakes and failures say what is wrong.
        let err = registry.push_index(&index, &[repo.with_tag("1"), elsewhere.with_tag("1")]).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("the tags of one image index must be in one repository: {addr}/farm/hello and {addr}/farm/other are not")
        );
        assert!(matches!(registry.push_index(&index, &[]).await, Err(RegistryError::Usage(_))));
        let err = registry.fetch_manifest(&repo.with_tag("nope")).await.unwrap_err();
        assert_eq!(err.to_string(), format!("{addr}/farm/hello:nope not found"));
        let err = registry.fetch_blob(&repo, &Digest::of(b"nothing")).await.unwrap_err();
        assert!(matches!(err, RegistryError::NotFound { .. }), "{err}");

        let https = Registry::new(&[], None);
        let err = https.has_manifest(&repo, digest).await.unwrap_err().to_string();
        assert_eq!(
            err,
            format!("registry {addr} answered in plain HTTP, not HTTPS: name it with --insecure-registry {addr}")
        );
        drop(server);
        let err = registry.push_layout(&layout, &repo).await.unwrap_err().to_string();
        assert_eq!(err, format!("registry {addr} unreachable: connection refused (is it running?)"));
    }

    /// Incompressible bytes from a seed.
    fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    /// An OCI layout at `dir` of a linux/amd64 image with `layers` (uncompressed tar media type).
    fn tiny_layout(dir: &Path, layers: &[Vec<u8>]) -> Layout {
        let blobs = dir.join("blobs").join("sha256");
        std::fs::create_dir_all(&blobs).unwrap();
        let put = |bytes: &[u8]| {
            let d = Digest::of(bytes);
            std::fs::write(blobs.join(d.hex()), bytes).unwrap();
            serde_json::json!({"digest": d.as_str(), "size": bytes.len()})
        };
        let descs: Vec<Value> = layers
            .iter()
            .map(|l| {
                let mut d = put(l);
                d["mediaType"] = "application/vnd.oci.image.layer.v1.tar".into();
                d
            })
            .collect();
        let diff_ids: Vec<Value> = descs.iter().map(|d| d["digest"].clone()).collect();
        let config = serde_json::json!({"architecture": "amd64", "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": diff_ids}});
        let mut config = put(config.to_string().as_bytes());
        config["mediaType"] = "application/vnd.oci.image.config.v1+json".into();
        let manifest =
            serde_json::json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config, "layers": descs});
        let mut manifest = put(manifest.to_string().as_bytes());
        manifest["mediaType"] = OCI_MANIFEST.into();
        let index = serde_json::json!({"schemaVersion": 2, "manifests": [manifest]});
        std::fs::write(dir.join("index.json"), index.to_string()).unwrap();
        std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        read_layout(dir).unwrap()
    }

    /// A TCP proxy to `upstream` that cuts, once, the connection carrying the PATCH whose headers
    /// contain `trigger`: after `forward` bytes from the start of that request's body, or (None)
    /// before any byte of that request reaches the registry. Counts the cuts.
    fn cutting_proxy(upstream: String, trigger: &'static [u8], forward: Option<usize>) -> (String, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let cuts = Arc::new(AtomicUsize::new(0));
        let counter = cuts.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(mut client) = client else { return };
                let Ok(mut server) = TcpStream::connect(&upstream) else { return };
                let (mut client_r, mut server_w) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut server, &mut client);
                });
                let counter = counter.clone();
                std::thread::spawn(move || {
                    let find = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).position(|w| w == needle);
                    let mut buf = vec![0; 64 << 10];
                    // Bytes still to forward before the cut, once triggered.
                    let mut left: Option<usize> = None;
                    loop {
                        let n = match client_r.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        let data = &buf[..n];
                        let mut upto = n;
                        if left.is_none() && counter.load(Ordering::SeqCst) == 0 {
                            if let Some(at) = find(data, trigger) {
                                let start = data[..at].windows(6).rposition(|w| w == b"PATCH ").unwrap_or(0);
                                let body = find(&data[at..], b"\r\n\r\n").map(|e| at + e + 4).unwrap_or(n);
                                counter.fetch_add(1, Ordering::SeqCst);
                                left = Some(match forward {
                                    None => 0,
                                    Some(f) => body - start + f,
                                });
                                upto = start;
                                let _ = server_w.write_all(&data[..start]);
                                let rest = &data[start..];
                                let l = left.as_mut().unwrap();
                                let now = rest.len().min(*l);
                                let _ = server_w.write_all(&rest[..now]);
                                *l -= now;
                            }
                        } else if let Some(l) = left.as_mut() {
                            let now = n.min(*l);
                            let _ = server_w.write_all(&data[..now]);
                            *l -= now;
                            upto = 0;
                        }
                        if left == Some(0) {
                            let _ = server_w.shutdown(std::net::Shutdown::Both);
                            let _ = client_r.shutdown(std::net::Shutdown::Both);
                            return;
                        }
                        if left.is_none() && server_w.write_all(&data[..upto]).is_err() {
                            break;
                        }
                    }
                    let _ = server_w.shutdown(std::net::Shutdown::Write);
                });
            }
        });
        (addr, cuts)
    }

    /// A dropped connection in the middle of an upload: the push still completes, with the right
    /// blob. Cut before a PATCH reached the registry, the upload resumes where the registry got
    /// to; cut in the middle of a PATCH's body, distribution 2.8 has stored part of it and refuses
    /// the upload from then on (its URL is signed with the old offset), so it is sent again.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_dropped_upload_resumes_or_starts_over_and_the_blob_is_right() {
        let server = TestRegistry::start();
        let t = tempfile::tempdir().unwrap();
        let layer = noise(5 << 20, 7);
        let layout = tiny_layout(t.path(), std::slice::from_ref(&layer));
        let digest = layout.layers[0].digest.clone();
        // The third 1 MiB chunk of the layer.
        let trigger: &[u8] = b"ange: 2097152-3145727\r\n";
        for (forward, repository, resumed, restarted) in
            [(None, "farm/resumed", 1, 0), (Some(100 << 10), "farm/restarted", 0, 1)]
        {
            let (proxy, cuts) = cutting_proxy(server.addr.clone(), trigger, forward);
            let registry = Registry::new(std::slice::from_ref(&proxy), None).with_chunk_size(1 << 20);
            let repo: ImageRef = format!("{proxy}/{repository}").parse().unwrap();
            let report = registry.push_layout(&layout, &repo).await.unwrap();
            assert_eq!(cuts.load(Ordering::SeqCst), 1, "{repository}: the proxy cut one connection");
            assert_eq!(
                (report.blobs_uploaded, report.resumed, report.restarted),
                (2, resumed, restarted),
                "{repository}"
            );
            let direct = Registry::new(std::slice::from_ref(&server.addr), None);
            let at_registry: ImageRef = format!("{}/{repository}", server.addr).parse().unwrap();
            let got = direct.fetch_blob(&at_registry, &digest).await.unwrap();
            assert_eq!(Digest::of(&got), digest, "{repository}");
            assert!(got == layer, "{repository}: the stored layer is the layer");
            assert!(direct.has_manifest(&at_registry, &layout.manifest.digest).await.unwrap(), "{repository}");
        }
    }

    /// A proxy to `upstream` that answers the first `fail` `HEAD …/blobs/…` requests with a 500
    /// itself, as distribution 2.8 does when the HEAD meets another push of the same blob, and
    /// forwards every other request on a connection of its own. Counts the 500s it gave.
    fn flaky_head_proxy(upstream: String, fail: usize) -> (String, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let failed = Arc::new(AtomicUsize::new(0));
        let counter = failed.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(mut client) = client else { return };
                let (upstream, counter) = (upstream.clone(), counter.clone());
                std::thread::spawn(move || loop {
                    // One request: its head, then as many body bytes as it declares.
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        match client.read(&mut byte) {
                            Ok(1) => head.push(byte[0]),
                            _ => return,
                        }
                    }
                    let text = String::from_utf8_lossy(&head).to_string();
                    let length = text
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_owned())
                        })
                        .and_then(|v| v.parse::<usize>().ok())
                        .unwrap_or(0);
                    let mut body = vec![0; length];
                    if client.read_exact(&mut body).is_err() {
                        return;
                    }
                    if text.starts_with("HEAD ")
                        && text.lines().next().unwrap_or("").contains("/blobs/sha256:")
                        && counter.fetch_add(1, Ordering::SeqCst) < fail
                    {
                        let answer = "HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n";
                        if client.write_all(answer.as_bytes()).is_err() {
                            return;
                        }
                        continue;
                    }
                    // Forward on a fresh connection the registry closes after its answer.
                    let head = text.replacen("\r\n", "\r\nConnection: close\r\n", 1);
                    let Ok(mut server) = TcpStream::connect(&upstream) else { return };
                    if server.write_all(head.as_bytes()).and_then(|()| server.write_all(&body)).is_err() {
                        return;
                    }
                    let _ = std::io::copy(&mut server, &mut client);
                    return;
                });
            }
        });
        (addr, failed)
    }

    /// A registry that answers 500 to "do you have this blob?" (distribution 2.8 does while
    /// another build pushes the same blob): the push asks again and completes, and the layer at
    /// the registry is the layer.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_500_to_a_blob_check_is_asked_again_and_the_push_completes() {
        let server = TestRegistry::start();
        let t = tempfile::tempdir().unwrap();
        let layer = noise(64 << 10, 3);
        let layout = tiny_layout(t.path(), std::slice::from_ref(&layer));
        let (proxy, failed) = flaky_head_proxy(server.addr.clone(), 2);
        let registry = Registry::new(std::slice::from_ref(&proxy), None);
        let repo: ImageRef = format!("{proxy}/farm/flaky").parse().unwrap();
        let report = registry.push_layout(&layout, &repo).await.expect("the push completes despite two 500s");
        assert!(failed.load(Ordering::SeqCst) > 2, "the proxy answered 500 twice, then forwarded");
        assert_eq!(report.blobs_uploaded, 2, "the layer and the config");
        let direct = Registry::new(std::slice::from_ref(&server.addr), None);
        let at_registry: ImageRef = format!("{}/farm/flaky", server.addr).parse().unwrap();
        let got = direct.fetch_blob(&at_registry, &layout.layers[0].digest).await.unwrap();
        assert!(got == layer, "the stored layer is the layer");
        assert!(direct.has_manifest(&at_registry, &layout.manifest.digest).await.unwrap());
    }

    /// Two builds' provenance for one platform manifest (a reproducible or cached result): the
    /// `sha256-<hex>` fallback tag lists both artifacts, once each, however often either is
    /// pushed; after distribution's first 404 the referrers API is not asked again.
    #[tokio::test(flavor = "multi_thread")]
    async fn provenance_of_one_subject_accumulates_in_its_fallback_tag_once_per_artifact() {
        let server = TestRegistry::start();
        let t = tempfile::tempdir().unwrap();
        let layout = tiny_layout(t.path(), &[noise(1 << 10, 5)]);
        let registry = Registry::new(std::slice::from_ref(&server.addr), None);
        let repo: ImageRef = format!("{}/farm/reproducible", server.addr).parse().unwrap();
        registry.push_layout(&layout, &repo).await.unwrap();
        let subject = Descriptor::new(OCI_MANIFEST, layout.manifest.digest.clone(), layout.manifest.size);
        let platform: crate::platform::Platform = "linux/amd64".parse().unwrap();
        let published = |statement: &str| {
            let attestation =
                provenance::Attestation { subject: subject.clone(), statement: statement.as_bytes().to_vec() };
            provenance::stitch(&[(platform.clone(), subject.clone())], &[], &[attestation])
        };
        let (first, second) = (published(r#"{"build":1}"#), published(r#"{"build":2}"#));
        for p in [&first, &second, &first, &second] {
            registry.push_provenance(&repo, p).await.unwrap();
        }
        assert!(registry.no_referrers_api.lock().unwrap().contains(&format!("http://{}", server.addr)));
        let tag = repo.with_tag(&provenance::fallback_tag(&subject.digest));
        let (bytes, _, _) = registry.fetch_manifest(&tag).await.unwrap();
        let listed: Vec<Digest> = parse_index(&bytes).unwrap().into_iter().map(|d| d.digest).collect();
        let artifacts: Vec<Digest> = [&first, &second].iter().map(|p| p.referrers[0].1.digest()).collect();
        assert_eq!(listed, artifacts, "each build's artifact, once, in the order pushed");
    }
}
