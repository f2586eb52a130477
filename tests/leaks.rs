//! End to end: a build that fails, is cancelled, or whose agent is SIGKILLed mid-RUN leaves
//! nothing on its agent: no mount under the work directory, no buildah container in any of its
//! stores, no process, nothing in `tasks/` or the builder's `tmp/`; and the next build succeeds.
//! Real registry, coordinator, agent and buildah. What each check saw is printed (run with
//! `--nocapture` to read it).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::netns::{processes_in, Leftovers};
use common::registry::{read_image, Registry};
use common::*;

/// What a check found on the agent; empty everywhere when nothing leaked.
#[derive(Debug, Default)]
struct Found {
    mounts: Vec<String>,
    /// (store, container ids)
    containers: Vec<(String, Vec<String>)>,
    processes: Vec<String>,
    tasks: Vec<String>,
    tmp: Vec<String>,
}

impl Found {
    fn clean(&self) -> bool {
        self.mounts.is_empty()
            && self.containers.iter().all(|(_, c)| c.is_empty())
            && self.processes.is_empty()
            && self.tasks.is_empty()
            && self.tmp.is_empty()
    }

    fn print(&self, work: &Path, when: &str) {
        println!("--- {when}");
        println!("$ findmnt -rn -o TARGET | grep {}\n{}", work.display(), lines(&self.mounts));
        for (store, ids) in &self.containers {
            println!("$ buildah --root {store}/storage --runroot {store}/run containers -q\n{}", lines(ids));
        }
        println!("$ ps (processes whose cmdline, cwd or root mention {})\n{}", work.display(), lines(&self.processes));
        println!("$ ls {}/tasks\n{}", work.display(), lines(&self.tasks));
        println!("$ ls {}/buildah/tmp\n{}", work.display(), lines(&self.tmp));
    }
}

fn lines(v: &[String]) -> String {
    if v.is_empty() {
        "(nothing)".into()
    } else {
        v.join("\n")
    }
}

fn entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| d.filter_map(Result::ok).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default()
}

/// Looks at the agent whose work directory is `work`; `agent` (its own pid) is not a leftover.
fn look(work: &Path, agent: Option<u32>) -> Found {
    let dir = work.to_string_lossy().into_owned();
    let out = Command::new("findmnt").args(["-rn", "-o", "TARGET"]).output().expect("findmnt");
    let mounts = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|m| m.starts_with(&format!("{dir}/")) || *m == dir)
        .map(String::from)
        .collect();
    let mut containers = Vec::new();
    let stores = work.join("buildah/stores");
    let mut all: Vec<PathBuf> =
        std::fs::read_dir(&stores).map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect()).unwrap_or_default();
    all.sort();
    for store in all {
        // In a mount namespace of its own: buildah mounts its storage's overlay directory on
        // itself, and would leave that mount behind while the store holds a killed build's
        // container (the check must not make what it looks for).
        let out = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "buildah"])
            .arg("--root")
            .arg(store.join("storage"))
            .arg("--runroot")
            .arg(store.join("run"))
            .args(["--storage-driver", "overlay", "containers", "-q"])
            .output()
            .expect("buildah containers");
        assert!(out.status.success(), "buildah containers: {}", String::from_utf8_lossy(&out.stderr));
        let ids = String::from_utf8_lossy(&out.stdout).lines().map(String::from).collect();
        containers.push((store.display().to_string(), ids));
    }
    let processes = processes_in(work).into_iter().filter(|(pid, _)| Some(*pid) != agent).map(|(_, d)| d).collect();
    Found {
        mounts,
        containers,
        processes,
        tasks: entries(&work.join("tasks")),
        tmp: entries(&work.join("buildah/tmp")),
    }
}

/// Waits (up to a deadline) until nothing is left, prints what the checks saw, and asserts it.
fn assert_nothing_left(work: &Path, agent: u32, when: &str) {
    let clean = poll_until(Duration::from_secs(30), || look(work, Some(agent)).clean().then_some(()));
    let found = look(work, Some(agent));
    found.print(work, when);
    assert!(clean.is_some() && found.clean(), "{when}: the build left this behind on its agent: {found:#?}");
}

fn context(root: &Path, name: &str, run: &str) -> PathBuf {
    let ctx = root.join(name);
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(ctx.join("Dockerfile"), format!("ARG BASE\nFROM ${{BASE}}\nRUN {run}\n")).unwrap();
    ctx
}

fn build_args(farm: &Farm, registry: &Registry, base: &str, tag: &str, ctx: &Path) -> Vec<String> {
    let mut a = farm.client_args();
    a.extend(registry.build_flags(base, "linux/amd64", tag, ctx));
    a
}

/// `farm logs ID -f`, to wait for a build's log lines.
fn follow(farm: &Farm, id: &str) -> Proc {
    let mut args = vec!["logs".to_string(), id.to_string(), "-f".into()];
    args.extend(farm.client_args());
    let mut cmd = Command::new(farm_bin());
    cmd.args(&args).env("FARM_LOG", "warn");
    Proc::spawn("farm logs -f", &mut cmd)
}

fn cancel(farm: &Farm, id: &str) {
    let mut args = vec!["cancel".to_string(), id.to_string()];
    args.extend(farm.client_args());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    assert!(farm_ok(&args).contains("cancelled"));
    assert_eq!(farm.wait_build_end(id, Duration::from_secs(30))["state"], "cancelled");
}

/// A build with a RUN step that must succeed, and whose result is in the registry.
fn assert_a_build_succeeds(farm: &Farm, registry: &Registry, base: &str, n: u32) {
    let ctx = context(farm.tmp.path(), &format!("ok{n}"), &format!("echo ok-{n} > /ok"));
    let (ok, out, err) = build(&build_args(farm, registry, base, &format!("ok:{n}"), &ctx));
    assert!(ok, "a normal build must succeed after that:\n{out}\n{err}");
    let (_, _, images) = read_image(registry, &format!("{}/ok:{n}", registry.addr));
    assert_eq!(images[0].text("ok"), format!("ok-{n}"));
    println!("--- then a normal build succeeded: {}/ok:{n}", registry.addr);
}

#[test]
fn failed_cancelled_and_killed_builds_leave_nothing_on_their_agent() {
    require_tool("findmnt");
    require_tool("buildah");
    let registry = Registry::start();
    let base = registry.seed_busybox();
    let mut farm = Farm::start(3);
    let _leftovers = Leftovers::new(farm.tmp.path());
    let agent_flags = ["--native", "linux/amd64", "--emulated", "none"];
    farm.agent("x86", &agent_flags);
    let work = farm.tmp.path().join("agent-x86");
    let root = farm.tmp.path().to_path_buf();

    // 1. A RUN step fails.
    let ctx = context(&root, "fails", "echo start && false");
    let (ok, out, err) = build(&build_args(&farm, &registry, &base, "fails:1", &ctx));
    assert!(!ok, "the build must fail:\n{out}\n{err}");
    assert!(err.contains("[linux/amd64] start"), "{err}");
    assert!(err.contains(r#"building at STEP "RUN echo start && false""#), "{err}");
    assert_nothing_left(&work, farm.agents["x86"].pid(), "1. after a build whose RUN failed");
    assert_a_build_succeeds(&farm, &registry, &base, 1);

    // 2. Cancelled mid-RUN (the sleep is workload: a RUN step still running when cancelled).
    let ctx = context(&root, "cancelled", "echo run-started-cancelled && sleep 300");
    let id = submit(&build_args(&farm, &registry, &base, "cancelled:1", &ctx));
    follow(&farm, &id).wait_for_line(&["run-started-cancelled"], Duration::from_secs(60));
    cancel(&farm, &id);
    farm.agents["x86"].wait_for_line(&["task stopped"], Duration::from_secs(30));
    assert_nothing_left(&work, farm.agents["x86"].pid(), "2. after a build cancelled mid-RUN");
    assert_a_build_succeeds(&farm, &registry, &base, 2);

    // 3. The agent SIGKILLed mid-RUN, then started again.
    let ctx = context(&root, "killed", "echo run-started-killed && sleep 300");
    let id = submit(&build_args(&farm, &registry, &base, "killed:1", &ctx));
    follow(&farm, &id).wait_for_line(&["run-started-killed"], Duration::from_secs(60));
    farm.agents.get_mut("x86").unwrap().kill();
    // Its processes and mounts died with it; its container and task directory wait for the restart.
    let gone = poll_until(Duration::from_secs(10), || {
        let f = look(&work, None);
        (f.processes.is_empty() && f.mounts.is_empty()).then_some(f)
    });
    let before = look(&work, None);
    before.print(&work, "3. right after the agent was SIGKILLed mid-RUN (before its restart)");
    assert!(gone.is_some(), "the killed agent's build outlived it: {before:#?}");
    assert!(
        before.containers.iter().any(|(_, c)| !c.is_empty()),
        "the killed build's container is expected until the restart: {before:#?}"
    );
    // Nothing may pick the task up again (this farm has one agent): cancel it first.
    cancel(&farm, &id);
    let mut args = vec!["agent", "--coordinator", &farm.addr, "--ca-dir", farm.ca.path(), "--name", "x86"];
    args.extend(["--work-dir", work.to_str().unwrap()]);
    args.extend(agent_flags);
    let restarted = Proc::farm("agent x86 (restarted)", &args);
    farm.agents.insert("x86".into(), restarted);
    farm.wait_agent("x86", "online");
    let agent = &farm.agents["x86"];
    let swept = agent.wait_for_line(&["container(s) left by an earlier run"], Duration::from_secs(5));
    let task_dir = agent.wait_for_line(&["tasks/", "left by an earlier run"], Duration::from_secs(5));
    println!("--- the restarted agent said:\n{swept}\n{task_dir}");
    assert_nothing_left(&work, agent.pid(), "3. after the SIGKILLed agent was restarted");
    assert_a_build_succeeds(&farm, &registry, &base, 3);
    assert!(registry.tags("fails").is_empty() && registry.tags("cancelled").is_empty());
    assert!(registry.tags("killed").is_empty());
}
