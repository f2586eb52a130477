//! End to end, SLSA provenance: a real coordinator, a real agent (x86_64, building linux/amd64
//! natively and linux/arm64 under QEMU, there being no arm64 agent), buildah and Debian's
//! docker-registry 2.8, which has no referrers API. The index carries buildx's attestation
//! manifests; each platform manifest's `sha256-<hex>` fallback tag lists its OCI 1.1 artifact;
//! a client pulling one platform still gets that platform's image.

mod common;

use std::process::Command;

use common::registry::{read_image, Registry};
use common::*;
use serde_json::Value;
use shared::oci::ImageRef;
use shared::Digest;

const PLATFORMS: &str = "linux/amd64,linux/arm64";

fn fetch_json(registry: &Registry, reference: &str) -> (Digest, Value) {
    let (digest, bytes) = fetch_raw(registry, reference);
    (digest, serde_json::from_slice(&bytes).unwrap())
}

fn fetch_raw(registry: &Registry, reference: &str) -> (Digest, Vec<u8>) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let r: ImageRef = reference.parse().unwrap();
    let (bytes, _, digest) = rt.block_on(registry.client().fetch_manifest(&r)).unwrap();
    (digest, bytes)
}

fn fetch_blob(registry: &Registry, repo: &str, digest: &str) -> Vec<u8> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let r: ImageRef = repo.parse().unwrap();
    rt.block_on(registry.client().fetch_blob(&r, &digest.parse().unwrap())).unwrap()
}

#[test]
fn each_platform_carries_slsa_provenance_where_buildx_and_oras_look() {
    require_tool("skopeo");
    let registry = Registry::start();
    let base = registry.seed_busybox();
    let (base_digest, _) = fetch_json(&registry, &base);
    let mut farm = Farm::start(3);
    farm.agent("x86", &["--capacity", "2", "--native", "linux/amd64", "--emulated", "linux/arm64"]);
    let ctx = example("hello", farm.tmp.path());
    let repo = format!("{}/hello", registry.addr);
    let tag = format!("{repo}:1");

    let meta = farm.tmp.path().join("meta.json");
    let mut args = farm.client_args();
    args.extend(["--metadata-file".to_string(), meta.display().to_string()]);
    args.extend(registry.build_flags(&base, PLATFORMS, "hello:1", &ctx));
    let (ok, out, err) = build(&args);
    assert!(ok, "build failed:\n{out}\n{err}");
    let build_id = farm.builds()[0]["id"].as_str().unwrap().to_string();
    // --metadata-file describes the index the registry serves, attestation entries included.
    let meta: Value = serde_json::from_slice(&std::fs::read(&meta).unwrap()).unwrap();
    let (index_digest, served) = fetch_raw(&registry, &tag);
    assert_eq!(meta["containerimage.digest"], index_digest.as_str());
    let descriptor = &meta["containerimage.descriptor"];
    assert_eq!(descriptor["digest"], index_digest.as_str());
    assert_eq!(descriptor["size"], served.len(), "{descriptor}");

    // The platforms' images, as before: attestation entries are no platform.
    let (_, _, images) = read_image(&registry, &tag);
    let platforms: Vec<&str> = images.iter().map(|i| i.platform.as_str()).collect();
    assert_eq!(platforms, ["linux/amd64", "linux/arm64"]);

    // The index: two platforms, then one attestation manifest per platform (buildx's layout).
    let (_, index) = fetch_json(&registry, &tag);
    let entries = index["manifests"].as_array().unwrap();
    assert_eq!(entries.len(), 4, "{index}");
    let certificate = {
        let creds = shared::tls::load_credentials(&farm.ca.dir, "x86").unwrap();
        format!("sha256:{}", shared::digest::sha256_hex(creds.chain[0].as_ref()))
    };
    for (i, (platform, emulated)) in [("linux/amd64", false), ("linux/arm64", true)].into_iter().enumerate() {
        let manifest = entries[i]["digest"].as_str().unwrap();
        let att = &entries[2 + i];
        assert_eq!(att["platform"], serde_json::json!({ "architecture": "unknown", "os": "unknown" }), "{index}");
        assert_eq!(
            att["annotations"],
            serde_json::json!({
                "vnd.docker.reference.digest": manifest,
                "vnd.docker.reference.type": "attestation-manifest",
            })
        );
        let (_, att_manifest) = fetch_json(&registry, &format!("{repo}@{}", att["digest"].as_str().unwrap()));
        let layer = &att_manifest["layers"][0];
        assert_eq!(layer["mediaType"], "application/vnd.in-toto+json");
        assert_eq!(layer["annotations"]["in-toto.io/predicate-type"], "https://slsa.dev/provenance/v1");
        let statement: Value =
            serde_json::from_slice(&fetch_blob(&registry, &repo, layer["digest"].as_str().unwrap())).unwrap();
        assert_eq!(statement["_type"], "https://in-toto.io/Statement/v1");
        assert_eq!(statement["predicateType"], "https://slsa.dev/provenance/v1");
        assert_eq!(statement["subject"][0]["digest"]["sha256"], manifest.trim_start_matches("sha256:"));
        let pred = &statement["predicate"];
        assert_eq!(pred["runDetails"]["builder"]["id"], "farm://coordinator/agents/x86", "{statement}");
        assert_eq!(pred["runDetails"]["metadata"]["invocationId"], build_id.as_str());
        let internal = &pred["buildDefinition"]["internalParameters"];
        assert_eq!(internal["agent"], serde_json::json!({ "name": "x86", "certificateSha256": certificate }));
        assert_eq!(internal["emulated"], emulated, "{platform}: {statement}");
        assert_eq!(internal["qemuHandler"], if emulated { Value::from("qemu-aarch64") } else { Value::Null });
        assert_eq!(internal["builder"]["name"], "buildah");
        let ext = &pred["buildDefinition"]["externalParameters"];
        assert_eq!(ext["platform"], platform);
        assert_eq!(ext["tags"], serde_json::json!([tag]));
        assert_eq!(ext["buildArgs"]["BASE"], base.as_str());
        assert!(ext["dockerfile"].get("text").is_none(), "mode=min records no Dockerfile text");
        let deps = pred["buildDefinition"]["resolvedDependencies"].as_array().unwrap();
        assert_eq!(deps[0]["name"], base.as_str(), "{statement}");
        assert_eq!(deps[0]["digest"]["sha256"], base_digest.hex(), "the base by the digest the registry serves");

        // The OCI 1.1 artifact through the referrers fallback tag (no referrers API in 2.8).
        let fallback = format!("{repo}:sha256-{}", manifest.trim_start_matches("sha256:"));
        let (_, referrers) = fetch_json(&registry, &fallback);
        let listed = referrers["manifests"].as_array().unwrap();
        assert_eq!(listed.len(), 1, "{referrers}");
        assert_eq!(listed[0]["artifactType"], "application/vnd.in-toto+json");
        let (_, artifact) = fetch_json(&registry, &format!("{repo}@{}", listed[0]["digest"].as_str().unwrap()));
        assert_eq!(artifact["subject"]["digest"], manifest);
        assert_eq!(artifact["layers"][0]["digest"], layer["digest"]);
    }
    assert_eq!(registry.tags("hello"), ["1"]);
    assert_eq!(registry.all_tags("hello").len(), 3, "{:?}", registry.all_tags("hello"));

    // A client pulling arm64 still gets the arm64 image.
    let dir = tempfile::tempdir().unwrap();
    let dest = format!("dir:{}", dir.path().join("arm64").display());
    let out = Command::new("skopeo")
        .args(["copy", "--quiet", "--preserve-digests", "--src-tls-verify=false", "--override-arch", "arm64"])
        .arg(format!("docker://{tag}"))
        .arg(&dest)
        .output()
        .unwrap();
    assert!(out.status.success(), "skopeo copy: {}", String::from_utf8_lossy(&out.stderr));
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("arm64/manifest.json")).unwrap()).unwrap();
    let arm64 = images.iter().find(|i| i.platform == "linux/arm64").unwrap();
    assert_eq!(Digest::of(&std::fs::read(dir.path().join("arm64/manifest.json")).unwrap()), arm64.digest);
    assert!(manifest["layers"].as_array().is_some());
    assert_eq!(arm64.text("hello/uname"), "aarch64");

    // Again under another tag: both platforms come from the result cache and carry the
    // provenance of the build that made them (the same statements, so the same artifacts).
    let mut args = farm.client_args();
    args.extend(registry.build_flags(&base, PLATFORMS, "hello:2", &ctx));
    let (ok, out, err) = build(&args);
    assert!(ok, "build failed:\n{out}\n{err}");
    let rows = summary(&out);
    assert_eq!(rows["linux/arm64"].1, "cached", "{out}");
    let (_, again) = fetch_json(&registry, &format!("{repo}:2"));
    assert_eq!(again["manifests"], index["manifests"], "{again}");
    assert_eq!(registry.all_tags("hello").len(), 4, "{:?}", registry.all_tags("hello"));

    // --provenance=false: no attestation manifests.
    let mut args = farm.client_args();
    args.extend(registry.build_flags(&base, PLATFORMS, "hello:3", &ctx));
    args.insert(0, "--provenance=false".into());
    let (ok, out, err) = build(&args);
    assert!(ok, "build failed:\n{out}\n{err}");
    let (_, plain) = fetch_json(&registry, &format!("{repo}:3"));
    assert_eq!(plain["manifests"].as_array().unwrap().len(), 2, "{plain}");
    assert_eq!(plain["manifests"].as_array().unwrap()[..], entries[..2]);

    // --provenance mode=max (rebuilt: a cached platform keeps the statement it was made with)
    // records the Dockerfile's text.
    let mut args = farm.client_args();
    args.extend(registry.build_flags(&base, "linux/amd64", "hello:4", &ctx));
    args.splice(0..0, ["--provenance", "mode=max", "--no-cache"].map(String::from));
    let (ok, out, err) = build(&args);
    assert!(ok, "build failed:\n{out}\n{err}");
    let (_, max) = fetch_json(&registry, &format!("{repo}:4"));
    let att = &max["manifests"][1];
    assert_eq!(att["annotations"]["vnd.docker.reference.type"], "attestation-manifest", "{max}");
    let (_, att_manifest) = fetch_json(&registry, &format!("{repo}@{}", att["digest"].as_str().unwrap()));
    let statement: Value =
        serde_json::from_slice(&fetch_blob(&registry, &repo, att_manifest["layers"][0]["digest"].as_str().unwrap()))
            .unwrap();
    let dockerfile = &statement["predicate"]["buildDefinition"]["externalParameters"]["dockerfile"];
    assert_eq!(dockerfile["text"], std::fs::read_to_string(ctx.join("Dockerfile")).unwrap().as_str());
    assert_eq!(statement["predicate"]["buildDefinition"]["internalParameters"]["mode"], "max");
}
