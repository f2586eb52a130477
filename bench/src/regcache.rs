//! Rows 16a-16b: the layer cache shared through the registry. A rebuild after a one-file change
//! on a **second, cold agent** (a fresh work directory: empty buildah storage) of the same
//! platform, importing the cache another agent exported under the coordinator's `cache_repo`,
//! against the first agent's warm rebuild (16a, goal ≤ 1.5×), and against a cold agent without
//! the shared cache (16b: the same fresh agent with `--no-cache`, which imports nothing).
//!
//! Every side changes `src/version.txt` to a content of its own before it builds, so no side finds
//! the changed step in the registry because another side built it first: each rebuild runs the
//! compile step; the dependencies step is what the caches can answer.

use std::time::Duration;

use anyhow::Result;

use crate::builds::{farm_phases, Builds};
use crate::env::Env;
use crate::procs;
use crate::report::{median_phases, Goal, Row, Unit};

const PLATFORM: &str = "linux/amd64";
pub const WARM: &str = "rc-warm";

/// Starts the coordinator (with `cache_repo`) and the warm agent, then measures.
pub async fn rows(env: &mut Env, base: &str, n: u32, reps: usize, warm_up: bool) -> Vec<Row> {
    let mut shared = Row::new(
        "16a",
        "rebuild after a one-file change on a second, cold agent with the registry cache vs the first agent's warm rebuild",
        Unit::Seconds,
        Goal::RatioAtMost(1.5),
    );
    shared.farm_label = format!(
        "farm build --platform {PLATFORM} on a fresh agent (empty storage), importing the layer cache from the \
         coordinator's cache_repo"
    );
    shared.baseline_label =
        "the same change rebuilt on the agent that built the context before (warm local cache)".into();
    let mut cold =
        Row::new("16b", "the same cold agent with the registry cache vs without it", Unit::Seconds, Goal::None);
    cold.farm_label = shared.farm_label.clone();
    cold.baseline_label = "a fresh agent without the shared cache (--no-cache: nothing imported)".into();
    let registry = env.registry_addr().to_string();
    let config = format!("cache_repo = \"{registry}/farm-cache\"\n");
    let result = measure(env, &config, base, n, reps, warm_up, &mut shared, &mut cold).await;
    for r in [&mut shared, &mut cold] {
        r.note(format!(
            "cache state: coordinator cache_repo = {registry}/farm-cache (every build exports, per platform); each side \
             changes src/version.txt to a content of its own, so the compile step always runs and the \
             dependencies step is what a cache answers; the cold agents are started fresh for every build (not timed)"
        ));
    }
    match result {
        Ok(()) => vec![shared, cold],
        Err(e) => vec![shared.failed(&e), cold.failed(&e)],
    }
}

#[allow(clippy::too_many_arguments)]
async fn measure(
    env: &mut Env,
    config: &str,
    base: &str,
    n: u32,
    reps: usize,
    warm_up: bool,
    shared: &mut Row,
    cold: &mut Row,
) -> Result<()> {
    let c = env.start_coordinator_with("coordinator-regcache", Some(config))?;
    env.start_agent(&c, WARM, &["--emulated", "none", "--label", "bench=rcwarm"])?;
    env.wait_online(&c, &[WARM], Duration::from_secs(60)).await?;
    let ctx = {
        let b = Builds::new(env, c.clone(), base.to_string(), n, reps, warm_up)?;
        b.context("ctx-regcache")?
    };
    let stamp = |side: &str, rep: usize| {
        std::fs::write(ctx.join("src/version.txt"), format!("{side} {rep} {:016x}\n", rand::random::<u64>()))
    };
    // The first build: the warm agent fills its storage and the registry cache.
    {
        let b = Builds::new(env, c.clone(), base.to_string(), n, reps, warm_up)?;
        stamp("first", 0)?;
        b.farm_build(PLATFORM, "rcwarm", "bench-rc:first", &ctx, false)?;
        // A second one, so that the warm agent's rebuilds are rebuilds of a rebuild (the first
        // found no cache anywhere).
        stamp("first", 1)?;
        b.farm_build(PLATFORM, "rcwarm", "bench-rc:second", &ctx, false)?;
    }
    let (mut shared_phases, mut warm_phases, mut cold_phases) = (vec![], vec![], vec![]);
    let mut hits = vec![];
    let mut cold_agents = 0;
    for rep in 0..reps {
        eprintln!("farm-bench: rows 16a-16b, repetition {}/{reps}", rep + 1);
        // Rotate which side goes first.
        let mut order = ["shared", "warm", "cold"];
        order.rotate_left(rep % 3);
        for side in order {
            procs::check_interrupted()?;
            stamp(side, rep)?;
            let tag = format!("bench-rc:{side}{rep}");
            if side == "warm" {
                let b = Builds::new(env, c.clone(), base.to_string(), n, reps, warm_up)?;
                let f = b.farm_build(PLATFORM, "rcwarm", &tag, &ctx, false)?;
                shared.baseline.push(f.wall);
                warm_phases.push(farm_phases(&f));
                continue;
            }
            cold_agents += 1;
            let name = format!("rc-cold{cold_agents}");
            env.start_agent(&c, &name, &["--emulated", "none", "--label", "bench=rccold"])?;
            env.wait_online(&c, &[name.as_str()], Duration::from_secs(60)).await?;
            let f = {
                let b = Builds::new(env, c.clone(), base.to_string(), n, reps, warm_up)?;
                b.farm_build(PLATFORM, "rccold", &tag, &ctx, side == "cold")?
            };
            env.stop_service(&format!("agent {name}"));
            let _ = std::fs::remove_dir_all(env.root.join(format!("agent-{name}")));
            if side == "shared" {
                let count = |needle: &str| f.events.iter().filter(|e| e.event.to_string().contains(needle)).count();
                hits.push((
                    count("farm: imported the layer cache"),
                    count("--> Cache pulled from remote"),
                    count("--> Using cache"),
                ));
                shared.farm.push(f.wall);
                cold.farm.push(f.wall);
                shared_phases.push(farm_phases(&f));
            } else {
                cold.baseline.push(f.wall);
                cold_phases.push(farm_phases(&f));
            }
        }
    }
    shared.breakdown = median_phases(&shared_phases);
    shared.baseline_breakdown = median_phases(&warm_phases);
    cold.breakdown = median_phases(&shared_phases);
    cold.baseline_breakdown = median_phases(&cold_phases);
    shared.note(format!(
        "the cold agent's (imports of the previous build's layer-less step images, steps pulled from the registry \
         by buildah, steps answered from cache), per repetition: {hits:?}"
    ));
    env.stop_service(&format!("agent {WARM}"));
    env.stop_service("coordinator-regcache");
    Ok(())
}
