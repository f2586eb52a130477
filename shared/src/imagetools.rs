//! `farm imagetools inspect`: an image as its registry serves it (an index and each platform's
//! manifest, or a single manifest), and what farm knows of how each platform was built.
//!
//! [`inspect`] is the only part that does I/O (registry GETs); matching against the
//! coordinator's builds ([`attach_builds`]) and rendering ([`text`], [`json`]) are pure.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;

use crate::digest::Digest;
use crate::oci::{self, ImageRef};
use crate::proto::BuildView;
use crate::registry::{Registry, RegistryError};

/// An image as the registry serves it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Inspection {
    /// The reference as asked, normalised (`registry/repository:tag`).
    pub name: String,
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    /// The index's (or single manifest's) own annotations.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// The farm build that pushed this index, if the coordinator knows it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub farm: Option<FarmBuild>,
    /// One per platform: the index's entries, or the single manifest itself.
    pub manifests: Vec<Entry>,
    /// With `--key`: whether a cosign signature of this digest verifies with that key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
}

/// One platform's image manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Entry {
    /// `registry/repository@digest`.
    pub name: String,
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    /// `os/arch[/variant]`, from the index entry (or, for a single manifest, its config).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub platform: Option<String>,
    /// The manifest's own annotations.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// The index entry's annotations (`manifest-descriptor`).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub descriptor_annotations: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub farm: Option<FarmPlatform>,
}

/// The farm build an index came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FarmBuild {
    pub build: String,
    pub created_ms: u64,
}

/// How farm built one platform's manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FarmPlatform {
    pub build: String,
    /// The agent that built it (none if every build that gave it answered from the result cache).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    /// native, emulated or cached
    pub mode: String,
    /// When its build was submitted (Unix ms).
    pub created_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("{what} from {name} is not what it claims to be: {reason}")]
    Malformed { what: String, name: String, reason: String },
}

/// Fetches `r` (by tag or digest) and, for an index, each platform's manifest; for a single
/// manifest, its config (for the platform).
pub async fn inspect(registry: &Registry, r: &ImageRef) -> Result<Inspection, InspectError> {
    let (bytes, media_type, digest) = registry.fetch_manifest(r).await?;
    let name = match (&r.tag, &r.digest) {
        (None, None) => r.with_tag("latest").to_string(),
        _ => r.to_string(),
    };
    let malformed =
        |what: &str, reason: String| InspectError::Malformed { what: what.into(), name: name.clone(), reason };
    let own = annotations_of(&bytes).map_err(|e| malformed("the manifest", e))?;
    let mut manifests = Vec::new();
    if media_type == oci::OCI_INDEX || media_type == oci::DOCKER_LIST {
        for d in oci::parse_index(&bytes).map_err(|e| malformed("the image index", e.to_string()))? {
            let at = r.with_digest(&d.digest);
            let (child, child_type, _) = registry.fetch_manifest(&at).await?;
            manifests.push(Entry {
                name: at.to_string(),
                media_type: if d.media_type.is_empty() { child_type } else { d.media_type.clone() },
                digest: d.digest.clone(),
                size: d.size,
                platform: d.platform.as_ref().map(platform_name),
                annotations: annotations_of(&child).map_err(|e| malformed("a platform's manifest", e))?,
                descriptor_annotations: d.annotations.clone(),
                farm: None,
            });
        }
    } else {
        let config = serde_json::from_slice::<Value>(&bytes)
            .ok()
            .and_then(|v| serde_json::from_value::<oci::Descriptor>(v["config"].clone()).ok())
            .ok_or_else(|| malformed("the manifest", "it has no config descriptor".into()))?;
        let config_bytes = registry.fetch_blob(r, &config.digest).await?;
        let platform = oci::config_platform(&config_bytes).map_err(|e| malformed("the image config", e.to_string()))?;
        manifests.push(Entry {
            name: r.with_digest(&digest).to_string(),
            media_type: media_type.clone(),
            digest: digest.clone(),
            size: bytes.len() as u64,
            platform: Some(platform_name(&platform)),
            annotations: own.clone(),
            descriptor_annotations: BTreeMap::new(),
            farm: None,
        });
    }
    Ok(Inspection {
        name,
        media_type,
        digest,
        size: bytes.len() as u64,
        annotations: own,
        farm: None,
        manifests,
        signature: None,
    })
}

/// The platform as farm spells it where farm knows it (`linux/arm64/v8` is `linux/arm64`), else
/// as the registry does.
fn platform_name(p: &oci::OciPlatform) -> String {
    let raw = p.to_string();
    raw.parse::<crate::Platform>().map(|p| p.to_string()).unwrap_or(raw)
}

fn annotations_of(bytes: &[u8]) -> Result<BTreeMap<String, String>, String> {
    let v: Value = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    match v.get("annotations") {
        None | Some(Value::Null) => Ok(BTreeMap::new()),
        Some(a) => serde_json::from_value(a.clone()).map_err(|e| format!("its annotations are not strings: {e}")),
    }
}

/// Adds what the coordinator's recent builds (newest first, as `ListBuilds` answers) say about
/// this image: the build whose index it is, and per platform the build that made its manifest
/// (one that built it before one answered from the result cache).
pub fn attach_builds(inspection: &mut Inspection, builds: &[BuildView]) {
    inspection.farm = builds
        .iter()
        .find(|b| b.index.as_ref() == Some(&inspection.digest))
        .map(|b| FarmBuild { build: b.id.clone(), created_ms: b.created_ms });
    for entry in &mut inspection.manifests {
        let made = |b: &BuildView, cached: bool| {
            b.platforms
                .iter()
                .find(|t| t.manifest.as_ref() == Some(&entry.digest) && (t.state == "cached") == cached)
                .map(|t| FarmPlatform {
                    build: b.id.clone(),
                    agent: t.agent.clone(),
                    mode: if cached {
                        "cached"
                    } else if t.emulated {
                        "emulated"
                    } else {
                        "native"
                    }
                    .into(),
                    created_ms: b.created_ms,
                    duration_ms: t.duration_ms,
                })
        };
        entry.farm = builds.iter().find_map(|b| made(b, false)).or_else(|| builds.iter().find_map(|b| made(b, true)));
    }
}

/// `2026-12-01 17:30:05 UTC`: provenance's RFC 3339 time, as people read it.
pub fn utc(ms: u64) -> String {
    crate::provenance::rfc3339(ms).replacen('T', " ", 1).replace('Z', " UTC")
}

/// Whether the image (its index or manifest digest) carries a cosign signature, under
/// `sha256-<hex>.sig` in its repository, that `public_key_pem` verifies and that names this
/// digest: `verified`, `unsigned`, or `NOT verified: <why>`.
pub async fn check_signature(registry: &Registry, r: &ImageRef, digest: &Digest, public_key_pem: &str) -> String {
    let tag = r.with_tag(&crate::cosign::tag_for(digest, crate::cosign::SIG_SUFFIX));
    let Ok((manifest, _, _)) = registry.fetch_manifest(&tag).await else { return "unsigned".into() };
    let layers = match crate::cosign::parse_layers(&manifest) {
        Ok(l) => l,
        Err(e) => return format!("NOT verified: {tag} is not a cosign signature image ({e})"),
    };
    for layer in layers.iter().filter(|l| l.media_type == crate::cosign::SIMPLE_SIGNING) {
        use base64::Engine as _;
        let Some(sig) = layer.annotations.get(crate::cosign::SIGNATURE_ANNOTATION) else { continue };
        let Ok(sig) = base64::engine::general_purpose::STANDARD.decode(sig) else { continue };
        let Ok(payload) = registry.fetch_blob(r, &layer.digest).await else { continue };
        let names: Option<String> = serde_json::from_slice::<Value>(&payload)
            .ok()
            .and_then(|p| p["critical"]["image"]["docker-manifest-digest"].as_str().map(String::from));
        if names.as_deref() == Some(digest.as_str())
            && crate::cosign::verify(public_key_pem, &payload, &sig).unwrap_or(false)
        {
            return "verified".into();
        }
    }
    "NOT verified: no signature of this digest verifies with the key".into()
}

/// As `docker buildx imagetools inspect` prints it, plus sizes, annotations and farm's part.
pub fn text(i: &Inspection) -> String {
    let mut out = String::new();
    let mut line = |indent: &str, k: &str, v: &str| out.push_str(&format!("{indent}{:<11}{v}\n", format!("{k}:")));
    line("", "Name", &i.name);
    line("", "MediaType", &i.media_type);
    line("", "Digest", i.digest.as_str());
    line("", "Size", &i.size.to_string());
    if let Some(f) = &i.farm {
        line("", "Farm", &format!("build {} ({})", f.build, utc(f.created_ms)));
    }
    if let Some(s) = &i.signature {
        line("", "Signature", s);
    }
    let annotations = |out: &mut String, indent: &str, title: &str, a: &BTreeMap<String, String>| {
        if !a.is_empty() {
            out.push_str(&format!("{indent}{title}:\n"));
            for (k, v) in a {
                out.push_str(&format!("{indent}  {k}: {v}\n"));
            }
        }
    };
    annotations(&mut out, "", "Annotations", &i.annotations);
    out.push_str("\nManifests:\n");
    for (n, e) in i.manifests.iter().enumerate() {
        if n > 0 {
            out.push('\n');
        }
        let mut line = |k: &str, v: &str| out.push_str(&format!("  {:<11}{v}\n", format!("{k}:")));
        line("Name", &e.name);
        line("MediaType", &e.media_type);
        line("Platform", e.platform.as_deref().unwrap_or("unknown"));
        line("Size", &e.size.to_string());
        if let Some(f) = &e.farm {
            let on = match &f.agent {
                Some(a) => format!("{} on {a}", f.mode),
                None => f.mode.clone(),
            };
            let took = f.duration_ms.map(|ms| format!(", {:.1} s", ms as f64 / 1000.0)).unwrap_or_default();
            line("Farm", &format!("{on}, build {} ({}){took}", f.build, utc(f.created_ms)));
        }
        annotations(&mut out, "  ", "Annotations", &e.annotations);
        annotations(&mut out, "  ", "Descriptor annotations", &e.descriptor_annotations);
    }
    out
}

/// The `--format json` document.
pub fn json(i: &Inspection) -> Value {
    serde_json::to_value(i).expect("plain data serialises")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::TaskView;

    fn d(c: char) -> Digest {
        format!("sha256:{}", c.to_string().repeat(64)).parse().unwrap()
    }

    fn entry(digest: Digest, platform: &str) -> Entry {
        Entry {
            name: format!("reg.lan:5000/app@{digest}"),
            media_type: oci::OCI_MANIFEST.into(),
            digest,
            size: 500,
            platform: Some(platform.into()),
            annotations: BTreeMap::new(),
            descriptor_annotations: BTreeMap::new(),
            farm: None,
        }
    }

    fn task(platform: &str, state: &str, agent: Option<&str>, emulated: bool, manifest: Digest) -> TaskView {
        TaskView {
            platform: platform.parse().unwrap(),
            state: state.into(),
            agent: agent.map(Into::into),
            emulated,
            attempt: 1,
            manifest: Some(manifest),
            duration_ms: Some(12_345),
        }
    }

    fn build(id: &str, created_ms: u64, index: Digest, platforms: Vec<TaskView>) -> BuildView {
        BuildView {
            id: id.into(),
            state: "succeeded".into(),
            client: "me".into(),
            created_ms,
            tags: vec![],
            index: Some(index),
            error: None,
            platforms,
        }
    }

    #[test]
    fn builds_are_matched_by_digest_preferring_the_one_that_built() {
        let mut i = Inspection {
            name: "reg.lan:5000/app:1".into(),
            media_type: oci::OCI_INDEX.into(),
            digest: d('1'),
            size: 700,
            annotations: [("org.opencontainers.image.source".to_string(), "https://example.test/app".to_string())]
                .into(),
            farm: None,
            manifests: vec![entry(d('a'), "linux/amd64"), entry(d('b'), "linux/arm64"), entry(d('c'), "linux/arm/v7")],
            signature: None,
        };
        // Newest first: a rebuild answered from the cache, then the build that made them.
        let builds = vec![
            build("newer", 2_000_000, d('2'), vec![task("linux/amd64", "cached", None, false, d('a'))]),
            build(
                "older",
                1_764_610_205_000,
                d('1'),
                vec![
                    task("linux/amd64", "done", Some("x86"), false, d('a')),
                    task("linux/arm64", "done", Some("x86"), true, d('b')),
                ],
            ),
        ];
        attach_builds(&mut i, &builds);
        assert_eq!(i.farm, Some(FarmBuild { build: "older".into(), created_ms: 1_764_610_205_000 }));
        let farm: Vec<Option<(String, Option<String>, String)>> = i
            .manifests
            .iter()
            .map(|e| e.farm.as_ref().map(|f| (f.build.clone(), f.agent.clone(), f.mode.clone())))
            .collect();
        assert_eq!(
            farm,
            vec![
                Some(("older".into(), Some("x86".into()), "native".into())),
                Some(("older".into(), Some("x86".into()), "emulated".into())),
                None,
            ]
        );
        let t = text(&i);
        assert!(t.starts_with(&format!(
            "Name:      reg.lan:5000/app:1\nMediaType: {}\nDigest:    {}\nSize:      700\nFarm:      build older \
             (2025-12-01 17:30:05 UTC)\nAnnotations:\n  org.opencontainers.image.source: https://example.test/app\n\n\
             Manifests:\n  Name:      reg.lan:5000/app@{}\n",
            oci::OCI_INDEX,
            d('1'),
            d('a')
        )));
        assert!(t.contains("  Platform:  linux/arm64\n  Size:      500\n  Farm:      emulated on x86, build older (2025-12-01 17:30:05 UTC), 12.3 s\n"), "{t}");
        let j = json(&i);
        assert_eq!(j["manifests"][1]["farm"]["agent"], "x86");
        assert_eq!(j["manifests"][1]["farm"]["mode"], "emulated");
        assert_eq!(j["manifests"][2].get("farm"), None);
        assert_eq!(j["manifests"][0]["platform"], "linux/amd64");
        assert_eq!(j["digest"], d('1').to_string());

        // Only a cached answer known: it says so, without an agent.
        let mut only_cached = i.clone();
        attach_builds(&mut only_cached, &builds[..1]);
        let f = only_cached.manifests[0].farm.as_ref().unwrap();
        assert_eq!((f.build.as_str(), f.agent.as_deref(), f.mode.as_str()), ("newer", None, "cached"));
        assert_eq!(only_cached.farm, None);
    }
}
