//! The manifest: what a context holds (paths, modes, file digests), the limits it is held to,
//! its validation ([`ValidManifest`]) and its one encoding, the postcard bytes that are stored,
//! sent and digested.

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};

use super::ContextError;
use crate::digest::Digest;

/// How deeply symlinks may lead through symlinks before it counts as a loop (Linux's own limit).
const MAX_SYMLINK_HOPS: usize = 40;

/// Longest path or symlink target, and longest file name (Linux's PATH_MAX and NAME_MAX).
const MAX_PATH: usize = 4096;
const MAX_NAME: usize = 255;

/// One build context, described without its contents.
///
/// Entries are sorted by path (byte order). Paths are relative, '/'-separated, with no "." or ".."
/// components, no leading or trailing '/' and no empty components. [`ContextManifest::validate`]
/// enforces all of this.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContextManifest {
    pub entries: Vec<Entry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub path: String,
    /// Permission bits only (`& 0o7777`).
    pub mode: u32,
    pub kind: EntryKind,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryKind {
    File { size: u64, digest: Digest },
    Dir,
    Symlink { target: String },
}

/// How big a context may be; the receiving side's configuration.
#[derive(Debug, Clone)]
pub struct ContextLimits {
    /// Most entries (files, directories and symlinks); config key `max_context_files`.
    pub max_files: usize,
    /// Most bytes of file contents; config key `max_context_bytes`.
    pub max_total_bytes: u64,
}

impl Default for ContextLimits {
    fn default() -> Self {
        ContextLimits { max_files: 100_000, max_total_bytes: 2 * 1024 * 1024 * 1024 }
    }
}

impl ContextLimits {
    /// No size limits: structural checks only.
    pub(super) fn unlimited() -> Self {
        ContextLimits { max_files: usize::MAX, max_total_bytes: u64::MAX }
    }

    /// The form sent to agents with each assignment.
    pub fn wire(&self) -> crate::proto::ContextLimits {
        crate::proto::ContextLimits { max_files: self.max_files as u64, max_bytes: self.max_total_bytes }
    }
}

impl From<crate::proto::ContextLimits> for ContextLimits {
    fn from(l: crate::proto::ContextLimits) -> Self {
        ContextLimits { max_files: usize::try_from(l.max_files).unwrap_or(usize::MAX), max_total_bytes: l.max_bytes }
    }
}

/// The largest context manifest a store reads back: about 2.5 million entries.
pub const MAX_MANIFEST_BYTES: u64 = 256 << 20;

impl ContextManifest {
    /// sha256 of the postcard encoding of the manifest: names a context, e.g. for cache keys.
    pub fn digest(&self) -> Digest {
        Digest::of(&self.to_bytes())
    }

    /// The manifest as stored and sent: its postcard encoding, the only one (what [`digest`] hashes,
    /// [`BlobStore::put_manifest`] stores and the client's offer sends).
    ///
    /// [`digest`]: ContextManifest::digest
    /// [`BlobStore::put_manifest`]: super::BlobStore::put_manifest
    pub fn to_bytes(&self) -> Vec<u8> {
        // Strings, integers and enums always encode; postcard fails only on unsupported serde types.
        postcard::to_stdvec(self).expect("a manifest always encodes")
    }

    /// The manifest whose encoding (see [`ContextManifest::to_bytes`]) is `bytes`, stored under
    /// `digest`: decoded, not validated. Only the store decodes manifests, and hands out only
    /// validated ones ([`BlobStore::get_manifest`](super::BlobStore::get_manifest)).
    pub(super) fn decode(digest: &Digest, bytes: &[u8]) -> Result<ContextManifest, ContextError> {
        postcard::from_bytes(bytes)
            .map_err(|e| ContextError::BadManifest { digest: digest.clone(), reason: format!("not a manifest ({e})") })
    }

    /// Every distinct file digest with its size, in manifest order.
    pub fn blobs(&self) -> Vec<(Digest, u64)> {
        let mut seen = HashSet::new();
        self.files().filter(|(d, _)| seen.insert(*d)).map(|(d, size)| (d.clone(), size)).collect()
    }

    /// Sum of the sizes of all files (a file present twice counts twice).
    pub fn total_size(&self) -> u64 {
        self.files().fold(0u64, |sum, (_, size)| sum.saturating_add(size))
    }

    pub fn file_count(&self) -> usize {
        self.files().count()
    }

    fn files(&self) -> impl Iterator<Item = (&Digest, u64)> {
        self.entries.iter().filter_map(|e| match &e.kind {
            EntryKind::File { size, digest } => Some((digest, *size)),
            _ => None,
        })
    }

    /// Checks everything a receiver relies on before writing a context to disk; the error names the
    /// offending path and the rule it breaks:
    /// paths relative and clean (no "..", ".", empty components, leading or trailing '/', NUL bytes),
    /// sorted without duplicates, modes within 0o7777, no entry inside a file or symlink of the
    /// manifest, no symlink that is absolute or resolves (lexically, following the manifest's other
    /// symlinks) outside the context root, and at most `limits` entries and bytes.
    pub fn validate(&self, limits: &ContextLimits) -> Result<(), ContextError> {
        if self.entries.len() > limits.max_files {
            return Err(ContextError::TooManyFiles { count: self.entries.len(), limit: limits.max_files });
        }
        let mut previous: Option<&str> = None;
        for e in &self.entries {
            check_path(&e.path)?;
            if let Some(prev) = previous {
                match prev.cmp(e.path.as_str()) {
                    std::cmp::Ordering::Less => {}
                    std::cmp::Ordering::Equal => return Err(ContextError::Duplicate { path: e.path.clone() }),
                    std::cmp::Ordering::Greater => {
                        return Err(ContextError::Unsorted { path: e.path.clone(), previous: prev.to_string() })
                    }
                }
            }
            previous = Some(&e.path);
            if e.mode & !0o7777 != 0 {
                return Err(ContextError::BadMode { path: e.path.clone(), mode: e.mode });
            }
        }
        let bytes = self.total_size();
        if bytes > limits.max_total_bytes {
            return Err(ContextError::TooLarge { bytes, limit: limits.max_total_bytes });
        }
        let tree = Tree::build(&self.entries)?;
        let mut resolved = HashMap::new();
        for (node, e) in tree.entry.iter().enumerate() {
            let Some(Entry { path, kind: EntryKind::Symlink { target }, .. }) = e else { continue };
            let bad = |reason| ContextError::BadSymlink { path: path.clone(), target: target.clone(), reason };
            if target.is_empty() {
                return Err(bad("has an empty target"));
            }
            if target.contains('\0') {
                return Err(bad("has a target containing a NUL byte"));
            }
            // PATH_MAX counts the terminating NUL: Linux takes at most 4095 bytes.
            if target.len() >= MAX_PATH {
                return Err(bad("has a target of 4096 bytes or more (Linux allows 4095)"));
            }
            match tree.resolve(node, &mut resolved, 0) {
                Ok(_) => {}
                Err(LinkError::Escape) => {
                    return Err(ContextError::SymlinkEscape { path: path.clone(), target: target.clone() })
                }
                Err(LinkError::Loop) => {
                    return Err(bad("is part of a symlink loop or of a chain of more than 40 symlinks"))
                }
            }
        }
        Ok(())
    }
}

/// The manifest's paths as a tree of interned components, so that checking parents and resolving
/// symlinks costs time linear in the size of the manifest, whatever shape a hostile one takes.
struct Tree<'m> {
    children: HashMap<(usize, &'m str), usize>,
    /// The parent of each node; the root (node 0) is its own.
    parent: Vec<usize>,
    /// The entry at each node; `None` for the root and for directories the manifest leaves implicit.
    entry: Vec<Option<&'m Entry>>,
}

/// Where a path leads: a node of the tree, then `detached` components that are not in the manifest
/// (the kernel would fail on those, but they are followed lexically, which is the stricter choice).
#[derive(Clone, Copy)]
struct Location {
    node: usize,
    detached: usize,
}

enum LinkError {
    Escape,
    Loop,
}

impl<'m> Tree<'m> {
    /// Builds the tree from sorted, clean entries, refusing any entry under a file or a symlink (an
    /// entry's ancestors sort before it, so they are already in the tree).
    fn build(entries: &'m [Entry]) -> Result<Self, ContextError> {
        let mut tree = Tree { children: HashMap::new(), parent: vec![0], entry: vec![None] };
        for e in entries {
            let mut node = 0;
            for (i, name) in e.path.split('/').enumerate() {
                if let Some(Entry { kind: kind @ (EntryKind::File { .. } | EntryKind::Symlink { .. }), .. }) =
                    tree.entry[node]
                {
                    let parent_end = e.path.match_indices('/').nth(i - 1).map_or(0, |(at, _)| at);
                    return Err(ContextError::InsideNonDirectory {
                        path: e.path.clone(),
                        parent: e.path[..parent_end].to_string(),
                        parent_kind: if matches!(kind, EntryKind::File { .. }) { "file" } else { "symlink" },
                    });
                }
                let parent = node;
                let next = tree.parent.len();
                node = *tree.children.entry((parent, name)).or_insert(next);
                if node == next {
                    tree.parent.push(parent);
                    tree.entry.push(None);
                }
            }
            tree.entry[node] = Some(e);
        }
        Ok(tree)
    }

    /// Where the symlink at `node` leads, resolved from its directory as the kernel would, following
    /// the manifest's other symlinks (each resolved once and remembered; `None` marks one in progress,
    /// so meeting it again is a loop).
    fn resolve(
        &self,
        node: usize,
        resolved: &mut HashMap<usize, Option<Location>>,
        depth: usize,
    ) -> Result<Location, LinkError> {
        match resolved.get(&node) {
            Some(Some(at)) => return Ok(*at),
            Some(None) => return Err(LinkError::Loop),
            None if depth >= MAX_SYMLINK_HOPS => return Err(LinkError::Loop),
            None => {}
        }
        let Some(Entry { kind: EntryKind::Symlink { target }, .. }) = self.entry[node] else {
            return Ok(Location { node, detached: 0 }); // not a symlink: it leads to itself
        };
        if target.starts_with('/') {
            return Err(LinkError::Escape);
        }
        resolved.insert(node, None);
        let mut at = Location { node: self.parent[node], detached: 0 };
        for component in target.split('/') {
            match component {
                "" | "." => {}
                ".." if at.detached > 0 => at.detached -= 1,
                ".." if at.node == 0 => return Err(LinkError::Escape),
                ".." => at.node = self.parent[at.node],
                _ if at.detached > 0 => at.detached += 1,
                name => match self.children.get(&(at.node, name)) {
                    Some(&child)
                        if matches!(self.entry[child], Some(Entry { kind: EntryKind::Symlink { .. }, .. })) =>
                    {
                        at = self.resolve(child, resolved, depth + 1)?
                    }
                    Some(&child) => at.node = child,
                    None => at.detached = 1,
                },
            }
        }
        resolved.insert(node, Some(at));
        Ok(at)
    }
}

fn check_path(path: &str) -> Result<(), ContextError> {
    let reason = if path.is_empty() {
        "is empty"
    } else if path.contains('\0') {
        "contains a NUL byte"
    } else if path.len() >= MAX_PATH {
        "is 4096 bytes or longer (Linux allows 4095)"
    } else if path.split('/').any(|c| c.len() > MAX_NAME) {
        "has a component longer than 255 bytes"
    } else if path.starts_with('/') {
        "is absolute (paths must be relative to the context root)"
    } else if path.ends_with('/') {
        "ends with '/'"
    } else if path.split('/').any(|c| c == "..") {
        "leaves the context (\"..\" is not allowed)"
    } else if path.split('/').any(|c| c == ".") {
        "has a \".\" component (paths must be clean)"
    } else if path.split('/').any(str::is_empty) {
        "has an empty component (\"//\")"
    } else {
        return Ok(());
    };
    Err(ContextError::InvalidPath { path: path.to_string(), reason })
}

/// A manifest that passed [`ContextManifest::validate`] under some limits: the only kind
/// [`materialise`](fn@super::materialise) accepts, so the checks that keep its writes inside the
/// destination cannot be skipped, and each receiver validates a manifest once (when it arrives,
/// before fetching its files).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidManifest(ContextManifest);

impl ContextManifest {
    /// Validates (see [`ContextManifest::validate`]) and marks the manifest as checked.
    pub fn into_valid(self, limits: &ContextLimits) -> Result<ValidManifest, ContextError> {
        self.validate(limits)?;
        Ok(ValidManifest(self))
    }
}

impl std::ops::Deref for ValidManifest {
    type Target = ContextManifest;
    fn deref(&self) -> &ContextManifest {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::context::fixtures::*;

    fn refusal(entries: Vec<Entry>) -> String {
        manifest(entries).validate(&ContextLimits::default()).unwrap_err().to_string()
    }

    #[test]
    fn validate_refuses_bad_paths() {
        assert_eq!(
            refusal(vec![file("../etc/passwd")]),
            r#"context path "../etc/passwd" leaves the context (".." is not allowed)"#
        );
        assert!(refusal(vec![file("a/../../b")]).contains("leaves the context"));
        assert!(refusal(vec![file("/etc/passwd")]).contains("is absolute"));
        assert!(refusal(vec![file("a/./b")]).contains("\".\" component"));
        assert!(refusal(vec![file(".")]).contains("\".\" component"));
        assert!(refusal(vec![file("a//b")]).contains("empty component"));
        assert!(refusal(vec![file("a/")]).contains("ends with '/'"));
        assert!(refusal(vec![file("")]).contains("is empty"));
        assert!(refusal(vec![file("a\0b")]).contains("NUL"));
        assert!(refusal(vec![file(&"a".repeat(256))]).contains("longer than 255"));
        assert!(refusal(vec![file("a/".repeat(2049).trim_end_matches('/'))]).contains("4096 bytes or longer"));
        // symlink(2) refuses a 4096-byte target: refused here, before anything is written.
        let long = "a/".repeat(2048);
        assert_eq!(long.len(), 4096);
        assert!(refusal(vec![link("l", &long)]).contains("4096 bytes or more"));
        assert_eq!(
            refusal(vec![file("b"), file("a")]),
            "context path \"a\" comes after \"b\"; manifest entries must be sorted by path (byte order)"
        );
        assert!(refusal(vec![file("a"), file("a")]).contains("more than once"));
        let mut odd = file("a");
        odd.mode = 0o100644;
        assert!(refusal(vec![odd]).contains("0o100644"));
    }

    #[test]
    fn validate_refuses_entries_under_files_and_symlinks() {
        let err = refusal(vec![file("f"), file("f/x")]);
        assert!(err.contains(r#""f/x" is inside "f", which the manifest lists as a file"#), "{err}");
        let err = refusal(vec![dir("a"), link("a/l", "../a"), file("a/l/passwd")]);
        assert!(err.contains("lists as a symlink"), "{err}");
    }

    #[test]
    fn validate_refuses_symlinks_leading_out() {
        let err = refusal(vec![dir("a"), link("a/link", "../../x")]);
        assert!(err.starts_with(r#"symlink "a/link" points to "../../x", outside the context"#), "{err}");
        assert!(refusal(vec![link("abs", "/etc/shadow")]).contains("outside the context"));
        // Each link alone stays inside, but a/up2 goes through a/up (the root) and then up again.
        let err = refusal(vec![dir("a"), link("a/up", ".."), link("a/up2", "up/..")]);
        assert!(err.starts_with(r#"symlink "a/up2""#), "{err}");
        assert!(refusal(vec![link("l", "l")]).contains("loop"));
        assert!(refusal(vec![link("l", "")]).contains("empty target"));
        assert!(refusal(vec![link("a", "b"), link("b", "a")]).contains("loop"));
        // Through a symlink met in the middle of a target, and through one that is itself relative.
        assert!(refusal(vec![dir("d"), link("d/l", "../.."), link("m", "d/l/x")]).contains("outside"));
        assert!(refusal(vec![dir("a"), link("a/up", ".."), link("z", "a/up/a/up/..")]).contains("outside"));
        // 41 symlinks in a row is more than the kernel follows.
        let mut chain: Vec<Entry> = (0..41).map(|i| link(&format!("l{i:02}"), &format!("l{:02}", i + 1))).collect();
        chain.push(file("l41"));
        assert!(refusal(chain.clone()).contains("loop"));
        chain.drain(..2);
        manifest(chain).validate(&ContextLimits::default()).unwrap();
    }

    #[test]
    fn validate_enforces_limits() {
        let m = manifest(vec![file("a"), file("b"), file("c")]);
        let err = m.validate(&ContextLimits { max_files: 2, ..Default::default() }).unwrap_err().to_string();
        assert!(err.starts_with("the context has 3 entries"), "{err}");
        assert!(err.contains("over the limit of 2 (config key max_context_files)"), "{err}");
        let err = m.validate(&ContextLimits { max_total_bytes: 2, ..Default::default() }).unwrap_err().to_string();
        assert!(err.contains("3 bytes") && err.contains("max_context_bytes"), "{err}");
        m.validate(&ContextLimits { max_files: 3, max_total_bytes: 3 }).unwrap();
    }

    #[test]
    fn validate_accepts_a_correct_manifest() {
        let m = manifest(vec![
            file(".dockerignore"),
            dir("a"),
            file("a.txt"),
            file("a/b"),
            link("a/l", "b"),
            link("a/up", ".."),
            link("a/via", "up/a.txt"),
            dir("a/z"),
            link("a/z/back", "../../a/./b"),
            link("top", "a/b"),
        ]);
        m.validate(&ContextLimits::default()).unwrap();
        assert_eq!(m.total_size(), 3);
        assert_eq!(m.file_count(), 3);
        assert_eq!(m.digest(), Digest::of(&postcard::to_stdvec(&m).unwrap()));
        let mut other = m.clone();
        other.entries[0].mode = 0o600;
        assert_ne!(m.digest(), other.digest());
    }
}
