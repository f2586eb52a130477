//! Per-agent limits end to end: `memory_limit` (each build in a memory cgroup of its own, real
//! buildah, real registry, coordinator and agent processes) and `capacity`, as `farm agents`
//! shows them.

mod common;

use std::process::Command;

use common::registry::Registry;
use common::*;

/// A context holding only `dockerfile`.
fn context(root: &std::path::Path, name: &str, dockerfile: &str) -> std::path::PathBuf {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("Dockerfile"), dockerfile).unwrap();
    dir
}

/// The v1 or v2 cgroup directory holding process `pid`'s memory limit.
fn memory_cgroup_of(pid: u32) -> std::path::PathBuf {
    let own = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let (v1, v2) = agent::cgroup::own_cgroups(&mounts, &own);
    v1.or(v2).expect("a memory cgroup")
}

/// `farm-<pid>-...` build cgroups below `dir`.
fn build_cgroups(dir: &std::path::Path, pid: u32) -> Vec<String> {
    let prefix = format!("farm-{pid}-");
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(&prefix))
        .collect()
}

#[test]
fn a_run_past_memory_limit_fails_naming_it_and_the_agent_builds_the_next_task() {
    require_tool("buildah");
    let registry = Registry::start();
    let base = registry.seed_busybox();
    let mut farm = Farm::start(3);

    // 256 MiB, not less: buildah with chroot isolation (itself and its re-executed runtime) uses
    // some 60-100 MiB of the build's cgroup; under 64 MiB the kernel kills buildah, not the RUN.
    // The limit and the capacity, in JSON (bytes) and in the table.
    let listed = farm.agent("small", &["--memory-limit", "256MiB", "--capacity", "2"]);
    assert_eq!(listed["memory_limit"], 256u64 << 20, "{listed}");
    assert_eq!(listed["capacity"], 2, "{listed}");
    let mut args = vec!["agents"];
    let client = farm.client_args();
    args.extend(client.iter().map(String::as_str));
    let table = farm_ok(&args);
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    let row: Vec<&str> = table.lines().find(|l| l.starts_with("small ")).unwrap().split_whitespace().collect();
    let column = header.iter().position(|h| *h == "MEMORY").expect("a MEMORY column");
    assert_eq!((row[column], row[column + 1]), ("256", "MiB"), "{table}");
    assert_eq!(row[header.iter().position(|h| *h == "CAPACITY").unwrap()], "2", "{table}");

    // A RUN that allocates a 600 MiB buffer: killed by the kernel, the build fails saying why.
    let hog = context(
        farm.tmp.path(),
        "hog",
        "ARG BASE\nFROM $BASE\nRUN dd if=/dev/zero of=/dev/null bs=600M count=1 && echo allocated\n",
    );
    let (ok, out, err) =
        build(&[farm.client_args(), registry.build_flags(&base, "linux/amd64", "hog:1", &hog)].concat());
    assert!(!ok, "the build should have run out of memory:\n{out}\n{err}");
    let expected = "linux/amd64 failed: the build ran out of memory: it used more than memory_limit = 256 MiB \
                    (agent small's config, memory_limit); raise it or build on a bigger agent";
    assert!(err.contains(expected), "{err}");
    assert!(!err.lines().any(|l| l.trim() == "allocated"), "the RUN should not have finished: {err}");
    // The kernel killed the RUN's process (SIGKILL: 137), not buildah: buildah says which step failed.
    assert!(
        err.contains(&format!("{expected} (building at STEP \"RUN dd if=/dev/zero of=/dev/null bs=600M count=1 && echo allocated\": while running runtime: exit status 137)")),
        "{err}"
    );
    eprintln!("the failed build said: {}", err.lines().find(|l| l.contains(expected)).unwrap());

    // The agent lives on and builds the next task, under the same limit.
    let agent = farm.agents.get_mut("small").unwrap();
    assert!(agent.alive(), "the agent died: {}", agent.log());
    let pid = agent.pid();
    let fine = context(farm.tmp.path(), "fine", "ARG BASE\nFROM $BASE\nRUN uname -m > /u\n");
    let (ok, out, err) =
        build(&[farm.client_args(), registry.build_flags(&base, "linux/amd64", "fine:1", &fine)].concat());
    assert!(ok, "the next build failed:\n{out}\n{err}\n{}", farm.agents["small"].log());
    assert_eq!(summary(&out)["linux/amd64"], ("small".into(), "native".into()), "{out}");
    assert_eq!(farm.wait_agent("small", "online")["memory_limit"], 256u64 << 20);

    // Each build's cgroup is gone once it is over.
    let cgroups = memory_cgroup_of(pid);
    assert_eq!(build_cgroups(&cgroups, pid), Vec::<String>::new(), "in {}", cgroups.display());
}

#[test]
fn memory_limits_that_cannot_work_are_refused_at_start() {
    let farm = Farm::start(3);
    farm.ca.issue("agent", "a");
    let work = farm.tmp.path().join("agent-a");
    let agent = |extra: &[&str]| {
        let mut cmd = Command::new(farm_bin());
        cmd.args(["agent", "--coordinator", &farm.addr, "--ca-dir", farm.ca.path(), "--name", "a", "--work-dir"])
            .arg(&work)
            .args(extra)
            .env("FARM_LOG", "warn");
        let out = cmd.output().unwrap();
        assert!(!out.status.success(), "the agent should have refused to start");
        String::from_utf8_lossy(&out.stderr).to_string()
    };

    let err = agent(&["--memory-limit", "2 gigs"]);
    assert!(
        err.contains("--memory-limit: \"2 gigs\" is not a size: write a number with a unit, e.g. 512MiB, 2GiB or 1.5G"),
        "{err}"
    );
    let config = farm.tmp.path().join("agent.toml");
    std::fs::write(&config, "memory_limit = \"lots\"\n").unwrap();
    let err = agent(&["--config", config.to_str().unwrap()]);
    assert!(err.contains("memory_limit: \"lots\" is not a size"), "{err}");

    // BuildKit applies no per-build limit: the Docker builder refuses the key rather than ignore it.
    let err = agent(&["--memory-limit", "1GiB", "--builder", "docker"]);
    assert!(err.contains("memory_limit is not supported with the Docker builder"), "{err}");
    assert!(err.contains("BuildKit (`docker build`) applies no per-build memory limit"), "{err}");
}
