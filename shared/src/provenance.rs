//! **Pure** SLSA provenance: the in-toto statement farm records for each platform it builds, and
//! where it goes in a registry.
//!
//! - [`statement`]: an in-toto Statement v1 whose subject is the platform's manifest and whose
//!   predicate is SLSA Provenance v1 (`buildType` [`BUILD_TYPE`]): what was asked
//!   (`externalParameters`), how farm ran it (`internalParameters`: builder, native or emulated,
//!   the QEMU handler), what went in by digest (`resolvedDependencies`), and who built it
//!   (`runDetails.builder.id` = `farm://<coordinator>/agents/<agent>`, both names from their
//!   certificates, and the agent certificate's SHA-256).
//! - [`attestation_manifest`] + [`stitch`]: buildx's layout: per platform an image manifest
//!   (platform `unknown/unknown` in the index, `vnd.docker.reference.*` annotations) whose one
//!   layer is the statement (`application/vnd.in-toto+json`).
//! - [`artifact_manifest`] + [`referrers_index`]: the OCI 1.1 artifact whose `subject` is the
//!   platform manifest, and the `sha256-<hex>` fallback tag that lists it where a registry has no
//!   referrers API.
//!
//! A client pulling one platform reads the index's entries for its platform only, so the
//! `unknown/unknown` entries change nothing it pulls.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::annotation::{self, Annotation};
use crate::oci::{Descriptor, OciPlatform, OCI_MANIFEST};
use crate::proto::{BuildSpec, ProvenanceMode};
use crate::{Digest, Platform};

/// `buildDefinition.buildType`: a farm build (`farm build`'s flags, one platform per agent).
pub const BUILD_TYPE: &str = "https://farm.dev/build/v1";
pub const STATEMENT_TYPE: &str = "https://in-toto.io/Statement/v1";
pub const PREDICATE_TYPE: &str = "https://slsa.dev/provenance/v1";
/// The media type of a layer holding an in-toto statement, and of the referrer artifact.
pub const IN_TOTO: &str = "application/vnd.in-toto+json";
pub const PREDICATE_TYPE_ANNOTATION: &str = "in-toto.io/predicate-type";
pub const REFERENCE_TYPE: &str = "vnd.docker.reference.type";
pub const REFERENCE_DIGEST: &str = "vnd.docker.reference.digest";
pub const ATTESTATION_MANIFEST: &str = "attestation-manifest";
/// OCI 1.1's empty descriptor: the config of an artifact that has none.
pub const EMPTY_MEDIA_TYPE: &str = "application/vnd.oci.empty.v1+json";
pub const EMPTY_JSON: &[u8] = b"{}";
const IMAGE_CONFIG: &str = "application/vnd.oci.image.config.v1+json";

/// What the coordinator learnt of a build when it was submitted, beyond its spec.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Source {
    /// The Dockerfile's digest (from the context manifest).
    pub dockerfile_digest: Option<Digest>,
    /// Its text: kept only for `--provenance mode=max`.
    pub dockerfile_text: Option<String>,
    /// Every base image as written (args expanded) and the digest its tag pointed to at
    /// submission (the result cache's resolution).
    pub bases: Vec<(String, Digest)>,
}

/// How one platform was built: who, with what, when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run<'a> {
    pub build: &'a str,
    pub platform: &'a Platform,
    /// The coordinator's certificate name.
    pub coordinator: &'a str,
    /// The agent's certificate name, and that certificate's SHA-256 (`sha256:<hex>` of its DER).
    pub agent: &'a str,
    pub agent_certificate: Option<&'a str>,
    pub builder: &'a str,
    pub builder_version: &'a str,
    pub farm_version: &'a str,
    pub emulated: bool,
    pub started_ms: u64,
    pub finished_ms: u64,
}

/// `--provenance VALUE` as buildx spells it: `false`/`0` (off), `true`/`1`/`mode=min`/`min`,
/// `mode=max`/`max`, and `disabled=true`.
pub fn parse_flag(value: &str) -> Result<ProvenanceMode, String> {
    let v = value.trim().to_ascii_lowercase();
    match v.as_str() {
        "false" | "0" | "off" | "disabled=true" => return Ok(ProvenanceMode::Off),
        "true" | "1" | "" | "min" => return Ok(ProvenanceMode::Min),
        "max" => return Ok(ProvenanceMode::Max),
        _ => {}
    }
    let mut mode = ProvenanceMode::Min;
    for part in v.split(',') {
        match part.split_once('=') {
            Some(("mode", "min")) => mode = ProvenanceMode::Min,
            Some(("mode", "max")) => mode = ProvenanceMode::Max,
            Some(("disabled", "true")) => return Ok(ProvenanceMode::Off),
            Some(("disabled", "false")) | Some(("type", "provenance")) => {}
            _ => {
                return Err(format!(
                    "--provenance {value:?} is not understood: use --provenance=false, --provenance=true, \
                     --provenance mode=min or --provenance mode=max"
                ))
            }
        }
    }
    Ok(mode)
}

/// `--attest type=provenance[,mode=min|max][,disabled=true]`: the provenance it asks for;
/// other attestation types (`type=sbom`) are refused, saying so.
pub fn parse_attest(value: &str) -> Result<ProvenanceMode, String> {
    let ty = value.split(',').find_map(|p| p.trim().strip_prefix("type="));
    match ty {
        Some("provenance") => parse_flag(value),
        Some(other) => Err(format!(
            "--attest type={other} is not supported: farm attaches only provenance (--attest type=provenance,mode=max)"
        )),
        None => Err(format!("--attest {value:?} names no type: use --attest type=provenance[,mode=max]")),
    }
}

/// `farm build`'s `--provenance VALUE` and `--attest VALUE`s (the last one given wins; neither:
/// `min`, as buildx does).
pub fn from_flags(provenance: Option<&str>, attest: &[String]) -> Result<ProvenanceMode, String> {
    let mut mode = match provenance {
        Some(v) => parse_flag(v)?,
        None => ProvenanceMode::Min,
    };
    for a in attest {
        mode = parse_attest(a)?;
    }
    Ok(mode)
}

fn sha(d: &Digest) -> Value {
    json!({ "sha256": d.hex() })
}

/// The `pkg:docker` name buildx gives a subject: `pkg:docker/REPO@TAG?platform=linux%2Farm64`.
fn purl(image: &str, platform: &Platform) -> String {
    let platform = platform.to_string().replace('/', "%2F");
    // The tag is after the last ':' that follows the last '/'.
    let slash = image.rfind('/').map_or(0, |i| i + 1);
    let name = match image[slash..].rfind(':') {
        Some(i) => format!("{}@{}", &image[..slash + i], &image[slash + i + 1..]),
        None => image.to_owned(),
    };
    format!("pkg:docker/{name}?platform={platform}")
}

/// The in-toto Statement v1 (SLSA Provenance v1) for `manifest`, the platform `run.platform`
/// of the build `spec` + `source`, as JSON bytes (deterministic: keys sorted).
pub fn statement(manifest: &Digest, spec: &BuildSpec, source: &Source, run: &Run) -> Vec<u8> {
    let names: Vec<String> = if spec.tags.is_empty() {
        vec![format!("pkg:docker/_?platform={}", run.platform.to_string().replace('/', "%2F"))]
    } else {
        spec.tags.iter().map(|t| purl(t, run.platform)).collect()
    };
    let subject: Vec<Value> = names.into_iter().map(|name| json!({ "name": name, "digest": sha(manifest) })).collect();

    let mut dockerfile = json!({ "path": spec.dockerfile });
    if let Some(d) = &source.dockerfile_digest {
        dockerfile["digest"] = sha(d);
    }
    if spec.provenance == ProvenanceMode::Max {
        if let Some(text) = &source.dockerfile_text {
            dockerfile["text"] = json!(text);
        }
    }
    let build_args: BTreeMap<&str, &str> = spec.build_args.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let named: BTreeMap<&str, Value> =
        spec.inputs.contexts.iter().map(|c| (c.name.as_str(), json!({ "digest": sha(&c.context) }))).collect();
    let network = if spec.inputs.no_network {
        "none"
    } else if spec.entitlements.contains(&crate::proto::Entitlement::NetworkHost) {
        "host"
    } else {
        "default"
    };
    let mut external = json!({
        "dockerfile": dockerfile,
        "context": { "digest": sha(&spec.context) },
        "namedContexts": named,
        "buildArgs": build_args,
        "secrets": spec.secrets.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(),
        "ssh": spec.ssh,
        "target": spec.target,
        "platform": run.platform.to_string(),
        "tags": spec.tags,
        "labels": spec.labels.iter().cloned().collect::<BTreeMap<String, String>>(),
        "annotations": annotation::for_platform(&spec.annotations, annotation::AnnotationKind::Manifest, run.platform),
        "network": network,
        "addHosts": spec.inputs.add_hosts.iter().map(|(h, ip)| format!("{h}:{ip}")).collect::<Vec<_>>(),
        "noCache": spec.no_cache,
        "pull": spec.inputs.pull,
    });
    if spec.provenance == ProvenanceMode::Max {
        external["entitlements"] = json!(spec.entitlements.iter().map(|e| e.name()).collect::<Vec<_>>());
        external["emulation"] = json!(spec.emulation);
        external["require"] = json!(spec.require);
    }
    let internal = json!({
        "builder": { "name": run.builder, "version": run.builder_version },
        "farmVersion": run.farm_version,
        "emulated": run.emulated,
        "qemuHandler": if run.emulated { Value::from(qemu_handler(run.platform)) } else { Value::Null },
        "agent": { "name": run.agent, "certificateSha256": run.agent_certificate },
        "coordinator": run.coordinator,
        "mode": match spec.provenance { ProvenanceMode::Max => "max", _ => "min" },
    });
    let mut deps: Vec<Value> = source
        .bases
        .iter()
        .map(
            |(image, d)| json!({ "uri": purl(&canonical_image(image), run.platform), "name": image, "digest": sha(d) }),
        )
        .collect();
    deps.push(json!({ "name": "context", "digest": sha(&spec.context) }));
    for c in &spec.inputs.contexts {
        deps.push(json!({ "name": format!("context:{}", c.name), "digest": sha(&c.context) }));
    }
    if let Some(d) = &source.dockerfile_digest {
        deps.push(json!({ "name": format!("dockerfile:{}", spec.dockerfile), "digest": sha(d) }));
    }
    let statement = json!({
        "_type": STATEMENT_TYPE,
        "subject": subject,
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": external,
                "internalParameters": internal,
                "resolvedDependencies": deps,
            },
            "runDetails": {
                "builder": {
                    "id": builder_id(run.coordinator, run.agent),
                    "version": BTreeMap::from([("farm", run.farm_version), (run.builder, run.builder_version)]),
                },
                "metadata": {
                    "invocationId": run.build,
                    "startedOn": rfc3339(run.started_ms),
                    "finishedOn": rfc3339(run.finished_ms),
                },
            },
        },
    });
    serde_json::to_vec(&statement).expect("plain JSON values serialise")
}

/// `runDetails.builder.id`: the coordinator and the agent, by their certificates' names.
pub fn builder_id(coordinator: &str, agent: &str) -> String {
    format!("farm://{coordinator}/agents/{agent}")
}

/// The QEMU handler an emulated platform runs under (binfmt_misc's name, `qemu-aarch64`).
pub fn qemu_handler(platform: &Platform) -> String {
    format!("qemu-{}", platform.qemu_name())
}

/// `busybox:1` → `docker.io/library/busybox:1`; names with a registry stay as they are.
fn canonical_image(image: &str) -> String {
    match image.parse::<crate::oci::ImageRef>() {
        Ok(r) => r.to_string(),
        Err(_) => image.to_owned(),
    }
}

/// `2026-12-01T17:30:05Z` (RFC 3339, UTC, whole seconds).
pub fn rfc3339(ms: u64) -> String {
    match time::OffsetDateTime::from_unix_timestamp((ms / 1000) as i64) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
            t.year(),
            t.month() as u8,
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        ),
        Err(_) => "1970-01-01T00:00:00Z".into(),
    }
}

/// A blob or manifest to store, by digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blob {
    pub media_type: String,
    pub bytes: Vec<u8>,
}

impl Blob {
    pub fn digest(&self) -> Digest {
        Digest::of(&self.bytes)
    }

    pub fn descriptor(&self) -> Descriptor {
        Descriptor::new(&self.media_type, self.digest(), self.bytes.len() as u64)
    }
}

fn statement_layer(statement: &[u8]) -> Value {
    json!({
        "mediaType": IN_TOTO,
        "digest": Digest::of(statement).as_str(),
        "size": statement.len(),
        "annotations": { PREDICATE_TYPE_ANNOTATION: PREDICATE_TYPE },
    })
}

/// buildx's attestation manifest for one statement: its config (an image config for platform
/// `unknown/unknown` whose one diff id is the statement's digest, as BuildKit writes) and the
/// manifest itself.
pub fn attestation_manifest(statement: &[u8]) -> (Blob, Blob) {
    let config = json!({
        "architecture": "unknown",
        "os": "unknown",
        "config": {},
        "rootfs": { "type": "layers", "diff_ids": [Digest::of(statement).as_str()] },
    });
    let config = Blob { media_type: IMAGE_CONFIG.into(), bytes: serde_json::to_vec(&config).expect("JSON") };
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": { "mediaType": IMAGE_CONFIG, "digest": config.digest().as_str(), "size": config.bytes.len() },
        "layers": [statement_layer(statement)],
    });
    (config, Blob { media_type: OCI_MANIFEST.into(), bytes: serde_json::to_vec(&manifest).expect("JSON") })
}

/// The OCI 1.1 artifact for one statement: `artifactType` in-toto, the empty config, the
/// statement as its layer and `subject` the platform manifest.
pub fn artifact_manifest(subject: &Descriptor, statement: &[u8]) -> Blob {
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": IN_TOTO,
        "config": {
            "mediaType": EMPTY_MEDIA_TYPE,
            "digest": Digest::of(EMPTY_JSON).as_str(),
            "size": EMPTY_JSON.len(),
            "data": "e30=",
        },
        "layers": [statement_layer(statement)],
        "subject": { "mediaType": subject.media_type, "digest": subject.digest.as_str(), "size": subject.size },
        "annotations": { PREDICATE_TYPE_ANNOTATION: PREDICATE_TYPE },
    });
    Blob { media_type: OCI_MANIFEST.into(), bytes: serde_json::to_vec(&manifest).expect("JSON") }
}

/// The referrers fallback tag of a manifest: `sha256-<hex>`.
pub fn fallback_tag(subject: &Digest) -> String {
    format!("sha256-{}", subject.hex())
}

/// The OCI index the referrers fallback tag holds: the `existing` one's entries (if it parses)
/// plus `artifact`, once (by digest), as the distribution spec's referrers tag schema lists them
/// (`artifactType` and annotations on each descriptor).
pub fn referrers_index(existing: Option<&[u8]>, artifact: &Blob) -> Vec<u8> {
    let mut manifests: Vec<Value> = existing
        .and_then(|b| serde_json::from_slice::<Value>(b).ok())
        .and_then(|v| v.get("manifests").and_then(Value::as_array).cloned())
        .unwrap_or_default();
    let digest = artifact.digest();
    if !manifests.iter().any(|m| m.get("digest").and_then(Value::as_str) == Some(digest.as_str())) {
        manifests.push(json!({
            "mediaType": artifact.media_type,
            "digest": digest.as_str(),
            "size": artifact.bytes.len(),
            "artifactType": IN_TOTO,
            "annotations": { PREDICATE_TYPE_ANNOTATION: PREDICATE_TYPE },
        }));
    }
    let index = json!({ "schemaVersion": 2, "mediaType": crate::oci::OCI_INDEX, "manifests": manifests });
    serde_json::to_vec(&index).expect("JSON")
}

/// One platform's provenance to publish: its manifest and its statement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attestation {
    pub subject: Descriptor,
    pub statement: Vec<u8>,
}

/// What publishing a build's provenance takes, besides the index.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Published {
    /// The index: the platforms' entries, then one attestation manifest per platform.
    pub index: Vec<u8>,
    /// Blobs to upload first: statements, attestation configs, the empty config.
    pub blobs: Vec<Blob>,
    /// Manifests to put by digest before the index: the attestation manifests.
    pub manifests: Vec<Blob>,
    /// Per platform manifest, its OCI 1.1 referrer artifact (put by digest after `blobs`; where
    /// the registry has no referrers API, listed under [`fallback_tag`] with [`referrers_index`]).
    pub referrers: Vec<(Digest, Blob)>,
}

/// The build's index with buildx's attestation manifests after the platforms' entries, and
/// everything to push with it. No attestations: exactly [`annotation::stitch`]'s bytes.
pub fn stitch(
    entries: &[(Platform, Descriptor)],
    annotations: &[Annotation],
    attestations: &[Attestation],
) -> Published {
    let mut out = Published::default();
    let mut extra = Vec::new();
    for a in attestations {
        let (config, manifest) = attestation_manifest(&a.statement);
        let layer = Blob { media_type: IN_TOTO.into(), bytes: a.statement.clone() };
        let mut d = manifest.descriptor();
        d.platform = Some(OciPlatform { architecture: "unknown".into(), os: "unknown".into(), variant: None });
        d.annotations.insert(REFERENCE_DIGEST.into(), a.subject.digest.as_str().into());
        d.annotations.insert(REFERENCE_TYPE.into(), ATTESTATION_MANIFEST.into());
        extra.push(d);
        for b in [layer, config] {
            if !out.blobs.contains(&b) {
                out.blobs.push(b);
            }
        }
        out.manifests.push(manifest);
        out.referrers.push((a.subject.digest.clone(), artifact_manifest(&a.subject, &a.statement)));
    }
    if !attestations.is_empty() {
        out.blobs.push(Blob { media_type: EMPTY_MEDIA_TYPE.into(), bytes: EMPTY_JSON.to_vec() });
    }
    out.index = annotation::stitch_with(entries, annotations, &extra);
    out
}

/// For a finished build: each platform manifest's digest and its statement's bytes (what a signer
/// signs as the attestation's payload).
pub fn statements(attestations: &[Attestation]) -> Vec<(Digest, Vec<u8>)> {
    attestations.iter().map(|a| (a.subject.digest.clone(), a.statement.clone())).collect()
}

#[cfg(test)]
mod tests;
