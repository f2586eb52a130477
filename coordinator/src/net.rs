//! Where QUIC connections become driver events. Every connection first proves its identity (the
//! TLS layer has already checked its certificate against the farm's CA), then passes the version
//! handshake, then is served by role: an agent holds one control stream and may open request
//! streams to fetch contexts; a client opens one stream per request. A misbehaving connection
//! only ever costs its own task.
//!
//! Context files move here, not through the driver: they are bulk I/O against the content store,
//! and the driver must never wait on a disk or a slow peer.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use shared::context::{BlobSink, BlobStore, ContextLimits};
use shared::proto::io::{expect_msg, read_msg, write_msg, write_raw};
use shared::proto::{AgentMsg, BlobHeader, Hello, HelloReply, ProtoError, Request, Response};
use shared::tls::{Identity, Role};
use tokio::sync::{mpsc, oneshot};

use crate::events::{Event, Outbound};
use crate::fleet::ConnId;
use crate::gate::Gate;

/// The most a context upload hands to the writing thread at a time (quinn's chunks are smaller).
const RECEIVE_CHUNK: usize = 256 * 1024;

/// How long a new connection may take to open its first stream and say hello.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a request stream may take to deliver its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone)]
pub struct Net {
    pub max_frame: usize,
    pub events: mpsc::Sender<Event>,
    pub store: Arc<BlobStore>,
    /// Where the store and the database live: named when the disk is full.
    pub state_dir: std::path::PathBuf,
    pub limits: ContextLimits,
    pub gate: Arc<Gate>,
    /// Registry clients, shared with the driver.
    pub registries: Arc<shared::registry::RegistryPool>,
    /// The client connections that answer builds' `--ssh` forwards.
    pub ssh: Arc<SshRoutes>,
    /// Context manifests validated since this coordinator started (a build naming one needs no
    /// second check); bounded, emptied when full.
    pub accepted: Arc<std::sync::Mutex<std::collections::HashSet<shared::Digest>>>,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Issues the dashboard's login tokens, when `dashboard_listen` is set.
    pub dashboard: Option<Arc<crate::dashboard::Dashboard>>,
    /// Which refused connections to log (the first of each peer's; every one is counted).
    pub refusals: Arc<std::sync::Mutex<shared::refusals::RefusalLog>>,
}

/// How many accepted context digests [`Net::accepted`] remembers.
const ACCEPTED_CONTEXTS: usize = 100_000;

/// How long an agent's `--ssh` forward waits for the submitting client's route to appear (the
/// agent may hear of the task before the client hears its build was accepted).
const SSH_ROUTE_PATIENCE: Duration = Duration::from_secs(10);

/// Builds with `--ssh` → the connection of the client that submitted (and follows) each, and its
/// ids. In memory only: a route lives while its client follows the build.
#[derive(Default)]
pub struct SshRoutes {
    routes: std::sync::Mutex<std::collections::HashMap<String, (quinn::Connection, Vec<String>)>>,
    changed: tokio::sync::Notify,
}

impl SshRoutes {
    fn insert(&self, build: &str, conn: quinn::Connection, ids: Vec<String>) {
        self.routes.lock().unwrap().insert(build.to_string(), (conn, ids));
        self.changed.notify_waiters();
    }

    fn remove(&self, build: &str) {
        self.routes.lock().unwrap().remove(build);
    }

    async fn wait(&self, build: &str) -> Option<(quinn::Connection, Vec<String>)> {
        tokio::time::timeout(SSH_ROUTE_PATIENCE, async {
            loop {
                let changed = self.changed.notified();
                if let Some(route) = self.routes.lock().unwrap().get(build) {
                    return route.clone();
                }
                changed.await;
            }
        })
        .await
        .ok()
    }
}

/// Forgets a build's `--ssh` route when its client stops following it.
struct RouteGuard<'a>(&'a SshRoutes, String);

impl Drop for RouteGuard<'_> {
    fn drop(&mut self) {
        self.0.remove(&self.1);
    }
}

static NEXT_CONN: AtomicU64 = AtomicU64::new(1);

impl Net {
    pub async fn serve(&self, endpoint: quinn::Endpoint) {
        while let Some(incoming) = endpoint.accept().await {
            let conn_id = NEXT_CONN.fetch_add(1, Ordering::Relaxed);
            let net = self.clone();
            tokio::spawn(async move {
                let remote = incoming.remote_address();
                match net.clone().handle(incoming, conn_id).await {
                    Ok(()) => {}
                    Err(e) if e.is_routine() => tracing::debug!(%remote, "connection ended: {e}"),
                    Err(e) => match e.refusal() {
                        Some(reason) => net.refused(remote, reason, &e),
                        None => tracing::warn!(%remote, "connection ended: {e}"),
                    },
                }
            });
        }
    }

    async fn handle(self, incoming: quinn::Incoming, conn_id: ConnId) -> Result<(), PeerError> {
        let conn = incoming.await.map_err(PeerError::Handshake)?;
        let identity = shared::quic::peer_identity_if_any(&conn)?;
        if let Some(id) = identity.as_ref().filter(|id| self.gate.is_revoked(&id.name)) {
            conn.close(3u32.into(), b"this certificate was revoked");
            return Err(PeerError::Revoked(format!("{id} refused: its certificate was revoked")));
        }
        let address = conn.remote_address().to_string();
        let (mut send, recv) = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
            let (mut send, mut recv) = conn.accept_bi().await?;
            let hello: Hello = expect_msg(&mut recv, self.max_frame, "a hello").await?;
            let reply = HelloReply::to(&hello);
            write_msg(&mut send, &reply, self.max_frame).await?;
            if !reply.accepted {
                let _ = send.finish();
                // Let the refusal reach the peer before the connection goes.
                let _ = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
                let who = identity.as_ref().map_or("a peer".to_string(), |i| i.to_string());
                return Err(PeerError::Refused(format!("{who} refused: {}", reply.message)));
            }
            Ok::<_, PeerError>((send, recv))
        })
        .await
        .map_err(|_| PeerError::HandshakeTimeout(HANDSHAKE_TIMEOUT))??;

        let Some(identity) = identity else {
            let _ = send.finish();
            return self.joiner(conn).await;
        };
        self.gate.enter(&identity.name, conn_id, &conn);
        let name = identity.name.clone();
        let result = self.serve_peer(conn, identity, address, conn_id, send, recv).await;
        self.gate.leave(&name, conn_id);
        result
    }

    async fn serve_peer(
        &self,
        conn: quinn::Connection,
        identity: Identity,
        address: String,
        conn_id: ConnId,
        mut send: quinn::SendStream,
        recv: quinn::RecvStream,
    ) -> Result<(), PeerError> {
        match identity.role {
            Role::Agent => {
                let requests = tokio::spawn(self.clone().requests(conn.clone(), identity.clone()));
                let r = self.agent(conn, identity, address, conn_id, &mut send, recv).await;
                requests.abort();
                r
            }
            Role::Client | Role::Admin => {
                let _ = send.finish();
                self.clone().requests(conn, identity).await
            }
            Role::Coordinator => {
                conn.close(1u32.into(), b"a coordinator certificate cannot connect to a coordinator");
                Err(PeerError::Refused(format!("{identity} presented a coordinator certificate")))
            }
        }
    }

    /// A peer without a certificate: one `Join` request, nothing else.
    async fn joiner(&self, conn: quinn::Connection) -> Result<(), PeerError> {
        let (mut send, mut recv) = tokio::time::timeout(HANDSHAKE_TIMEOUT, conn.accept_bi())
            .await
            .map_err(|_| PeerError::HandshakeTimeout(HANDSHAKE_TIMEOUT))??;
        let req: Request = expect_msg(&mut recv, self.max_frame, "a join request").await?;
        let resp = match req {
            Request::Join { token_id, secret, name, csr, role } => {
                let (reply, answer) = oneshot::channel();
                let _ = self.events.send(Event::Join { token_id, secret, name, csr, role, reply }).await;
                answer.await.unwrap_or_else(|_| Response::Error("the coordinator is shutting down".into()))
            }
            _ => Response::Error(
                "this connection presented no certificate: it may only join the farm with a token \
                 (`farm agent join` or `farm login`)"
                    .into(),
            ),
        };
        write_msg(&mut send, &resp, self.max_frame).await?;
        let _ = send.finish();
        let _ = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
        Ok(())
    }

    /// One agent's control stream: registration, then its messages up and commands down.
    async fn agent(
        &self,
        conn: quinn::Connection,
        identity: Identity,
        address: String,
        conn_id: ConnId,
        send: &mut quinn::SendStream,
        recv: quinn::RecvStream,
    ) -> Result<(), PeerError> {
        let name = identity.name;
        let (mut incoming, _reader) = shared::proto::io::reader::<AgentMsg, _>(recv, self.max_frame);
        let info = match incoming.recv().await.unwrap_or(Ok(None))? {
            Some(AgentMsg::Register(info)) => info,
            // An agent identity used as a client (e.g. `farm builds` with an agent's certificate):
            // its requests are answered (with the role's refusal) until it goes.
            None => {
                conn.closed().await;
                return Ok(());
            }
            Some(other) => {
                return Err(PeerError::Proto(ProtoError::Unexpected {
                    expected: "Register",
                    got: format!("{other:?}"),
                }));
            }
        };
        let (link, mut outbound) = mpsc::unbounded_channel();
        let certificate = shared::quic::peer_certificate_sha256(&conn);
        let up = Event::AgentUp { name: name.clone(), conn: conn_id, address, info, certificate, link };
        if self.events.send(up).await.is_err() {
            return Ok(());
        }
        let result = loop {
            tokio::select! {
                msg = incoming.recv() => match msg.unwrap_or(Ok(None)) {
                    Ok(Some(msg)) => {
                        if self.events.send(Event::Agent { name: name.clone(), conn: conn_id, msg }).await.is_err() {
                            break Ok(());
                        }
                    }
                    Ok(None) => break Ok(()),
                    Err(e) => break Err(e.into()),
                },
                out = outbound.recv() => match out {
                    Some(Outbound::Send(msg)) => {
                        if let Err(e) = write_msg(send, &msg, self.max_frame).await {
                            break Err(e.into());
                        }
                    }
                    Some(Outbound::Close(reason)) => {
                        conn.close(2u32.into(), reason.as_bytes());
                        break Ok(());
                    }
                    Some(Outbound::Refuse(reason)) => {
                        let refused = shared::proto::CoordMsg::Refused { reason: reason.clone() };
                        if write_msg(send, &refused, self.max_frame).await.is_ok() {
                            let _ = send.finish();
                            // Let the refusal reach the agent (which closes on reading it) first.
                            let _ = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
                        }
                        conn.close(2u32.into(), reason.as_bytes());
                        break Ok(());
                    }
                    None => break Ok(()),
                },
            }
        };
        let _ = self.events.send(Event::AgentDown { name, conn: conn_id }).await;
        result
    }

    /// Request streams, one request each, served concurrently.
    async fn requests(self, conn: quinn::Connection, identity: Identity) -> Result<(), PeerError> {
        loop {
            let (mut send, mut recv) = match conn.accept_bi().await {
                Ok(s) => s,
                Err(quinn::ConnectionError::ApplicationClosed(_) | quinn::ConnectionError::LocallyClosed) => {
                    return Ok(())
                }
                Err(e) => return Err(e.into()),
            };
            let net = self.clone();
            let peer = identity.clone();
            let conn = conn.clone();
            tokio::spawn(async move {
                let result = async {
                    // A stream opened and left half open costs its slot for this long, no more.
                    let req: Request =
                        tokio::time::timeout(REQUEST_TIMEOUT, expect_msg(&mut recv, net.max_frame, "a request"))
                            .await
                            .map_err(|_| ProtoError::Closed("a request within 30 s"))??;
                    net.request(&conn, peer, req, &mut send, &mut recv).await?;
                    let _ = send.finish();
                    Ok::<_, ProtoError>(())
                }
                .await;
                if let Err(e) = result {
                    let _ = write_msg(&mut send, &Response::Error(e.to_string()), net.max_frame).await;
                    tracing::debug!("request stream failed: {e}");
                }
            });
        }
    }

    async fn request(
        &self,
        conn: &quinn::Connection,
        peer: Identity,
        req: Request,
        send: &mut quinn::SendStream,
        recv: &mut quinn::RecvStream,
    ) -> Result<(), ProtoError> {
        let max = self.max_frame;
        let agent = peer.role == Role::Agent;
        let refuse = |what: &str| Response::Error(format!("{peer} may not {what}"));
        let resp = match req {
            Request::PutContext(_)
            | Request::Build(_)
            | Request::ListBuilds { .. }
            | Request::Logs { .. }
            | Request::Cancel { .. }
            | Request::Follow { .. }
            | Request::GetBuild { .. }
                if agent =>
            {
                refuse("submit, list, follow or cancel builds (agent identities only build)")
            }
            Request::SshForward { .. } if !agent => refuse("open ssh forwards (agents only, for the builds they run)"),
            Request::SshForward { build, id } => return self.ssh_forward(peer, build, id, send, recv).await,
            Request::Join { .. } => Response::Error(format!("{peer} is already a member of this farm")),
            Request::CreateToken { .. }
            | Request::RevokeToken { .. }
            | Request::Revoke { .. }
            | Request::RevokeIdentity { .. }
                if peer.role != Role::Admin =>
            {
                refuse("create or revoke tokens or identities (admin identities only)")
            }
            Request::DashboardLogin if !matches!(peer.role, Role::Admin | Role::Client) => {
                refuse("log into the dashboard (admin and client identities only)")
            }
            Request::DashboardLogin => match &self.dashboard {
                Some(d) => match d.login_token(peer.clone()) {
                    Ok(token) => {
                        tracing::info!(%peer, "dashboard login token issued");
                        Response::Dashboard { port: d.port, token, expires_secs: crate::dashboard::TOKEN_TTL.as_secs() }
                    }
                    Err(e) => Response::Error(e),
                },
                None => Response::Error(
                    "this coordinator serves no dashboard: set dashboard_listen = \"0.0.0.0:8443\" (or another \
                     address) in its coordinator.toml and restart it"
                        .into(),
                ),
            },
            Request::PutContext(digest) => self.put_context(digest).await,
            Request::HaveBlobs(digests) => Response::Missing(self.store.missing(&digests)),
            Request::PutBlobs => self.put_blobs(&peer, recv).await?,
            Request::GetBlobs(digests) => return self.get_blobs(&digests, send).await,
            Request::Build(spec) => return self.build(conn, peer, spec, send).await,
            Request::Logs { build, platform, follow } => return self.logs(build, platform, follow, send).await,
            Request::Follow { build } => {
                let (events, rx) = mpsc::unbounded_channel();
                let (reply, ok) = oneshot::channel();
                let _ = self.events.send(Event::Follow { build, events, reply }).await;
                match ok.await {
                    Ok(Ok(())) => return self.stream_events(rx, send).await,
                    Ok(Err(e)) => Response::Error(e),
                    Err(_) => Response::Error("the coordinator is shutting down".into()),
                }
            }
            req => {
                let (reply, rx) = oneshot::channel();
                if self.events.send(Event::Request { peer, req, reply }).await.is_err() {
                    Response::Error("the coordinator is shutting down".into())
                } else {
                    rx.await.unwrap_or_else(|_| Response::Error("the coordinator is shutting down".into()))
                }
            }
        };
        write_msg(send, &resp, max).await
    }

    /// A context offered by its manifest's digest (see [`Request::PutContext`]): the manifest
    /// itself while the store lacks it; once held, validated under the coordinator's limits and
    /// answered with the files still missing.
    async fn put_context(&self, digest: shared::Digest) -> Response {
        if !self.store.has(&digest) {
            return Response::Missing(vec![digest]);
        }
        let wanted = match self.check_context(&digest).await {
            Ok(wanted) => wanted,
            Err(e) => return Response::Error(format!("build context refused: {e}")),
        };
        let digests: Vec<shared::Digest> = wanted.iter().map(|(d, _)| d.clone()).collect();
        let missing = self.store.missing(&digests);
        // Refused before a byte is sent, rather than half way through the upload.
        let sizes: std::collections::HashMap<&shared::Digest, u64> = wanted.iter().map(|(d, s)| (d, *s)).collect();
        let needed: u64 = missing.iter().map(|d| sizes.get(d).copied().unwrap_or(0)).sum();
        match shared::disk::free_bytes(self.store.root()) {
            Ok(free) => {
                if let Some(short) = shared::disk::shortfall(needed, free) {
                    let msg = self.out_of_space(
                        short,
                        &format!(
                            "the context's missing files take {} MB, {} MB are free",
                            shared::disk::mb_up(needed),
                            shared::disk::mb_down(free)
                        ),
                    );
                    tracing::warn!(context = %digest, "context refused: {msg}");
                    return Response::Error(msg);
                }
            }
            Err(e) => tracing::warn!("cannot tell the free space in {}: {e}", self.state_dir.display()),
        }
        Response::Missing(missing)
    }

    /// What a client is told when the state directory's disk is full: the directory, how much more
    /// it needs, `detail`, and the fix.
    fn out_of_space(&self, short: u64, detail: &str) -> String {
        format!(
            "coordinator out of disk space in {} (needs {} MB more): {detail}; free space there or move the \
             coordinator's --state-dir to a larger disk",
            self.state_dir.display(),
            shared::disk::mb_up(short)
        )
    }

    /// Whether `digest` names a context manifest this coordinator holds and accepts.
    async fn context_accepted(&self, digest: &shared::Digest) -> bool {
        self.accepted.lock().unwrap().contains(digest) || self.check_context(digest).await.is_ok()
    }

    /// Reads and validates a stored manifest (off the runtime's threads: it may list many
    /// thousands of files), remembering it as accepted; the files it lists. A refused manifest's
    /// blob stays (blobs are content, not claims), but no build can name it.
    async fn check_context(&self, digest: &shared::Digest) -> Result<Vec<(shared::Digest, u64)>, String> {
        let (store, limits, d) = (self.store.clone(), self.limits.clone(), digest.clone());
        let checked = tokio::task::spawn_blocking(move || {
            Ok::<_, shared::context::ContextError>(store.get_manifest(&d, &limits)?.blobs())
        })
        .await
        .map_err(|e| format!("checking the context manifest: {e}"))?
        .map_err(|e| e.to_string())?;
        let mut accepted = self.accepted.lock().unwrap();
        if accepted.len() >= ACCEPTED_CONTEXTS {
            accepted.clear();
        }
        accepted.insert(digest.clone());
        Ok(checked)
    }

    /// Receives blobs and stores them through a [`BlobSink`]: this task only reads the network;
    /// hashing, writing and syncing happen on threads of their own, overlapping the transfer.
    async fn put_blobs(&self, peer: &Identity, recv: &mut quinn::RecvStream) -> Result<Response, ProtoError> {
        let mut sink = BlobSink::new(self.store.clone());
        let (mut blobs, mut bytes) = (0u64, 0u64);
        // Bytes of the blob under way not yet received when the sink stopped.
        let mut unstored = 0u64;
        'blobs: while let Some(header) = read_msg::<BlobHeader, _>(recv, self.max_frame).await? {
            unstored = header.size;
            if !sink.start(header.digest.clone()).await {
                break;
            }
            let mut left = header.size;
            while left > 0 {
                let want = left.min(RECEIVE_CHUNK as u64) as usize;
                let chunk =
                    recv.read_chunk(want, true).await.map_err(std::io::Error::from)?.ok_or(ProtoError::Truncated {
                        expected: header.size as usize,
                        got: (header.size - left) as usize,
                    })?;
                left -= chunk.bytes.len() as u64;
                unstored = left;
                if !sink.bytes(chunk.bytes).await {
                    break 'blobs;
                }
            }
            if !sink.end().await {
                break;
            }
            unstored = 0;
            blobs += 1;
            bytes += header.size;
        }
        let refused = match sink.finish().await {
            Ok(stored) if stored == blobs => None,
            Ok(stored) => Some(format!("upload refused: only {stored} of {blobs} files could be stored")),
            Err(e) if e.is_no_space() => {
                let free = shared::disk::free_bytes(self.store.root()).unwrap_or(0);
                let short = shared::disk::shortfall(unstored, free).unwrap_or(unstored).max(1);
                Some(self.out_of_space(short, &format!("{} MB are free", shared::disk::mb_down(free))))
            }
            Err(e) => Some(format!("upload refused: {e}")),
        };
        if let Some(msg) = refused {
            tracing::warn!(client = %peer.name, "context files refused: {msg}");
            return Ok(Response::Error(msg));
        }
        tracing::info!(client = %peer.name, blobs, bytes, "context files received");
        self.metrics.context_bytes("in", bytes);
        Ok(Response::Stored { blobs, bytes })
    }

    /// Agents fetch context files, clients a build's results (a build without tags): by digest,
    /// which names the content; a digest nobody was told cannot be guessed.
    async fn get_blobs(&self, digests: &[shared::Digest], send: &mut quinn::SendStream) -> Result<(), ProtoError> {
        if let Some(d) = digests.iter().find(|d| !self.store.has(d)) {
            return write_msg(
                send,
                &Response::Error(format!("blob {d} is not in the coordinator's store")),
                self.max_frame,
            )
            .await;
        }
        for d in digests {
            let mut file = tokio::fs::File::open(self.store.path(d)).await?;
            let size = file.metadata().await?.len();
            write_msg(send, &BlobHeader { digest: d.clone(), size }, self.max_frame).await?;
            write_raw(send, &mut file, size).await?;
            self.metrics.context_bytes("out", size);
        }
        Ok(())
    }

    async fn build(
        &self,
        conn: &quinn::Connection,
        peer: Identity,
        spec: Box<shared::proto::BuildSpec>,
        send: &mut quinn::SendStream,
    ) -> Result<(), ProtoError> {
        let max = self.max_frame;
        if !self.context_accepted(&spec.context).await {
            let msg = format!("context {} was not uploaded; upload it before submitting", spec.context);
            return write_msg(send, &Response::Error(msg), max).await;
        }
        let mut named = None;
        for c in &spec.inputs.contexts {
            if !self.context_accepted(&c.context).await {
                named = Some(c);
                break;
            }
        }
        if let Some(c) = named {
            let msg = format!("named context {} ({}) was not uploaded; upload it before submitting", c.name, c.context);
            return write_msg(send, &Response::Error(msg), max).await;
        }
        let (bases, source) = self.resolve_source(&spec).await;
        let (events, rx) = mpsc::unbounded_channel();
        let (reply, accepted) = oneshot::channel();
        let ssh = spec.ssh.clone();
        if self.events.send(Event::Submit { peer, spec, bases, source, events, reply }).await.is_err() {
            return write_msg(send, &Response::Error("the coordinator is shutting down".into()), max).await;
        }
        // This connection answers the build's `--ssh` forwards while it follows the build.
        let mut _route = None;
        match accepted.await {
            Ok(Ok(build)) => {
                if !ssh.is_empty() {
                    self.ssh.insert(&build, conn.clone(), ssh);
                    _route = Some(RouteGuard(&self.ssh, build.clone()));
                }
                write_msg(send, &Response::Accepted { build }, max).await?
            }
            Ok(Err(e)) => return write_msg(send, &Response::Error(e), max).await,
            Err(_) => return write_msg(send, &Response::Error("the coordinator is shutting down".into()), max).await,
        }
        self.stream_events(rx, send).await
    }

    /// An agent's connection to a build's `--ssh` socket: allowed only while the agent runs a
    /// task of that build (the driver checks), relayed to the client that submitted the build.
    /// The bytes are passed on as they come, never read or kept.
    async fn ssh_forward(
        &self,
        peer: Identity,
        build: String,
        id: String,
        send: &mut quinn::SendStream,
        recv: &mut quinn::RecvStream,
    ) -> Result<(), ProtoError> {
        let max = self.max_frame;
        let (reply, rx) = oneshot::channel();
        let req = Request::SshForward { build: build.clone(), id: id.clone() };
        let _ = self.events.send(Event::Request { peer: peer.clone(), req: req.clone(), reply }).await;
        match rx.await.unwrap_or_else(|_| Response::Error("the coordinator is shutting down".into())) {
            Response::Ok => {}
            refused => return write_msg(send, &refused, max).await,
        }
        let Some((client, ids)) = self.ssh.wait(&build).await else {
            let msg = format!(
                "build {build} has no client following it to answer its --ssh {id} (it was submitted without --ssh, \
                 or its client went away)"
            );
            return write_msg(send, &Response::Error(msg), max).await;
        };
        if !ids.contains(&id) {
            let msg = format!(
                "build {build} was given no --ssh id {id:?} (it has {}); pass --ssh {id}=SOCKET|KEYFILE to farm build",
                ids.join(", ")
            );
            return write_msg(send, &Response::Error(msg), max).await;
        }
        let opened = async {
            let (mut c_send, mut c_recv) = client.open_bi().await.map_err(std::io::Error::from)?;
            write_msg(&mut c_send, &req, max).await?;
            let answer: Response = expect_msg(&mut c_recv, max, "the client's answer to an ssh forward").await?;
            Ok::<_, ProtoError>((c_send, c_recv, answer))
        };
        let (c_send, c_recv) = match opened.await {
            Ok((s, r, Response::Ok)) => (s, r),
            Ok((_, _, answer)) => return write_msg(send, &answer, max).await,
            Err(e) => {
                let msg = format!("the client of build {build} did not answer its --ssh {id}: {e}");
                return write_msg(send, &Response::Error(msg), max).await;
            }
        };
        write_msg(send, &Response::Ok, max).await?;
        tracing::debug!(%build, %id, agent = %peer.name, "ssh forward open");
        let moved = shared::proto::io::splice(recv, send, c_recv, c_send).await?;
        tracing::debug!(%build, %id, up = moved.0, down = moved.1, "ssh forward closed");
        Ok(())
    }

    /// The build's Dockerfile (digest; text for `--provenance mode=max`) and base images with
    /// the digests their tags point to now, for the result cache and provenance. Anything that
    /// cannot be resolved (a registry down, a private image) disables the cache for this build
    /// instead of failing it (`None`): the agents will say what is wrong.
    async fn resolve_source(
        &self,
        spec: &shared::proto::BuildSpec,
    ) -> (Option<Vec<(String, shared::Digest)>>, shared::provenance::Source) {
        let mut source = shared::provenance::Source::default();
        let Some((digest, text)) = self.dockerfile(spec) else { return (None, source) };
        source.dockerfile_digest = Some(digest);
        if spec.provenance == shared::proto::ProvenanceMode::Max {
            source.dockerfile_text = Some(text.clone());
        }
        let bases = self.resolve_bases(spec, &text).await;
        source.bases = bases.clone().unwrap_or_default();
        (bases, source)
    }

    fn dockerfile(&self, spec: &shared::proto::BuildSpec) -> Option<(shared::Digest, String)> {
        // The context was validated when it was offered (`context_accepted`): a lookup needs no second check.
        let digest = self.store.manifest_file(&spec.context, &spec.dockerfile).ok()??;
        let text = String::from_utf8(std::fs::read(self.store.path(&digest)).ok()?).ok()?;
        Some((digest, text))
    }

    async fn resolve_bases(
        &self,
        spec: &shared::proto::BuildSpec,
        text: &str,
    ) -> Option<Vec<(String, shared::Digest)>> {
        let mut images = shared::dockerfile::base_images(text, &spec.build_args);
        // `FROM NAME` of a named context is no image (its digest is in the cache key already).
        images.retain(|i| !spec.inputs.contexts.iter().any(|c| &c.name == i));
        if images.is_empty() {
            return Some(vec![]);
        }
        let registry = self.registries.get(&spec.insecure_registries, spec.credentials.as_ref());
        let mut out = Vec::new();
        for image in images {
            let r: shared::oci::ImageRef = image.parse().ok()?;
            let (_, _, digest) = registry.fetch_manifest(&r).await.ok()?;
            out.push((image, digest));
        }
        Some(out)
    }

    async fn stream_events(
        &self,
        mut rx: mpsc::UnboundedReceiver<shared::proto::BuildEvent>,
        send: &mut quinn::SendStream,
    ) -> Result<(), ProtoError> {
        while let Some(event) = rx.recv().await {
            write_msg(send, &Response::Event(event), self.max_frame).await?;
        }
        Ok(())
    }

    async fn logs(
        &self,
        build: String,
        platform: Option<shared::Platform>,
        follow: bool,
        send: &mut quinn::SendStream,
    ) -> Result<(), ProtoError> {
        let (sink, mut lines) = mpsc::unbounded_channel();
        let (reply, ok) = oneshot::channel();
        let _ = self.events.send(Event::Logs { build, platform, follow, sink, reply }).await;
        match ok.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return write_msg(send, &Response::Error(e), self.max_frame).await,
            Err(_) => {
                return write_msg(send, &Response::Error("the coordinator is shutting down".into()), self.max_frame)
                    .await
            }
        }
        while let Some((platform, line)) = lines.recv().await {
            write_msg(send, &Response::LogLine { platform, line }, self.max_frame).await?;
        }
        Ok(())
    }
}

impl Net {
    /// A refused connection: counted, and logged if it is the first of its peer's in a while.
    fn refused(&self, remote: std::net::SocketAddr, reason: shared::refusals::Reason, e: &PeerError) {
        self.metrics.tls_refused(reason);
        if matches!(reason, shared::refusals::Reason::UnknownCa | shared::refusals::Reason::BadCertificate) {
            // The certificate verifier has logged who the peer claimed to be, and the fix.
            tracing::debug!(%remote, "connection refused: {e}");
            return;
        }
        let ip = remote.ip();
        let presented = match e {
            PeerError::Revoked(who) => who.clone(),
            _ => reason.label().to_string(),
        };
        match self.refusals.lock().unwrap().note((ip, presented), std::time::Instant::now()) {
            Some(0) => tracing::warn!(
                %remote,
                "connection refused: {e} (further refusals like it from {ip} are counted in farm_tls_refusals_total \
                 and logged at most every {} s)",
                shared::refusals::QUIET.as_secs()
            ),
            Some(n) => tracing::warn!(%remote, "connection refused: {e} ({n} more from {ip} since its last line)"),
            None => tracing::debug!(%remote, "connection refused: {e}"),
        }
    }
}

impl PeerError {
    /// Why the connection was refused, if it was: a failed TLS handshake or a revoked certificate.
    fn refusal(&self) -> Option<shared::refusals::Reason> {
        match self {
            PeerError::Handshake(e) => Some(shared::refusals::Reason::of_handshake_error(&e.to_string())),
            PeerError::Revoked(_) => Some(shared::refusals::Reason::Revoked),
            _ => None,
        }
    }

    /// A peer that went away (closed, timed out, reset): nothing an operator should act on.
    fn is_routine(&self) -> bool {
        use quinn::ConnectionError as E;
        let routine = |e: &E| {
            matches!(e, E::ApplicationClosed(_) | E::ConnectionClosed(_) | E::LocallyClosed | E::TimedOut | E::Reset)
        };
        match self {
            PeerError::Connection(e) => routine(e),
            PeerError::Proto(ProtoError::Io(_) | ProtoError::Truncated { .. }) => true,
            _ => false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum PeerError {
    #[error("TLS handshake failed: {0}")]
    Handshake(quinn::ConnectionError),
    #[error("{0}")]
    Quic(#[from] shared::quic::QuicError),
    #[error("{0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("{0}")]
    Proto(#[from] ProtoError),
    #[error("no hello within {0:?}")]
    HandshakeTimeout(Duration),
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Revoked(String),
}
