//! The decisions an agent makes about its session, as plain functions: what it registers as and
//! how long it waits before trying again.

use std::time::Duration;

use shared::host::HostPlatforms;
use shared::proto::AgentInfo;
use shared::Platform;

use crate::builder::BuilderInfo;
use crate::Config;

/// The registration: detected platforms, corrected by configuration. A platform listed as native
/// is never also offered as emulated. The label `builder=<name>` is added, so that builds can
/// `--require builder=docker`; it names the builder actually used, over a configured one.
pub fn agent_info(config: &Config, host: HostPlatforms, builder: &BuilderInfo) -> AgentInfo {
    let pc = &config.platforms;
    let mut native = pc.native.clone().unwrap_or(host.native);
    extend_unique(&mut native, &pc.extra_native);
    let mut emulated = pc.emulated.clone().unwrap_or(host.emulated);
    extend_unique(&mut emulated, &pc.extra_emulated);
    emulated.retain(|p| !native.contains(p));
    let mut labels = config.labels.clone();
    labels.insert("builder".into(), builder.name.clone());
    AgentInfo {
        native,
        emulated,
        labels,
        capacity: config.capacity.max(1),
        builder: builder.name.clone(),
        builder_version: builder.version.clone(),
        farm_version: shared::FARM_VERSION.to_string(),
        memory_limit: config.memory_limit,
        // farm's Docker builder cannot grant security.insecure (`docker build` has no --allow).
        allowed: config
            .allowed()
            .into_iter()
            .filter(|e| builder.name != "docker" || *e != shared::proto::Entitlement::SecurityInsecure)
            .collect(),
    }
}

/// How many builds a host runs at once unless told: one more than its cores (builds also wait on
/// the network and the disk), but no more than one per GiB of memory, and at least one. A Pi Zero 2 W
/// (4 cores, 512 MiB) gets 1, a Pi 4 with 2 GiB gets 2, an 8-core box with 32 GiB gets 9.
pub fn default_capacity(cores: usize, memory_bytes: u64) -> u32 {
    let by_cpu = cores as u64 + 1;
    let by_memory = memory_bytes / (1 << 30);
    by_cpu.min(by_memory).clamp(1, 32) as u32
}

/// `MemTotal` from /proc/meminfo's text, in bytes.
pub fn mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn extend_unique(list: &mut Vec<Platform>, more: &[Platform]) {
    for p in more {
        if !list.contains(p) {
            list.push(p.clone());
        }
    }
}

pub fn list(ps: &[Platform]) -> String {
    if ps.is_empty() {
        return "-".into();
    }
    ps.iter().map(ToString::to_string).collect::<Vec<_>>().join(",")
}

/// The wait before the next heartbeat: between 3/4 of the coordinator's `interval` and all of it,
/// `jitter` in [0, 1] picking where. Agents that connected together (after a coordinator restart)
/// then drift apart instead of beating in one burst every interval, and no beat is ever later
/// than the coordinator asked.
pub fn heartbeat_delay(interval: Duration, jitter: f64) -> Duration {
    interval.mul_f64(0.75 + 0.25 * jitter.clamp(0.0, 1.0))
}

/// Capped exponential backoff with jitter, so that a farm of agents does not reconnect in one
/// burst when its coordinator comes back.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self { initial, max, attempt: 0 }
    }

    /// The next delay; `jitter` in [0, 1] picks a point in the upper half of the window.
    pub fn next(&mut self, jitter: f64) -> Duration {
        let exp = self.initial.saturating_mul(1u32 << self.attempt.min(20));
        let ceiling = exp.min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        ceiling.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Platform {
        s.parse().unwrap()
    }

    fn host() -> HostPlatforms {
        HostPlatforms {
            native: vec![p("linux/amd64"), p("linux/386")],
            emulated: vec![p("linux/arm64"), p("linux/arm/v7"), p("linux/arm/v6")],
        }
    }

    fn builder() -> BuilderInfo {
        BuilderInfo { name: "buildah".into(), version: "1.28.2".into() }
    }

    fn config() -> Config {
        Config::new("127.0.0.1:1".into(), "/ca".into(), "a".into(), "/w".into())
    }

    #[test]
    fn detected_platforms_pass_through() {
        let info = agent_info(&config(), host(), &builder());
        assert_eq!(info.native, host().native);
        assert_eq!(info.emulated, host().emulated);
        assert_eq!(info.builder_version, "1.28.2");
        assert_eq!(info.labels.get("builder").map(String::as_str), Some("buildah"));
        let docker = BuilderInfo { name: "docker".into(), version: "20.10.24".into() };
        let mut c = config();
        c.labels.insert("builder".into(), "configured".into());
        c.labels.insert("gpu".into(), "nvidia".into());
        let info = agent_info(&c, host(), &docker);
        assert_eq!(info.labels.get("builder").map(String::as_str), Some("docker"));
        assert_eq!(info.labels.get("gpu").map(String::as_str), Some("nvidia"));
    }

    #[test]
    fn configured_native_replaces_detection_and_wins_over_emulation() {
        let mut c = config();
        c.platforms.native = Some(vec![p("linux/arm64")]);
        let info = agent_info(&c, host(), &builder());
        assert_eq!(info.native, vec![p("linux/arm64")]);
        assert_eq!(info.emulated, vec![p("linux/arm/v7"), p("linux/arm/v6")]);
    }

    #[test]
    fn extras_add_and_empty_override_disables_emulation() {
        let mut c = config();
        c.platforms.extra_native = vec![p("linux/arm/v7"), p("linux/amd64")];
        c.platforms.emulated = Some(vec![]);
        let info = agent_info(&c, host(), &builder());
        assert_eq!(info.native, vec![p("linux/amd64"), p("linux/386"), p("linux/arm/v7")]);
        assert!(info.emulated.is_empty());
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let mut b = Backoff::new(Duration::from_millis(200), Duration::from_secs(2));
        let full: Vec<_> = (0..6).map(|_| b.next(1.0)).collect();
        assert_eq!(full, [200, 400, 800, 1600, 2000, 2000].map(Duration::from_millis).to_vec());
        b.reset();
        assert_eq!(b.next(0.0), Duration::from_millis(100));
    }

    #[test]
    fn heartbeats_are_jittered_but_never_late() {
        let interval = Duration::from_secs(4);
        assert_eq!(super::heartbeat_delay(interval, 0.0), Duration::from_secs(3));
        assert_eq!(super::heartbeat_delay(interval, 1.0), interval);
        assert_eq!(super::heartbeat_delay(interval, 7.0), interval);
    }

    #[test]
    fn default_capacity_follows_cores_and_memory() {
        const GIB: u64 = 1 << 30;
        assert_eq!(super::default_capacity(4, 512 << 20), 1, "Pi Zero 2 W");
        assert_eq!(super::default_capacity(4, 2 * GIB), 2, "Pi 4, 2 GiB");
        assert_eq!(super::default_capacity(4, 8 * GIB), 5, "Pi 5, 8 GiB");
        assert_eq!(super::default_capacity(2, 24 * GIB), 3, "a 2-core x86 box");
        assert_eq!(super::default_capacity(64, 512 * GIB), 32, "capped");
        assert_eq!(super::default_capacity(0, 0), 1);
        assert_eq!(super::mem_total("MemTotal:       24576000 kB\nMemFree: 1 kB\n"), Some(24576000 * 1024));
        assert_eq!(super::mem_total("nonsense"), None);
    }
}
