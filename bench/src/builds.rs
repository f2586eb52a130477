//! Builds through farm against the same builds with buildah called directly on the same host.
//!
//! Farm's side runs the real CLI (`farm build --progress json`), whose JSON events give the
//! breakdown; the direct side runs buildah exactly as farm's agents do (own `--root/--runroot`,
//! overlay, `--isolation oci` with runc via BUILDAH_ISOLATION/BUILDAH_RUNTIME (also buildah's own
//! default as root), a registries.conf naming the plain-HTTP
//! registry, `--layers`), then pushes. The two sides of a comparison alternate within each
//! repetition, so neither always runs first.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};

use crate::env::{path, Env};
use crate::events::{self, Stamped};
use crate::procs;
use crate::report::{median_phases, Goal, Row, Unit};

pub const THREE: &str = "linux/amd64,linux/arm64,linux/arm/v7";

/// The agents the build rows use: one x86_64 agent that emulates ARM, and three agents each
/// configured as native for one platform (on this machine the ARM ones still run under QEMU).
pub const SOLO: &str = "solo";
pub const TRIO: [(&str, &str); 3] = [("x86", "linux/amd64"), ("pi64", "linux/arm64"), ("pi32", "linux/arm/v7")];
/// The single agent's capacity: its default (`farm agent` without `--capacity`, detected from
/// the host's cores and memory), as a user gets it.
pub fn solo_capacity() -> u32 {
    agent::default_capacity()
}

pub struct Builds<'a> {
    pub env: &'a Env,
    pub coordinator: String,
    pub registry: String,
    pub base: String,
    /// Work per RUN step of the workload (iterations of a shell loop).
    pub n: u32,
    pub reps: usize,
    pub warm_up: bool,
    direct: PathBuf,
    registries_conf: PathBuf,
    failures: std::cell::RefCell<Vec<String>>,
}

/// Attempts per build (either side): a failed build is reported in the row's notes and run
/// again. buildah 1.28 fails now and then when several platforms of one image build at once in
/// one storage ("locating pulled image ...: image not known": the base's tag can name only one
/// platform's image, and each platform's pull moves it); farm's single agent of capacity 3 and
/// `buildah build --jobs 3` both meet it.
pub const ATTEMPTS: usize = 3;

/// One `farm build`, timed, with its events.
pub struct FarmRun {
    pub wall: f64,
    pub events: Vec<Stamped>,
}

/// One direct buildah build + push, timed.
pub struct DirectRun {
    pub wall: f64,
    pub build: f64,
    pub push: f64,
}

#[derive(Clone, Copy)]
enum Side {
    Direct,
    Solo,
    Trio,
}

impl<'a> Builds<'a> {
    pub fn new(env: &'a Env, coordinator: String, base: String, n: u32, reps: usize, warm_up: bool) -> Result<Self> {
        let registry = env.registry_addr().to_string();
        let direct = env.root.join("buildah-direct");
        std::fs::create_dir_all(direct.join("tmp"))?;
        let registries_conf = direct.join("registries.conf");
        // The same file farm's agents write for a build (agent::builder::Buildah::registries_conf).
        std::fs::write(
            &registries_conf,
            format!(
                "unqualified-search-registries = [\"docker.io\"]\nshort-name-mode = \"permissive\"\n\n[[registry]]\nlocation = {registry:?}\ninsecure = true\n"
            ),
        )?;
        Ok(Builds {
            env,
            coordinator,
            registry,
            base,
            n,
            reps,
            warm_up,
            direct,
            registries_conf,
            failures: Default::default(),
        })
    }

    /// A fresh copy of the workload (bench/workload) to build and change.
    pub fn context(&self, name: &str) -> Result<PathBuf> {
        let to = self.env.root.join(name);
        let from = self.env.repo.join("bench/workload");
        let st = Command::new("cp").arg("-a").arg(&from).arg(&to).status()?;
        anyhow::ensure!(st.success(), "copying {} failed", from.display());
        Ok(to)
    }

    /// `farm build`, run again (up to [`ATTEMPTS`] times) when the build itself fails; each
    /// failure is remembered for the rows' notes, and only the successful run is timed.
    pub fn farm_build(&self, platforms: &str, group: &str, tag: &str, ctx: &Path, no_cache: bool) -> Result<FarmRun> {
        let mut attempt = 1;
        loop {
            match self.farm_build_once(platforms, group, tag, ctx, no_cache)? {
                Ok(run) => return Ok(run),
                Err((why, full)) => {
                    eprintln!("farm-bench: farm build {tag} failed (attempt {attempt}): {why}");
                    self.failures.borrow_mut().push(format!("farm {tag} (attempt {attempt}): {why}"));
                    if attempt == ATTEMPTS {
                        return Err(full);
                    }
                    attempt += 1;
                }
            }
        }
    }

    /// One `farm build`: the run, or why it failed (one line) and the full error.
    fn farm_build_once(
        &self,
        platforms: &str,
        group: &str,
        tag: &str,
        ctx: &Path,
        no_cache: bool,
    ) -> Result<Result<FarmRun, (String, anyhow::Error)>> {
        procs::check_interrupted()?;
        let image = format!("{}/{tag}", self.registry);
        let base = format!("BASE={}", self.base);
        let n = format!("N={}", self.n);
        let require = format!("bench={group}");
        let mut args = vec!["build", "--progress", "json", "--coordinator", &self.coordinator];
        args.extend(["--ca-dir", path(&self.env.ca_dir), "--name", "admin", "--platform", platforms]);
        args.extend(["--require", &require, "--insecure-registry", &self.registry]);
        args.extend(["--build-arg", &base, "--build-arg", &n, "-t", &image]);
        if no_cache {
            args.push("--no-cache");
        }
        args.push(path(ctx));
        procs::flush_dirty_pages();
        let t = procs::run_timed(&mut self.env.farm(&args))?;
        let lines: Vec<(f64, String)> = t.stdout.iter().map(|(d, l)| (d.as_secs_f64(), l.clone())).collect();
        let events = events::parse(&lines);
        if !t.ok || !events::succeeded(&events) {
            let why = events::failure(&events).unwrap_or_else(|| t.status.clone());
            return Ok(Err((why, t.failure(&format!("farm build {tag}")))));
        }
        Ok(Ok(FarmRun { wall: t.wall_s(), events }))
    }

    /// The farm builds that failed and were run again since the last call.
    pub fn take_failures(&self) -> Vec<String> {
        std::mem::take(&mut *self.failures.borrow_mut())
    }

    fn buildah(&self) -> Command {
        let mut cmd = Command::new("buildah");
        cmd.arg("--root")
            .arg(self.direct.join("storage"))
            .arg("--runroot")
            .arg(self.direct.join("run"))
            .arg("--storage-driver")
            .arg("overlay");
        self.env.isolate(&mut cmd);
        // As farm's agents run buildah (`agent::isolation::BUILDAH_ENV`), and as buildah runs as
        // root by default: each RUN in its own namespaces under runc.
        cmd.env("BUILDAH_ISOLATION", "oci")
            .env("BUILDAH_RUNTIME", "runc")
            .env("TMPDIR", self.direct.join("tmp"))
            .env("CONTAINERS_REGISTRIES_CONF", &self.registries_conf);
        cmd
    }

    /// `buildah build` (one platform: `-t`; several: `--jobs N --manifest`) then push, as one
    /// host builds and publishes a multi-arch image without farm. Like farm builds, a failed
    /// build is remembered for the notes and run again (up to [`ATTEMPTS`] times).
    pub fn direct_build(&self, platforms: &str, tag: &str, ctx: &Path, no_cache: bool) -> Result<DirectRun> {
        self.direct_build_with(platforms, tag, ctx, no_cache, true)
    }

    /// [`Builds::direct_build`], with or without `--layers` (without: buildah commits each
    /// stage once, as `buildah build` does by default, and keeps no layer cache).
    pub fn direct_build_with(
        &self,
        platforms: &str,
        tag: &str,
        ctx: &Path,
        no_cache: bool,
        layers: bool,
    ) -> Result<DirectRun> {
        let mut attempt = 1;
        loop {
            match self.direct_build_once(platforms, tag, ctx, no_cache, layers)? {
                Ok(run) => return Ok(run),
                Err((why, full)) => {
                    eprintln!("farm-bench: buildah build {tag} failed (attempt {attempt}): {why}");
                    self.failures.borrow_mut().push(format!("buildah {tag} (attempt {attempt}): {why}"));
                    if attempt == ATTEMPTS {
                        return Err(full);
                    }
                    attempt += 1;
                }
            }
        }
    }

    fn direct_build_once(
        &self,
        platforms: &str,
        tag: &str,
        ctx: &Path,
        no_cache: bool,
        layers: bool,
    ) -> Result<Result<DirectRun, (String, anyhow::Error)>> {
        procs::check_interrupted()?;
        let image = format!("{}/{tag}", self.registry);
        let multi = platforms.contains(',');
        let mut build = self.buildah();
        build.arg("build");
        if layers {
            build.arg("--layers");
        }
        build.args(["--platform", platforms]);
        if no_cache {
            build.arg("--no-cache");
        }
        if multi {
            let jobs = platforms.split(',').count().to_string();
            build.args(["--jobs", &jobs, "--manifest", &image]);
        } else {
            build.args(["-t", &image]);
        }
        build.args(["--build-arg", &format!("BASE={}", self.base), "--build-arg", &format!("N={}", self.n)]);
        build.arg("-f").arg(ctx.join("Dockerfile")).arg(ctx);
        procs::flush_dirty_pages();
        let b = procs::run_timed(&mut build)?;
        let p = if b.ok {
            let mut push = self.buildah();
            if multi {
                push.args(["manifest", "push", "--all"]);
            } else {
                push.arg("push");
            }
            // buildah 1.28's `manifest push` ignores registries.conf's `insecure`; the flag says it for both.
            push.args(["--tls-verify=false", &image, &format!("docker://{image}")]);
            Some(procs::run_timed(&mut push)?)
        } else {
            None
        };
        // Not timed: what a script does before building the same name again (a manifest list
        // left behind would be added to, not replaced).
        let mut clean = self.buildah();
        if multi {
            clean.args(["manifest", "rm", &image]);
        } else {
            clean.args(["rmi", &image]);
        }
        let _ = procs::run_timed(&mut clean);
        let failed = |t: &procs::Timed, what: &str| {
            let why = t.stderr.lines().rev().find(|l| l.starts_with("Error")).unwrap_or(&t.status).to_string();
            Ok(Err((why, t.failure(&format!("{what} {tag}")))))
        };
        match p {
            None => failed(&b, "buildah build"),
            Some(p) if !p.ok => failed(&p, "buildah push"),
            Some(p) => Ok(Ok(DirectRun { wall: b.wall_s() + p.wall_s(), build: b.wall_s(), push: p.wall_s() })),
        }
    }

    fn side(&self, side: Side, platforms: &str, tag: &str, ctx: &Path, no_cache: bool) -> Result<Sample> {
        Ok(match side {
            Side::Direct => {
                Sample::Direct(self.direct_build(platforms, &format!("bench-direct:{tag}"), ctx, no_cache)?)
            }
            Side::Solo => {
                Sample::Farm(self.farm_build(platforms, SOLO, &format!("bench-solo:{tag}"), ctx, no_cache)?)
            }
            Side::Trio => {
                Sample::Farm(self.farm_build(platforms, "trio", &format!("bench-trio:{tag}"), ctx, no_cache)?)
            }
        })
    }

    /// Rows 1-3: clean builds (no layer cache on either side, base image already local).
    pub fn clean_builds(&self) -> Vec<Row> {
        let mut one =
            Row::new("1", "one platform: farm vs buildah build + push", Unit::Seconds, Goal::RatioAtMost(1.10));
        one.farm_label = "farm build --platform linux/amd64, one x86_64 agent".into();
        one.baseline_label = "buildah build + buildah push, same storage setup".into();
        let mut three = Row::new(
            "2",
            "three platforms, one agent (QEMU for ARM) vs single host",
            Unit::Seconds,
            Goal::RatioAtMost(1.0),
        );
        three.farm_label =
            format!("farm build --platform {THREE}, one x86_64 agent of default capacity ({} here)", solo_capacity());
        three.baseline_label = "buildah build --jobs 3 --manifest + buildah manifest push --all".into();
        let mut trio =
            Row::new("3", "three platforms, three agents (one per platform) vs single host", Unit::Seconds, Goal::None);
        trio.farm_label = "farm build, agents configured native for amd64, arm64, arm/v7 (ARM still under QEMU here: \
                           this shows farm's parallelism, not ARM speed)"
            .into();
        trio.baseline_label = "the single-host build of row 2, measured in the same repetitions".into();
        let cache = "cache state: layer cache off on both sides (--no-cache), base image already in every storage, \
                     base layers already in every registry repository";
        for r in [&mut one, &mut three, &mut trio] {
            r.note(cache);
        }
        let ctx = match self.context("ctx-clean") {
            Ok(c) => c,
            Err(e) => return vec![one.failed(&e), three.failed(&e), trio.failed(&e)],
        };
        if self.warm_up {
            eprintln!("farm-bench: warm-up builds (not measured): base image into every storage");
            for side in [Side::Direct, Side::Solo, Side::Trio] {
                if let Err(e) = self.side(side, THREE, "warm", &ctx, true) {
                    let e = e.context("warm-up build");
                    return vec![one.failed(&e), three.failed(&e), trio.failed(&e)];
                }
            }
        }

        let mut phases: [Vec<BTreeMap<String, f64>>; 3] = Default::default();
        let mut direct_phases: Vec<BTreeMap<String, f64>> = vec![];
        let mut single_direct_phases: Vec<BTreeMap<String, f64>> = vec![];
        let result: Result<()> = (|| {
            for rep in 0..self.reps {
                let mut order = [Side::Direct, Side::Solo, Side::Trio];
                order.rotate_left(rep % 3);
                eprintln!("farm-bench: rows 2-3, repetition {}/{}", rep + 1, self.reps);
                for side in order {
                    match self.side(side, THREE, &format!("r{rep}"), &ctx, true)? {
                        Sample::Direct(d) => {
                            three.baseline.push(d.wall);
                            trio.baseline.push(d.wall);
                            direct_phases.push(direct_phases_of(&d));
                        }
                        Sample::Farm(f) => {
                            let (row, ph) = if matches!(side, Side::Solo) {
                                (&mut three, &mut phases[1])
                            } else {
                                (&mut trio, &mut phases[2])
                            };
                            row.farm.push(f.wall);
                            ph.push(farm_phases(&f));
                        }
                    }
                }
            }
            for rep in 0..self.reps {
                eprintln!("farm-bench: row 1, repetition {}/{}", rep + 1, self.reps);
                let order = if rep % 2 == 0 { [Side::Solo, Side::Direct] } else { [Side::Direct, Side::Solo] };
                for side in order {
                    match self.side(side, "linux/amd64", &format!("one-r{rep}"), &ctx, true)? {
                        Sample::Direct(d) => {
                            one.baseline.push(d.wall);
                            single_direct_phases.push(direct_phases_of(&d));
                        }
                        Sample::Farm(f) => {
                            one.farm.push(f.wall);
                            phases[0].push(farm_phases(&f));
                        }
                    }
                }
            }
            Ok(())
        })();
        let failures = self.take_failures();
        if !failures.is_empty() {
            for r in [&mut one, &mut three, &mut trio] {
                r.note(format!("builds that failed and were run again: {}", failures.join("; ")));
            }
        }
        one.breakdown = median_phases(&phases[0]);
        one.baseline_breakdown = median_phases(&single_direct_phases);
        three.breakdown = median_phases(&phases[1]);
        three.baseline_breakdown = median_phases(&direct_phases);
        trio.breakdown = median_phases(&phases[2]);
        trio.baseline_breakdown = median_phases(&direct_phases);
        match result {
            Ok(()) => vec![one, three, trio],
            Err(e) => [one, three, trio]
                .into_iter()
                .map(|r| if r.farm.len() < self.reps || r.baseline.len() < self.reps { r.failed(&e) } else { r })
                .collect(),
        }
    }

    /// Rows 1a-1b: one platform, a first build (nothing of it in any layer cache: every step
    /// from `COPY deps/` on runs, as `deps/prepare.sh` changes to a content of its own before
    /// each build), farm with its defaults (layer cache on) against a plain `buildah build` (no
    /// `--layers`: one commit per stage, no cache kept) + push (1a), and against `buildah build
    /// --layers` + push (1b), all three in the same repetitions.
    pub fn first_builds(&self) -> Vec<Row> {
        let mut plain = Row::new(
            "1a",
            "one platform, first build (cold layer cache): farm's defaults vs plain buildah build + push",
            Unit::Seconds,
            Goal::None,
        );
        plain.farm_label =
            "farm build --platform linux/amd64 (layer cache on, as a user gets it), one x86_64 agent of \
                            default capacity"
                .into();
        plain.baseline_label = "buildah build (no --layers) + buildah push, same storage setup".into();
        let mut layered = Row::new(
            "1b",
            "the same first build: farm's defaults vs buildah build --layers + push",
            Unit::Seconds,
            Goal::None,
        );
        layered.farm_label = plain.farm_label.clone();
        layered.baseline_label = "buildah build --layers + buildah push, same storage setup".into();
        for r in [&mut plain, &mut layered] {
            r.note(
                "cache state: base image already in every storage; before every build deps/prepare.sh changes to a \
                 content of its own, so each side runs every step from COPY deps/ on (the layer-less ARG/WORKDIR \
                 steps before it may hit)",
            );
        }
        let ctx = match self.context("ctx-first") {
            Ok(c) => c,
            Err(e) => return vec![plain.failed(&e), layered.failed(&e)],
        };
        let stamp = |side: &str, rep: usize| -> Result<()> {
            let file = ctx.join("deps/prepare.sh");
            let text = std::fs::read_to_string(&file)?;
            let body: String =
                text.lines().filter(|l| !l.starts_with("# bench stamp")).map(|l| format!("{l}\n")).collect();
            std::fs::write(&file, format!("{body}# bench stamp {side} {rep} {:016x}\n", rand::random::<u64>()))?;
            Ok(())
        };
        let (mut farm_phases_v, mut plain_phases, mut layered_phases) = (vec![], vec![], vec![]);
        let result: Result<()> = (|| {
            for rep in 0..self.reps {
                eprintln!("farm-bench: rows 1a-1b, repetition {}/{}", rep + 1, self.reps);
                let mut order = ["farm", "plain", "layers"];
                order.rotate_left(rep % 3);
                for side in order {
                    stamp(side, rep)?;
                    match side {
                        "farm" => {
                            let f =
                                self.farm_build("linux/amd64", SOLO, &format!("bench-first:r{rep}"), &ctx, false)?;
                            plain.farm.push(f.wall);
                            layered.farm.push(f.wall);
                            farm_phases_v.push(farm_phases(&f));
                        }
                        "plain" => {
                            let d = self.direct_build_with(
                                "linux/amd64",
                                &format!("bench-first-plain:r{rep}"),
                                &ctx,
                                false,
                                false,
                            )?;
                            plain.baseline.push(d.wall);
                            plain_phases.push(direct_phases_of(&d));
                        }
                        _ => {
                            let d =
                                self.direct_build("linux/amd64", &format!("bench-first-layers:r{rep}"), &ctx, false)?;
                            layered.baseline.push(d.wall);
                            layered_phases.push(direct_phases_of(&d));
                        }
                    }
                }
            }
            Ok(())
        })();
        let failures = self.take_failures();
        if !failures.is_empty() {
            for r in [&mut plain, &mut layered] {
                r.note(format!("builds that failed and were run again: {}", failures.join("; ")));
            }
        }
        plain.breakdown = median_phases(&farm_phases_v);
        plain.baseline_breakdown = median_phases(&plain_phases);
        layered.breakdown = median_phases(&farm_phases_v);
        layered.baseline_breakdown = median_phases(&layered_phases);
        match result {
            Ok(()) => vec![plain, layered],
            Err(e) => vec![plain.failed(&e), layered.failed(&e)],
        }
    }

    /// Rows 4-5: with warm caches, a rebuild after changing one source file, then a rebuild with
    /// nothing changed (the same command again), on both sides.
    pub fn rebuilds(&self) -> Vec<Row> {
        let mut noop =
            Row::new("4", "no-op rebuild, three platforms (nothing changed)", Unit::Seconds, Goal::AtMost(0.3));
        noop.farm_label = "the same farm build again, three agents (one per platform)".into();
        noop.baseline_label = "the same buildah build --jobs 3 --manifest + push again".into();
        let mut changed = Row::new("5", "rebuild after changing one file, three platforms", Unit::Seconds, Goal::None);
        changed.farm_label = "farm build after src/version.txt changed, three agents".into();
        changed.baseline_label = "buildah build --jobs 3 --manifest + push after the same change".into();
        let cache = "cache state: layer cache warm on both sides (each repetition changes the same file for both, \
                     then rebuilds unchanged)";
        changed.note(cache);
        noop.note(cache);
        let ctx = match self.context("ctx-incremental") {
            Ok(c) => c,
            Err(e) => return vec![noop.failed(&e), changed.failed(&e)],
        };
        let (mut noop_phases, mut changed_phases) = (vec![], vec![]);
        let (mut noop_direct, mut changed_direct) = (vec![], vec![]);
        let mut cached_counts = vec![];
        let mut unknown: BTreeMap<String, usize> = BTreeMap::new();
        let result: Result<()> = (|| {
            if self.warm_up {
                eprintln!("farm-bench: warm-up builds for rows 4-5 (not measured)");
                self.farm_build(THREE, "trio", "bench-incr:warm", &ctx, false)?;
                self.direct_build(THREE, "bench-incr-direct:warm", &ctx, false)?;
            }
            for rep in 0..self.reps {
                eprintln!("farm-bench: rows 4-5, repetition {}/{}", rep + 1, self.reps);
                let stamp = format!("repetition {rep} {:016x}\n", rand::random::<u64>());
                std::fs::write(ctx.join("src/version.txt"), stamp).context("changing src/version.txt")?;
                let farm_first = rep % 2 == 0;
                for (what, row, fp, dp) in [
                    ("changed", &mut changed, &mut changed_phases, &mut changed_direct),
                    ("no-op", &mut noop, &mut noop_phases, &mut noop_direct),
                ] {
                    for farm in if farm_first { [true, false] } else { [false, true] } {
                        if farm {
                            let f = self.farm_build(THREE, "trio", &format!("bench-incr:r{rep}"), &ctx, false)?;
                            if what == "no-op" {
                                cached_counts.push(events::cached_platforms(&f.events).len());
                            }
                            for (k, v) in events::unknown_variants(&f.events) {
                                *unknown.entry(k).or_default() += v;
                            }
                            row.farm.push(f.wall);
                            fp.push(farm_phases(&f));
                        } else {
                            let d = self.direct_build(THREE, &format!("bench-incr-direct:r{rep}"), &ctx, false)?;
                            row.baseline.push(d.wall);
                            dp.push(direct_phases_of(&d));
                        }
                    }
                }
            }
            Ok(())
        })();
        let failures = self.take_failures();
        if !failures.is_empty() {
            for r in [&mut noop, &mut changed] {
                r.note(format!("builds that failed and were run again: {}", failures.join("; ")));
            }
        }
        noop.breakdown = median_phases(&noop_phases);
        noop.baseline_breakdown = median_phases(&noop_direct);
        changed.breakdown = median_phases(&changed_phases);
        changed.baseline_breakdown = median_phases(&changed_direct);
        let all_cached = !cached_counts.is_empty() && cached_counts.iter().all(|c| *c == 3);
        if all_cached {
            noop.note("answered from farm's result cache on every platform");
        } else if cached_counts.iter().any(|c| *c > 0) {
            noop.note(format!("result cache answered only some platforms ({cached_counts:?} of 3 per repetition)"));
        } else {
            noop.note(
                "needs the result cache (not in this farm yet): measured anyway, the rebuild ran buildah on every \
                 platform (all layers cached) and pushed again",
            );
        }
        if !unknown.is_empty() {
            noop.note(format!("events this bench does not know yet: {unknown:?}"));
        }
        match result {
            Ok(()) => vec![noop, changed],
            Err(e) => vec![noop.failed(&e), changed.failed(&e)],
        }
    }

    /// Row 14: the cross-compile pattern. The workload with its build stage declared
    /// `FROM --platform=$BUILDPLATFORM` (as a Go or Rust cross-compile is written): farm's agent
    /// runs that stage natively for every platform, while buildah 1.28 on its own ignores
    /// `FROM --platform` and runs it under QEMU for ARM.
    pub fn cross_compile(&self) -> Row {
        let mut row = Row::new(
            "14",
            "three platforms, cross-compile Dockerfile (FROM --platform=$BUILDPLATFORM), one agent vs single host",
            Unit::Seconds,
            Goal::RatioAtMost(0.5),
        );
        row.farm_label = format!(
            "farm build --platform {THREE}, one x86_64 agent of default capacity ({} here): the build stage runs \
             natively for every platform",
            solo_capacity()
        );
        row.baseline_label = "buildah build --platform ... --jobs 3 --manifest + buildah manifest push --all (buildah \
                              1.28 runs the build stage under QEMU for ARM)"
            .into();
        row.note(
            "cache state: layer cache off on both sides (--no-cache), base image already in every storage, base \
             layers already in every registry repository",
        );
        let ctx = match self.cross_context() {
            Ok(c) => c,
            Err(e) => return row.failed(&e),
        };
        let (mut phases, mut direct) = (vec![], vec![]);
        let result: Result<()> = (|| {
            if self.warm_up {
                eprintln!("farm-bench: warm-up builds for row 14 (not measured)");
                self.side(Side::Solo, THREE, "xwarm", &ctx, true)?;
                self.side(Side::Direct, THREE, "xwarm", &ctx, true)?;
            }
            for rep in 0..self.reps {
                eprintln!("farm-bench: row 14, repetition {}/{}", rep + 1, self.reps);
                let order = if rep % 2 == 0 { [Side::Solo, Side::Direct] } else { [Side::Direct, Side::Solo] };
                for side in order {
                    match self.side(side, THREE, &format!("x{rep}"), &ctx, true)? {
                        Sample::Direct(d) => {
                            row.baseline.push(d.wall);
                            direct.push(direct_phases_of(&d));
                        }
                        Sample::Farm(f) => {
                            row.farm.push(f.wall);
                            phases.push(farm_phases(&f));
                        }
                    }
                }
            }
            Ok(())
        })();
        let failures = self.take_failures();
        if !failures.is_empty() {
            row.note(format!("builds that failed and were run again: {}", failures.join("; ")));
        }
        row.breakdown = median_phases(&phases);
        row.baseline_breakdown = median_phases(&direct);
        match result {
            Ok(()) => row,
            Err(e) => row.failed(&e),
        }
    }

    /// The workload with its build stage on the build platform.
    fn cross_context(&self) -> Result<PathBuf> {
        let ctx = self.context("ctx-cross")?;
        let file = ctx.join("Dockerfile");
        let text = std::fs::read_to_string(&file)?;
        let from = "FROM ${BASE} AS build";
        anyhow::ensure!(text.contains(from), "bench/workload/Dockerfile has no {from:?}");
        std::fs::write(&file, text.replace(from, "FROM --platform=$BUILDPLATFORM ${BASE} AS build"))?;
        Ok(ctx)
    }
}

enum Sample {
    Direct(DirectRun),
    Farm(FarmRun),
}

pub(crate) fn farm_phases(f: &FarmRun) -> BTreeMap<String, f64> {
    let mut p = events::phases(&f.events, f.wall);
    // Timings farm reports itself (the agent's phases of the critical platform): numbers named
    // `ms` or `*_ms` are milliseconds.
    for (k, v) in events::reported_timings(&f.events) {
        let (name, secs) = match k.strip_suffix(".ms") {
            Some(name) => (name.to_string(), v / 1000.0),
            None if k.ends_with("_ms") => (k.clone(), v / 1000.0),
            None => (k.clone(), v),
        };
        p.insert(format!("agent {}", name.trim_start_matches("timings.")), secs);
    }
    p
}

fn direct_phases_of(d: &DirectRun) -> BTreeMap<String, f64> {
    [("1 build".to_string(), d.build), ("2 push".to_string(), d.push)].into()
}
