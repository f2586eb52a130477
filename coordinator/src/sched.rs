//! Where a task runs: a pure function of the task's needs and the agents' current state.
//!
//! The rule farm exists for: a platform goes to an agent that runs it **natively** whenever such
//! an agent is connected, even if that means queueing behind its current work, because an
//! emulated build is several times slower than waiting for a native slot. Only when no connected
//! agent runs the platform natively does a task go to one that emulates it, and never when the
//! build says `--emulation never`. Labels the build requires filter every candidate. Among equal
//! candidates: free slots first, then the agent that last built this context for this platform
//! (its layer cache is warm), then the most free slots, then the name (deterministic).
//!
//! `--emulation fastest` (opt-in) instead sends a platform to the agent expected to finish it
//! first: each candidate's expected duration for this context and platform (from the durations
//! farm recorded, see [`Estimate`]) plus, when it has no free slot, the time until one frees. A
//! busy or slow native board then no longer holds a release when an idle x86_64 box would emulate
//! it sooner. Without a recorded duration for every candidate it places as `fallback` does.

use std::collections::BTreeMap;

pub use shared::proto::Emulation;
use shared::proto::{AgentInfo, Entitlement};
use shared::Platform;

/// One online agent as the scheduler sees it.
#[derive(Debug, Clone)]
pub struct Candidate<'a> {
    pub name: &'a str,
    pub native: &'a [Platform],
    pub emulated: &'a [Platform],
    pub labels: &'a BTreeMap<String, String>,
    /// The entitlements its config allows.
    pub allowed: &'a [Entitlement],
    /// Capacity minus tasks assigned to it.
    pub free: u32,
    /// `--emulation fastest` only: what farm expects of this agent for the task, if it has a
    /// recorded duration to go by.
    pub estimate: Option<Estimate>,
}

impl<'a> Candidate<'a> {
    /// Agent `name`, as it registered (`info`), with `free` slots.
    pub fn of(name: &'a str, info: &'a AgentInfo, free: u32, estimate: Option<Estimate>) -> Candidate<'a> {
        Candidate {
            name,
            native: &info.native,
            emulated: &info.emulated,
            labels: &info.labels,
            allowed: &info.allowed,
            free,
            estimate,
        }
    }
}

/// How long an agent is expected to take for a task, and to free a slot for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Estimate {
    /// The build itself, native or emulated as this agent would run it.
    pub build_ms: u64,
    /// Until one of its slots frees (0 when it has a free one).
    pub busy_ms: u64,
    /// Tasks it runs now.
    pub running: u32,
}

impl Estimate {
    pub fn finish_ms(&self) -> u64 {
        self.busy_ms.saturating_add(self.build_ms)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    Run {
        agent: String,
        emulated: bool,
        /// `--emulation fastest`: why this agent, for the user (`linux/arm64 → x86-1 (emulated):
        /// expected 3m10s vs pi-4 (native, 2 running): 9m`).
        why: Option<String>,
    },
    /// Nothing can take it now; the reason is shown to the user as is.
    Wait(String),
}

pub struct Need<'a> {
    pub platform: &'a Platform,
    pub require: &'a BTreeMap<String, String>,
    pub emulation: Emulation,
    /// What the build asks for beyond the default sandbox: only agents allowing all of it qualify.
    pub entitlements: &'a [Entitlement],
    /// The agent that last built the same context for this platform, if any.
    pub warm: Option<&'a str>,
}

pub fn place<'a>(need: &Need<'_>, agents: impl IntoIterator<Item = Candidate<'a>> + Clone) -> Placement {
    let p = need.platform;
    let labelled = || {
        agents.clone().into_iter().filter(|a| {
            need.require.iter().all(|(k, v)| a.labels.get(k) == Some(v))
                && need.entitlements.iter().all(|e| a.allowed.contains(e))
        })
    };
    let natives: Vec<Candidate> = labelled().filter(|a| a.native.contains(p)).collect();
    if need.emulation == Emulation::Fastest {
        let all: Vec<Candidate> = labelled().filter(|a| a.native.contains(p) || a.emulated.contains(p)).collect();
        if let Some(placement) = fastest(p, &all) {
            return placement;
        }
    }
    if !natives.is_empty() {
        return pick(need, &natives, false).unwrap_or_else(|| {
            Placement::Wait(format!("waiting for a free native {p} agent ({} busy)", names(&natives)))
        });
    }
    let emulators: Vec<Candidate> = labelled().filter(|a| a.emulated.contains(p)).collect();
    let labels = describe(need.require, need.entitlements);
    match need.emulation {
        Emulation::Never if emulators.is_empty() => {
            Placement::Wait(format!("waiting for an agent that runs {p} natively{labels}; none is connected"))
        }
        Emulation::Never => Placement::Wait(format!(
            "waiting for an agent that runs {p} natively{labels}; {} could emulate it but --emulation never forbids it",
            names(&emulators)
        )),
        Emulation::Fallback | Emulation::Fastest if emulators.is_empty() => {
            Placement::Wait(format!("waiting for an agent that runs or emulates {p}{labels}; none is connected"))
        }
        Emulation::Fallback | Emulation::Fastest => pick(need, &emulators, true).unwrap_or_else(|| {
            Placement::Wait(format!(
                "waiting for a free agent to emulate {p} (no native agent connected; {} busy)",
                names(&emulators)
            ))
        }),
    }
}

fn pick(need: &Need<'_>, candidates: &[Candidate<'_>], emulated: bool) -> Option<Placement> {
    candidates
        .iter()
        .filter(|a| a.free > 0)
        .max_by(|a, b| {
            let warm = |c: &Candidate| need.warm == Some(c.name);
            (warm(a), a.free).cmp(&(warm(b), b.free)).then_with(|| b.name.cmp(a.name))
        })
        .map(|a| Placement::Run { agent: a.name.to_string(), emulated, why: None })
}

/// `--emulation fastest`: the candidate expected to finish first (ties: native, then the name), or
/// `None` when some candidate has no estimate (nothing recorded to go by).
fn fastest(p: &Platform, all: &[Candidate<'_>]) -> Option<Placement> {
    let mut ranked: Vec<(u64, bool, &Candidate, Estimate)> =
        all.iter().map(|a| a.estimate.map(|e| (e.finish_ms(), !a.native.contains(p), a, e))).collect::<Option<_>>()?;
    ranked.sort_by(|x, y| (x.0, x.1, x.2.name).cmp(&(y.0, y.1, y.2.name)));
    let (_, emulated, best, est) = ranked.first()?;
    let mode = |emulated: bool| if emulated { "emulated" } else { "native" };
    let others: Vec<String> = ranked[1..]
        .iter()
        .take(2)
        .map(|(finish, emulated, a, e)| {
            let load = if e.running > 0 { format!(", {} running", e.running) } else { String::new() };
            format!("{} ({}{load}): {}", a.name, mode(*emulated), human(*finish))
        })
        .collect();
    if best.free == 0 {
        // No times in it: the reason is shown again only when it changes.
        let rest: Vec<String> =
            ranked[1..].iter().map(|(_, emulated, a, _)| format!("{} ({})", a.name, mode(*emulated))).collect();
        let rest = if rest.is_empty() { "any other agent".to_string() } else { rest.join(", ") };
        return Some(Placement::Wait(format!(
            "waiting for {} ({}): expected to finish {p} sooner than {rest}",
            best.name,
            mode(*emulated)
        )));
    }
    let versus = if others.is_empty() { String::new() } else { format!(" vs {}", others.join(", ")) };
    Some(Placement::Run {
        agent: best.name.to_string(),
        emulated: *emulated,
        why: Some(format!("{p} → {} ({}): expected {}{versus}", best.name, mode(*emulated), human(est.finish_ms()))),
    })
}

/// `3m10s`, `9s`, `1h2m`: durations as a person reads them.
pub fn human(ms: u64) -> String {
    let s = ms.div_ceil(1000);
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 if s.is_multiple_of(60) => format!("{}m", s / 60),
        60..=3599 => format!("{}m{}s", s / 60, s % 60),
        _ if (s % 3600) / 60 == 0 => format!("{}h", s / 3600),
        _ => format!("{}h{}m", s / 3600, s % 3600 / 60),
    }
}

fn names(c: &[Candidate<'_>]) -> String {
    c.iter().map(|a| a.name).collect::<Vec<_>>().join(", ")
}

fn describe(require: &BTreeMap<String, String>, entitlements: &[Entitlement]) -> String {
    let mut out = String::new();
    if !require.is_empty() {
        let l: Vec<String> = require.iter().map(|(k, v)| format!("{k}={v}")).collect();
        out += &format!(" with labels {}", l.join(","));
    }
    if !entitlements.is_empty() {
        let e: Vec<String> =
            entitlements.iter().map(|e| format!("{e} (agent config {} = true)", e.config_key())).collect();
        out += &format!(" allowing {}", e.join(", "));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Platform {
        s.parse().unwrap()
    }

    #[derive(Clone)]
    struct A {
        name: &'static str,
        native: Vec<Platform>,
        emulated: Vec<Platform>,
        labels: BTreeMap<String, String>,
        allowed: Vec<Entitlement>,
        free: u32,
    }

    fn x86(name: &'static str, free: u32) -> A {
        A {
            name,
            native: vec![p("linux/amd64"), p("linux/386")],
            emulated: vec![p("linux/arm64"), p("linux/arm/v7"), p("linux/arm/v6")],
            labels: BTreeMap::new(),
            allowed: vec![],
            free,
        }
    }

    fn arm(name: &'static str, plat: &str, free: u32) -> A {
        A { name, native: vec![p(plat)], emulated: vec![], labels: BTreeMap::new(), allowed: vec![], free }
    }

    fn cands(agents: &[A]) -> Vec<Candidate<'_>> {
        agents
            .iter()
            .map(|a| Candidate {
                name: a.name,
                native: &a.native,
                emulated: &a.emulated,
                labels: &a.labels,
                allowed: &a.allowed,
                free: a.free,
                estimate: None,
            })
            .collect()
    }

    fn run(agent: &str, emulated: bool) -> Placement {
        Placement::Run { agent: agent.into(), emulated, why: None }
    }

    fn need<'a>(platform: &'a Platform, require: &'a BTreeMap<String, String>) -> Need<'a> {
        Need { platform, require, emulation: Emulation::Fallback, entitlements: &[], warm: None }
    }

    #[test]
    fn each_platform_goes_to_its_native_agent() {
        let agents = [x86("x86", 1), arm("pi64", "linux/arm64", 1), arm("pi32", "linux/arm/v7", 1)];
        let none = BTreeMap::new();
        for (plat, agent) in [("linux/amd64", "x86"), ("linux/arm64", "pi64"), ("linux/arm/v7", "pi32")] {
            assert_eq!(place(&need(&p(plat), &none), cands(&agents)), run(agent, false), "{plat}");
        }
    }

    #[test]
    fn a_busy_native_agent_is_waited_for_rather_than_emulating() {
        let agents = [x86("x86", 1), arm("pi64", "linux/arm64", 0)];
        let none = BTreeMap::new();
        let got = place(&need(&p("linux/arm64"), &none), cands(&agents));
        assert_eq!(got, Placement::Wait("waiting for a free native linux/arm64 agent (pi64 busy)".into()));
    }

    #[test]
    fn emulation_only_without_a_native_agent_and_never_when_forbidden() {
        let agents = [x86("x86", 1)];
        let none = BTreeMap::new();
        let v7 = p("linux/arm/v7");
        assert_eq!(place(&need(&v7, &none), cands(&agents)), run("x86", true));
        let never = Need { emulation: Emulation::Never, ..need(&v7, &none) };
        assert_eq!(
            place(&never, cands(&agents)),
            Placement::Wait(
                "waiting for an agent that runs linux/arm/v7 natively; x86 could emulate it but --emulation never forbids it"
                    .into()
            )
        );
        let riscv = p("linux/riscv64");
        assert_eq!(
            place(&need(&riscv, &none), cands(&agents)),
            Placement::Wait("waiting for an agent that runs or emulates linux/riscv64; none is connected".into())
        );
    }

    #[test]
    fn required_labels_filter_candidates() {
        let mut jetson = arm("jetson", "linux/arm64", 1);
        jetson.labels.insert("gpu".into(), "nvidia".into());
        let agents = [arm("pi64", "linux/arm64", 4), jetson, x86("x86", 1)];
        let gpu: BTreeMap<String, String> = [("gpu".to_string(), "nvidia".to_string())].into();
        assert_eq!(place(&need(&p("linux/arm64"), &gpu), cands(&agents)), run("jetson", false));
        assert_eq!(
            place(&need(&p("linux/amd64"), &gpu), cands(&agents)),
            Placement::Wait(
                "waiting for an agent that runs or emulates linux/amd64 with labels gpu=nvidia; none is connected"
                    .into()
            )
        );
    }

    #[test]
    fn entitlements_go_only_to_agents_that_allow_them() {
        let mut open = x86("open", 1);
        open.allowed = vec![Entitlement::NetworkHost];
        let agents = [x86("strict", 2), open];
        let none = BTreeMap::new();
        let host = [Entitlement::NetworkHost];
        let amd64 = p("linux/amd64");
        let asks = Need { entitlements: &host, ..need(&amd64, &none) };
        assert_eq!(place(&asks, cands(&agents)), run("open", false));
        assert_eq!(place(&need(&amd64, &none), cands(&agents)), run("strict", false));
        let insecure = [Entitlement::SecurityInsecure];
        let asks = Need { entitlements: &insecure, ..need(&amd64, &none) };
        assert_eq!(
            place(&asks, cands(&agents)),
            Placement::Wait(
                "waiting for an agent that runs or emulates linux/amd64 allowing security.insecure \
                 (agent config allow_insecure = true); none is connected"
                    .into()
            )
        );
    }

    #[test]
    fn free_slots_then_warm_cache_then_most_free_then_name() {
        let none = BTreeMap::new();
        let plat = p("linux/arm64");
        let agents = [arm("a", "linux/arm64", 1), arm("b", "linux/arm64", 2), arm("c", "linux/arm64", 0)];
        assert_eq!(place(&need(&plat, &none), cands(&agents)), run("b", false));
        let warm_a = Need { warm: Some("a"), ..need(&plat, &none) };
        assert_eq!(place(&warm_a, cands(&agents)), run("a", false));
        // A warm but full agent does not win over a free one.
        let warm_c = Need { warm: Some("c"), ..need(&plat, &none) };
        assert_eq!(place(&warm_c, cands(&agents)), run("b", false));
        let tie = [arm("z", "linux/arm64", 1), arm("m", "linux/arm64", 1)];
        assert_eq!(place(&need(&plat, &none), cands(&tie)), run("m", false));
    }

    fn with(mut a: A, build_ms: u64, busy_ms: u64, running: u32) -> (A, Estimate) {
        a.free = u32::from(busy_ms == 0);
        (a, Estimate { build_ms, busy_ms, running })
    }

    fn fastest_among(agents: &[(A, Estimate)], plat: &Platform) -> Placement {
        let none = BTreeMap::new();
        let need =
            Need { platform: plat, require: &none, emulation: Emulation::Fastest, entitlements: &[], warm: None };
        let list: Vec<A> = agents.iter().map(|(a, _)| a.clone()).collect();
        let mut c = cands(&list);
        for (c, (_, e)) in c.iter_mut().zip(agents) {
            c.estimate = Some(*e);
        }
        place(&need, c)
    }

    #[test]
    fn fastest_sends_a_platform_to_an_idle_emulator_when_the_native_board_is_busy_and_says_why() {
        let arm64 = p("linux/arm64");
        // pi-4 runs two builds (its slot frees in 6 min) and takes 3 min natively; x86-1 is idle
        // and would emulate it in 3m10s.
        let agents = [with(arm("pi-4", "linux/arm64", 0), 180_000, 360_000, 2), with(x86("x86-1", 1), 190_000, 0, 0)];
        assert_eq!(
            fastest_among(&agents, &arm64),
            Placement::Run {
                agent: "x86-1".into(),
                emulated: true,
                why: Some("linux/arm64 → x86-1 (emulated): expected 3m10s vs pi-4 (native, 2 running): 9m".into()),
            }
        );
    }

    #[test]
    fn fastest_waits_for_a_busy_native_board_that_still_finishes_first() {
        let arm64 = p("linux/arm64");
        let agents = [with(arm("pi-4", "linux/arm64", 0), 60_000, 30_000, 1), with(x86("x86-1", 1), 300_000, 0, 0)];
        assert_eq!(
            fastest_among(&agents, &arm64),
            Placement::Wait(
                "waiting for pi-4 (native): expected to finish linux/arm64 sooner than x86-1 (emulated)".into()
            )
        );
        // Free and fastest: native, with the reason.
        let agents = [with(arm("pi-4", "linux/arm64", 1), 60_000, 0, 0), with(x86("x86-1", 1), 300_000, 0, 0)];
        assert_eq!(
            fastest_among(&agents, &arm64),
            Placement::Run {
                agent: "pi-4".into(),
                emulated: false,
                why: Some("linux/arm64 → pi-4 (native): expected 1m vs x86-1 (emulated): 5m".into()),
            }
        );
        // A tie goes to the native agent.
        let agents = [with(x86("x86-1", 1), 60_000, 0, 0), with(arm("pi-4", "linux/arm64", 1), 60_000, 0, 0)];
        assert!(
            matches!(fastest_among(&agents, &arm64), Placement::Run { agent, emulated: false, .. } if agent == "pi-4")
        );
    }

    #[test]
    fn fastest_without_a_recorded_duration_places_native_first() {
        let arm64 = p("linux/arm64");
        let none = BTreeMap::new();
        let agents = [arm("pi-4", "linux/arm64", 0), x86("x86-1", 1)];
        let need =
            Need { platform: &arm64, require: &none, emulation: Emulation::Fastest, entitlements: &[], warm: None };
        // No estimates: as `fallback` would, wait for the native board.
        assert!(matches!(place(&need, cands(&agents)), Placement::Wait(r) if r.contains("free native linux/arm64")));
        // With no native agent connected, fastest emulates as fallback does.
        let agents = [x86("x86-1", 1)];
        assert_eq!(place(&need, cands(&agents)), run("x86-1", true));
    }

    #[test]
    fn durations_read_as_people_write_them() {
        assert_eq!(human(0), "0s");
        assert_eq!(human(9_000), "9s");
        assert_eq!(human(190_000), "3m10s");
        assert_eq!(human(540_000), "9m");
        assert_eq!(human(3_720_000), "1h2m");
        assert_eq!(human(7_200_000), "2h");
    }
}
