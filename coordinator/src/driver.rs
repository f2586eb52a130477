//! The one task that owns the coordinator's state. Connection tasks send it [`Event`]s; it feeds
//! them to the pure [`Core`] with the current time, **commits what changed to the store**, and
//! only then answers the requests that caused the changes and carries out the rest of what the
//! core asks: events to the clients following a build, index pushes to registries, revocations.
//! Being the only owner, it needs no locks and sees events in one order.
//!
//! Commits are pipelined: the fsync runs on a blocking thread while the driver goes on handling
//! events; changes made meanwhile wait and go to disk together in the next commit (group commit),
//! and what waits on a commit is released in order when it completes. Messages to agents
//! (assignments, cancellations) do not wait: like a Raft leader that sends entries while it
//! writes them to its own disk, the coordinator may tell an agent about a change before the
//! change is durable, because every outcome of a crash in between is safe. No client was told
//! (replies wait), so nothing acknowledged is lost; the restarted coordinator does not know the
//! task, so the agent's `Holding` report gets it cancelled and its result is refused; and task
//! ids are never reused across runs ([`Core::start_epoch`]), so such a result cannot be taken for
//! another task's. A cancellation that did not become durable is undone by the same report (the
//! task is requeued). This keeps a durable commit off the path from a task becoming ready to its
//! agent hearing of it.

use std::collections::HashMap;
use std::time::Duration;

use shared::proto::{BuildEvent, BuildView, Request, Response};
use shared::registry::RegistryPool;
use shared::tls::Identity;
use tokio::sync::{mpsc, oneshot};

use crate::core::{Action, BuildState, Core};
use crate::enroll::Security;
use crate::events::{Event, Outbound};
use crate::fleet::ConnId;
use crate::gate::Gate;
use crate::logs::{LogWriter, Logs};
use crate::lookup::{Looked, StoreReader, Then};
use crate::store::{Batch, Store, StoreError};
use shared::tls::{CertAuthority, JoinToken, Role};
use std::sync::Arc;

/// At most this many queued events are handled before their changes are committed together.
const GROUP_COMMIT_EVENTS: usize = 256;
/// How many recent builds the dashboard lists.
const DASHBOARD_BUILDS: usize = 50;

/// What a turn produced that may only happen once the turn's changes are on disk.
#[derive(Default)]
struct AfterCommit {
    replies: Vec<Reply>,
    revoke: Vec<String>,
    actions: Vec<Action>,
}

/// An answer that may only be given once the change it acknowledges is on disk.
enum Reply {
    Submitted(oneshot::Sender<Result<String, String>>, Result<String, String>),
    Response(oneshot::Sender<Response>, Response),
}

pub struct Driver {
    core: Core,
    security: Security,
    /// Signs joiners' certificates; `None` when this coordinator was given no CA key.
    ca: Option<CertAuthority>,
    gate: Arc<Gate>,
    store: Arc<Store>,
    /// The commit under way, and what waits on it.
    committing: Option<tokio::task::JoinHandle<Result<(), StoreError>>>,
    in_flight: AfterCommit,
    /// Changes made since that commit started (the core's, and token and revocation records),
    /// and what waits on them.
    next_batch: Batch,
    next: AfterCommit,
    /// The build logs: written by their own thread, never waited on.
    logs: LogWriter,
    /// Looks builds up in the store on blocking threads (those not in memory, or named by a
    /// prefix); its answers come back on `looked`.
    reader: StoreReader,
    looked: mpsc::UnboundedReceiver<Looked>,
    links: HashMap<ConnId, mpsc::UnboundedSender<Outbound>>,
    followers: HashMap<String, Vec<mpsc::UnboundedSender<BuildEvent>>>,
    events: mpsc::Sender<Event>,
    registries: Arc<RegistryPool>,
    /// The content store: contexts, and the results of builds without tags.
    blobs: Arc<shared::context::BlobStore>,
    metrics: Arc<crate::metrics::Metrics>,
    webhooks: Vec<crate::webhooks::Webhook>,
    notify_secret: Option<String>,
    http: reqwest::Client,
    /// The farm's signing key: signs the indexes of `--sign` builds (every index with `sign`).
    signer: Option<Arc<shared::cosign::SigningKey>>,
    sign_all: bool,
    /// Where the signing key would be (named when a build asks to be signed and there is none).
    ca_dir: std::path::PathBuf,
}

const NO_CA_KEY: &str = "this coordinator cannot enroll peers: its --ca-dir has no ca.key; issue certificates with \
                         `farm ca issue` instead, or give the coordinator the CA key";

fn pem(label: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).expect("base64 is ASCII"));
        out.push('\n');
    }
    out + &format!("-----END {label}-----\n")
}

/// Now, for the core: monotonic (see [`crate::clock`]), so that a stepped wall clock moves no
/// deadline.
pub fn now_ms() -> u64 {
    crate::clock::now_ms()
}

/// A short random build id, unique enough to name builds across restarts.
fn new_build_id() -> String {
    format!("{:012x}", rand::random::<u64>() >> 16)
}

impl Driver {
    /// Loads what a previous run persisted.
    #[allow(clippy::too_many_arguments)] // each is a separate shared resource the coordinator owns
    pub fn new(
        config: &crate::Config,
        store: Store,
        security: Security,
        ca: Option<CertAuthority>,
        gate: Arc<Gate>,
        registries: Arc<RegistryPool>,
        blobs: Arc<shared::context::BlobStore>,
        events: mpsc::Sender<Event>,
        metrics: Arc<crate::metrics::Metrics>,
        signer: Option<shared::cosign::SigningKey>,
    ) -> Result<Self, StoreError> {
        let mut core = Core::new(config.heartbeat_timeout.as_millis() as u64, config.max_attempts)
            .with_limits(crate::core::Limits { context: config.context_limits.wire(), ..config.limits.clone() })
            .with_identity(shared::tls::COORDINATOR_NAME)
            .with_cache_repo(config.cache_repo.clone())
            .with_ended_builds_kept(config.keep_ended_builds);
        let loaded = store.load()?;
        let (builds, tasks) = (loaded.builds.len(), loaded.tasks.len());
        core.recover(now_ms(), loaded);
        core.start_epoch(store.begin_epoch()?);
        if builds > 0 {
            tracing::info!(builds, tasks, "state recovered from {}", store.path().display());
        }
        let dir = config.state_dir.join("logs");
        let logs = LogWriter::spawn(Logs::new(dir.clone(), config.max_log_bytes_per_task))
            .map_err(|source| StoreError::CreateDir { path: dir, source })?;
        let store = Arc::new(store);
        let (reader, looked) = StoreReader::new(store.clone());
        Ok(Self {
            core,
            security,
            ca,
            gate,
            store,
            committing: None,
            in_flight: AfterCommit::default(),
            next_batch: Batch::default(),
            next: AfterCommit::default(),
            logs,
            reader,
            looked,
            links: HashMap::new(),
            followers: HashMap::new(),
            events,
            registries,
            blobs,
            metrics,
            webhooks: config.webhooks.clone(),
            notify_secret: config.notify_secret.clone(),
            http: {
                let _ = rustls::crypto::ring::default_provider().install_default();
                reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap_or_default()
            },
            signer: signer.map(Arc::new),
            sign_all: config.sign,
            ca_dir: config.ca_dir.clone(),
        })
    }

    pub async fn run(mut self, mut events: mpsc::Receiver<Event>) -> Result<(), StoreError> {
        self.step();
        loop {
            let wake = self.core.poll_timeout().map(|d| Duration::from_millis(d.saturating_sub(now_ms())));
            tokio::select! {
                ev = events.recv() => match ev {
                    Some(ev) => {
                        self.handle(ev);
                        // Group commit: what is already queued joins this turn's one commit.
                        for _ in 1..GROUP_COMMIT_EVENTS {
                            match events.try_recv() {
                                Ok(ev) => self.handle(ev),
                                Err(_) => break,
                            }
                        }
                    }
                    None => return Ok(()),
                },
                () = sleep_opt(wake) => self.core.handle_timeout(now_ms()),
                Some(looked) = self.looked.recv() => self.looked(looked),
                done = commit_done(&mut self.committing), if self.committing.is_some() => {
                    self.committing = None;
                    match done {
                        Ok(result) => result?,
                        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                        // The runtime is shutting down.
                        Err(_) => return Ok(()),
                    }
                    let released = std::mem::take(&mut self.in_flight);
                    self.release(released);
                }
            }
            self.step();
        }
    }

    fn handle(&mut self, ev: Event) {
        let now = now_ms();
        match ev {
            Event::AgentUp { name, conn, address, info, certificate, link } => {
                self.links.insert(conn, link);
                let (native, emulated, capacity) = (join(&info.native), join(&info.emulated), info.capacity);
                match self.core.agent_up(now, &name, conn, address.clone(), info) {
                    Ok(()) => {
                        tracing::info!(agent = %name, %address, %native, %emulated, capacity, "agent online");
                        self.core.agent_certificate(&name, certificate);
                    }
                    Err(reason) => tracing::warn!(agent = %name, %address, "agent refused: {reason}"),
                }
            }
            Event::Agent { name, conn, msg } => self.core.agent_msg(now, &name, conn, msg),
            Event::AgentDown { name, conn } => {
                self.links.remove(&conn);
                if self.core.agent_down(now, &name, conn) {
                    tracing::warn!(agent = %name, "agent offline: connection closed");
                }
            }
            // Not a build in memory: the store is asked off this task, and the answer comes back.
            Event::Request { req: Request::GetBuild { build }, reply, .. }
                if self.core.build_state(&build).is_none() =>
            {
                let in_memory =
                    self.in_memory_with_prefix(&build).iter().filter_map(|id| self.core.build_view(id)).collect();
                self.reader.view(build, in_memory, reply);
            }
            Event::Request { peer, req: Request::Cancel { build }, reply }
                if self.core.build_state(&build).is_none() =>
            {
                self.look_up(build, Then::Cancel { peer, reply });
            }
            Event::Request { peer, req, reply } => {
                let resp = match req {
                    Request::Echo(s) => Response::Echo(s),
                    Request::ListAgents => Response::Agents(self.core.agents()),
                    Request::ListBuilds { limit } => Response::Builds(self.core.builds(limit.clamp(1, 1000) as usize)),
                    Request::CreateToken { role, ttl_secs, uses } => {
                        self.create_token(now, &peer, role, ttl_secs, uses)
                    }
                    Request::RevokeToken { id } => match self.security.revoke_token(&id) {
                        Some(record) => {
                            self.next_batch.put_token(&id, &record);
                            tracing::info!(token = %id, by = %peer.name, "join token revoked");
                            Response::Ok
                        }
                        None => Response::Error(format!("no join token {id}")),
                    },
                    Request::Revoke { name } => self.revoke(now, &peer, name),
                    Request::RevokeIdentity { name, force } => {
                        if force || self.known_identity(&name) {
                            self.revoke(now, &peer, name)
                        } else {
                            Response::Error(format!(
                                "no agent or client named {name:?} has ever connected to this farm (`farm agents` \
                                 lists agents); check the name, or revoke it anyway with `farm agents revoke --force {name}`"
                            ))
                        }
                    }
                    // In memory (the guards above took the rest).
                    Request::GetBuild { build } => match self.core.build_view(&build) {
                        Some(view) => Response::Builds(vec![view]),
                        None => Response::Error(format!("no build {build}; `farm builds` lists them")),
                    },
                    Request::Cancel { build } => self.cancel(now, &peer, build),
                    Request::SshForward { build, id } => {
                        if self.core.runs_task_of(&peer.name, &build) {
                            Response::Ok
                        } else {
                            tracing::warn!(agent = %peer.name, %build, %id, "ssh forward refused: the agent runs no task of the build");
                            Response::Error(format!(
                                "agent {} runs no task of build {build}: only the agents building it may use its --ssh",
                                peer.name
                            ))
                        }
                    }
                    other => Response::Error(format!("request {other:?} is not handled here")),
                };
                self.next.replies.push(Reply::Response(reply, resp));
            }
            Event::Submit { peer, spec, bases, source, events, reply } => {
                let id = new_build_id();
                let platforms = join(&spec.platforms);
                let requested = spec.platforms.clone();
                let result = match self.signer {
                    None if spec.sign => Err(shared::signing::SigningError::NoKey { dir: self.ca_dir.clone() }),
                    _ => Ok(()),
                };
                let result = match result.map_err(|e| e.to_string()) {
                    Err(e) => Err(e),
                    Ok(()) => self
                        .core
                        .submit_with_source(now, &id, &peer.name, *spec, bases, source)
                        .map_err(|e| e.to_string()),
                };
                let result = match result {
                    Ok(()) => {
                        tracing::info!(build = %id, client = %peer.name, %platforms, "build accepted");
                        self.metrics.submitted(&id, &requested);
                        self.followers.entry(id.clone()).or_default().push(events);
                        Ok(id)
                    }
                    Err(e) => Err(e),
                };
                self.next.replies.push(Reply::Submitted(reply, result));
            }
            Event::Follow { build, events, reply } => match self.core.build_state(&build) {
                Some(_) => self.follow(build, events, reply),
                None => self.look_up(build, Then::Follow { events, reply }),
            },
            Event::Logs { build, platform, follow, sink, reply } => match self.core.build_state(&build) {
                Some(_) => self.serve_logs(build, platform, follow, sink, reply),
                None => self.look_up(build, Then::Logs { platform, follow, sink, reply }),
            },
            Event::Join { token_id, secret, name, csr, role, reply } => {
                let resp = self.join(now, &token_id, &secret, &name, &csr, role);
                self.next.replies.push(Reply::Response(reply, resp));
            }
            Event::CacheChecked { task, present } => self.core.cache_checked(now, task, present),
            Event::Dashboard { owner, build, reply } => {
                let (agents, queued, _) = self.core.metrics_snapshot();
                let mine = |b: &BuildView| owner.as_ref().is_none_or(|o| &b.client == o);
                let builds = match build {
                    Some(id) => self.core.build_view(&id).into_iter().filter(mine).collect(),
                    None => self.core.builds(1000).into_iter().filter(mine).take(DASHBOARD_BUILDS).collect::<Vec<_>>(),
                };
                let builds = builds
                    .into_iter()
                    .map(|b| {
                        let r = self.core.results(&b.id);
                        (b, r)
                    })
                    .collect();
                let _ = reply.send(crate::dashboard::Snapshot { agents, queued, builds });
            }
            Event::Metrics { reply } => {
                let (agents, queued, stale_refused) = self.core.metrics_snapshot();
                let _ = reply.send(crate::metrics::Snapshot { agents, queued, stale_refused });
            }
            Event::Stitched { build, result, ms } => {
                match &result {
                    Ok(d) => tracing::info!(%build, index = %d, "image index pushed"),
                    Err(e) => tracing::warn!(%build, "pushing the image index failed: {e}"),
                }
                self.core.stitched(&build, result, ms);
            }
        }
    }

    /// Hands `wanted`, which is not the id of a build in memory, to the store reader with the ids
    /// of the builds in memory that start with it; [`Self::looked`] takes the answer.
    fn look_up(&self, wanted: String, then: Then) {
        let in_memory = self.in_memory_with_prefix(&wanted);
        self.reader.resolve(wanted, in_memory, then);
    }

    fn in_memory_with_prefix(&self, wanted: &str) -> Vec<String> {
        if wanted.is_empty() {
            vec![]
        } else {
            self.core.builds_with_prefix(wanted)
        }
    }

    /// What the store reader found: a reply to send once what came before is on disk, or the
    /// full id of the build a request named, to act on as if the request had named it.
    fn looked(&mut self, looked: Looked) {
        match looked {
            Looked::Reply(reply, resp) => self.next.replies.push(Reply::Response(reply, resp)),
            Looked::Resolved(Err(e), then) => match then {
                Then::Cancel { reply, .. } => self.next.replies.push(Reply::Response(reply, Response::Error(e))),
                Then::Follow { reply, .. } | Then::Logs { reply, .. } => {
                    let _ = reply.send(Err(e));
                }
            },
            Looked::Resolved(Ok(id), then) => match then {
                Then::Cancel { peer, reply } => {
                    let resp = self.cancel(now_ms(), &peer, id);
                    self.next.replies.push(Reply::Response(reply, resp));
                }
                Then::Follow { events, reply } => self.follow(id, events, reply),
                Then::Logs { platform, follow, sink, reply } => self.serve_logs(id, platform, follow, sink, reply),
            },
        }
    }

    /// Cancels build `id` (its full id: in memory, or found in the store).
    fn cancel(&mut self, now: u64, peer: &Identity, id: String) -> Response {
        match self.core.cancel(now, &id) {
            Ok(()) => {
                tracing::info!(build = %id, client = %peer.name, "build cancelled");
                Response::Ok
            }
            Err(_) if self.core.build_state(&id).is_none() => Response::Error(format!("build {id} has already ended")),
            Err(e) => Response::Error(e),
        }
    }

    /// Follows build `id` (its full id). Not in memory, it was found in the store: it ended (only
    /// ended builds leave memory).
    fn follow(
        &mut self,
        id: String,
        events: mpsc::UnboundedSender<BuildEvent>,
        reply: oneshot::Sender<Result<(), String>>,
    ) {
        let r = match self.core.build_state(&id) {
            Some(BuildState::Running | BuildState::Stitching) => {
                self.followers.entry(id).or_default().push(events);
                Ok(())
            }
            _ => Err(format!("build {id} has already ended")),
        };
        let _ = reply.send(r);
    }

    /// Has the log thread send build `id`'s stored log lines (its full id; not in memory, it
    /// ended long ago and its log is still on disk), then live ones if it runs and `follow`.
    fn serve_logs(
        &mut self,
        id: String,
        platform: Option<shared::Platform>,
        follow: bool,
        sink: crate::events::LogSink,
        reply: oneshot::Sender<Result<(), String>>,
    ) {
        let live = matches!(self.core.build_state(&id), Some(BuildState::Running | BuildState::Stitching));
        self.logs.follow(&id, platform, sink, follow && live);
        let _ = reply.send(Ok(()));
    }

    fn revoke(&mut self, now: u64, peer: &Identity, name: String) -> Response {
        let record = self.security.revoke_name(now, &name, &peer.name);
        self.next_batch.put_revoked(&name, &record);
        self.next.revoke.push(name.clone());
        tracing::warn!(identity = %name, by = %peer.name, "identity revoked");
        Response::Ok
    }

    /// Whether `name` is an agent the farm knows, has connected since the coordinator started,
    /// or submitted a build still in memory.
    fn known_identity(&self, name: &str) -> bool {
        self.gate.has_seen(name) || self.core.agents().iter().any(|a| a.name == name) || self.core.has_client(name)
    }

    fn create_token(
        &mut self,
        now: u64,
        peer: &Identity,
        role: Role,
        ttl_secs: Option<u64>,
        uses: Option<u32>,
    ) -> Response {
        if role == Role::Coordinator {
            return Response::Error("tokens are for agents, clients and admins".into());
        }
        let Some(ca) = &self.ca else { return Response::Error(NO_CA_KEY.into()) };
        let id = format!("{:08x}", rand::random::<u32>());
        let secret = format!("{:032x}", rand::random::<u128>());
        let ttl_ms = Some(ttl_secs.unwrap_or(24 * 3600).saturating_mul(1000));
        let record = self.security.create(now, &id, &secret, role, ttl_ms, uses, &peer.name);
        self.next_batch.put_token(&id, &record);
        let ca_sha256 = shared::digest::sha256_hex(ca.cert.as_ref());
        let token = JoinToken { ca_sha256, id: id.clone(), secret };
        tracing::info!(token = %id, %role, by = %peer.name, "join token created");
        Response::Token { token: token.to_string(), id, expires_ms: record.expires_ms }
    }

    fn join(&mut self, now: u64, token_id: &str, secret: &str, name: &str, csr: &[u8], wanted: Role) -> Response {
        let Some(ca) = &self.ca else { return Response::Error(NO_CA_KEY.into()) };
        if let Err(e) = shared::tls::validate_name(name) {
            return Response::Error(e.to_string());
        }
        let (role, record) = match self.security.redeem(now, token_id, secret, name, wanted) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(token = %token_id, %name, "join refused: {e}");
                return Response::Error(e.to_string());
            }
        };
        match ca.sign_csr(csr, name, role) {
            Ok(cert_pem) => {
                self.next_batch.put_token(token_id, &record);
                tracing::info!(%name, %role, token = %token_id, "joined the farm");
                let ca_pem = pem("CERTIFICATE", ca.cert.as_ref());
                Response::Joined { role, cert_pem, ca_pem }
            }
            Err(e) => Response::Error(format!("cannot sign the certificate request: {e}")),
        }
    }

    /// Collects what the last events changed and caused: messages to agents go at once, the
    /// changes join the next commit, and everything else waits for that commit.
    fn step(&mut self) {
        self.next_batch.extend(self.core.take_batch());
        while let Some(action) = self.core.poll_action() {
            match action {
                Action::Send { .. } | Action::Close { .. } | Action::Refuse { .. } => self.act(action),
                later => self.next.actions.push(later),
            }
        }
        self.start_commit();
    }

    /// Hands the waiting changes to a blocking thread, unless a commit is under way (they go when
    /// it completes). With no changes and no commit under way, what waits is released at once.
    fn start_commit(&mut self) {
        if self.committing.is_some() {
            return;
        }
        let waiting = std::mem::take(&mut self.next);
        if self.next_batch.is_empty() {
            self.release(waiting);
            return;
        }
        let batch = std::mem::take(&mut self.next_batch);
        self.in_flight = waiting;
        let store = self.store.clone();
        let metrics = self.metrics.clone();
        let stall = batch.has_builds() && failpoint("FARM_TEST_STALL_COMMIT", "build");
        self.committing = Some(tokio::task::spawn_blocking(move || {
            if stall {
                eprintln!("FARM_TEST_STALL_COMMIT=build: this commit never completes");
                loop {
                    std::thread::park();
                }
            }
            let started = std::time::Instant::now();
            let result = store.commit(&batch);
            metrics.store_commit(started.elapsed().as_secs_f64());
            result
        }));
    }

    /// What waited on a commit, in the order it happened: revocations, replies, then actions.
    fn release(&mut self, after: AfterCommit) {
        for name in after.revoke {
            self.gate.revoke(&name);
        }
        for reply in after.replies {
            match reply {
                Reply::Submitted(tx, r) => {
                    let _ = tx.send(r);
                }
                Reply::Response(tx, r) => {
                    let _ = tx.send(r);
                }
            }
        }
        for action in after.actions {
            self.act(action);
        }
        self.logs.flush();
    }

    fn act(&mut self, action: Action) {
        match action {
            Action::Send { conn, msg } => {
                if let Some(link) = self.links.get(&conn) {
                    let _ = link.send(Outbound::Send(msg));
                }
            }
            Action::Close { conn, reason } => {
                if let Some(link) = self.links.remove(&conn) {
                    let _ = link.send(Outbound::Close(reason));
                }
            }
            Action::Refuse { conn, reason } => {
                if let Some(link) = self.links.remove(&conn) {
                    let _ = link.send(Outbound::Refuse(reason));
                }
            }
            Action::Emit { build, event } => self.emit(build, event),
            Action::CheckCached { task, repository, digest, insecure, credentials } => {
                let events = self.events.clone();
                let registry = self.registries.get(&insecure, credentials.as_ref());
                let blobs = self.blobs.clone();
                tokio::spawn(async move {
                    let present = if repository.is_empty() {
                        let blobs = blobs.clone();
                        tokio::task::spawn_blocking(move || image_in_store(&blobs, &digest)).await.unwrap_or(false)
                    } else {
                        match repository.parse::<shared::oci::ImageRef>() {
                            Ok(repo) => registry.has_manifest(&repo, &digest).await.unwrap_or(false),
                            Err(_) => false,
                        }
                    };
                    let _ = events.send(Event::CacheChecked { task, present }).await;
                });
            }
            Action::Stitch { build, index, published, attestations, tags, insecure, credentials, sign } => {
                crash_point("stitch");
                let events = self.events.clone();
                let registry = self.registries.get(&insecure, credentials.as_ref());
                let blobs = self.blobs.clone();
                // Only what goes to a registry is signed (the core refuses `--sign` without tags).
                let signer = self.signer.clone().filter(|_| (sign || self.sign_all) && !tags.is_empty());
                tokio::spawn(async move {
                    let started = std::time::Instant::now();
                    let result = if tags.is_empty() {
                        // Nothing for a registry: the index joins its manifests in the store.
                        blobs.put(&index).map_err(|e| format!("storing the image index: {e}"))
                    } else {
                        // Provenance first: the index names the attestation manifests.
                        let pushed = match registry.push_provenance(&tags[0], &published).await {
                            Ok(()) => registry.push_index(&index, &tags).await.map_err(|e| e.to_string()),
                            Err(e) => Err(format!("pushing the provenance attestations: {e}")),
                        };
                        match (pushed, signer) {
                            (Ok(digest), Some(key)) => match sign_index(&registry, &key, &tags[0], digest).await {
                                Ok(digest) => {
                                    attest_all(&registry, &key, &tags[0], &attestations).await.map(|()| digest)
                                }
                                Err(e) => Err(e),
                            },
                            (pushed, _) => pushed,
                        }
                    };
                    let ms = started.elapsed().as_millis() as u64;
                    let _ = events.send(Event::Stitched { build, result, ms }).await;
                });
            }
        }
    }

    /// Tells the webhooks and the build's `--notify` URLs that it ended; never waits for them.
    fn notify(&self, build: &str, event: &BuildEvent) {
        let spec = self.core.build_spec(build);
        let tags = spec.map(|s| s.tags.clone()).unwrap_or_default();
        let Some(notice) = crate::webhooks::Notice::of(build, &tags, event) else { return };
        let own = spec.map(|s| s.notify.clone()).unwrap_or_default();
        let hooks = self
            .webhooks
            .iter()
            .cloned()
            .chain(own.into_iter().map(|url| crate::webhooks::Webhook { url, secret: self.notify_secret.clone() }));
        for hook in hooks {
            crate::webhooks::send(self.http.clone(), hook, &notice);
        }
    }

    fn emit(&mut self, build: String, event: BuildEvent) {
        self.metrics.event(&build, &event);
        if let BuildEvent::Failed { error } = &event {
            tracing::warn!(%build, "build failed: {error}");
        }
        if let Some((platform, line)) = event.describe() {
            self.logs.append(&build, &platform, &line);
        }
        if let Some(f) = self.followers.get_mut(&build) {
            f.retain(|tx| tx.send(event.clone()).is_ok());
        }
        if event.is_terminal() {
            self.notify(&build, &event);
            self.followers.remove(&build);
            self.logs.close(&build);
        }
    }
}

/// Signs the pushed index `digest` in `tag`'s repository (cosign's `sha256-<hex>.sig`), after
/// its tags were pushed: a failure fails the build, saying the index is there unsigned.
async fn sign_index(
    registry: &shared::registry::Registry,
    key: &shared::cosign::SigningKey,
    tag: &shared::oci::ImageRef,
    digest: shared::Digest,
) -> Result<shared::Digest, String> {
    match shared::signing::sign_image(registry, key, tag, &digest).await {
        Ok(sig) => {
            tracing::info!("signed {}@{digest} (signature {sig})", tag.name());
            Ok(digest)
        }
        Err(e) => Err(format!("the index {digest} was pushed under its tags but not signed: {e}")),
    }
}

/// Signs each platform's provenance statement as a cosign attestation (`sha256-<hex>.att`), so
/// `cosign verify-attestation --type slsaprovenance1` finds it.
async fn attest_all(
    registry: &shared::registry::Registry,
    key: &shared::cosign::SigningKey,
    tag: &shared::oci::ImageRef,
    attestations: &[shared::provenance::Attestation],
) -> Result<(), String> {
    for (digest, statement) in shared::provenance::statements(attestations) {
        shared::signing::attest(registry, key, tag, &digest, &statement)
            .await
            .map_err(|e| format!("the provenance of {digest} was pushed but not signed: {e}"))?;
    }
    Ok(())
}

/// A test failpoint: with `FARM_TEST_CRASH_BEFORE=<point>` the coordinator dies on the spot, as a
/// SIGKILL would, so tests can stop it at an exact step (e.g. `stitch`: the build's stitching
/// state is committed, the index not yet pushed). Unset in production, it costs one lookup.
fn crash_point(point: &str) {
    if failpoint("FARM_TEST_CRASH_BEFORE", point) {
        eprintln!("FARM_TEST_CRASH_BEFORE={point}: aborting");
        std::process::abort();
    }
}

/// Whether test failpoint `var` is set to `point`. With `FARM_TEST_STALL_COMMIT=build`, commits
/// that write a build never complete, so a test can kill the coordinator after an agent was told
/// of a task and before the task was on disk. Unset in production, each costs one lookup.
fn failpoint(var: &str, point: &str) -> bool {
    std::env::var(var).is_ok_and(|p| p == point)
}

#[cfg(test)]
mod tests;

async fn commit_done(
    committing: &mut Option<tokio::task::JoinHandle<Result<(), StoreError>>>,
) -> Result<Result<(), StoreError>, tokio::task::JoinError> {
    match committing {
        Some(handle) => handle.await,
        None => std::future::pending().await,
    }
}

async fn sleep_opt(d: Option<Duration>) {
    match d {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

fn join(ps: &[shared::Platform]) -> String {
    if ps.is_empty() {
        return "-".into();
    }
    ps.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(",")
}

/// Whether the content store holds the image manifest `digest` and every blob it names (an
/// earlier result of a build without tags, before the result cache reuses it).
fn image_in_store(blobs: &shared::context::BlobStore, digest: &shared::Digest) -> bool {
    let Ok(bytes) = std::fs::read(blobs.path(digest)) else { return false };
    let Ok(blobs_named) = shared::export::manifest_blobs(&bytes) else { return false };
    blobs_named.iter().all(|d| blobs.has(&d.digest))
}
