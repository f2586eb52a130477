use super::*;
use crate::proto::{Emulation, Inputs, NamedContext, Secret};

fn p(s: &str) -> Platform {
    s.parse().unwrap()
}

fn spec(mode: ProvenanceMode) -> BuildSpec {
    BuildSpec {
        platforms: vec![p("linux/amd64"), p("linux/arm64")],
        tags: vec!["127.0.0.1:5000/app:1".into(), "127.0.0.1:5000/app:latest".into()],
        dockerfile: "docker/Dockerfile".into(),
        build_args: vec![("VERSION".into(), "1.2".into())],
        target: Some("final".into()),
        no_cache: false,
        emulation: Emulation::Fallback,
        require: BTreeMap::new(),
        context: Digest::of(b"context"),
        insecure_registries: vec![],
        credentials: None,
        secrets: vec![Secret { id: "npmrc".into(), value: b"TOKEN=hunter2".to_vec() }],
        entitlements: vec![],
        annotations: vec![],
        labels: vec![("team".into(), "infra".into())],
        ssh: vec![],
        inputs: Inputs {
            contexts: vec![NamedContext { name: "assets".into(), context: Digest::of(b"assets") }],
            ..Default::default()
        },
        provenance: mode,
        notify: vec![],
        sign: false,
        cache_to: None,
        cache_from: vec![],
    }
}

fn source() -> Source {
    Source {
        dockerfile_digest: Some(Digest::of(b"FROM busybox:1\n")),
        dockerfile_text: Some("FROM busybox:1\n".into()),
        bases: vec![("127.0.0.1:5000/busybox:1".into(), Digest::of(b"busybox index"))],
    }
}

fn run<'a>(platform: &'a Platform, emulated: bool) -> Run<'a> {
    Run {
        build: "94ec5f3a1b2c",
        platform,
        coordinator: "coordinator",
        agent: "x86",
        agent_certificate: Some("sha256:abcd"),
        builder: "buildah",
        builder_version: "1.28.2",
        farm_version: "0.1.0",
        emulated,
        started_ms: 1_764_610_205_000,
        finished_ms: 1_764_610_246_900,
    }
}

fn statement_json(mode: ProvenanceMode, platform: &str, emulated: bool) -> Value {
    let platform = p(platform);
    let bytes = statement(&Digest::of(b"manifest"), &spec(mode), &source(), &run(&platform, emulated));
    serde_json::from_slice(&bytes).unwrap()
}

#[test]
fn the_statement_names_the_platform_manifest_and_the_slsa_predicate() {
    let s = statement_json(ProvenanceMode::Min, "linux/arm64", true);
    let hex = Digest::of(b"manifest").hex().to_owned();
    assert_eq!(s["_type"], "https://in-toto.io/Statement/v1");
    assert_eq!(s["predicateType"], "https://slsa.dev/provenance/v1");
    assert_eq!(
        s["subject"],
        json!([
            { "name": "pkg:docker/127.0.0.1:5000/app@1?platform=linux%2Farm64", "digest": { "sha256": hex } },
            { "name": "pkg:docker/127.0.0.1:5000/app@latest?platform=linux%2Farm64", "digest": { "sha256": hex } },
        ])
    );
    let def = &s["predicate"]["buildDefinition"];
    assert_eq!(def["buildType"], "https://farm.dev/build/v1");
    let ext = &def["externalParameters"];
    assert_eq!(
        ext["dockerfile"],
        json!({ "path": "docker/Dockerfile", "digest": { "sha256": Digest::of(b"FROM busybox:1\n").hex() } })
    );
    assert_eq!(ext["context"], json!({ "digest": { "sha256": Digest::of(b"context").hex() } }));
    assert_eq!(ext["buildArgs"], json!({ "VERSION": "1.2" }));
    assert_eq!(ext["secrets"], json!(["npmrc"]));
    assert_eq!(ext["target"], "final");
    assert_eq!(ext["platform"], "linux/arm64");
    assert_eq!(ext["tags"], json!(["127.0.0.1:5000/app:1", "127.0.0.1:5000/app:latest"]));
    assert_eq!(ext["labels"], json!({ "team": "infra" }));
    assert_eq!(ext["namedContexts"], json!({ "assets": { "digest": { "sha256": Digest::of(b"assets").hex() } } }));
    assert_eq!(
        def["internalParameters"],
        json!({
            "builder": { "name": "buildah", "version": "1.28.2" },
            "farmVersion": "0.1.0",
            "emulated": true,
            "qemuHandler": "qemu-aarch64",
            "agent": { "name": "x86", "certificateSha256": "sha256:abcd" },
            "coordinator": "coordinator",
            "mode": "min",
        })
    );
    assert_eq!(
        def["resolvedDependencies"],
        json!([
            {
                "uri": "pkg:docker/127.0.0.1:5000/busybox@1?platform=linux%2Farm64",
                "name": "127.0.0.1:5000/busybox:1",
                "digest": { "sha256": Digest::of(b"busybox index").hex() },
            },
            { "name": "context", "digest": { "sha256": Digest::of(b"context").hex() } },
            { "name": "context:assets", "digest": { "sha256": Digest::of(b"assets").hex() } },
            { "name": "dockerfile:docker/Dockerfile", "digest": { "sha256": Digest::of(b"FROM busybox:1\n").hex() } },
        ])
    );
    assert_eq!(
        s["predicate"]["runDetails"],
        json!({
            "builder": { "id": "farm://coordinator/agents/x86", "version": { "farm": "0.1.0", "buildah": "1.28.2" } },
            "metadata": {
                "invocationId": "94ec5f3a1b2c",
                "startedOn": "2025-12-01T17:30:05Z",
                "finishedOn": "2025-12-01T17:30:46Z",
            },
        })
    );
}

#[test]
fn secret_values_never_appear_and_min_mode_has_no_dockerfile_text() {
    let platform = p("linux/amd64");
    let bytes = statement(&Digest::of(b"m"), &spec(ProvenanceMode::Min), &source(), &run(&platform, false));
    let text = String::from_utf8(bytes).unwrap();
    assert!(!text.contains("hunter2"), "{text}");
    assert!(!text.contains("FROM busybox"), "{text}");
    let s: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(s["predicate"]["buildDefinition"]["internalParameters"]["emulated"], false);
    assert_eq!(s["predicate"]["buildDefinition"]["internalParameters"]["qemuHandler"], Value::Null);
}

#[test]
fn max_mode_adds_the_dockerfile_text_and_the_whole_request() {
    let s = statement_json(ProvenanceMode::Max, "linux/amd64", false);
    let ext = &s["predicate"]["buildDefinition"]["externalParameters"];
    assert_eq!(ext["dockerfile"]["text"], "FROM busybox:1\n");
    assert_eq!(ext["emulation"], "fallback");
    assert_eq!(ext["entitlements"], json!([]));
    assert_eq!(s["predicate"]["buildDefinition"]["internalParameters"]["mode"], "max");
}

#[test]
fn buildx_spellings_of_provenance() {
    use ProvenanceMode::*;
    for (v, want) in [
        ("false", Off),
        ("0", Off),
        ("disabled=true", Off),
        ("true", Min),
        ("1", Min),
        ("mode=min", Min),
        ("mode=max", Max),
        ("max", Max),
        ("type=provenance,mode=max", Max),
    ] {
        assert_eq!(parse_flag(v), Ok(want), "{v}");
    }
    assert_eq!(parse_attest("type=provenance,mode=max"), Ok(Max));
    assert_eq!(parse_attest("type=provenance,disabled=true"), Ok(Off));
    assert_eq!(
        parse_attest("type=sbom"),
        Err("--attest type=sbom is not supported: farm attaches only provenance (--attest type=provenance,mode=max)"
            .into())
    );
    assert_eq!(
        parse_flag("mode=maximal"),
        Err("--provenance \"mode=maximal\" is not understood: use --provenance=false, --provenance=true, \
             --provenance mode=min or --provenance mode=max"
            .into())
    );
}

fn desc(n: u8) -> Descriptor {
    Descriptor::new(OCI_MANIFEST, Digest::of(&[n]), 500 + n as u64)
}

#[test]
fn the_index_lists_platforms_then_buildx_attestation_manifests() {
    let entries = vec![(p("linux/amd64"), desc(1)), (p("linux/arm64"), desc(2))];
    let atts = vec![
        Attestation { subject: desc(1), statement: b"{\"s\":1}".to_vec() },
        Attestation { subject: desc(2), statement: b"{\"s\":2}".to_vec() },
    ];
    let out = stitch(&entries, &[], &atts);
    let index: Value = serde_json::from_slice(&out.index).unwrap();
    let m = index["manifests"].as_array().unwrap();
    assert_eq!(m.len(), 4);
    assert_eq!(m[0]["platform"], json!({ "architecture": "amd64", "os": "linux" }));
    assert_eq!(m[1]["platform"], json!({ "architecture": "arm64", "os": "linux" }));
    for (i, entry) in m[2..].iter().enumerate() {
        let manifest = &out.manifests[i];
        assert_eq!(entry["digest"], manifest.digest().as_str());
        assert_eq!(entry["size"], manifest.bytes.len());
        assert_eq!(entry["mediaType"], OCI_MANIFEST);
        assert_eq!(entry["platform"], json!({ "architecture": "unknown", "os": "unknown" }));
        assert_eq!(
            entry["annotations"],
            json!({
                "vnd.docker.reference.digest": Digest::of(&[i as u8 + 1]).as_str(),
                "vnd.docker.reference.type": "attestation-manifest",
            })
        );
        let manifest: Value = serde_json::from_slice(&manifest.bytes).unwrap();
        let statement = &atts[i].statement;
        assert_eq!(
            manifest["layers"],
            json!([{
                "mediaType": "application/vnd.in-toto+json",
                "digest": Digest::of(statement).as_str(),
                "size": statement.len(),
                "annotations": { "in-toto.io/predicate-type": "https://slsa.dev/provenance/v1" },
            }])
        );
        let config = out.blobs.iter().find(|b| b.digest().as_str() == manifest["config"]["digest"]).unwrap();
        assert_eq!(
            serde_json::from_slice::<Value>(&config.bytes).unwrap(),
            json!({
                "architecture": "unknown", "os": "unknown", "config": {},
                "rootfs": { "type": "layers", "diff_ids": [Digest::of(statement).as_str()] },
            })
        );
        assert!(out.blobs.iter().any(|b| b.bytes == *statement));
    }
    // No attestations: the same bytes as before provenance existed.
    assert_eq!(stitch(&entries, &[], &[]).index, annotation::stitch(&entries, &[]));
}

#[test]
fn the_referrer_artifact_and_its_fallback_tag() {
    let subject = desc(7);
    let artifact = artifact_manifest(&subject, b"{}");
    let m: Value = serde_json::from_slice(&artifact.bytes).unwrap();
    assert_eq!(m["artifactType"], "application/vnd.in-toto+json");
    assert_eq!(
        m["subject"],
        json!({ "mediaType": OCI_MANIFEST, "digest": subject.digest.as_str(), "size": subject.size })
    );
    assert_eq!(
        m["config"],
        json!({
            "mediaType": "application/vnd.oci.empty.v1+json",
            "digest": "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a",
            "size": 2,
            "data": "e30=",
        })
    );
    assert_eq!(fallback_tag(&subject.digest), format!("sha256-{}", subject.digest.hex()));
    let first = referrers_index(None, &artifact);
    let entry = json!({
        "mediaType": OCI_MANIFEST,
        "digest": artifact.digest().as_str(),
        "size": artifact.bytes.len(),
        "artifactType": "application/vnd.in-toto+json",
        "annotations": { "in-toto.io/predicate-type": "https://slsa.dev/provenance/v1" },
    });
    assert_eq!(
        serde_json::from_slice::<Value>(&first).unwrap(),
        json!({ "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [entry] })
    );
    // Pushing the same artifact again changes nothing; another one is added beside what was there.
    assert_eq!(referrers_index(Some(&first), &artifact), first);
    let other = artifact_manifest(&subject, b"{\"x\":1}");
    let both: Value = serde_json::from_slice(&referrers_index(Some(&first), &other)).unwrap();
    assert_eq!(both["manifests"][0], entry);
    assert_eq!(both["manifests"][1]["digest"], other.digest().as_str());
}

#[test]
fn statements_for_the_signer() {
    let atts = vec![Attestation { subject: desc(1), statement: b"s1".to_vec() }];
    assert_eq!(statements(&atts), vec![(Digest::of(&[1]), b"s1".to_vec())]);
}
