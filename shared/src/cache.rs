//! The layer cache shared through a registry: `--cache-to` / `--cache-from` as buildx spells them
//! (`type=registry,ref=REGISTRY/REPOSITORY[:TAG][,mode=max]`), the coordinator's `cache_repo`, and
//! the repository each platform's cache lives in. **Pure.**
//!
//! buildah (`--layers --cache-to REPO --cache-from REPO`) stores one image per build step in a
//! repository, tagged by the step's cache key. Entries of different platforms must never meet
//! (buildx's multi-node registry cache keeps only the last platform), so every platform gets a
//! repository of its own below the cache reference: `REPOSITORY/linux-arm64` (with a tag,
//! `REPOSITORY/TAG/linux-arm64`). The registry then holds the user's tags and, under the cache
//! repository only, buildah's step tags.

use std::fmt;

use crate::oci::{names_registry, valid_component, ImageRef};
use crate::Platform;

/// A registry cache reference: where every platform's cache repository lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheRef {
    pub registry: String,
    pub repository: String,
    pub tag: Option<String>,
}

/// Why a `--cache-to` / `--cache-from` / `cache_repo` value was refused: the message names the
/// flag (or key), the value, and the fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{flag} {value}: {reason}")]
pub struct CacheError {
    pub flag: String,
    pub value: String,
    pub reason: String,
}

const SPELLING: &str = "type=registry,ref=REGISTRY/REPOSITORY[:TAG][,mode=max]";

impl CacheRef {
    /// A reference as written in `ref=` or in `cache_repo`: `REGISTRY/REPOSITORY[:TAG]`, no
    /// digest, the registry named.
    pub fn parse_ref(value: &str, flag: &str) -> Result<CacheRef, CacheError> {
        let err = |reason: String| CacheError { flag: flag.into(), value: value.into(), reason };
        let r: ImageRef = value.parse().map_err(|e: crate::oci::ImageRefError| err(e.reason))?;
        if !names_registry(value) {
            return Err(err(format!(
                "names no registry; name yours, e.g. registry.lan:5000/{}",
                r.repository.trim_start_matches("library/")
            )));
        }
        if r.digest.is_some() {
            return Err(err("a cache reference has no digest; name a repository and, at most, a tag".into()));
        }
        if let Some(t) = &r.tag {
            if !valid_component(t) {
                return Err(err(format!(
                    "the tag {t:?} also names a repository path (REPOSITORY/{t}/<platform>), so it may only hold \
                     lowercase letters, digits and single '.', '_' or '-' between them; e.g. :{}",
                    t.to_ascii_lowercase()
                )));
            }
        }
        Ok(CacheRef { registry: r.registry, repository: r.repository, tag: r.tag })
    }

    /// A `--cache-to` / `--cache-from` value: `type=registry,ref=...[,mode=max|min]`, or (for
    /// `--cache-from`, as buildx allows) a bare reference.
    pub fn parse_flag(value: &str, flag: &str) -> Result<CacheRef, CacheError> {
        let err = |reason: String| CacheError { flag: flag.into(), value: value.into(), reason };
        if !value.contains('=') {
            if flag == "--cache-from" {
                return Self::parse_ref(value, flag);
            }
            return Err(err(format!("expected {SPELLING}")));
        }
        let mut pairs = vec![];
        for part in value.split(',') {
            let (k, v) =
                part.split_once('=').ok_or_else(|| err(format!("{part:?} is not KEY=VALUE; expected {SPELLING}")))?;
            pairs.push((k, v));
        }
        // The type first: a cache of another type is refused as such, whatever its other keys.
        match pairs.iter().find(|(k, _)| *k == "type").map(|(_, v)| *v) {
            Some("registry") => {}
            Some(other) => {
                return Err(err(format!(
                    "type={other}: farm's agents share their layer cache only through a registry (each keeps its own \
                     between builds); use {flag} {SPELLING}"
                )))
            }
            None => return Err(err(format!("no type= given; expected {SPELLING}"))),
        }
        let mut reference = None;
        for (k, v) in pairs {
            match k {
                "type" => {}
                "ref" => reference = Some(v),
                // buildah stores every step's layer (buildx's mode=max) whatever is asked.
                "mode" if flag == "--cache-to" && (v == "max" || v == "min") => {}
                "mode" if flag == "--cache-to" => return Err(err(format!("mode={v}: expected mode=max or mode=min"))),
                _ => {
                    return Err(err(format!(
                        "farm's registry cache takes type=, ref= and (--cache-to) mode=, not {k}=; expected {SPELLING}"
                    )))
                }
            }
        }
        let reference = reference.ok_or_else(|| err(format!("no ref= given; expected {SPELLING}")))?;
        Self::parse_ref(reference, flag).map_err(|e| err(e.reason))
    }

    /// The repository (no tag) that holds `platform`'s cache: buildah's `--cache-to` /
    /// `--cache-from` value.
    pub fn for_platform(&self, platform: &Platform) -> String {
        let p = platform.to_string().replace('/', "-");
        match &self.tag {
            Some(t) => format!("{}/{}/{t}/{p}", self.registry, self.repository),
            None => format!("{}/{}/{p}", self.registry, self.repository),
        }
    }
}

impl fmt::Display for CacheRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        match &self.tag {
            Some(t) => write!(f, ":{t}"),
            None => Ok(()),
        }
    }
}

/// The `host[:port]` of a repository string such as `registry.lan:5000/farm-cache/linux-amd64`.
pub fn registry_of(repository: &str) -> &str {
    repository.split('/').next().unwrap_or(repository)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Platform {
        s.parse().unwrap()
    }

    #[test]
    fn buildx_spelling_is_read() {
        let c = CacheRef::parse_flag("type=registry,ref=registry.lan:5000/farm-cache,mode=max", "--cache-to").unwrap();
        assert_eq!(c.to_string(), "registry.lan:5000/farm-cache");
        assert_eq!(c.for_platform(&p("linux/arm/v7")), "registry.lan:5000/farm-cache/linux-arm-v7");
        assert_eq!(c.for_platform(&p("linux/amd64")), "registry.lan:5000/farm-cache/linux-amd64");
        let c = CacheRef::parse_flag("type=registry,ref=127.0.0.1:5000/app/cache:main", "--cache-from").unwrap();
        assert_eq!(c.for_platform(&p("linux/arm64")), "127.0.0.1:5000/app/cache/main/linux-arm64");
        let bare = CacheRef::parse_flag("127.0.0.1:5000/c", "--cache-from").unwrap();
        assert_eq!(bare.to_string(), "127.0.0.1:5000/c");
    }

    #[test]
    fn platforms_never_share_a_repository() {
        let c = CacheRef::parse_ref("r.lan/c", "cache_repo").unwrap();
        let all: std::collections::BTreeSet<String> =
            ["linux/amd64", "linux/arm64", "linux/arm/v7", "linux/arm/v6", "linux/386"]
                .iter()
                .map(|s| c.for_platform(&p(s)))
                .collect();
        assert_eq!(all.len(), 5);
    }

    #[test]
    fn wrong_values_name_the_flag_and_the_fix() {
        let e = CacheRef::parse_flag("type=local,dest=/tmp/c", "--cache-to").unwrap_err();
        assert_eq!(
            e.to_string(),
            "--cache-to type=local,dest=/tmp/c: type=local: farm's agents share their layer cache only through a \
             registry (each keeps its own between builds); use --cache-to type=registry,ref=REGISTRY/REPOSITORY[:TAG][,mode=max]"
        );
        let e = CacheRef::parse_flag("type=registry,ref=farm-cache", "--cache-from").unwrap_err();
        assert_eq!(
            e.to_string(),
            "--cache-from type=registry,ref=farm-cache: names no registry; name yours, e.g. registry.lan:5000/farm-cache"
        );
        let e = CacheRef::parse_flag("r.lan/c", "--cache-to").unwrap_err();
        assert!(e.to_string().ends_with("expected type=registry,ref=REGISTRY/REPOSITORY[:TAG][,mode=max]"), "{e}");
        let e = CacheRef::parse_flag("type=registry,ref=r.lan/c:Main", "--cache-to").unwrap_err();
        assert!(e.to_string().contains("the tag \"Main\" also names a repository path"), "{e}");
        let e = CacheRef::parse_flag("type=registry,ref=r.lan/c,compression=zstd", "--cache-to").unwrap_err();
        assert!(e.to_string().contains("not compression="), "{e}");
        let e = CacheRef::parse_flag("type=registry,ref=r.lan/c,mode=all", "--cache-to").unwrap_err();
        assert!(e.to_string().contains("mode=all: expected mode=max or mode=min"), "{e}");
        assert!(CacheRef::parse_flag("type=gha", "--cache-from").unwrap_err().to_string().contains("type=gha"));
    }

    #[test]
    fn registry_of_a_repository() {
        assert_eq!(registry_of("127.0.0.1:5000/c/linux-amd64"), "127.0.0.1:5000");
    }
}
