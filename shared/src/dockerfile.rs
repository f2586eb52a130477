//! A Dockerfile front end: read on the client before anything is sent, and by the agents to find
//! the stages that must run on their own platform. Pure: text in, a stage model or an error out.
//!
//! [`parse`] follows BuildKit's reading of the text: parser directives at the top (`# escape=`),
//! comment lines dropped (also inside continuations), `\` (or the escape character) continuing a
//! line, heredoc bodies (`RUN <<EOF` ... `EOF`) skipped, instructions case-insensitive. It refuses,
//! with `file:line` and the offending text, what would fail only later on an agent: an unknown
//! instruction (suggesting the nearest one), a malformed `FROM`, anything but `ARG` before the
//! first `FROM`, a Dockerfile without `FROM`, and a `COPY --from` / `RUN --mount=from=` naming this
//! stage or a later one (a name that is no stage is an image, as in BuildKit).
//!
//! The result cache needs [`base_images`]: a build's inputs include the digest every `FROM` tag
//! points to *now*, so that a base image moved under the same tag misses the cache. Stage names
//! (`FROM build`) and `scratch` are not images; `ARG`s declared before the first `FROM` are
//! substituted, with the build's `--build-arg` values over their defaults.
//!
//! Builders: buildah 1.28 ignores `FROM --platform`, so the agents build the stages declared
//! `FROM --platform=$BUILDPLATFORM` separately ([`Dockerfile::build_platform_stages`]).

use std::collections::{BTreeSet, HashMap};

use crate::platform::Platform;

#[cfg(test)]
mod tests;

/// Every instruction a Dockerfile may use, in the order suggestions prefer them.
pub const INSTRUCTIONS: &[&str] = &[
    "FROM",
    "RUN",
    "CMD",
    "LABEL",
    "MAINTAINER",
    "EXPOSE",
    "ENV",
    "ADD",
    "COPY",
    "ENTRYPOINT",
    "VOLUME",
    "USER",
    "WORKDIR",
    "ARG",
    "ONBUILD",
    "STOPSIGNAL",
    "HEALTHCHECK",
    "SHELL",
];

/// A parsed Dockerfile: its stages in order and the `ARG`s declared before the first `FROM`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dockerfile {
    pub stages: Vec<Stage>,
    /// `ARG NAME[=default]` before the first `FROM`, in order; defaults raw (quotes and `$` kept).
    pub global_args: Vec<(String, Option<String>)>,
    /// The escape character (`\`, or `` ` `` after `# escape=``): needed to re-read sliced text.
    pub escape: char,
}

/// One `FROM` and the instructions up to the next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stage {
    /// Its position, the number `COPY --from=N` uses.
    pub index: usize,
    /// The `AS` name, lowercased (stage names are case-insensitive).
    pub name: Option<String>,
    /// The image or stage it starts from, as written (`${BASE}` unsubstituted).
    pub base: String,
    /// The `--platform` value as written (`$BUILDPLATFORM` unsubstituted).
    pub platform: Option<String>,
    /// The line of its `FROM` (1-based).
    pub line: usize,
    /// The lines it spans, 1-based and inclusive: `FROM` to the end of its last instruction
    /// (continuations and heredoc bodies included). Lines before the first stage's `first_line`
    /// hold the parser directives and global `ARG`s.
    pub first_line: usize,
    pub last_line: usize,
    /// The earlier stages it uses, in the order it names them; `ARG`s resolved with their
    /// defaults (see [`Dockerfile::stages_needed_with_args`] for the build's own values).
    pub deps: Vec<StageDep>,
    refs: Vec<StageRef>,
}

/// A stage's use of an earlier stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StageDep {
    /// The index of the stage used.
    pub stage: usize,
    /// The line that uses it.
    pub line: usize,
    pub kind: DepKind,
}

/// How a stage uses another.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DepKind {
    /// `FROM <stage>`: it starts from it (and inherits its platform).
    Base,
    /// `COPY --from=<stage>`.
    CopyFrom,
    /// `RUN --mount=...,from=<stage>`.
    MountFrom,
}

/// A possible stage reference, kept raw to be resolved again with a build's `--build-arg`s.
#[derive(Clone, Debug, PartialEq, Eq)]
struct StageRef {
    kind: DepKind,
    line: usize,
    /// The value as written (`COPY --from=` value, the mount's `from=`, or the `FROM` base).
    raw: String,
    /// The instruction and flag, for messages (`COPY --from=build`).
    what: String,
    /// The stage's `ARG`s declared before the reference (for `--from=$NAME`).
    scope: Vec<(String, Option<String>)>,
}

/// Why a Dockerfile was refused; the message names the file, the line and the offending text.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DockerfileError {
    #[error("{file}: no FROM instruction: a Dockerfile starts a stage with FROM <image>, e.g. FROM busybox:1.36")]
    NoFrom { file: String },
    #[error("{file}:{line}: unknown instruction {instruction:?} in {text:?}{hint}", hint = did_you_mean(suggestion))]
    UnknownInstruction {
        file: String,
        line: usize,
        instruction: String,
        text: String,
        suggestion: Option<&'static str>,
    },
    #[error("{file}:{line}: {instruction} before the first FROM in {text:?}: only ARG may come before FROM")]
    BeforeFrom { file: String, line: usize, instruction: String, text: String },
    #[error("{file}:{line}: FROM needs an image, e.g. FROM busybox:1.36")]
    FromWithoutImage { file: String, line: usize },
    #[error("{file}:{line}: {text:?}: FROM takes an image and optionally AS <name>, e.g. FROM golang:1.22 AS build")]
    FromArguments { file: String, line: usize, text: String },
    #[error(
        "{file}:{line}: invalid stage name {name:?} in {text:?}: a stage name starts with a letter and has only \
         letters, digits, '-', '_' and '.'"
    )]
    StageName { file: String, line: usize, name: String, text: String },
    #[error("{file}:{line}: stage name {name:?} in {text:?} is already used by the stage on line {first}")]
    DuplicateStage { file: String, line: usize, name: String, text: String, first: usize },
    #[error("{file}:{line}: FROM does not take {flag} in {text:?}: its only flag is --platform=<platform>")]
    FromFlag { file: String, line: usize, flag: String, text: String },
    #[error(
        "{file}:{line}: FROM --platform needs a value in {text:?}, e.g. FROM --platform=$BUILDPLATFORM golang:1.22"
    )]
    PlatformWithoutValue { file: String, line: usize, text: String },
    #[error("{file}:{line}: FROM --platform is given twice in {text:?}")]
    PlatformTwice { file: String, line: usize, text: String },
    #[error("{file}:{line}: ARG needs a name in {text:?}, e.g. ARG VERSION=1.0")]
    ArgWithoutName { file: String, line: usize, text: String },
    #[error("{file}:{line}: ONBUILD needs an instruction, e.g. ONBUILD RUN make")]
    OnbuildEmpty { file: String, line: usize },
    #[error("{file}:{line}: {instruction} cannot be an ONBUILD trigger in {text:?}")]
    OnbuildTrigger { file: String, line: usize, instruction: String, text: String },
    #[error("{file}:{line}: heredoc <<{name} in {text:?} is never closed: end it with a line {name:?}")]
    UnterminatedHeredoc { file: String, line: usize, name: String, text: String },
    #[error("{file}:{line}: invalid escape directive {value:?}: the escape character must be \\ or `")]
    EscapeDirective { file: String, line: usize, value: String },
    #[error("{file}:{line}: {what} refers to stage {stage}, which is defined after this one (line {defined})")]
    LaterStage { file: String, line: usize, what: String, stage: String, defined: usize },
    #[error("{file}:{line}: {what} refers to stage {stage}, which is this stage: a stage can use earlier stages only")]
    ThisStage { file: String, line: usize, what: String, stage: String },
    #[error("{file}:{line}: {what} refers to stage {index}, but {file} has only {count} stages (0 to {last})", last = count.saturating_sub(1))]
    NoSuchStageIndex { file: String, line: usize, what: String, index: i64, count: usize },
    #[error("--target {target:?}: no stage of that name in {file} ({stages})")]
    UnknownTarget { file: String, target: String, stages: String },
}

fn did_you_mean(suggestion: &Option<&'static str>) -> String {
    suggestion.map(|s| format!("; did you mean {s}?")).unwrap_or_default()
}

/// Reads a Dockerfile; `file` is the path the user gave, used in messages. The first problem in
/// line order is reported.
pub fn parse(text: &str, file: &str) -> Result<Dockerfile, DockerfileError> {
    let (dockerfile, mut errors) = read(text, file);
    errors.sort_by_key(|(line, _)| *line);
    if let Some((_, error)) = errors.into_iter().next() {
        return Err(error);
    }
    if dockerfile.stages.is_empty() {
        return Err(DockerfileError::NoFrom { file: file.to_owned() });
    }
    Ok(dockerfile)
}

/// The distinct image references the `FROM` lines name, in order. Lenient: whatever cannot be
/// read is skipped (the coordinator calls this on any text; the client refused bad ones already).
pub fn base_images(dockerfile: &str, build_args: &[(String, String)]) -> Vec<String> {
    read(dockerfile, "Dockerfile").0.base_images(build_args)
}

impl Dockerfile {
    /// The index of the stage named `name` (case-insensitive).
    pub fn stage(&self, name: &str) -> Option<usize> {
        let name = name.to_ascii_lowercase();
        self.stages.iter().position(|s| s.name.as_deref() == Some(name.as_str()))
    }

    /// The stage a build of `--target` ends with: the named one, or the last without a target.
    pub fn check_target(&self, target: Option<&str>, file: &str) -> Result<usize, DockerfileError> {
        let Some(target) = target else {
            return Ok(self.stages.len().saturating_sub(1));
        };
        self.stage(target).ok_or_else(|| {
            let names: Vec<&str> = self.stages.iter().filter_map(|s| s.name.as_deref()).collect();
            let stages = if names.is_empty() {
                "no stage has a name: name one with FROM <image> AS <name>".to_owned()
            } else {
                format!("stages: {}", names.join(", "))
            };
            DockerfileError::UnknownTarget { file: file.to_owned(), target: target.to_owned(), stages }
        })
    }

    /// The distinct image references the stages start from, in order, global `ARG`s substituted
    /// (build args over defaults); stage names and `scratch` are not images.
    pub fn base_images(&self, build_args: &[(String, String)]) -> Vec<String> {
        let mut images: Vec<String> = Vec::new();
        for image in self.stage_images(build_args).into_iter().flatten() {
            if !images.contains(&image) {
                images.push(image);
            }
        }
        images
    }

    /// Per stage, the image reference it starts from, global `ARG`s substituted (build args over
    /// defaults); `None` for a stage that starts from an earlier stage or from `scratch`.
    pub fn stage_images(&self, build_args: &[(String, String)]) -> Vec<Option<String>> {
        let vars = self.meta_vars(build_args, HashMap::new());
        self.stages
            .iter()
            .enumerate()
            .map(|(i, stage)| {
                let image = expand(&stage.base, &vars, self.escape);
                let is_stage =
                    self.stages[..i].iter().any(|s| s.name.as_deref().is_some_and(|n| n.eq_ignore_ascii_case(&image)));
                (!image.is_empty() && !image.eq_ignore_ascii_case("scratch") && !is_stage).then_some(image)
            })
            .collect()
    }

    /// The stages a build of `target` runs: `target` and every stage it uses, transitively, in
    /// index order (stage references through `ARG`s resolved with their defaults).
    pub fn stages_needed(&self, target: usize) -> Vec<usize> {
        let deps: Vec<Vec<StageDep>> = self.stages.iter().map(|s| s.deps.clone()).collect();
        closure(target, &deps)
    }

    /// [`Dockerfile::stages_needed`] with the build's `--build-arg` values (`FROM base-${VARIANT}`,
    /// `COPY --from=$STAGE`).
    pub fn stages_needed_with_args(&self, target: usize, build_args: &[(String, String)]) -> Vec<usize> {
        closure(target, &self.resolve(build_args))
    }

    /// Every stage's uses of earlier stages under the build's `--build-arg` values (what
    /// [`Stage::deps`] holds for the defaults), indexed like [`Dockerfile::stages`].
    pub fn deps_with_args(&self, build_args: &[(String, String)]) -> Vec<Vec<StageDep>> {
        self.resolve(build_args)
    }

    /// The stages needed for `target` that run on the build machine's own platform: their
    /// `--platform` (with `BUILDPLATFORM`/`BUILDOS`/`BUILDARCH`/`BUILDVARIANT` from `native`, global
    /// `ARG`s and build args substituted) is `native`, or they start from such a stage. Stages for
    /// `$TARGETPLATFORM` or with no `--platform` are not among them. In index order.
    pub fn build_platform_stages(&self, target: usize, build_args: &[(String, String)], native: &str) -> Vec<usize> {
        let deps = self.resolve(build_args);
        let vars = self.meta_vars(build_args, build_platform_vars(native));
        let mut effective: Vec<Option<String>> = Vec::with_capacity(self.stages.len());
        for (i, stage) in self.stages.iter().enumerate() {
            let platform = match deps[i].iter().find(|d| d.kind == DepKind::Base) {
                Some(base) => effective[base.stage].clone(),
                None => stage.platform.as_ref().map(|p| expand(p, &vars, self.escape)),
            };
            effective.push(platform);
        }
        closure(target, &deps)
            .into_iter()
            .filter(|&i| effective[i].as_deref().is_some_and(|p| same_platform(p, native)))
            .collect()
    }

    /// The global `ARG` values: build args over defaults, defaults expanded with earlier ones.
    /// An `ARG` with neither stays unset (and `initial`'s value, if any, stands).
    fn meta_vars(&self, build_args: &[(String, String)], mut vars: HashMap<String, String>) -> HashMap<String, String> {
        for (name, default) in &self.global_args {
            let value = build_arg(build_args, name).or_else(|| default.as_ref().map(|d| expand(d, &vars, self.escape)));
            if let Some(value) = value {
                vars.insert(name.clone(), value);
            }
        }
        vars
    }

    /// Every stage's dependencies under these build args.
    fn resolve(&self, build_args: &[(String, String)]) -> Vec<Vec<StageDep>> {
        let meta = self.meta_vars(build_args, HashMap::new());
        self.stages
            .iter()
            .map(|stage| {
                stage
                    .refs
                    .iter()
                    .filter_map(|r| {
                        let found = if r.kind == DepKind::Base {
                            let name = expand(&r.raw, &meta, self.escape);
                            self.stages[..stage.index]
                                .iter()
                                .position(|s| s.name.as_deref().is_some_and(|n| n.eq_ignore_ascii_case(&name)))
                        } else {
                            let value = if r.raw.contains('$') {
                                expand(&r.raw, &self.scope_vars(&r.scope, &meta, build_args), self.escape)
                            } else {
                                unquote(&r.raw, self.escape)
                            };
                            match classify(&self.stages, &value, stage.index) {
                                Ref::Stage(i) => Some(i),
                                _ => None,
                            }
                        };
                        found.map(|s| StageDep { stage: s, line: r.line, kind: r.kind })
                    })
                    .collect()
            })
            .collect()
    }

    /// A stage's `ARG`s: build arg, else default, else the global value of a redeclared name.
    fn scope_vars(
        &self,
        scope: &[(String, Option<String>)],
        meta: &HashMap<String, String>,
        build_args: &[(String, String)],
    ) -> HashMap<String, String> {
        let mut vars = HashMap::new();
        for (name, default) in scope {
            let value = build_arg(build_args, name)
                .or_else(|| default.as_ref().map(|d| expand(d, &vars, self.escape)))
                .or_else(|| meta.get(name).cloned());
            if let Some(value) = value {
                vars.insert(name.clone(), value);
            }
        }
        vars
    }
}

fn build_arg(build_args: &[(String, String)], name: &str) -> Option<String> {
    build_args.iter().rev().find(|(k, _)| k == name).map(|(_, v)| v.clone())
}

/// `target` and its transitive dependencies, in index order.
fn closure(target: usize, deps: &[Vec<StageDep>]) -> Vec<usize> {
    let mut seen = BTreeSet::new();
    let mut todo = vec![target];
    while let Some(i) = todo.pop() {
        if i < deps.len() && seen.insert(i) {
            todo.extend(deps[i].iter().map(|d| d.stage));
        }
    }
    seen.into_iter().collect()
}

/// The automatic `BUILD*` platform args for a build machine of platform `native`.
fn build_platform_vars(native: &str) -> HashMap<String, String> {
    let (platform, os, arch, variant) = match native.parse::<Platform>() {
        Ok(p) => (p.to_string(), p.os().to_owned(), p.architecture().to_owned(), p.variant().unwrap_or("").to_owned()),
        Err(_) => {
            let mut parts = native.split('/');
            let os = parts.next().unwrap_or("").to_owned();
            let arch = parts.next().unwrap_or("").to_owned();
            (native.to_owned(), os, arch, parts.next().unwrap_or("").to_owned())
        }
    };
    HashMap::from([
        ("BUILDPLATFORM".to_owned(), platform),
        ("BUILDOS".to_owned(), os),
        ("BUILDARCH".to_owned(), arch),
        ("BUILDVARIANT".to_owned(), variant),
    ])
}

/// The same platform under any spelling farm knows (`linux/x86_64` is `linux/amd64`).
fn same_platform(a: &str, b: &str) -> bool {
    match (a.parse::<Platform>(), b.parse::<Platform>()) {
        (Ok(a), Ok(b)) => a == b,
        _ => !a.trim().is_empty() && a.trim().eq_ignore_ascii_case(b.trim()),
    }
}

/// What a `--from` value names, seen from stage `current`.
#[derive(Debug, PartialEq, Eq)]
enum Ref {
    Stage(usize),
    Image,
    ThisStage,
    Later(usize),
    NoSuchIndex(i64),
}

fn classify(stages: &[Stage], value: &str, current: usize) -> Ref {
    let index = if value.bytes().any(|b| b.is_ascii_digit()) { value.parse::<i64>().ok() } else { None };
    let found = match index {
        Some(n) if n < 0 || n >= stages.len() as i64 => return Ref::NoSuchIndex(n),
        Some(n) => n as usize,
        None => {
            let name = value.to_ascii_lowercase();
            match stages.iter().position(|s| s.name.as_deref() == Some(name.as_str())) {
                Some(i) => i,
                None => return Ref::Image,
            }
        }
    };
    match found.cmp(&current) {
        std::cmp::Ordering::Less => Ref::Stage(found),
        std::cmp::Ordering::Equal => Ref::ThisStage,
        std::cmp::Ordering::Greater => Ref::Later(found),
    }
}

/// One instruction: its lines, its keyword as written and the rest of its (joined) text.
struct Instruction {
    line: usize,
    last_line: usize,
    keyword: String,
    rest: String,
    text: String,
}

type Errors = Vec<(usize, DockerfileError)>;

/// An instruction's text as messages show it: at most 100 characters.
fn brief(text: &str) -> String {
    match text.char_indices().nth(97) {
        Some((at, _)) if text.chars().count() > 100 => format!("{}...", &text[..at]),
        _ => text.to_owned(),
    }
}

/// The stage model and every problem found (with its line); never gives up.
fn read(text: &str, file: &str) -> (Dockerfile, Errors) {
    let (escape, instructions, mut errors) = lex(text, file);
    let mut df = Dockerfile { stages: Vec::new(), global_args: Vec::new(), escape };
    let mut scope: Vec<(String, Option<String>)> = Vec::new();
    for ins in &instructions {
        let (line, text) = (ins.line, brief(&ins.text));
        let upper = ins.keyword.to_ascii_uppercase();
        if let Some(stage) = df.stages.last_mut().filter(|_| upper != "FROM") {
            stage.last_line = ins.last_line;
        }
        if !INSTRUCTIONS.contains(&upper.as_str()) {
            let suggestion = suggest(&upper);
            let instruction = ins.keyword.clone();
            errors.push((
                line,
                DockerfileError::UnknownInstruction { file: file.into(), line, instruction, text, suggestion },
            ));
            continue;
        }
        if upper == "FROM" {
            scope.clear();
            from(&mut df, ins, file, &mut errors);
            continue;
        }
        let Some(stage) = df.stages.last_mut() else {
            if upper == "ARG" {
                df.global_args.extend(arg(ins, escape, file, &mut errors));
            } else {
                errors.push((line, DockerfileError::BeforeFrom { file: file.into(), line, instruction: upper, text }));
            }
            continue;
        };
        let (flags, _) = take_flags(&ins.rest, escape);
        match upper.as_str() {
            "ARG" => scope.extend(arg(ins, escape, file, &mut errors)),
            "COPY" => {
                for flag in flags {
                    if let Some(value) = flag.strip_prefix("--from=") {
                        stage.refs.push(StageRef {
                            kind: DepKind::CopyFrom,
                            line,
                            raw: value.into(),
                            what: format!("COPY {flag}"),
                            scope: scope.clone(),
                        });
                    }
                }
            }
            "RUN" => {
                for flag in flags {
                    let Some(spec) = flag.strip_prefix("--mount=") else { continue };
                    for field in csv_fields(&unquote(spec, escape)) {
                        let Some((key, value)) = field.split_once('=') else { continue };
                        if key.trim().eq_ignore_ascii_case("from") {
                            stage.refs.push(StageRef {
                                kind: DepKind::MountFrom,
                                line,
                                raw: value.trim().into(),
                                what: format!("RUN {flag}"),
                                scope: scope.clone(),
                            });
                        }
                    }
                }
            }
            "ONBUILD" => {
                let trigger = ins.rest.split_whitespace().next().unwrap_or("");
                let trigger_upper = trigger.to_ascii_uppercase();
                if trigger.is_empty() {
                    errors.push((line, DockerfileError::OnbuildEmpty { file: file.into(), line }));
                } else if !INSTRUCTIONS.contains(&trigger_upper.as_str()) {
                    let suggestion = suggest(&trigger_upper);
                    let instruction = trigger.to_owned();
                    errors.push((
                        line,
                        DockerfileError::UnknownInstruction { file: file.into(), line, instruction, text, suggestion },
                    ));
                } else if matches!(trigger_upper.as_str(), "FROM" | "ONBUILD" | "MAINTAINER") {
                    let instruction = trigger_upper;
                    errors.push((line, DockerfileError::OnbuildTrigger { file: file.into(), line, instruction, text }));
                }
            }
            _ => {}
        }
    }
    // Literal stage references are checked now that every stage is known (`$` ones only resolve
    // with the build's args, and an unresolvable one is an image, as BuildKit reads it).
    for stage in &df.stages {
        for r in stage.refs.iter().filter(|r| r.kind != DepKind::Base && !r.raw.contains('$')) {
            let (file, line, what) = (file.to_owned(), r.line, r.what.clone());
            let value = unquote(&r.raw, escape);
            let shown = |i: usize| match &df.stages[i].name {
                Some(name) if value.parse::<i64>().is_err() => format!("{name:?}"),
                _ => i.to_string(),
            };
            let e = match classify(&df.stages, &value, stage.index) {
                Ref::Stage(_) | Ref::Image => continue,
                Ref::ThisStage => DockerfileError::ThisStage { file, line, what, stage: shown(stage.index) },
                Ref::Later(i) => {
                    DockerfileError::LaterStage { file, line, what, stage: shown(i), defined: df.stages[i].line }
                }
                Ref::NoSuchIndex(index) => {
                    DockerfileError::NoSuchStageIndex { file, line, what, index, count: df.stages.len() }
                }
            };
            errors.push((line, e));
        }
    }
    let resolved = df.resolve(&[]);
    for (stage, deps) in df.stages.iter_mut().zip(resolved) {
        stage.deps = deps;
    }
    (df, errors)
}

/// `FROM [--platform=<p>] <image> [AS <name>]`: a new stage, even a malformed one (so that the
/// lenient reading still finds its image).
fn from(df: &mut Dockerfile, ins: &Instruction, file: &str, errors: &mut Errors) {
    let (line, text) = (ins.line, &brief(&ins.text));
    let mut problem = |e: DockerfileError| errors.push((line, e));
    let (flags, args) = take_flags(&ins.rest, df.escape);
    let mut platform: Option<String> = None;
    for flag in flags {
        match flag.split_once('=') {
            Some(("--platform", value)) if platform.is_some() => {
                problem(DockerfileError::PlatformTwice { file: file.into(), line, text: text.clone() });
                platform = Some(value.to_owned());
            }
            Some(("--platform", value)) => platform = Some(value.to_owned()),
            None if flag == "--platform" => {
                problem(DockerfileError::PlatformWithoutValue { file: file.into(), line, text: text.clone() })
            }
            _ => {
                let flag = flag.split_once('=').map_or(flag, |(name, _)| name).to_owned();
                problem(DockerfileError::FromFlag { file: file.into(), line, flag, text: text.clone() });
            }
        }
    }
    let args: Vec<&str> = args.split_whitespace().collect();
    let (base, name) = match args.as_slice() {
        [] => {
            problem(DockerfileError::FromWithoutImage { file: file.into(), line });
            ("", None)
        }
        [image] => (*image, None),
        [image, as_kw, name] if as_kw.eq_ignore_ascii_case("as") => {
            let lower = name.to_ascii_lowercase();
            if !valid_stage_name(&lower) {
                let name = (*name).to_owned();
                problem(DockerfileError::StageName { file: file.into(), line, name, text: text.clone() });
            } else if let Some(first) = df.stages.iter().find(|s| s.name.as_deref() == Some(lower.as_str())) {
                let first = first.line;
                problem(DockerfileError::DuplicateStage {
                    file: file.into(),
                    line,
                    name: lower.clone(),
                    text: text.clone(),
                    first,
                });
            }
            (*image, Some(lower))
        }
        [image, ..] => {
            problem(DockerfileError::FromArguments { file: file.into(), line, text: text.clone() });
            (*image, None)
        }
    };
    let refs =
        vec![StageRef { kind: DepKind::Base, line, raw: base.to_owned(), what: text.clone(), scope: Vec::new() }];
    df.stages.push(Stage {
        index: df.stages.len(),
        name,
        base: base.to_owned(),
        platform,
        line,
        first_line: line,
        last_line: ins.last_line,
        deps: Vec::new(),
        refs,
    });
}

/// BuildKit's stage names: `^[a-z][a-z0-9-_.]*$` (after lowercasing).
fn valid_stage_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.'))
}

/// `ARG NAME[=default] ...`: the names and raw defaults.
fn arg(ins: &Instruction, escape: char, file: &str, errors: &mut Errors) -> Vec<(String, Option<String>)> {
    let mut out = Vec::new();
    let words = split_words(&ins.rest, escape);
    for (_, word) in &words {
        let (name, default) = match word.split_once('=') {
            Some((name, default)) => (name, Some(default.to_owned())),
            None => (*word, None),
        };
        if name.is_empty() {
            errors.push((
                ins.line,
                DockerfileError::ArgWithoutName { file: file.into(), line: ins.line, text: brief(&ins.text) },
            ));
            continue;
        }
        out.push((name.to_owned(), default));
    }
    if words.is_empty() {
        errors.push((
            ins.line,
            DockerfileError::ArgWithoutName { file: file.into(), line: ins.line, text: brief(&ins.text) },
        ));
    }
    out
}

/// The known instruction nearest to an unknown one, if it is near enough to be a typo.
fn suggest(upper: &str) -> Option<&'static str> {
    let limit = if upper.chars().count() <= 4 { 1 } else { 2 };
    INSTRUCTIONS
        .iter()
        .map(|known| (edit_distance(upper, known), *known))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, known)| known)
}

/// Optimal string alignment distance: insertions, deletions, substitutions and adjacent
/// transpositions (`FORM` is one edit from `FROM`).
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    d[0] = (0..=b.len()).collect();
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (d[i - 1][j] + 1).min(d[i][j - 1] + 1).min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = best;
        }
    }
    d[a.len()][b.len()]
}

/// A parser directive line (`# escape=\``): its lowercased key and its value.
fn directive(line: &str) -> Option<(String, String)> {
    let body = line.trim().strip_prefix('#')?.trim_start();
    let (key, value) = body.split_once('=')?;
    let key = key.trim_end();
    let mut chars = key.chars();
    if !chars.next()?.is_ascii_alphabetic() || !chars.all(|c| c.is_ascii_alphanumeric()) {
        return None;
    }
    let value = value.trim();
    (!value.is_empty()).then(|| (key.to_ascii_lowercase(), value.to_owned()))
}

/// A heredoc opened by a word such as `<<EOF`, `<<-EOF`, `<<"EOF"` or `3<<EOF`.
struct Heredoc {
    name: String,
    /// `<<-`: the terminator may be indented with tabs.
    chomp: bool,
}

fn heredoc(word: &str) -> Option<Heredoc> {
    let after = word.trim_start_matches(|c: char| c.is_ascii_digit()).strip_prefix("<<")?;
    let (chomp, rest) = match after.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, after),
    };
    if rest.is_empty() || rest.contains('<') {
        return None;
    }
    let name = unquote(rest, '\\');
    (!name.is_empty()).then_some(Heredoc { name, chomp })
}

/// The logical lines of a Dockerfile as instructions, heredoc bodies skipped; also the escape
/// character and the problems met on the way.
fn lex(text: &str, file: &str) -> (char, Vec<Instruction>, Errors) {
    let mut lines: Vec<&str> = text.lines().collect();
    if let Some(first) = lines.first_mut() {
        *first = first.strip_prefix('\u{feff}').unwrap_or(first);
    }
    let mut errors = Errors::new();
    let mut escape = '\\';
    let mut i = 0;
    let mut seen: Vec<String> = Vec::new();
    while i < lines.len() {
        let Some((key, value)) = directive(lines[i]) else { break };
        if !matches!(key.as_str(), "syntax" | "escape" | "check") || seen.contains(&key) {
            break;
        }
        if key == "escape" {
            match value.as_str() {
                "\\" => escape = '\\',
                "`" => escape = '`',
                _ => errors.push((i + 1, DockerfileError::EscapeDirective { file: file.into(), line: i + 1, value })),
            }
        }
        seen.push(key);
        i += 1;
    }
    let skippable = |l: &str| {
        let t = l.trim_start();
        t.is_empty() || t.starts_with('#')
    };
    let mut out = Vec::new();
    while i < lines.len() {
        if skippable(lines[i]) {
            i += 1;
            continue;
        }
        let start = i;
        let mut joined = String::new();
        let mut last;
        loop {
            let line = if i == start { lines[i].trim_start() } else { lines[i] };
            last = i;
            i += 1;
            let Some(head) = line.trim_end_matches([' ', '\t']).strip_suffix(escape) else {
                joined.push_str(line);
                break;
            };
            joined.push_str(head);
            while i < lines.len() && skippable(lines[i]) {
                i += 1;
            }
            if i == lines.len() {
                break;
            }
        }
        let joined = joined.trim();
        if joined.is_empty() {
            continue;
        }
        let (keyword, rest) = joined.split_once(char::is_whitespace).unwrap_or((joined, ""));
        let rest = rest.trim_start();
        let mut ins = Instruction {
            line: start + 1,
            last_line: last + 1,
            keyword: keyword.to_owned(),
            rest: rest.to_owned(),
            text: joined.to_owned(),
        };
        let upper = keyword.to_ascii_uppercase();
        let trigger = rest.split_whitespace().next().unwrap_or("").to_ascii_uppercase();
        let heredocs_allowed = |k: &str| matches!(k, "RUN" | "COPY" | "ADD");
        if heredocs_allowed(&upper) || (upper == "ONBUILD" && heredocs_allowed(&trigger)) {
            for (_, word) in split_words(rest, '\\') {
                let Some(doc) = heredoc(word) else { continue };
                let mut closed = false;
                while i < lines.len() {
                    let line = lines[i];
                    i += 1;
                    let candidate = if doc.chomp { line.trim_start_matches('\t') } else { line };
                    if candidate == doc.name {
                        closed = true;
                        break;
                    }
                }
                ins.last_line = i.max(ins.last_line);
                if !closed {
                    let (line, name, text) = (ins.line, doc.name, brief(&ins.text));
                    errors.push((line, DockerfileError::UnterminatedHeredoc { file: file.into(), line, name, text }));
                    break;
                }
            }
        }
        out.push(ins);
    }
    (escape, out, errors)
}

/// The leading `--flag[=value]` words (raw) and the text after them.
fn take_flags(rest: &str, escape: char) -> (Vec<&str>, &str) {
    let mut flags = Vec::new();
    let mut end = 0;
    for (start, word) in split_words(rest, escape) {
        if !word.starts_with("--") {
            break;
        }
        flags.push(word);
        end = start + word.len();
    }
    (flags, rest[end..].trim_start())
}

/// Words split at unquoted, unescaped whitespace, quotes and escapes kept; with their offsets.
fn split_words(s: &str, escape: char) -> Vec<(usize, &str)> {
    let mut words = Vec::new();
    let mut start: Option<usize> = None;
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for (at, c) in s.char_indices() {
        if escaped {
            escaped = false;
            continue;
        }
        match quote {
            Some(q) if c == q => quote = None,
            Some('"') if c == escape => escaped = true,
            Some(_) => {}
            None if c.is_whitespace() => {
                if let Some(st) = start.take() {
                    words.push((st, &s[st..at]));
                }
            }
            None => {
                start.get_or_insert(at);
                if c == escape {
                    escaped = true;
                } else if c == '\'' || c == '"' {
                    quote = Some(c);
                }
            }
        }
    }
    if let Some(st) = start {
        words.push((st, &s[st..]));
    }
    words
}

/// Comma-separated fields (a `--mount` spec), double quotes respected and removed.
fn csv_fields(s: &str) -> Vec<String> {
    let mut fields = vec![String::new()];
    let mut quoted = false;
    for c in s.chars() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => fields.push(String::new()),
            c => fields.last_mut().expect("never empty").push(c),
        }
    }
    fields
}

/// A word with its quotes and escapes removed, `$` left alone.
fn unquote(word: &str, escape: char) -> String {
    process(word, None, escape)
}

/// A word as BuildKit's shell lexer reads it: quotes and escapes removed, `$NAME`, `${NAME}`,
/// `${NAME:-default}`, `${NAME-default}`, `${NAME:+alt}`, `${NAME+alt}` substituted from `vars`
/// (unset names become empty), nothing substituted inside single quotes.
fn expand(word: &str, vars: &HashMap<String, String>, escape: char) -> String {
    process(word, Some(vars), escape)
}

fn process(word: &str, vars: Option<&HashMap<String, String>>, escape: char) -> String {
    let chars: Vec<char> = word.chars().collect();
    let mut out = String::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == escape {
            out.push(*chars.get(i + 1).unwrap_or(&c));
            i += 2;
        } else if c == '\'' {
            i += 1;
            while i < chars.len() && chars[i] != '\'' {
                out.push(chars[i]);
                i += 1;
            }
            i += 1;
        } else if c == '"' {
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                match (chars[i], chars.get(i + 1)) {
                    (e, Some(&next)) if e == escape && (next == '"' || next == '$' || next == escape) => {
                        out.push(next);
                        i += 2;
                    }
                    ('$', _) if vars.is_some() => {
                        i = dollar(&chars, i, vars.unwrap_or(&HashMap::new()), escape, &mut out)
                    }
                    (other, _) => {
                        out.push(other);
                        i += 1;
                    }
                }
            }
            i += 1;
        } else if c == '$' && vars.is_some() {
            i = dollar(&chars, i, vars.unwrap_or(&HashMap::new()), escape, &mut out);
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

/// Substitutes the reference starting at `chars[at] == '$'`; returns the index after it.
fn dollar(chars: &[char], at: usize, vars: &HashMap<String, String>, escape: char, out: &mut String) -> usize {
    let is_name = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut i = at + 1;
    if chars.get(i) != Some(&'{') {
        let name: String = chars[i..].iter().take_while(|&&c| is_name(c)).collect();
        if name.is_empty() {
            out.push('$');
            return i;
        }
        out.push_str(vars.get(&name).map_or("", String::as_str));
        return i + name.chars().count();
    }
    i += 1;
    let start = i;
    let mut depth = 1;
    while i < chars.len() {
        match chars[i] {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    break;
                }
            }
            _ => {}
        }
        i += 1;
    }
    let inner: String = chars[start..i.min(chars.len())].iter().collect();
    let name_len = inner.chars().take_while(|&c| is_name(c)).count();
    let (name, modifier) = inner.split_at(name_len);
    let value = vars.get(name);
    let set_nonempty = value.is_some_and(|v| !v.is_empty());
    let word = |w: &str| expand(w, vars, escape);
    let result = if let Some(default) = modifier.strip_prefix(":-") {
        if set_nonempty {
            value.cloned().unwrap_or_default()
        } else {
            word(default)
        }
    } else if let Some(alt) = modifier.strip_prefix(":+") {
        if set_nonempty {
            word(alt)
        } else {
            String::new()
        }
    } else if let Some(default) = modifier.strip_prefix('-') {
        value.cloned().unwrap_or_else(|| word(default))
    } else if let Some(alt) = modifier.strip_prefix('+') {
        if value.is_some() {
            word(alt)
        } else {
            String::new()
        }
    } else {
        value.cloned().unwrap_or_default()
    };
    out.push_str(&result);
    i + 1
}
