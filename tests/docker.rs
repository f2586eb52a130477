//! End to end with the Docker builder: a real Docker Engine (Debian's dockerd 20.10, started by
//! the test in its own directory), a buildah agent beside it for comparison, a real registry.
//! RUN steps for arm64 and arm/v7 run under QEMU inside the engine (binfmt handlers with flag F).

mod common;

use std::process::Command;
use std::time::Duration;

use common::docker::Engine;
use common::registry::{read_image, PlatformImage, Registry};
use common::*;

const PLATFORMS: &str = "linux/amd64,linux/arm64,linux/arm/v7";

fn build_on(
    farm: &Farm,
    registry: &Registry,
    base: &str,
    builder: &str,
    platforms: &str,
    tag: &str,
    ctx: &std::path::Path,
) -> Vec<String> {
    let mut a = farm.client_args();
    a.extend(["--require".into(), format!("builder={builder}")]);
    a.extend(registry.build_flags(base, platforms, tag, ctx));
    a
}

/// Every file under `dir` (not following symlinks) that contains `needle`.
fn files_containing(dir: &std::path::Path, needle: &str) -> Vec<String> {
    let out = Command::new("grep").args(["-rlaF", "--no-messages", needle]).arg(dir).output().unwrap();
    String::from_utf8_lossy(&out.stdout).lines().map(String::from).collect()
}

/// PIDs of processes whose command line contains `needle`.
fn processes(needle: &str) -> Vec<u32> {
    let me = std::process::id();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != me)
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            String::from_utf8_lossy(&cmdline).replace('\0', " ").contains(needle)
        })
        .collect()
}

fn no_task_tags(engine: &Engine) {
    let images = engine.images();
    assert!(images.iter().all(|i| !i.contains("farm-task")), "per-task tags left in the engine: {images:?}");
}

fn same_image(docker: &PlatformImage, buildah: &PlatformImage) {
    assert_eq!(docker.platform, buildah.platform);
    // arm64's variant v8 is implied: buildah keeps the base image's, BuildKit leaves it out.
    let platform = |i: &PlatformImage| {
        let c = &i.config;
        (c.os.clone(), c.architecture.clone(), c.variant.clone().filter(|v| v != "v8"))
    };
    assert_eq!(platform(docker), platform(buildah));
    let names = |i: &PlatformImage| i.files.keys().cloned().collect::<Vec<_>>();
    assert_eq!(names(docker), names(buildah), "{}: the same files in the layers", docker.platform);
    for (path, bytes) in &docker.files {
        assert_eq!(bytes, &buildah.files[path], "{}: {path} differs", docker.platform);
    }
}

#[test]
fn the_docker_builder_builds_like_buildah_leaves_no_tag_keeps_secrets_and_cancels() {
    require_tool("buildah");
    let registry = Registry::start();
    let base = registry.seed_busybox();
    let engine = Engine::start();
    let version: serde_json::Value = serde_json::from_str(&engine.api("/version").unwrap()).unwrap();
    let mut farm = Farm::start(3);

    // The agent reports its builder and version, and carries the label builder=docker.
    let dock = farm.agent("dock", &["--builder", "docker", "--docker-host", &engine.host, "--capacity", "2"]);
    assert_eq!(dock["builder"], "docker");
    assert_eq!(dock["builder_version"], version["Version"]);
    assert_eq!(dock["labels"]["builder"], "docker");
    let bah = farm.agent("bah", &["--builder", "buildah", "--capacity", "2"]);
    assert_eq!((bah["builder"].as_str(), bah["labels"]["builder"].as_str()), (Some("buildah"), Some("buildah")));

    // Without buildah on PATH, an agent picks the engine DOCKER_HOST names by itself.
    farm.ca.issue("agent", "auto");
    let empty = farm.tmp.path().join("empty-path");
    std::fs::create_dir_all(&empty).unwrap();
    let work = farm.tmp.path().join("agent-auto");
    let mut cmd = Command::new(farm_bin());
    cmd.args(["agent", "--coordinator", &farm.addr, "--ca-dir", farm.ca.path(), "--name", "auto", "--work-dir"])
        .arg(&work)
        .env("PATH", &empty)
        .env("DOCKER_HOST", &engine.host)
        .env("FARM_LOG", "info");
    let auto = Proc::spawn("agent auto", &mut cmd);
    let listed = farm.wait_agent("auto", "online");
    assert_eq!((listed["builder"].as_str(), listed["labels"]["builder"].as_str()), (Some("docker"), Some("docker")));
    drop(auto);

    // (a) examples/hello for three platforms on each builder: the same platforms, the same files.
    let ctx = example("hello", farm.tmp.path());
    let mut args = build_on(&farm, &registry, &base, "docker", PLATFORMS, "hello:docker", &ctx);
    args.insert(0, "--timings".into());
    let (ok, out, err) = build(&args);
    assert!(ok, "docker build failed:\n{out}\n{err}\n{}", farm.agents["dock"].log());
    // Phase timings as with buildah: every phase of every platform has a time.
    for p in PLATFORMS.split(',') {
        let table = out.split("CONTEXT SYNC").nth(1).unwrap_or_default();
        let row = table.lines().find(|l| l.starts_with(p)).unwrap_or_default();
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert!(cells.len() == 7 && cells[1..].iter().all(|c| c.ends_with('s') && c != &"-"), "{p}: {out}");
    }
    let rows = summary(&out);
    assert_eq!(rows.len(), 3, "{out}");
    assert!(rows.values().all(|(agent, _)| agent == "dock"), "--require builder=docker builds on dock: {out}");
    assert!(err.contains("exporting to image"), "BuildKit's plain progress is streamed: {err}");
    let (ok, out, err) = build(&build_on(&farm, &registry, &base, "buildah", PLATFORMS, "hello:buildah", &ctx));
    assert!(ok, "buildah build failed:\n{out}\n{err}");
    assert!(summary(&out).values().all(|(agent, _)| agent == "bah"), "{out}");
    let (_, media_type, docker) = read_image(&registry, &format!("{}/hello:docker", registry.addr));
    assert_eq!(media_type, shared::oci::OCI_INDEX);
    let (_, _, buildah) = read_image(&registry, &format!("{}/hello:buildah", registry.addr));
    let platforms: Vec<&str> = docker.iter().map(|i| i.platform.as_str()).collect();
    assert_eq!(platforms, ["linux/amd64", "linux/arm64", "linux/arm/v7"]);
    for (d, b) in docker.iter().zip(&buildah) {
        same_image(d, b);
    }
    for (image, uname) in docker.iter().zip(["x86_64", "aarch64", "armv7l"]) {
        assert_eq!(image.text("hello/uname"), uname);
        assert_eq!(image.text("hello/platform"), image.platform);
    }
    // Pushed by digest: no tag but the user's, in the registry or in the engine.
    let mut tags = registry.tags("hello");
    tags.sort();
    assert_eq!(tags, ["buildah", "docker"]);
    no_task_tags(&engine);

    // (c) A secret reaches its RUN, and no layer, log or file of the agent or the engine.
    let secret = format!("s3cret-{}-{}", std::process::id(), farm.port);
    let secret_file = farm.tmp.path().join("token.txt");
    std::fs::write(&secret_file, &secret).unwrap();
    let sctx = farm.tmp.path().join("secret-ctx");
    std::fs::create_dir_all(&sctx).unwrap();
    std::fs::write(
        sctx.join("Dockerfile"),
        "ARG BASE\nFROM ${BASE}\nRUN --mount=type=secret,id=api sha256sum /run/secrets/api | cut -d' ' -f1 > /secret-hash && echo used the secret\n",
    )
    .unwrap();
    let mut args = build_on(&farm, &registry, &base, "docker", "linux/amd64,linux/arm64", "secrets:1", &sctx);
    args.extend(["--secret".into(), format!("id=api,src={}", secret_file.display())]);
    let (ok, out, err) = build(&args);
    assert!(ok, "{out}\n{err}");
    assert!(err.contains("used the secret"), "{err}");
    let (_, _, images) = read_image(&registry, &format!("{}/secrets:1", registry.addr));
    assert_eq!(images.len(), 2);
    for image in &images {
        assert_eq!(image.text("secret-hash"), shared::digest::sha256_hex(secret.as_bytes()), "{}", image.platform);
        for (path, bytes) in &image.files {
            assert!(!bytes.windows(secret.len()).any(|w| w == secret.as_bytes()), "secret in layer file {path}");
        }
    }
    assert!(!out.contains(&secret) && !err.contains(&secret));
    assert!(!farm.agents["dock"].log().contains(&secret) && !engine.log().contains(&secret));
    for dir in [farm.tmp.path().join("agent-dock"), farm.tmp.path().join("coordinator"), engine.dir.path().join("data")]
    {
        let found = files_containing(&dir, &secret);
        assert!(found.is_empty(), "the secret is in {found:?}");
    }
    assert_eq!(registry.tags("secrets"), ["1"]);
    no_task_tags(&engine);

    // (b) Cancel mid-RUN: the RUN process goes, nothing is pushed, no tag is left.
    let marker = 86000 + std::process::id() % 1000;
    let cctx = farm.tmp.path().join("cancel-ctx");
    std::fs::create_dir_all(&cctx).unwrap();
    std::fs::write(
        cctx.join("Dockerfile"),
        format!("ARG BASE\nFROM ${{BASE}}\nRUN echo run-started && sleep {marker}\n"),
    )
    .unwrap();
    let mut submit = vec!["build".to_string(), "--wait=false".into()];
    submit.extend(build_on(&farm, &registry, &base, "docker", "linux/amd64", "cancelled:1", &cctx));
    let submit: Vec<&str> = submit.iter().map(String::as_str).collect();
    let id = farm_ok(&submit).trim().to_string();
    let sleeping = format!("sleep {marker}");
    wait_until("the RUN to be running in the engine", Duration::from_secs(60), || {
        (!processes(&sleeping).is_empty()).then_some(())
    });
    let mut cancel = vec!["cancel".to_string(), id.clone()];
    cancel.extend(farm.client_args());
    let cancel: Vec<&str> = cancel.iter().map(String::as_str).collect();
    assert!(farm_ok(&cancel).contains("cancelled"));
    assert_eq!(farm.wait_build_end(&id, Duration::from_secs(20))["state"], "cancelled");
    wait_until("the RUN to be killed", Duration::from_secs(20), || processes(&sleeping).is_empty().then_some(()));
    farm.agents["dock"].wait_for_line(&["task stopped"], Duration::from_secs(20));
    assert!(registry.tags("cancelled").is_empty(), "{:?}", registry.tags("cancelled"));
    no_task_tags(&engine);

    // `farm agent prune` empties the engine's build cache.
    let cache = |e: &Engine| -> u64 {
        let df: serde_json::Value = serde_json::from_str(&e.api("/system/df").unwrap()).unwrap();
        df["BuilderSize"].as_u64().unwrap()
    };
    assert!(cache(&engine) > 0, "builds leave a layer cache");
    farm.agents.get_mut("dock").unwrap().kill();
    let work = farm.tmp.path().join("agent-dock");
    let out = farm_ok(&[
        "agent",
        "prune",
        "--work-dir",
        work.to_str().unwrap(),
        "--builder",
        "docker",
        "--docker-host",
        &engine.host,
    ]);
    assert!(out.starts_with("freed ") && !out.starts_with("freed 0 B"), "{out}");
    assert_eq!(cache(&engine), 0);
    assert!(engine.images().is_empty(), "{:?}", engine.images());
}

#[test]
fn an_agent_told_to_use_docker_without_an_engine_says_how_to_fix_it() {
    let farm = Farm::start(3);
    farm.ca.issue("agent", "nodock");
    let missing = farm.tmp.path().join("no.sock");
    let out = Command::new(farm_bin())
        .args([
            "agent",
            "--coordinator",
            &farm.addr,
            "--ca-dir",
            farm.ca.path(),
            "--name",
            "nodock",
            "--builder",
            "docker",
        ])
        .arg("--work-dir")
        .arg(farm.tmp.path().join("w"))
        .arg("--docker-host")
        .arg(format!("unix://{}", missing.display()))
        .env("FARM_LOG", "warn")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("no Docker Engine answers at unix://{}", missing.display()))
            && err.contains("`docker_host` (--docker-host, or DOCKER_HOST)"),
        "{err}"
    );
    let out = Command::new(farm_bin())
        .args(["agent", "--builder", "podman", "--ca-dir", farm.ca.path(), "--name", "nodock"])
        .env("FARM_LOG", "warn")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown builder \"podman\": expected buildah, docker or auto"), "{err}");

    // Neither buildah nor an engine: the error names both fixes.
    let out = Command::new(farm_bin())
        .args(["agent", "--coordinator", &farm.addr, "--ca-dir", farm.ca.path(), "--name", "nodock"])
        .arg("--work-dir")
        .arg(farm.tmp.path().join("w"))
        .env("PATH", farm.tmp.path())
        .env("DOCKER_HOST", format!("unix://{}", missing.display()))
        .env("FARM_LOG", "warn")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no builder on this machine: buildah is not installed")
            && err.contains(&format!("no Docker Engine answers at unix://{}", missing.display()))
            && err.contains("Install buildah (`deploy/install.sh`), or start Docker / set `docker_host`"),
        "{err}"
    );
}

/// BuildKit runs each RUN in its own namespaces: it sees only its own processes and, with the
/// engine's default network (here the engine has no bridge), not the host's loopback services.
#[test]
fn a_docker_run_sees_only_its_own_processes_and_not_the_host_loopback() {
    require_tool("buildah");
    let registry = Registry::start();
    let base = registry.seed_busybox();
    let engine = Engine::start();
    let mut farm = Farm::start(3);
    farm.agent("dock", &["--builder", "docker", "--docker-host", &engine.host]);
    // A service on the host's loopback the RUN must not reach.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let served = std::thread::spawn(move || {
        use std::io::Write as _;
        listener.set_nonblocking(false).unwrap();
        // Any connection gets an answer; the test asserts the RUN never got one.
        for mut s in listener.incoming().flatten() {
            let _ = s.write_all(b"HTTP/1.0 200 OK\r\n\r\nhost-loopback-answer");
        }
    });
    drop(served);
    let ctx = farm.tmp.path().join("probe");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(
        ctx.join("Dockerfile"),
        "ARG BASE\nFROM ${BASE}\nARG PORT\nRUN (echo processes:; ps -o pid,args; grep CapEff /proc/self/status; \
         timeout 3 wget -q -O - http://127.0.0.1:$PORT/ && echo loopback: REACHED || echo loopback: refused) \
         > /probe.txt 2>&1; cat /probe.txt\n",
    )
    .unwrap();
    let mut args = farm.client_args();
    args.extend(["--build-arg".into(), format!("PORT={port}")]);
    args.extend(registry.build_flags(&base, "linux/amd64", "probe:1", &ctx));
    let (ok, out, err) = build(&args);
    assert!(ok, "{out}\n{err}\n{}", farm.agents["dock"].log());
    let (_, _, images) = read_image(&registry, &format!("{}/probe:1", registry.addr));
    let seen = images[0].text("probe.txt");
    eprintln!("the RUN saw:\n{seen}");
    assert!(seen.contains("loopback: refused") && !seen.contains("host-loopback-answer"), "{seen}");
    let processes: Vec<&str> = seen.lines().skip(2).take_while(|l| !l.starts_with("CapEff")).collect();
    assert!(!processes.is_empty() && processes.len() <= 4, "{seen}");
    for p in processes {
        assert!(p.contains("/bin/sh -c") || p.contains("ps -o") || p.contains("{ps}"), "not the RUN's own: {p}");
    }
    let line = seen.lines().find(|l| l.starts_with("CapEff:")).unwrap();
    let caps = u64::from_str_radix(line["CapEff:".len()..].trim(), 16).unwrap();
    assert_eq!(caps & ((1 << 21) | (1 << 19)), 0, "CAP_SYS_ADMIN or CAP_SYS_PTRACE in {caps:x}");
}
