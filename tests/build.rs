//! End to end, farm's main job: real registry, real coordinator and agents as processes, real
//! buildah, real QEMU. "Native" ARM agents here are x86_64 processes configured as native
//! (`--native linux/arm64 --emulated none`): buildah still runs their RUN steps under QEMU, but
//! the scheduling, the CLI's report and the image are exactly those of a real ARM board.

mod common;

use std::process::Command;
use std::time::Duration;

use common::registry::{read_image, Registry};
use common::*;

const PLATFORMS: &str = "linux/amd64,linux/arm64,linux/arm/v7";

/// Client flags (none: the embedded farm), then the flags that build `context` for `platforms`.
fn build_args(
    farm: Option<&Farm>,
    registry: &Registry,
    base: &str,
    platforms: &str,
    tag: &str,
    context: &std::path::Path,
) -> Vec<String> {
    let mut a = farm.map(Farm::client_args).unwrap_or_default();
    a.extend(registry.build_flags(base, platforms, tag, context));
    a
}

fn assert_hello_image(registry: &Registry, reference: &str) {
    let (digest, media_type, images) = read_image(registry, reference);
    assert_eq!(media_type, shared::oci::OCI_INDEX);
    let platforms: Vec<&str> = images.iter().map(|i| i.platform.as_str()).collect();
    assert_eq!(platforms, ["linux/amd64", "linux/arm64", "linux/arm/v7"], "index {digest}");
    let expected = [("x86_64", "amd64", None), ("aarch64", "arm64", None), ("armv7l", "arm", Some("v7"))];
    for (image, (uname, arch, variant)) in images.iter().zip(expected) {
        assert_eq!(image.text("hello/uname"), uname, "{}", image.platform);
        assert_eq!(image.text("hello/platform"), image.platform);
        assert_eq!(image.config.architecture, arch);
        assert_eq!(image.config.variant.as_deref().filter(|v| *v != "v8"), variant);
        let files = image.text("hello/context-files");
        assert!(files.contains("./hello.sh") && files.contains("./data/message.txt"), "{files}");
        assert!(!files.contains("build.log") && !files.contains("scratch"), ".dockerignore not honoured: {files}");
        assert_eq!(image.text("data/message.txt"), "farm built this");
    }
}

#[test]
fn native_first_dispatch_emulation_fallback_labels_and_incremental_context() {
    let registry = Registry::start();
    let base = registry.seed_busybox();
    let mut farm = Farm::start(3);
    farm.agent("x86", &["--capacity", "2"]);
    farm.agent("pi64", &["--native", "linux/arm64", "--emulated", "none"]);
    farm.agent("pi32", &["--native", "linux/arm/v7", "--emulated", "none"]);
    farm.agent("jetson", &["--native", "linux/arm64", "--emulated", "none", "--label", "gpu=nvidia"]);
    let ctx = example("hello", farm.tmp.path());

    // Each platform runs on a native agent, and the CLI says so.
    let mut args = build_args(Some(&farm), &registry, &base, PLATFORMS, "hello:1", &ctx);
    args.insert(0, "--timings".into());
    let (ok, out, err) = build(&args);
    assert!(ok, "build failed:\n{out}\n{err}");
    // --timings: where each platform's time went, and the index push.
    let header =
        out.lines().find(|l| l.starts_with("PLATFORM") && l.contains("CONTEXT SYNC")).expect("a timings table");
    assert!(
        header.contains("MATERIALISE")
            && header.contains("BUILD")
            && header.contains("EXPORT")
            && header.contains("PUSH")
    );
    assert!(out.contains("index push (stitch): "), "{out}");
    let rows = summary(&out);
    assert_eq!(rows["linux/amd64"], ("x86".into(), "native".into()), "{out}");
    assert!(["pi64", "jetson"].contains(&rows["linux/arm64"].0.as_str()), "{out}");
    assert_eq!(rows["linux/arm64"].1, "native");
    assert_eq!(rows["linux/arm/v7"], ("pi32".into(), "native".into()), "{out}");
    assert!(out.contains(&format!("as {}/hello:1", registry.addr)), "{out}");
    assert_hello_image(&registry, &format!("{}/hello:1", registry.addr));
    // Pushed by digest: the only tag in the repository is the one asked for.
    assert_eq!(registry.tags("hello"), ["1"]);

    // The same context again: no file moves.
    let (ok, out, err) = build(&build_args(Some(&farm), &registry, &base, "linux/amd64", "hello:2", &ctx));
    assert!(ok, "{out}\n{err}");
    assert!(err.contains("uploaded 0 files (0 B)"), "{err}");
    // One file changed: only that file moves.
    std::fs::write(ctx.join("data/message.txt"), "farm built this again\n").unwrap();
    let (ok, out, err) = build(&build_args(Some(&farm), &registry, &base, "linux/amd64", "hello:3", &ctx));
    assert!(ok, "{out}\n{err}");
    assert!(err.contains("uploaded 1 file (22 B)"), "{err}");
    farm.coordinator.wait_for_line(&["context files received", "blobs=1", "bytes=22"], Duration::from_secs(5));

    // A build that requires a label runs only on the agent that has it.
    let mut gpu = build_args(Some(&farm), &registry, &base, "linux/arm64", "cuda:1", &ctx);
    gpu.extend(["--require".into(), "gpu=nvidia".into()]);
    let (ok, out, err) = build(&gpu);
    assert!(ok, "{out}\n{err}");
    assert_eq!(summary(&out)["linux/arm64"], ("jetson".into(), "native".into()), "{out}");

    // Without its native agent, arm/v7 is emulated on the x86 agent, and the CLI says so.
    farm.agents.get_mut("pi32").unwrap().kill();
    farm.wait_agent("pi32", "offline");
    let (ok, out, err) = build(&build_args(Some(&farm), &registry, &base, "linux/arm/v7", "hello:4", &ctx));
    assert!(ok, "{out}\n{err}");
    assert_eq!(summary(&out)["linux/arm/v7"], ("x86".into(), "emulated".into()), "{out}");
    assert!(err.contains("[linux/arm/v7] started on x86 (emulated)"), "{err}");

    // With --emulation never it waits, and says what it waits for (--no-cache: the same inputs
    // were just built, and the result cache would answer at once).
    let mut never =
        vec!["build".to_string(), "--progress".into(), "plain".into(), "--emulation".into(), "never".into()];
    never.push("--no-cache".into());
    never.extend(build_args(Some(&farm), &registry, &base, "linux/arm/v7", "hello:5", &ctx));
    let mut cmd = Command::new(farm_bin());
    cmd.args(&never).env("FARM_LOG", "warn");
    let waiting = Proc::spawn("farm build --emulation never", &mut cmd);
    waiting.wait_for_line(
        &["[linux/arm/v7] waiting for an agent that runs linux/arm/v7 natively", "--emulation never forbids it"],
        Duration::from_secs(30),
    );
    drop(waiting);
    assert!(registry.tags("hello").iter().all(|t| t != "5"));
}

#[test]
fn a_failing_platform_fails_the_build_and_pushes_no_tag() {
    let registry = Registry::start();
    let base = registry.seed_busybox();
    let mut farm = Farm::start(3);
    farm.agent("x86", &["--capacity", "2"]);
    let ctx = farm.tmp.path().join("fails");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(
        ctx.join("Dockerfile"),
        "ARG BASE\nFROM ${BASE}\nARG TARGETARCH\nRUN echo building for $TARGETARCH\nRUN if [ \"$TARGETARCH\" = arm64 ]; then echo about to fail; false; fi\n",
    )
    .unwrap();
    let args = build_args(Some(&farm), &registry, &base, "linux/amd64,linux/arm64", "broken:1", &ctx);
    let (ok, out, err) = build(&args);
    assert!(!ok, "the build must fail:\n{out}\n{err}");
    // The builder's own error line names the failing step, not just an exit status.
    assert!(err.contains("linux/arm64 failed: building at STEP \"RUN if ["), "{err}");
    assert!(!err.contains("exit status: 1)"), "{err}");
    assert!(err.contains("last log lines of linux/arm64:") && err.contains("about to fail"), "{err}");
    assert!(err.contains("no tag was pushed"), "{err}");
    assert!(registry.tags("broken").is_empty(), "no tag may be pushed: {:?}", registry.tags("broken"));

    // `farm logs` of it, by a short prefix of its id, ends with the outcome and fails.
    let id = farm.builds()[0]["id"].as_str().unwrap().to_string();
    let mut logs = vec!["logs".to_string(), id[..6].to_string()];
    logs.extend(farm.client_args());
    let logs: Vec<&str> = logs.iter().map(String::as_str).collect();
    let out = common::farm(&logs);
    let (so, se) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "{so}\n{se}");
    assert!(so.contains("[linux/arm64] about to fail"), "{so}");
    assert!(se.starts_with(&format!("build {id} failed: linux/arm64 failed: building at STEP \"RUN if [")), "{se}");
}

#[test]
fn with_no_coordinator_configured_the_farm_runs_inside_the_cli() {
    let registry = Registry::start();
    let base = registry.seed_busybox();
    let home = tempfile::tempdir().unwrap();
    let ctx = example("hello", home.path());
    let args = build_args(None, &registry, &base, PLATFORMS, "embedded:1", &ctx);
    let out = embedded_build(home.path(), &args);
    let (so, se) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{so}\n{se}");
    assert!(
        se.starts_with("no coordinator configured or reachable: building on this machine (embedded farm)\n"),
        "{se}"
    );
    let rows = summary(&so);
    assert_eq!(rows["linux/amd64"], ("local".into(), "native".into()));
    assert_eq!(rows["linux/arm64"].1, "emulated");
    assert_hello_image(&registry, &format!("{}/embedded:1", registry.addr));
}
