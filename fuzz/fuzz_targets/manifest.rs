//! `ContextManifest::validate`, the gate between a manifest received from another machine and the
//! agent's disk. Manifests come both from arbitrary postcard bytes (as on the wire) and from an
//! `arbitrary`-driven structure over a small alphabet of path components ("", ".", "..", "a", NUL...)
//! so that the tricky shapes (escaping symlinks, entries under symlinks, loops) are common.
//!
//! validate must never panic; what it accepts must be safe, checked against an independent, simple
//! (slow) reference: every path relative and clean, sorted, nothing under a file or symlink, and every
//! symlink resolving, following the manifest's other symlinks as the kernel would, inside the root.
//! Conversely, a manifest the reference finds clean must be accepted. Small accepted manifests are
//! also materialised into a sandbox, which must then hold exactly the manifest and nothing else.

#![no_main]

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::path::Path;

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use shared::context::{materialise, BlobStore, ContextLimits, ContextManifest, Entry, EntryKind};
use shared::proto::decode;
use shared::Digest;

const MAX_PATH: usize = 4096;
const MAX_NAME: usize = 255;
/// Nested symlinks the reference follows while resolving one symlink; fewer than the 40 validate
/// allows, so that a manifest the reference resolves is one validate must resolve too.
const HOPS: usize = 39;

// The structure is read from the input by hand, one byte per choice, so that the fuzzer's byte-level
// mutations map onto small structural changes (derived `Arbitrary` spends 4 bytes per enum tag).

#[derive(Debug, Clone, Copy)]
enum Comp {
    Empty,
    Dot,
    DotDot,
    A,
    B,
    Ab,
    Nul,
    NonAscii,
    Name255,
    Name256,
}

impl Comp {
    fn as_str(self) -> String {
        match self {
            Comp::Empty => String::new(),
            Comp::Dot => ".".into(),
            Comp::DotDot => "..".into(),
            Comp::A => "a".into(),
            Comp::B => "b".into(),
            Comp::Ab => "a\0b".into(),
            Comp::Nul => "\0".into(),
            Comp::NonAscii => "é".into(),
            Comp::Name255 => "n".repeat(MAX_NAME),
            Comp::Name256 => "n".repeat(MAX_NAME + 1),
        }
    }
}

impl<'a> Arbitrary<'a> for Comp {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        // Weighted towards the two names and "..", which make the interesting shapes (symlinks
        // naming each other, climbing out); the rest test one refusal each.
        const ALL: [Comp; 16] = [
            Comp::A,
            Comp::A,
            Comp::A,
            Comp::B,
            Comp::B,
            Comp::B,
            Comp::DotDot,
            Comp::DotDot,
            Comp::DotDot,
            Comp::Dot,
            Comp::Empty,
            Comp::Ab,
            Comp::Nul,
            Comp::NonAscii,
            Comp::Name255,
            Comp::Name256,
        ];
        Ok(ALL[usize::from(u8::arbitrary(u)?) % ALL.len()])
    }
}

/// Components joined with '/': a leading `Empty` makes it absolute, a trailing one ends it in '/'.
#[derive(Debug)]
struct FPath(Vec<Comp>);

impl FPath {
    fn render(&self) -> String {
        self.0.iter().map(|c| c.as_str()).collect::<Vec<_>>().join("/")
    }
}

impl<'a> Arbitrary<'a> for FPath {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        // Mostly 0 to 4 components; up to 23 (long enough to pass 4096 bytes with long names).
        let b = u8::arbitrary(u)?;
        let n = if b & 0x80 == 0 { b % 5 } else { b % 24 };
        Ok(FPath((0..n).map(|_| Comp::arbitrary(u)).collect::<arbitrary::Result<_>>()?))
    }
}

#[derive(Debug)]
enum FKind {
    /// Contents: `size` copies of `byte`.
    File {
        byte: u8,
        size: u8,
    },
    Dir,
    Symlink(FPath),
}

#[derive(Debug)]
struct FEntry {
    path: FPath,
    mode: u32,
    kind: FKind,
}

impl<'a> Arbitrary<'a> for FEntry {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        let path = FPath::arbitrary(u)?;
        let b = u8::arbitrary(u)?;
        let kind = match b % 4 {
            0 => FKind::File { byte: u8::arbitrary(u)?, size: u8::arbitrary(u)? % 8 },
            1 => FKind::Dir,
            _ => FKind::Symlink(FPath::arbitrary(u)?),
        };
        // Mostly permission bits (two bytes); now and then any u32.
        let mode = if b >= 0xf0 { u32::arbitrary(u)? } else { u32::from(u16::arbitrary(u)?) & 0o7777 };
        Ok(FEntry { path, mode, kind })
    }
}

#[derive(Debug)]
struct FManifest {
    entries: Vec<FEntry>,
    /// Sort and de-duplicate the paths (validate refuses anything else, so most inputs want this).
    sort: bool,
    /// Small limits instead of the defaults.
    limits: Option<(u8, u16)>,
    /// Materialise it if it is accepted and small, one input in 8 (the file system is slow next to
    /// validate, and validate is what is being explored).
    materialise: bool,
}

impl<'a> Arbitrary<'a> for FManifest {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        let flags = u8::arbitrary(u)?;
        let limits = if flags & 2 != 0 { Some((u8::arbitrary(u)?, u16::arbitrary(u)?)) } else { None };
        let mut entries = Vec::new();
        while !u.is_empty() {
            entries.push(FEntry::arbitrary(u)?);
        }
        Ok(FManifest { entries, sort: flags & 1 == 0, limits, materialise: (flags >> 2) & 7 == 0 })
    }
}

impl FManifest {
    /// The manifest and the blobs its files need.
    fn build(&self) -> (ContextManifest, Vec<Vec<u8>>) {
        let mut blobs = Vec::new();
        let mut entries: Vec<Entry> = self
            .entries
            .iter()
            .map(|e| {
                let kind = match &e.kind {
                    FKind::File { byte, size } => {
                        let content = vec![*byte; usize::from(*size)];
                        let kind = EntryKind::File { size: content.len() as u64, digest: Digest::of(&content) };
                        blobs.push(content);
                        kind
                    }
                    FKind::Dir => EntryKind::Dir,
                    FKind::Symlink(target) => EntryKind::Symlink { target: target.render() },
                };
                Entry { path: e.path.render(), mode: e.mode, kind }
            })
            .collect();
        if self.sort {
            entries.sort_by(|a, b| a.path.cmp(&b.path));
            entries.dedup_by(|a, b| a.path == b.path);
        }
        (ContextManifest { entries }, blobs)
    }

    fn limits(&self) -> ContextLimits {
        match self.limits {
            Some((files, bytes)) => ContextLimits { max_files: files.into(), max_total_bytes: bytes.into() },
            None => ContextLimits::default(),
        }
    }
}

fn path_ok(path: &str) -> bool {
    !path.is_empty()
        && !path.contains('\0')
        && path.len() <= MAX_PATH
        && path.split('/').all(|c| !matches!(c, "" | "." | "..") && c.len() <= MAX_NAME)
}

/// The proper ancestors of a clean path: "a/b/c" → "a", "a/b".
fn ancestors(path: &str) -> impl Iterator<Item = &str> {
    path.match_indices('/').map(move |(at, _)| &path[..at])
}

enum Resolved {
    Inside(Vec<String>),
    Escape,
    /// More than `HOPS` nested symlinks (a loop, or just a long chain): no verdict.
    TooDeep,
}

/// Resolves `target` from the directory `dir` (components from the root), following the manifest's
/// symlinks wherever one is met, the way the kernel walks a path; names not in the manifest are taken
/// lexically. `hops` counts every symlink followed so far.
fn resolve(links: &HashMap<&str, &str>, dir: Vec<String>, target: &str, hops: &mut usize) -> Resolved {
    if target.starts_with('/') {
        return Resolved::Escape;
    }
    let mut cur = dir;
    for comp in target.split('/') {
        match comp {
            "" | "." => {}
            ".." => {
                if cur.pop().is_none() {
                    return Resolved::Escape;
                }
            }
            name => {
                cur.push(name.to_string());
                if let Some(next) = links.get(cur.join("/").as_str()) {
                    *hops += 1;
                    if *hops > HOPS {
                        return Resolved::TooDeep;
                    }
                    cur.pop();
                    match resolve(links, cur, next, hops) {
                        Resolved::Inside(at) => cur = at,
                        other => return other,
                    }
                }
            }
        }
    }
    Resolved::Inside(cur)
}

/// The reference verdict: `Some(true)` clean, `Some(false)` unsafe or malformed, `None` no verdict.
fn reference(m: &ContextManifest, limits: &ContextLimits) -> Option<bool> {
    if m.entries.len() > limits.max_files {
        return Some(false);
    }
    let mut by_path: HashMap<&str, &Entry> = HashMap::new();
    for (i, e) in m.entries.iter().enumerate() {
        if !path_ok(&e.path) || e.mode > 0o7777 || (i > 0 && m.entries[i - 1].path >= e.path) {
            return Some(false);
        }
        by_path.insert(&e.path, e);
    }
    let bytes = m.entries.iter().fold(0u64, |sum, e| match e.kind {
        EntryKind::File { size, .. } => sum.saturating_add(size),
        _ => sum,
    });
    if bytes > limits.max_total_bytes {
        return Some(false);
    }
    for e in &m.entries {
        if ancestors(&e.path).any(|a| by_path.get(a).is_some_and(|p| !matches!(p.kind, EntryKind::Dir))) {
            return Some(false);
        }
    }
    let links: HashMap<&str, &str> = m
        .entries
        .iter()
        .filter_map(|e| match &e.kind {
            EntryKind::Symlink { target } => Some((e.path.as_str(), target.as_str())),
            _ => None,
        })
        .collect();
    let mut verdict = Some(true);
    for (path, target) in &links {
        if target.is_empty() || target.contains('\0') || target.len() > MAX_PATH {
            return Some(false);
        }
        let dir: Vec<String> = path.split('/').map(str::to_string).collect::<Vec<_>>();
        let dir = dir[..dir.len() - 1].to_vec();
        match resolve(&links, dir, target, &mut 0) {
            Resolved::Inside(_) => {}
            Resolved::Escape => return Some(false),
            Resolved::TooDeep => verdict = None,
        }
    }
    verdict
}

fn check(m: &ContextManifest, limits: &ContextLimits) {
    let accepted = m.validate(limits);
    match (reference(m, limits), &accepted) {
        (Some(false), Ok(())) => panic!("validate accepted a manifest the reference refuses: {m:#?}"),
        (Some(true), Err(e)) => panic!("validate refused a clean manifest ({e}): {m:#?}"),
        _ => {}
    }
    if let Err(e) = accepted {
        assert!(!e.to_string().is_empty());
    }
}

/// Materialises an accepted manifest into a fresh sandbox: afterwards the sandbox holds the blob store
/// (unchanged) and the destination, which holds exactly the manifest's entries (and their implicit
/// parent directories), nothing else.
fn materialise_in_sandbox(m: &ContextManifest, blobs: &[Vec<u8>]) {
    // Directories keep owner rwx, so that the sandbox can be removed without being root.
    let mut m = m.clone();
    for e in &mut m.entries {
        if matches!(e.kind, EntryKind::Dir) {
            e.mode |= 0o700;
        }
    }
    // On tmpfs where there is one: the sandbox is made and removed once per input.
    let shm = Path::new("/dev/shm");
    let base = if shm.is_dir() { shm.to_path_buf() } else { std::env::temp_dir() };
    let sandbox = tempfile::Builder::new().prefix("farm-fuzz-").tempdir_in(base).expect("temp dir");
    let store = BlobStore::open(&sandbox.path().join("store")).expect("blob store");
    for b in blobs {
        store.put(b).expect("put blob");
    }
    let dest = sandbox.path().join("root");
    let m = m.clone().into_valid(&ContextLimits::default()).expect("validated by the caller");
    materialise(&m, &store, &dest).unwrap_or_else(|e| panic!("materialising an accepted manifest failed: {e}"));

    let top: BTreeSet<String> =
        fs::read_dir(sandbox.path()).unwrap().map(|d| d.unwrap().file_name().into_string().unwrap()).collect();
    assert_eq!(top, BTreeSet::from(["root".to_string(), "store".to_string()]), "written outside the destination");
    for b in blobs {
        assert_eq!(&fs::read(store.path(&Digest::of(b))).unwrap(), b, "blob store changed");
    }

    let mut want: BTreeSet<String> = BTreeSet::new();
    for e in &m.entries {
        want.insert(e.path.clone());
        want.extend(ancestors(&e.path).map(str::to_string));
    }
    let mut found = BTreeSet::new();
    walk(&dest, "", &mut found);
    assert_eq!(found, want, "the destination does not hold exactly the manifest");
    for e in &m.entries {
        let path = dest.join(&e.path);
        let meta = fs::symlink_metadata(&path).unwrap();
        match &e.kind {
            EntryKind::File { size, .. } => assert!(meta.is_file() && meta.len() == *size, "{}", e.path),
            EntryKind::Dir => assert!(meta.is_dir(), "{}", e.path),
            EntryKind::Symlink { target } => {
                assert!(meta.file_type().is_symlink(), "{}", e.path);
                assert_eq!(fs::read_link(&path).unwrap().to_str(), Some(target.as_str()));
            }
        }
    }
}

fn walk(dir: &Path, prefix: &str, found: &mut BTreeSet<String>) {
    for d in fs::read_dir(dir).unwrap() {
        let d = d.unwrap();
        let name = d.file_name().into_string().unwrap();
        let rel = if prefix.is_empty() { name } else { format!("{prefix}/{name}") };
        if d.file_type().unwrap().is_dir() {
            walk(&d.path(), &rel, found);
        }
        found.insert(rel);
    }
}

fuzz_target!(|data: &[u8]| {
    // As received on the wire.
    if let Ok(m) = decode::<ContextManifest>(data) {
        check(&m, &ContextLimits::default());
    }
    // Built from a structure where the dangerous shapes are likely.
    let Ok(f) = FManifest::arbitrary(&mut Unstructured::new(data)) else { return };
    let (m, blobs) = f.build();
    let limits = f.limits();
    check(&m, &limits);
    // Short paths only: a long one under the sandbox's own path would fail with ENAMETOOLONG.
    let short = m
        .entries
        .iter()
        .all(|e| e.path.len() <= 1024 && !matches!(&e.kind, EntryKind::Symlink { target } if target.len() > 1024));
    if f.materialise && short && m.entries.len() <= 32 && m.validate(&ContextLimits::default()).is_ok() {
        materialise_in_sandbox(&m, &blobs);
    }
});
