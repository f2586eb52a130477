//! `--annotation` and `--label`, as `docker buildx build` spells them (pure).
//!
//! An annotation is `[TYPES[PLATFORMS]:]KEY=VALUE`: TYPES is one or more of `index`, `manifest`,
//! `manifest-descriptor` and `index-descriptor`, comma-separated (none: `manifest`, buildx's
//! default); PLATFORMS (only for the manifest types) limits it to those platforms' manifests, e.g.
//! `manifest[linux/arm64]:org.example.arm=yes`. Where each lands:
//! - `index`: the stitched image index's own `annotations`;
//! - `manifest-descriptor`: the index's entry (descriptor) for each matching platform;
//! - `manifest`: each matching platform's image manifest (the agent's builder writes it);
//! - `index-descriptor`: the descriptor of the index in an OCI layout's `index.json`
//!   (`-o type=oci`); a registry has no such descriptor, so a pushed image does not carry it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::oci::{self, Descriptor};
use crate::platform::Platform;

/// Where an annotation goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum AnnotationKind {
    Index,
    Manifest,
    ManifestDescriptor,
    IndexDescriptor,
}

impl AnnotationKind {
    pub const ALL: [AnnotationKind; 4] = [
        AnnotationKind::Index,
        AnnotationKind::Manifest,
        AnnotationKind::ManifestDescriptor,
        AnnotationKind::IndexDescriptor,
    ];

    /// buildx's name for it.
    pub fn name(self) -> &'static str {
        match self {
            AnnotationKind::Index => "index",
            AnnotationKind::Manifest => "manifest",
            AnnotationKind::ManifestDescriptor => "manifest-descriptor",
            AnnotationKind::IndexDescriptor => "index-descriptor",
        }
    }

    /// Whether it concerns one platform's image (and so takes a `[platform]` filter).
    pub fn per_platform(self) -> bool {
        matches!(self, AnnotationKind::Manifest | AnnotationKind::ManifestDescriptor)
    }
}

/// One annotation of one kind (`index,manifest:K=V` gives two).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Annotation {
    pub kind: AnnotationKind,
    /// Only these platforms (manifest kinds only); empty: every platform.
    pub platforms: Vec<Platform>,
    pub key: String,
    pub value: String,
}

impl Annotation {
    /// Whether it applies, as `kind`, to `platform`'s image.
    pub fn applies(&self, kind: AnnotationKind, platform: &Platform) -> bool {
        self.kind == kind && (self.platforms.is_empty() || self.platforms.contains(platform))
    }
}

/// A bad `--annotation` or `--label` value: the flag, the value, what is wrong and the fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{flag} {input:?}: {reason}")]
pub struct AnnotationError {
    pub flag: &'static str,
    pub input: String,
    pub reason: String,
}

const EXAMPLE: &str = "e.g. --annotation index:org.opencontainers.image.source=https://example.com/app or \
                       --annotation 'manifest[linux/arm64]:KEY=VALUE'";

/// Parses one `--annotation` value into one annotation per type it names.
pub fn parse_annotation(input: &str) -> Result<Vec<Annotation>, AnnotationError> {
    let fail = |reason: String| AnnotationError { flag: "--annotation", input: input.to_owned(), reason };
    let Some((left, value)) = input.split_once('=') else {
        return Err(fail(format!("expected [TYPE:]KEY=VALUE, with a '=' ({EXAMPLE})")));
    };
    // The type prefix ends at the first ':' outside the brackets (keys have none; values may).
    let (prefix, key) = match left.split_once(':') {
        Some((p, k)) => (Some(p), k),
        None => (None, left),
    };
    if key.is_empty() {
        return Err(fail(format!("the annotation has no key before '=' ({EXAMPLE})")));
    }
    if let Some(c) = key.chars().find(|c| c.is_whitespace() || c.is_control() || matches!(c, '[' | ']' | ',')) {
        return Err(fail(format!(
            "the key {key:?} contains {c:?}; annotation keys look like org.opencontainers.image.source"
        )));
    }
    let (kinds, platforms) = match prefix {
        None => (vec![AnnotationKind::Manifest], vec![]),
        Some(prefix) => {
            let (types, platforms) = match prefix.split_once('[') {
                Some((types, rest)) => {
                    let Some(list) = rest.strip_suffix(']') else {
                        return Err(fail(format!(
                            "the platform list in {prefix:?} must end with ']' right before ':', e.g. \
                             manifest[linux/arm64,linux/amd64]:KEY=VALUE"
                        )));
                    };
                    let mut platforms = Vec::new();
                    for p in list.split(',') {
                        let parsed: Platform = p.parse().map_err(|e| fail(format!("in [{list}]: {e}")))?;
                        if !platforms.contains(&parsed) {
                            platforms.push(parsed);
                        }
                    }
                    (types, platforms)
                }
                None => (prefix, vec![]),
            };
            let mut kinds = Vec::new();
            for t in types.split(',') {
                let kind = AnnotationKind::ALL.into_iter().find(|k| k.name() == t).ok_or_else(|| {
                    fail(format!(
                        "unknown annotation type {t:?}: use index, manifest, manifest-descriptor or index-descriptor \
                         (comma-separated for several, e.g. index,manifest:KEY=VALUE)"
                    ))
                })?;
                if !platforms.is_empty() && !kind.per_platform() {
                    return Err(fail(format!(
                        "a [platform] filter applies to manifest and manifest-descriptor annotations only, not to \
                         {t}; write {t}:{key}=... without it"
                    )));
                }
                if !kinds.contains(&kind) {
                    kinds.push(kind);
                }
            }
            (kinds, platforms)
        }
    };
    Ok(kinds
        .into_iter()
        .map(|kind| Annotation { kind, platforms: platforms.clone(), key: key.to_owned(), value: value.to_owned() })
        .collect())
}

/// Parses every `--annotation` value and checks that each platform filter names a platform this
/// build builds (`platforms`).
pub fn parse_annotations(inputs: &[String], platforms: &[Platform]) -> Result<Vec<Annotation>, AnnotationError> {
    let mut out = Vec::new();
    for input in inputs {
        let parsed = parse_annotation(input)?;
        for a in &parsed {
            if let Some(p) = a.platforms.iter().find(|p| !platforms.contains(p)) {
                let built: Vec<String> = platforms.iter().map(ToString::to_string).collect();
                return Err(AnnotationError {
                    flag: "--annotation",
                    input: input.clone(),
                    reason: format!(
                        "{p} is not a platform of this build ({}); name one of those or add {p} to --platform",
                        built.join(", ")
                    ),
                });
            }
        }
        out.extend(parsed);
    }
    Ok(out)
}

/// Parses `--label KEY=VALUE` values (image config labels), in order.
pub fn parse_labels(inputs: &[String]) -> Result<Vec<(String, String)>, AnnotationError> {
    inputs
        .iter()
        .map(|input| {
            let fail = |reason: &str| AnnotationError { flag: "--label", input: input.clone(), reason: reason.into() };
            let (k, v) =
                input.split_once('=').ok_or_else(|| fail("expected KEY=VALUE, e.g. --label org.example.team=farm"))?;
            if k.is_empty() || k.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(fail(
                    "the label key must be non-empty and without spaces, e.g. --label org.example.team=farm",
                ));
            }
            Ok((k.to_owned(), v.to_owned()))
        })
        .collect()
}

/// The annotations of `kind` for `platform`'s image (later values win).
pub fn for_platform(annotations: &[Annotation], kind: AnnotationKind, platform: &Platform) -> BTreeMap<String, String> {
    annotations.iter().filter(|a| a.applies(kind, platform)).map(|a| (a.key.clone(), a.value.clone())).collect()
}

/// The annotations of a kind that is not per platform (`index`, `index-descriptor`).
pub fn of_kind(annotations: &[Annotation], kind: AnnotationKind) -> BTreeMap<String, String> {
    annotations.iter().filter(|a| a.kind == kind).map(|a| (a.key.clone(), a.value.clone())).collect()
}

/// The bytes of a build's image index: one entry per platform's manifest, in the order given,
/// with the `manifest-descriptor` annotations on each matching entry and the `index` annotations
/// on the index. The coordinator stitches with it and the CLI checks the digest it was told with
/// it, so both make the same bytes.
pub fn stitch(entries: &[(Platform, Descriptor)], annotations: &[Annotation]) -> Vec<u8> {
    stitch_with(entries, annotations, &[])
}

/// [`stitch`] with `extra` entries after the platforms' (attestation manifests), as they are.
pub fn stitch_with(entries: &[(Platform, Descriptor)], annotations: &[Annotation], extra: &[Descriptor]) -> Vec<u8> {
    let mut descriptors: Vec<Descriptor> = entries
        .iter()
        .map(|(p, d)| {
            let mut d = d.clone();
            d.platform = Some(p.into());
            d.annotations.extend(for_platform(annotations, AnnotationKind::ManifestDescriptor, p));
            d
        })
        .collect();
    descriptors.extend_from_slice(extra);
    oci::image_index_annotated(&descriptors, &of_kind(annotations, AnnotationKind::Index))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Digest;

    fn p(s: &str) -> Platform {
        s.parse().unwrap()
    }

    fn ann(kind: AnnotationKind, platforms: &[&str], key: &str, value: &str) -> Annotation {
        Annotation { kind, platforms: platforms.iter().map(|s| p(s)).collect(), key: key.into(), value: value.into() }
    }

    #[test]
    fn buildx_spellings_parse() {
        use AnnotationKind::*;
        assert_eq!(parse_annotation("org.example.a=1").unwrap(), vec![ann(Manifest, &[], "org.example.a", "1")]);
        assert_eq!(
            parse_annotation("index:org.opencontainers.image.source=https://example.test/app").unwrap(),
            vec![ann(Index, &[], "org.opencontainers.image.source", "https://example.test/app")]
        );
        assert_eq!(parse_annotation("manifest:k=").unwrap(), vec![ann(Manifest, &[], "k", "")]);
        assert_eq!(
            parse_annotation("manifest-descriptor:k=a=b").unwrap(),
            vec![ann(ManifestDescriptor, &[], "k", "a=b")]
        );
        assert_eq!(parse_annotation("index-descriptor:k=v").unwrap(), vec![ann(IndexDescriptor, &[], "k", "v")]);
        assert_eq!(
            parse_annotation("index,manifest:k=v").unwrap(),
            vec![ann(Index, &[], "k", "v"), ann(Manifest, &[], "k", "v")]
        );
        assert_eq!(
            parse_annotation("manifest[linux/arm64]:org.example.arm=yes").unwrap(),
            vec![ann(Manifest, &["linux/arm64"], "org.example.arm", "yes")]
        );
        assert_eq!(
            parse_annotation("manifest-descriptor[linux/arm64,linux/amd64]:k=v").unwrap(),
            vec![ann(ManifestDescriptor, &["linux/arm64", "linux/amd64"], "k", "v")]
        );
        assert_eq!(
            parse_annotation("manifest,manifest-descriptor[aarch64]:k=v").unwrap(),
            vec![ann(Manifest, &["linux/arm64"], "k", "v"), ann(ManifestDescriptor, &["linux/arm64"], "k", "v")]
        );
    }

    #[test]
    fn bad_annotations_say_what_and_how() {
        let e = |s: &str| parse_annotation(s).unwrap_err().to_string();
        assert_eq!(
            e("foo"),
            "--annotation \"foo\": expected [TYPE:]KEY=VALUE, with a '=' (e.g. --annotation \
             index:org.opencontainers.image.source=https://example.com/app or --annotation \
             'manifest[linux/arm64]:KEY=VALUE')"
        );
        assert_eq!(
            e("layer:k=v"),
            "--annotation \"layer:k=v\": unknown annotation type \"layer\": use index, manifest, manifest-descriptor \
             or index-descriptor (comma-separated for several, e.g. index,manifest:KEY=VALUE)"
        );
        assert_eq!(
            e("manifest[linux/sparc]:k=v"),
            format!(
                "--annotation \"manifest[linux/sparc]:k=v\": in [linux/sparc]: {}",
                "linux/sparc".parse::<Platform>().unwrap_err()
            )
        );
        assert_eq!(
            e("index[linux/arm64]:k=v"),
            "--annotation \"index[linux/arm64]:k=v\": a [platform] filter applies to manifest and manifest-descriptor \
             annotations only, not to index; write index:k=... without it"
        );
        assert_eq!(
            e("manifest[linux/arm64:k=v"),
            "--annotation \"manifest[linux/arm64:k=v\": the platform list in \"manifest[linux/arm64\" must end with ']' \
             right before ':', e.g. manifest[linux/arm64,linux/amd64]:KEY=VALUE"
        );
        assert!(e("index:=v").contains("the annotation has no key before '='"), "{}", e("index:=v"));
        assert!(e("index:a b=v").contains("the key \"a b\" contains ' '"), "{}", e("index:a b=v"));
        assert!(e(":k=v").contains("unknown annotation type \"\""), "{}", e(":k=v"));
    }

    #[test]
    fn a_platform_filter_names_a_platform_being_built() {
        let built = [p("linux/amd64"), p("linux/arm64")];
        assert!(parse_annotations(&["manifest[linux/arm64]:k=v".into()], &built).is_ok());
        assert_eq!(
            parse_annotations(&["index:a=1".into(), "manifest[linux/arm/v7]:k=v".into()], &built)
                .unwrap_err()
                .to_string(),
            "--annotation \"manifest[linux/arm/v7]:k=v\": linux/arm/v7 is not a platform of this build (linux/amd64, \
             linux/arm64); name one of those or add linux/arm/v7 to --platform"
        );
    }

    #[test]
    fn labels_parse() {
        assert_eq!(
            parse_labels(&["org.example.team=farm".into(), "empty=".into()]).unwrap(),
            vec![("org.example.team".into(), "farm".into()), ("empty".into(), String::new())]
        );
        assert_eq!(
            parse_labels(&["team".into()]).unwrap_err().to_string(),
            "--label \"team\": expected KEY=VALUE, e.g. --label org.example.team=farm"
        );
        assert!(parse_labels(&["=x".into()]).unwrap_err().to_string().contains("must be non-empty"));
    }

    #[test]
    fn stitched_index_carries_index_and_descriptor_annotations() {
        let d = |n: &str| Descriptor::new(oci::OCI_MANIFEST, Digest::of(n.as_bytes()), 10);
        let entries = vec![(p("linux/amd64"), d("a")), (p("linux/arm64"), d("b"))];
        // Without annotations: exactly the plain index.
        let plain: Vec<Descriptor> =
            entries.iter().map(|(pl, d)| Descriptor { platform: Some(pl.into()), ..d.clone() }).collect();
        assert_eq!(stitch(&entries, &[]), oci::image_index(&plain));

        let anns: Vec<Annotation> = [
            "index:org.opencontainers.image.source=https://example.test/app",
            "manifest-descriptor[linux/arm64]:org.example.d=arm",
            "manifest[linux/arm64]:org.example.m=only-in-the-manifest",
        ]
        .iter()
        .flat_map(|s| parse_annotation(s).unwrap())
        .collect();
        let json: serde_json::Value = serde_json::from_slice(&stitch(&entries, &anns)).unwrap();
        assert_eq!(
            json["annotations"],
            serde_json::json!({"org.opencontainers.image.source": "https://example.test/app"})
        );
        assert_eq!(json["manifests"][0].get("annotations"), None);
        assert_eq!(json["manifests"][1]["annotations"], serde_json::json!({"org.example.d": "arm"}));
        assert_eq!(for_platform(&anns, AnnotationKind::Manifest, &p("linux/amd64")), BTreeMap::new());
        assert_eq!(
            for_platform(&anns, AnnotationKind::Manifest, &p("linux/arm64")),
            [("org.example.m".to_string(), "only-in-the-manifest".to_string())].into()
        );
    }
}
