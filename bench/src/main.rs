//! farm-bench: farm measured against what it replaces, on one machine, on loopback.
//!
//! `farm-bench all` starts its own registry, coordinator and agents (real `farm` processes),
//! runs every comparison with both sides in the same run and the same cache state, repeats each
//! (alternating which side goes first), and prints a table of medians and ratios against the
//! goals, plus the same as JSON. `bench/run.sh` is the one command that builds and runs it.
//!
//! - [`builds`]: farm against `buildah build` + push (rows 1-5);
//! - [`sync`]: context upload against a plain quinn stream (rows 6-7);
//! - [`control`]: 1,000 scripted agents, dispatch latency, coordinator RSS and CPU; a real
//!   agent's idle RSS (rows 8-13);
//! - [`regcache`]: a cold agent with the layer cache shared through the registry (rows 16a-16b);
//! - [`events`]: reading `farm build --progress json` back into phases;
//! - [`report`]: medians, goals, the table and the JSON; [`procs`], [`env`](mod@env): processes and the
//!   bench's own world.

mod builds;
mod control;
mod env;
mod events;
mod procs;
mod push;
mod regcache;
mod report;
mod sync;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use serde_json::{json, Value};

use env::Env;
use report::Row;

#[derive(Parser)]
#[command(
    name = "farm-bench",
    about = "farm's benchmark: farm against buildah on one host, context sync, control plane"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start a registry, coordinators and agents on loopback, run every row, print the table
    All(AllArgs),
    /// The plain-quinn baseline's receiving end (started by `all`)
    QuicSink {
        #[arg(long)]
        listen: std::net::SocketAddr,
        #[arg(long)]
        ca_dir: PathBuf,
        #[arg(long)]
        dir: PathBuf,
    },
}

#[derive(Copy, Clone, PartialEq, Eq, PartialOrd, Ord, ValueEnum, Debug)]
enum Group {
    /// Rows 1-5: builds through farm against buildah
    Builds,
    /// Row 13: a real agent's idle RSS
    Agent,
    /// Rows 6-7: context sync
    Sync,
    /// Rows 8-12: 1,000 scripted agents
    Control,
    /// Rows 15-16: a 1 GiB four-layer image pushed by farm and by skopeo; a second push sharing layers
    Push,
    /// Rows 16a-16b: a second, cold agent with the layer cache shared through the registry
    Regcache,
}

#[derive(clap::Args)]
struct AllArgs {
    /// Each row once, with smaller sizes: a smoke test, not a measurement
    #[arg(long)]
    quick: bool,
    /// Repetitions per row [default: 3; 1 with --quick]
    #[arg(long)]
    reps: Option<usize>,
    /// Only these groups of rows (repeatable)
    #[arg(long, value_enum)]
    only: Vec<Group>,
    /// Also write the results here as JSON
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Criterion's output directory, to include its medians (bench/run.sh runs Criterion first)
    #[arg(long, value_name = "DIR")]
    criterion: Option<PathBuf>,
    /// The farm binary [default: `farm` next to this binary]
    #[arg(long, value_name = "PATH")]
    farm: Option<PathBuf>,
    /// The farm repository (for tests/fixtures and bench/workload) [default: where this was built]
    #[arg(long, value_name = "DIR")]
    repo: Option<PathBuf>,
    /// Scripted agents in the control-plane rows [default: 1000; 100 with --quick]
    #[arg(long)]
    agents: Option<usize>,
    /// Keep the temporary directory (logs, stores) for a look afterwards
    #[arg(long)]
    keep: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::QuicSink { listen, ca_dir, dir } => tokio::runtime::Runtime::new()
            .context("starting the async runtime")
            .and_then(|rt| rt.block_on(sync::quic_sink(listen, &ca_dir, &dir))),
        Cmd::All(args) => all(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("farm-bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Sizes of everything, full or quick.
struct Sizes {
    reps: usize,
    workload_n: u32,
    warm_up: bool,
    cold_bytes: u64,
    many_files: usize,
    control: control::Plan,
    idle_window: Duration,
    /// Each of the four layers of rows 15-16's image.
    push_layer_bytes: u64,
}

impl Sizes {
    fn new(args: &AllArgs) -> Sizes {
        let q = args.quick;
        let reps = args.reps.unwrap_or(if q { 1 } else { 3 }).max(1);
        Sizes {
            reps,
            workload_n: if q { 20_000 } else { 200_000 },
            warm_up: !q,
            cold_bytes: if q { 20_000_000 } else { 200_000_000 },
            many_files: if q { 1_000 } else { 10_000 },
            control: control::Plan {
                agents: args.agents.unwrap_or(if q { 100 } else { 1000 }),
                builds_per_round: if q { 20 } else { 300 },
                concurrency: if q { 4 } else { 8 },
                unloaded_builds: if q { 5 } else { 30 },
                rounds: reps,
                idle_window: Duration::from_secs(if q { 3 } else { 15 }),
            },
            idle_window: Duration::from_secs(if q { 2 } else { 9 }),
            push_layer_bytes: if q { 32 << 20 } else { 256 << 20 },
        }
    }
}

fn all(args: AllArgs) -> Result<()> {
    procs::install_interrupt_handler();
    let nofile = procs::raise_nofile();
    let started = Instant::now();
    let started_unix = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
    let exe = std::env::current_exe()?;
    let farm_bin = args.farm.clone().unwrap_or_else(|| exe.with_file_name("farm"));
    let repo = args.repo.clone().unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".."));
    let groups: BTreeSet<Group> = if args.only.is_empty() {
        [Group::Builds, Group::Agent, Group::Sync, Group::Control, Group::Push, Group::Regcache].into()
    } else {
        args.only.iter().copied().collect()
    };
    preflight(&farm_bin, &repo, &groups)?;
    let sizes = Sizes::new(&args);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let mut env = Env::new(farm_bin.clone(), repo.clone(), args.keep)?;
    // The top-level future runs on this (main) thread, so every child is forked from it and dies
    // with the bench (PR_SET_PDEATHSIG follows the forking thread).
    let rows = rt.block_on(run(&mut env, &groups, &sizes, &exe));
    drop(env);
    let mut rows = rows?;
    rows.sort_by_key(|r| r.id.parse::<u32>().unwrap_or(u32::MAX));
    let took = started.elapsed();
    let pure = args.criterion.as_deref().map(criterion_results).unwrap_or_default();

    println!();
    println!("{}", report::table(&rows));
    let phases = report::breakdowns(&rows);
    if !phases.is_empty() {
        println!("Where the time goes (medians; farm phases from `farm build --progress json` event times):");
        print!("{phases}");
        println!();
    }
    if !pure.is_empty() {
        println!("Pure parts (Criterion, median time per iteration):");
        for (name, ns) in &pure {
            println!("  {name:<52} {}", show_ns(ns));
        }
        println!();
    }
    let missed: Vec<&Row> = rows.iter().filter(|r| r.met() == Some(false) || r.error.is_some()).collect();
    println!(
        "{} rows, {} goals met, {} missed or failed{}; took {:.1} min{}",
        rows.len(),
        rows.iter().filter(|r| r.met() == Some(true)).count(),
        missed.len(),
        if missed.is_empty() {
            String::new()
        } else {
            format!(" ({})", missed.iter().map(|r| r.id.as_str()).collect::<Vec<_>>().join(", "))
        },
        took.as_secs_f64() / 60.0,
        if args.quick { " (--quick: a smoke test, not a measurement)" } else { "" }
    );
    if let Some(path) = &args.json {
        let doc = json!({
            "started_unix": started_unix,
            "took_s": took.as_secs_f64(),
            "quick": args.quick,
            "repetitions": sizes.reps,
            "machine": machine(nofile),
            "workload": {
                "context": "bench/workload",
                "N": sizes.workload_n,
                "warm_up": sizes.warm_up,
            },
            "rows": rows.iter().map(report::row_json).collect::<Vec<_>>(),
            "pure_ns": pure.into_iter().collect::<serde_json::Map<String, Value>>(),
        });
        std::fs::write(path, serde_json::to_string_pretty(&doc)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
        println!("results written to {}", path.display());
    }
    Ok(())
}

async fn run(env: &mut Env, groups: &BTreeSet<Group>, sizes: &Sizes, exe: &Path) -> Result<Vec<Row>> {
    let mut rows = vec![];
    eprintln!("farm-bench: working in {}", env.root.display());
    let registry = env.start_registry()?;
    eprintln!("farm-bench: registry on {registry}; pushing the busybox fixture");
    let base = env.seed_busybox("busybox:latest")?;
    let needs_farm = groups.iter().any(|g| !matches!(g, Group::Control | Group::Push | Group::Regcache));
    let coordinator = if needs_farm { Some(env.start_coordinator("coordinator")?) } else { None };

    if groups.contains(&Group::Builds) {
        let c = coordinator.clone().expect("started above");
        // The default capacity, as a user's agent gets it (detected from cores and memory).
        env.start_agent(&c, builds::SOLO, &["--label", "bench=solo"])?;
        for (name, platform) in builds::TRIO {
            env.start_agent(&c, name, &["--native", platform, "--emulated", "none", "--label", "bench=trio"])?;
        }
        let mut names = vec![builds::SOLO];
        names.extend(builds::TRIO.map(|t| t.0));
        env.wait_online(&c, &names, Duration::from_secs(60)).await?;
        let b = builds::Builds::new(env, c, base.clone(), sizes.workload_n, sizes.reps, sizes.warm_up)?;
        rows.extend(b.clean_builds());
        procs::check_interrupted()?;
        rows.extend(b.first_builds());
        procs::check_interrupted()?;
        rows.extend(b.rebuilds());
        procs::check_interrupted()?;
        rows.push(b.cross_compile());
        if let Some(pid) = env.agent_pid(builds::SOLO) {
            if let Some(r) = procs::rss_bytes(pid) {
                eprintln!(
                    "farm-bench: agent {} RSS after the build rows: {:.1} MiB",
                    builds::SOLO,
                    r as f64 / 1048576.0
                );
            }
        }
        for name in names {
            env.stop_service(&format!("agent {name}"));
        }
    }
    procs::check_interrupted()?;
    if groups.contains(&Group::Agent) {
        let c = coordinator.clone().expect("started above");
        rows.push(control::agent_idle_rss(env, &c, sizes.idle_window).await);
    }
    procs::check_interrupted()?;
    if groups.contains(&Group::Sync) {
        let c = coordinator.clone().expect("started above");
        let sink_dir = env.root.join("quic-sink");
        let mut cmd = Command::new(exe);
        cmd.args(["quic-sink", "--listen", "127.0.0.1:0", "--ca-dir", env::path(&env.ca_dir)]);
        cmd.args(["--dir", env::path(&sink_dir)]);
        let mut sink = procs::Service::spawn("quic-sink", &mut cmd)?;
        let line = sink.wait_for_line(&["quic-sink listening"], Duration::from_secs(20))?;
        let addr = line.rsplit(' ').next().unwrap_or_default().to_string();
        let pids = (env.service_pid("coordinator").unwrap_or(0), sink.pid());
        rows.push(sync::cold_upload(env, &c, &addr, pids, sizes.reps, sizes.cold_bytes).await);
        procs::check_interrupted()?;
        rows.push(sync::small_change(env, &c, &addr, sizes.reps, sizes.many_files).await);
        sink.stop(Duration::from_secs(5));
    }
    procs::check_interrupted()?;
    if groups.contains(&Group::Regcache) {
        rows.extend(regcache::rows(env, &base, sizes.workload_n, sizes.reps, sizes.warm_up).await);
    }
    if coordinator.is_some() {
        env.stop_service("coordinator");
    }
    procs::check_interrupted()?;
    if groups.contains(&Group::Push) {
        rows.extend(push::big_images(env, sizes.reps, sizes.push_layer_bytes).await);
    }
    procs::check_interrupted()?;
    if groups.contains(&Group::Control) {
        eprintln!("farm-bench: pushing the busybox fixture as cp:base (the doubles' result)");
        env.seed_busybox("cp:base")?;
        rows.extend(control::control_plane(env, "cp", &sizes.control).await);
    }
    Ok(rows)
}

/// Everything the bench needs, checked before it starts anything; each failure says the fix.
fn preflight(farm: &Path, repo: &Path, groups: &BTreeSet<Group>) -> Result<()> {
    let fix = "run `deploy/install.sh --test-deps` (as root)";
    if !farm.is_file() {
        bail!("{} not found: build it with `cargo build --release -p farm` (bench/run.sh does)", farm.display());
    }
    for p in ["tests/fixtures/busybox-image.sh", "bench/workload/Dockerfile"] {
        if !repo.join(p).is_file() {
            bail!("{} not found: pass --repo with the farm repository", repo.join(p).display());
        }
    }
    if !procs::have_tool("docker-registry") {
        bail!("docker-registry is not installed: {fix}");
    }
    if !procs::have_tool("buildah") {
        bail!("buildah is not installed: {fix}");
    }
    if groups.contains(&Group::Builds) || groups.contains(&Group::Regcache) {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            bail!("the build rows run buildah with its own storage as farm's agents do: run as root");
        }
        for handler in ["qemu-aarch64", "qemu-arm"] {
            let entry = Path::new("/proc/sys/fs/binfmt_misc").join(handler);
            let enabled = std::fs::read_to_string(&entry).is_ok_and(|s| s.starts_with("enabled"));
            if !enabled {
                bail!("the QEMU handler {handler} is not enabled in binfmt_misc: {fix}");
            }
        }
    }
    Ok(())
}

fn machine(nofile: u64) -> Value {
    let out = |cmd: &str, args: &[&str]| {
        Command::new(cmd)
            .args(args)
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    json!({
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "kernel": out("uname", &["-r"]),
        "buildah": out("buildah", &["--version"]),
        "farm": shared::FARM_VERSION,
        "open_files_limit": nofile,
        "memory": std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| m.lines().next().map(str::to_string)),
    })
}

/// Criterion's medians (ns per iteration) by benchmark id, from DIR/**/new/estimates.json.
fn criterion_results(dir: &Path) -> Vec<(String, Value)> {
    let mut out = vec![];
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() && p.file_name().is_some_and(|n| n != "base" && n != "change" && n != "report") {
                stack.push(p);
            } else if p.file_name().is_some_and(|n| n == "estimates.json")
                && p.parent().is_some_and(|q| q.ends_with("new"))
            {
                let read =
                    |f: &Path| std::fs::read_to_string(f).ok().and_then(|s| serde_json::from_str::<Value>(&s).ok());
                let (Some(est), Some(meta)) = (read(&p), read(&p.with_file_name("benchmark.json"))) else { continue };
                if let (Some(id), Some(ns)) = (meta["full_id"].as_str(), est["median"]["point_estimate"].as_f64()) {
                    out.push((id.to_string(), json!(ns)));
                }
            }
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn show_ns(ns: &Value) -> String {
    let ns = ns.as_f64().unwrap_or(0.0);
    if ns >= 1e6 {
        format!("{:.2} ms", ns / 1e6)
    } else if ns >= 1e3 {
        format!("{:.2} µs", ns / 1e3)
    } else {
        format!("{ns:.0} ns")
    }
}
