//! The coordinator: the one place that knows every agent and (soon) every build.
//!
//! Layers, one per file, from the pure core outwards:
//! - [`fleet`]: agents, their platforms and liveness, as a state machine over `now`;
//! - [`sched`]: where a task runs (native first, QEMU only as a fallback), a pure function;
//! - [`core`]: builds and tasks: submit, assign, retry, fence, stitch; pure, actions out;
//! - [`driver`]: the single task that owns the core, feeds it events and executes what it decides;
//! - [`net`]: QUIC accept loop, handshake, per-peer tasks, context transfer; bytes into events.
//!
//! Entry point: [`Coordinator::bind`] then [`Coordinator::run`] with a shutdown future, as in
//! mini-redis, so the binary, the tests and the embedded single-machine mode all start it alike.

pub mod core;
pub mod driver;
pub mod fleet;
pub mod net;
pub mod sched;

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
    Store(#[from] ContextError),
}

/// A coordinator bound to its address, not yet serving.
pub struct Coordinator {
    config: Config,
    endpoint: quinn::Endpoint,
    store: Arc<BlobStore>,
}

impl Coordinator {
    pub fn bind(config: Config) -> Result<Self, CoordinatorError> {
        std::fs::create_dir_all(&config.state_dir)
            .map_err(|source| CoordinatorError::StateDir { path: config.state_dir.clone(), source })?;
        let creds = tls::load_credentials(&config.ca_dir, tls::COORDINATOR_NAME)?;
        let endpoint = shared::quic::server_endpoint(config.listen, &creds, &config.transport)?;
        let store = Arc::new(BlobStore::open(&config.state_dir.join("blobs"))?);
        Ok(Self { config, endpoint, store })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.endpoint.local_addr().expect("a bound endpoint has an address")
    }

    /// Serves until `shutdown` resolves, then closes every connection and returns.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), CoordinatorError> {
        let addr = self.local_addr();
        tracing::info!(%addr, "coordinator listening (QUIC, mutual TLS)");
        let (events, rx) = tokio::sync::mpsc::channel(1024);
        let driver = tokio::spawn(driver::Driver::new(&self.config, events.clone()).run(rx));
        let net = net::Net {
            max_frame: self.config.max_frame_bytes,
            events,
            store: self.store.clone(),
            limits: self.config.context_limits.clone(),
        };
        tokio::select! {
            () = net.serve(self.endpoint.clone()) => {}
            () = shutdown => tracing::info!("coordinator shutting down"),
        }
        self.endpoint.close(0u32.into(), b"coordinator shutting down");
        drop(net);
        driver.abort();
        self.endpoint.wait_idle().await;
        Ok(())
    }
}
