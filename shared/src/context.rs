//! Build contexts, sent content-addressed and checked on arrival.
//!
//! A context travels as a [`ContextManifest`] (every path with its mode and, for a file, the digest of
//! its contents) plus only the blobs the receiver lacks. Naming contents by digest is what makes a
//! rebuild cheap: coordinator and agents keep a [`BlobStore`], so sending a context again after an
//! edit moves only the files that changed, and identical files move once.
//!
//! A manifest comes from another machine, so it is [validated](ContextManifest::validate) before
//! anything is written: an agent must never write outside its work directory, whatever a manifest
//! says. Paths are relative and clean, nothing sits under a file or a symlink, and no symlink points
//! out of the context, not even through other symlinks. [`materialise`] takes only a validated manifest,
//! and the blob store renames a blob into place only once its bytes hash to the expected digest.
//!
//! On the sending side, [`scan`] walks a directory with Docker's `.dockerignore` rules
//! ([`DockerIgnore`]), so that a context holds the same files here as it would for `docker build`.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::digest::{Digest, Hasher};

/// Buffer size for hashing and copying file contents.
const BUF_SIZE: usize = 64 * 1024;

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
    fn unlimited() -> Self {
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

#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    #[error("context manifest {digest}: {reason}")]
    BadManifest { digest: Digest, reason: String },
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("context path {path:?} {reason}")]
    InvalidPath { path: String, reason: &'static str },
    #[error("context path {path:?} comes after {previous:?}; manifest entries must be sorted by path (byte order)")]
    Unsorted { path: String, previous: String },
    #[error("context path {path:?} appears more than once in the manifest")]
    Duplicate { path: String },
    #[error(
        "context path {path:?} is inside {parent:?}, which the manifest lists as a {parent_kind}; only \
         directories may hold entries (a path under a symlink could leave the context)"
    )]
    InsideNonDirectory { path: String, parent: String, parent_kind: &'static str },
    #[error("context path {path:?} has mode {mode:#o}; only permission bits (at most 0o7777) are allowed")]
    BadMode { path: String, mode: u32 },
    #[error(
        "symlink {path:?} points to {target:?}, outside the context; make it point inside the context \
         or add it to .dockerignore"
    )]
    SymlinkEscape { path: String, target: String },
    #[error("symlink {path:?} (to {target:?}) {reason}; fix it or add it to .dockerignore")]
    BadSymlink { path: String, target: String, reason: &'static str },
    #[error(
        "the context has {count} entries (files, directories and symlinks), over the limit of {limit} \
         (config key max_context_files); exclude what the build does not need in .dockerignore or raise \
         the limit"
    )]
    TooManyFiles { count: usize, limit: usize },
    #[error(
        "the context holds {bytes} bytes of files, over the limit of {limit} bytes (config key \
         max_context_bytes); exclude what the build does not need in .dockerignore or raise the limit"
    )]
    TooLarge { bytes: u64, limit: u64 },
    #[error(
        "{path:?} is {kind}; build contexts may hold only files, directories and symlinks (add it to \
         .dockerignore)"
    )]
    SpecialFile { path: String, kind: &'static str },
    #[error("{} has a {what} that is not valid UTF-8, which a context cannot carry; rename it or add it to .dockerignore", path.display())]
    NonUtf8 { path: PathBuf, what: &'static str },
    #[error("the build context {} is not a directory; give a directory as the context", path.display())]
    NotADirectory { path: PathBuf },
    #[error("there is no Dockerfile at {}; use -f to point at another one", path.display())]
    NoDockerfile { path: PathBuf },
    #[error("the Dockerfile {} is not a regular file; use -f to point at the Dockerfile", path.display())]
    DockerfileNotAFile { path: PathBuf },
    #[error(
        "the Dockerfile {path:?} is not inside the build context; give -f a path inside the context \
         directory"
    )]
    DockerfileOutside { path: String },
    #[error(".dockerignore line {line}: the pattern {pattern:?} {reason}")]
    IgnorePattern { line: usize, pattern: String, reason: &'static str },
    #[error(
        "blob content hashes to {got}, not the expected {expected}; it was corrupted or changed while \
         being sent, and was discarded (send it again)"
    )]
    DigestMismatch { expected: Digest, got: Digest },
    #[error("blob {0} is not in the blob store; upload it before materialising the context")]
    MissingBlob(Digest),
    #[error(
        "context file {path:?}: blob {digest} holds {got} bytes but the manifest says {expected}; the \
         manifest does not match its contents"
    )]
    BlobSize { path: String, digest: Digest, expected: u64, got: u64 },
    #[error(
        "{} is not an empty directory; a context can only be materialised into an empty or absent \
         directory",
        path.display()
    )]
    DestNotEmpty { path: PathBuf },
    #[error("storing blobs failed: {0}")]
    Sink(&'static str),
}

impl ContextError {
    /// Whether this is a write that failed because the disk is full.
    pub fn is_no_space(&self) -> bool {
        matches!(self, ContextError::Io { source, .. } if crate::disk::is_no_space(source))
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ContextError + '_ {
    move |source| ContextError::Io { path: path.to_path_buf(), source }
}

// ---------------------------------------------------------------------------------------------
// Manifest

impl ContextManifest {
    /// sha256 of the postcard encoding of the manifest: names a context, e.g. for cache keys.
    pub fn digest(&self) -> Digest {
        Digest::of(&self.to_bytes())
    }

    /// The manifest as stored and sent: its postcard encoding.
    pub fn to_bytes(&self) -> Vec<u8> {
        // Strings, integers and enums always encode; postcard fails only on unsupported serde types.
        postcard::to_stdvec(self).expect("a manifest always encodes")
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

// ---------------------------------------------------------------------------------------------
// .dockerignore

/// Docker's .dockerignore semantics (moby's patternmatcher and dockerignore.ReadAll): one pattern per
/// line, lines starting with '#' are comments, blank lines are skipped, surrounding whitespace is
/// trimmed, a leading "/" is stripped and patterns are cleaned like Go's `filepath.Clean`; '*' and '?'
/// don't match '/', '**' matches any number of directories, `[...]` is a character class and '\'
/// escapes; a '!' prefix re-includes; the LAST matching pattern wins; a pattern matches a path if it
/// matches the path or any of its parent directories (excluding "dir" excludes everything under it).
#[derive(Debug, Clone, Default)]
pub struct DockerIgnore {
    patterns: Vec<Pattern>,
}

#[derive(Debug, Clone)]
struct Pattern {
    exclusion: bool,
    matcher: Matcher,
}

/// moby compiles a pattern to one of four match types; the non-regexp ones compare the cleaned text
/// literally (so a '\' there is not an escape), which is kept here for fidelity.
#[derive(Debug, Clone)]
enum Matcher {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Tokens(Vec<Tok>),
}

#[derive(Debug, Clone)]
enum Tok {
    Lit(char),
    /// `?`: one character other than '/'.
    Any,
    /// `*`: any run of characters other than '/'.
    Star,
    /// `**` followed by more pattern: `(.*/)?`, any number of leading directories.
    DirStar,
    /// `**` at the end: anything at all.
    Rest,
    Class(Class),
}

#[derive(Debug, Clone)]
struct Class {
    negated: bool,
    ranges: Vec<(char, char)>,
}

impl Class {
    fn matches(&self, c: char) -> bool {
        self.ranges.iter().any(|&(lo, hi)| lo <= c && c <= hi) != self.negated
    }
}

#[derive(PartialEq, Eq, Clone, Copy)]
enum MatchType {
    Exact,
    Prefix,
    Suffix,
    Regexp,
}

impl Matcher {
    /// moby's `Pattern.compile`, producing tokens instead of a regexp.
    fn compile(pattern: &str) -> Result<Matcher, &'static str> {
        let chars: Vec<char> = pattern.chars().collect();
        let n = chars.len();
        let mut tokens = Vec::new();
        let mut mt = MatchType::Exact;
        let mut i = 0;
        let mut iteration = 0;
        while i < n {
            let c = chars[i];
            i += 1;
            match c {
                '*' if chars.get(i) == Some(&'*') => {
                    i += 1;
                    if chars.get(i) == Some(&'/') {
                        i += 1;
                    }
                    if i == n {
                        if mt == MatchType::Exact {
                            mt = MatchType::Prefix;
                        } else {
                            tokens.push(Tok::Rest);
                            mt = MatchType::Regexp;
                        }
                    } else {
                        tokens.push(Tok::DirStar);
                        mt = MatchType::Regexp;
                    }
                    if iteration == 0 {
                        mt = MatchType::Suffix;
                    }
                }
                '*' => {
                    tokens.push(Tok::Star);
                    mt = MatchType::Regexp;
                }
                '?' => {
                    tokens.push(Tok::Any);
                    mt = MatchType::Regexp;
                }
                '\\' => match chars.get(i) {
                    Some(&next) => {
                        tokens.push(Tok::Lit(next));
                        i += 1;
                    }
                    None => tokens.push(Tok::Lit('\\')),
                },
                '[' => {
                    tokens.push(Tok::Class(parse_class(&chars, &mut i)?));
                    mt = MatchType::Regexp;
                }
                ']' => {
                    tokens.push(Tok::Lit(']'));
                    mt = MatchType::Regexp;
                }
                c => tokens.push(Tok::Lit(c)),
            }
            iteration += 1;
        }
        Ok(match mt {
            MatchType::Exact => Matcher::Exact(pattern.to_string()),
            MatchType::Prefix => Matcher::Prefix(pattern[..pattern.len() - 2].to_string()),
            MatchType::Suffix => Matcher::Suffix(pattern[2..].to_string()),
            MatchType::Regexp => Matcher::Tokens(tokens),
        })
    }

    fn matches(&self, path: &str) -> bool {
        match self {
            Matcher::Exact(p) => path == p,
            Matcher::Prefix(p) => path.starts_with(p.as_str()),
            Matcher::Suffix(s) => path.ends_with(s.as_str()) || s.strip_prefix('/').is_some_and(|s| path == s),
            Matcher::Tokens(tokens) => run_tokens(tokens, &path.chars().collect::<Vec<_>>(), false),
        }
    }

    /// Whether some path starting with `prefix` could match.
    fn could_match_with_prefix(&self, prefix: &str) -> bool {
        match self {
            Matcher::Exact(p) => p.starts_with(prefix),
            Matcher::Prefix(p) => p.starts_with(prefix) || prefix.starts_with(p.as_str()),
            Matcher::Suffix(_) => true,
            Matcher::Tokens(tokens) => run_tokens(tokens, &prefix.chars().collect::<Vec<_>>(), true),
        }
    }
}

/// Parses a character class after its '[' (Go regexp syntax, which is what moby hands it to):
/// optional '^', a ']' first is literal, `a-z` ranges, '\' escapes.
fn parse_class(chars: &[char], i: &mut usize) -> Result<Class, &'static str> {
    const UNCLOSED: &str = "has a '[' without its closing ']'";
    let mut negated = false;
    if chars.get(*i) == Some(&'^') {
        negated = true;
        *i += 1;
    }
    let mut ranges = Vec::new();
    let mut first = true;
    let one = |i: &mut usize| -> Result<char, &'static str> {
        let c = *chars.get(*i).ok_or(UNCLOSED)?;
        *i += 1;
        if c == '\\' {
            let c = *chars.get(*i).ok_or(UNCLOSED)?;
            *i += 1;
            return Ok(c);
        }
        Ok(c)
    };
    loop {
        match chars.get(*i) {
            None => return Err(UNCLOSED),
            Some(']') if !first => {
                *i += 1;
                return Ok(Class { negated, ranges });
            }
            Some('[') if chars.get(*i + 1) == Some(&':') => {
                return Err(
                    "uses a POSIX class like [:alpha:], which is not supported; list the characters or a range",
                );
            }
            _ => {}
        }
        first = false;
        let lo = one(i)?;
        let hi = if chars.get(*i) == Some(&'-') && chars.get(*i + 1).is_some_and(|&c| c != ']') {
            *i += 1;
            let hi = one(i)?;
            if hi < lo {
                return Err("has a character range whose end comes before its start");
            }
            hi
        } else {
            lo
        };
        ranges.push((lo, hi));
    }
}

/// Matches `s` against the tokens (a whole match), or with `prefix` set, tells whether `s` can be
/// extended into a match. Dynamic programming over (token, position): linear in both.
fn run_tokens(tokens: &[Tok], s: &[char], prefix: bool) -> bool {
    let n = s.len();
    // next[si]: can tokens[t + 1..] match s[si..]?
    let mut next: Vec<bool> = (0..=n).map(|si| si == n).collect();
    for tok in tokens.iter().rev() {
        let mut cur = vec![false; n + 1];
        // For DirStar: is there a '/' at some j >= si after which the rest matches?
        let mut slash_then_rest = false;
        for si in (0..=n).rev() {
            if si < n {
                slash_then_rest = slash_then_rest || (s[si] == '/' && next[si + 1]);
            }
            cur[si] = (prefix && si == n)
                || match tok {
                    Tok::Lit(c) => si < n && s[si] == *c && next[si + 1],
                    Tok::Any => si < n && s[si] != '/' && next[si + 1],
                    Tok::Class(class) => si < n && class.matches(s[si]) && next[si + 1],
                    Tok::Star => next[si] || (si < n && s[si] != '/' && cur[si + 1]),
                    Tok::Rest => next[si] || (si < n && cur[si + 1]),
                    Tok::DirStar => next[si] || slash_then_rest,
                };
        }
        next = cur;
    }
    next[0]
}

/// Go's `filepath.Clean` for '/'-separated paths.
fn clean(path: &str) -> String {
    let rooted = path.starts_with('/');
    let mut out: Vec<&str> = Vec::new();
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                if out.last().is_some_and(|last| *last != "..") {
                    out.pop();
                } else if !rooted {
                    out.push("..");
                }
            }
            c => out.push(c),
        }
    }
    let body = out.join("/");
    if rooted {
        format!("/{body}")
    } else if body.is_empty() {
        ".".to_string()
    } else {
        body
    }
}

impl DockerIgnore {
    pub fn parse(text: &str) -> Result<Self, ContextError> {
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let mut patterns = Vec::new();
        for (index, line) in text.lines().enumerate() {
            if line.starts_with('#') {
                continue;
            }
            let mut pattern = line.trim();
            if pattern.is_empty() {
                continue;
            }
            let err =
                |reason| ContextError::IgnorePattern { line: index + 1, pattern: line.trim().to_string(), reason };
            let exclusion = pattern.starts_with('!');
            if exclusion {
                pattern = pattern[1..].trim();
                if pattern.is_empty() {
                    return Err(err("is a lone '!'; put the pattern to re-include after it"));
                }
            }
            let mut cleaned = clean(pattern);
            if cleaned.len() > 1 && cleaned.starts_with('/') {
                cleaned.remove(0);
            }
            let matcher = Matcher::compile(&cleaned).map_err(err)?;
            patterns.push(Pattern { exclusion, matcher });
        }
        Ok(DockerIgnore { patterns })
    }

    /// Whether `rel_path` (relative to the context root, '/'-separated) is left out of the context
    /// (moby's `MatchesOrParentMatches`).
    pub fn is_excluded(&self, rel_path: &str) -> bool {
        let file = clean(rel_path);
        // The parent directories: "a" and "a/b" for "a/b/c".
        let parents: Vec<&str> = file.match_indices('/').map(|(i, _)| &file[..i]).collect();
        let mut matched = false;
        for pattern in &self.patterns {
            // An exclusion can only change an included path, an exception only an excluded one.
            if pattern.exclusion != matched {
                continue;
            }
            if pattern.matcher.matches(&file) || parents.iter().any(|p| pattern.matcher.matches(p)) {
                matched = !pattern.exclusion;
            }
        }
        matched
    }

    /// Whether an exception pattern could re-include something below the directory `rel_dir`, in which
    /// case an excluded directory must still be read (as Docker does).
    fn may_reinclude_under(&self, rel_dir: &str) -> bool {
        let prefix = format!("{}/", clean(rel_dir));
        self.patterns.iter().any(|p| p.exclusion && p.matcher.could_match_with_prefix(&prefix))
    }
}

// ---------------------------------------------------------------------------------------------
// Scanning

/// A scanned context: the manifest, and where each blob's bytes live on this machine.
#[derive(Debug, Clone)]
pub struct Scanned {
    pub manifest: ContextManifest,
    pub sources: HashMap<Digest, PathBuf>,
    /// How many files this scan read and hashed (the rest came from the scan cache).
    pub hashed: usize,
}

impl Scanned {
    /// Adds (or replaces) a file at `path` whose bytes are `bytes`, kept at `source` on this
    /// machine: `farm build -f -` puts the Dockerfile read from stdin into the context this way.
    pub fn add_file(&mut self, path: &str, bytes: &[u8], source: PathBuf) -> Result<(), ContextError> {
        let digest = Digest::of(bytes);
        self.manifest.entries.retain(|e| e.path != path);
        let entry =
            Entry { path: path.into(), mode: 0o644, kind: EntryKind::File { size: bytes.len() as u64, digest } };
        let at = self.manifest.entries.partition_point(|e| e.path < entry.path);
        self.manifest.entries.insert(at, entry);
        self.sources.insert(Digest::of(bytes), source);
        self.manifest.validate(&ContextLimits::unlimited())
    }
}

/// Walks `root` (a directory), honouring `root/.dockerignore` if present, into a manifest plus where
/// each blob's bytes live locally.
///
/// The Dockerfile (`dockerfile`, a path relative to root) and `.dockerignore` are always included even
/// if a pattern excludes them. Regular files are hashed; directories become Dir entries (so empty
/// directories survive); symlinks are recorded, not followed; sockets, FIFOs and devices are refused.
/// An excluded directory is skipped unread unless an exception pattern (`!dir/keep`) could re-include
/// something under it. The result passes [`ContextManifest::validate`]'s structural checks (a symlink
/// leading out of the context is refused here, before anything is sent); size limits are left to the
/// caller, who knows its configuration.
pub fn scan(root: &Path, dockerfile: &str) -> Result<Scanned, ContextError> {
    scan_cached(root, dockerfile, None)
}

/// As [`scan`], hashing only the files whose `stat` changed since the last scan of `root` recorded
/// in `cache_dir` (see [`crate::scancache`]), and recording this one there: what `farm build` does.
pub fn scan_cached(root: &Path, dockerfile: &str, cache_dir: Option<&Path>) -> Result<Scanned, ContextError> {
    scan_cached_at(root, dockerfile, cache_dir, SystemTime::now())
}

/// [`scan_cached`] at time `now` (what the cache takes as settled depends on it).
pub fn scan_cached_at(
    root: &Path,
    dockerfile: &str,
    cache_dir: Option<&Path>,
    now: SystemTime,
) -> Result<Scanned, ContextError> {
    let meta = fs::metadata(root).map_err(io_err(root))?;
    if !meta.is_dir() {
        return Err(ContextError::NotADirectory { path: root.to_path_buf() });
    }
    let dockerfile_rel = clean(dockerfile);
    if dockerfile.starts_with('/') || dockerfile_rel == ".." || dockerfile_rel.starts_with("../") {
        return Err(ContextError::DockerfileOutside { path: dockerfile.to_string() });
    }
    let dockerfile_abs = root.join(&dockerfile_rel);
    match fs::metadata(&dockerfile_abs) {
        Ok(m) if m.is_file() => {}
        Ok(_) => return Err(ContextError::DockerfileNotAFile { path: dockerfile_abs }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(ContextError::NoDockerfile { path: dockerfile_abs })
        }
        Err(e) => return Err(io_err(&dockerfile_abs)(e)),
    }
    walk_root(root, vec![dockerfile_rel, ".dockerignore".to_string()], cache_dir.map(|d| (d, now)))
}

/// A named context (`--build-context NAME=DIR`): as [`scan`], honouring `root/.dockerignore`,
/// but with no Dockerfile in it.
pub fn scan_dir(root: &Path) -> Result<Scanned, ContextError> {
    let meta = fs::metadata(root).map_err(io_err(root))?;
    if !meta.is_dir() {
        return Err(ContextError::NotADirectory { path: root.to_path_buf() });
    }
    walk_root(root, vec![".dockerignore".to_string()], None)
}

fn walk_root(
    root: &Path,
    always: Vec<String>,
    cache_dir: Option<(&Path, SystemTime)>,
) -> Result<Scanned, ContextError> {
    let ignore_path = root.join(".dockerignore");
    let ignore = match fs::read(&ignore_path) {
        Ok(bytes) => DockerIgnore::parse(&String::from_utf8_lossy(&bytes))?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => DockerIgnore::default(),
        Err(e) => return Err(io_err(&ignore_path)(e)),
    };
    let cache = cache_dir.map(|(dir, now)| crate::scancache::ScanCache::load(dir, root, now));
    let mut walker = Walker {
        ignore: &ignore,
        always,
        entries: Vec::new(),
        sources: HashMap::new(),
        buf: vec![0; BUF_SIZE],
        cache,
        hashed: 0,
    };
    walker.walk(root, "")?;
    let Walker { mut entries, sources, cache, hashed, .. } = walker;
    if let Some(cache) = cache {
        cache.save();
    }
    entries.sort_by(|a, b| a.path.cmp(&b.path));
    let manifest = ContextManifest { entries };
    manifest.validate(&ContextLimits::unlimited())?;
    Ok(Scanned { manifest, sources, hashed })
}

/// `farm build -` (as `docker build -`): a context sent as a tar (plain or gzip-compressed) on
/// stdin, unpacked into `dest` to be scanned like a directory. Entries leading out of `dest`
/// (`..`, absolute paths after the leading `/` is stripped) are refused by the tar reader.
pub fn unpack_context_tar(mut reader: impl io::Read, dest: &Path) -> Result<(), ContextError> {
    let mut magic = [0u8; 2];
    let mut got = 0;
    while got < 2 {
        match reader.read(&mut magic[got..]).map_err(io_err(dest))? {
            0 => break,
            n => got += n,
        }
    }
    let head = io::Cursor::new(magic[..got].to_vec()).chain(reader);
    let unpack = |r: &mut dyn io::Read| {
        let mut archive = tar::Archive::new(r);
        archive.set_preserve_permissions(true);
        archive.set_overwrite(true);
        archive.unpack(dest).map_err(|e| ContextError::Io {
            path: dest.to_path_buf(),
            source: io::Error::new(e.kind(), format!("the context tar on stdin: {e}")),
        })
    };
    if magic[..got] == [0x1f, 0x8b] {
        unpack(&mut flate2::read::GzDecoder::new(head))
    } else {
        let mut head = head;
        unpack(&mut head)
    }
}

struct Walker<'a> {
    ignore: &'a DockerIgnore,
    /// Paths kept whatever .dockerignore says: the Dockerfile and .dockerignore.
    always: Vec<String>,
    entries: Vec<Entry>,
    sources: HashMap<Digest, PathBuf>,
    buf: Vec<u8>,
    /// Digests of unchanged files from the last scan, when the caller keeps a cache.
    cache: Option<crate::scancache::ScanCache>,
    hashed: usize,
}

impl Walker<'_> {
    /// Adds what is under `dir` (at `rel`, "" for the root); tells whether it added anything.
    fn walk(&mut self, dir: &Path, rel: &str) -> Result<bool, ContextError> {
        let mut names = Vec::new();
        for item in fs::read_dir(dir).map_err(io_err(dir))? {
            names.push(item.map_err(io_err(dir))?.file_name());
        }
        names.sort();
        let mut added = false;
        for name in names {
            let abs = dir.join(&name);
            let lossy = name.to_string_lossy();
            let path = if rel.is_empty() { lossy.to_string() } else { format!("{rel}/{lossy}") };
            let forced = self.always.contains(&path);
            let excluded = !forced && self.ignore.is_excluded(&path);
            let meta = fs::symlink_metadata(&abs).map_err(io_err(&abs))?;
            let file_type = meta.file_type();
            if excluded && !(file_type.is_dir() && self.must_descend(&path)) {
                continue;
            }
            if name.to_str().is_none() {
                return Err(ContextError::NonUtf8 { path: abs, what: "name" });
            }
            let mode = meta.permissions().mode() & 0o7777;
            let kind = if file_type.is_dir() {
                let inner = self.walk(&abs, &path)?;
                if excluded && !inner {
                    continue;
                }
                EntryKind::Dir
            } else if file_type.is_file() {
                let stamp = crate::scancache::Stamp::of(&meta);
                let (digest, size) = match self.cache.as_mut().and_then(|c| c.get(&path, &stamp)) {
                    Some(digest) => (digest, stamp.size),
                    None => {
                        let (digest, size) = self.hash(&abs)?;
                        self.hashed += 1;
                        if let Some(c) = self.cache.as_mut() {
                            c.put(&path, stamp, digest.clone());
                        }
                        (digest, size)
                    }
                };
                self.sources.entry(digest.clone()).or_insert(abs);
                EntryKind::File { size, digest }
            } else if file_type.is_symlink() {
                let target = fs::read_link(&abs).map_err(io_err(&abs))?;
                let target = target
                    .into_os_string()
                    .into_string()
                    .map_err(|_| ContextError::NonUtf8 { path: abs, what: "symlink target" })?;
                EntryKind::Symlink { target }
            } else {
                let kind = if file_type.is_block_device() || file_type.is_char_device() {
                    "a device file"
                } else if file_type.is_fifo() {
                    "a FIFO (named pipe)"
                } else if file_type.is_socket() {
                    "a socket"
                } else {
                    "neither a file, a directory nor a symlink"
                };
                return Err(ContextError::SpecialFile { path, kind });
            };
            self.entries.push(Entry { path, mode, kind });
            added = true;
        }
        Ok(added)
    }

    fn must_descend(&self, dir: &str) -> bool {
        self.ignore.may_reinclude_under(dir)
            || self.always.iter().any(|a| a.strip_prefix(dir).is_some_and(|rest| rest.starts_with('/')))
    }

    fn hash(&mut self, path: &Path) -> Result<(Digest, u64), ContextError> {
        // O_NOFOLLOW and O_NONBLOCK: if the file was swapped for a symlink or a FIFO since it was
        // listed, fail (or see it is not a file) instead of following it or blocking.
        let mut file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(path)
            .map_err(io_err(path))?;
        if !file.metadata().map_err(io_err(path))?.is_file() {
            return Err(ContextError::Io {
                path: path.to_path_buf(),
                source: io::Error::other("changed from a regular file while the context was scanned"),
            });
        }
        let mut hasher = Hasher::default();
        let mut size = 0u64;
        loop {
            let n = match file.read(&mut self.buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_err(path)(e)),
            };
            hasher.update(&self.buf[..n]);
            size += n as u64;
        }
        Ok((hasher.finish(), size))
    }
}

// ---------------------------------------------------------------------------------------------
// Blob store

/// A directory of blobs named by digest: `<root>/sha256/<first two hex>/<hex>`. Writes go to a temp
/// file in `<root>/tmp`, are hashed as they are written, and are renamed into place only if the
/// digest matches, so a blob under its name always holds exactly those bytes.
#[derive(Debug, Clone)]
pub struct BlobStore {
    root: PathBuf,
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

impl BlobStore {
    /// Opens the store at `root`, creating its directories.
    pub fn open(root: &Path) -> Result<Self, ContextError> {
        for dir in [root.join("sha256"), root.join("tmp")] {
            fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        }
        Ok(BlobStore { root: root.to_path_buf() })
    }

    /// The store's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn path(&self, d: &Digest) -> PathBuf {
        let hex = d.hex();
        self.root.join("sha256").join(&hex[..2]).join(hex)
    }

    pub fn has(&self, d: &Digest) -> bool {
        self.path(d).is_file()
    }

    /// The digests of `wanted` not in the store, in order, without duplicates.
    pub fn missing(&self, wanted: &[Digest]) -> Vec<Digest> {
        let mut seen = HashSet::new();
        wanted.iter().filter(|d| seen.insert(*d) && !self.has(d)).cloned().collect()
    }

    /// Starts writing the blob `expected`; see [`BlobWriter::commit`].
    pub fn writer(&self, expected: Digest) -> Result<BlobWriter, ContextError> {
        let pid = std::process::id();
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        loop {
            // Unique within the process by the counter, across processes by pid and clock; create_new
            // makes any collision (a pid reused in another namespace) a retry, never a shared file.
            let count = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
            let tmp = self.root.join("tmp").join(format!("{}.{pid}.{nanos}.{count}", expected.hex()));
            match OpenOptions::new().write(true).create_new(true).open(&tmp) {
                Ok(file) => {
                    return Ok(BlobWriter {
                        file: BufWriter::with_capacity(BUF_SIZE, file),
                        hasher: Hasher::default(),
                        written: 0,
                        dest: self.path(&expected),
                        expected,
                        tmp,
                        done: false,
                    })
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(io_err(&tmp)(e)),
            }
        }
    }

    /// Stores a context manifest as a blob (its postcard encoding, whose digest is
    /// [`ContextManifest::digest`]) and returns that digest. Manifests travel between the CLI, the
    /// coordinator and agents as blobs, so a context of any allowed size fits no frame limit.
    pub fn put_manifest(&self, m: &ContextManifest) -> Result<Digest, ContextError> {
        self.put(&m.to_bytes())
    }

    /// The manifest stored under `d`, decoded but not validated (see [`ContextManifest::into_valid`]).
    /// At most [`MAX_MANIFEST_BYTES`] are read.
    pub fn get_manifest(&self, d: &Digest) -> Result<ContextManifest, ContextError> {
        let path = self.path(d);
        let size = fs::metadata(&path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => ContextError::MissingBlob(d.clone()),
            _ => io_err(&path)(e),
        })?;
        if size.len() > MAX_MANIFEST_BYTES {
            return Err(ContextError::BadManifest {
                digest: d.clone(),
                reason: format!("{} bytes, over the {MAX_MANIFEST_BYTES} a manifest may have", size.len()),
            });
        }
        let bytes = fs::read(&path).map_err(io_err(&path))?;
        postcard::from_bytes(&bytes)
            .map_err(|e| ContextError::BadManifest { digest: d.clone(), reason: format!("not a manifest ({e})") })
    }

    /// Stores a small blob held in memory and returns its digest.
    pub fn put(&self, bytes: &[u8]) -> Result<Digest, ContextError> {
        let digest = Digest::of(bytes);
        if !self.has(&digest) {
            let mut writer = self.writer(digest.clone())?;
            writer.write_all(bytes).map_err(io_err(&writer.tmp))?;
            writer.commit()?;
        }
        Ok(digest)
    }
}

/// A blob being written: bytes go to a temp file and through a hasher. Dropped without a successful
/// [`commit`](BlobWriter::commit), it removes its temp file.
pub struct BlobWriter {
    file: BufWriter<File>,
    hasher: Hasher,
    written: u64,
    expected: Digest,
    tmp: PathBuf,
    dest: PathBuf,
    done: bool,
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

impl BlobWriter {
    /// Checks the digest of what was written and, if it is the expected one, moves the blob into place
    /// (synced first, so a crash cannot leave a truncated blob under a valid name). Returns the number
    /// of bytes. On a mismatch the temp file is removed and nothing is stored.
    pub fn commit(self) -> Result<u64, ContextError> {
        self.finish()?.persist()
    }

    /// The first half of [`BlobWriter::commit`]: flushes and checks the digest. The blob is not in
    /// the store until [`Written::persist`].
    pub fn finish(mut self) -> Result<Written, ContextError> {
        self.file.flush().map_err(io_err(&self.tmp))?;
        let got = std::mem::take(&mut self.hasher).finish();
        if got != self.expected {
            return Err(ContextError::DigestMismatch { expected: self.expected.clone(), got });
        }
        let file = self.file.get_ref().try_clone().map_err(io_err(&self.tmp))?;
        self.done = true;
        Ok(Written {
            file,
            tmp: std::mem::take(&mut self.tmp),
            dest: std::mem::take(&mut self.dest),
            written: self.written,
            done: false,
        })
    }
}

/// A blob whose bytes and digest are right, still under its temporary name.
pub struct Written {
    file: File,
    tmp: PathBuf,
    dest: PathBuf,
    written: u64,
    done: bool,
}

impl Written {
    /// Syncs the blob to disk, then moves it into place; returns its size.
    pub fn persist(mut self) -> Result<u64, ContextError> {
        self.file.sync_data().map_err(io_err(&self.tmp))?;
        if let Some(parent) = self.dest.parent() {
            fs::create_dir_all(parent).map_err(io_err(parent))?;
        }
        fs::rename(&self.tmp, &self.dest).map_err(io_err(&self.dest))?;
        self.done = true;
        Ok(self.written)
    }
}

impl Drop for Written {
    fn drop(&mut self) {
        if !self.done {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        if !self.done {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// Pieces of blobs in transit to a [`BlobSink`].
enum Piece {
    Start(Digest),
    Bytes(bytes::Bytes),
    End,
}

/// Blobs in flight to the [`BlobSink`]'s writer: enough to keep the network busy while it writes.
const SINK_PIECES: usize = 64;
/// Written blobs waiting for their sync: bounded, because each holds an open file.
const SYNC_BACKLOG: usize = 64;
/// Threads syncing written blobs.
const SYNCERS: usize = 4;

/// Stores a stream of blobs off the async threads, in two stages: one thread hashes and writes
/// each blob as its bytes arrive, another syncs finished blobs to disk and moves them into
/// place. Receiving the next bytes overlaps storing the last ones, and no fsync stands in the
/// network's way; [`BlobSink::finish`] returns once every blob is durable, or with the first error.
pub struct BlobSink {
    tx: tokio::sync::mpsc::Sender<Piece>,
    stages: tokio::task::JoinHandle<Result<u64, ContextError>>,
}

impl BlobSink {
    pub fn new(store: std::sync::Arc<BlobStore>) -> Self {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Piece>(SINK_PIECES);
        let stages = tokio::task::spawn_blocking(move || {
            let (to_sync, synced) = std::sync::mpsc::sync_channel::<Written>(SYNC_BACKLOG);
            // Several syncers: a file system commits concurrent fsyncs together, which is what
            // makes thousands of small files cheap to make durable.
            let synced = std::sync::Arc::new(std::sync::Mutex::new(synced));
            let syncers: Vec<_> = (0..SYNCERS)
                .map(|_| {
                    let synced = synced.clone();
                    std::thread::spawn(move || -> Result<u64, ContextError> {
                        let mut n = 0;
                        loop {
                            let next = synced.lock().unwrap_or_else(|p| p.into_inner()).recv();
                            let Ok(w) = next else { return Ok(n) };
                            w.persist()?;
                            n += 1;
                        }
                    })
                })
                .collect();
            let wrote = (|| -> Result<(), ContextError> {
                let mut current: Option<BlobWriter> = None;
                while let Some(piece) = rx.blocking_recv() {
                    match piece {
                        Piece::Start(digest) => current = Some(store.writer(digest)?),
                        Piece::Bytes(b) => {
                            let w = current.as_mut().ok_or(ContextError::Sink("bytes before a blob"))?;
                            w.write_all(&b).map_err(|e| io_err(&w.tmp)(e))?;
                        }
                        Piece::End => {
                            let w = current.take().ok_or(ContextError::Sink("a blob ended that never began"))?;
                            // The syncer stopped: its error is the one to report.
                            if to_sync.send(w.finish()?).is_err() {
                                return Ok(());
                            }
                        }
                    }
                }
                Ok(())
            })();
            drop(to_sync);
            let mut stored = 0;
            let mut failed = None;
            for syncer in syncers {
                match syncer.join() {
                    Ok(Ok(n)) => stored += n,
                    Ok(Err(e)) => failed = failed.or(Some(e)),
                    Err(_) => failed = failed.or(Some(ContextError::Sink("a sync thread panicked"))),
                }
            }
            if let Some(e) = failed {
                return Err(e);
            }
            wrote?;
            Ok(stored)
        });
        BlobSink { tx, stages }
    }

    /// A new blob begins; `false` once the sink has stopped (then [`BlobSink::finish`] says why).
    pub async fn start(&mut self, digest: Digest) -> bool {
        self.tx.send(Piece::Start(digest)).await.is_ok()
    }

    pub async fn bytes(&mut self, bytes: bytes::Bytes) -> bool {
        self.tx.send(Piece::Bytes(bytes)).await.is_ok()
    }

    /// The current blob is complete: its digest is checked, then it is synced and moved into place.
    pub async fn end(&mut self) -> bool {
        self.tx.send(Piece::End).await.is_ok()
    }

    /// Waits until every blob is durable; returns how many were stored.
    pub async fn finish(self) -> Result<u64, ContextError> {
        drop(self.tx);
        self.stages.await.map_err(|_| ContextError::Sink("the writing thread panicked"))?
    }
}

// ---------------------------------------------------------------------------------------------
// Materialising

/// A manifest that passed [`ContextManifest::validate`] under some limits: the only kind
/// [`materialise`] accepts, so the checks that keep its writes inside the destination cannot be
/// skipped, and each receiver validates a manifest once (when it arrives, before fetching its files).
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

/// Recreates the context in `dest` (an empty or absent directory) from blobs in `store`: directories,
/// files (copied, not linked, so a build cannot alter the store; modes applied) and symlinks.
///
/// Every blob is checked present before anything is written, so a refused manifest leaves no trace;
/// the manifest's validation (required by its type) is what keeps every write inside `dest` (no "..",
/// nothing created under a symlink), and files are created with `O_EXCL | O_NOFOLLOW`.
pub fn materialise(manifest: &ValidManifest, store: &BlobStore, dest: &Path) -> Result<(), ContextError> {
    let digests: Vec<Digest> = manifest.blobs().into_iter().map(|(d, _)| d).collect();
    if let Some(d) = store.missing(&digests).into_iter().next() {
        return Err(ContextError::MissingBlob(d));
    }
    match fs::symlink_metadata(dest) {
        Ok(meta) => {
            let empty = meta.is_dir() && fs::read_dir(dest).map_err(io_err(dest))?.next().is_none();
            if !empty {
                return Err(ContextError::DestNotEmpty { path: dest.to_path_buf() });
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => fs::create_dir_all(dest).map_err(io_err(dest))?,
        Err(e) => return Err(io_err(dest)(e)),
    }
    // Directory modes are applied last, deepest first, so a read-only directory can still be filled.
    let mut dirs = Vec::new();
    for entry in &manifest.entries {
        let path = dest.join(&entry.path);
        // Parents listed in the manifest sort before their children and exist already; unlisted ones
        // are created here. Validation guarantees none of them is a symlink or a file.
        if let Some(parent) = Path::new(&entry.path).parent().filter(|p| !p.as_os_str().is_empty()) {
            let parent = dest.join(parent);
            fs::create_dir_all(&parent).map_err(io_err(&parent))?;
        }
        match &entry.kind {
            EntryKind::Dir => {
                fs::DirBuilder::new().mode(0o700).create(&path).map_err(io_err(&path))?;
                dirs.push((path, entry.mode));
            }
            EntryKind::File { size, digest } => {
                let blob = store.path(digest);
                let mut src = File::open(&blob).map_err(|e| match e.kind() {
                    io::ErrorKind::NotFound => ContextError::MissingBlob(digest.clone()),
                    _ => io_err(&blob)(e),
                })?;
                let mut out = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&path)
                    .map_err(io_err(&path))?;
                let copied = io::copy(&mut src, &mut out).map_err(io_err(&path))?;
                if copied != *size {
                    return Err(ContextError::BlobSize {
                        path: entry.path.clone(),
                        digest: digest.clone(),
                        expected: *size,
                        got: copied,
                    });
                }
                out.set_permissions(fs::Permissions::from_mode(entry.mode)).map_err(io_err(&path))?;
            }
            EntryKind::Symlink { target } => {
                std::os::unix::fs::symlink(target, &path).map_err(io_err(&path))?;
            }
        }
    }
    for (path, mode) in dirs.iter().rev() {
        fs::set_permissions(path, fs::Permissions::from_mode(*mode)).map_err(io_err(path))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;

    fn ignore(text: &str) -> DockerIgnore {
        DockerIgnore::parse(text).unwrap()
    }

    #[test]
    fn dockerignore_basic_patterns() {
        let di = ignore("*.log\n**/*.tmp\nbuild/\n!build/keep.txt\n/abs\n");
        assert!(di.is_excluded("x.log"));
        assert!(!di.is_excluded("sub/x.log"), "'*' does not match '/'");
        assert!(di.is_excluded("a.tmp"));
        assert!(di.is_excluded("a/b/c.tmp"));
        assert!(di.is_excluded("build"));
        assert!(di.is_excluded("build/out/bin"), "a dir's exclusion covers its children");
        assert!(!di.is_excluded("build/keep.txt"));
        assert!(di.is_excluded("abs"));
        assert!(di.is_excluded("abs/inner"));
        assert!(!di.is_excluded("sub/abs"), "a leading '/' anchors at the root, like no '/' at all");
        assert!(!di.is_excluded("src/main.rs"));
    }

    #[test]
    fn dockerignore_comments_blank_lines_and_whitespace() {
        let di = ignore("\u{feff}# a comment\n\n   \n  secret.txt  \r\n#*.rs\n ! secret.txt/. \n");
        assert!(!di.is_excluded("main.rs"), "commented pattern is not active");
        assert!(!di.is_excluded("secret.txt"), "re-included by the cleaned exception");
        let di = ignore("# c\n  secret.txt  \r\n");
        assert!(di.is_excluded("secret.txt"));
        assert!(!di.is_excluded("# c"));
        // Docker treats '#' as a comment only at the very start of the line.
        assert!(ignore(" #x").is_excluded("#x"));
        assert!(ignore("./a/../b//c/").is_excluded("b/c"));
    }

    #[test]
    fn dockerignore_double_star_and_question_mark() {
        let all = ignore("**");
        assert!(all.is_excluded("anything"));
        assert!(all.is_excluded("deep/down/file"));
        let ab = ignore("a/**/b");
        assert!(ab.is_excluded("a/b"));
        assert!(ab.is_excluded("a/x/b"));
        assert!(ab.is_excluded("a/x/y/b"));
        assert!(ab.is_excluded("a/x/b/child"));
        assert!(!ab.is_excluded("a/xb"));
        assert!(!ab.is_excluded("c/a/b"));
        let tail = ignore("docs/**");
        assert!(tail.is_excluded("docs/a/b"));
        let q = ignore("a?c");
        assert!(q.is_excluded("abc"));
        assert!(!q.is_excluded("a/c"), "'?' does not match '/'");
        assert!(!q.is_excluded("abbc"));
        let class = ignore("file[0-9].txt\n[!a]b\n");
        assert!(class.is_excluded("file7.txt"));
        assert!(!class.is_excluded("filex.txt"));
        assert!(class.is_excluded("!b") && class.is_excluded("ab"), "Go regexp: '!' in a class is literal");
        assert!(ignore(r"a\*b").is_excluded(r"a\*b"), "no wildcard: moby compares literally");
        assert!(ignore(r"x*\*").is_excluded("xy*"), "with a wildcard, '\\' escapes");
    }

    #[test]
    fn dockerignore_last_match_wins() {
        let di = ignore("*.md\n!README.md\n");
        assert!(di.is_excluded("CHANGES.md"));
        assert!(!di.is_excluded("README.md"));
        let di = ignore("!README.md\n*.md\n");
        assert!(di.is_excluded("README.md"), "a later exclusion overrides an earlier exception");
        let di = ignore("logs\n!logs/keep\nlogs/keep/tmp\n");
        assert!(di.is_excluded("logs/a"));
        assert!(!di.is_excluded("logs/keep/b"));
        assert!(di.is_excluded("logs/keep/tmp/c"));
    }

    #[test]
    fn dockerignore_refuses_bad_patterns() {
        for (text, needle) in [("a\n!\n", "line 2"), ("file[0-9", "closing ']'"), ("[[:alpha:]]", "POSIX")] {
            let err = DockerIgnore::parse(text).unwrap_err().to_string();
            assert!(err.contains(needle), "{err}");
        }
    }

    #[test]
    fn dockerignore_knows_when_an_excluded_dir_must_be_read() {
        let di = ignore("build\n!build/keep.txt\n");
        assert!(di.may_reinclude_under("build"));
        assert!(!di.may_reinclude_under("other"));
        assert!(ignore("build\n!**/keep.txt\n").may_reinclude_under("build"));
        assert!(ignore("build\n!b*/keep\n").may_reinclude_under("build"));
        assert!(!ignore("build\n!src/*.rs\n").may_reinclude_under("build"));
        assert!(!ignore("build\n").may_reinclude_under("build"));
    }

    fn write(path: &Path, contents: &[u8]) {
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).unwrap();
        }
        fs::write(path, contents).unwrap();
    }

    fn entry<'a>(m: &'a ContextManifest, path: &str) -> Option<&'a Entry> {
        m.entries.iter().find(|e| e.path == path)
    }

    /// A context with nested dirs, an empty dir, an executable, a symlink, duplicate files and a
    /// .dockerignore that excludes files and a directory, and (with `*`) even the Dockerfile.
    fn sample(root: &Path) {
        write(&root.join("Dockerfile"), b"FROM scratch\nCOPY . /\n");
        write(&root.join("src/lib/a.rs"), b"same");
        write(&root.join("src/b.rs"), b"same");
        write(&root.join("src/debug.log"), b"noise");
        write(&root.join("run.sh"), b"#!/bin/sh\n");
        fs::set_permissions(root.join("run.sh"), fs::Permissions::from_mode(0o755)).unwrap();
        fs::create_dir_all(root.join("empty")).unwrap();
        std::os::unix::fs::symlink("src/b.rs", root.join("link")).unwrap();
        write(&root.join("target/debug/big"), b"build output");
        write(&root.join("target/keep.txt"), b"kept");
        write(&root.join("notes.md"), b"n");
        write(&root.join(".dockerignore"), b"# build output\ntarget\n!target/keep.txt\n**/*.log\nnotes.md\n");
    }

    #[test]
    fn a_cached_scan_hashes_only_what_changed_and_never_trusts_a_file_changed_just_now() {
        let ctx = tempfile::tempdir().unwrap();
        let cache = tempfile::tempdir().unwrap();
        fs::write(ctx.path().join("Dockerfile"), "FROM scratch\n").unwrap();
        fs::create_dir(ctx.path().join("src")).unwrap();
        for i in 0..20 {
            fs::write(ctx.path().join(format!("src/{i}.txt")), format!("file {i}")).unwrap();
        }
        // An hour from now every file is settled: the second scan reads none of them.
        let later = SystemTime::now() + std::time::Duration::from_secs(3600);
        let first = scan_cached_at(ctx.path(), "Dockerfile", Some(cache.path()), later).unwrap();
        assert_eq!(first.hashed, 21);
        let second = scan_cached_at(ctx.path(), "Dockerfile", Some(cache.path()), later).unwrap();
        assert_eq!(second.hashed, 0);
        assert_eq!(second.manifest.digest(), first.manifest.digest());
        assert_eq!(second.sources.len(), first.sources.len());
        // A change is seen (its stat differs), and only that file is read.
        fs::write(ctx.path().join("src/3.txt"), "changed, and longer").unwrap();
        let third = scan_cached_at(ctx.path(), "Dockerfile", Some(cache.path()), later).unwrap();
        assert_eq!(third.hashed, 1);
        assert_eq!(third.manifest.digest(), scan(ctx.path(), "Dockerfile").unwrap().manifest.digest());

        // At the real time, files written within the last second are not recorded, so a rewrite
        // of the same size in the same clock tick is still read.
        let fresh = tempfile::tempdir().unwrap();
        let ctx = tempfile::tempdir().unwrap();
        fs::write(ctx.path().join("Dockerfile"), "FROM scratch\n").unwrap();
        fs::write(ctx.path().join("a"), "aaaa").unwrap();
        scan_cached(ctx.path(), "Dockerfile", Some(fresh.path())).unwrap();
        fs::write(ctx.path().join("a"), "bbbb").unwrap();
        let again = scan_cached(ctx.path(), "Dockerfile", Some(fresh.path())).unwrap();
        assert_eq!(again.hashed, 2);
        assert_eq!(again.manifest.digest(), scan(ctx.path(), "Dockerfile").unwrap().manifest.digest());
    }

    #[test]
    fn scan_builds_the_manifest() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        sample(root);
        let scanned = scan(root, "Dockerfile").unwrap();
        let m = &scanned.manifest;
        let paths: Vec<&str> = m.entries.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                ".dockerignore",
                "Dockerfile",
                "empty",
                "link",
                "run.sh",
                "src",
                "src/b.rs",
                "src/lib",
                "src/lib/a.rs",
                "target",
                "target/keep.txt"
            ]
        );
        assert_eq!(entry(m, "run.sh").unwrap().mode, 0o755);
        assert_eq!(entry(m, "empty").unwrap().kind, EntryKind::Dir);
        assert_eq!(entry(m, "link").unwrap().kind, EntryKind::Symlink { target: "src/b.rs".into() });
        let same = Digest::of(b"same");
        assert_eq!(entry(m, "src/b.rs").unwrap().kind, EntryKind::File { size: 4, digest: same.clone() });
        assert_eq!(
            entry(m, "Dockerfile").unwrap().kind,
            EntryKind::File { size: 22, digest: Digest::of(b"FROM scratch\nCOPY . /\n") }
        );
        let blobs = m.blobs();
        assert_eq!(blobs.iter().filter(|(d, _)| *d == same).count(), 1, "identical files share a blob");
        assert_eq!(blobs.len(), m.file_count() - 1);
        assert_eq!(m.file_count(), 6);
        assert_eq!(scanned.sources.len(), blobs.len());
        for (digest, _) in &blobs {
            assert_eq!(Digest::of(&fs::read(&scanned.sources[digest]).unwrap()), *digest);
        }
        assert_eq!(
            m.total_size(),
            m.entries
                .iter()
                .filter_map(|e| fs::symlink_metadata(root.join(&e.path)).ok().filter(|m| m.is_file()).map(|m| m.len()))
                .sum::<u64>()
        );
        m.validate(&ContextLimits::default()).unwrap();
    }

    #[test]
    fn scan_keeps_dockerfile_and_dockerignore_even_when_excluded() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        write(&root.join("docker/Dockerfile.dev"), b"FROM x");
        write(&root.join("docker/other"), b"o");
        write(&root.join("app"), b"a");
        write(&root.join(".dockerignore"), b"*\n");
        let m = scan(root, "./docker/Dockerfile.dev").unwrap().manifest;
        let paths: Vec<&str> = m.entries.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, [".dockerignore", "docker", "docker/Dockerfile.dev"]);
    }

    #[test]
    fn a_named_context_needs_no_dockerfile_and_honours_its_dockerignore() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        write(&root.join("file"), b"f");
        write(&root.join("ignored.txt"), b"i");
        write(&root.join(".dockerignore"), b"ignored.txt\n");
        let m = scan_dir(root).unwrap().manifest;
        let paths: Vec<&str> = m.entries.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, [".dockerignore", "file"]);
        let missing = scan_dir(&root.join("nope")).unwrap_err().to_string();
        assert!(missing.contains("nope"), "{missing}");
    }

    #[test]
    fn a_dockerfile_from_stdin_joins_the_scanned_context() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("ctx");
        write(&root.join("a"), b"a");
        write(&root.join("z"), b"z");
        let source = tmp.path().join("stdin.Dockerfile");
        write(&source, b"FROM x\n");
        let mut scanned = scan_dir(&root).unwrap();
        scanned.add_file("b.Dockerfile", b"FROM x\n", source.clone()).unwrap();
        let paths: Vec<&str> = scanned.manifest.entries.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["a", "b.Dockerfile", "z"]);
        assert_eq!(scanned.sources[&Digest::of(b"FROM x\n")], source);
    }

    #[test]
    fn a_context_tar_on_stdin_is_unpacked_plain_or_gzipped_and_never_outside() {
        let mut b = tar::Builder::new(Vec::new());
        for (path, data) in [("Dockerfile", &b"FROM x\n"[..]), ("sub/f", b"f")] {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, path, data).unwrap();
        }
        let plain = b.into_inner().unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        io::Write::write_all(&mut gz, &plain).unwrap();
        let gz = gz.finish().unwrap();
        for bytes in [plain, gz] {
            let tmp = tempfile::tempdir().unwrap();
            unpack_context_tar(&bytes[..], tmp.path()).unwrap();
            assert_eq!(fs::read(tmp.path().join("Dockerfile")).unwrap(), b"FROM x\n");
            assert_eq!(fs::read(tmp.path().join("sub/f")).unwrap(), b"f");
        }
        // A member named ../escape is refused by the tar reader and written nowhere.
        let mut raw = tar::Header::new_old();
        raw.as_old_mut().name[..9].copy_from_slice(b"../escape");
        raw.set_size(1);
        raw.set_mode(0o644);
        raw.set_cksum();
        let mut evil = raw.as_bytes().to_vec();
        evil.extend([b'x'; 512]);
        evil.extend([0u8; 1024]);
        let tmp = tempfile::tempdir().unwrap();
        let inner = tmp.path().join("ctx");
        fs::create_dir(&inner).unwrap();
        let _ = unpack_context_tar(&evil[..], &inner);
        assert!(!tmp.path().join("escape").exists());
    }

    #[test]
    fn scan_refuses_fifos_and_missing_dockerfiles() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        write(&root.join("Dockerfile"), b"FROM x");
        fs::create_dir(root.join("run")).unwrap();
        let fifo = CString::new(root.join("run/pipe").as_os_str().as_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path; mkfifo does not keep the pointer.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
        let err = scan(root, "Dockerfile").unwrap_err();
        assert!(matches!(err, ContextError::SpecialFile { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            "\"run/pipe\" is a FIFO (named pipe); build contexts may hold only files, directories and \
             symlinks (add it to .dockerignore)"
        );
        write(&root.join(".dockerignore"), b"run/pipe\n");
        scan(root, "Dockerfile").unwrap();

        let err = scan(root, "Containerfile").unwrap_err();
        assert!(matches!(err, ContextError::NoDockerfile { .. }), "{err:?}");
        assert!(err.to_string().contains("-f"), "{err}");
        assert!(matches!(scan(root, "../Dockerfile"), Err(ContextError::DockerfileOutside { .. })));
        assert!(matches!(scan(root, "run"), Err(ContextError::DockerfileNotAFile { .. })));
        assert!(matches!(scan(&root.join("Dockerfile"), "Dockerfile"), Err(ContextError::NotADirectory { .. })));
    }

    #[test]
    fn scan_refuses_symlinks_leading_out() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        write(&root.join("Dockerfile"), b"FROM x");
        std::os::unix::fs::symlink("/etc/passwd", root.join("passwd")).unwrap();
        let err = scan(root, "Dockerfile").unwrap_err();
        assert!(matches!(err, ContextError::SymlinkEscape { .. }), "{err:?}");
        write(&root.join(".dockerignore"), b"passwd");
        scan(root, "Dockerfile").unwrap();
    }

    fn file(path: &str) -> Entry {
        Entry { path: path.into(), mode: 0o644, kind: EntryKind::File { size: 1, digest: Digest::of(path.as_bytes()) } }
    }
    fn dir(path: &str) -> Entry {
        Entry { path: path.into(), mode: 0o755, kind: EntryKind::Dir }
    }
    fn link(path: &str, target: &str) -> Entry {
        Entry { path: path.into(), mode: 0o777, kind: EntryKind::Symlink { target: target.into() } }
    }
    fn manifest(entries: Vec<Entry>) -> ContextManifest {
        ContextManifest { entries }
    }
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

    #[test]
    fn blob_store_put_has_missing() {
        let tmp = tempfile::tempdir().unwrap();
        let store = BlobStore::open(&tmp.path().join("blobs")).unwrap();
        let a = store.put(b"alpha").unwrap();
        assert_eq!(a, Digest::of(b"alpha"));
        assert!(store.has(&a));
        assert_eq!(fs::read(store.path(&a)).unwrap(), b"alpha");
        assert!(store.path(&a).ends_with(format!("sha256/{}/{}", &a.hex()[..2], a.hex())));
        assert_eq!(store.put(b"alpha").unwrap(), a);
        let b = Digest::of(b"beta");
        let c = Digest::of(b"gamma");
        assert!(!store.has(&b));
        assert_eq!(store.missing(&[b.clone(), a.clone(), c.clone(), b.clone()]), vec![b, c]);
    }

    #[test]
    fn blob_writer_refuses_wrong_content() {
        let tmp = tempfile::tempdir().unwrap();
        let store = BlobStore::open(tmp.path()).unwrap();
        let expected = Digest::of(b"right");
        let mut w = store.writer(expected.clone()).unwrap();
        w.write_all(b"wrong").unwrap();
        match w.commit() {
            Err(ContextError::DigestMismatch { expected: e, got }) => {
                assert_eq!(e, expected);
                assert_eq!(got, Digest::of(b"wrong"));
            }
            other => panic!("{other:?}"),
        }
        assert!(!store.has(&expected));
        assert!(!store.has(&Digest::of(b"wrong")));
        assert_eq!(fs::read_dir(tmp.path().join("tmp")).unwrap().count(), 0, "temp file removed");
        // An abandoned writer cleans up too.
        let mut w = store.writer(expected.clone()).unwrap();
        w.write_all(b"rig").unwrap();
        drop(w);
        assert_eq!(fs::read_dir(tmp.path().join("tmp")).unwrap().count(), 0);
        let mut w = store.writer(expected.clone()).unwrap();
        w.write_all(b"ri").unwrap();
        w.write_all(b"ght").unwrap();
        assert_eq!(w.commit().unwrap(), 5);
        assert!(store.has(&expected));
    }

    #[tokio::test]
    async fn a_blob_sink_stores_every_blob_durably_and_refuses_a_wrong_one() {
        let tmp = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(BlobStore::open(tmp.path()).unwrap());
        let blobs: Vec<Vec<u8>> = (0..200u32).map(|i| vec![(i % 251) as u8; (i as usize * 97) % 5000]).collect();
        let mut sink = BlobSink::new(store.clone());
        for b in &blobs {
            assert!(sink.start(Digest::of(b)).await);
            // In pieces, as they come off the network.
            for piece in b.chunks(1000) {
                assert!(sink.bytes(bytes::Bytes::copy_from_slice(piece)).await);
            }
            assert!(sink.end().await);
        }
        assert_eq!(sink.finish().await.unwrap(), blobs.len() as u64);
        for b in &blobs {
            assert_eq!(fs::read(store.path(&Digest::of(b))).unwrap(), *b);
        }
        assert_eq!(fs::read_dir(tmp.path().join("tmp")).unwrap().count(), 0);

        // A blob that is not what its digest says stops the sink; nothing of it is stored.
        let expected = Digest::of(b"right");
        let mut sink = BlobSink::new(store.clone());
        assert!(sink.start(expected.clone()).await);
        assert!(sink.bytes(bytes::Bytes::from_static(b"wrong")).await);
        let _ = sink.end().await;
        // Whatever is sent after the failure is refused or ignored.
        let _ = sink.start(Digest::of(b"later")).await;
        match sink.finish().await {
            Err(ContextError::DigestMismatch { expected: e, .. }) => assert_eq!(e, expected),
            other => panic!("{other:?}"),
        }
        assert!(!store.has(&expected));
        assert_eq!(fs::read_dir(tmp.path().join("tmp")).unwrap().count(), 0, "temp files removed");
    }

    #[test]
    fn blob_writers_are_safe_concurrently() {
        let tmp = tempfile::tempdir().unwrap();
        let store = BlobStore::open(tmp.path()).unwrap();
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let digest = Digest::of(&data);
        let a = store.writer(digest.clone()).unwrap();
        let b = store.writer(digest.clone()).unwrap();
        assert_ne!(a.tmp, b.tmp, "two writers of one blob get distinct temp files");
        drop((a, b));
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    let mut w = store.writer(digest.clone()).unwrap();
                    for chunk in data.chunks(7_000) {
                        w.write_all(chunk).unwrap();
                    }
                    assert_eq!(w.commit().unwrap(), data.len() as u64);
                });
            }
        });
        assert_eq!(fs::read(store.path(&digest)).unwrap(), data);
        assert_eq!(fs::read_dir(tmp.path().join("tmp")).unwrap().count(), 0);
    }

    fn store_all(scanned: &Scanned, store: &BlobStore) {
        for (digest, _) in scanned.manifest.blobs() {
            let mut w = store.writer(digest.clone()).unwrap();
            io::copy(&mut File::open(&scanned.sources[&digest]).unwrap(), &mut w).unwrap();
            w.commit().unwrap();
        }
    }

    #[test]
    fn materialise_round_trips() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        fs::create_dir(&src).unwrap();
        sample(&src);
        fs::create_dir(src.join("locked")).unwrap();
        write(&src.join("locked/inside"), b"i");
        fs::set_permissions(src.join("locked"), fs::Permissions::from_mode(0o555)).unwrap();
        let scanned = scan(&src, "Dockerfile").unwrap();
        let store = BlobStore::open(&tmp.path().join("store")).unwrap();

        let dest = tmp.path().join("work/ctx");
        let valid = scanned.manifest.clone().into_valid(&ContextLimits::default()).unwrap();
        let err = materialise(&valid, &store, &dest).unwrap_err();
        assert!(matches!(err, ContextError::MissingBlob(_)), "{err:?}");
        assert!(!dest.exists(), "nothing written before the blobs are there");

        store_all(&scanned, &store);
        materialise(&valid, &store, &dest).unwrap();
        let again = scan(&dest, "Dockerfile").unwrap();
        assert_eq!(again.manifest, scanned.manifest);
        assert_eq!(again.manifest.digest(), scanned.manifest.digest());
        // Copied, not linked: changing the materialised file leaves the store alone.
        fs::write(dest.join("src/b.rs"), b"changed").unwrap();
        assert_eq!(fs::read(store.path(&Digest::of(b"same"))).unwrap(), b"same");

        let err = materialise(&valid, &store, &dest).unwrap_err();
        assert!(matches!(err, ContextError::DestNotEmpty { .. }), "{err:?}");
    }

    #[test]
    fn materialise_never_writes_outside() {
        let tmp = tempfile::tempdir().unwrap();
        let store = BlobStore::open(&tmp.path().join("store")).unwrap();
        let x = store.put(b"x").unwrap();
        let dest = tmp.path().join("work");
        let escaping = manifest(vec![Entry {
            path: "../x".into(),
            mode: 0o644,
            kind: EntryKind::File { size: 1, digest: x.clone() },
        }]);
        // Validation is what stands between a manifest and the disk: materialise takes nothing else.
        let err = escaping.into_valid(&ContextLimits::default()).unwrap_err();
        assert!(matches!(err, ContextError::InvalidPath { .. }), "{err:?}");
        assert!(!tmp.path().join("x").exists());
        assert!(!dest.exists());

        let through_link = manifest(vec![
            dir("a"),
            link("a/l", "../../outside"),
            Entry { path: "b".into(), mode: 0o644, kind: EntryKind::File { size: 1, digest: x } },
        ]);
        let err = through_link.into_valid(&ContextLimits::default()).unwrap_err();
        assert!(matches!(err, ContextError::SymlinkEscape { .. }), "{err:?}");
        assert!(!dest.exists());
        assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 1, "only the store exists");
    }
}
