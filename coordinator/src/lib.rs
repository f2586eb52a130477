//! The coordinator: the one place that knows every agent and (soon) every build.
//!
//! Layers, one per file, from the pure core outwards:
//! - [`fleet`]: agents, their platforms and liveness, as a state machine over `now`;
//! - [`sched`]: where a task runs (native first, QEMU only as a fallback), a pure function;
//! - [`core`]: builds and tasks: submit, assign, retry, fence, stitch; pure, actions out;
//! - [`driver`]: the single task that owns the core, feeds it events, commits, then acts;
//! - [`dashboard`]: the web dashboard over HTTPS (`dashboard_listen`), logged into with `farm dashboard`'s one-time token;
//! - [`logs`]: build logs on disk, replayable with `farm logs`;
//! - [`lookup`]: builds looked up in the store (by prefix, or ended long ago) off the driver's task;
//! - [`net`]: QUIC accept loop, handshake, per-peer tasks, context transfer; bytes into events.
//! - [`store`]: the redb file: every table and transaction in one place; commits are durable before anything is acknowledged.
//!
//! Entry point: [`Coordinator::bind`] then [`Coordinator::run`] with a shutdown future, as in
//! mini-redis, so the binary, the tests and the embedded single-machine mode all start it alike.

pub mod clock;
pub mod core;
pub mod dashboard;
pub mod driver;
pub mod enroll;
pub mod events;
pub mod fleet;
pub mod gate;
pub mod logs;
pub mod lookup;
pub mod metrics;
pub mod net;
pub mod sched;
pub mod store;
pub mod webhooks;

use std::{future::Future, net::SocketAddr, path::PathBuf, time::Duration};

use std::sync::Arc;

use shared::context::{BlobStore, ContextError, ContextLimits};
use shared::quic::{QuicError, TransportLimits};
use shared::tls::{self, TlsError};

/// Everything the coordinator needs to start. Defaults work on one machine on loopback.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    /// Holds `ca.crt` and the coordinator's own `coordinator.crt`/`coordinator.key`.
    pub ca_dir: PathBuf,
    pub state_dir: PathBuf,
    /// An agent silent this long is offline.
    pub heartbeat_timeout: Duration,
    pub max_frame_bytes: usize,
    pub transport: TransportLimits,
    /// How often a task is handed out before its build fails.
    pub max_attempts: u32,
    pub context_limits: ContextLimits,
    pub max_log_bytes_per_task: u64,
    pub limits: core::Limits,
    /// `metrics_listen`: where Prometheus scrapes `GET /metrics` (plain HTTP); `None`: off.
    pub metrics_listen: Option<SocketAddr>,
    /// `dashboard_listen`: where the web dashboard is served (HTTPS, the coordinator's
    /// certificate); `None`: off.
    pub dashboard_listen: Option<SocketAddr>,
    /// `[[webhooks]]`: told when any build ends.
    pub webhooks: Vec<webhooks::Webhook>,
    /// `notify_secret`: signs the notices sent to builds' own `--notify` URLs.
    pub notify_secret: Option<String>,
    /// Sign every index pushed (`sign = true`), as `farm build --sign` asks for one build. Needs
    /// `signing.key` in `ca_dir`.
    pub sign: bool,
    /// `cache_repo`: every build's layer cache goes to the registry under it, per platform,
    /// unless the build names its own with `--cache-to` / `--cache-from`.
    pub cache_repo: Option<shared::cache::CacheRef>,
    /// How many ended builds stay in memory (older ones are read from the store when asked for).
    pub keep_ended_builds: usize,
}

pub const DEFAULT_PORT: u16 = 3276;
pub const DEFAULT_HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(15);

impl Config {
    pub fn new(ca_dir: PathBuf, state_dir: PathBuf) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], DEFAULT_PORT)),
            ca_dir,
            state_dir,
            heartbeat_timeout: DEFAULT_HEARTBEAT_TIMEOUT,
            max_frame_bytes: shared::proto::DEFAULT_MAX_FRAME,
            transport: TransportLimits::default(),
            max_attempts: 3,
            context_limits: ContextLimits::default(),
            max_log_bytes_per_task: logs::DEFAULT_MAX_BYTES_PER_TASK,
            limits: core::Limits::default(),
            metrics_listen: None,
            dashboard_listen: None,
            webhooks: vec![],
            notify_secret: None,
            sign: false,
            cache_repo: None,
            keep_ended_builds: core::KEEP_ENDED_BUILDS,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Quic(#[from] QuicError),
    #[error("cannot create state directory {path}: {source}")]
    StateDir { path: PathBuf, source: std::io::Error },
    #[error("content store: {0}")]
    Blobs(#[from] ContextError),
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    Signing(#[from] shared::signing::SigningError),
    #[error("the coordinator's driver stopped unexpectedly")]
    Driver,
    #[error(
        "cannot serve metrics on {addr} (config key metrics_listen): {source}; choose a free address, or remove \
         the key to turn metrics off"
    )]
    Metrics { addr: SocketAddr, source: std::io::Error },
    #[error(
        "cannot serve the dashboard on {addr} (config key dashboard_listen): {source}; choose a free address, or \
         remove the key to turn the dashboard off"
    )]
    Dashboard { addr: SocketAddr, source: std::io::Error },
}

/// A coordinator bound to its address, not yet serving.
pub struct Coordinator {
    config: Config,
    endpoint: quinn::Endpoint,
    blobs: Arc<BlobStore>,
    store: store::Store,
    metrics: Option<std::net::TcpListener>,
    /// The dashboard's listener and TLS configuration.
    dashboard: Option<(std::net::TcpListener, rustls::ServerConfig)>,
    /// The farm's signing key (`signing.key` in the CA directory), if it has one.
    signer: Option<shared::cosign::SigningKey>,
}

impl Coordinator {
    pub fn bind(config: Config) -> Result<Self, CoordinatorError> {
        std::fs::create_dir_all(&config.state_dir)
            .map_err(|source| CoordinatorError::StateDir { path: config.state_dir.clone(), source })?;
        let creds = tls::load_credentials(&config.ca_dir, tls::COORDINATOR_NAME)?;
        let store = store::Store::open(&config.state_dir)?;
        let blobs = Arc::new(BlobStore::open(&config.state_dir.join("blobs"))?);
        // Read once, held in memory only; `sign = true` without a key is refused at start.
        let signer = match config.sign {
            true => Some(shared::signing::require_signing_key(&config.ca_dir)?),
            false => shared::signing::load_signing_key(&config.ca_dir)?,
        };
        let endpoint = shared::quic::server_endpoint(config.listen, &creds, &config.transport)?;
        let metrics = match config.metrics_listen {
            Some(addr) => Some(
                std::net::TcpListener::bind(addr)
                    .and_then(|l| l.set_nonblocking(true).map(|()| l))
                    .map_err(|source| CoordinatorError::Metrics { addr, source })?,
            ),
            None => None,
        };
        let dashboard = match config.dashboard_listen {
            Some(addr) => Some((
                std::net::TcpListener::bind(addr)
                    .and_then(|l| l.set_nonblocking(true).map(|()| l))
                    .map_err(|source| CoordinatorError::Dashboard { addr, source })?,
                tls::https_server_config(&creds)?,
            )),
            None => None,
        };
        Ok(Self { config, endpoint, blobs, store, metrics, dashboard, signer })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.endpoint.local_addr().expect("a bound endpoint has an address")
    }

    /// Where the dashboard listens, if it is on.
    pub fn dashboard_addr(&self) -> Option<SocketAddr> {
        self.dashboard.as_ref().and_then(|(l, _)| l.local_addr().ok())
    }

    /// Serves until `shutdown` resolves, then closes every connection and returns.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), CoordinatorError> {
        let addr = self.local_addr();
        tracing::info!(%addr, "coordinator listening (QUIC, mutual TLS)");
        let (events, rx) = tokio::sync::mpsc::channel(1024);
        let (tokens, revoked) = self.store.load_security()?;
        let security = enroll::Security::restore(tokens, revoked);
        let gate = Arc::new(gate::Gate::new(security.revoked_names().map(String::from)));
        let ca = match tls::CertAuthority::open(&self.config.ca_dir) {
            Ok(ca) => Some(ca),
            Err(TlsError::NoCaKey { .. }) => None,
            Err(e) => return Err(e.into()),
        };
        let registries = Arc::new(shared::registry::RegistryPool::default());
        let metrics = Arc::new(metrics::Metrics::new());
        if let Some(listener) = self.metrics {
            let listener = tokio::net::TcpListener::from_std(listener)
                .map_err(|source| CoordinatorError::Metrics { addr: self.config.metrics_listen.unwrap(), source })?;
            let at = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
            tracing::info!("metrics at http://{at}/metrics");
            tokio::spawn(metrics::serve(listener, metrics.clone(), events.clone()));
        }
        let dashboard = match self.dashboard {
            Some((listener, tls)) => {
                let addr = self.config.dashboard_listen.unwrap();
                let listener = tokio::net::TcpListener::from_std(listener)
                    .map_err(|source| CoordinatorError::Dashboard { addr, source })?;
                let at = listener.local_addr().map_err(|source| CoordinatorError::Dashboard { addr, source })?;
                tracing::info!("dashboard at https://{at}/ (log in with the link `farm dashboard` prints)");
                let dashboard = Arc::new(dashboard::Dashboard::new(at.port()));
                tokio::spawn(dashboard::serve(listener, tls, dashboard.clone(), events.clone()));
                Some(dashboard)
            }
            None => None,
        };
        let driver = driver::Driver::new(
            &self.config,
            self.store,
            security,
            ca,
            gate.clone(),
            registries.clone(),
            self.blobs.clone(),
            events.clone(),
            metrics.clone(),
            self.signer,
        )?;
        let mut driver = tokio::spawn(driver.run(rx));
        let net = net::Net {
            max_frame: self.config.max_frame_bytes,
            events,
            store: self.blobs.clone(),
            state_dir: self.config.state_dir.clone(),
            limits: self.config.context_limits.clone(),
            accepted: Default::default(),
            gate,
            registries,
            ssh: Default::default(),
            metrics,
            dashboard,
            refusals: Default::default(),
        };
        // Every change is committed before it is acknowledged, so stopping needs no final save.
        let result = tokio::select! {
            () = net.serve(self.endpoint.clone()) => Ok(()),
            () = shutdown => {
                tracing::info!("coordinator shutting down");
                Ok(())
            }
            r = &mut driver => match r {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(CoordinatorError::Store(e)),
                Err(_) => Err(CoordinatorError::Driver),
            },
        };
        self.endpoint.close(0u32.into(), b"coordinator shutting down");
        drop(net);
        driver.abort();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), self.endpoint.wait_idle()).await;
        result
    }
}
