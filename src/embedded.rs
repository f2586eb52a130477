//! `farm build` with no coordinator configured: a coordinator and an agent inside this process,
//! through the same code as a real farm, the way `docker buildx build` works on one machine.
//! Their state (CA, content store, the agent's layer cache) lives under
//! `~/.local/state/farm/embedded`, so a second build finds its caches warm.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use shared::proto::{AgentState, Request, Response};
use shared::tls::{self, Role};
use tokio::sync::watch;

use crate::config;

pub const NAME: &str = "local";
pub const CLIENT: &str = "admin";

pub struct Embedded {
    pub addr: String,
    pub ca_dir: std::path::PathBuf,
    stop: watch::Sender<bool>,
}

impl Embedded {
    pub async fn start() -> Result<Embedded> {
        let home = config::state_home().join("embedded");
        let ca_dir = home.join("ca");
        if !ca_dir.join(tls::CA_CERT).exists() {
            tls::init_ca(&ca_dir, &[]).context("creating the embedded farm's CA")?;
            tls::issue(&ca_dir, Role::Agent, NAME, false)?;
            tls::issue(&ca_dir, Role::Admin, CLIENT, false)?;
        }
        // `farm build --sign` on the embedded farm signs with a key of its own (beside its CA).
        if !ca_dir.join(shared::signing::SIGNING_KEY).exists() {
            shared::signing::init_signing_key(&ca_dir).context("creating the embedded farm's signing key")?;
        }
        let mut cfg = coordinator::Config::new(ca_dir.clone(), home.join("coordinator"));
        cfg.listen = "127.0.0.1:0".parse().expect("a valid address");
        let server = coordinator::Coordinator::bind(cfg).context("starting the embedded coordinator")?;
        let addr = server.local_addr().to_string();
        let (stop, watch) = watch::channel(false);
        let stopped = |mut w: watch::Receiver<bool>| async move {
            let _ = w.wait_for(|s| *s).await;
        };
        tokio::spawn(server.run(stopped(watch.clone())));
        let mut agent = agent::Config::new(addr.clone(), ca_dir.clone(), NAME.into(), home.join("agent"));
        // One machine builds every platform: let them run side by side.
        agent.capacity = std::thread::available_parallelism().map_or(2, |n| n.get() as u32).max(3);
        let w = watch.clone();
        tokio::spawn(async move {
            if let Err(e) = agent::run(agent, stopped(w)).await {
                tracing::error!("embedded agent stopped: {e:#}");
            }
        });
        Ok(Embedded { addr, ca_dir, stop })
    }

    /// Waits until the embedded agent has registered, so the build is not told to wait for one.
    pub async fn wait_ready(&self, client: &shared::client::Client) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Response::Agents(a) = client.request(&Request::ListAgents).await? {
                if a.iter().any(|a| a.name == NAME && a.state == AgentState::Online) {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!("the embedded agent did not start within 20 s; run with FARM_LOG=info to see why");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Embedded {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}
