//! The `farm` binary: flags in, library calls out. `main` is the one place errors become exit codes.

mod build;
mod cli;
mod config;
mod embedded;
mod imagetools;
mod output;
mod progress;
mod results;

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;

use cli::{
    AgentArgs, AgentCommand, AgentsArgs, AgentsCommand, CaCommand, Cli, ClientArgs, Command, CoordinatorArgs,
    ImagetoolsCommand, JoinArgs, SigningCommand, TokenCommand,
};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            if let Some(message) = cli::unsupported_buildx_flag(&e) {
                eprintln!("error: {message}");
                return ExitCode::from(2);
            }
            e.exit()
        }
    };
    let quiet = !matches!(cli.command, Command::Coordinator(_) | Command::Agent(_));
    init_logging(if quiet { "warn" } else { "info" });
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        // Already said, in the command's own words.
        Err(e) if e.is::<Quiet>() => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {}", explain(&e));
            ExitCode::FAILURE
        }
    }
}

/// A failure the command has already reported: exit non-zero, print nothing more.
#[derive(Debug)]
struct Quiet;

impl std::fmt::Display for Quiet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("failed")
    }
}

impl std::error::Error for Quiet {}

/// An error and its causes, each cause shown once: library errors often quote their source in
/// their own message already, and repeating it only makes the line harder to read.
fn explain(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let part = cause.to_string();
        if text.contains(&part) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&part);
    }
    text
}

fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FARM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Colour only for a person at a terminal who has not asked for none (https://no-color.org).
    use std::io::IsTerminal;
    let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(colour).init();
}

async fn dispatch(command: Command) -> Result<()> {
    match command {
        Command::Ca(CaCommand::Init { dir, sans }) => ca_init(dir.unwrap_or_else(default_ca_dir), &sans),
        Command::Ca(CaCommand::Issue { dir, role, name, force }) => {
            let dir = dir.unwrap_or_else(default_ca_dir);
            let role = role.parse().map_err(anyhow::Error::msg)?;
            let issued = shared::tls::issue(&dir, role, &name, force)?;
            println!(
                "issued {role} certificate for {name:?}: {} (key {})",
                issued.cert.display(),
                issued.key.display()
            );
            Ok(())
        }
        Command::Signing(SigningCommand::Init { dir }) => {
            let dir = dir.unwrap_or_else(default_ca_dir);
            let (key, path) = shared::signing::init_signing_key(&dir)?;
            println!(
                "created the farm's signing key {} (ECDSA P-256, mode 0600; it never leaves this machine)",
                path.display()
            );
            println!("its public key (`farm signing public-key` prints it again), for cosign verify --key:");
            print!("{}", key.public_key_pem());
            println!("restart the coordinator to sign with it");
            Ok(())
        }
        Command::Signing(SigningCommand::PublicKey { dir }) => {
            let dir = dir.unwrap_or_else(default_ca_dir);
            print!("{}", shared::signing::require_signing_key(&dir)?.public_key_pem());
            Ok(())
        }
        Command::Coordinator(args) => coordinator(args).await,
        Command::Agent(mut args) => match args.command.take() {
            Some(AgentCommand::Join(join_args)) => join(join_args, true).await,
            Some(AgentCommand::Prune { config, work_dir, builder }) => {
                let file = config::load(config.config.as_deref(), false)?;
                let (choice, docker_host) = config::builder(
                    builder.builder.as_deref(),
                    builder.docker_host.as_deref(),
                    file.builder.as_deref(),
                    file.docker_host.as_deref(),
                )?;
                let dir = work_dir.or(file.work_dir).unwrap_or_else(|| config::state_home().join("agent"));
                let freed = agent::prune(&dir, choice, docker_host.as_deref()).await?;
                println!("freed {} of layer cache in {}", output::bytes(freed), dir.display());
                Ok(())
            }
            None => agent(*args).await,
        },
        Command::Build(args) => build::run(*args).await,
        Command::Builds(args) => {
            let client = connect(&args.client).await?;
            let resp = client.request(&shared::proto::Request::ListBuilds { limit: args.limit }).await?;
            client.finish().await;
            let shared::proto::Response::Builds(builds) = resp else { bail!("unexpected answer: {resp:?}") };
            print!("{}", output::builds(&builds, args.format, coordinator::driver::now_ms())?);
            Ok(())
        }
        Command::Logs(args) => {
            let platform = args.platform.as_deref().map(str::parse).transpose()?;
            let client = connect(&args.client).await?;
            let mut lines = client.logs(&args.build, platform, args.follow).await?;
            while let Some((p, line)) = lines.next().await? {
                println!("[{p}] {line}");
            }
            let resp = client.request(&shared::proto::Request::GetBuild { build: args.build.clone() }).await?;
            client.finish().await;
            let shared::proto::Response::Builds(found) = resp else { bail!("unexpected answer: {resp:?}") };
            let build = found.into_iter().next().context("the coordinator answered with no build")?;
            let (line, ok) = output::outcome(&build);
            eprintln!("{line}");
            if ok {
                Ok(())
            } else {
                Err(Quiet.into())
            }
        }
        Command::Imagetools(ImagetoolsCommand::Inspect(args)) => imagetools::inspect(args).await,
        Command::Dashboard(args) => {
            let file = config::load(args.client.config.config.as_deref(), true)?;
            let t = target(&args.client, file);
            let client = connect_to(&t).await?;
            let resp = client.request(&shared::proto::Request::DashboardLogin).await?;
            client.finish().await;
            let shared::proto::Response::Dashboard { port, token, expires_secs } = resp else {
                bail!("unexpected answer: {resp:?}")
            };
            println!("{}", coordinator::dashboard::url(&t.addr, port, &token));
            eprintln!(
                "Open this link within {expires_secs} s; it logs in once, as {}. The coordinator's certificate is \
                 signed by the farm's CA ({}): trust it in the browser, or accept the warning.",
                t.name,
                t.ca_dir.join("ca.crt").display()
            );
            Ok(())
        }
        Command::Cancel(args) => {
            let client = connect(&args.client).await?;
            client.request(&shared::proto::Request::Cancel { build: args.build.clone() }).await?;
            client.finish().await;
            println!("build {} cancelled", args.build);
            Ok(())
        }
        Command::Agents(AgentsArgs {
            command: Some(AgentsCommand::Revoke { identity: name, force, client }), ..
        }) => {
            let client = connect(&client).await?;
            client.request(&shared::proto::Request::RevokeIdentity { name: name.clone(), force }).await?;
            client.finish().await;
            println!("{name} revoked: its connections are closed and it cannot connect or join again");
            Ok(())
        }
        Command::Token(TokenCommand::Create { client, role, ttl, uses }) => {
            let role: shared::tls::Role = role.parse()?;
            let ttl_secs = ttl
                .map(|t| {
                    humantime::parse_duration(&t)
                        .with_context(|| format!("--ttl {t:?} is not a duration like 30m, 24h or 7d"))
                })
                .transpose()?
                .map(|d| d.as_secs().max(1));
            let client = connect(&client).await?;
            let resp = client.request(&shared::proto::Request::CreateToken { role, ttl_secs, uses }).await?;
            client.finish().await;
            let shared::proto::Response::Token { token, id, expires_ms } = resp else {
                bail!("unexpected answer: {resp:?}")
            };
            println!("{token}");
            let until = expires_ms
                .map(|ms| {
                    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_millis(ms)).to_string()
                })
                .unwrap_or_else(|| "never".into());
            eprintln!("join token {id} for role {role}, valid until {until}; revoke it with `farm token revoke {id}`");
            Ok(())
        }
        Command::Token(TokenCommand::Revoke { client, id }) => {
            let client = connect(&client).await?;
            client.request(&shared::proto::Request::RevokeToken { id: id.clone() }).await?;
            client.finish().await;
            println!("join token {id} revoked");
            Ok(())
        }
        Command::Login(args) => join(args, false).await,
        Command::Agents(args) => {
            let client = connect(&args.client).await?;
            let resp = client.request(&shared::proto::Request::ListAgents).await?;
            client.finish().await;
            let shared::proto::Response::Agents(agents) = resp else {
                bail!("unexpected answer from the coordinator: {resp:?}")
            };
            print!("{}", output::agents(&agents, args.format, coordinator::driver::now_ms())?);
            Ok(())
        }
    }
}

fn default_ca_dir() -> std::path::PathBuf {
    config::config_home()
}

fn ca_init(dir: std::path::PathBuf, sans: &[String]) -> Result<()> {
    let init = shared::tls::init_ca(&dir, sans)?;
    let admin = shared::tls::issue(&dir, shared::tls::Role::Admin, "admin", false)?;
    let (_, signing_key) = shared::signing::init_signing_key(&dir)?;
    println!("created farm CA in {} (fingerprint {})", dir.display(), init.fingerprint);
    println!("coordinator certificate: {} for {}", init.coordinator_cert.display(), init.sans.join(", "));
    println!("admin client certificate: {}", admin.cert.display());
    println!(
        "image signing key: {} (`farm build --sign`; `farm signing public-key > farm.pub` for cosign verify --key farm.pub)",
        signing_key.display()
    );
    // The admin identity is this machine's client of the coordinator that runs here.
    println!("{}", config::write_client(&default_coordinator(), &dir, "admin")?);
    println!("next: `farm ca issue --dir {} --role agent --name NAME` for each agent", dir.display());
    Ok(())
}

async fn coordinator(args: CoordinatorArgs) -> Result<()> {
    let file = config::load(args.config.config.as_deref(), false)?;
    let ca_dir = args.ca_dir.or(file.ca_dir).unwrap_or_else(default_ca_dir);
    let state_dir = args.state_dir.or(file.state_dir).unwrap_or_else(|| config::state_home().join("coordinator"));
    let mut cfg = coordinator::Config::new(ca_dir, state_dir);
    if let Some(listen) = args.listen.or(file.listen) {
        cfg.listen = listen
            .parse()
            .with_context(|| format!("--listen {listen:?} is not an IP:PORT address (e.g. 0.0.0.0:3276)"))?;
    }
    if let Some(secs) = args.heartbeat_timeout.or(file.heartbeat_timeout_secs) {
        cfg.heartbeat_timeout = positive_secs(secs, "heartbeat timeout")?;
    }
    for hook in &file.webhooks {
        if !hook.url.starts_with("http://") && !hook.url.starts_with("https://") {
            bail!("[[webhooks]] url = {:?} is not an http:// or https:// URL", hook.url);
        }
        cfg.webhooks.push(coordinator::webhooks::Webhook { url: hook.url.clone(), secret: hook.secret.clone() });
    }
    cfg.notify_secret = file.notify_secret.clone();
    if let Some(addr) = &file.metrics_listen {
        cfg.metrics_listen = Some(addr.parse().with_context(|| {
            format!("metrics_listen = {addr:?} is not an IP:PORT address (e.g. \"127.0.0.1:9376\")")
        })?);
    }
    if let Some(addr) = &file.dashboard_listen {
        cfg.dashboard_listen = Some(addr.parse().with_context(|| {
            format!("dashboard_listen = {addr:?} is not an IP:PORT address (e.g. \"0.0.0.0:8443\")")
        })?);
    }
    if let Some(max) = file.max_frame_bytes {
        cfg.max_frame_bytes = max;
    }
    cfg.sign = file.sign.unwrap_or(false);
    if let Some(t) = file.transport {
        cfg.transport = t;
    }
    if let Some(n) = file.max_log_bytes_per_task {
        cfg.max_log_bytes_per_task = n;
    }
    if let Some(n) = file.max_attempts {
        cfg.max_attempts = n.max(1);
    }
    let set = |v: Option<usize>, field: &mut usize| {
        if let Some(v) = v {
            *field = v;
        }
    };
    set(file.max_context_files, &mut cfg.context_limits.max_files);
    if let Some(v) = file.max_context_bytes {
        cfg.context_limits.max_total_bytes = v;
    }
    let l = &mut cfg.limits;
    set(file.max_builds_per_client, &mut l.max_builds_per_client);
    set(file.max_platforms_per_build, &mut l.max_platforms_per_build);
    set(file.max_build_args, &mut l.max_build_args);
    set(file.max_build_arg_bytes, &mut l.max_build_arg_bytes);
    set(file.max_tags, &mut l.max_tags);
    set(file.max_secrets, &mut l.max_secrets);
    set(file.max_secret_bytes, &mut l.max_secret_bytes);
    if let Some(r) = &file.cache_repo {
        cfg.cache_repo = Some(shared::cache::CacheRef::parse_ref(r, "cache_repo")?);
    }
    let server = coordinator::Coordinator::bind(cfg).context("cannot start the coordinator")?;
    server.run(shutdown_signal()).await?;
    Ok(())
}

async fn agent(args: AgentArgs) -> Result<()> {
    let file = config::load(args.config.config.as_deref(), false)?;
    let name = match args.name.or(file.name) {
        Some(n) => n,
        None => hostname::get()?.to_string_lossy().to_lowercase(),
    };
    let coordinator = args.coordinator.or(file.coordinator).unwrap_or_else(default_coordinator);
    let ca_dir = args.ca_dir.or(file.ca_dir).unwrap_or_else(default_ca_dir);
    let work_dir = args.work_dir.or(file.work_dir).unwrap_or_else(|| config::state_home().join("agent"));
    let mut cfg = agent::Config::new(coordinator, ca_dir, name, work_dir);
    cfg.labels = config::labels(&file.labels, &args.labels)?;
    (cfg.builder, cfg.docker_host) = config::builder(
        args.builder.builder.as_deref(),
        args.builder.docker_host.as_deref(),
        file.builder.as_deref(),
        file.docker_host.as_deref(),
    )?;
    cfg.capacity = args.capacity.or(file.capacity).unwrap_or_else(agent::default_capacity);
    cfg.memory_limit = config::memory_limit(args.memory_limit.as_deref(), file.memory_limit.as_ref())?;
    cfg.mirrors = agent::mirrors::normalise(&file.mirrors).map_err(anyhow::Error::msg)?;
    let pf = file.platforms;
    cfg.platforms = agent::PlatformConfig {
        native: config::platforms(&args.native)?.or(pf.native.as_deref().map(config::parse_all).transpose()?),
        emulated: config::platforms(&args.emulated)?.or(pf.emulated.as_deref().map(config::parse_all).transpose()?),
        extra_native: config::parse_all(&pf.extra_native)?,
        extra_emulated: config::parse_all(&pf.extra_emulated)?,
    };
    if let Some(dir) = args.binfmt_dir.or(pf.binfmt_dir) {
        cfg.binfmt_dir = dir;
    }
    if let Some(secs) = args.drain_timeout.or(file.drain_timeout_secs) {
        cfg.drain_timeout = positive_secs(secs, "drain timeout")?;
    }
    if let Some(gb) = args.cache_limit_gb.or(file.cache_limit_gb) {
        if !(gb.is_finite() && gb >= 0.0) {
            bail!("the cache limit must be a number of GiB (0 or more), got {gb}");
        }
        cfg.cache_limit = (gb * (1u64 << 30) as f64) as u64;
    }
    if let Some(max) = file.max_frame_bytes {
        cfg.max_frame_bytes = max;
    }
    if let Some(t) = file.transport {
        cfg.transport = t;
    }
    cfg.allow_host_network = args.allow_host_network.or(file.allow_host_network).unwrap_or(false);
    cfg.allow_insecure = args.allow_insecure.or(file.allow_insecure).unwrap_or(false);
    agent::run(cfg, shutdown_signal()).await.context("agent stopped")?;
    Ok(())
}

/// `farm agent join` and `farm login`: enroll with a token, store the identity (key 0600).
async fn join(args: JoinArgs, agent: bool) -> Result<()> {
    let token: shared::tls::JoinToken = args.token.parse()?;
    let name = match args.name {
        Some(n) => n,
        None if agent => hostname::get()?.to_string_lossy().to_lowercase(),
        None => std::env::var("USER").unwrap_or_else(|_| "me".into()).to_lowercase(),
    };
    let dir = args.ca_dir.unwrap_or_else(default_ca_dir);
    let wanted = if agent { shared::tls::Role::Agent } else { shared::tls::Role::Client };
    let max = shared::proto::DEFAULT_MAX_FRAME;
    let joined = shared::client::join(&args.coordinator, &token, &name, wanted, &Default::default(), max)
        .await
        .with_context(|| format!("joining the farm at {}", args.coordinator))?;
    let role = joined.role;
    let stored = shared::tls::store_joined(&dir, &name, &joined.key_pem, &joined.cert_pem, &joined.ca_pem)?;
    println!("joined the farm at {} as {role} {name:?}; certificate {}", args.coordinator, stored.cert.display());
    if agent {
        println!(
            "start it with: farm agent --coordinator {} --ca-dir {} --name {name}",
            args.coordinator,
            dir.display()
        );
    } else {
        println!("{}", config::write_client(&args.coordinator, &dir, &name)?);
    }
    Ok(())
}

fn default_coordinator() -> String {
    format!("127.0.0.1:{}", coordinator::DEFAULT_PORT)
}

/// Where a client command finds its farm: flag or environment, then the user's config file,
/// then 127.0.0.1:3276.
pub struct Target {
    pub addr: String,
    pub ca_dir: std::path::PathBuf,
    pub name: String,
    /// Named by a flag, the environment or the config file (not the built-in default).
    pub configured: bool,
    pub limits: shared::quic::TransportLimits,
    pub max_frame: usize,
}

pub fn target(args: &ClientArgs, file: config::FileConfig) -> Target {
    let configured = args.coordinator.is_some() || file.coordinator.is_some();
    Target {
        addr: args.coordinator.clone().or(file.coordinator).unwrap_or_else(default_coordinator),
        ca_dir: args.ca_dir.clone().or(file.ca_dir).unwrap_or_else(default_ca_dir),
        name: args.name.clone().or(file.name).unwrap_or_else(|| "admin".into()),
        configured,
        limits: file.transport.unwrap_or_default(),
        max_frame: file.max_frame_bytes.unwrap_or(shared::proto::DEFAULT_MAX_FRAME),
    }
}

/// Whether anything listens on UDP `addr` on this machine, asked without a handshake: a
/// datagram to a loopback port nobody holds comes back at once as "connection refused".
/// Only loopback addresses are asked; anything else counts as not answering.
pub async fn answers(addr: &str) -> bool {
    let Ok(sa) = addr.parse::<std::net::SocketAddr>() else { return false };
    if !sa.ip().is_loopback() {
        return false;
    }
    let bind = if sa.is_ipv4() { "127.0.0.1:0" } else { "[::1]:0" };
    let Ok(sock) = tokio::net::UdpSocket::bind(bind).await else { return false };
    if sock.connect(sa).await.is_err() || sock.send(&[0]).await.is_err() {
        return false;
    }
    let mut buf = [0u8; 64];
    match tokio::time::timeout(Duration::from_millis(200), sock.recv(&mut buf)).await {
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => false,
        // Silence (a QUIC server drops a one-byte datagram) or an answer: someone is there.
        _ => true,
    }
}

/// How long a client waits for a coordinator to answer before saying what to check.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Connects as a client, with identity and address from flags, environment or the user's config.
async fn connect(args: &ClientArgs) -> Result<shared::client::Client> {
    let file = config::load(args.config.config.as_deref(), true)?;
    connect_to(&target(args, file)).await
}

pub async fn connect_to(t: &Target) -> Result<shared::client::Client> {
    let creds = shared::tls::load_credentials(&t.ca_dir, &t.name)?;
    let connecting = shared::client::Client::connect(&t.addr, &creds, &t.limits, t.max_frame);
    match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
        Ok(client) => Ok(client?),
        Err(_) => bail!(
            "no coordinator answered at {addr} (UDP) within {secs} s: is `farm coordinator` running there, and is UDP \
             port {port} open to this machine? Point farm at another one with --coordinator HOST:PORT, \
             FARM_COORDINATOR or `coordinator = ...` in {config}",
            addr = t.addr,
            secs = CONNECT_TIMEOUT.as_secs(),
            port = t.addr.rsplit(':').next().unwrap_or("?"),
            config = config::config_home().join("config.toml").display()
        ),
    }
}

fn positive_secs(secs: f64, what: &str) -> Result<Duration> {
    if !(secs.is_finite() && secs > 0.0) {
        bail!("{what} must be a positive number of seconds, got {secs}");
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
