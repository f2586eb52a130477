//! End to end, `--annotation` (buildx's `index:`, `manifest[PLATFORM]:` and
//! `manifest-descriptor[...]:` prefixes) and `--label` on a three-platform build pushed to a
//! registry, then `farm imagetools inspect` (text and JSON) on what the registry serves; the same
//! into an `-o type=oci` archive, and with the Docker builder.

mod common;

use std::process::Command;

use common::registry::Registry;
use common::*;
use shared::oci::{self, ImageRef};
use shared::Digest;

const PLATFORMS: &str = "linux/amd64,linux/arm64,linux/arm/v7";
const SOURCE: &str = "https://example.test/app";

/// One platform as served: platform, manifest digest, manifest JSON, config JSON.
type Served = (String, Digest, serde_json::Value, serde_json::Value);

/// What the registry serves for `reference`: the index bytes and, per platform, the manifest's
/// digest, its JSON and its config's JSON.
fn served(registry: &Registry, reference: &str) -> (Digest, serde_json::Value, Vec<Served>) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let client = registry.client();
        let r: ImageRef = reference.parse().unwrap();
        let (bytes, _, digest) = client.fetch_manifest(&r).await.unwrap();
        let mut out = Vec::new();
        for d in oci::parse_index(&bytes).unwrap() {
            // Provenance's attestation manifests are no platform's image (see provenance.rs).
            if d.annotations.contains_key("vnd.docker.reference.type") {
                continue;
            }
            let (m, _, _) = client.fetch_manifest(&r.with_digest(&d.digest)).await.unwrap();
            let m: serde_json::Value = serde_json::from_slice(&m).unwrap();
            let config: Digest = m["config"]["digest"].as_str().unwrap().parse().unwrap();
            let config: serde_json::Value =
                serde_json::from_slice(&client.fetch_blob(&r, &config).await.unwrap()).unwrap();
            out.push((d.platform.unwrap().to_string(), d.digest, m, config));
        }
        (digest, serde_json::from_slice(&bytes).unwrap(), out)
    })
}

fn farm_out(args: &[String]) -> (bool, String, String) {
    let out = Command::new(farm_bin()).args(args).env("FARM_LOG", "warn").output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn annotations_and_labels_land_where_buildx_puts_them_and_imagetools_shows_them() {
    require_tool("buildah");
    let registry = Registry::start();
    let base = registry.seed_busybox();
    let mut farm = Farm::start(3);
    farm.agent("x86", &["--capacity", "2"]);
    farm.agent("pi64", &["--native", "linux/arm64", "--emulated", "none"]);
    farm.agent("pi32", &["--native", "linux/arm/v7", "--emulated", "none"]);
    let ctx = example("hello", farm.tmp.path());
    let tag = format!("{}/hello:1", registry.addr);

    // A bad annotation is refused before anything is sent, naming the flag and the fix.
    let mut bad = farm.client_args();
    bad.extend(registry.build_flags(&base, PLATFORMS, "hello:1", &ctx));
    for (flag, message) in [
        (
            "foo",
            "--annotation \"foo\": expected [TYPE:]KEY=VALUE, with a '=' (e.g. --annotation \
             index:org.opencontainers.image.source=https://example.com/app or --annotation \
             'manifest[linux/arm64]:KEY=VALUE')",
        ),
        (
            "layer:k=v",
            "--annotation \"layer:k=v\": unknown annotation type \"layer\": use index, manifest, manifest-descriptor \
             or index-descriptor (comma-separated for several, e.g. index,manifest:KEY=VALUE)",
        ),
        (
            "manifest[linux/s390x]:k=v",
            "--annotation \"manifest[linux/s390x]:k=v\": linux/s390x is not a platform of this build (linux/amd64, \
             linux/arm64, linux/arm/v7); name one of those or add linux/s390x to --platform",
        ),
    ] {
        let mut args = bad.clone();
        args.extend(["--annotation".to_string(), flag.to_string()]);
        let (ok, _, err) = build(&args);
        assert!(!ok && err.contains(message), "--annotation {flag}: {err}");
    }
    assert_eq!(registry.tags("hello"), Vec::<String>::new(), "a refused build pushed something");

    let mut args = farm.client_args();
    args.extend(registry.build_flags(&base, PLATFORMS, "hello:1", &ctx));
    args.extend(
        [
            // Only the platforms' entries here: provenance's have their own test (provenance.rs).
            "--provenance=false",
            "--annotation",
            &format!("index:org.opencontainers.image.source={SOURCE}"),
            "--annotation",
            "manifest[linux/arm64]:org.example.arm=yes",
            "--annotation",
            "manifest-descriptor[linux/amd64,linux/arm/v7]:org.example.desc=not-arm64",
            "--label",
            "org.example.team=farm",
        ]
        .map(String::from),
    );
    let (ok, out, err) = build(&args);
    assert!(ok, "{out}\n{err}");

    // The registry's index: the index annotation on the index, the descriptor annotation on
    // two entries; only arm64's manifest has org.example.arm; every config has the label.
    let (index_digest, index, platforms) = served(&registry, &tag);
    assert_eq!(index["annotations"], serde_json::json!({ "org.opencontainers.image.source": SOURCE }), "{index}");
    let entry_annotations: Vec<&serde_json::Value> =
        index["manifests"].as_array().unwrap().iter().map(|m| &m["annotations"]).collect();
    assert_eq!(
        entry_annotations,
        [
            &serde_json::json!({"org.example.desc": "not-arm64"}),
            &serde_json::Value::Null,
            &serde_json::json!({"org.example.desc": "not-arm64"})
        ]
    );
    let names: Vec<&str> = platforms.iter().map(|(p, ..)| p.as_str()).collect();
    assert_eq!(names, ["linux/amd64", "linux/arm64", "linux/arm/v7"]);
    for (platform, _, manifest, config) in &platforms {
        let arm = manifest["annotations"]["org.example.arm"].as_str();
        assert_eq!(arm, (platform == "linux/arm64").then_some("yes"), "{platform}: {manifest}");
        assert_eq!(config["config"]["Labels"]["org.example.team"], "farm", "{platform}: {config}");
    }

    // imagetools inspect, text: the index, each platform's digest as served, and its agent.
    let mut inspect = vec!["imagetools".to_string(), "inspect".into()];
    inspect.extend(farm.client_args());
    inspect.extend(["--insecure-registry".to_string(), registry.addr.clone(), tag.clone()]);
    let (ok, text, err) = farm_out(&inspect);
    assert!(ok, "{text}\n{err}");
    eprintln!("farm imagetools inspect {tag}:\n{text}");
    assert!(
        text.starts_with(&format!("Name:      {tag}\nMediaType: {}\nDigest:    {index_digest}\n", oci::OCI_INDEX)),
        "{text}"
    );
    assert!(text.contains(&format!("Annotations:\n  org.opencontainers.image.source: {SOURCE}\n")), "{text}");
    let agents = ["x86", "pi64", "pi32"];
    for ((platform, digest, ..), agent) in platforms.iter().zip(agents) {
        let block = format!(
            "  Name:      {}/hello@{digest}\n  MediaType: {}\n  Platform:  {platform}\n",
            registry.addr,
            oci::OCI_MANIFEST
        );
        assert!(text.contains(&block), "{block}\nnot in\n{text}");
        assert!(text.contains(&format!("  Farm:      native on {agent}, build ")), "{agent}: {text}");
    }
    assert!(text.contains("  Annotations:\n    org.example.arm: yes\n"), "{text}");

    // --format json: the same, for scripts.
    inspect.extend(["--format".to_string(), "json".into()]);
    let (ok, json, err) = farm_out(&inspect);
    assert!(ok, "{json}\n{err}");
    let j: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(j["digest"], index_digest.to_string());
    assert_eq!(j["annotations"]["org.opencontainers.image.source"], SOURCE);
    assert!(j["farm"]["build"].as_str().is_some_and(|b| b.len() == 12), "{j}");
    let listed: Vec<(String, String, String, String)> = j["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let s = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_string();
            (s(&m["platform"]), s(&m["digest"]), s(&m["farm"]["agent"]), s(&m["farm"]["mode"]))
        })
        .collect();
    let expected: Vec<(String, String, String, String)> = platforms
        .iter()
        .zip(agents)
        .map(|((p, d, ..), a)| (p.clone(), d.to_string(), a.to_string(), "native".to_string()))
        .collect();
    assert_eq!(listed, expected);
    // buildah adds org.opencontainers.image.base.* itself; ours is on arm64's alone.
    let arm: Vec<&serde_json::Value> =
        j["manifests"].as_array().unwrap().iter().map(|m| &m["annotations"]["org.example.arm"]).collect();
    assert_eq!(arm, [&serde_json::Value::Null, &serde_json::json!("yes"), &serde_json::Value::Null]);
    assert_eq!(j["manifests"][0]["descriptorAnnotations"], serde_json::json!({"org.example.desc": "not-arm64"}));
    for m in j["manifests"].as_array().unwrap() {
        assert!(m["size"].as_u64().is_some_and(|s| s > 0), "{m}");
    }

    // -o type=oci: the archive's index is the same stitched index (its annotations), and
    // index-descriptor annotations are on its entry in index.json.
    let out_dir = tempfile::tempdir().unwrap();
    let archive = out_dir.path().join("out.tar");
    let mut args = farm.client_args();
    args.extend(
        [
            "--platform",
            PLATFORMS,
            "--insecure-registry",
            &registry.addr,
            "--build-arg",
            &format!("BASE={base}"),
            "-t",
            "hello:2",
            "-o",
            &format!("type=oci,dest={}", archive.display()),
            "--annotation",
            &format!("index:org.opencontainers.image.source={SOURCE}"),
            "--annotation",
            "index-descriptor:org.example.layout=yes",
            "--label",
            "org.example.team=farm",
            ctx.to_str().unwrap(),
        ]
        .map(String::from),
    );
    let (ok, out, err) = build(&args);
    assert!(ok, "{out}\n{err}");
    let mut files = std::collections::BTreeMap::new();
    for entry in tar::Archive::new(std::fs::File::open(&archive).unwrap()).entries().unwrap() {
        let mut entry = entry.unwrap();
        let path = entry.path().unwrap().to_string_lossy().into_owned();
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut entry, &mut data).unwrap();
        files.insert(path, data);
    }
    let layout: serde_json::Value = serde_json::from_slice(&files["index.json"]).unwrap();
    let entry = &layout["manifests"][0];
    assert_eq!(entry["annotations"]["org.example.layout"], "yes", "{layout}");
    assert_eq!(entry["annotations"]["org.opencontainers.image.ref.name"], "2", "{layout}");
    let hex = entry["digest"].as_str().unwrap().trim_start_matches("sha256:");
    let stitched: serde_json::Value = serde_json::from_slice(&files[&format!("blobs/sha256/{hex}")]).unwrap();
    assert_eq!(stitched["annotations"], serde_json::json!({ "org.opencontainers.image.source": SOURCE }));
    assert_eq!(stitched["manifests"].as_array().unwrap().len(), 3);

    // A single manifest (arm64's, by digest), with no farm to ask: its platform from its config,
    // its annotations, and no farm lines.
    let home = tempfile::tempdir().unwrap();
    let arm = &platforms[1].1;
    let single = format!("{}/hello@{arm}", registry.addr);
    let out = Command::new(farm_bin())
        .args(["imagetools", "inspect", "--insecure-registry", &registry.addr, "--format", "json", &single])
        .env("HOME", home.path())
        .env_remove("XDG_CONFIG_HOME")
        .env_remove("FARM_COORDINATOR")
        .env("FARM_LOG", "warn")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["mediaType"], oci::OCI_MANIFEST);
    assert_eq!(j["digest"], arm.to_string());
    assert_eq!(j["manifests"].as_array().unwrap().len(), 1);
    assert_eq!(j["manifests"][0]["platform"], "linux/arm64");
    assert_eq!(j["manifests"][0]["annotations"]["org.example.arm"], "yes");
    assert_eq!(j["annotations"]["org.example.arm"], "yes");
    assert_eq!(j.get("farm"), None);
    assert_eq!(j["manifests"][0].get("farm"), None);

    // The Docker builder: labels through `docker build --label`, manifest annotations on the OCI
    // manifest farm makes from `docker save`.
    let engine = common::docker::Engine::start();
    farm.agent("dock", &["--builder", "docker", "--docker-host", &engine.host, "--capacity", "2"]);
    let mut args = farm.client_args();
    args.extend(["--require".to_string(), "builder=docker".into()]);
    args.extend(registry.build_flags(&base, "linux/amd64,linux/arm64", "hello:docker", &ctx));
    args.extend(
        ["--annotation", "manifest[linux/arm64]:org.example.arm=yes", "--label", "org.example.team=docker"]
            .map(String::from),
    );
    let (ok, out, err) = build(&args);
    assert!(ok, "{out}\n{err}\n{}", farm.agents["dock"].log());
    assert!(summary(&out).values().all(|(agent, _)| agent == "dock"), "{out}");
    let (_, _, platforms) = served(&registry, &format!("{}/hello:docker", registry.addr));
    let seen: Vec<(&str, Option<&str>, Option<&str>)> = platforms
        .iter()
        .map(|(p, _, manifest, config)| {
            (
                p.as_str(),
                manifest["annotations"]["org.example.arm"].as_str(),
                config["config"]["Labels"]["org.example.team"].as_str(),
            )
        })
        .collect();
    assert_eq!(seen, [("linux/amd64", None, Some("docker")), ("linux/arm64", Some("yes"), Some("docker"))]);
}
