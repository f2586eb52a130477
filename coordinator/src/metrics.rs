//! Prometheus metrics (`metrics_listen`): counters and histograms fed by the build events the
//! driver emits, gauges read from a snapshot of the core at each scrape, and the process's own.
//! Labels are bounded: platforms, agents, states and results; never build ids or tags.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
use shared::proto::{AgentState, AgentView, BuildEvent};
use shared::Platform;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AgentLabels {
    state: String,
    platform: String,
    placement: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SlotLabels {
    agent: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PlatformLabel {
    platform: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TaskLabels {
    platform: String,
    placement: String,
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    platform: String,
    placement: String,
    phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabel {
    direction: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

/// What the core holds at a scrape.
#[derive(Debug)]
pub struct Snapshot {
    pub agents: Vec<AgentView>,
    /// One entry per queued task.
    pub queued: Vec<Platform>,
    pub stale_refused: u64,
}

/// Bookkeeping between events: when each build and each platform began to wait.
#[derive(Default)]
struct Timing {
    builds: HashMap<String, Instant>,
    /// (build, platform) → queued since; removed when it starts.
    queued: HashMap<(String, String), Instant>,
    /// (build, platform) → placement, while it runs.
    running: HashMap<(String, String), &'static str>,
    /// Platforms of a build not finished yet: cancelled ones are counted when it is cancelled.
    pending: HashMap<String, BTreeSet<String>>,
}

pub struct Metrics {
    registry: Registry,
    agents: Family<AgentLabels, Gauge>,
    slots: Family<SlotLabels, Gauge>,
    queue_depth: Family<PlatformLabel, Gauge>,
    queue_wait: Family<PlatformLabel, Histogram>,
    tasks: Family<TaskLabels, Counter>,
    task_duration: Family<PhaseLabels, Histogram>,
    builds: Family<ResultLabel, Counter>,
    build_duration: Histogram,
    context_bytes: Family<DirectionLabel, Counter>,
    stale_refused: Counter,
    tls_refusals: Family<ReasonLabel, Counter>,
    store_commit: Histogram,
    rss: Gauge,
    cpu: Counter<f64, std::sync::atomic::AtomicU64>,
    fds: Gauge,
    timing: Mutex<Timing>,
}

fn seconds_buckets() -> Histogram {
    // 0.1 s .. ~27 min.
    Histogram::new(exponential_buckets(0.1, 2.0, 15))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let m = Metrics {
            agents: Family::default(),
            slots: Family::default(),
            queue_depth: Family::default(),
            queue_wait: Family::new_with_constructor(seconds_buckets),
            tasks: Family::default(),
            task_duration: Family::new_with_constructor(seconds_buckets),
            builds: Family::default(),
            build_duration: seconds_buckets(),
            context_bytes: Family::default(),
            stale_refused: Counter::default(),
            tls_refusals: Family::default(),
            store_commit: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            rss: Gauge::default(),
            cpu: Counter::default(),
            fds: Gauge::default(),
            timing: Mutex::default(),
            registry: Registry::default(),
        };
        registry.register("farm_agents", "Agents by state, platform and placement (native|emulated)", m.agents.clone());
        registry.register("farm_agent_slots", "Build slots per agent, busy or free", m.slots.clone());
        registry.register("farm_queue_depth", "Tasks waiting for an agent, by platform", m.queue_depth.clone());
        registry.register_with_unit(
            "farm_queue_wait",
            "How long a task waited for an agent, by platform",
            Unit::Seconds,
            m.queue_wait.clone(),
        );
        registry.register(
            "farm_tasks",
            "Finished tasks by platform, placement and result (succeeded|failed|cancelled|cached|retried)",
            m.tasks.clone(),
        );
        registry.register_with_unit(
            "farm_task_duration",
            "Task time by platform, placement and phase (the agent's phases, and total)",
            Unit::Seconds,
            m.task_duration.clone(),
        );
        registry.register("farm_builds", "Finished builds by result (succeeded|failed|cancelled)", m.builds.clone());
        registry.register_with_unit(
            "farm_build_duration",
            "Build time, submission to end",
            Unit::Seconds,
            m.build_duration.clone(),
        );
        registry.register_with_unit(
            "farm_context",
            "Context and result bytes through the coordinator's content store (in: from clients and agents; out: to \
             them)",
            Unit::Bytes,
            m.context_bytes.clone(),
        );
        registry.register(
            "farm_stale_results_refused",
            "Results from an attempt the coordinator had already given up on (a reconnected agent's, a superseded \
             attempt's), refused",
            m.stale_refused.clone(),
        );
        registry.register(
            "farm_tls_refusals",
            "Connections refused at the TLS handshake or for a revoked certificate, by reason (unknown_ca|revoked|\
             no_certificate|bad_certificate|other); the log has only the first of each peer's",
            m.tls_refusals.clone(),
        );
        registry.register_with_unit(
            "farm_store_commit",
            "Time to commit one batch of state to disk",
            Unit::Seconds,
            m.store_commit.clone(),
        );
        registry.register_with_unit("process_resident_memory", "Resident memory size", Unit::Bytes, m.rss.clone());
        registry.register_with_unit("process_cpu", "User and system CPU time spent", Unit::Seconds, m.cpu.clone());
        registry.register("process_open_fds", "Open file descriptors", m.fds.clone());
        Metrics { registry, ..m }
    }

    /// A build was accepted with these platforms.
    pub fn submitted(&self, build: &str, platforms: &[Platform]) {
        let now = Instant::now();
        let mut t = self.timing.lock().unwrap();
        t.builds.insert(build.into(), now);
        for p in platforms {
            t.queued.insert((build.into(), p.to_string()), now);
        }
        t.pending.insert(build.into(), platforms.iter().map(Platform::to_string).collect());
    }

    /// Bytes moved through the content store.
    pub fn context_bytes(&self, direction: &str, bytes: u64) {
        self.context_bytes.get_or_create(&DirectionLabel { direction: direction.into() }).inc_by(bytes);
    }

    /// A connection refused at the TLS handshake (or for a revoked certificate).
    pub fn tls_refused(&self, reason: shared::refusals::Reason) {
        self.tls_refusals.get_or_create(&ReasonLabel { reason: reason.label() }).inc();
    }

    pub fn store_commit(&self, seconds: f64) {
        self.store_commit.observe(seconds);
    }

    /// One event of `build`, as the driver emits it.
    pub fn event(&self, build: &str, event: &BuildEvent) {
        let mut t = self.timing.lock().unwrap();
        let task = |platform: &str, placement: &str, result: &str| {
            self.tasks
                .get_or_create(&TaskLabels {
                    platform: platform.into(),
                    placement: placement.into(),
                    result: result.into(),
                })
                .inc();
        };
        match event {
            BuildEvent::Started { platform, emulated, .. } => {
                let key = (build.to_string(), platform.to_string());
                if let Some(since) = t.queued.remove(&key) {
                    let p = PlatformLabel { platform: platform.to_string() };
                    self.queue_wait.get_or_create(&p).observe(since.elapsed().as_secs_f64());
                }
                t.running.insert(key, placement(*emulated));
            }
            BuildEvent::Retrying { platform, .. } => {
                let key = (build.to_string(), platform.to_string());
                let placement = t.running.remove(&key).unwrap_or("native");
                task(&platform.to_string(), placement, "retried");
                t.queued.insert(key, Instant::now());
            }
            BuildEvent::PlatformDone(r) => {
                let p = r.platform.to_string();
                t.running.remove(&(build.to_string(), p.clone()));
                t.queued.remove(&(build.to_string(), p.clone()));
                if let Some(pending) = t.pending.get_mut(build) {
                    pending.remove(&p);
                }
                let placement = placement(r.emulated);
                task(&p, placement, if r.cached { "cached" } else { "succeeded" });
                if !r.cached {
                    let phase = |phase: &str, ms: u64| {
                        let labels =
                            PhaseLabels { platform: p.clone(), placement: placement.into(), phase: phase.into() };
                        self.task_duration.get_or_create(&labels).observe(ms as f64 / 1000.0);
                    };
                    for ph in &r.timings {
                        phase(&ph.name, ph.ms);
                    }
                    phase("total", r.duration_ms);
                }
            }
            BuildEvent::PlatformFailed { platform, .. } => {
                let p = platform.to_string();
                let placement = t.running.remove(&(build.to_string(), p.clone())).unwrap_or("native");
                if let Some(pending) = t.pending.get_mut(build) {
                    pending.remove(&p);
                }
                task(&p, placement, "failed");
            }
            BuildEvent::Succeeded { .. } | BuildEvent::Failed { .. } | BuildEvent::Cancelled => {
                let result = match event {
                    BuildEvent::Succeeded { .. } => "succeeded",
                    BuildEvent::Failed { .. } => "failed",
                    _ => "cancelled",
                };
                self.builds.get_or_create(&ResultLabel { result: result.into() }).inc();
                if let Some(since) = t.builds.remove(build) {
                    self.build_duration.observe(since.elapsed().as_secs_f64());
                }
                let left = t.pending.remove(build).unwrap_or_default();
                for p in left {
                    let placement = t.running.remove(&(build.to_string(), p.clone())).unwrap_or("native");
                    t.queued.remove(&(build.to_string(), p.clone()));
                    if matches!(event, BuildEvent::Cancelled) {
                        task(&p, placement, "cancelled");
                    }
                }
            }
            BuildEvent::Waiting { .. } | BuildEvent::Log { .. } => {}
        }
    }

    /// The text exposition (OpenMetrics) of everything, gauges set from `snap` and the process.
    pub fn render(&self, snap: &Snapshot) -> String {
        self.agents.clear();
        self.slots.clear();
        self.queue_depth.clear();
        for a in &snap.agents {
            let state = a.state.to_string();
            for (platforms, placement) in [(&a.native, "native"), (&a.emulated, "emulated")] {
                for p in platforms {
                    let labels =
                        AgentLabels { state: state.clone(), platform: p.to_string(), placement: placement.into() };
                    self.agents.get_or_create(&labels).inc();
                }
            }
            if a.state != AgentState::Offline {
                let slots = |s: &str, n: u32| {
                    self.slots.get_or_create(&SlotLabels { agent: a.name.clone(), state: s.into() }).set(n as i64);
                };
                slots("busy", a.busy);
                slots("free", a.capacity.saturating_sub(a.busy));
            }
        }
        for p in &snap.queued {
            self.queue_depth.get_or_create(&PlatformLabel { platform: p.to_string() }).inc();
        }
        let seen = self.stale_refused.get();
        self.stale_refused.inc_by(snap.stale_refused.saturating_sub(seen));
        let process = Process::read();
        self.rss.set(process.rss_bytes as i64);
        self.cpu.inc_by((process.cpu_seconds - self.cpu.get()).max(0.0));
        self.fds.set(process.open_fds as i64);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String");
        out
    }
}

/// Serves `GET /metrics` until the runtime stops: each scrape asks the driver for a snapshot.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: std::sync::Arc<Metrics>,
    events: tokio::sync::mpsc::Sender<crate::events::Event>,
) {
    use axum::http::{header, StatusCode};
    let scrape = move |headers: axum::http::HeaderMap| {
        let (metrics, events) = (metrics.clone(), events.clone());
        async move {
            let openmetrics = headers
                .get(header::ACCEPT)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.contains("application/openmetrics-text"));
            let (reply, rx) = tokio::sync::oneshot::channel();
            if events.send(crate::events::Event::Metrics { reply }).await.is_err() {
                return Err((StatusCode::SERVICE_UNAVAILABLE, "the coordinator is shutting down"));
            }
            let snap = rx.await.map_err(|_| (StatusCode::SERVICE_UNAVAILABLE, "the coordinator is shutting down"))?;
            let text = metrics.render(&snap);
            Ok(match openmetrics {
                true => ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], text),
                false => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text_format(&text)),
            })
        }
    };
    let app = axum::Router::new().route("/metrics", axum::routing::get(scrape));
    if let Err(e) = axum::serve(listener, app).await {
        tracing::warn!("metrics server stopped: {e}");
    }
}

/// The Prometheus text format (0.0.4) of an OpenMetrics exposition, for scrapers and tools that
/// do not ask for OpenMetrics (`promtool check metrics`, curl): a counter's HELP and TYPE name its
/// `_total` samples, and there are no UNIT or EOF lines.
pub fn text_format(openmetrics: &str) -> String {
    let counters: BTreeSet<&str> =
        openmetrics.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter")).collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "].into_iter().find_map(|p| Some((p, line.strip_prefix(p)?)));
        match meta {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                let name = if counters.contains(name) { format!("{name}_total") } else { name.to_string() };
                out += &format!("{prefix}{name} {tail}\n");
            }
            None => {
                out += line;
                out.push('\n');
            }
        }
    }
    out
}

fn placement(emulated: bool) -> &'static str {
    if emulated {
        "emulated"
    } else {
        "native"
    }
}

/// This process, from /proc (zeros where it cannot be read).
#[derive(Default)]
struct Process {
    rss_bytes: u64,
    cpu_seconds: f64,
    open_fds: u64,
}

impl Process {
    fn read() -> Process {
        let page = 4096u64;
        let ticks = 100.0; // USER_HZ on Linux
        let mut p = Process::default();
        if let Ok(statm) = std::fs::read_to_string("/proc/self/statm") {
            p.rss_bytes = statm.split_whitespace().nth(1).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0) * page;
        }
        if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
            // After the command name in parentheses: fields 14 and 15 (utime, stime) are the
            // 12th and 13th after it.
            if let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) {
                let f: Vec<&str> = rest.split_whitespace().collect();
                let t = |i: usize| f.get(i).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
                p.cpu_seconds = (t(11) + t(12)) / ticks;
            }
        }
        p.open_fds = std::fs::read_dir("/proc/self/fd").map(|d| d.count() as u64).unwrap_or(0);
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::proto::{ManifestRef, Phase, PlatformResult};

    fn p(s: &str) -> Platform {
        s.parse().unwrap()
    }

    #[test]
    fn events_and_a_snapshot_become_the_named_families_with_bounded_labels() {
        let m = Metrics::new();
        let (amd, arm) = (p("linux/amd64"), p("linux/arm64"));
        m.submitted("b1", &[amd.clone(), arm.clone()]);
        m.event("b1", &BuildEvent::Started { platform: amd.clone(), agent: "x86".into(), emulated: false, attempt: 1 });
        m.event("b1", &BuildEvent::Started { platform: arm.clone(), agent: "x86".into(), emulated: true, attempt: 1 });
        let result = PlatformResult {
            platform: amd.clone(),
            manifest: ManifestRef { media_type: "m".into(), digest: shared::Digest::of(b"m"), size: 1 },
            agent: "x86".into(),
            emulated: false,
            duration_ms: 2_000,
            cached: false,
            timings: vec![Phase { name: "build".into(), ms: 1_500 }],
        };
        m.event("b1", &BuildEvent::PlatformDone(result));
        m.event("b1", &BuildEvent::Cancelled);
        m.context_bytes("in", 42);
        let snap = Snapshot {
            agents: vec![AgentView {
                name: "x86".into(),
                state: AgentState::Online,
                native: vec![amd.clone()],
                emulated: vec![arm.clone()],
                labels: Default::default(),
                capacity: 3,
                busy: 1,
                last_seen_ms: 0,
                address: "a".into(),
                builder: "buildah".into(),
                builder_version: "1.28.2".into(),
                farm_version: "0.1.0".into(),
                memory_limit: None,
                conflict: None,
            }],
            queued: vec![arm.clone(), arm.clone()],
            stale_refused: 2,
        };
        let text = m.render(&snap);
        for line in [
            r#"farm_agents{state="online",platform="linux/amd64",placement="native"} 1"#,
            r#"farm_agents{state="online",platform="linux/arm64",placement="emulated"} 1"#,
            r#"farm_agent_slots{agent="x86",state="busy"} 1"#,
            r#"farm_agent_slots{agent="x86",state="free"} 2"#,
            r#"farm_queue_depth{platform="linux/arm64"} 2"#,
            r#"farm_tasks_total{platform="linux/amd64",placement="native",result="succeeded"} 1"#,
            r#"farm_tasks_total{platform="linux/arm64",placement="emulated",result="cancelled"} 1"#,
            r#"farm_builds_total{result="cancelled"} 1"#,
            r#"farm_context_bytes_total{direction="in"} 42"#,
            r#"farm_stale_results_refused_total 2"#,
            r#"farm_task_duration_seconds_count{platform="linux/amd64",placement="native",phase="build"} 1"#,
            r#"farm_task_duration_seconds_sum{platform="linux/amd64",placement="native",phase="total"} 2.0"#,
            r#"farm_queue_wait_seconds_count{platform="linux/arm64"} 1"#,
            "farm_build_duration_seconds_count 1",
        ] {
            assert!(text.lines().any(|l| l == line), "no line {line:?} in:\n{text}");
        }
        assert!(text.lines().any(|l| l.starts_with("process_resident_memory_bytes ")), "{text}");
        let plain = text_format(&text);
        assert!(
            plain.contains("# TYPE farm_builds_total counter\n# HELP") || plain.contains("# HELP farm_builds_total ")
        );
        assert!(plain.contains("# TYPE farm_builds_total counter"), "{plain}");
        assert!(plain.contains("# TYPE farm_queue_depth gauge"), "{plain}");
        assert!(!plain.contains("# EOF") && !plain.contains("# UNIT"), "{plain}");
        // A second scrape does not count the stale results again.
        let text = m.render(&snap);
        assert!(text.lines().any(|l| l == "farm_stale_results_refused_total 2"), "{text}");
        assert!(!text.contains("b1"), "a build id became a label:\n{text}");
    }
}
