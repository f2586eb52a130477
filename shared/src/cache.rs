//! The layer cache shared through a registry: `--cache-to` / `--cache-from` as buildx spells them
//! (`type=registry,ref=REGISTRY/REPOSITORY[:TAG][,mode=max]`), the coordinator's `cache_repo`, and
//! the repository each platform's cache lives in. **Pure.**
//!
//! buildah (`--layers --cache-to REPO --cache-from REPO`) stores one image per build step in a
//! repository, tagged by the step's cache key. Entries of different platforms must never meet
//! (buildx's multi-node registry cache keeps only the last platform), so every platform gets a
//! repository of its own below the cache reference: `REPOSITORY/linux-arm64` (with a tag,
//! `REPOSITORY/TAG/linux-arm64`). The registry then holds the user's tags and, under the cache
//! repository only, buildah's step tags.

use std::fmt;

use crate::oci::{names_registry, valid_component, ImageRef};
use crate::Platform;

/// A registry cache reference: where every platform's cache repository lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheRef {
    pub registry: String,
    pub repository: String,
    pub tag: Option<String>,
}

/// Why a `--cache-to` / `--cache-from` / `cache_repo` value was refused: the message names the
/// flag (or key), the value, and the fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{flag} {value}: {reason}")]
pub struct CacheError {
    pub flag: String,
    pub value: String,
    pub reason: String,
}

const SPELLING: &str = "type=registry,ref=REGISTRY/REPOSITORY[:TAG][,mode=max]";

impl CacheRef {
    /// A reference as written in `ref=` or in `cache_repo`: `REGISTRY/REPOSITORY[:TAG]`, no
    /// digest, the registry named.
    pub fn parse_ref(value: &str, flag: &str) -> Result<CacheRef, CacheError> {
        let err = |reason: String| CacheError { flag: flag.into(), value: value.into(), reason };
        let r: ImageRef = value.parse().map_err(|e: crate::oci::ImageRefError| err(e.reason))?;
        if !names_registry(value) {
            return Err(err(format!(
                "names no registry; name yours, e.g. registry.lan:5000/{}",
                r.repository.trim_start_matches("library/")
            )));
        }
        if r.digest.is_some() {
            return Err(err("a cache reference has no digest; name a repository and, at most, a tag".into()));
        }
        if let Some(t) = &r.tag {
            if !valid_component(t) {
                return Err(err(format!(
                    "the tag {t:?} also names a repository path (REPOSITORY/{t}/<platform>), so it may only hold \
                     lowercase letters, digits and single '.', '_' or '-' between them; e.g. :{}",
                    t.to_ascii_lowercase()
                )));
            }
        }
        Ok(CacheRef { registry: r.registry, repository: r.repository, tag: r.tag })
    }

    /// A `--cache-to` / `--cache-from` value: `type=registry,ref=...[,mode=max|min]`, or (for
    /// `--cache-from`, as buildx allows) a bare reference.
    pub fn parse_flag(value: &str, flag: &str) -> Result<CacheRef, CacheError> {
        let err = |reason: String| CacheError { flag: flag.into(), value: value.into(), reason };
        if !value.contains('=') {
            if flag == "--cache-from" {
                return Self::parse_ref(value, flag);
            }
            return Err(err(format!("expected {SPELLING}")));
        }
        let mut pairs = vec![];
        for part in value.split(',') {
            let (k, v) =
                part.split_once('=').ok_or_else(|| err(format!("{part:?} is not KEY=VALUE; expected {SPELLING}")))?;
            pairs.push((k, v));
        }
        // The type first: a cache of another type is refused as such, whatever its other keys.
        match pairs.iter().find(|(k, _)| *k == "type").map(|(_, v)| *v) {
            Some("registry") => {}
            Some(other) => {
                return Err(err(format!(
                    "type={other}: farm's agents share their layer cache only through a registry (each keeps its own \
                     between builds); use {flag} {SPELLING}"
                )))
            }
            None => return Err(err(format!("no type= given; expected {SPELLING}"))),
        }
        let mut reference = None;
        for (k, v) in pairs {
            match k {
                "type" => {}
                "ref" => reference = Some(v),
                // buildah stores every step's layer (buildx's mode=max) whatever is asked.
                "mode" if flag == "--cache-to" && (v == "max" || v == "min") => {}
                "mode" if flag == "--cache-to" => return Err(err(format!("mode={v}: expected mode=max or mode=min"))),
                _ => {
                    return Err(err(format!(
                        "farm's registry cache takes type=, ref= and (--cache-to) mode=, not {k}=; expected {SPELLING}"
                    )))
                }
            }
        }
        let reference = reference.ok_or_else(|| err(format!("no ref= given; expected {SPELLING}")))?;
        Self::parse_ref(reference, flag).map_err(|e| err(e.reason))
    }

    /// The repository (no tag) that holds `platform`'s cache: buildah's `--cache-to` /
    /// `--cache-from` value.
    pub fn for_platform(&self, platform: &Platform) -> String {
        let p = platform.to_string().replace('/', "-");
        match &self.tag {
            Some(t) => format!("{}/{}/{t}/{p}", self.registry, self.repository),
            None => format!("{}/{}/{p}", self.registry, self.repository),
        }
    }
}

impl fmt::Display for CacheRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        match &self.tag {
            Some(t) => write!(f, ":{t}"),
            None => Ok(()),
        }
    }
}

/// The `host[:port]` of a repository string such as `registry.lan:5000/farm-cache/linux-amd64`.
pub fn registry_of(repository: &str) -> &str {
    repository.split('/').next().unwrap_or(repository)
}

/// One step of a build as buildah's log shows it (`STEP n/m: INSTRUCTION`): whether a cache
/// answered it (`--> Using cache`, `--> Cache pulled from remote`) and the reference it was
/// exported as (`--> Pushing cache REPOSITORY:KEY`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Step {
    pub instruction: String,
    pub hit: bool,
    pub pushed: Option<String>,
}

impl Step {
    /// RUN, COPY and ADD add a layer; buildah 1.28 looks those up in `--cache-from` by key.
    pub fn adds_layer(&self) -> bool {
        let word = self.instruction.split_whitespace().next().unwrap_or("");
        ["RUN", "COPY", "ADD"].iter().any(|w| word.eq_ignore_ascii_case(w))
    }
}

/// The steps of one build, read from its log line by line ([`StepLog::line`]).
///
/// Why farm reads them: buildah 1.28 pulls a step from `--cache-from` by its cache key only for
/// steps that add a layer (RUN, COPY, ADD), and only while every earlier step of the stage was a
/// cache hit. A cold store misses the first `ARG`, `ENV`, `WORKDIR`... of a stage (nothing pulls
/// it), so nothing after it comes from the registry. Importing those layer-less steps' images
/// before the build (they hold no layer of their own: a manifest and a config each) makes them
/// local hits, and buildah then pulls the layer steps lazily, one by one, only while they hit.
/// [`StepLog::imports`] names them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StepLog {
    steps: Vec<Step>,
}

impl StepLog {
    /// Reads one line of buildah's output (any prefix before `STEP` or `-->` is ignored).
    pub fn line(&mut self, line: &str) {
        if let Some(instruction) = step_instruction(line) {
            self.steps.push(Step { instruction: instruction.to_string(), ..Step::default() });
            return;
        }
        let Some(at) = line.find("--> ") else { return };
        let said = &line[at + 4..];
        let Some(step) = self.steps.last_mut() else { return };
        if said.starts_with("Using cache ") || said.starts_with("Cache pulled from remote ") {
            step.hit = true;
        } else if let Some(r) = said.strip_prefix("Pushing cache ") {
            step.pushed = Some(r.trim().to_string());
        }
    }

    pub fn steps(&self) -> &[Step] {
        &self.steps
    }

    /// Every reference this build exported.
    pub fn pushed(&self) -> impl Iterator<Item = &str> {
        self.steps.iter().filter_map(|s| s.pushed.as_deref())
    }

    /// The exported images a cold store should import before the next build of the same
    /// Dockerfile: the layer-less steps (see [`StepLog`]) that were cache hits in this build
    /// (those that ran again are likely to change again), or all of them when nothing hit (a
    /// first build). Layer steps are left to buildah's lazy `--cache-from`.
    pub fn imports(&self) -> Vec<String> {
        let any_hit = self.steps.iter().any(|s| s.hit);
        self.steps.iter().filter(|s| !s.adds_layer() && (s.hit || !any_hit)).filter_map(|s| s.pushed.clone()).collect()
    }
}

/// `ARG N=1` from `[1/2] STEP 3/8: ARG N=1` (or `STEP 3/8: ARG N=1`).
fn step_instruction(line: &str) -> Option<&str> {
    let at = line.find("STEP ")?;
    if !line[..at].trim().is_empty() && !line[..at].trim_end().ends_with(']') {
        return None;
    }
    let (count, instruction) = line[at + 5..].split_once(": ")?;
    let (n, m) = count.split_once('/')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    (digits(n) && digits(m)).then_some(instruction.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Platform {
        s.parse().unwrap()
    }

    #[test]
    fn buildx_spelling_is_read() {
        let c = CacheRef::parse_flag("type=registry,ref=registry.lan:5000/farm-cache,mode=max", "--cache-to").unwrap();
        assert_eq!(c.to_string(), "registry.lan:5000/farm-cache");
        assert_eq!(c.for_platform(&p("linux/arm/v7")), "registry.lan:5000/farm-cache/linux-arm-v7");
        assert_eq!(c.for_platform(&p("linux/amd64")), "registry.lan:5000/farm-cache/linux-amd64");
        let c = CacheRef::parse_flag("type=registry,ref=127.0.0.1:5000/app/cache:main", "--cache-from").unwrap();
        assert_eq!(c.for_platform(&p("linux/arm64")), "127.0.0.1:5000/app/cache/main/linux-arm64");
        let bare = CacheRef::parse_flag("127.0.0.1:5000/c", "--cache-from").unwrap();
        assert_eq!(bare.to_string(), "127.0.0.1:5000/c");
    }

    #[test]
    fn platforms_never_share_a_repository() {
        let c = CacheRef::parse_ref("r.lan/c", "cache_repo").unwrap();
        let all: std::collections::BTreeSet<String> =
            ["linux/amd64", "linux/arm64", "linux/arm/v7", "linux/arm/v6", "linux/386"]
                .iter()
                .map(|s| c.for_platform(&p(s)))
                .collect();
        assert_eq!(all.len(), 5);
    }

    #[test]
    fn wrong_values_name_the_flag_and_the_fix() {
        let e = CacheRef::parse_flag("type=local,dest=/tmp/c", "--cache-to").unwrap_err();
        assert_eq!(
            e.to_string(),
            "--cache-to type=local,dest=/tmp/c: type=local: farm's agents share their layer cache only through a \
             registry (each keeps its own between builds); use --cache-to type=registry,ref=REGISTRY/REPOSITORY[:TAG][,mode=max]"
        );
        let e = CacheRef::parse_flag("type=registry,ref=farm-cache", "--cache-from").unwrap_err();
        assert_eq!(
            e.to_string(),
            "--cache-from type=registry,ref=farm-cache: names no registry; name yours, e.g. registry.lan:5000/farm-cache"
        );
        let e = CacheRef::parse_flag("r.lan/c", "--cache-to").unwrap_err();
        assert!(e.to_string().ends_with("expected type=registry,ref=REGISTRY/REPOSITORY[:TAG][,mode=max]"), "{e}");
        let e = CacheRef::parse_flag("type=registry,ref=r.lan/c:Main", "--cache-to").unwrap_err();
        assert!(e.to_string().contains("the tag \"Main\" also names a repository path"), "{e}");
        let e = CacheRef::parse_flag("type=registry,ref=r.lan/c,compression=zstd", "--cache-to").unwrap_err();
        assert!(e.to_string().contains("not compression="), "{e}");
        let e = CacheRef::parse_flag("type=registry,ref=r.lan/c,mode=all", "--cache-to").unwrap_err();
        assert!(e.to_string().contains("mode=all: expected mode=max or mode=min"), "{e}");
        assert!(CacheRef::parse_flag("type=gha", "--cache-from").unwrap_err().to_string().contains("type=gha"));
    }

    #[test]
    fn registry_of_a_repository() {
        assert_eq!(registry_of("127.0.0.1:5000/c/linux-amd64"), "127.0.0.1:5000");
    }

    #[test]
    fn a_build_log_names_the_layerless_steps_a_cold_store_imports() {
        let log = "[1/2] STEP 1/8: FROM 127.0.0.1:5000/busybox:latest AS build
[1/2] STEP 2/8: ARG TARGETPLATFORM
--> Using cache 6e85439e0d04
--> Pushing cache r.lan/c/linux-amd64:k2
--> 6e85439e0d0
[1/2] STEP 3/8: WORKDIR /work
--> Using cache bd0c683a1981
--> Pushing cache r.lan/c/linux-amd64:k3
[1/2] STEP 4/8: COPY deps/ deps/
--> Cache pulled from remote r.lan/c/linux-amd64:k4
--> Using cache 2a78b434a682
--> Pushing cache r.lan/c/linux-amd64:k4
[1/2] STEP 5/8: COPY . .
--> Pushing cache r.lan/c/linux-amd64:k5
[1/2] STEP 6/8: ENV X=1
--> Pushing cache r.lan/c/linux-amd64:k6
[2/2] STEP 1/2: FROM 127.0.0.1:5000/busybox:latest
[2/2] STEP 2/2: CMD [\"cat\", \"/app/summary\"]
[2/2] COMMIT app
--> Pushing cache r.lan/c/linux-amd64:k8
";
        let mut l = StepLog::default();
        log.lines().for_each(|line| l.line(line));
        assert_eq!(l.steps().len(), 8);
        assert_eq!(
            l.pushed().collect::<Vec<_>>(),
            [
                "r.lan/c/linux-amd64:k2",
                "r.lan/c/linux-amd64:k3",
                "r.lan/c/linux-amd64:k4",
                "r.lan/c/linux-amd64:k5",
                "r.lan/c/linux-amd64:k6",
                "r.lan/c/linux-amd64:k8"
            ]
        );
        // The hits without a layer; not the ENV and CMD that ran again after the change.
        assert_eq!(l.imports(), ["r.lan/c/linux-amd64:k2", "r.lan/c/linux-amd64:k3"]);
        // A first build hits nothing: every layer-less step it exported.
        let mut first = StepLog::default();
        log.lines().filter(|l| !l.contains("Using cache") && !l.contains("pulled")).for_each(|line| first.line(line));
        assert_eq!(
            first.imports(),
            ["r.lan/c/linux-amd64:k2", "r.lan/c/linux-amd64:k3", "r.lan/c/linux-amd64:k6", "r.lan/c/linux-amd64:k8"]
        );
        // Single-stage builds have no [i/n]; a RUN's own output is not a step.
        let mut single = StepLog::default();
        for line in [
            "STEP 1/2: FROM b",
            "STEP 2/2: RUN echo 'STEP 9/9: ARG X'",
            "echo STEP 3/4: ARG Y",
            "--> Pushing cache r/c:k",
        ] {
            single.line(line);
        }
        assert_eq!(single.steps().len(), 2);
        assert!(single.steps()[1].adds_layer());
        assert!(single.imports().is_empty());
    }
}
