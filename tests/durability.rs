//! End to end, nothing lost: a coordinator killed at each step of a build, ten builds across a
//! restart, cancellation, and logs that outlive the terminal. Real processes, registry, buildah.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::registry::{read_image, Registry};
use common::*;

/// A context whose single RUN takes a moment (workload, not synchronisation) and prints markers.
fn slow_context(root: &std::path::Path, name: &str, secs: u32) -> std::path::PathBuf {
    let ctx = root.join(name);
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(
        ctx.join("Dockerfile"),
        format!(
            "ARG BASE\nFROM ${{BASE}}\nARG TARGETARCH\nRUN echo run-started-{name} && sleep {secs} && uname -m > /arch && echo run-finished-{name}\n"
        ),
    )
    .unwrap();
    ctx
}

fn args(
    farm: &Farm,
    registry: &Registry,
    base: &str,
    platforms: &str,
    tag: &str,
    ctx: &std::path::Path,
) -> Vec<String> {
    let mut a = farm.client_args();
    a.extend(registry.build_flags(base, platforms, tag, ctx));
    a
}

fn assert_index(registry: &Registry, reference: &str, platforms: &[&str]) {
    let (_, _, images) = read_image(registry, reference);
    let got: Vec<&str> = images.iter().map(|i| i.platform.as_str()).collect();
    assert_eq!(got, platforms, "{reference}");
}

#[test]
fn a_coordinator_killed_at_each_step_of_a_build_ends_every_build_with_a_correct_index() {
    let registry = Registry::start();
    let base = registry.seed_busybox();
    let mut farm = Farm::start(3);
    farm.agent("x86", &["--capacity", "4"]);
    let root = farm.tmp.path().to_path_buf();

    // 1. Killed just after accepting: the build was committed before `Accepted` was sent.
    let ctx = slow_context(&root, "accepted", 1);
    let id = submit(&args(&farm, &registry, &base, "linux/amd64,linux/arm64", "accepted:1", &ctx));
    farm.restart_coordinator();
    let b = farm.wait_build_end(&id, Duration::from_secs(120));
    assert_eq!(b["state"], "succeeded", "{b}");
    assert_index(&registry, &format!("{}/accepted:1", registry.addr), &["linux/amd64", "linux/arm64"]);

    // 2. Killed while its tasks run: the agent keeps building and reports to the new coordinator.
    let ctx = slow_context(&root, "running", 4);
    let id = submit(&args(&farm, &registry, &base, "linux/amd64,linux/arm64", "running:1", &ctx));
    // Both of this build's tasks (after the first build's two) have reached the agent.
    let agent_log = &farm.agents["x86"];
    wait_until("the agent to hold both tasks", Duration::from_secs(30), || {
        (agent_log.log().matches("task assigned").count() >= 4).then_some(())
    });
    farm.restart_coordinator();
    let b = farm.wait_build_end(&id, Duration::from_secs(120));
    assert_eq!(b["state"], "succeeded", "{b}");
    assert!(b["platforms"].as_array().unwrap().iter().all(|p| p["attempt"] == 1), "tasks were kept, not rerun: {b}");
    assert_index(&registry, &format!("{}/running:1", registry.addr), &["linux/amd64", "linux/arm64"]);

    // 3. Killed just before stitching (failpoint: the stitching state is committed, no index pushed).
    farm.restart_coordinator_env(&[("FARM_TEST_CRASH_BEFORE", "stitch")]);
    farm.wait_agent("x86", "online");
    let ctx = slow_context(&root, "stitch", 1);
    let id = submit(&args(&farm, &registry, &base, "linux/amd64,linux/arm/v7", "stitch:1", &ctx));
    let crashed = Instant::now();
    wait_until("the coordinator to crash at the failpoint", Duration::from_secs(120), || {
        (!farm.coordinator.alive()).then_some(())
    });
    assert!(registry.tags("stitch").is_empty(), "nothing pushed before the crash");
    farm.restart_coordinator();
    let b = farm.wait_build_end(&id, Duration::from_secs(60));
    assert_eq!(b["state"], "succeeded", "{b} ({:?} after the crash)", crashed.elapsed());
    assert_index(&registry, &format!("{}/stitch:1", registry.addr), &["linux/amd64", "linux/arm/v7"]);
    assert_eq!(registry.tags("stitch"), ["1"]);
}

/// The coordinator tells an agent of its task while the commit that records it is under way.
/// Killed in between (the failpoint makes that commit never complete), it must lose nothing it
/// acknowledged and confuse nothing: the client, never answered, fails; the agent, whose task the
/// restarted coordinator never heard of, is told to drop it; no tag appears; the farm goes on.
#[test]
fn a_task_sent_before_its_commit_completed_is_dropped_when_the_coordinator_dies_first() {
    let registry = Registry::start();
    let base = registry.seed_busybox();
    let mut farm = Farm::start(3);
    farm.agent("x86", &[]);
    farm.restart_coordinator_env(&[("FARM_TEST_STALL_COMMIT", "build")]);
    farm.wait_agent("x86", "online");
    let root = farm.tmp.path().to_path_buf();

    let ctx = slow_context(&root, "early", 60);
    let mut a = vec!["build".to_string(), "--wait=false".into()];
    a.extend(args(&farm, &registry, &base, "linux/amd64", "early:1", &ctx));
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let mut client = Proc::farm("client", &a);
    let agent_log = &farm.agents["x86"];
    agent_log.wait_for_line(&["task assigned"], Duration::from_secs(60));
    assert!(client.alive(), "the client was answered before the build was on disk:\n{}", client.log());
    farm.coordinator.wait_for_line(&["FARM_TEST_STALL_COMMIT=build"], Duration::from_secs(10));

    farm.restart_coordinator();
    let status = wait_until("the unanswered client to give up", Duration::from_secs(60), || client.exit_status());
    assert!(!status.success(), "the client reported success for a build never accepted:\n{}", client.log());
    let agent_log = &farm.agents["x86"];
    agent_log.wait_for_line(&["task cancelled by the coordinator"], Duration::from_secs(30));
    assert_eq!(farm.builds().as_array().unwrap().len(), 0, "{}", farm.builds());
    assert!(registry.tags("early").is_empty(), "a tag was pushed for a build never accepted");

    // The farm goes on; the new run's task ids never meet the lost one's.
    let ctx = slow_context(&root, "after", 1);
    let id = submit(&args(&farm, &registry, &base, "linux/amd64", "after:1", &ctx));
    let b = farm.wait_build_end(&id, Duration::from_secs(120));
    assert_eq!(b["state"], "succeeded", "{b}");
    assert_index(&registry, &format!("{}/after:1", registry.addr), &["linux/amd64"]);
    assert!(registry.tags("early").is_empty());
}

#[test]
fn ten_concurrent_builds_across_a_coordinator_restart_all_end_none_lost() {
    let registry = Registry::start();
    let base = registry.seed_busybox();
    let mut farm = Farm::start(3);
    farm.agent("a", &["--capacity", "3"]);
    farm.agent("b", &["--capacity", "3"]);
    let root = farm.tmp.path().to_path_buf();
    let ids: Vec<String> = (0..10)
        .map(|i| {
            let ctx = slow_context(&root, &format!("c{i}"), 2);
            submit(&args(&farm, &registry, &base, "linux/amd64", &format!("ten:{i}"), &ctx))
        })
        .collect();
    // Mid-way: some builds done, some running, some queued.
    wait_until("some builds to finish", Duration::from_secs(120), || {
        let done = farm.builds().as_array().unwrap().iter().filter(|b| b["state"] == "succeeded").count();
        (done >= 2).then_some(())
    });
    farm.restart_coordinator();
    let ends: Vec<serde_json::Value> = ids.iter().map(|id| farm.wait_build_end(id, Duration::from_secs(240))).collect();
    let succeeded = ends.iter().filter(|b| b["state"] == "succeeded").count();
    assert_eq!(succeeded, 10, "10/10 must succeed: {ends:#?}");
    for i in 0..10 {
        assert_eq!(registry.tags("ten").iter().filter(|t| **t == i.to_string()).count(), 1);
    }
}

#[test]
fn cancel_stops_the_build_on_its_agent_and_pushes_no_tag() {
    let registry = Registry::start();
    let base = registry.seed_busybox();
    let mut farm = Farm::start(3);
    farm.agent("x86", &["--capacity", "2"]);
    let work = farm.tmp.path().join("agent-x86");
    let ctx = slow_context(farm.tmp.path(), "cancelme", 120);
    let id = submit(&args(&farm, &registry, &base, "linux/amd64,linux/arm64", "cancelled:1", &ctx));
    // Wait until both RUNs are really running in buildah.
    let mut logs = vec!["logs".to_string(), id.clone(), "-f".into()];
    logs.extend(farm.client_args());
    let mut cmd = Command::new(farm_bin());
    cmd.args(&logs).env("FARM_LOG", "warn");
    let follower = Proc::spawn("farm logs -f", &mut cmd);
    let buildah_of_agent = || {
        let out = Command::new("pgrep").args(["-f", &format!("buildah --root {}", work.display())]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).lines().count()
    };
    // Mid-build: the RUN step is executing (seen through `farm logs -f`) under buildah.
    follower.wait_for_line(&["run-started-cancelme"], Duration::from_secs(60));
    assert!(buildah_of_agent() >= 1, "buildah should be running the RUN");
    let mut cancel = vec!["cancel".to_string(), id.clone()];
    cancel.extend(farm.client_args());
    let cancel: Vec<&str> = cancel.iter().map(String::as_str).collect();
    assert!(farm_ok(&cancel).contains("cancelled"));
    let b = farm.wait_build_end(&id, Duration::from_secs(10));
    assert_eq!(b["state"], "cancelled");
    // No buildah process of this agent is left (SIGTERM, then SIGKILL after the grace period).
    wait_until("buildah to be gone", Duration::from_secs(20), || (buildah_of_agent() == 0).then_some(()));
    farm.agents["x86"].wait_for_line(&["task stopped"], Duration::from_secs(20));
    wait_until("the task directories to be removed", Duration::from_secs(20), || {
        let left = std::fs::read_dir(work.join("tasks")).map(|d| d.count()).unwrap_or(0);
        (left == 0).then_some(())
    });
    assert!(registry.tags("cancelled").is_empty(), "{:?}", registry.tags("cancelled"));
    // The follower's stream ended with the build.
    let mut f = follower;
    wait_until("farm logs -f to exit", Duration::from_secs(10), || (!f.alive()).then_some(()));
}

#[test]
fn farm_logs_prints_what_the_live_cli_showed() {
    let registry = Registry::start();
    let base = registry.seed_busybox();
    let mut farm = Farm::start(3);
    farm.agent("x86", &["--capacity", "2"]);
    let ctx = slow_context(farm.tmp.path(), "logged", 0);
    let (ok, _out, err) = build(&args(&farm, &registry, &base, "linux/amd64,linux/arm64", "logged:1", &ctx));
    assert!(ok, "{err}");
    let id = err
        .lines()
        .find_map(|l| l.strip_prefix("build ").and_then(|r| r.strip_suffix(" accepted")))
        .expect("the CLI names the build")
        .to_string();
    let live: Vec<&str> = err.lines().filter(|l| l.starts_with("[linux/")).collect();
    let mut logs = vec!["logs".to_string(), id.clone()];
    logs.extend(farm.client_args());
    let logs: Vec<&str> = logs.iter().map(String::as_str).collect();
    let stored = farm_ok(&logs);
    let stored: Vec<&str> = stored.lines().collect();
    assert!(live.iter().any(|l| l.contains("run-finished-logged")), "{err}");
    assert_eq!(stored, live);
    // One platform only.
    let mut one = logs.clone();
    one.extend(["--platform", "linux/arm64"]);
    let arm = farm_ok(&one);
    assert!(!arm.is_empty() && arm.lines().all(|l| l.starts_with("[linux/arm64] ")), "{arm}");
}

#[test]
fn a_sigtermed_agent_finishes_its_task_and_one_past_its_drain_limit_hands_it_back() {
    let registry = Registry::start();
    let base = registry.seed_busybox();
    let mut farm = Farm::start(3);
    farm.agent("patient", &["--native", "linux/arm64", "--emulated", "none", "--drain-timeout", "60"]);
    let ctx = slow_context(farm.tmp.path(), "drain", 3);

    // SIGTERM mid-RUN with a long drain limit: it stops taking work, finishes, then exits.
    let id = submit(&args(&farm, &registry, &base, "linux/arm64", "drain:1", &ctx));
    farm.agents["patient"].wait_for_line(&["task assigned"], Duration::from_secs(30));
    farm.agents["patient"].signal("TERM");
    farm.wait_agent("patient", "draining");
    let b = farm.wait_build_end(&id, Duration::from_secs(120));
    assert_eq!(b["state"], "succeeded", "{b}");
    assert_eq!(b["platforms"][0]["agent"], "patient");
    let agent = farm.agents.get_mut("patient").unwrap();
    wait_until("the drained agent to exit", Duration::from_secs(20), || (!agent.alive()).then_some(()));

    // A drain limit shorter than the task: it is handed back and runs on another agent.
    farm.agent("hasty", &["--native", "linux/arm64", "--emulated", "none", "--drain-timeout", "1"]);
    let ctx = slow_context(farm.tmp.path(), "handback", 20);
    let id = submit(&args(&farm, &registry, &base, "linux/arm64", "drain:2", &ctx));
    farm.agents["hasty"].wait_for_line(&["task assigned"], Duration::from_secs(30));
    farm.agent("heir", &["--native", "linux/arm64", "--emulated", "none"]);
    farm.agents["hasty"].signal("TERM");
    farm.agents["hasty"].wait_for_line(&["handing the task back"], Duration::from_secs(20));
    let b = farm.wait_build_end(&id, Duration::from_secs(120));
    assert_eq!(b["state"], "succeeded", "{b}");
    assert_eq!(b["platforms"][0]["agent"], "heir", "{b}");
    assert_eq!(b["platforms"][0]["attempt"], 2, "{b}");
}
