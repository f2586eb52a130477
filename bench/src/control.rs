//! The control plane at fleet scale: a real coordinator process and 1,000 agents over real QUIC
//! connections with mutual TLS, heartbeating. The agents are [`ScriptedAgent`]s, many per
//! process: doubles that speak the agent protocol and answer every assignment at once, so that
//! what is measured is the coordinator's dispatch, not builds.
//!
//! Dispatch latency is measured in this one process on one clock: from just before a client
//! submits a build (whose one task is then ready) to the moment the `Assign` for it has been read
//! by the double it went to.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use shared::client::{handshake, Client};
use shared::proto::io::{expect_msg, read_msg, write_msg};
use shared::proto::{
    AgentInfo, AgentMsg, AgentState, BuildEvent, BuildSpec, CoordMsg, Emulation, Heartbeat, ManifestRef, Request,
    Response, DEFAULT_MAX_FRAME,
};
use shared::quic::TransportLimits;
use shared::tls::Role;
use shared::Platform;
use tokio::sync::{mpsc, watch, Semaphore};

use crate::env::Env;
use crate::procs::{self, RssSampler};
use crate::report::{median, percentile, Goal, Row, Unit};

/// Agents per client endpoint (one UDP socket each).
const AGENTS_PER_ENDPOINT: usize = 100;
/// Connections handshaking at once while the fleet comes up.
const CONNECTING_AT_ONCE: usize = 64;

pub struct Plan {
    pub agents: usize,
    pub builds_per_round: usize,
    pub concurrency: usize,
    /// Builds submitted one at a time after each loaded round: dispatch without queueing.
    pub unloaded_builds: usize,
    pub rounds: usize,
    /// How long the fleet only heartbeats before each round's dispatch (CPU is measured over it).
    pub idle_window: Duration,
}

/// What the doubles report back.
#[derive(Default)]
struct Seen {
    registered: AtomicUsize,
    /// Results reported so far, by all doubles: which of the manifests the next one reports.
    results: AtomicUsize,
    /// Build id → when its first `Assign` was read.
    assigned: Mutex<HashMap<String, Instant>>,
    errors: Mutex<Vec<String>>,
}

/// ScriptedAgent: a double of a real agent: registers, heartbeats, and answers every assignment
/// at once without building. It reports one of `manifests` (real manifests in the build's
/// repository, each reported once per round of the list) as its result, so that the
/// coordinator's stitching succeeds.
pub struct ScriptedAgent {
    pub name: String,
    config: quinn::ClientConfig,
    endpoint: quinn::Endpoint,
    coordinator: SocketAddr,
    platform: Platform,
    manifests: Arc<Vec<ManifestRef>>,
}

impl ScriptedAgent {
    async fn run(
        self,
        seen: Arc<Seen>,
        permit: tokio::sync::OwnedSemaphorePermit,
        mut stop: watch::Receiver<bool>,
    ) -> Result<()> {
        let max = DEFAULT_MAX_FRAME;
        let conn = self.endpoint.connect_with(self.config, self.coordinator, "127.0.0.1")?.await?;
        let (mut send, mut recv) = handshake(&conn, max).await?;
        let info = AgentInfo {
            native: vec![self.platform.clone()],
            emulated: vec![],
            labels: BTreeMap::new(),
            capacity: 1,
            builder: "scripted-double".into(),
            builder_version: "0".into(),
            farm_version: shared::FARM_VERSION.into(),
            memory_limit: None,
            allowed: vec![],
        };
        write_msg(&mut send, &AgentMsg::Register(info), max).await?;
        let interval = match expect_msg(&mut recv, max, "a registration answer").await? {
            CoordMsg::Registered { heartbeat_interval_ms } => Duration::from_millis(heartbeat_interval_ms.max(50)),
            other => bail!("{}: registration answered {other:?}", self.name),
        };
        write_msg(&mut send, &AgentMsg::Holding(vec![]), max).await?;
        seen.registered.fetch_add(1, Ordering::SeqCst);
        drop(permit);

        // Reading in its own task: a frame read is not cancel-safe, so it never races a timer.
        let (tx, mut rx) = mpsc::unbounded_channel();
        let reader = tokio::spawn(async move {
            while let Ok(Some(msg)) = read_msg::<CoordMsg, _>(&mut recv, max).await {
                if tx.send((Instant::now(), msg)).is_err() {
                    break;
                }
            }
        });
        // Beats on the real agent's schedule (jittered), so the fleet's load looks like a real one's.
        let next_beat = || tokio::time::Instant::now() + agent::session::heartbeat_delay(interval, rand::random());
        let beat = tokio::time::sleep_until(next_beat());
        tokio::pin!(beat);
        let result = loop {
            tokio::select! {
                () = &mut beat => {
                    beat.as_mut().reset(next_beat());
                    write_msg(&mut send, &AgentMsg::Heartbeat(Heartbeat { busy: 0 }), max).await?
                }
                msg = rx.recv() => match msg {
                    Some((at, CoordMsg::Assign(a))) => {
                        seen.assigned.lock().expect("not poisoned").entry(a.build.clone()).or_insert(at);
                        let n = seen.results.fetch_add(1, Ordering::SeqCst);
                        let done = AgentMsg::TaskDone {
                            task: a.task,
                            attempt: a.attempt,
                            manifest: self.manifests[n % self.manifests.len()].clone(),
                            timings: vec![],
                        };
                        write_msg(&mut send, &done, max).await?;
                    }
                    Some(_) => {}
                    None => break Err(anyhow::anyhow!("{}: the coordinator closed the control stream", self.name)),
                },
                _ = stop.changed() => break Ok(()),
            }
        };
        reader.abort();
        conn.close(0u32.into(), b"bench done");
        result
    }
}

/// The amd64 manifest of the busybox fixture pushed as `repo:base`: what the doubles report.
pub async fn fixture_manifest(registry: &str, repo: &str) -> Result<ManifestRef> {
    let client = shared::registry::Registry::new(&[registry.to_string()], None);
    let r: shared::oci::ImageRef = format!("{registry}/{repo}:base").parse()?;
    let (bytes, _, _) = client.fetch_manifest(&r).await.context("reading the fixture's index")?;
    let amd64 = shared::oci::parse_index(&bytes)?
        .into_iter()
        .find(|d| d.platform.as_ref().is_some_and(|p| p.architecture == "amd64"))
        .context("the fixture has no amd64 manifest")?;
    Ok(ManifestRef { media_type: amd64.media_type, digest: amd64.digest, size: amd64.size })
}

/// `count` manifests of the busybox fixture's amd64 image that differ only in an annotation,
/// pushed to `repo` by digest: what the doubles report, one build each. Real builds of
/// different inputs give different images; one manifest reported by every build would pile
/// every build's provenance onto a single subject's `sha256-<hex>` fallback tag, an index that
/// grows with each build and that every stitch reads and writes back whole.
pub async fn fixture_manifests(registry: &str, repo: &str, count: usize) -> Result<Vec<ManifestRef>> {
    let one = fixture_manifest(registry, repo).await?;
    let client = Arc::new(shared::registry::Registry::new(&[registry.to_string()], None));
    let base: shared::oci::ImageRef = format!("{registry}/{repo}").parse()?;
    let (bytes, _, _) =
        client.fetch_manifest(&base.with_digest(&one.digest)).await.context("the fixture's manifest")?;
    let template: serde_json::Value = serde_json::from_slice(&bytes)?;
    let bodies: Vec<Vec<u8>> = (0..count)
        .map(|i| {
            let mut m = template.clone();
            m["annotations"]["org.example.farm-bench.result"] = serde_json::Value::String(i.to_string());
            serde_json::to_vec(&m)
        })
        .collect::<Result<_, _>>()?;
    let gate = Arc::new(Semaphore::new(8));
    let mut pushes = tokio::task::JoinSet::new();
    for (i, body) in bodies.into_iter().enumerate() {
        let (client, base, gate, media_type) = (client.clone(), base.clone(), gate.clone(), one.media_type.clone());
        pushes.spawn(async move {
            let _permit = gate.acquire_owned().await?;
            let digest = shared::Digest::of(&body);
            client.push_manifest(&base.with_digest(&digest), &body, &media_type).await?;
            anyhow::Ok((i, ManifestRef { media_type, digest, size: body.len() as u64 }))
        });
    }
    let mut out = vec![None; count];
    while let Some(r) = pushes.join_next().await {
        let (i, m) = r??;
        out[i] = Some(m);
    }
    Ok(out.into_iter().flatten().collect())
}

pub async fn control_plane(env: &mut Env, repo: &str, plan: &Plan) -> Vec<Row> {
    let n = plan.agents;
    let mut p50 = Row::new("8", &format!("control plane: dispatch latency p50, {n} agents"), Unit::Millis, Goal::None);
    let mut p99 =
        Row::new("9", &format!("control plane: dispatch latency p99, {n} agents"), Unit::Millis, Goal::AtMost(5.0));
    let mut rss = Row::new("10", &format!("coordinator RSS, {n} agents"), Unit::Mebibytes, Goal::AtMost(64.0));
    let mut idle_cpu = Row::new("11", &format!("coordinator CPU, {n} agents heartbeating"), Unit::Percent, Goal::None);
    let mut busy_cpu = Row::new("12", "coordinator CPU while dispatching", Unit::Percent, Goal::None);
    let what = format!(
        "{n} ScriptedAgents (doubles of the agent, {AGENTS_PER_ENDPOINT} per UDP endpoint, all in the bench process), \
         native linux/riscv64, capacity 1, heartbeating at the interval the coordinator asks, each build's result \
         a manifest of its own (pushed before the rounds)"
    );
    p50.farm_label = format!("median over rounds of each round's p50; submit → Assign read by the double; {what}");
    p99.farm_label = "median over rounds of each round's p99".into();
    rss.farm_label =
        "peak VmRSS of the coordinator process per round (heartbeats + dispatch), median over rounds".into();
    idle_cpu.farm_label = format!(
        "utime+stime of the coordinator over {} of heartbeats only, in % of one core",
        Unit::Seconds.show(plan.idle_window.as_secs_f64())
    );
    busy_cpu.farm_label = "utime+stime of the coordinator during each round's builds, in % of one core".into();

    let mut all_latencies = vec![];
    let (mut unloaded_p50, mut unloaded_p99) = (vec![], vec![]);
    let result: Result<()> = async {
        let coordinator = env.start_coordinator("coordinator-cp")?;
        let pid = env.service_pid("coordinator-cp").context("coordinator pid")?;
        let registry = env.registry_addr().to_string();
        let results = plan.rounds * (plan.builds_per_round + plan.unloaded_builds);
        let manifests = Arc::new(fixture_manifests(&registry, repo, results).await?);
        let platform: Platform = "linux/riscv64".parse().map_err(|e| anyhow::anyhow!("{e}"))?;
        let addr: SocketAddr = coordinator.parse()?;

        eprintln!("farm-bench: issuing {n} agent certificates");
        let ca = env.ca_dir.clone();
        let names: Vec<String> = (0..n).map(|i| format!("double-{i:04}")).collect();
        let configs = {
            let names = names.clone();
            tokio::task::spawn_blocking(move || -> Result<Vec<quinn::ClientConfig>> {
                let transport = Arc::new(shared::quic::transport_config(&TransportLimits::default()));
                names
                    .iter()
                    .map(|name| {
                        shared::tls::issue(&ca, Role::Agent, name, true)?;
                        let creds = shared::tls::load_credentials(&ca, name)?;
                        let crypto =
                            quinn::crypto::rustls::QuicClientConfig::try_from(shared::tls::client_config(&creds)?)?;
                        let mut config = quinn::ClientConfig::new(Arc::new(crypto));
                        config.transport_config(transport.clone());
                        Ok(config)
                    })
                    .collect()
            })
            .await??
        };
        let endpoints: Vec<quinn::Endpoint> = (0..n.div_ceil(AGENTS_PER_ENDPOINT))
            .map(|_| quinn::Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0))))
            .collect::<Result<_, _>>()?;

        let rss_before = procs::rss_bytes(pid).unwrap_or(0) as f64 / (1024.0 * 1024.0);
        let sampler = RssSampler::start(pid, Duration::from_millis(100));
        let seen = Arc::new(Seen::default());
        let (stop, stopped) = watch::channel(false);
        let gate = Arc::new(Semaphore::new(CONNECTING_AT_ONCE));
        let mut doubles = tokio::task::JoinSet::new();
        eprintln!("farm-bench: connecting {n} scripted agents");
        let t_reg = Instant::now();
        for (i, (name, config)) in names.into_iter().zip(configs).enumerate() {
            let agent = ScriptedAgent {
                name,
                config,
                endpoint: endpoints[i / AGENTS_PER_ENDPOINT].clone(),
                coordinator: addr,
                platform: platform.clone(),
                manifests: manifests.clone(),
            };
            let permit = gate.clone().acquire_owned().await?;
            let (seen, stopped) = (seen.clone(), stopped.clone());
            doubles.spawn(async move {
                let name = agent.name.clone();
                if let Err(e) = agent.run(seen.clone(), permit, stopped).await {
                    seen.errors.lock().expect("not poisoned").push(format!("{name}: {e:#}"));
                }
            });
        }
        let deadline = Instant::now() + Duration::from_secs(180);
        while seen.registered.load(Ordering::SeqCst) < n {
            if let Some(e) = seen.errors.lock().expect("not poisoned").first() {
                bail!("a scripted agent failed: {e}");
            }
            procs::check_interrupted()?;
            ensure!(
                Instant::now() < deadline,
                "only {} of {n} agents registered in 180 s",
                seen.registered.load(Ordering::SeqCst)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let registered_in = t_reg.elapsed();
        let client = Arc::new(env.client(&coordinator).await?);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let online = match client.request(&Request::ListAgents).await? {
                Response::Agents(list) => list.iter().filter(|a| a.state == AgentState::Online).count(),
                other => bail!("ListAgents answered {other:?}"),
            };
            if online >= n {
                break;
            }
            ensure!(Instant::now() < deadline, "the coordinator lists {online} of {n} agents online");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        p50.note(format!(
            "all {n} agents connected and registered in {}",
            Unit::Seconds.show(registered_in.as_secs_f64())
        ));

        // A one-file context, uploaded once; every build uses it.
        let ctx = env.root.join("cp-context");
        std::fs::create_dir_all(&ctx)?;
        std::fs::write(ctx.join("Dockerfile"), "FROM scratch\n")?;
        let scanned = shared::context::scan(&ctx, "Dockerfile")?;
        client.upload_context(&scanned).await?;
        let context = scanned.manifest.digest();

        for round in 0..plan.rounds {
            eprintln!(
                "farm-bench: rows 8-12, round {}/{}: heartbeats only, then {} builds",
                round + 1,
                plan.rounds,
                plan.builds_per_round
            );
            let from = Instant::now();
            let cpu0 = procs::cpu_time(pid).context("coordinator CPU time")?;
            // A measurement window, not a synchronisation: the fleet heartbeats meanwhile.
            tokio::time::sleep(plan.idle_window).await;
            let cpu1 = procs::cpu_time(pid).context("coordinator CPU time")?;
            let idle_for = from.elapsed();
            idle_cpu.farm.push(100.0 * (cpu1 - cpu0).as_secs_f64() / idle_for.as_secs_f64());

            let t_dispatch = Instant::now();
            let submitted = submit_builds(
                &client,
                &registry,
                repo,
                &platform,
                &context,
                &format!("r{round}-"),
                plan.builds_per_round,
                plan.concurrency,
            )
            .await?;
            let dispatch_for = t_dispatch.elapsed();
            let cpu2 = procs::cpu_time(pid).context("coordinator CPU time")?;
            busy_cpu.farm.push(100.0 * (cpu2 - cpu1).as_secs_f64() / dispatch_for.as_secs_f64());
            let latencies = dispatch_latencies(&seen, &submitted)?;
            p99.note(format!("round {}: the slowest dispatches: {}", round + 1, slowest(&latencies, 4)));
            p50.farm.extend(percentile(&latencies, 50.0));
            p99.farm.extend(percentile(&latencies, 99.0));
            rss.farm.extend(sampler.max_between(from, Instant::now()).map(|b| b as f64 / (1024.0 * 1024.0)));
            busy_cpu.note(format!(
                "round {}: {} builds in {} ({:.0} builds/s)",
                round + 1,
                submitted.len(),
                Unit::Seconds.show(dispatch_for.as_secs_f64()),
                submitted.len() as f64 / dispatch_for.as_secs_f64()
            ));
            all_latencies.extend(latencies);

            // The same, one build at a time: dispatch with nothing queued ahead of it.
            let alone = submit_builds(
                &client,
                &registry,
                repo,
                &platform,
                &context,
                &format!("u{round}-"),
                plan.unloaded_builds,
                1,
            )
            .await?;
            let latencies = dispatch_latencies(&seen, &alone)?;
            unloaded_p50.extend(percentile(&latencies, 50.0));
            unloaded_p99.extend(percentile(&latencies, 99.0));
        }
        if let Some(e) = seen.errors.lock().expect("not poisoned").first() {
            bail!("a scripted agent failed: {e}");
        }
        let _ = stop.send(true);
        client.close();
        let _ =
            tokio::time::timeout(Duration::from_secs(10), async { while doubles.join_next().await.is_some() {} }).await;
        doubles.abort_all();
        for e in &endpoints {
            e.close(0u32.into(), b"bench done");
        }
        if let Some(startup) = sampler.values_between(t_reg, t_reg + registered_in).into_iter().max() {
            rss.note(format!(
                "{rss_before:.1} MiB before any agent, peak {:.1} MiB while {n} agents connected",
                startup as f64 / (1024.0 * 1024.0)
            ));
        }
        Ok(())
    }
    .await;
    env.stop_service("coordinator-cp");
    if !all_latencies.is_empty() {
        let show = |p| percentile(&all_latencies, p).map(|v| Unit::Millis.show(v)).unwrap_or_default();
        p99.note(format!(
            "all {} samples pooled: p50 {}, p99 {}, max {}; {} builds per round, {} submitting at once",
            all_latencies.len(),
            show(50.0),
            show(99.0),
            show(100.0),
            plan.builds_per_round,
            plan.concurrency
        ));
    }
    if let (Some(a), Some(b)) = (median(&unloaded_p50), median(&unloaded_p99)) {
        p50.note(format!(
            "one build at a time ({} per round, nothing queued): p50 {}",
            plan.unloaded_builds,
            Unit::Millis.show(a)
        ));
        p99.note(format!("one build at a time: p99 {}", Unit::Millis.show(b)));
    }
    let rows = [p50, p99, rss, idle_cpu, busy_cpu];
    match result {
        Ok(()) => rows.into(),
        Err(e) => rows.into_iter().map(|r| r.failed(&e)).collect(),
    }
}

/// The `n` slowest of `latencies` (in submission order), as "12.3 ms (#0)": where in the round
/// the tail happens (at its start: something went cold during the idle window; spread: noise).
fn slowest(latencies: &[f64], n: usize) -> String {
    let mut order: Vec<usize> = (0..latencies.len()).collect();
    order.sort_by(|a, b| latencies[*b].total_cmp(&latencies[*a]));
    order.iter().take(n).map(|i| format!("{} (#{i})", Unit::Millis.show(latencies[*i]))).collect::<Vec<_>>().join(", ")
}

/// Milliseconds from each build's submission to its `Assign` being read by a double.
fn dispatch_latencies(seen: &Seen, submitted: &[(String, Instant)]) -> Result<Vec<f64>> {
    let assigned = seen.assigned.lock().expect("not poisoned");
    submitted
        .iter()
        .map(|(build, t0)| {
            let at =
                assigned.get(build).with_context(|| format!("build {build} ended but no double saw its Assign"))?;
            Ok(at.saturating_duration_since(*t0).as_secs_f64() * 1000.0)
        })
        .collect()
}

/// Submits `total` one-platform builds, `concurrency` at a time, each
/// followed to its end; returns (build id, when its submission started).
#[allow(clippy::too_many_arguments)]
async fn submit_builds(
    client: &Arc<Client>,
    registry: &str,
    repo: &str,
    platform: &Platform,
    context: &shared::Digest,
    prefix: &str,
    total: usize,
    concurrency: usize,
) -> Result<Vec<(String, Instant)>> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (client, next) = (client.clone(), next.clone());
        let spec = BuildSpec {
            platforms: vec![platform.clone()],
            tags: vec![],
            dockerfile: "Dockerfile".into(),
            build_args: vec![],
            target: None,
            no_cache: false,
            emulation: Emulation::Fallback,
            require: BTreeMap::new(),
            context: context.clone(),
            insecure_registries: vec![registry.to_string()],
            credentials: None,
            secrets: vec![],
            entitlements: vec![],
            annotations: vec![],
            labels: vec![],
            ssh: vec![],
            inputs: Default::default(),
            notify: vec![],
            sign: false,
            provenance: Default::default(),
            cache_to: None,
            cache_from: vec![],
        };
        let tag_base = format!("{registry}/{repo}:{prefix}");
        workers.spawn(async move {
            let mut done = vec![];
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= total {
                    return anyhow::Ok(done);
                }
                // A build arg of its own makes every build miss the result cache, so each one is
                // dispatched to a double rather than answered by the coordinator.
                let spec = BuildSpec {
                    tags: vec![format!("{tag_base}{i}")],
                    build_args: vec![("FARM_BENCH_BUILD".into(), format!("{tag_base}{i}"))],
                    ..spec.clone()
                };
                let t0 = Instant::now();
                let mut follow = client.build(spec).await?;
                loop {
                    match follow.next().await? {
                        Some(BuildEvent::Succeeded { .. }) => break,
                        Some(e) if e.is_terminal() => bail!("build {} ended with {e:?}", follow.build),
                        Some(_) => {}
                        None => bail!("build {} ended without a result", follow.build),
                    }
                }
                done.push((follow.build.clone(), t0));
            }
        });
    }
    let mut all = vec![];
    while let Some(r) = workers.join_next().await {
        all.extend(r??);
    }
    // In submission order, so that a position in the round means something.
    all.sort_by_key(|(_, t0)| *t0);
    Ok(all)
}

/// Row 13: a real `farm agent`, idle (online, heartbeating, no task), sampled over `window`.
pub async fn agent_idle_rss(env: &mut Env, coordinator: &str, window: Duration) -> Row {
    let mut row = Row::new("13", "real agent idle RSS", Unit::Mebibytes, Goal::AtMost(20.0));
    row.farm_label = format!(
        "VmRSS of one `farm agent` process once online, sampled every 250 ms for {} (median)",
        Unit::Seconds.show(window.as_secs_f64())
    );
    let result: Result<()> = async {
        env.start_agent(coordinator, "idle", &["--label", "bench=idle"])?;
        env.wait_online(coordinator, &["idle"], Duration::from_secs(60)).await?;
        let pid = env.agent_pid("idle").context("agent pid")?;
        let end = Instant::now() + window;
        while Instant::now() < end {
            row.farm.extend(procs::rss_bytes(pid).map(|b| b as f64 / (1024.0 * 1024.0)));
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        Ok(())
    }
    .await;
    env.stop_service("agent idle");
    if let Some(max) = row.farm.iter().copied().reduce(f64::max) {
        row.note(format!("max {}", Unit::Mebibytes.show(max)));
    }
    match result {
        Ok(()) => row,
        Err(e) => row.failed(e),
    }
}
