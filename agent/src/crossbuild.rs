//! Build-platform stages on buildah. A stage declared `FROM --platform=$BUILDPLATFORM` (or with
//! the agent's own platform) is meant to run natively, with `TARGET*` naming the task's platform:
//! the cross-compile pattern. BuildKit does that; buildah 1.28 ignores `FROM --platform` and would
//! run it under QEMU. So farm does it itself:
//!
//! 1. [`plan`] (pure) finds the build-platform stages a target-platform stage uses
//!    (`COPY --from`, `RUN --mount=...,from=`);
//! 2. each is built first, natively, in the native platform's store, with the task's `TARGET*`
//!    arguments, and its files exported to a directory (`--output type=local`);
//! 3. the target build reads a copy of the Dockerfile in which those references name a build
//!    context (`farm-native-<stage>`, [`rewrite`]) given with `--build-context`; the stage itself is
//!    then unused there and skipped.
//!
//! `--target` naming a build-platform stage builds the whole thing natively (as BuildKit does).
//! A target-platform stage that starts `FROM` a build-platform stage cannot be handed across, so
//! both run as the target, as before, and the log says so.
//!
//! A child module of `builder` (declared there with `#[path]`), so that it uses the stores, their
//! locks and the command runner as the main build does.

use std::collections::BTreeSet;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use shared::dockerfile::{DepKind, Dockerfile, StageDep};
use shared::Platform;
use tokio::process::Command;
use tokio::sync::mpsc;

use super::{run, Buildah, BuilderError, Job, Outcome, SecretFiles};

/// The build contexts that stand for natively built stages are named this, then the stage.
pub(super) const CONTEXT_PREFIX: &str = shared::inputs::RESERVED_CONTEXT_PREFIX;

/// What a task's buildah build does about its build-platform stages.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Plan {
    /// Build as before: the task's platform is native, no stage needed runs on the build
    /// platform, or the Dockerfile does not parse (the build reports that itself).
    AsIs,
    /// `--target` is a build-platform stage: the whole build runs natively, with the task's
    /// `TARGET*` arguments.
    Native,
    /// These stages (index, the name `--target` takes) first, natively; then the target build
    /// of `dockerfile`, whose references to them name their build contexts.
    Split { stages: Vec<(usize, String)>, dockerfile: String },
}

/// The plan for building `target` of `text` for `platform` on a machine whose own platform is
/// `native`, and the lines that tell the user what runs where.
pub(super) fn plan(
    text: &str,
    platform: &Platform,
    native: &Platform,
    target: Option<&str>,
    build_args: &[(String, String)],
) -> (Plan, Vec<String>) {
    if platform == native {
        return (Plan::AsIs, vec![]);
    }
    let Ok(df) = shared::dockerfile::parse(text, "Dockerfile") else { return (Plan::AsIs, vec![]) };
    let Ok(t) = df.check_target(target, "Dockerfile") else { return (Plan::AsIs, vec![]) };
    let found = df.build_platform_stages(t, build_args, &native.to_string());
    if found.is_empty() {
        return (Plan::AsIs, vec![]);
    }
    let deps = df.deps_with_args(build_args);
    let label = |i: usize| label(&df, i);
    let base_of = |i: usize| deps[i].iter().find(|d| d.kind == DepKind::Base).map(|d| d.stage);
    let mut notes = Vec::new();
    let mut on_build: BTreeSet<usize> = found.into_iter().collect();
    if on_build.contains(&t) {
        match base_of(t) {
            None => {
                notes.push(format!(
                    "farm: stage {:?} (--target) and the stages it uses run natively on {native} ({}); \
                     TARGETPLATFORM is {platform}",
                    label(t),
                    why(&df, t)
                ));
                return (Plan::Native, notes);
            }
            // A target-platform image cannot start from another platform's stage: the target and
            // the stages it starts from run as the target, as before.
            Some(_) => {
                let mut demoted = vec![t];
                on_build.remove(&t);
                let mut at = t;
                while let Some(b) = base_of(at).filter(|b| on_build.remove(b)) {
                    demoted.push(b);
                    at = b;
                }
                let names: Vec<String> = demoted.iter().map(|&i| format!("{:?}", label(i))).collect();
                notes.push(format!(
                    "farm: stage {:?} starts FROM build-platform stage {}, so {} run as {platform}, not natively \
                     (buildah cannot start an image from another platform's stage)",
                    label(t),
                    names[1..].join(", "),
                    names.join(" and ")
                ));
            }
        }
    }
    let needed = df.stages_needed_with_args(t, build_args);
    let outside: Vec<usize> = needed.iter().copied().filter(|i| !on_build.contains(i)).collect();
    let used: BTreeSet<usize> = outside
        .iter()
        .flat_map(|&x| deps[x].iter())
        .filter(|d| d.kind != DepKind::Base && on_build.contains(&d.stage))
        .map(|d| d.stage)
        .collect();
    if used.is_empty() {
        return (Plan::AsIs, notes);
    }
    for &s in &used {
        notes.push(format!("farm: stage {:?} runs natively on {native} ({})", label(s), why(&df, s)));
    }
    let dockerfile = rewrite(text, &df, &deps, &outside, &used);
    (Plan::Split { stages: used.iter().map(|&s| (s, label(s))).collect(), dockerfile }, notes)
}

/// A stage as `--target` and the build context name it: its name, else its index.
fn label(df: &Dockerfile, i: usize) -> String {
    df.stages[i].name.clone().unwrap_or_else(|| i.to_string())
}

/// Why a stage runs on the build platform, as the Dockerfile says it.
fn why(df: &Dockerfile, i: usize) -> String {
    let s = &df.stages[i];
    match &s.platform {
        Some(p) => format!("FROM --platform={p}"),
        None => format!("FROM {}", s.base),
    }
}

/// `text` with every `COPY --from=` and `RUN --mount=...,from=` of the stages `stages` that
/// names a stage of `prebuilt` naming its build context instead (`farm-native-<name or index>`);
/// every other byte as it was. `deps` are the stages' uses under the build's args
/// ([`Dockerfile::deps_with_args`]): they give the lines to look at, and what a `--from=$ARG`
/// resolved to.
pub(super) fn rewrite(
    text: &str,
    df: &Dockerfile,
    deps: &[Vec<StageDep>],
    stages: &[usize],
    prebuilt: &BTreeSet<usize>,
) -> String {
    let starts: Vec<usize> = std::iter::once(0).chain(text.match_indices('\n').map(|(i, _)| i + 1)).collect();
    let mut edits: Vec<(Range<usize>, String)> = Vec::new();
    for &x in stages {
        let uses: Vec<&StageDep> = deps[x].iter().filter(|d| d.kind != DepKind::Base).collect();
        let mut lines: Vec<usize> = uses.iter().map(|d| d.line).collect();
        lines.dedup();
        for line in lines {
            let Some(&at) = line.checked_sub(1).and_then(|l| starts.get(l)) else { continue };
            let sites = from_sites(text, at, df.escape);
            // Literal values resolve here; `$` ones take, in order, the line's uses left over.
            let literal: Vec<Option<Option<usize>>> =
                sites.iter().map(|r| literal_stage(df, &text[r.clone()], x)).collect();
            let mut left: Vec<usize> = uses.iter().filter(|d| d.line == line).map(|d| d.stage).collect();
            for s in literal.iter().flatten().flatten() {
                if let Some(p) = left.iter().position(|l| l == s) {
                    left.remove(p);
                }
            }
            let mut left = left.into_iter();
            for (range, lit) in sites.into_iter().zip(literal) {
                let stage = match lit {
                    Some(found) => found,
                    None => left.next(),
                };
                if let Some(s) = stage.filter(|s| prebuilt.contains(s)) {
                    edits.push((range, format!("{CONTEXT_PREFIX}{}", label(df, s))));
                }
            }
        }
    }
    edits.sort_by_key(|(r, _)| std::cmp::Reverse(r.start));
    edits.dedup_by_key(|(r, _)| r.start);
    let mut out = text.to_owned();
    for (range, with) in edits {
        out.replace_range(range, &with);
    }
    out
}

/// What a literal `--from` value names from stage `current`: `Some(Some(stage))`, `Some(None)` for
/// an image; `None` for a value with `$` (resolved only with the build's args).
fn literal_stage(df: &Dockerfile, raw: &str, current: usize) -> Option<Option<usize>> {
    let value: String = raw.chars().filter(|c| *c != '"' && *c != '\'').collect();
    if value.contains('$') {
        return None;
    }
    let index = if value.bytes().any(|b| b.is_ascii_digit()) { value.parse::<usize>().ok() } else { None };
    let found = match index {
        Some(n) => Some(n),
        None => {
            let name = value.to_ascii_lowercase();
            df.stages.iter().position(|s| s.name.as_deref() == Some(name.as_str()))
        }
    };
    Some(found.filter(|&i| i < current))
}

/// The byte ranges of the `--from` values of the `COPY` or `RUN` instruction starting at byte
/// `at`: `COPY --from=<value>` and the `from=<value>` field of `RUN --mount=<spec>`. Only the
/// instruction's leading flags are read (a `--from=` in a RUN's command is not a flag), across
/// continuation lines and the comment lines between them.
fn from_sites(text: &str, at: usize, escape: char) -> Vec<Range<usize>> {
    let b = text.as_bytes();
    let esc = escape as u8;
    let blank = |c: u8| c == b' ' || c == b'\t';
    // `escape` then blanks then the end of the line.
    let continuation = |i: usize| -> Option<usize> {
        if b.get(i) != Some(&esc) {
            return None;
        }
        let mut j = i + 1;
        while j < b.len() && blank(b[j]) {
            j += 1;
        }
        if j < b.len() && b[j] == b'\r' {
            j += 1;
        }
        match b.get(j) {
            Some(b'\n') => Some(j + 1),
            None => Some(j),
            _ => None,
        }
    };
    let mut i = at;
    while i < b.len() && blank(b[i]) {
        i += 1;
    }
    let kw_start = i;
    while i < b.len() && !b[i].is_ascii_whitespace() {
        i += 1;
    }
    let keyword = text[kw_start..i].to_ascii_uppercase();
    if keyword != "COPY" && keyword != "RUN" {
        return vec![];
    }
    let mut sites = Vec::new();
    loop {
        // Separators: blanks, continuations and the blank or comment lines after them.
        loop {
            while i < b.len() && (blank(b[i]) || b[i] == b'\r') {
                i += 1;
            }
            let Some(next) = continuation(i) else { break };
            i = next;
            loop {
                let end = text[i..].find('\n').map_or(b.len(), |n| i + n + 1);
                let line = text[i..end].trim_start();
                if i < b.len() && (line.trim().is_empty() || line.starts_with('#')) {
                    i = end;
                } else {
                    break;
                }
            }
        }
        if i >= b.len() || b[i] == b'\n' {
            break;
        }
        let start = i;
        let mut quote: Option<u8> = None;
        while i < b.len() {
            let c = b[i];
            if let Some(q) = quote {
                if c == q {
                    quote = None;
                } else if q == b'"' && c == esc && continuation(i).is_none() {
                    i += 1;
                }
                i += 1;
                continue;
            }
            if c.is_ascii_whitespace() || continuation(i).is_some() {
                break;
            }
            if c == esc {
                i += 2;
                continue;
            }
            if c == b'"' || c == b'\'' {
                quote = Some(c);
            }
            i += 1;
        }
        while i < b.len() && !text.is_char_boundary(i) {
            i += 1;
        }
        let end = i.min(b.len());
        let word = &text[start..end];
        if !word.starts_with("--") {
            break;
        }
        if keyword == "COPY" {
            if word.starts_with("--from=") {
                sites.push(start + 7..end);
            }
        } else if word.starts_with("--mount=") {
            sites.extend(mount_from(text, start + 8..end));
        }
    }
    sites
}

/// The `from=` value of a `--mount` spec (`type=bind,from=build,target=/src`, whole spec quoted
/// or not).
fn mount_from(text: &str, spec: Range<usize>) -> Option<Range<usize>> {
    let mut spec = spec;
    let s = &text[spec.clone()];
    if s.len() >= 2 && s.starts_with('"') && s.ends_with('"') {
        spec = spec.start + 1..spec.end - 1;
    }
    let mut fields = Vec::new();
    let mut field_start = spec.start;
    let mut quoted = false;
    for (k, c) in text[spec.clone()].char_indices() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => {
                fields.push(field_start..spec.start + k);
                field_start = spec.start + k + 1;
            }
            _ => {}
        }
    }
    fields.push(field_start..spec.end);
    fields.into_iter().find_map(|f| {
        let field = &text[f.clone()];
        let eq = field.find('=')?;
        if !field[..eq].trim().eq_ignore_ascii_case("from") {
            return None;
        }
        let value = &field[eq + 1..];
        let lead = value.len() - value.trim_start().len();
        let start = f.start + eq + 1 + lead;
        Some(start..start + value.trim().len())
    })
}

/// `--build-arg`s for the automatic `TARGET*` arguments of `platform` (buildah would set them to
/// the platform it builds for, the native one).
fn target_args(cmd: &mut Command, platform: &Platform) {
    let (os, arch, variant) = platform.oci_parts();
    for (k, v) in [
        ("TARGETPLATFORM", platform.to_string()),
        ("TARGETOS", os.to_owned()),
        ("TARGETARCH", arch.to_owned()),
        ("TARGETVARIANT", variant.unwrap_or("").to_owned()),
    ] {
        cmd.arg("--build-arg").arg(format!("{k}={v}"));
    }
}

/// A plan carried out: the build-platform stages built and their files exported (they go with
/// the build's TMPDIR).
pub(super) struct Prepared {
    native: Option<Platform>,
    dockerfile: Option<PathBuf>,
    contexts: Vec<(String, PathBuf)>,
}

impl Prepared {
    /// `--platform`, `-f`, and what the plan adds (build contexts, `TARGET*` arguments) to the
    /// target build.
    pub(super) fn add_args(&self, build: &mut Command, job: &Job<'_>) {
        build.arg("--platform").arg(self.native.as_ref().unwrap_or(job.platform).to_string());
        build.arg("-f").arg(self.dockerfile.clone().unwrap_or_else(|| job.context.join(job.dockerfile)));
        for (name, dir) in &self.contexts {
            build.arg("--build-context").arg(format!("{name}={}", dir.display()));
        }
        if self.native.is_some() {
            target_args(build, job.platform);
        }
    }
}

impl Buildah {
    /// The agent's own platform (its first native one): build-platform stages run on it.
    pub fn set_native(&mut self, native: Option<Platform>) {
        self.native = native;
    }

    fn plan_job(&self, job: &Job<'_>) -> (Plan, Vec<String>) {
        let Some(native) = &self.native else { return (Plan::AsIs, vec![]) };
        let Ok(text) = std::fs::read_to_string(job.context.join(job.dockerfile)) else {
            return (Plan::AsIs, vec![]);
        };
        plan(&text, job.platform, native, job.target, job.build_args)
    }

    /// The platform whose store a job builds in: the native one when the whole build runs
    /// natively (a native base image pulled into the target's store would take its tag there).
    pub(super) fn store_platform<'a>(&'a self, job: &Job<'a>) -> &'a Platform {
        match (self.plan_job(job).0, &self.native) {
            (Plan::Native, Some(native)) => native,
            _ => job.platform,
        }
    }

    /// Carries out the job's plan before its target build: builds the build-platform stages it
    /// uses natively into directories under `tmp`, writes the rewritten Dockerfile there, and
    /// tells the user what runs where.
    pub(super) async fn prepare(
        &self,
        job: &Job<'_>,
        tmp: &Path,
        conf: &Path,
        log: &mpsc::UnboundedSender<String>,
        sandbox: &crate::isolation::Isolation,
    ) -> Result<Prepared, BuilderError> {
        let (plan, notes) = self.plan_job(job);
        for note in notes {
            let _ = log.send(note);
        }
        let mut prepared = Prepared { native: None, dockerfile: None, contexts: vec![] };
        let Some(native) = &self.native else { return Ok(prepared) };
        let (stages, dockerfile) = match plan {
            Plan::AsIs => return Ok(prepared),
            Plan::Native => {
                prepared.native = Some(native.clone());
                return Ok(prepared);
            }
            Plan::Split { stages, dockerfile } => (stages, dockerfile),
        };
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| BuilderError::Io { path, source }
        };
        let rewritten = tmp.join("Dockerfile.farm-native");
        std::fs::write(&rewritten, dockerfile).map_err(io(&rewritten))?;
        prepared.dockerfile = Some(rewritten);

        let store = self.store(native);
        let used = self.store_use(&store);
        let mut outcome = Outcome { dirty: &used.dirty, succeeded: false };
        let built = async {
            let _building = used.builds.read().await;
            let secrets = SecretFiles::write(tmp, &format!("{}-{}-native", self.tag, job.name), job.secrets)?;
            // As in the target build: a short TMPDIR for buildah's `--ssh` sockets.
            let short_tmp =
                (!job.ssh.is_empty()).then(|| crate::ssh::ShortLink::to(tmp)).transpose().map_err(io(tmp))?;
            for (_, label) in &stages {
                let dest = tmp.join(format!("native-{label}"));
                // The same sandbox as the target build: its namespaces, network and privileges.
                let mut cmd = self.command_in(&store, &sandbox.prelude());
                cmd.env("CONTAINERS_REGISTRIES_CONF", conf).env("TMPDIR", short_tmp.as_ref().map_or(tmp, |l| &l.0));
                cmd.arg("build").arg("--layers").arg("--rm").arg("--force-rm");
                cmd.arg("--platform").arg(native.to_string());
                cmd.arg("-f").arg(job.context.join(job.dockerfile));
                cmd.arg("--target").arg(label);
                super::input_args(&mut cmd, job);
                target_args(&mut cmd, job.platform);
                for (k, v) in job.build_args {
                    cmd.arg("--build-arg").arg(format!("{k}={v}"));
                }
                if job.no_cache {
                    cmd.arg("--no-cache");
                }
                for s in &secrets.args {
                    cmd.arg("--secret").arg(s);
                }
                for (id, socket) in job.ssh {
                    cmd.arg("--ssh").arg(format!("{id}={}", socket.display()));
                }
                sandbox.apply(&mut cmd);
                cmd.arg("--output").arg(format!("type=local,dest={}", dest.display())).arg(job.context);
                run(cmd, log, &format!("buildah build of stage {label:?} (native)"), &job.cancel).await?;
                prepared.contexts.push((format!("{CONTEXT_PREFIX}{label}"), dest));
            }
            Ok::<(), BuilderError>(())
        }
        .await;
        outcome.succeeded = built.is_ok();
        drop(outcome);
        if used.dirty.load(Ordering::SeqCst) {
            self.sweep_store(&store, &used).await;
        }
        built.map(|()| prepared)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::{plan, Plan};
    use shared::Platform;

    fn p(s: &str) -> Platform {
        s.parse().unwrap()
    }

    /// The rewrite of `text` for a linux/arm64 build on linux/amd64, and the stages built first.
    fn split(text: &str, target: Option<&str>, args: &[(&str, &str)]) -> (Vec<String>, String) {
        let args: Vec<(String, String)> = args.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        match plan(text, &p("linux/arm64"), &p("linux/amd64"), target, &args).0 {
            Plan::Split { stages, dockerfile } => (stages.into_iter().map(|(_, l)| l).collect(), dockerfile),
            other => panic!("expected a split build, got {other:?}"),
        }
    }

    #[test]
    fn the_cross_compile_pattern_copies_from_a_build_context() {
        let text = "ARG BASE\nFROM --platform=$BUILDPLATFORM ${BASE} AS build\nRUN make\nFROM ${BASE}\n\
                    COPY --from=build /out /out\nRUN echo --from=build\n";
        let (stages, out) = split(text, None, &[]);
        assert_eq!(stages, ["build"]);
        assert_eq!(out, text.replace("COPY --from=build", "COPY --from=farm-native-build"));
        let (_, notes) = plan(text, &p("linux/arm64"), &p("linux/amd64"), None, &[]);
        assert_eq!(notes, [r#"farm: stage "build" runs natively on linux/amd64 (FROM --platform=$BUILDPLATFORM)"#]);
    }

    #[test]
    fn chains_mounts_indexes_and_continuations() {
        let text = "FROM --platform=$BUILDPLATFORM alpine\nRUN gen\n\
                    FROM --platform=$BUILDPLATFORM golang AS Build\nCOPY --from=0 /gen /gen\n\
                    FROM build AS test\nRUN go test\n\
                    FROM alpine\r\nCOPY --chown=1:1 \\\n  # the binary\n  --from=BUILD /app /app\n\
                    RUN --mount=type=bind,from=build,target=/src --mount=\"type=cache,target=/c,from=0\" ls /src\n\
                    COPY --from=0 /gen /gen\nCOPY --from=alpine /etc/os-release /\n";
        let (stages, out) = split(text, None, &[]);
        assert_eq!(stages, ["0", "build"]);
        let expected = "FROM --platform=$BUILDPLATFORM alpine\nRUN gen\n\
                    FROM --platform=$BUILDPLATFORM golang AS Build\nCOPY --from=0 /gen /gen\n\
                    FROM build AS test\nRUN go test\n\
                    FROM alpine\r\nCOPY --chown=1:1 \\\n  # the binary\n  --from=farm-native-build /app /app\n\
                    RUN --mount=type=bind,from=farm-native-build,target=/src --mount=\"type=cache,target=/c,from=farm-native-0\" ls /src\n\
                    COPY --from=farm-native-0 /gen /gen\nCOPY --from=alpine /etc/os-release /\n";
        assert_eq!(out, expected);
    }

    #[test]
    fn a_from_through_an_arg_is_rewritten_as_it_resolves() {
        let text = "FROM --platform=$BUILDPLATFORM alpine AS a\nFROM --platform=$BUILDPLATFORM alpine AS b\n\
                    FROM alpine\nARG SRC=a\nCOPY --from=$SRC /x /x\nCOPY --from=b /y /y\n";
        let (stages, out) = split(text, None, &[("SRC", "b")]);
        assert_eq!(stages, ["b"]);
        assert!(out.contains("COPY --from=farm-native-b /x /x\nCOPY --from=farm-native-b /y /y\n"), "{out}");
        let (stages, out) = split(text, None, &[]);
        assert_eq!(stages, ["a", "b"]);
        assert!(out.contains("COPY --from=farm-native-a /x /x\nCOPY --from=farm-native-b /y /y\n"), "{out}");
    }

    #[test]
    fn what_runs_as_before() {
        let text = "FROM --platform=$BUILDPLATFORM alpine AS build\nRUN make\nFROM alpine\nCOPY --from=build /a /a\n";
        let args: Vec<(String, String)> = vec![];
        // The task's platform is the native one.
        assert_eq!(plan(text, &p("linux/amd64"), &p("linux/amd64"), None, &args), (Plan::AsIs, vec![]));
        // No build-platform stage, or none the target uses.
        assert_eq!(plan("FROM alpine\nRUN make\n", &p("linux/arm64"), &p("linux/amd64"), None, &args).0, Plan::AsIs);
        let unused = "FROM --platform=$BUILDPLATFORM alpine AS build\nFROM alpine\nRUN true\n";
        assert_eq!(plan(unused, &p("linux/arm64"), &p("linux/amd64"), None, &args).0, Plan::AsIs);
        // A Dockerfile that does not parse: the build says why.
        assert_eq!(plan("FORM x\n", &p("linux/arm64"), &p("linux/amd64"), None, &args).0, Plan::AsIs);
        // --target a build-platform stage: all of it natively.
        let (plan_, notes) = plan(text, &p("linux/arm/v7"), &p("linux/amd64"), Some("build"), &args);
        assert_eq!(plan_, Plan::Native);
        assert_eq!(
            notes,
            [
                r#"farm: stage "build" (--target) and the stages it uses run natively on linux/amd64 (FROM --platform=$BUILDPLATFORM); TARGETPLATFORM is linux/arm/v7"#
            ]
        );
    }

    #[test]
    fn a_target_stage_from_a_build_platform_stage_runs_as_the_target() {
        let text = "FROM --platform=$BUILDPLATFORM alpine AS tools\n\
                    FROM --platform=$BUILDPLATFORM alpine AS build\nRUN make\n\
                    FROM tools\nCOPY --from=build /a /a\n";
        let args: Vec<(String, String)> = vec![];
        let (plan_, notes) = plan(text, &p("linux/arm64"), &p("linux/amd64"), None, &args);
        let Plan::Split { stages, dockerfile } = plan_ else { panic!("{plan_:?}") };
        assert_eq!(stages, [(1, "build".to_string())]);
        assert!(dockerfile.ends_with("FROM tools\nCOPY --from=farm-native-build /a /a\n"), "{dockerfile}");
        assert_eq!(
            notes,
            [
                r#"farm: stage "2" starts FROM build-platform stage "tools", so "2" and "tools" run as linux/arm64, not natively (buildah cannot start an image from another platform's stage)"#,
                r#"farm: stage "build" runs natively on linux/amd64 (FROM --platform=$BUILDPLATFORM)"#,
            ]
        );
        let _ = BTreeSet::<usize>::new();
    }
}
