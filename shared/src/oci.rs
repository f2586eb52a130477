//! The OCI vocabulary farm speaks: image references, descriptors, image indexes and the on-disk
//! layout buildah exports. Agents push one platform each by digest and the coordinator stitches
//! the digests into one index, so both sides must agree byte for byte on what a reference means
//! and what an index looks like; keeping that here, pure and tested without a registry, is what
//! makes a re-push after a restart produce the same index digest.
//!
//! Only [`read_layout`] (and [`Layout::platform`]) touch the file system; everything else is plain
//! parsing and serialisation. Talking to registries is [`crate::registry`]'s job.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::platform::Platform;

/// An OCI image index (a multi-platform image).
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// An OCI image manifest (one platform).
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// Docker's image manifest, schema 2.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker's manifest list, schema 2 (the predecessor of the OCI index).
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// The registry a reference without one names, as Docker writes it.
pub const DOCKER_HUB: &str = "docker.io";

const NAME_MAX: usize = 255;
const TAG_MAX: usize = 128;

/// An image reference per the OCI distribution reference grammar (as docker/distribution's
/// `reference` package reads it): `[registry[:port]/]path[:tag][@digest]`.
///
/// Stored canonical: a reference without a registry is on `docker.io`, and a single-component
/// path there gets `library/` (`busybox` is `docker.io/library/busybox`); `index.docker.io` is
/// spelled `docker.io`. A first path component is a registry when it contains `.` or `:` or is
/// `localhost`. Path components are lowercase `[a-z0-9]+` joined by `.`, `_`, `__` or dashes;
/// tags are `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`; the name as written is at most 255 characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ImageRef {
    pub registry: String,
    pub repository: String,
    pub tag: Option<String>,
    pub digest: Option<Digest>,
}

/// Why an image reference was refused; says which part is wrong.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[error("invalid tag {input:?}: {reason}")]
pub struct ImageRefError {
    pub input: String,
    pub reason: String,
}

impl ImageRef {
    /// The same repository at `d`, without a tag.
    pub fn with_digest(&self, d: &Digest) -> ImageRef {
        ImageRef { tag: None, digest: Some(d.clone()), ..self.clone() }
    }

    /// The same repository under tag `t`, without a digest. `t` must be a valid tag
    /// (checked in debug builds); tags from parsed references always are.
    pub fn with_tag(&self, t: &str) -> ImageRef {
        debug_assert!(check_tag(t).is_ok(), "invalid tag {t:?}");
        ImageRef { tag: Some(t.to_owned()), digest: None, ..self.clone() }
    }

    /// Whether both name the same repository on the same registry (tags and digests aside).
    pub fn same_repository(&self, other: &ImageRef) -> bool {
        self.registry == other.registry && self.repository == other.repository
    }

    /// `registry/repository`, without tag or digest.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }
}

/// Whether a reference names its registry (`registry.lan:5000/app`, `localhost/app`,
/// `docker.io/me/app`) rather than leaving Docker Hub implied (`app`, `me/app`).
pub fn names_registry(input: &str) -> bool {
    input.split_once('/').is_some_and(|(first, _)| first.contains(['.', ':']) || first == "localhost")
}

impl FromStr for ImageRef {
    type Err = ImageRefError;

    fn from_str(input: &str) -> Result<Self, ImageRefError> {
        parse_ref(input).map_err(|reason| ImageRefError { input: input.to_owned(), reason })
    }
}

/// A `-t` value: a reference to push the built image under, so a tag and no digest. A digest is
/// known only once the image is built: `repo@sha256:…` names no tag to push under, and
/// `repo:tag@sha256:…` would move the tag to another digest than the one written.
pub fn push_tag(input: &str) -> Result<ImageRef, ImageRefError> {
    let r: ImageRef = input.parse()?;
    let Some((without, digest)) = input.rsplit_once('@').filter(|_| r.digest.is_some()) else { return Ok(r) };
    let reason = match &r.tag {
        Some(tag) => format!(
            "a tag to push to cannot pin a digest: the pushed image gets a digest of its own and the tag \"{tag}\" \
             would move to it; drop \"@{digest}\" (-t {without})"
        ),
        None => format!(
            "it names a digest, not a tag to push the image under; give a tag instead (e.g. -t {without}:latest)"
        ),
    };
    Err(ImageRefError { input: input.to_owned(), reason })
}

fn parse_ref(input: &str) -> Result<ImageRef, String> {
    if input.is_empty() {
        return Err("the reference is empty; expected [registry[:port]/]repository[:tag][@digest]".into());
    }
    let (rest, digest) = match input.rsplit_once('@') {
        Some((rest, d)) => (rest, Some(d.parse::<Digest>().map_err(|e| e.to_string())?)),
        None => (input, None),
    };
    let (name, tag) = match rest.rfind(':') {
        Some(i) if !rest[i..].contains('/') => (&rest[..i], Some(&rest[i + 1..])),
        _ => (rest, None),
    };
    if let Some(tag) = tag {
        check_tag(tag)?;
    }
    if name.is_empty() {
        return Err("the repository name is missing".into());
    }
    if name.len() > NAME_MAX {
        return Err(format!("the name is {} characters long; the limit is {NAME_MAX}", name.len()));
    }
    let (registry, path) = match name.split_once('/') {
        Some((first, path)) if first.contains(['.', ':']) || first == "localhost" => (first, path),
        _ => (DOCKER_HUB, name),
    };
    check_registry(registry)?;
    for component in path.split('/') {
        check_component(component, path)?;
    }
    let registry = if registry == "index.docker.io" { DOCKER_HUB } else { registry };
    let repository =
        if registry == DOCKER_HUB && !path.contains('/') { format!("library/{path}") } else { path.to_owned() };
    Ok(ImageRef { registry: registry.to_owned(), repository, tag: tag.map(str::to_owned), digest })
}

fn is_word(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

fn check_tag(tag: &str) -> Result<(), String> {
    if tag.is_empty() {
        return Err("the tag after \":\" is empty".into());
    }
    if tag.len() > TAG_MAX {
        return Err(format!("the tag is {} characters long; the limit is {TAG_MAX}", tag.len()));
    }
    let b = tag.as_bytes();
    if !is_word(b[0]) || !b.iter().all(|&c| is_word(c) || c == b'.' || c == b'-') {
        return Err(format!(
            "the tag {tag:?} may only contain letters, digits, \"_\", \".\" and \"-\", and may not start with \".\" or \"-\""
        ));
    }
    Ok(())
}

/// `[a-z0-9]+(?:(?:[._]|__|[-]*)[a-z0-9]+)*`
pub(crate) fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    let mut i = 0;
    loop {
        let start = i;
        while i < b.len() && alnum(b[i]) {
            i += 1;
        }
        if i == start {
            return false; // empty, or a separator at the start, the end or after another
        }
        if i == b.len() {
            return true;
        }
        let sep = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        match &c[sep..i] {
            "." | "_" | "__" => {}
            s if s.bytes().all(|x| x == b'-') => {}
            _ => return false,
        }
    }
}

fn check_component(c: &str, path: &str) -> Result<(), String> {
    if c.is_empty() {
        return Err(format!("the repository path {path:?} has an empty component"));
    }
    if valid_component(c) {
        return Ok(());
    }
    if valid_component(&c.to_ascii_lowercase()) {
        return Err(format!("repository names must be lowercase ({c:?})"));
    }
    Err(format!(
        "invalid repository path component {c:?}: use lowercase letters and digits, joined by \".\", \"_\", \"__\" or dashes"
    ))
}

fn check_registry(registry: &str) -> Result<(), String> {
    let bad = || format!("invalid registry {registry:?}: expected host[:port]");
    let (host, port) = if let Some(rest) = registry.strip_prefix('[') {
        // An IPv6 address: [::1]:5000
        let (addr, after) = rest.split_once(']').ok_or_else(bad)?;
        if addr.is_empty() || !addr.bytes().all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.') {
            return Err(bad());
        }
        match after {
            "" => return Ok(()),
            p => ("", p.strip_prefix(':').ok_or_else(bad)?),
        }
    } else {
        match registry.split_once(':') {
            Some((h, p)) => (h, p),
            None => (registry, ""),
        }
    };
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    let host_ok = (host.is_empty() && registry.starts_with('[')) || host.split('.').all(label_ok);
    let port_ok = (port.is_empty() && !registry.ends_with(':'))
        || (port.len() <= 5 && port.bytes().all(|b| b.is_ascii_digit()) && !port.is_empty());
    if host_ok && port_ok {
        Ok(())
    } else {
        Err(bad())
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

/// A content descriptor: what a manifest, an index or a layout's index.json says about a blob.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<OciPlatform>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

impl Descriptor {
    /// A descriptor without platform or annotations.
    pub fn new(media_type: &str, digest: Digest, size: u64) -> Descriptor {
        Descriptor { media_type: media_type.to_owned(), digest, size, platform: None, annotations: BTreeMap::new() }
    }
}

/// The `platform` object of an index entry, and the platform fields of an image config.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Hash)]
pub struct OciPlatform {
    pub architecture: String,
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

impl From<&Platform> for OciPlatform {
    fn from(p: &Platform) -> Self {
        let (os, architecture, variant) = p.oci_parts();
        OciPlatform { architecture: architecture.to_owned(), os: os.to_owned(), variant: variant.map(str::to_owned) }
    }
}

impl fmt::Display for OciPlatform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        match &self.variant {
            Some(v) => write!(f, "/{v}"),
            None => Ok(()),
        }
    }
}

/// What is wrong with an index, a manifest or a layout directory.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    #[error("reading {path}: {source}", path = path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{what} is not valid JSON of the expected shape: {source}")]
    Json { what: String, source: serde_json::Error },
    #[error("{0}")]
    Invalid(String),
    #[error("blob {path} does not match its digest {expected}: its content hashes to {actual}", path = path.display())]
    DigestMismatch { path: PathBuf, expected: Digest, actual: Digest },
    #[error("blob {path} is {actual} bytes long, but its descriptor says {expected}", path = path.display())]
    SizeMismatch { path: PathBuf, expected: u64, actual: u64 },
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct IndexOut<'a> {
    schema_version: u32,
    media_type: &'static str,
    manifests: &'a [Descriptor],
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    annotations: &'a BTreeMap<String, String>,
}

/// The bytes of an OCI image index listing `manifests` in the given order (schemaVersion 2,
/// mediaType [`OCI_INDEX`]).
///
/// Deterministic: the same inputs always give the same bytes (and digest), so re-pushing after a
/// restart is idempotent.
pub fn image_index(manifests: &[Descriptor]) -> Vec<u8> {
    image_index_annotated(manifests, &BTreeMap::new())
}

/// [`image_index`] with the index's own `annotations` (none: the same bytes as [`image_index`]).
pub fn image_index_annotated(manifests: &[Descriptor], annotations: &BTreeMap<String, String>) -> Vec<u8> {
    let index = IndexOut { schema_version: 2, media_type: OCI_INDEX, manifests, annotations };
    serde_json::to_vec(&index).expect("an index of plain strings and numbers always serialises")
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct IndexIn {
    schema_version: u32,
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
}

/// Parses an index or manifest list (either media type, or none as in a layout's index.json)
/// into its descriptors (for verification and tests).
pub fn parse_index(bytes: &[u8]) -> Result<Vec<Descriptor>, OciError> {
    let index: IndexIn =
        serde_json::from_slice(bytes).map_err(|source| OciError::Json { what: "the image index".into(), source })?;
    if index.schema_version != 2 {
        return Err(OciError::Invalid(format!(
            "unsupported image index schemaVersion {}: expected 2",
            index.schema_version
        )));
    }
    match index.media_type.as_deref() {
        None | Some(OCI_INDEX | DOCKER_LIST) => {}
        Some(other) => return Err(OciError::Invalid(format!("expected an image index, got a {other}"))),
    }
    index.manifests.ok_or_else(|| OciError::Invalid("the image index has no \"manifests\" list".into()))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ManifestIn {
    schema_version: u32,
    #[serde(default)]
    media_type: Option<String>,
    config: Descriptor,
    layers: Vec<Descriptor>,
}

/// An OCI image layout directory as `buildah push --format oci IMG oci:DIR` writes it: one image
/// manifest in index.json, and its blobs under blobs/sha256.
#[derive(Debug, Clone)]
pub struct Layout {
    pub dir: PathBuf,
    /// The manifest: its media type is the manifest's own `mediaType` (or, without one, the
    /// index.json entry's); no platform, no annotations.
    pub manifest: Descriptor,
    pub manifest_bytes: Vec<u8>,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
}

impl Layout {
    /// The platform the image config declares (digest-checked), to compare with what was asked.
    pub fn platform(&self) -> Result<OciPlatform, OciError> {
        config_platform(&read_blob(&self.dir, &self.config)?)
    }
}

/// Where a layout keeps the blob `d`: `dir/blobs/sha256/<hex>`.
pub fn blob_path(dir: &Path, d: &Digest) -> PathBuf {
    dir.join("blobs").join("sha256").join(d.hex())
}

fn read_file(path: &Path) -> Result<Vec<u8>, OciError> {
    fs::read(path).map_err(|source| OciError::Io { path: path.to_owned(), source })
}

/// Reads a whole blob, checking its size and digest against `d`.
fn read_blob(dir: &Path, d: &Descriptor) -> Result<Vec<u8>, OciError> {
    let path = blob_path(dir, &d.digest);
    let bytes = read_file(&path)?;
    if bytes.len() as u64 != d.size {
        return Err(OciError::SizeMismatch { path, expected: d.size, actual: bytes.len() as u64 });
    }
    let actual = Digest::of(&bytes);
    if actual != d.digest {
        return Err(OciError::DigestMismatch { path, expected: d.digest.clone(), actual });
    }
    Ok(bytes)
}

/// Reads the layout in `dir`: index.json (exactly one manifest), the manifest blob, and the
/// config and layer descriptors.
///
/// The manifest and config blobs are read and checked against their digests; layer blobs are
/// only checked to exist with the right size, since they may be gigabytes and the registry
/// verifies every upload against its digest anyway.
pub fn read_layout(dir: &Path) -> Result<Layout, OciError> {
    let index_path = dir.join("index.json");
    let index = parse_index(&read_file(&index_path)?).map_err(|e| {
        OciError::Invalid(format!("{}: {e} (is {} an OCI layout directory?)", index_path.display(), dir.display()))
    })?;
    let entry = match index.as_slice() {
        [one] => one,
        many => {
            return Err(OciError::Invalid(format!(
                "{} lists {} manifests; expected exactly one image",
                index_path.display(),
                many.len()
            )))
        }
    };
    let manifest_bytes = read_blob(dir, entry)?;
    let what = || format!("manifest {}", blob_path(dir, &entry.digest).display());
    let manifest: ManifestIn =
        serde_json::from_slice(&manifest_bytes).map_err(|source| OciError::Json { what: what(), source })?;
    if manifest.schema_version != 2 {
        return Err(OciError::Invalid(format!("{}: unsupported schemaVersion {}", what(), manifest.schema_version)));
    }
    let media_type = manifest.media_type.unwrap_or_else(|| entry.media_type.clone());
    if media_type != OCI_MANIFEST && media_type != DOCKER_MANIFEST {
        return Err(OciError::Invalid(format!("{}: expected an image manifest, got a {media_type}", what())));
    }
    read_blob(dir, &manifest.config)?;
    for layer in &manifest.layers {
        let path = blob_path(dir, &layer.digest);
        let len = fs::metadata(&path).map_err(|source| OciError::Io { path: path.clone(), source })?.len();
        if len != layer.size {
            return Err(OciError::SizeMismatch { path, expected: layer.size, actual: len });
        }
    }
    Ok(Layout {
        dir: dir.to_owned(),
        manifest: Descriptor::new(&media_type, entry.digest.clone(), entry.size),
        manifest_bytes,
        config: manifest.config,
        layers: manifest.layers,
    })
}

/// The image config's platform fields (architecture, os, variant), to check what buildah produced.
pub fn config_platform(config_json: &[u8]) -> Result<OciPlatform, OciError> {
    serde_json::from_slice(config_json).map_err(|source| OciError::Json { what: "the image config".into(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(c: char) -> Digest {
        format!("sha256:{}", c.to_string().repeat(64)).parse().unwrap()
    }

    fn parse(s: &str) -> ImageRef {
        s.parse().unwrap_or_else(|e| panic!("{s:?} should parse: {e}"))
    }

    #[test]
    fn references_that_name_their_registry() {
        for r in ["registry.lan:5000/app:1", "localhost/app", "docker.io/me/app", "127.0.0.1:5000/a/b:2"] {
            assert!(names_registry(r), "{r}");
        }
        for r in ["app:1", "me/app", "app", "library/app:1"] {
            assert!(!names_registry(r), "{r}");
        }
    }

    #[test]
    fn image_refs_parse_canonically_and_display() {
        let digest = d('a');
        let cases: &[(&str, &str, &str, Option<&str>, &str)] = &[
            ("registry.lan:5000/app:1.2", "registry.lan:5000", "app", Some("1.2"), "registry.lan:5000/app:1.2"),
            ("127.0.0.1:5000/hello:1", "127.0.0.1:5000", "hello", Some("1"), "127.0.0.1:5000/hello:1"),
            ("localhost:5000/a/b/c", "localhost:5000", "a/b/c", None, "localhost:5000/a/b/c"),
            ("localhost/x", "localhost", "x", None, "localhost/x"),
            ("busybox", "docker.io", "library/busybox", None, "docker.io/library/busybox"),
            ("busybox:1.36", "docker.io", "library/busybox", Some("1.36"), "docker.io/library/busybox:1.36"),
            ("user/app", "docker.io", "user/app", None, "docker.io/user/app"),
            ("index.docker.io/library/a", "docker.io", "library/a", None, "docker.io/library/a"),
            ("docker.io/alpine", "docker.io", "library/alpine", None, "docker.io/library/alpine"),
            ("ghcr.io/o/a-b__c.d_e---f:V_1.0-rc", "ghcr.io", "o/a-b__c.d_e---f", Some("V_1.0-rc"), ""),
            ("[::1]:5000/x:y", "[::1]:5000", "x", Some("y"), "[::1]:5000/x:y"),
        ];
        for (input, registry, repository, tag, shown) in cases {
            let r = parse(input);
            assert_eq!(
                (r.registry.as_str(), r.repository.as_str(), r.tag.as_deref(), r.digest.as_ref()),
                (*registry, *repository, *tag, None),
                "{input}"
            );
            if !shown.is_empty() {
                assert_eq!(r.to_string(), *shown);
            }
            assert_eq!(parse(&r.to_string()), r, "display round trip of {input}");
        }
        let r = parse(&format!("app@{digest}"));
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str(), r.tag.as_deref(), r.digest.as_ref()),
            ("docker.io", "library/app", None, Some(&digest))
        );
        assert_eq!(r.to_string(), format!("docker.io/library/app@{digest}"));
        let r = parse(&format!("reg.lan/app:1@{digest}"));
        assert_eq!((r.tag.as_deref(), r.digest.as_ref()), (Some("1"), Some(&digest)));
        assert_eq!(parse(&format!("{}:{}", "a".repeat(10), "t".repeat(128))).tag.unwrap().len(), 128);
    }

    #[test]
    fn push_tags_refuse_digests_and_say_what_to_write() {
        let digest = d('a');
        assert_eq!(push_tag("reg.lan/app:1").unwrap(), parse("reg.lan/app:1"));
        assert_eq!(push_tag("reg.lan/app").unwrap(), parse("reg.lan/app"));
        assert_eq!(
            push_tag(&format!("reg.lan/app:1@{digest}")).unwrap_err().to_string(),
            format!(
                "invalid tag \"reg.lan/app:1@{digest}\": a tag to push to cannot pin a digest: the pushed image gets a \
                 digest of its own and the tag \"1\" would move to it; drop \"@{digest}\" (-t reg.lan/app:1)"
            )
        );
        assert_eq!(
            push_tag(&format!("reg.lan/app@{digest}")).unwrap_err().to_string(),
            format!(
                "invalid tag \"reg.lan/app@{digest}\": it names a digest, not a tag to push the image under; give a tag \
                 instead (e.g. -t reg.lan/app:latest)"
            )
        );
        // What does not parse is refused as parsing refuses it.
        assert_eq!(push_tag("reg.lan/App:1").unwrap_err(), "reg.lan/App:1".parse::<ImageRef>().unwrap_err());
    }

    #[test]
    fn invalid_image_refs_say_what_is_wrong() {
        let err = |s: &str| s.parse::<ImageRef>().unwrap_err().to_string();
        assert_eq!(
            err("registry.lan:5000/App:1.2"),
            r#"invalid tag "registry.lan:5000/App:1.2": repository names must be lowercase ("App")"#
        );
        assert_eq!(
            err("app:v1!"),
            r#"invalid tag "app:v1!": the tag "v1!" may only contain letters, digits, "_", "." and "-", and may not start with "." or "-""#
        );
        let long = format!("app:{}", "t".repeat(129));
        assert_eq!(err(&long), format!("invalid tag {long:?}: the tag is 129 characters long; the limit is 128"));
        assert_eq!(err(":tag"), r#"invalid tag ":tag": the repository name is missing"#);
        assert!(err("").ends_with("the reference is empty; expected [registry[:port]/]repository[:tag][@digest]"));
        assert!(err("a//b").ends_with(r#"the repository path "a//b" has an empty component"#), "{}", err("a//b"));
        let cases = [
            ("Busybox", "must be lowercase"),
            ("app:.x", "may not start with"),
            ("app:-x", "may not start with"),
            ("app:", "tag after \":\" is empty"),
            ("reg.lan/", "empty component"),
            ("a/b/", "empty component"),
            ("/a", "empty component"),
            ("a..b", "invalid repository path component \"a..b\""),
            ("a-", "invalid repository path component"),
            ("_a", "invalid repository path component"),
            ("a___b", "invalid repository path component"),
            ("a b", "invalid repository path component"),
            ("app@sha256:zz", "invalid digest"),
            ("app@md5:abc", "invalid digest"),
            ("-reg.lan/a", "invalid registry \"-reg.lan\""),
            ("reg.lan:50a0/a", "invalid registry"),
            ("reg.lan:/a", "invalid registry"),
            ("[zz]:1/a", "invalid registry"),
        ];
        for (input, want) in cases {
            assert!(err(input).contains(want), "{input:?}: {}", err(input));
        }
        let long_name = format!("reg.lan/{}", "a".repeat(250));
        assert!(err(&long_name).ends_with("the name is 258 characters long; the limit is 255"));
    }

    #[test]
    fn image_ref_helpers() {
        let r = parse("reg.lan:5000/app:1");
        let at = r.with_digest(&d('b'));
        assert_eq!(at.to_string(), format!("reg.lan:5000/app@{}", d('b')));
        assert_eq!(at.with_tag("2").to_string(), "reg.lan:5000/app:2");
        assert!(r.same_repository(&at));
        assert!(!r.same_repository(&parse("reg.lan:5000/other:1")));
        assert!(!r.same_repository(&parse("reg2.lan:5000/app:1")));
        assert_eq!(r.name(), "reg.lan:5000/app");
    }

    fn platform_descriptors() -> Vec<Descriptor> {
        let arm: Platform = "linux/arm/v7".parse().unwrap();
        let amd: Platform = "linux/amd64".parse().unwrap();
        let mut a = Descriptor::new(OCI_MANIFEST, d('1'), 499);
        a.platform = Some(OciPlatform::from(&amd));
        let mut b = Descriptor::new(OCI_MANIFEST, d('2'), 512);
        b.platform = Some(OciPlatform::from(&arm));
        vec![a, b]
    }

    #[test]
    fn image_index_is_deterministic_and_round_trips() {
        let manifests = platform_descriptors();
        let bytes = image_index(&manifests);
        assert_eq!(bytes, image_index(&manifests.clone()));
        assert_eq!(Digest::of(&bytes), Digest::of(&image_index(&platform_descriptors())));
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert_eq!(
            text,
            format!(
                concat!(
                    r#"{{"schemaVersion":2,"mediaType":"{}","manifests":["#,
                    r#"{{"mediaType":"{}","digest":"{}","size":499,"platform":{{"architecture":"amd64","os":"linux"}}}},"#,
                    r#"{{"mediaType":"{}","digest":"{}","size":512,"platform":{{"architecture":"arm","os":"linux","variant":"v7"}}}}]}}"#
                ),
                OCI_INDEX,
                OCI_MANIFEST,
                d('1'),
                OCI_MANIFEST,
                d('2')
            )
        );
        assert_eq!(parse_index(&bytes).unwrap(), manifests);
        // Order is the caller's.
        let reversed: Vec<Descriptor> = manifests.iter().rev().cloned().collect();
        assert_ne!(image_index(&reversed), bytes);
        assert_eq!(parse_index(&image_index(&reversed)).unwrap(), reversed);
    }

    #[test]
    fn parse_index_accepts_docker_lists_and_refuses_manifests() {
        let list = format!(
            r#"{{"schemaVersion":2,"mediaType":"{DOCKER_LIST}","manifests":[{{"mediaType":"{DOCKER_MANIFEST}",
               "digest":"{}","size":7,"platform":{{"architecture":"arm64","os":"linux","variant":"v8","os.features":[]}}}}]}}"#,
            d('c')
        );
        let parsed = parse_index(list.as_bytes()).unwrap();
        assert_eq!(parsed.len(), 1);
        assert_eq!(parsed[0].platform.as_ref().unwrap().to_string(), "linux/arm64/v8");
        let manifest = format!(r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{}},"layers":[]}}"#);
        assert!(parse_index(manifest.as_bytes()).unwrap_err().to_string().contains("expected an image index"));
        assert!(parse_index(br#"{"schemaVersion":1,"manifests":[]}"#)
            .unwrap_err()
            .to_string()
            .contains("schemaVersion 1"));
        assert!(parse_index(b"{").is_err());
        assert!(parse_index(br#"{"schemaVersion":2}"#).is_err());
    }

    #[test]
    fn config_platform_reads_what_buildah_writes() {
        let config = br#"{"created":"2026-01-01T00:00:00Z","architecture":"arm","os":"linux","variant":"v7",
                         "config":{"Labels":{"io.buildah.version":"1.28.2"}},"rootfs":{"type":"layers","diff_ids":[]}}"#;
        let p = config_platform(config).unwrap();
        assert_eq!(p, OciPlatform::from(&"linux/arm/v7".parse::<Platform>().unwrap()));
        let p = config_platform(br#"{"architecture":"arm64","os":"linux"}"#).unwrap();
        assert_eq!((p.architecture.as_str(), p.os.as_str(), p.variant), ("arm64", "linux", None));
        let err = config_platform(br#"{"os":"linux"}"#).unwrap_err().to_string();
        assert!(err.contains("architecture"), "{err}");
    }

    #[test]
    fn layouts_are_read_and_verified() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let blobs = dir.join("blobs/sha256");
        fs::create_dir_all(&blobs).unwrap();
        let put = |bytes: &[u8]| {
            let digest = Digest::of(bytes);
            fs::write(blob_path(dir, &digest), bytes).unwrap();
            digest
        };
        let layer = put(b"layer bytes");
        let config_bytes = br#"{"architecture":"arm64","os":"linux"}"#;
        let config = put(config_bytes);
        let manifest_bytes = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{layer}","size":11}}]}}"#,
            config_bytes.len()
        );
        let manifest = put(manifest_bytes.as_bytes());
        let index = |digest: &Digest, size: usize| {
            format!(
                r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"{OCI_MANIFEST}","digest":"{digest}","size":{size},"annotations":{{"org.opencontainers.image.ref.name":"x"}}}}]}}"#
            )
        };
        fs::write(dir.join("index.json"), index(&manifest, manifest_bytes.len())).unwrap();
        let l = read_layout(dir).unwrap();
        assert_eq!(l.manifest, Descriptor::new(OCI_MANIFEST, manifest.clone(), manifest_bytes.len() as u64));
        assert_eq!(l.manifest_bytes, manifest_bytes.as_bytes());
        assert_eq!(l.config.digest, config);
        assert_eq!(l.layers.len(), 1);
        assert_eq!(l.layers[0].digest, layer);
        assert_eq!(l.platform().unwrap().to_string(), "linux/arm64");

        // A wrong size in index.json, a corrupted layer, a missing blob.
        fs::write(dir.join("index.json"), index(&manifest, 3)).unwrap();
        assert!(matches!(read_layout(dir), Err(OciError::SizeMismatch { expected: 3, .. })));
        fs::write(dir.join("index.json"), index(&manifest, manifest_bytes.len())).unwrap();
        fs::write(blob_path(dir, &layer), b"short").unwrap();
        assert!(matches!(read_layout(dir), Err(OciError::SizeMismatch { expected: 11, actual: 5, .. })));
        fs::write(blob_path(dir, &config), br#"{"architecture":"amd64","os":"linux"}"#).unwrap();
        assert!(matches!(read_layout(dir), Err(OciError::DigestMismatch { .. })));
        fs::remove_file(blob_path(dir, &manifest)).unwrap();
        let err = read_layout(dir).unwrap_err().to_string();
        assert!(err.starts_with("reading ") && err.contains(manifest.hex()), "{err}");
        fs::write(dir.join("index.json"), r#"{"schemaVersion":2,"manifests":[]}"#).unwrap();
        assert!(read_layout(dir).unwrap_err().to_string().contains("lists 0 manifests; expected exactly one image"));
        let err = read_layout(&dir.join("nowhere")).unwrap_err().to_string();
        assert!(err.contains("index.json"), "{err}");
    }
}
