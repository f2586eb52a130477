//! What `farm build --progress json` printed, read back: one JSON event per line, each stamped
//! with when the bench received it. From those stamps comes "where the time goes" (submit,
//! context, build, export, push, report, stitch), and from the events themselves whether a
//! platform was answered from a result cache and any timings farm reports on its own.
//!
//! The CLI's output is the interface: the result cache and phase timings are being added while
//! this bench is written, so their exact shape is not known here. Anything the known events do
//! not explain is kept (unknown variants, extra numbers in `PlatformDone`), and a platform counts
//! as cached when an event says "cache" about it (see [`cached_platforms`]).

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

/// One event and when it arrived, in seconds since `farm build` was started.
#[derive(Debug, Clone)]
pub struct Stamped {
    pub at: f64,
    pub event: Value,
}

/// Event variants this bench knows (`shared::proto::BuildEvent` when it was written).
const KNOWN: [&str; 9] =
    ["Waiting", "Started", "Log", "Retrying", "PlatformDone", "PlatformFailed", "Succeeded", "Failed", "Cancelled"];

/// Parses stdout lines into events; lines that are not JSON objects or strings are skipped.
pub fn parse(lines: &[(f64, String)]) -> Vec<Stamped> {
    lines
        .iter()
        .filter_map(|(at, l)| {
            let v: Value = serde_json::from_str(l.trim()).ok()?;
            (v.is_object() || v.is_string()).then_some(Stamped { at: *at, event: v })
        })
        .collect()
}

/// The variant name and payload of an externally tagged enum value (`{"Log": {...}}` or
/// `"Cancelled"`).
pub fn variant(v: &Value) -> (&str, &Value) {
    match v {
        Value::String(s) => (s.as_str(), &Value::Null),
        Value::Object(m) if m.len() == 1 => {
            let (k, v) = m.iter().next().expect("one entry");
            (k.as_str(), v)
        }
        _ => ("", &Value::Null),
    }
}

fn platform(payload: &Value) -> Option<String> {
    match payload.get("platform")? {
        Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

/// Did the build succeed, and which platforms did it report done?
pub fn succeeded(events: &[Stamped]) -> bool {
    events.iter().any(|e| variant(&e.event).0 == "Succeeded")
}

#[derive(Debug, Default, Clone, PartialEq)]
struct Marks {
    started: Option<f64>,
    first_step: Option<f64>,
    build_done: Option<f64>,
    last_builder_line: Option<f64>,
    pushed: Option<f64>,
    done: Option<f64>,
}

/// Where the time of one `farm build` went, along its critical path (the platform that finished
/// last), in seconds. Phases whose marks are missing (a result served from a cache prints no
/// buildah lines) are left out.
///
/// - `1 submit`: CLI start, connect, scan, upload, submit, placement, until the platform started;
/// - `2 context`: assignment to buildah's first STEP (agent fetches and materialises the context);
/// - `3 build`: buildah build;
/// - `4 export`: `buildah push` to an OCI layout on the agent;
/// - `5 push`: from there to "farm: pushed" (rmi, registry push by digest);
/// - `6 report`: pushed to `PlatformDone` at the CLI;
/// - `7 stitch`: last `PlatformDone` to `Succeeded` (index pushed under the tags);
/// - `8 exit`: `Succeeded` to the CLI's exit.
pub fn phases(events: &[Stamped], wall: f64) -> BTreeMap<String, f64> {
    let mut marks: BTreeMap<String, Marks> = BTreeMap::new();
    let mut succeeded_at = None;
    for e in events {
        let (name, payload) = variant(&e.event);
        let p = platform(payload);
        match (name, p) {
            ("Started", Some(p)) => {
                // A retry starts the clock again.
                marks.insert(p, Marks { started: Some(e.at), ..Marks::default() });
            }
            ("Log", Some(p)) => {
                let m = marks.entry(p).or_default();
                let line = payload.get("line").and_then(Value::as_str).unwrap_or("");
                if line.starts_with("farm: pushed") {
                    m.pushed.get_or_insert(e.at);
                } else if line.starts_with("farm:") {
                } else if m.pushed.is_none() {
                    if m.first_step.is_none() && line.contains("STEP ") {
                        m.first_step = Some(e.at);
                    }
                    if m.first_step.is_some() && m.build_done.is_none() && line.contains("Successfully tagged") {
                        m.build_done = Some(e.at);
                    }
                    m.last_builder_line = Some(e.at);
                }
            }
            ("PlatformDone", Some(p)) => {
                marks.entry(p).or_default().done = Some(e.at);
            }
            ("Succeeded", _) => succeeded_at = Some(e.at),
            _ => {}
        }
    }
    let mut out = BTreeMap::new();
    let Some((_, m)) = marks
        .iter()
        .filter(|(_, m)| m.done.is_some())
        .max_by(|a, b| a.1.done.unwrap_or(0.0).total_cmp(&b.1.done.unwrap_or(0.0)))
    else {
        return out;
    };
    let mut span = |name: &str, from: Option<f64>, to: Option<f64>| {
        if let (Some(a), Some(b)) = (from, to) {
            out.insert(name.to_string(), (b - a).max(0.0));
        }
    };
    span("1 submit", Some(0.0), m.started);
    if m.started.is_none() {
        // Answered without an agent (the result cache): submission to the platform's result.
        span("1 submit+cache", Some(0.0), m.done);
    }
    span("2 context", m.started, m.first_step);
    span("3 build", m.first_step, m.build_done);
    span("4 export", m.build_done, m.last_builder_line.filter(|_| m.build_done.is_some()));
    span("5 push", m.last_builder_line.filter(|_| m.build_done.is_some()), m.pushed);
    span("6 report", m.pushed, m.done);
    let last_done =
        marks.values().filter_map(|m| m.done).fold(None, |a: Option<f64>, d| Some(a.map_or(d, |a| a.max(d))));
    span("7 stitch", last_done, succeeded_at);
    span("8 exit", succeeded_at, Some(wall));
    out
}

/// Why a build failed, in one line: the failed platform, its error and its last log line.
pub fn failure(events: &[Stamped]) -> Option<String> {
    events.iter().find_map(|e| {
        let (name, payload) = variant(&e.event);
        match name {
            "PlatformFailed" => {
                let error = payload.get("error").and_then(Value::as_str).unwrap_or("failed");
                let last =
                    payload.get("last_lines").and_then(Value::as_array).and_then(|l| l.last()).and_then(Value::as_str);
                Some(format!("{}: {error}{}", platform(payload)?, last.map(|l| format!(": {l}")).unwrap_or_default()))
            }
            "Failed" => payload.get("error").and_then(Value::as_str).map(str::to_string),
            _ => None,
        }
    })
}

/// The platforms that an event says were answered from a cache: a `PlatformDone` (or any event
/// naming the platform) with a true field whose name contains "cache", an event variant whose
/// name contains "cache", or a farm log line ("farm: ...") mentioning a cache. buildah's own
/// "Using cache" lines are layer-cache hits inside a build that ran, and do not count.
pub fn cached_platforms(events: &[Stamped]) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for e in events {
        let (name, payload) = variant(&e.event);
        let Some(p) = platform(payload).or_else(|| payload.get("result").and_then(platform)) else { continue };
        let says_cache = match name {
            "Log" => payload
                .get("line")
                .and_then(Value::as_str)
                .is_some_and(|l| l.starts_with("farm:") && l.to_ascii_lowercase().contains("cache")),
            n if n.to_ascii_lowercase().contains("cache") => true,
            _ => true_cache_field(payload),
        };
        if says_cache {
            out.insert(p);
        }
    }
    out
}

fn true_cache_field(v: &Value) -> bool {
    match v {
        Value::Object(m) => m.iter().any(|(k, v)| {
            let key = k.to_ascii_lowercase().contains("cache");
            (key && (v == &Value::Bool(true) || v.as_str().is_some_and(|s| s.eq_ignore_ascii_case("hit"))))
                || (v.is_object() && true_cache_field(v))
        }),
        _ => false,
    }
}

/// Event variants this bench does not know (new features of the CLI), with how often each came.
pub fn unknown_variants(events: &[Stamped]) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for e in events {
        let (name, _) = variant(&e.event);
        if !name.is_empty() && !KNOWN.contains(&name) {
            *out.entry(name.to_string()).or_insert(0) += 1;
        }
    }
    out
}

/// Timings farm reports itself: every number in the last `PlatformDone` payload (the platform
/// on the critical path) beyond the fields known before timings existed (`duration_ms`, the
/// manifest's size, the attempt), by dotted path; a list of named entries (farm's `timings:
/// [{"name": "build", "ms": 3400}]`) is keyed by name (`timings.build.ms`).
pub fn reported_timings(events: &[Stamped]) -> BTreeMap<String, f64> {
    let Some(last) = events.iter().rev().map(|e| variant(&e.event)).find(|(name, _)| *name == "PlatformDone") else {
        return BTreeMap::new();
    };
    let mut found = vec![];
    numbers("", last.1, &mut found);
    found
        .into_iter()
        .filter(|(path, _)| !["duration_ms", "manifest.size", "attempt"].contains(&path.as_str()))
        .collect()
}

fn numbers(prefix: &str, v: &Value, out: &mut Vec<(String, f64)>) {
    match v {
        Value::Number(n) => out.push((prefix.to_string(), n.as_f64().unwrap_or(0.0))),
        Value::Object(m) => {
            for (k, v) in m {
                let path = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                numbers(&path, v, out);
            }
        }
        // A list of named entries (`[{"name": "build", "ms": 3400}]`): each under its name.
        Value::Array(items) => {
            for item in items {
                let Some(name) = item.get("name").and_then(Value::as_str) else { continue };
                let Some(fields) = item.as_object() else { continue };
                for (k, v) in fields.iter().filter(|(k, _)| *k != "name") {
                    numbers(&format!("{prefix}.{name}.{k}"), v, out);
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn log(at: f64, p: &str, line: &str) -> Stamped {
        Stamped { at, event: json!({"Log": {"platform": p, "line": line}}) }
    }

    fn run() -> Vec<Stamped> {
        let done = |at, p: &str| Stamped {
            at,
            event: json!({"PlatformDone": {"platform": p, "manifest": {"media_type": "m", "digest": "sha256:00", "size": 500},
                "agent": "x", "emulated": false, "duration_ms": 4000}}),
        };
        vec![
            Stamped {
                at: 0.2,
                event: json!({"Started": {"platform": "linux/amd64", "agent": "x", "emulated": false, "attempt": 1}}),
            },
            Stamped {
                at: 0.25,
                event: json!({"Started": {"platform": "linux/arm64", "agent": "y", "emulated": true, "attempt": 1}}),
            },
            log(0.3, "linux/amd64", "farm: building linux/amd64 on agent x (native)"),
            log(0.5, "linux/amd64", "[1/2] STEP 1/7: FROM r/busybox AS build"),
            log(0.6, "linux/arm64", "[1/2] STEP 1/7: FROM r/busybox AS build"),
            log(2.5, "linux/amd64", "Successfully tagged localhost/farm-task-1-1:latest"),
            log(2.6, "linux/amd64", "Getting image source signatures"),
            log(3.0, "linux/amd64", "Storing signatures"),
            log(3.4, "linux/amd64", "farm: pushed r/app@sha256:00 (2 blobs uploaded, 1 already there)"),
            done(3.5, "linux/amd64"),
            log(5.0, "linux/arm64", "Successfully tagged localhost/farm-task-2-1:latest"),
            log(5.5, "linux/arm64", "Storing signatures"),
            log(6.0, "linux/arm64", "farm: pushed r/app@sha256:01"),
            done(6.1, "linux/arm64"),
            Stamped { at: 6.3, event: json!({"Succeeded": {"index": "sha256:02", "tags": [], "platforms": []}}) },
        ]
    }

    #[test]
    fn phases_follow_the_critical_path() {
        let p = phases(&run(), 6.4);
        let close = |k: &str, v: f64| assert!((p[k] - v).abs() < 1e-9, "{k}: {} != {v} in {p:?}", p[k]);
        close("1 submit", 0.25);
        close("2 context", 0.35);
        close("3 build", 4.4);
        close("4 export", 0.5);
        close("5 push", 0.5);
        close("6 report", 0.1);
        close("7 stitch", 0.2);
        close("8 exit", 0.1);
        assert!(succeeded(&run()));
        assert_eq!(failure(&run()), None);
        let failed = Stamped {
            at: 1.0,
            event: json!({"PlatformFailed": {"platform": "linux/arm/v7", "error": "buildah build failed (exit status: 125)",
                "last_lines": ["STEP 1/8: FROM r/busybox", "Error: image not known"]}}),
        };
        assert_eq!(
            failure(&[failed]).unwrap(),
            "linux/arm/v7: buildah build failed (exit status: 125): Error: image not known"
        );
    }

    #[test]
    fn lines_parse_and_unknown_events_are_kept() {
        let lines = vec![
            (0.1, r#"{"Started":{"platform":"linux/amd64","agent":"a","emulated":false,"attempt":1}}"#.to_string()),
            (0.2, "not json".to_string()),
            (0.3, r#"{"Timings":{"platform":"linux/amd64","fetch_ms":3}}"#.to_string()),
            (0.4, r#""Cancelled""#.to_string()),
        ];
        let ev = parse(&lines);
        assert_eq!(ev.len(), 3);
        assert_eq!(variant(&ev[2].event).0, "Cancelled");
        assert_eq!(unknown_variants(&ev), [("Timings".to_string(), 1)].into());
        assert!(cached_platforms(&run()).is_empty());
        assert!(reported_timings(&run()).is_empty());
    }

    #[test]
    fn cache_answers_are_recognised_in_any_shape_but_layer_cache_lines_are_not() {
        let done = |extra: Value| {
            let mut payload = json!({"platform": "linux/arm64", "manifest": {"media_type": "m", "digest": "sha256:00", "size": 1},
                "agent": "x", "emulated": false, "duration_ms": 4});
            payload.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
            Stamped { at: 1.0, event: json!({ "PlatformDone": payload }) }
        };
        let set = |s: &[&str]| s.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
        assert_eq!(cached_platforms(&[done(json!({"cached": true}))]), set(&["linux/arm64"]));
        assert_eq!(cached_platforms(&[done(json!({"cache": "hit"}))]), set(&["linux/arm64"]));
        assert_eq!(cached_platforms(&[done(json!({"from": {"result_cache": true}}))]), set(&["linux/arm64"]));
        assert!(cached_platforms(&[done(json!({"cached": false}))]).is_empty());
        let hit = Stamped { at: 1.0, event: json!({"CacheHit": {"platform": "linux/amd64"}}) };
        assert_eq!(cached_platforms(&[hit]), set(&["linux/amd64"]));
        assert_eq!(
            cached_platforms(&[log(1.0, "linux/arm/v7", "farm: result cache hit, nothing to build")]),
            set(&["linux/arm/v7"])
        );
        assert!(cached_platforms(&[log(1.0, "linux/arm/v7", "--> Using cache 0123abcd")]).is_empty());
        let timed = done(json!({"timings": {"fetch_ms": 12, "build_ms": 3400}}));
        let t = reported_timings(&[timed]);
        assert_eq!(t["timings.build_ms"], 3400.0);
        assert!(!t.contains_key("duration_ms"));
        let listed = done(json!({"timings": [{"name": "context sync", "ms": 12}, {"name": "build", "ms": 3400}]}));
        let t = reported_timings(&[listed]);
        assert_eq!(t["timings.build.ms"], 3400.0);
        assert_eq!(t["timings.context sync.ms"], 12.0);
    }
}
