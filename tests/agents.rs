//! End to end: a real coordinator and real agents as separate processes on loopback, with
//! certificates made by `farm ca`.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const TIMEOUT_SECS: u64 = 3;

fn coordinator(ca: &Ca, port: u16, root: &std::path::Path) -> Proc {
    Farm::spawn_coordinator(ca, root, port, TIMEOUT_SECS)
}

fn agent_args<'a>(addr: &'a str, ca: &'a Ca, name: &'a str, work: &'a str) -> Vec<&'a str> {
    vec!["agent", "--coordinator", addr, "--ca-dir", ca.path(), "--name", name, "--work-dir", work]
}

/// Waits until `name` is listed in `state` and returns its entry.
fn wait_agent_state(addr: &str, ca: &Ca, name: &str, state: &str, timeout: Duration) -> serde_json::Value {
    wait_until(&format!("agent {name} to be {state}"), timeout, || {
        let list = agents_json(addr, ca);
        agent(&list, name).filter(|a| a["state"] == state).cloned()
    })
}

fn assert_handlers_registered() {
    for h in ["qemu-aarch64", "qemu-arm"] {
        let path = format!("/proc/sys/fs/binfmt_misc/{h}");
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            text.starts_with("enabled")
                && text.contains("qemu-")
                && text.lines().any(|l| l.starts_with("flags:") && l.contains('F') && l.contains('P')),
            "{path} is not an enabled QEMU handler with flags F and P: run `deploy/install.sh binfmt` as root"
        );
    }
}

#[test]
fn agents_register_go_offline_and_come_back_after_a_coordinator_restart() {
    require_tool("buildah");
    require_tool("unshare");
    assert_handlers_registered();
    let tmp = tempfile::tempdir().unwrap();
    let ca = Ca::init(tmp.path());
    ca.issue("agent", "x86-box");
    ca.issue("agent", "no-qemu");
    let port = free_udp_port();
    let addr = format!("127.0.0.1:{port}");
    let mut coord = coordinator(&ca, port, tmp.path());

    // Agent 1 sees the machine's real binfmt_misc handlers.
    let w1 = tmp.path().join("w1");
    let mut args = agent_args(&addr, &ca, "x86-box", w1.to_str().unwrap());
    args.extend(["--label", "board=x86", "--capacity", "2"]);
    let _a1 = Proc::farm("agent x86-box", &args);
    // Agent 2 runs in its own mount namespace where binfmt_misc is an empty filesystem: for it,
    // the handlers are absent.
    let w2 = tmp.path().join("w2");
    let mut cmd = Command::new("unshare");
    cmd.args([
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        "mount -t tmpfs none /proc/sys/fs/binfmt_misc && exec \"$@\"",
        "sh",
    ])
    .arg(farm_bin())
    .args(agent_args(&addr, &ca, "no-qemu", w2.to_str().unwrap()))
    .env("FARM_LOG", "info");
    let mut a2 = Proc::spawn("agent no-qemu", &mut cmd);

    let one = wait_agent_state(&addr, &ca, "x86-box", "online", Duration::from_secs(20));
    assert_eq!(strings(&one["native"]), ["linux/amd64", "linux/386"]);
    let emulated = strings(&one["emulated"]);
    for p in ["linux/arm64", "linux/arm/v7", "linux/arm/v6"] {
        assert!(emulated.iter().any(|e| e == p), "{p} missing from emulated {emulated:?}");
    }
    assert!(
        !emulated.iter().any(|e| e == "linux/amd64" || e == "linux/386"),
        "native offered as emulated: {emulated:?}"
    );
    assert_eq!(one["labels"]["board"], "x86");
    assert_eq!(one["capacity"], 2);
    assert_eq!(one["builder"], "buildah");
    let two = wait_agent_state(&addr, &ca, "no-qemu", "online", Duration::from_secs(20));
    assert_eq!(strings(&two["native"]), ["linux/amd64", "linux/386"]);
    assert!(strings(&two["emulated"]).is_empty(), "no handlers, no emulation: {two}");

    // The table for people names both.
    let table = farm_ok(&["agents", "--coordinator", &addr, "--ca-dir", ca.path(), "--name", "admin"]);
    assert!(table.starts_with("NAME"), "{table}");
    assert!(
        table.lines().any(|l| l.starts_with("x86-box") && l.contains("online") && l.contains("linux/arm/v7")),
        "{table}"
    );

    // An agent whose certificate comes from another CA is refused, and the coordinator goes on.
    let other = Ca::init(&tmp.path().join("other"));
    other.issue("agent", "rogue");
    let rogue_dir = tmp.path().join("rogue");
    std::fs::create_dir_all(&rogue_dir).unwrap();
    std::fs::copy(ca.dir.join("ca.crt"), rogue_dir.join("ca.crt")).unwrap();
    for f in ["rogue.crt", "rogue.key"] {
        std::fs::copy(other.dir.join(f), rogue_dir.join(f)).unwrap();
    }
    let rogue = Proc::farm(
        "agent rogue",
        &[
            "agent",
            "--coordinator",
            &addr,
            "--ca-dir",
            rogue_dir.to_str().unwrap(),
            "--name",
            "rogue",
            "--work-dir",
            tmp.path().join("w3").to_str().unwrap(),
        ],
    );
    coord.wait_for_line(&["refused agent \"rogue\"", "not signed by this farm's CA"], Duration::from_secs(20));
    rogue.wait_for_line(&["refused this certificate", "farm ca issue"], Duration::from_secs(20));
    let list = agents_json(&addr, &ca);
    assert!(agent(&list, "rogue").is_none(), "rogue agent must not be listed: {list}");
    assert_eq!(agent(&list, "x86-box").unwrap()["state"], "online");
    drop(rogue);

    // Restart the coordinator (SIGKILL, so it says goodbye to nobody): both agents come back by themselves.
    coord.kill();
    coord = coordinator(&ca, port, tmp.path());
    wait_agent_state(&addr, &ca, "x86-box", "online", Duration::from_secs(30));
    wait_agent_state(&addr, &ca, "no-qemu", "online", Duration::from_secs(30));

    // A killed agent shows offline within the heartbeat timeout (plus the time to ask).
    a2.kill();
    let killed = Instant::now();
    wait_agent_state(&addr, &ca, "no-qemu", "offline", Duration::from_secs(TIMEOUT_SECS + 5));
    assert!(killed.elapsed() < Duration::from_secs(TIMEOUT_SECS + 3), "offline after {:?}", killed.elapsed());
    assert_eq!(agent(&agents_json(&addr, &ca), "x86-box").unwrap()["state"], "online");
    assert!(coord.alive());
}

#[test]
fn cli_errors_name_the_problem_and_the_fix() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = Ca::init(tmp.path());
    // A second init refuses to overwrite the CA.
    let out = farm(&["ca", "init", "--dir", ca.path()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("refusing to overwrite"), "{out:?}");
    // An agent without a certificate says how to get one.
    let out =
        farm(&["agent", "--ca-dir", ca.path(), "--name", "pi-4", "--work-dir", tmp.path().join("w").to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("farm ca issue") && err.contains("pi-4"), "{err}");
    // A bad platform lists the accepted ones.
    ca.issue("agent", "pi-4");
    let out = farm(&["agent", "--ca-dir", ca.path(), "--name", "pi-4", "--native", "linux/mips"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("linux/mips") && err.contains("linux/arm/v7"), "{err}");
    // A client certificate cannot run an agent.
    ca.issue("client", "alice");
    let out = farm(&[
        "agent",
        "--ca-dir",
        ca.path(),
        "--name",
        "alice",
        "--work-dir",
        tmp.path().join("w").to_str().unwrap(),
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("agents need role agent"), "{out:?}");
}
