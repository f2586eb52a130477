//! End to end: the cross-compile pattern. A `FROM --platform=$BUILDPLATFORM` stage runs natively
//! on the x86_64 agent for every target platform (BUILDPLATFORM the agent's, TARGETPLATFORM the
//! task's), and only the last stage runs as the target (under QEMU for arm64 and arm/v7), with
//! buildah (farm builds that stage natively itself) and with the Docker Engine (BuildKit does).

mod common;

use std::path::Path;
use std::process::Command;

use common::registry::{read_image, PlatformImage, Registry};
use common::*;

const PLATFORMS: &str = "linux/amd64,linux/arm64,linux/arm/v7";

/// The build stage records where it ran, then spins a shell loop (~0.3 s of CPU natively, ~10x
/// that under QEMU) and records its wall time (ms, from /proc/uptime) and CPU time (`times`).
pub const DOCKERFILE: &str = r#"ARG BASE
FROM --platform=$BUILDPLATFORM ${BASE} AS build
ARG TARGETPLATFORM BUILDPLATFORM
RUN mkdir /out && echo "$(uname -m) $BUILDPLATFORM $TARGETPLATFORM" > /out/build.txt \
 && read s _ < /proc/uptime && i=0 && while [ $i -lt 300000 ]; do i=$((i+1)); done \
 && read e _ < /proc/uptime && echo $(( (${e%.*}${e#*.} - ${s%.*}${s#*.}) * 10 )) > /out/build-ms \
 && times > /out/build-cpu
FROM ${BASE}
COPY --from=build /out /out
RUN uname -m > /out/final.txt
"#;

/// Seconds from busybox `times`' first field (`0m0.210s`).
fn cpu_secs(times: &str) -> f64 {
    let field = times.split_whitespace().next().unwrap_or_else(|| panic!("no times in {times:?}"));
    let (m, s) = field.trim_end_matches('s').split_once('m').unwrap_or_else(|| panic!("times {field:?}"));
    m.parse::<f64>().unwrap() * 60.0 + s.parse::<f64>().unwrap()
}

/// Builds the cross-compile Dockerfile for three platforms on `farm`'s one agent (`builder`) and
/// checks every platform's image, a pull of each by tag, and the build stage's times.
fn cross_compile(farm: &Farm, registry: &Registry, base: &str, builder: &str) {
    let ctx = farm.tmp.path().join("xbuild");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(ctx.join("Dockerfile"), DOCKERFILE).unwrap();
    let tag = format!("xbuild:{builder}");
    let mut args = farm.client_args();
    args.extend(registry.build_flags(base, PLATFORMS, &tag, &ctx));
    let (ok, out, err) = build(&args);
    assert!(ok, "{builder} build failed:\n{out}\n{err}\n{}", farm.agents.values().next().unwrap().log());
    let rows = summary(&out);
    assert_eq!(rows.len(), 3, "{out}");
    if builder == "buildah" {
        for p in ["linux/arm64", "linux/arm/v7"] {
            let said =
                format!("[{p}] farm: stage \"build\" runs natively on linux/amd64 (FROM --platform=$BUILDPLATFORM)");
            assert!(err.contains(&said), "{err}");
        }
        assert!(!err.contains("ignores `FROM --platform"), "{err}");
    }

    let (_, _, images) = read_image(registry, &format!("{}/{tag}", registry.addr));
    let platforms: Vec<&str> = images.iter().map(|i| i.platform.as_str()).collect();
    assert_eq!(platforms, ["linux/amd64", "linux/arm64", "linux/arm/v7"]);
    let mut times: Vec<(String, u64, f64)> = Vec::new();
    for (image, uname) in images.iter().zip(["x86_64", "aarch64", "armv7l"]) {
        assert_eq!(image.text("out/build.txt"), format!("x86_64 linux/amd64 {}", image.platform), "{builder}");
        assert_eq!(image.text("out/final.txt"), uname, "{builder} {}", image.platform);
        let ms: u64 = image.text("out/build-ms").parse().unwrap();
        times.push((image.platform.clone(), ms, cpu_secs(&image.text("out/build-cpu"))));
    }
    for (platform, ms, cpu) in &times {
        println!("{builder}: build stage for {platform:<12} {ms:>6} ms wall, {cpu:.2} s CPU");
    }
    // Natively everywhere: under QEMU the loop costs ~10x the CPU.
    let native_cpu = times[0].2.max(0.05);
    for (platform, ms, cpu) in &times[1..] {
        assert!(
            *cpu < 2.0 * native_cpu,
            "{builder}: {platform}'s build stage took {cpu} s CPU vs {native_cpu} s native"
        );
        println!(
            "{builder}: {platform} build stage / native: {:.2}x CPU, {:.2}x wall",
            cpu / native_cpu,
            *ms as f64 / times[0].1.max(1) as f64
        );
    }

    // A real client pulls each platform by tag, and it runs as that platform.
    for (image, uname) in images.iter().zip(["x86_64", "aarch64", "armv7l"]) {
        assert_eq!(pull_and_run(farm.tmp.path(), registry, &tag, image), uname, "{builder} {}", image.platform);
    }
}

/// `buildah pull --platform` of `tag` in a private store, then `uname -m` in a container of it.
fn pull_and_run(tmp: &Path, registry: &Registry, tag: &str, image: &PlatformImage) -> String {
    let store = tmp.join(format!("pull-{}", image.platform.replace('/', "-")));
    let buildah = |args: &[&str]| {
        let out = Command::new("buildah")
            .arg("--root")
            .arg(store.join("storage"))
            .arg("--runroot")
            .arg(store.join("run"))
            .args(["--storage-driver", "vfs"])
            .args(args)
            .env("BUILDAH_ISOLATION", "chroot")
            .output()
            .unwrap();
        let (so, se) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "buildah {args:?}: {so}\n{se}");
        so.trim().to_string()
    };
    let reference = format!("docker://{}/{tag}", registry.addr);
    buildah(&["pull", "--quiet", "--tls-verify=false", "--platform", &image.platform, &reference]);
    let container = buildah(&["from", "--pull=never", &format!("{}/{tag}", registry.addr)]);
    let uname = buildah(&["run", &container, "uname", "-m"]);
    buildah(&["rm", "--all"]);
    buildah(&["rmi", "--all", "--force"]);
    let _ = std::fs::remove_dir_all(&store);
    uname
}

#[test]
fn build_platform_stages_run_natively_with_buildah() {
    require_tool("buildah");
    let registry = Registry::start();
    let base = registry.seed_busybox();
    let mut farm = Farm::start(3);
    farm.agent("x86", &["--capacity", "3"]);
    cross_compile(&farm, &registry, &base, "buildah");
}

#[test]
fn build_platform_stages_run_natively_with_docker() {
    require_tool("buildah");
    let registry = Registry::start();
    let base = registry.seed_busybox();
    let engine = common::docker::Engine::start();
    let mut farm = Farm::start(3);
    farm.agent("dock", &["--builder", "docker", "--docker-host", &engine.host, "--capacity", "3"]);
    cross_compile(&farm, &registry, &base, "docker");
}
