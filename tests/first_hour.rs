//! End to end, a newcomer's first hour: the README's "Using farm on your machines" block, run
//! line by line as written (HOME in a temporary directory), must build on the coordinator's
//! agent, not silently on an embedded one; and with nothing configured and nothing answering at
//! 127.0.0.1:3276, `farm build` says that it builds on this machine.
//!
//! This file holds one test on purpose: it uses the fixed default port 127.0.0.1:3276, and test
//! binaries run one after another, so no other test can hold that port meanwhile.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::registry::Registry;
use common::*;

/// The shell lines of the README's "Using farm on your machines" block.
fn readme_block() -> Vec<String> {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let section = readme.split("## Using farm on your machines").nth(1).expect("README has the section");
    let block = section.split("```sh\n").nth(1).and_then(|b| b.split("```").next()).expect("a sh block");
    block.lines().map(|l| l.split(" #").next().unwrap().trim().to_string()).filter(|l| !l.is_empty()).collect()
}

/// `bash -c line` as the user would type it: HOME is the test's, farm is first on PATH.
fn shell(home: &Path, cwd: &Path, line: &str) -> Command {
    let bin = Path::new(farm_bin()).parent().unwrap();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
    let mut cmd = Command::new("bash");
    cmd.arg("-c").arg(line).current_dir(cwd).env("HOME", home).env("PATH", path).env("NO_COLOR", "1");
    for v in ["FARM_CONFIG", "FARM_COORDINATOR", "FARM_CA_DIR", "FARM_NAME", "XDG_CONFIG_HOME", "XDG_STATE_HOME"] {
        cmd.env_remove(v);
    }
    cmd
}

#[test]
fn the_readme_s_steps_build_on_the_coordinator_s_agent_and_nothing_configured_builds_embedded() {
    let registry = Registry::start();
    let base = registry.seed_busybox();
    let home = tempfile::tempdir().unwrap();
    let ctx = example("hello", home.path());
    let flags = format!("--insecure-registry {r} --build-arg BASE={base} --progress plain", r = registry.addr);

    // Nothing configured, nothing at 127.0.0.1:3276: the embedded farm, and it says so.
    let line = format!("farm build --platform linux/amd64 -t {}/embedded:1 {flags} .", registry.addr);
    let out = shell(home.path(), &ctx, &line).output().unwrap();
    let (so, se) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{so}\n{se}");
    assert_eq!(
        se.lines().next(),
        Some("no coordinator configured or reachable: building on this machine (embedded farm)"),
        "{se}"
    );
    assert_eq!(summary(&so)["linux/amd64"].0, "local", "{so}");

    // The README's block, line by line. Installing and compiling were done before the tests; the
    // registry is the test's own instead of registry.lan:5000.
    let mut background: Vec<Proc> = Vec::new();
    let mut built = None;
    for line in readme_block() {
        if line.starts_with("deploy/install.sh") || line.starts_with("cargo build") {
            continue;
        }
        eprintln!("$ {line}");
        if let Some(cmd) = line.strip_suffix('&') {
            let mut c = shell(home.path(), &ctx, cmd.trim());
            // As a user would run them, logs redirected to a file: no NO_COLOR, no terminal.
            c.env("FARM_LOG", "info").env_remove("NO_COLOR");
            let proc = Proc::spawn(cmd.trim(), &mut c);
            if cmd.starts_with("farm coordinator") {
                proc.wait_for_line(&["coordinator listening", "127.0.0.1:3276"], Duration::from_secs(20));
            } else if cmd.starts_with("farm agent") {
                proc.wait_for_line(&["registered as"], Duration::from_secs(20));
            }
            background.push(proc);
            continue;
        }
        let line = if line.starts_with("farm build") {
            format!("{} {flags}", line.replace("registry.lan:5000", &registry.addr))
        } else {
            line
        };
        let out = shell(home.path(), &ctx, &line).output().unwrap();
        let (so, se) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "`{line}` failed:\n{so}\n{se}");
        if line.starts_with("farm build") {
            assert!(!se.contains("embedded"), "farm build must use the coordinator it was pointed at:\n{se}");
            built = Some(so.to_string());
        }
    }

    // Every platform ran on the agent the README started (named after this host), not "local".
    let host = hostname();
    let rows = summary(&built.expect("the README's block ends with a farm build"));
    assert_eq!(rows.keys().cloned().collect::<Vec<_>>(), ["linux/amd64", "linux/arm64"]);
    for (platform, (agent, _)) in &rows {
        assert_eq!(agent, &host, "{platform} must run on the README's agent");
    }
    // Quiet by default: no colour codes in logs that go to a file, and no warning for the CLI's
    // connections ending as they should.
    for p in &background {
        let log = p.log();
        assert!(!log.contains('\u{1b}'), "{}: colour codes in a log that is not a terminal:\n{log}", p.name);
        assert!(!log.lines().any(|l| l.contains("WARN") && l.contains("connection ended")), "{}:\n{log}", p.name);
    }
    drop(background);
}

fn hostname() -> String {
    let out = Command::new("hostname").output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_lowercase()
}
