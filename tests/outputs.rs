//! End to end, `-o type=oci|local|tar`, `--load`, `--metadata-file` and `--iidfile`: a build whose
//! tags name no registry pushes nothing anywhere (the base image's registry keeps its catalog);
//! the results come back through the coordinator and the CLI writes them, readable by skopeo
//! and buildah.

mod common;

use std::path::Path;
use std::process::Command;

use common::registry::{read_image, Registry};
use common::*;

const PLATFORMS: &str = "linux/amd64,linux/arm64,linux/arm/v7";

/// `farm build` flags for examples/hello on the seeded base, with no registry tag.
fn flags(registry: &Registry, base: &str, platforms: &str, extra: &[&str], ctx: &Path) -> Vec<String> {
    let mut a: Vec<String> =
        ["--platform", platforms, "--insecure-registry", &registry.addr].iter().map(|s| s.to_string()).collect();
    a.extend(["--build-arg".to_string(), format!("BASE={base}")]);
    a.extend(extra.iter().map(|s| s.to_string()));
    a.push(ctx.to_str().unwrap().to_string());
    a
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    let (so, se) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{cmd:?} failed:\n{so}\n{se}");
    so.into_owned()
}

/// The archive holds one index of three platforms; copied into a second registry with skopeo,
/// each platform's image says it was built for that platform, and buildah pulls and runs each.
fn check_archive(archive: &Path, second: &Registry, repo: &str) -> String {
    let raw = run_ok(Command::new("skopeo").args(["inspect", "--raw", &format!("oci-archive:{}", archive.display())]));
    let index: serde_json::Value = serde_json::from_str(&raw).unwrap();
    let platforms: Vec<String> = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let p = &m["platform"];
            let mut s = format!("{}/{}", p["os"].as_str().unwrap(), p["architecture"].as_str().unwrap());
            if let Some(v) = p["variant"].as_str() {
                s += &format!("/{v}");
            }
            s
        })
        .collect();
    assert_eq!(platforms, ["linux/amd64", "linux/arm64", "linux/arm/v7"], "{raw}");
    let dest = format!("docker://{}/{repo}:1", second.addr);
    run_ok(Command::new("skopeo").args([
        "copy",
        "--all",
        "--quiet",
        "--dest-tls-verify=false",
        &format!("oci-archive:{}", archive.display()),
        &dest,
    ]));
    let (digest, _, images) = read_image(second, &format!("{}/{repo}:1", second.addr));
    let expected = [("linux/amd64", "x86_64"), ("linux/arm64", "aarch64"), ("linux/arm/v7", "armv7l")];
    for (image, (platform, uname)) in images.iter().zip(expected) {
        assert_eq!(image.platform, platform);
        assert_eq!(image.text("hello/uname"), uname, "{platform}");
        assert_eq!(image.text("hello/platform"), platform);
        assert_eq!(image.text("data/message.txt"), "farm built this");
    }
    // A real client pulls each platform from the second registry and runs it.
    let (_store, conf) = private_storage();
    let reference = format!("{}/{repo}:1", second.addr);
    let buildah = |args: &[&str]| run_ok(Command::new("buildah").args(args).env("CONTAINERS_STORAGE_CONF", &conf));
    for (platform, uname) in expected {
        buildah(&["pull", "--quiet", "--tls-verify=false", "--platform", platform, &reference]);
        let ctr = buildah(&["from", "--pull-never", "--platform", platform, &reference]).trim().to_string();
        assert_eq!(buildah(&["run", "--isolation", "chroot", &ctr, "uname", "-m"]).trim(), uname, "{platform}");
        buildah(&["rm", &ctr]);
        buildah(&["rmi", "--all", "--force"]);
    }
    digest.to_string()
}

#[test]
fn oci_local_load_and_metadata_without_a_registry() {
    require_tool("skopeo");
    require_tool("buildah");
    let registry = Registry::start();
    let base = registry.seed_busybox();
    let catalog = registry.catalog();
    let second = Registry::start();
    let mut farm = Farm::start(3);
    farm.agent("x86", &["--capacity", "2"]);
    farm.agent("pi64", &["--native", "linux/arm64", "--emulated", "none"]);
    farm.agent("pi32", &["--native", "linux/arm/v7", "--emulated", "none"]);
    let ctx = example("hello", farm.tmp.path());
    let out_dir = tempfile::tempdir().unwrap();
    let archive = out_dir.path().join("out.tar");
    let meta = out_dir.path().join("m.json");
    let iid = out_dir.path().join("iid");

    // -o type=oci with a tag that names no registry: nothing pushed, an archive of the index.
    let oci = format!("type=oci,dest={}", archive.display());
    let mut args = farm.client_args();
    let extra =
        ["-o", &oci, "-t", "hello:1", "--metadata-file", meta.to_str().unwrap(), "--iidfile", iid.to_str().unwrap()];
    args.extend(flags(&registry, &base, PLATFORMS, &extra, &ctx));
    let (ok, out, err) = build(&args);
    assert!(ok, "{out}\n{err}");
    assert!(err.contains(&format!("wrote {} (OCI layout, 3 platforms)", archive.display())), "{err}");
    assert!(out.contains("(pushed to no registry)"), "{out}");
    assert_eq!(registry.catalog(), catalog, "the build pushed something");
    let copied = check_archive(&archive, &second, "x");

    // The metadata file, read as a CI script would: the index digest (the same the archive and
    // the registry it was copied to hold), and each platform's manifest as the index lists it.
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(&meta).unwrap()).unwrap();
    let digest = m["containerimage.digest"].as_str().unwrap().to_string();
    assert_eq!(digest, copied);
    assert_eq!(std::fs::read_to_string(&iid).unwrap(), digest);
    assert_eq!(m["containerimage.descriptor"]["digest"], digest);
    assert_eq!(m["image.name"], "hello:1");
    assert!(
        m["farm.build.ref"].as_str().is_some_and(|r| !r.is_empty()) && m["farm.build.ref"] == m["buildx.build.ref"]
    );
    let (_, _, images) = read_image(&second, &format!("{}/x:1", second.addr));
    for image in &images {
        let p = &m["farm.platforms"][&image.platform];
        assert_eq!(p["digest"], image.digest.to_string(), "{}", image.platform);
        assert_eq!(p["mode"], "native");
        assert_eq!(p["builder"], "buildah");
        assert!(p["timingsMs"]["build"].is_u64(), "{p}");
    }
    println!("oci: {} platforms in {}, index {digest}", images.len(), archive.display());

    // -o type=local: each platform's root filesystem (answered from the result cache this time:
    // the results are still in the coordinator's store).
    let local = out_dir.path().join("rootfs");
    let dest = format!("type=local,dest={}", local.display());
    let mut args = farm.client_args();
    args.extend(flags(&registry, &base, PLATFORMS, &["-o", &dest], &ctx));
    let (ok, out, err) = build(&args);
    assert!(ok, "{out}\n{err}");
    for (dir, platform, uname) in [
        ("linux_amd64", "linux/amd64", "x86_64"),
        ("linux_arm64", "linux/arm64", "aarch64"),
        ("linux_arm_v7", "linux/arm/v7", "armv7l"),
    ] {
        let read = |f: &str| std::fs::read_to_string(local.join(dir).join(f)).unwrap().trim().to_string();
        assert_eq!(read("hello/platform"), platform);
        assert_eq!(read("hello/uname"), uname);
        assert!(local.join(dir).join("bin/busybox").exists(), "{dir} has no base image files");
    }
    assert_eq!(registry.catalog(), catalog);

    // A registry build: containerimage.digest is what the registry serves for the tag.
    let mut args = farm.client_args();
    args.extend(registry.build_flags(&base, "linux/amd64", "pushed:1", &ctx));
    args.extend(["--metadata-file".into(), meta.to_str().unwrap().into()]);
    let (ok, out, err) = build(&args);
    assert!(ok, "{out}\n{err}");
    let (served, _, images) = read_image(&registry, &format!("{}/pushed:1", registry.addr));
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(&meta).unwrap()).unwrap();
    assert_eq!(m["containerimage.digest"], served.to_string());
    assert_eq!(m["farm.platforms"]["linux/amd64"]["digest"], images[0].digest.to_string());
    // As a CI step reads it: jq, no scraping of the human output.
    require_tool("jq");
    let script = r#"set -eu
digest=$(jq -r '."containerimage.digest"' "$1")
amd64=$(jq -r '."farm.platforms"."linux/amd64".digest' "$1")
echo "$digest $amd64""#;
    let ci = run_ok(Command::new("bash").args(["-c", script, "ci-step"]).arg(&meta));
    assert_eq!(ci.trim(), format!("{served} {}", images[0].digest));

    // --load into a private containers-storage: buildah runs the native image from it.
    let (_store, conf) = private_storage();
    let mut full = vec!["build".to_string(), "--progress".into(), "plain".into()];
    full.extend(farm.client_args());
    full.extend(flags(&registry, &base, PLATFORMS, &["--load", "-t", "hello:load"], &ctx));
    let out = Command::new(farm_bin()).args(&full).env("CONTAINERS_STORAGE_CONF", &conf).output().unwrap();
    let (so, se) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{so}\n{se}");
    assert!(
        se.contains(
            "loaded linux/amd64 as docker.io/library/hello:load into containers-storage (podman, buildah) (this \
             machine's platform; the others are not loaded)"
        ),
        "{se}"
    );
    let buildah = |args: &[&str]| {
        run_ok(Command::new("buildah").args(args).env("CONTAINERS_STORAGE_CONF", &conf)).trim().to_string()
    };
    let ctr = buildah(&["from", "--pull-never", "hello:load"]);
    assert_eq!(buildah(&["run", "--isolation", "chroot", &ctr, "cat", "/hello/uname"]), "x86_64");
    buildah(&["rm", &ctr]);
    buildah(&["rmi", "--all", "--force"]);
    // Only the registry build pushed anything.
    let mut with_pushed = catalog.clone();
    with_pushed.push("pushed".into());
    assert_eq!(registry.catalog(), with_pushed);
}

#[test]
fn the_embedded_farm_writes_an_oci_archive_without_a_registry() {
    require_tool("skopeo");
    let registry = Registry::start();
    let base = registry.seed_busybox();
    let catalog = registry.catalog();
    let second = Registry::start();
    let home = tempfile::tempdir().unwrap();
    let ctx = example("hello", home.path());
    let archive = home.path().join("app.tar");
    let oci = format!("type=oci,dest={}", archive.display());
    let out = embedded_build(home.path(), &flags(&registry, &base, PLATFORMS, &["-o", &oci, "-t", "hello:1"], &ctx));
    let (so, se) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{so}\n{se}");
    assert!(se.starts_with("no coordinator configured or reachable: building on this machine (embedded farm)\n"));
    assert_eq!(registry.catalog(), catalog, "the build pushed something");
    let digest = check_archive(&archive, &second, "embedded");
    println!("embedded: 3 platforms in {}, index {digest}", archive.display());
}
