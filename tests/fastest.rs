//! `--emulation fastest`, end to end: with a history made by real builds, a platform whose native
//! agent is busy goes to the idle agent that emulates it, and the CLI says why; the default
//! placement would have waited for the native agent.

mod common;

use std::path::Path;
use std::time::Duration;

use common::registry::Registry;
use common::*;

/// The build's work: a few seconds, native or under QEMU alike, so that both agents' recorded
/// durations are about the same.
fn context(root: &Path, name: &str, seconds: u32) -> std::path::PathBuf {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("Dockerfile"), format!("ARG BASE\nFROM $BASE\nRUN sleep {seconds} && uname -m > /m\n"))
        .unwrap();
    dir
}

#[test]
fn fastest_emulates_on_the_idle_agent_while_the_native_one_is_busy_and_says_why() {
    require_tool("buildah");
    let registry = Registry::start();
    let base = registry.seed_busybox();
    let mut farm = Farm::start(3);
    farm.agent("x86", &["--native", "linux/amd64", "--emulated", "linux/arm64"]);
    let quick = context(farm.tmp.path(), "quick", 3);
    let long = context(farm.tmp.path(), "long", 120);
    let client = farm.client_args();
    let args = |extra: &[&str], ctx: &Path| -> Vec<String> {
        let mut a = client.clone();
        let tag = format!("{}/fastest:1", registry.addr);
        let base_arg = format!("BASE={base}");
        let flags = ["--platform", "linux/arm64", "--insecure-registry", &registry.addr, "--build-arg", &base_arg];
        a.extend(flags.iter().chain(["-t", tag.as_str()].iter()).map(|s| s.to_string()));
        a.extend(extra.iter().map(|s| s.to_string()));
        a.push(ctx.to_str().unwrap().into());
        a
    };

    // The history: x86 emulates the quick context (no native agent yet), then the native board
    // builds it.
    let (ok, out, err) = build(&args(&["--emulation", "fastest"], &quick));
    assert!(ok && out.contains("x86") && out.contains("emulated"), "{out}\n{err}");
    farm.agent("pi", &["--native", "linux/arm64", "--emulated", "none", "--capacity", "1"]);
    let (ok, out, err) = build(&args(&["--no-cache"], &quick));
    assert!(ok && out.contains("pi") && out.contains("native"), "{out}\n{err}");

    // The native board is busy with a long build.
    let busy = submit(&args(&[], &long));
    wait_until("the long build to run on pi", Duration::from_secs(60), || {
        farm.builds().as_array().unwrap().iter().find(|b| b["id"] == busy).and_then(|b| {
            let p = &b["platforms"][0];
            (p["state"] == "running" && p["agent"] == "pi").then_some(())
        })
    });

    // Fastest: emulated on the idle x86 at once, with the reason on the CLI.
    let (ok, out, err) = build(&args(&["--no-cache", "--emulation", "fastest"], &quick));
    assert!(ok, "{out}\n{err}");
    let all = format!("{out}\n{err}");
    let why = all.lines().find(|l| l.contains("farm: linux/arm64 → ")).unwrap_or_else(|| panic!("no reason:\n{all}"));
    assert!(
        why.contains("farm: linux/arm64 → x86 (emulated): expected ") && why.contains(" vs pi (native, 1 running): "),
        "{why}"
    );
    assert_eq!(summary(&out)["linux/arm64"], ("x86".to_string(), "emulated".to_string()), "{out}");
    println!("the CLI said: {why}");

    let mut cancel = vec!["cancel".to_string(), busy.clone()];
    cancel.extend(farm.client_args());
    farm_ok(&cancel.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(farm.wait_build_end(&busy, Duration::from_secs(60))["state"], "cancelled");
}
