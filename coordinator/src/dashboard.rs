//! The web dashboard (`dashboard_listen`): HTTPS with the coordinator's own certificate; agents,
//! the queue, recent builds with a timeline per platform, and a build page that streams its log
//! (server-sent events) and can cancel it.
//!
//! Nobody gets in without proof: `farm dashboard` asks for a login token over the QUIC request
//! channel (so the coordinator knows whose it is); the token works once, for [`TOKEN_TTL`], and
//! becomes a session cookie (HttpOnly, Secure, SameSite=Strict). A client identity sees and
//! cancels only its own builds; an admin everything. Without a session every page redirects to
//! `/login` (303) and every API answers 401. [`Logins`] is pure (time passed in); sessions live in
//! memory, so a coordinator restart ends them. Pages, script and style are files in
//! `dashboard/`, compiled in: nothing is fetched from anywhere else.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use shared::proto::{AgentView, BuildView, PlatformResult, Request};
use shared::tls::{Identity, Role};
use shared::Platform;
use tokio::sync::{mpsc, oneshot};

use crate::events::Event;

/// How long a login token from `farm dashboard` can be used (once).
pub const TOKEN_TTL: Duration = Duration::from_secs(60);
/// How long a session lasts after its login.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// How long a used or expired token is remembered, to say so rather than "not valid".
const REMEMBER: Duration = Duration::from_secs(600);
/// At most this many links wait to be used (or are remembered as used) at once.
pub const MAX_PENDING: usize = 10_000;
/// The session cookie's name.
pub const COOKIE: &str = "farm_session";

pub const USED: &str = "this login link was already used: each link logs in once. Run `farm dashboard` for a new one.";
pub const EXPIRED: &str = "this login link expired (links last 60 s). Run `farm dashboard` for a new one.";
pub const UNKNOWN: &str = "this login link is not valid here (a coordinator restart forgets every link and session). \
                           Run `farm dashboard` for a new one.";
pub const NO_TOKEN: &str = "log in with the link `farm dashboard` prints (run by an admin or client identity).";

/// The login link for a coordinator reached at `coordinator` (`HOST:PORT`, as the CLI dials
/// it): the same host, the dashboard's port.
pub fn url(coordinator: &str, port: u16, token: &str) -> String {
    let host = match coordinator.rsplit_once(':') {
        Some((host, p)) if p.parse::<u16>().is_ok() => host,
        _ => coordinator,
    };
    let host = match host.contains(':') && !host.starts_with('[') {
        true => format!("[{host}]"),
        false => host.to_string(),
    };
    format!("https://{host}:{port}/login?token={token}")
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoginError {
    Used,
    Expired,
    Unknown,
}

impl std::fmt::Display for LoginError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LoginError::Used => USED,
            LoginError::Expired => EXPIRED,
            LoginError::Unknown => UNKNOWN,
        })
    }
}

struct Pending {
    who: Identity,
    expires: Instant,
    used: bool,
}

struct Session {
    who: Identity,
    expires: Instant,
}

/// Login tokens and sessions, kept by the SHA-256 of their secret. Pure: `now` is passed in.
#[derive(Default)]
pub struct Logins {
    tokens: HashMap<[u8; 32], Pending>,
    sessions: HashMap<[u8; 32], Session>,
}

fn key(secret: &str) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, secret.as_bytes());
    d.as_ref().try_into().expect("SHA-256 has 32 bytes")
}

fn random_secret() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

impl Logins {
    /// A new login token for `who`, valid once until `now + TOKEN_TTL`; refused while
    /// [`MAX_PENDING`] others are pending (memory stays bounded whoever asks).
    pub fn issue(&mut self, now: Instant, who: Identity) -> Result<String, String> {
        self.prune(now);
        if self.tokens.len() >= MAX_PENDING {
            return Err(format!(
                "{MAX_PENDING} dashboard login links are pending already; try again in a few minutes (links are \
                 forgotten 10 minutes after they expire)"
            ));
        }
        let token = random_secret();
        self.tokens.insert(key(&token), Pending { who, expires: now + TOKEN_TTL, used: false });
        Ok(token)
    }

    /// Exchanges a token for a new session's secret (the cookie's value).
    pub fn redeem(&mut self, now: Instant, token: &str) -> Result<(String, Identity), LoginError> {
        self.prune(now);
        let pending = self.tokens.get_mut(&key(token)).ok_or(LoginError::Unknown)?;
        if pending.used {
            return Err(LoginError::Used);
        }
        if now >= pending.expires {
            return Err(LoginError::Expired);
        }
        pending.used = true;
        let who = pending.who.clone();
        let session = random_secret();
        self.sessions.insert(key(&session), Session { who: who.clone(), expires: now + SESSION_TTL });
        Ok((session, who))
    }

    /// Whose session `secret` is, if it is one and has not expired.
    pub fn session(&self, now: Instant, secret: &str) -> Option<Identity> {
        self.sessions.get(&key(secret)).filter(|s| now < s.expires).map(|s| s.who.clone())
    }

    pub fn logout(&mut self, secret: &str) {
        self.sessions.remove(&key(secret));
    }

    fn prune(&mut self, now: Instant) {
        self.tokens.retain(|_, t| now < t.expires + REMEMBER);
        self.sessions.retain(|_, s| now < s.expires);
    }
}

/// What the driver hands the dashboard: read from the core in one step, never waiting on I/O.
#[derive(Debug)]
pub struct Snapshot {
    pub agents: Vec<AgentView>,
    /// One entry per queued task.
    pub queued: Vec<Platform>,
    /// Newest first, each with its platforms' results so far (phases, cached).
    pub builds: Vec<(BuildView, Vec<PlatformResult>)>,
}

/// Shared by the HTTPS server and the QUIC side (which issues tokens).
pub struct Dashboard {
    logins: Mutex<Logins>,
    /// The port the dashboard listens on (the URL's host is the coordinator's).
    pub port: u16,
}

impl Dashboard {
    pub fn new(port: u16) -> Self {
        Self { logins: Mutex::default(), port }
    }

    /// A login token for `who` (an admin or a client).
    pub fn login_token(&self, who: Identity) -> Result<String, String> {
        self.logins.lock().unwrap().issue(Instant::now(), who)
    }
}

#[derive(Clone)]
struct App {
    dashboard: Arc<Dashboard>,
    events: mpsc::Sender<Event>,
}

const INDEX: &str = include_str!("dashboard/index.html");
const BUILD: &str = include_str!("dashboard/build.html");
const LOGIN: &str = include_str!("dashboard/login.html");
const SCRIPT: &str = include_str!("dashboard/app.js");
const STYLE: &str = include_str!("dashboard/style.css");

/// Nothing but this origin: no CDN, no outside fetch, no framing.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; \
                   form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

fn secure(mut r: Response) -> Response {
    let h = r.headers_mut();
    h.insert(header::CONTENT_SECURITY_POLICY, header::HeaderValue::from_static(CSP));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, header::HeaderValue::from_static("nosniff"));
    h.insert(header::CACHE_CONTROL, header::HeaderValue::from_static("no-store"));
    h.insert(header::REFERRER_POLICY, header::HeaderValue::from_static("no-referrer"));
    r
}

fn html(status: StatusCode, body: String) -> Response {
    secure((status, [(header::CONTENT_TYPE, "text/html; charset=utf-8")], body).into_response())
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

fn login_page(status: StatusCode, message: &str) -> Response {
    html(status, LOGIN.replace("{{message}}", &escape(message)))
}

fn cookie_value<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find_map(|(k, v)| (k == name).then_some(v))
}

/// Why a request gets no page: small, so that handlers can use `?`.
#[derive(Debug)]
enum Refusal {
    /// A page without a session: to the login page.
    Login,
    /// An API call without a session.
    NoSession,
    NotFound(String),
    Conflict(String),
    Forbidden(&'static str),
    ShuttingDown,
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let text = |status: StatusCode, body: String| secure((status, body).into_response());
        match self {
            Refusal::Login => secure((StatusCode::SEE_OTHER, [(header::LOCATION, "/login")]).into_response()),
            Refusal::NoSession => text(
                StatusCode::UNAUTHORIZED,
                "no dashboard session: log in with the link `farm dashboard` prints\n".into(),
            ),
            Refusal::NotFound(m) => text(StatusCode::NOT_FOUND, format!("{m}\n")),
            Refusal::Conflict(m) => text(StatusCode::CONFLICT, format!("{m}\n")),
            Refusal::Forbidden(m) => text(StatusCode::FORBIDDEN, format!("{m}\n")),
            Refusal::ShuttingDown => text(StatusCode::SERVICE_UNAVAILABLE, "the coordinator is shutting down\n".into()),
        }
    }
}

type Answer = Result<Response, Refusal>;

impl App {
    fn who(&self, headers: &HeaderMap) -> Option<Identity> {
        let secret = cookie_value(headers, COOKIE)?;
        self.dashboard.logins.lock().unwrap().session(Instant::now(), secret)
    }

    /// The session's identity, or (for a page) the way to the login page.
    fn page_auth(&self, headers: &HeaderMap) -> Result<Identity, Refusal> {
        self.who(headers).ok_or(Refusal::Login)
    }

    /// The session's identity, or 401 for an API call without one.
    fn api_auth(&self, headers: &HeaderMap) -> Result<Identity, Refusal> {
        self.who(headers).ok_or(Refusal::NoSession)
    }

    async fn snapshot(&self, who: &Identity, build: Option<String>) -> Result<Snapshot, Refusal> {
        let owner = (who.role != Role::Admin).then(|| who.name.clone());
        let (reply, rx) = oneshot::channel();
        self.events.send(Event::Dashboard { owner, build, reply }).await.map_err(|_| Refusal::ShuttingDown)?;
        rx.await.map_err(|_| Refusal::ShuttingDown)
    }

    /// The build `id` if `who` may see it; else 404 (a client is not told another's exists).
    async fn visible_build(&self, who: &Identity, id: &str) -> Result<(BuildView, Vec<PlatformResult>), Refusal> {
        let snap = self.snapshot(who, Some(id.to_string())).await?;
        snap.builds.into_iter().next().ok_or_else(|| Refusal::NotFound(format!("no build {id} that {who} may see")))
    }
}

fn json(value: serde_json::Value) -> Response {
    secure(([(header::CONTENT_TYPE, "application/json")], value.to_string()).into_response())
}

fn agent_json(a: &AgentView) -> serde_json::Value {
    let list = |ps: &[Platform]| ps.iter().map(Platform::to_string).collect::<Vec<_>>();
    serde_json::json!({
        "name": a.name,
        "state": a.state.to_string(),
        "native": list(&a.native),
        "emulated": list(&a.emulated),
        "labels": a.labels,
        "capacity": a.capacity,
        "busy": a.busy,
        "last_seen_ms": a.last_seen_ms,
        "builder": format!("{} {}", a.builder, a.builder_version),
        "address": a.address,
    })
}

fn build_json(b: &BuildView, results: &[PlatformResult]) -> serde_json::Value {
    let platforms: Vec<serde_json::Value> = b
        .platforms
        .iter()
        .map(|t| {
            let r = results.iter().find(|r| r.platform == t.platform);
            let phases: Vec<serde_json::Value> = r
                .map(|r| r.timings.iter().map(|p| serde_json::json!({"name": p.name, "ms": p.ms})).collect())
                .unwrap_or_default();
            let cached = r.is_some_and(|r| r.cached);
            let placement = match (cached, t.emulated, &t.agent) {
                (true, _, _) => "cached",
                (false, true, _) => "emulated",
                (false, false, Some(_)) => "native",
                (false, false, None) => "",
            };
            let state = match t.state.as_str() {
                "done" => "succeeded",
                s => s,
            };
            serde_json::json!({
                "platform": t.platform.to_string(),
                "state": state,
                "agent": t.agent,
                "placement": placement,
                "attempt": t.attempt,
                "duration_ms": t.duration_ms,
                "phases": phases,
            })
        })
        .collect();
    serde_json::json!({
        "id": b.id,
        "state": b.state,
        "client": b.client,
        "created_ms": b.created_ms,
        "tags": b.tags,
        "index": b.index.as_ref().map(|d| d.to_string()),
        "error": b.error,
        "platforms": platforms,
    })
}

async fn login(State(app): State<App>, uri: Uri) -> Response {
    let token = uri.query().unwrap_or("").split('&').find_map(|kv| kv.strip_prefix("token="));
    let Some(token) = token.filter(|t| !t.is_empty()) else {
        return login_page(StatusCode::UNAUTHORIZED, NO_TOKEN);
    };
    let redeemed = app.dashboard.logins.lock().unwrap().redeem(Instant::now(), token);
    match redeemed {
        Ok((session, who)) => {
            tracing::info!(%who, "dashboard login");
            let cookie = format!(
                "{COOKIE}={session}; Path=/; HttpOnly; Secure; SameSite=Strict; Max-Age={}",
                SESSION_TTL.as_secs()
            );
            secure(
                (StatusCode::SEE_OTHER, [(header::LOCATION, "/".to_string()), (header::SET_COOKIE, cookie)])
                    .into_response(),
            )
        }
        Err(e) => {
            tracing::warn!("dashboard login refused: {e}");
            login_page(StatusCode::UNAUTHORIZED, &e.to_string())
        }
    }
}

async fn logout(State(app): State<App>, headers: HeaderMap) -> Response {
    if let Some(secret) = cookie_value(&headers, COOKIE) {
        app.dashboard.logins.lock().unwrap().logout(secret);
    }
    let clear = format!("{COOKIE}=; Path=/; HttpOnly; Secure; SameSite=Strict; Max-Age=0");
    secure(
        (StatusCode::SEE_OTHER, [(header::LOCATION, "/login".to_string()), (header::SET_COOKIE, clear)])
            .into_response(),
    )
}

async fn index(State(app): State<App>, headers: HeaderMap) -> Answer {
    app.page_auth(&headers)?;
    Ok(html(StatusCode::OK, INDEX.to_string()))
}

async fn build_page(State(app): State<App>, headers: HeaderMap, Path(id): Path<String>) -> Answer {
    let who = app.page_auth(&headers)?;
    app.visible_build(&who, &id).await?;
    Ok(html(StatusCode::OK, BUILD.replace("{{build}}", &escape(&id))))
}

async fn asset(State(app): State<App>, headers: HeaderMap, Path(name): Path<String>) -> Answer {
    app.page_auth(&headers)?;
    let (body, kind) = match name.as_str() {
        "app.js" => (SCRIPT, "text/javascript; charset=utf-8"),
        "style.css" => (STYLE, "text/css; charset=utf-8"),
        _ => return Err(Refusal::NotFound(format!("no asset {name}"))),
    };
    Ok(secure(([(header::CONTENT_TYPE, kind)], body).into_response()))
}

async fn overview(State(app): State<App>, headers: HeaderMap) -> Answer {
    let who = app.api_auth(&headers)?;
    let snap = app.snapshot(&who, None).await?;
    let mut queue = std::collections::BTreeMap::<String, usize>::new();
    for p in &snap.queued {
        *queue.entry(p.to_string()).or_default() += 1;
    }
    Ok(json(serde_json::json!({
        "me": who.name,
        "role": who.role.to_string(),
        "agents": snap.agents.iter().map(agent_json).collect::<Vec<_>>(),
        "queue": queue,
        "builds": snap.builds.iter().map(|(b, r)| build_json(b, r)).collect::<Vec<_>>(),
    })))
}

async fn build_api(State(app): State<App>, headers: HeaderMap, Path(id): Path<String>) -> Answer {
    let who = app.api_auth(&headers)?;
    let (b, r) = app.visible_build(&who, &id).await?;
    Ok(json(build_json(&b, &r)))
}

async fn cancel(State(app): State<App>, headers: HeaderMap, Path(id): Path<String>) -> Answer {
    let who = app.api_auth(&headers)?;
    // Only this page's script sends the header (SameSite=Strict already keeps other sites out).
    if headers.get("x-farm-dashboard").is_none() {
        return Err(Refusal::Forbidden("cancel from the dashboard's build page"));
    }
    app.visible_build(&who, &id).await?;
    let (reply, rx) = oneshot::channel();
    let req = Request::Cancel { build: id.clone() };
    app.events.send(Event::Request { peer: who.clone(), req, reply }).await.map_err(|_| Refusal::ShuttingDown)?;
    match rx.await.map_err(|_| Refusal::ShuttingDown)? {
        shared::proto::Response::Ok => {
            tracing::info!(build = %id, by = %who, "build cancelled from the dashboard");
            Ok(json(serde_json::json!({"cancelled": id})))
        }
        shared::proto::Response::Error(e) => Err(Refusal::Conflict(e)),
        other => Err(Refusal::Conflict(format!("unexpected answer {other:?}"))),
    }
}

/// The build's stored log lines, then live ones until it ends, as server-sent events (`log`:
/// `{"platform", "line"}`; `end` when there are no more).
async fn logs(State(app): State<App>, headers: HeaderMap, Path(id): Path<String>) -> Answer {
    use axum::response::sse::{Event as Sse, KeepAlive};
    let who = app.api_auth(&headers)?;
    app.visible_build(&who, &id).await?;
    let (sink, lines) = mpsc::unbounded_channel();
    let (reply, ok) = oneshot::channel();
    let event = Event::Logs { build: id, platform: None, follow: true, sink, reply };
    app.events.send(event).await.map_err(|_| Refusal::ShuttingDown)?;
    ok.await.map_err(|_| Refusal::ShuttingDown)?.map_err(Refusal::NotFound)?;
    let stream = futures_util::stream::unfold(Some(lines), |state| async move {
        let mut lines = state?;
        let (event, next) = match lines.recv().await {
            Some((platform, line)) => {
                let data = serde_json::json!({"platform": platform.to_string(), "line": line}).to_string();
                (Sse::default().event("log").data(data), Some(lines))
            }
            None => (Sse::default().event("end").data("end"), None),
        };
        Some((Ok::<_, std::convert::Infallible>(event), next))
    });
    Ok(secure(axum::response::sse::Sse::new(stream).keep_alive(KeepAlive::default()).into_response()))
}

/// Any other path: to the login page (or 401 for `/api/`) without a session, else 404.
async fn fallback(State(app): State<App>, headers: HeaderMap, uri: Uri) -> Answer {
    match uri.path().starts_with("/api/") {
        true => app.api_auth(&headers)?,
        false => app.page_auth(&headers)?,
    };
    Err(Refusal::NotFound(format!("no page {}", uri.path())))
}

/// TLS over a TCP listener for axum: handshakes run in their own tasks (a slow one holds up no
/// other), finished connections come through a channel.
struct TlsListener {
    incoming: mpsc::Receiver<(tokio_rustls::server::TlsStream<tokio::net::TcpStream>, std::net::SocketAddr)>,
    local: std::net::SocketAddr,
}

impl TlsListener {
    fn new(listener: tokio::net::TcpListener, config: Arc<rustls::ServerConfig>) -> std::io::Result<Self> {
        let local = listener.local_addr()?;
        let (tx, incoming) = mpsc::channel(64);
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        tokio::spawn(async move {
            loop {
                let (tcp, addr) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::debug!("dashboard accept: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let (acceptor, conn_tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            let _ = conn_tx.send((tls, addr)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%addr, "dashboard TLS handshake failed: {e}"),
                        Err(_) => tracing::debug!(%addr, "dashboard TLS handshake timed out"),
                    }
                });
                if tx.is_closed() {
                    return;
                }
            }
        });
        Ok(Self { incoming, local })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.incoming.recv().await {
            Some(c) => c,
            // The accept loop never ends while this listener exists.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

/// Serves the dashboard over HTTPS until the runtime stops.
pub async fn serve(
    listener: tokio::net::TcpListener,
    tls: rustls::ServerConfig,
    dashboard: Arc<Dashboard>,
    events: mpsc::Sender<Event>,
) {
    use axum::routing::{get, post};
    let app = App { dashboard, events };
    let router = axum::Router::new()
        .route("/login", get(login))
        .route("/logout", post(logout))
        .route("/", get(index))
        .route("/builds/{id}", get(build_page))
        .route("/static/{name}", get(asset))
        .route("/api/overview", get(overview))
        .route("/api/builds/{id}", get(build_api))
        .route("/api/builds/{id}/logs", get(logs))
        .route("/api/builds/{id}/cancel", post(cancel))
        .fallback(fallback)
        .with_state(app);
    let listener = match TlsListener::new(listener, Arc::new(tls)) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!("dashboard server stopped: {e}");
            return;
        }
    };
    if let Err(e) = axum::serve(listener, router).await {
        tracing::warn!("dashboard server stopped: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(name: &str) -> Identity {
        Identity { name: name.into(), role: Role::Client }
    }

    #[test]
    fn a_token_logs_in_once_within_its_minute_and_its_session_names_its_identity() {
        let t0 = Instant::now();
        let mut logins = Logins::default();
        let token = logins.issue(t0, client("alice")).unwrap();
        let (session, who) = logins.redeem(t0 + Duration::from_secs(59), &token).unwrap();
        assert_eq!(who, client("alice"));
        assert_eq!(logins.session(t0 + Duration::from_secs(60), &session), Some(client("alice")));
        assert_eq!(logins.redeem(t0 + Duration::from_secs(59), &token), Err(LoginError::Used));
        assert_eq!(LoginError::Used.to_string(), USED);
        let late = logins.issue(t0, client("bob")).unwrap();
        assert_eq!(logins.redeem(t0 + TOKEN_TTL, &late), Err(LoginError::Expired));
        assert_eq!(logins.redeem(t0, "not-a-token"), Err(LoginError::Unknown));
        assert_eq!(logins.session(t0, &token), None, "a token is not a session");
        assert_eq!(logins.session(t0 + SESSION_TTL + Duration::from_secs(60), &session), None);
        logins.logout(&session);
        assert_eq!(logins.session(t0, &session), None);
    }

    #[test]
    fn pending_links_are_bounded_and_forgotten_ten_minutes_after_they_expire() {
        let t0 = Instant::now();
        let mut logins = Logins::default();
        for _ in 0..MAX_PENDING {
            logins.issue(t0, client("spam")).unwrap();
        }
        let refused = logins.issue(t0, client("alice")).unwrap_err();
        assert!(refused.starts_with("10000 dashboard login links are pending already"), "{refused}");
        let later = t0 + TOKEN_TTL + REMEMBER;
        assert!(logins.issue(later, client("alice")).is_ok());
        assert_eq!(logins.tokens.len(), 1);
    }

    #[test]
    fn the_link_uses_the_coordinators_host_and_the_dashboards_port() {
        assert_eq!(url("127.0.0.1:3276", 8443, "ab"), "https://127.0.0.1:8443/login?token=ab");
        assert_eq!(url("farm.example.org:3276", 443, "ab"), "https://farm.example.org:443/login?token=ab");
        assert_eq!(url("[::1]:3276", 8443, "ab"), "https://[::1]:8443/login?token=ab");
        assert_eq!(url("farm.lan", 8443, "ab"), "https://farm.lan:8443/login?token=ab");
    }

    #[test]
    fn the_session_cookie_is_found_among_others() {
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, "a=1; farm_session=abc; b=2".parse().unwrap());
        assert_eq!(cookie_value(&h, COOKIE), Some("abc"));
        assert_eq!(cookie_value(&HeaderMap::new(), COOKIE), None);
    }
}
