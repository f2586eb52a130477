//! What people and scripts see: tables and JSON.

use std::time::{Duration, UNIX_EPOCH};

use anyhow::Result;
use shared::proto::{AgentView, BuildView, PlatformResult};
use shared::Digest;

use crate::cli::Format;

pub fn agents(agents: &[AgentView], format: Format, now_ms: u64) -> Result<String> {
    if format == Format::Json {
        let mut rows = Vec::new();
        for a in agents {
            let mut v = serde_json::to_value(a)?;
            let at = UNIX_EPOCH + Duration::from_millis(a.last_seen_ms);
            v["last_seen"] = humantime::format_rfc3339_seconds(at).to_string().into();
            rows.push(v);
        }
        return Ok(serde_json::to_string_pretty(&rows)? + "\n");
    }
    let header =
        ["NAME", "STATE", "NATIVE", "EMULATED", "LABELS", "CAPACITY", "MEMORY", "BUSY", "LAST SEEN", "CONFLICT"];
    let rows: Vec<[String; 10]> = agents
        .iter()
        .map(|a| {
            [
                a.name.clone(),
                a.state.to_string(),
                list(a.native.iter().map(ToString::to_string)),
                list(a.emulated.iter().map(ToString::to_string)),
                list(a.labels.iter().map(|(k, v)| format!("{k}={v}"))),
                a.capacity.to_string(),
                a.memory_limit.map(agent::cgroup::format_size).unwrap_or_else(|| "-".into()),
                a.busy.to_string(),
                ago(now_ms.saturating_sub(a.last_seen_ms)),
                // A second agent with this identity, refused (two machines share one certificate).
                a.conflict
                    .as_ref()
                    .map_or("-".into(), |c| format!("{} refused {}", c.address, ago(now_ms.saturating_sub(c.at_ms)))),
            ]
        })
        .collect();
    if rows.is_empty() {
        return Ok("no agents have registered yet\n".into());
    }
    Ok(table(&header, &rows))
}

fn list(items: impl Iterator<Item = String>) -> String {
    let v: Vec<String> = items.collect();
    if v.is_empty() {
        "-".into()
    } else {
        v.join(",")
    }
}

fn ago(ms: u64) -> String {
    match ms / 1000 {
        0 => "just now".into(),
        s if s < 120 => format!("{s}s ago"),
        s if s < 7200 => format!("{}m ago", s / 60),
        s => format!("{}h ago", s / 3600),
    }
}

fn table<const N: usize>(header: &[&str; N], rows: &[[String; N]]) -> String {
    let mut width = header.map(str::len);
    for r in rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let s: Vec<String> = cells.iter().zip(width).map(|(c, w)| format!("{c:<w$}")).collect();
        s.join("  ").trim_end().to_string() + "\n"
    };
    let mut out = line(header.to_vec());
    for r in rows {
        out += &line(r.iter().map(String::as_str).collect());
    }
    out
}

/// The end of a successful build: how long it took, the index, where it went, and one row per
/// platform.
pub fn build_summary(
    index: &Digest,
    tags: &[String],
    platforms: &[PlatformResult],
    mode: fn(&PlatformResult) -> &'static str,
    wall: Duration,
) -> String {
    let n = platforms.len();
    let mut out = format!("built {n} platform{} in {:.1}s", if n == 1 { "" } else { "s" }, wall.as_secs_f64());
    match platforms.iter().filter(|r| r.cached).count() {
        0 => {}
        c if c == n => out += " (all cached)",
        c => out += &format!(" ({c} cached)"),
    }
    if tags.is_empty() {
        out += &format!("\nimage index {index} (pushed to no registry)\n");
    } else {
        out += &format!("\npushed image index {index}\n");
    }
    for t in tags {
        out += &format!("  as {t}\n");
    }
    let rows: Vec<[String; 5]> = platforms
        .iter()
        .map(|r| {
            [
                r.platform.to_string(),
                r.manifest.digest.to_string(),
                r.agent.clone(),
                mode(r).to_string(),
                format!("{:.1}s", r.duration_ms as f64 / 1000.0),
            ]
        })
        .collect();
    out += &table(&["PLATFORM", "MANIFEST", "AGENT", "MODE", "DURATION"], &rows);
    out.trim_end().to_string()
}

pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

pub fn builds(builds: &[BuildView], format: Format, now_ms: u64) -> Result<String> {
    if format == Format::Json {
        return Ok(serde_json::to_string_pretty(builds)? + "\n");
    }
    if builds.is_empty() {
        return Ok("no builds yet\n".into());
    }
    let rows: Vec<[String; 5]> = builds
        .iter()
        .map(|b| {
            let platforms = b
                .platforms
                .iter()
                .map(|t| match (&t.agent, t.state.as_str()) {
                    (Some(a), "running" | "done") => {
                        format!("{}={}@{}{}", t.platform, t.state, a, if t.emulated { "(qemu)" } else { "" })
                    }
                    _ => format!("{}={}", t.platform, t.state),
                })
                .collect::<Vec<_>>()
                .join(" ");
            [b.id.clone(), b.state.clone(), ago(now_ms.saturating_sub(b.created_ms)), b.tags.join(","), platforms]
        })
        .collect();
    Ok(table(&["BUILD", "STATE", "STARTED", "TAGS", "PLATFORMS"], &rows))
}

/// `--timings`: each platform's phases, and the index push.
pub fn timings(platforms: &[PlatformResult], stitch_ms: u64) -> String {
    const PHASES: [&str; 5] = ["context sync", "materialise", "build", "export", "push"];
    let secs = |ms: u64| format!("{:.2}s", ms as f64 / 1000.0);
    let rows: Vec<[String; 7]> = platforms
        .iter()
        .map(|r| {
            let get = |p: &str| r.timings.iter().find(|t| t.name == p).map_or("-".to_string(), |t| secs(t.ms));
            [
                r.platform.to_string(),
                get(PHASES[0]),
                get(PHASES[1]),
                get(PHASES[2]),
                get(PHASES[3]),
                get(PHASES[4]),
                secs(r.duration_ms),
            ]
        })
        .collect();
    let mut out = table(&["PLATFORM", "CONTEXT SYNC", "MATERIALISE", "BUILD", "EXPORT", "PUSH", "TOTAL"], &rows);
    out += &format!("index push (stitch): {}", secs(stitch_ms));
    out
}

/// How a build ended, in one line, and whether that counts as success (for exit codes).
pub fn outcome(b: &BuildView) -> (String, bool) {
    match b.state.as_str() {
        "succeeded" => {
            let index = b.index.as_ref().map(|d| format!(": image index {d}")).unwrap_or_default();
            (format!("build {} succeeded{index}", b.id), true)
        }
        "failed" => {
            let why = b.error.as_deref().unwrap_or("no error recorded");
            (format!("build {} failed: {why}", b.id), false)
        }
        "cancelled" => (format!("build {} was cancelled", b.id), false),
        state => (format!("build {} is {state}; follow it with `farm logs {} -f`", b.id, b.id), true),
    }
}
