//! End to end: only members get in. Join tokens, enrollment by certificate signing request,
//! revocation, expiry, roles. Real coordinator and agents on loopback.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::{Duration, Instant};

use common::registry::Registry;
use common::*;

fn token(farm: &Farm, role: &str, extra: &[&str]) -> String {
    let mut a = vec!["token".to_string(), "create".into(), "--role".into(), role.into()];
    a.extend(farm.client_args());
    a.extend(extra.iter().map(|s| s.to_string()));
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    farm_ok(&a).trim().to_string()
}

#[test]
fn token_join_build_revoke_and_refusals() {
    let registry = Registry::start();
    let base = registry.seed_busybox();
    let f = Farm::start(3);
    let farm = &f;
    let tmp = farm.tmp.path();

    // An agent joins with a token: its key is made here, stored 0600, and never sent.
    let t = token(farm, "agent", &["--ttl", "1h"]);
    assert!(t.starts_with("farm1."), "{t}");
    let dir = tmp.join("pi-home");
    let out = join_ok(&t, &farm.addr, "pi", &dir);
    assert!(out.contains("joined the farm") && out.contains("as agent \"pi\""), "{out}");
    let mode = std::fs::metadata(dir.join("pi.key")).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert!(dir.join("ca.crt").exists() && dir.join("pi.crt").exists());

    // It runs and builds.
    let work = tmp.join("pi-work");
    let agent = Proc::farm(
        "agent pi",
        &[
            "agent",
            "--coordinator",
            &farm.addr,
            "--ca-dir",
            dir.to_str().unwrap(),
            "--name",
            "pi",
            "--work-dir",
            work.to_str().unwrap(),
            "--label",
            "joined=yes",
        ],
    );
    farm.wait_agent("pi", "online");
    let ctx = tmp.join("ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(ctx.join("Dockerfile"), "ARG BASE\nFROM ${BASE}\nRUN echo built by a joined agent\n").unwrap();
    let mut b = farm.client_args();
    b.extend(
        [
            "--platform",
            "linux/amd64",
            "--require",
            "joined=yes",
            "--insecure-registry",
            &registry.addr,
            "--build-arg",
            &format!("BASE={base}"),
            "-t",
            &format!("{}/joined:1", registry.addr),
            ctx.to_str().unwrap(),
        ]
        .map(String::from),
    );
    let (ok, out, err) = build(&b);
    assert!(ok, "{out}\n{err}");
    assert_eq!(summary(&out)["linux/amd64"].0, "pi");

    // Revoked: its connection is closed within 5 s, and it cannot come back.
    let mut revoke = vec!["agents".to_string(), "revoke".into(), "pi".into()];
    revoke.extend(farm.client_args());
    let revoke: Vec<&str> = revoke.iter().map(String::as_str).collect();
    let start = Instant::now();
    farm_ok(&revoke);
    farm.wait_agent("pi", "offline");
    assert!(start.elapsed() < Duration::from_secs(5), "closed after {:?}", start.elapsed());
    agent.wait_for_line(&["was revoked"], Duration::from_secs(10));
    farm.coordinator.wait_for_line(&["agent \"pi\" refused: its certificate was revoked"], Duration::from_secs(30));
    assert_eq!(agent_state(farm, "pi"), "offline");
    // Nor can it join again under that name.
    let t2 = token(farm, "agent", &[]);
    let out = join(&t2, &farm.addr, "pi", &tmp.join("again"));
    assert!(String::from_utf8_lossy(&out.stderr).contains("the name \"pi\" was revoked from this farm"), "{out:?}");

    // An expired token is refused, saying so.
    let short = token(farm, "agent", &["--ttl", "1s"]);
    let expired = wait_until("the token to expire", Duration::from_secs(10), || {
        let out = join(&short, &farm.addr, "late", &tmp.join("late"));
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        err.contains("expired").then_some(err)
    });
    assert!(expired.contains("create a new one with `farm token create`"), "{expired}");
    // A token limited to one use works once.
    let once = token(farm, "agent", &["--uses", "1"]);
    join_ok(&once, &farm.addr, "one", &tmp.join("one"));
    let out = join(&once, &farm.addr, "two", &tmp.join("two"));
    assert!(String::from_utf8_lossy(&out.stderr).contains("has been used as often as it allows"), "{out:?}");

    // A token of another farm (another CA fingerprint) is refused before anything secret is sent.
    let mut parts: Vec<String> = t2.split('.').map(String::from).collect();
    parts[1] = "0".repeat(64);
    let forged = parts.join(".");
    let out = join(&forged, &farm.addr, "mallory", &tmp.join("m"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("does not match the join token's fingerprint"), "{err}");
    assert!(!farm.coordinator.log().contains("mallory"), "the coordinator heard from the forged join");
    // A revoked token is refused.
    let id = t2.split('.').nth(2).unwrap().to_string();
    let mut rv = vec!["token".to_string(), "revoke".into(), id];
    rv.extend(farm.client_args());
    let rv: Vec<&str> = rv.iter().map(String::as_str).collect();
    farm_ok(&rv);
    let out = join(&t2, &farm.addr, "x", &tmp.join("x"));
    assert!(String::from_utf8_lossy(&out.stderr).contains("was revoked"), "{out:?}");

    // A client logs in; its config then finds the farm with no flags. It may not create tokens.
    let home = tmp.join("home");
    std::fs::create_dir_all(&home).unwrap();
    let ct = token(farm, "client", &[]);
    let login = Command::new(farm_bin())
        .args(["login", "--token", &ct, "--coordinator", &farm.addr, "--name", "alice"])
        .env("HOME", &home)
        .env_remove("XDG_CONFIG_HOME")
        .output()
        .unwrap();
    assert!(login.status.success(), "{login:?}");
    let as_alice = |args: &[&str]| {
        Command::new(farm_bin()).args(args).env("HOME", &home).env_remove("XDG_CONFIG_HOME").output().unwrap()
    };
    let out = as_alice(&["builds", "--format", "json"]);
    assert!(out.status.success(), "{out:?}");
    let out = as_alice(&["token", "create", "--role", "agent"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("admin identities only"), "{out:?}");
}

/// `farm agent join` with a token, as `name`, storing the identity in `dir`.
fn join(token: &str, addr: &str, name: &str, dir: &std::path::Path) -> std::process::Output {
    common::farm(&common::join_args(token, addr, name, dir))
}

/// The same, which must succeed; returns stdout.
fn join_ok(token: &str, addr: &str, name: &str, dir: &std::path::Path) -> String {
    let out = join(token, addr, name, dir);
    assert!(out.status.success(), "join as {name} failed: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

fn agent_state(farm: &Farm, name: &str) -> String {
    agent(&agents_json(&farm.addr, &farm.ca), name).unwrap()["state"].as_str().unwrap().to_string()
}
