//! The connecting side of a farm connection, shared by agents and the CLI: connect, prove the
//! version, then talk. Requests use one QUIC stream each, so a slow answer never blocks another.

use crate::context::Scanned;
use crate::proto::io::{expect_msg, read_msg, write_msg, write_raw};
use crate::proto::{BlobHeader, BuildEvent, BuildSpec, Hello, HelloReply, ProtoError, Request, Response};
use crate::quic::{self, QuicError, TransportLimits};
use crate::tls::Credentials;
use crate::Digest;

/// How long a refused upload's answer is waited for once the coordinator stopped reading it.
const REFUSAL_PATIENCE: std::time::Duration = std::time::Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Quic(#[from] QuicError),
    #[error("coordinator at {target}: {source}")]
    Proto { target: String, source: ProtoError },
    #[error("coordinator at {target} answered with an error: {message}")]
    Remote { target: String, message: String },
    #[error("{0} changed while it was being uploaded; run the build again")]
    Changed(std::path::PathBuf),
}

/// Opens the connection's first stream and exchanges hellos. The stream stays open: agents use
/// it as their control stream, clients simply finish it.
pub async fn handshake(
    conn: &quinn::Connection,
    max_frame: usize,
) -> Result<(quinn::SendStream, quinn::RecvStream), HandshakeError> {
    let (mut send, mut recv) = conn.open_bi().await?;
    write_msg(&mut send, &Hello::ours(), max_frame).await?;
    let reply: HelloReply = expect_msg(&mut recv, max_frame, "a hello reply").await?;
    reply.into_result()?;
    Ok((send, recv))
}

#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error(transparent)]
    Connection(#[from] quinn::ConnectionError),
    #[error(transparent)]
    Proto(#[from] ProtoError),
}

/// A CLI's connection to its coordinator.
pub struct Client {
    target: String,
    _endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    max_frame: usize,
}

impl Client {
    pub async fn connect(
        target: &str,
        creds: &Credentials,
        limits: &TransportLimits,
        max_frame: usize,
    ) -> Result<Self, ClientError> {
        let (endpoint, conn) = quic::connect(target, creds, limits).await?;
        let (mut send, _recv) = handshake(&conn, max_frame).await.map_err(|e| match (e, conn.close_reason()) {
            (_, Some(reason)) | (HandshakeError::Connection(reason), None) => {
                QuicError::connection(target, reason).into()
            }
            (HandshakeError::Proto(source), None) => ClientError::Proto { target: target.into(), source },
        })?;
        let _ = send.finish();
        Ok(Self { target: target.into(), _endpoint: endpoint, conn, max_frame })
    }

    /// Sends one request and waits for its single response; `Response::Error` becomes an error.
    pub async fn request(&self, req: &Request) -> Result<Response, ClientError> {
        let target = || self.target.clone();
        let lost = |source| ClientError::from(QuicError::connection(target(), source));
        let (mut send, mut recv) = self.conn.open_bi().await.map_err(lost)?;
        // A stream error is reported as the connection's, when the connection is what failed.
        let proto = |source| match self.conn.close_reason() {
            Some(reason) => lost(reason),
            None => ClientError::Proto { target: target(), source },
        };
        write_msg(&mut send, req, self.max_frame).await.map_err(proto)?;
        let _ = send.finish();
        match expect_msg(&mut recv, self.max_frame, "a response").await.map_err(proto)? {
            Response::Error(message) => Err(ClientError::Remote { target: target(), message }),
            resp => Ok(resp),
        }
    }

    pub fn close(&self) {
        self.conn.close(0u32.into(), b"bye");
    }

    /// Closes the connection and gives the goodbye a moment to leave, so that the coordinator
    /// sees a peer that said goodbye, not one that vanished (which it would wait out).
    pub async fn finish(self) {
        self.close();
        // The close frame leaves on the endpoint driver's next turn; waiting out the whole drain
        // period (three probe timeouts) would only delay the command's exit.
        let _ = tokio::time::timeout(std::time::Duration::from_millis(10), self._endpoint.wait_idle()).await;
    }
}

/// What uploading a context moved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upload {
    pub files: usize,
    pub total_bytes: u64,
    pub blobs_sent: u64,
    pub bytes_sent: u64,
}

/// The events of a submitted build, as they happen.
pub struct Following {
    pub build: String,
    recv: quinn::RecvStream,
    max_frame: usize,
    target: String,
}

impl Following {
    /// The next event; `None` once the coordinator has said the last one.
    pub async fn next(&mut self) -> Result<Option<BuildEvent>, ClientError> {
        let proto = |source| ClientError::Proto { target: self.target.clone(), source };
        match read_msg::<Response, _>(&mut self.recv, self.max_frame).await.map_err(proto)? {
            Some(Response::Event(e)) => Ok(Some(e)),
            Some(Response::Error(message)) => Err(ClientError::Remote { target: self.target.clone(), message }),
            Some(other) => Err(proto(ProtoError::Unexpected { expected: "a build event", got: format!("{other:?}") })),
            None => Ok(None),
        }
    }
}

impl Client {
    async fn open(&self, req: &Request) -> Result<(quinn::SendStream, quinn::RecvStream), ClientError> {
        let lost = |source| ClientError::from(QuicError::connection(self.target.clone(), source));
        let (mut send, recv) = self.conn.open_bi().await.map_err(lost)?;
        write_msg(&mut send, req, self.max_frame).await.map_err(|e| self.stream_error(e))?;
        Ok((send, recv))
    }

    fn stream_error(&self, source: ProtoError) -> ClientError {
        match self.conn.close_reason() {
            Some(reason) => QuicError::connection(self.target.clone(), reason).into(),
            None => ClientError::Proto { target: self.target.clone(), source },
        }
    }

    async fn answer(&self, recv: &mut quinn::RecvStream) -> Result<Response, ClientError> {
        match expect_msg(recv, self.max_frame, "a response").await.map_err(|e| self.stream_error(e))? {
            Response::Error(message) => Err(ClientError::Remote { target: self.target.clone(), message }),
            resp => Ok(resp),
        }
    }

    /// A write to a request stream failed: if the coordinator stopped reading because it refused
    /// the request (a full disk), its answer is waiting on `recv` and is the error to report.
    async fn refusal(&self, recv: &mut quinn::RecvStream, failed: ClientError) -> ClientError {
        if matches!(failed, ClientError::Changed(_) | ClientError::Remote { .. }) {
            return failed;
        }
        match tokio::time::timeout(REFUSAL_PATIENCE, expect_msg::<Response, _>(recv, self.max_frame, "a response"))
            .await
        {
            Ok(Ok(Response::Error(message))) => ClientError::Remote { target: self.target.clone(), message },
            _ => failed,
        }
    }

    /// Offers a context manifest: the files the coordinator lacks, once it holds and accepted the
    /// manifest. The manifest travels as a blob (sent only if the coordinator lacks it), so its size
    /// is bounded by the coordinator's context limits, not by a frame.
    pub async fn offer_context(&self, manifest: &crate::context::ContextManifest) -> Result<Vec<Digest>, ClientError> {
        let bytes = manifest.to_bytes();
        let digest = Digest::of(&bytes);
        let missing = self.put_context(&digest).await?;
        if missing != [digest.clone()] {
            return Ok(missing);
        }
        let (mut send, mut recv) = self.open(&Request::PutBlobs).await?;
        let size = bytes.len() as u64;
        let sent = async {
            write_msg(&mut send, &BlobHeader { digest: digest.clone(), size }, self.max_frame).await?;
            write_raw(&mut send, &mut &bytes[..], size).await
        };
        if let Err(e) = sent.await {
            return Err(self.refusal(&mut recv, self.stream_error(e)).await);
        }
        let _ = send.finish();
        match self.answer(&mut recv).await? {
            Response::Stored { .. } => {}
            other => return Err(self.unexpected("Stored", other)),
        }
        self.put_context(&digest).await
    }

    async fn put_context(&self, digest: &Digest) -> Result<Vec<Digest>, ClientError> {
        let (mut send, mut recv) = self.open(&Request::PutContext(digest.clone())).await?;
        let _ = send.finish();
        match self.answer(&mut recv).await? {
            Response::Missing(m) => Ok(m),
            other => Err(self.unexpected("Missing", other)),
        }
    }

    /// Offers the context's manifest and sends only the files the coordinator lacks.
    pub async fn upload_context(&self, scanned: &Scanned) -> Result<Upload, ClientError> {
        let manifest = &scanned.manifest;
        let missing = self.offer_context(manifest).await?;
        let sizes: std::collections::HashMap<Digest, u64> = manifest.blobs().into_iter().collect();
        let mut upload =
            Upload { files: manifest.file_count(), total_bytes: manifest.total_size(), blobs_sent: 0, bytes_sent: 0 };
        if missing.is_empty() {
            return Ok(upload);
        }
        let (mut send, mut recv) = self.open(&Request::PutBlobs).await?;
        let sent: Result<(), ClientError> = async {
            for digest in missing {
                let (Some(path), Some(&size)) = (scanned.sources.get(&digest), sizes.get(&digest)) else {
                    return Err(ClientError::Remote {
                        target: self.target.clone(),
                        message: format!("asked for {digest}, which is not in this context"),
                    });
                };
                let mut file = tokio::fs::File::open(path).await.map_err(|e| self.stream_error(e.into()))?;
                write_msg(&mut send, &BlobHeader { digest, size }, self.max_frame)
                    .await
                    .map_err(|e| self.stream_error(e))?;
                write_raw(&mut send, &mut file, size).await.map_err(|e| match e {
                    ProtoError::Truncated { .. } => ClientError::Changed(path.clone()),
                    e => self.stream_error(e),
                })?;
            }
            Ok(())
        }
        .await;
        if let Err(e) = sent {
            return Err(self.refusal(&mut recv, e).await);
        }
        let _ = send.finish();
        match self.answer(&mut recv).await? {
            Response::Stored { blobs, bytes } => {
                upload.blobs_sent = blobs;
                upload.bytes_sent = bytes;
                Ok(upload)
            }
            other => Err(self.unexpected("Stored", other)),
        }
    }

    /// Submits a build whose context was uploaded; follow it with [`Following::next`].
    pub async fn build(&self, spec: BuildSpec) -> Result<Following, ClientError> {
        let (mut send, mut recv) = self.open(&Request::Build(Box::new(spec))).await?;
        let _ = send.finish();
        match self.answer(&mut recv).await? {
            Response::Accepted { build } => {
                Ok(Following { build, recv, max_frame: self.max_frame, target: self.target.clone() })
            }
            other => Err(self.unexpected("Accepted", other)),
        }
    }

    /// Fetches the blobs in `digests` (a build's results, by digest) into `store`, which
    /// verifies each against its digest; those `store` already holds are not asked for.
    /// Returns the bytes received.
    pub async fn fetch_blobs(&self, digests: &[Digest], store: &crate::context::BlobStore) -> Result<u64, ClientError> {
        let missing = store.missing(digests);
        if missing.is_empty() {
            return Ok(0);
        }
        let (mut send, mut recv) = self.open(&Request::HaveBlobs(missing.clone())).await?;
        let _ = send.finish();
        match self.answer(&mut recv).await? {
            Response::Missing(gone) if gone.is_empty() => {}
            Response::Missing(gone) => {
                return Err(ClientError::Remote {
                    target: self.target.clone(),
                    message: format!("the coordinator's store no longer holds {} (of this build's results)", gone[0]),
                })
            }
            other => return Err(self.unexpected("Missing", other)),
        }
        let (mut send, mut recv) = self.open(&Request::GetBlobs(missing.clone())).await?;
        let _ = send.finish();
        receive_blobs(&mut recv, self.max_frame, &missing, store).await.map_err(|e| match e {
            Received::Proto(e) => self.stream_error(e),
            Received::Other { got, .. } => self.unexpected("the blob asked for", Response::Missing(vec![got])),
            Received::Store(e) => self.local(e),
        })
    }

    fn local(&self, e: crate::context::ContextError) -> ClientError {
        ClientError::Remote { target: self.target.clone(), message: format!("storing what it sent: {e}") }
    }

    fn unexpected(&self, expected: &'static str, got: Response) -> ClientError {
        ClientError::Proto {
            target: self.target.clone(),
            source: ProtoError::Unexpected { expected, got: format!("{got:?}") },
        }
    }
}

/// A build's log lines, stored then (when following) live.
pub struct LogLines {
    recv: quinn::RecvStream,
    max_frame: usize,
    target: String,
}

impl LogLines {
    pub async fn next(&mut self) -> Result<Option<(crate::Platform, String)>, ClientError> {
        let proto = |source| ClientError::Proto { target: self.target.clone(), source };
        match read_msg::<Response, _>(&mut self.recv, self.max_frame).await.map_err(proto)? {
            Some(Response::LogLine { platform, line }) => Ok(Some((platform, line))),
            Some(Response::Error(message)) => Err(ClientError::Remote { target: self.target.clone(), message }),
            Some(other) => Err(proto(ProtoError::Unexpected { expected: "a log line", got: format!("{other:?}") })),
            None => Ok(None),
        }
    }
}

impl Client {
    pub async fn logs(
        &self,
        build: &str,
        platform: Option<crate::Platform>,
        follow: bool,
    ) -> Result<LogLines, ClientError> {
        let (mut send, recv) = self.open(&Request::Logs { build: build.into(), platform, follow }).await?;
        let _ = send.finish();
        Ok(LogLines { recv, max_frame: self.max_frame, target: self.target.clone() })
    }
}

/// What joining a farm returned; the key never left this host.
pub struct Joined {
    pub role: crate::tls::Role,
    pub key_pem: String,
    pub cert_pem: String,
    pub ca_pem: String,
}

/// Joins the farm at `target` with `token`: the coordinator's CA must match the token's
/// fingerprint (checked during the TLS handshake, before the secret is sent); then a certificate
/// signing request for `name` is sent and the signed certificate comes back.
pub async fn join(
    target: &str,
    token: &crate::tls::JoinToken,
    name: &str,
    role: crate::tls::Role,
    limits: &TransportLimits,
    max_frame: usize,
) -> Result<Joined, ClientError> {
    let (key_pem, csr) = crate::tls::new_csr(name).map_err(QuicError::Tls)?;
    let (_endpoint, conn) = quic::connect_to_join(target, &token.ca_sha256, limits).await?;
    let client = Client { target: target.into(), _endpoint, conn, max_frame };
    let (mut send, _recv) = handshake(&client.conn, max_frame).await.map_err(|e| match e {
        HandshakeError::Connection(reason) => QuicError::connection(target, reason).into(),
        HandshakeError::Proto(source) => client.stream_error(source),
    })?;
    let _ = send.finish();
    let req = Request::Join { token_id: token.id.clone(), secret: token.secret.clone(), name: name.into(), csr, role };
    let resp = client.request(&req).await?;
    client.close();
    match resp {
        Response::Joined { role, cert_pem, ca_pem } => Ok(Joined { role, key_pem, cert_pem, ca_pem }),
        other => Err(client.unexpected("Joined", other)),
    }
}

/// (Agents) What failed in a request a task made of the coordinator over a session.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("fetching the context from the coordinator: {0}")]
    Proto(#[from] ProtoError),
    #[error("fetching the context from the coordinator: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("the coordinator answered {0}")]
    Unexpected(String),
    #[error("build context: {0}")]
    Context(#[from] crate::context::ContextError),
    #[error("reading the built image: {0}")]
    Image(std::io::Error),
    /// The receiving side has no room for what it would fetch (the message says where and how much).
    #[error("{0}")]
    NoSpace(String),
}

impl LinkError {
    /// Whether a write failed because the disk is full (a full disk is not a flaky link).
    pub fn is_no_space(&self) -> bool {
        match self {
            LinkError::NoSpace(_) => true,
            LinkError::Proto(ProtoError::Io(e)) => crate::disk::is_no_space(e),
            LinkError::Context(e) => e.is_no_space(),
            _ => false,
        }
    }

    /// A failure of the link, not of what was asked: the request may succeed on the next session.
    pub fn is_transient(&self) -> bool {
        if self.is_no_space() {
            return false;
        }
        matches!(self, LinkError::Connection(_) | LinkError::Proto(ProtoError::Io(_) | ProtoError::Truncated { .. }))
    }
}

/// (Agents) A task's side of one session with the coordinator: fetching a build context (the
/// receiving end of [`Client::upload_context`]) and uploading a built image's blobs. One request
/// per stream; a new session means a new `Link`.
#[derive(Debug, Clone)]
pub struct Link {
    conn: quinn::Connection,
    max_frame: usize,
}

impl Link {
    pub fn new(conn: quinn::Connection, max_frame: usize) -> Self {
        Link { conn, max_frame }
    }

    /// Which session this is: another connection has another id.
    pub fn session_id(&self) -> usize {
        self.conn.stable_id()
    }

    /// The session's connection, for the streams [`open_ssh_forward`] opens.
    pub fn connection(&self) -> &quinn::Connection {
        &self.conn
    }

    /// Fetches the context `digest` into `store`: its manifest first (a blob like the files it
    /// lists, verified by its digest), validated under `limits` (the coordinator's, under which it
    /// accepted the context) before any file is fetched; then the files `store` lacks. `room` is
    /// asked first whether `needed` bytes fit (the missing files plus the copy the build reads); its
    /// `Err(message)` stops the fetch with [`LinkError::NoSpace`] before a byte is fetched.
    pub async fn fetch_context(
        &self,
        digest: &Digest,
        store: &crate::context::BlobStore,
        limits: &crate::context::ContextLimits,
        room: impl FnOnce(u64) -> Result<(), String>,
    ) -> Result<crate::context::ValidManifest, LinkError> {
        if !store.has(digest) {
            self.get_blobs(std::slice::from_ref(digest), store).await?;
        }
        let manifest = store.get_manifest(digest, limits)?;
        let blobs = manifest.blobs();
        let wanted: Vec<Digest> = blobs.iter().map(|(d, _)| d.clone()).collect();
        let missing = store.missing(&wanted);
        let sizes: std::collections::HashMap<&Digest, u64> = blobs.iter().map(|(d, s)| (d, *s)).collect();
        let needed = missing.iter().map(|d| sizes[d]).sum::<u64>() + manifest.total_size();
        room(needed).map_err(LinkError::NoSpace)?;
        if !missing.is_empty() {
            self.get_blobs(&missing, store).await?;
        }
        Ok(manifest)
    }

    /// Fetches `digests` from the coordinator into `store`, each verified by its digest.
    pub async fn get_blobs(&self, digests: &[Digest], store: &crate::context::BlobStore) -> Result<(), LinkError> {
        let max = self.max_frame;
        let (mut send, mut recv) = self.conn.open_bi().await?;
        write_msg(&mut send, &Request::GetBlobs(digests.to_vec()), max).await?;
        let _ = send.finish();
        receive_blobs(&mut recv, max, digests, store).await.map_err(|e| match e {
            Received::Proto(e) => LinkError::Proto(e),
            Received::Other { want, got } => LinkError::Unexpected(format!("blob {got} instead of {want}")),
            Received::Store(e) => LinkError::Context(e),
        })?;
        Ok(())
    }

    /// Which of `digests` the coordinator's store lacks (`HaveBlobs`).
    pub async fn missing_blobs(&self, digests: Vec<Digest>) -> Result<Vec<Digest>, LinkError> {
        let max = self.max_frame;
        let (mut send, mut recv) = self.conn.open_bi().await?;
        write_msg(&mut send, &Request::HaveBlobs(digests), max).await?;
        let _ = send.finish();
        match expect_msg(&mut recv, max, "the missing blobs").await? {
            Response::Missing(m) => Ok(m),
            other => Err(LinkError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Sends `blobs` of the OCI layout at `dir` on one `PutBlobs` stream; the bytes sent.
    pub async fn put_layout_blobs(&self, dir: &std::path::Path, blobs: &[(Digest, u64)]) -> Result<u64, LinkError> {
        let max = self.max_frame;
        let (mut send, mut recv) = self.conn.open_bi().await?;
        write_msg(&mut send, &Request::PutBlobs, max).await?;
        let mut bytes = 0;
        for (digest, size) in blobs {
            let mut file = tokio::fs::File::open(crate::oci::blob_path(dir, digest)).await.map_err(LinkError::Image)?;
            write_msg(&mut send, &BlobHeader { digest: digest.clone(), size: *size }, max).await?;
            write_raw(&mut send, &mut file, *size).await?;
            bytes += size;
        }
        let _ = send.finish();
        match expect_msg(&mut recv, max, "the upload's result").await? {
            Response::Stored { blobs: n, .. } if n as usize == blobs.len() => Ok(bytes),
            other => Err(LinkError::Unexpected(format!("{other:?} to the image upload"))),
        }
    }
}

/// What went wrong receiving the answer to a `GetBlobs`.
enum Received {
    Proto(ProtoError),
    /// The coordinator sent blob `got` where `want` was due.
    Other {
        want: Digest,
        got: Digest,
    },
    Store(crate::context::ContextError),
}

/// Receives the blobs `wanted`, in that order, from the answer to a `GetBlobs` into `store`,
/// which verifies each against its digest; the bytes received. The CLI's and the agent's fetch.
async fn receive_blobs(
    recv: &mut quinn::RecvStream,
    max: usize,
    wanted: &[Digest],
    store: &crate::context::BlobStore,
) -> Result<u64, Received> {
    let mut bytes = 0;
    for want in wanted {
        let header: BlobHeader = expect_msg(recv, max, "a blob").await.map_err(Received::Proto)?;
        if &header.digest != want {
            return Err(Received::Other { want: want.clone(), got: header.digest });
        }
        let mut writer = store.writer(header.digest.clone()).map_err(Received::Store)?;
        crate::proto::io::read_raw(recv, header.size, &mut writer).await.map_err(Received::Proto)?;
        writer.commit().map_err(Received::Store)?;
        bytes += header.size;
    }
    Ok(bytes)
}

/// How long a peer may take to say which `--ssh` id a forward stream is for.
const SSH_REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// The client's side of `--ssh` while it follows a build: every stream the coordinator opens
/// names an id ([`Request::SshForward`]) and is connected to this machine's socket for it. The
/// keys stay here: only the ssh-agent protocol's bytes cross, inside the mutual-TLS connection.
/// Stops when dropped.
pub struct SshServer(tokio::task::JoinHandle<()>);

impl Drop for SshServer {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Client {
    /// Answers the coordinator's `--ssh` streams on this connection with `sockets` (id → local
    /// ssh-agent socket).
    pub fn serve_ssh(&self, sockets: std::collections::HashMap<String, std::path::PathBuf>) -> SshServer {
        let conn = self.conn.clone();
        let max = self.max_frame;
        let sockets = std::sync::Arc::new(sockets);
        SshServer(tokio::spawn(async move {
            while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                let sockets = sockets.clone();
                tokio::spawn(async move {
                    let req = tokio::time::timeout(SSH_REQUEST_TIMEOUT, expect_msg(&mut recv, max, "a request")).await;
                    let id = match req {
                        Ok(Ok(Request::SshForward { id, .. })) => id,
                        Ok(Ok(other)) => {
                            let msg = format!("a client answers only ssh forwards, not {other:?}");
                            let _ = write_msg(&mut send, &Response::Error(msg), max).await;
                            return;
                        }
                        _ => return,
                    };
                    let Some(path) = sockets.get(&id) else {
                        let msg = format!("this build has no --ssh id {id:?}; pass --ssh {id}=SOCKET|KEYFILE");
                        let _ = write_msg(&mut send, &Response::Error(msg), max).await;
                        return;
                    };
                    let local = match tokio::net::UnixStream::connect(path).await {
                        Ok(s) => s,
                        Err(e) => {
                            let msg = format!("--ssh {id}: the client cannot connect to {}: {e}", path.display());
                            let _ = write_msg(&mut send, &Response::Error(msg), max).await;
                            return;
                        }
                    };
                    if write_msg(&mut send, &Response::Ok, max).await.is_err() {
                        return;
                    }
                    let (lr, lw) = local.into_split();
                    if let Err(e) = crate::proto::io::splice(recv, send, lr, lw).await {
                        tracing::debug!(id, "ssh forward ended: {e}");
                    }
                });
            }
        }))
    }
}

/// (Agents) asks the coordinator to connect a new stream to the `--ssh` socket `id` of `build`
/// on the client that submitted it; after its `Ok` the streams carry the ssh-agent protocol.
pub async fn open_ssh_forward(
    conn: &quinn::Connection,
    build: &str,
    id: &str,
    max_frame: usize,
) -> Result<(quinn::SendStream, quinn::RecvStream), String> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    let req = Request::SshForward { build: build.into(), id: id.into() };
    write_msg(&mut send, &req, max_frame).await.map_err(|e| e.to_string())?;
    match expect_msg(&mut recv, max_frame, "an answer to an ssh forward").await.map_err(|e| e.to_string())? {
        Response::Ok => Ok((send, recv)),
        Response::Error(e) => Err(e),
        other => Err(format!("unexpected answer {other:?}")),
    }
}
