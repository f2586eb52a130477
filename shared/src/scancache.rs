//! What a previous scan of a context learnt: each file's digest under the `stat` it had then, so
//! that scanning again hashes only the files that changed (git's index does the same). A file is
//! trusted from the cache only when its size, mtime, ctime, inode and device are all the same and
//! its ctime was already [`SETTLED`] old when it was recorded: a file changed in the same clock
//! tick as the stat that recorded it cannot pass for unchanged (ctime cannot be set by a user).
//!
//! The cache is an optimisation only: a missing, stale, damaged or unwritable cache file costs a
//! full hash, never a wrong digest.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::digest::Digest;

/// How old a file's ctime must be, when a scan records it, for the record to be trusted later.
pub const SETTLED: Duration = Duration::from_secs(1);

const FORMAT: u32 = 1;

/// A file's `stat` as far as the cache cares.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stamp {
    pub size: u64,
    pub mtime_ns: i128,
    pub ctime_ns: i128,
    pub ino: u64,
    pub dev: u64,
}

impl Stamp {
    pub fn of(meta: &fs::Metadata) -> Stamp {
        let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
        Stamp {
            size: meta.size(),
            mtime_ns: ns(meta.mtime(), meta.mtime_nsec()),
            ctime_ns: ns(meta.ctime(), meta.ctime_nsec()),
            ino: meta.ino(),
            dev: meta.dev(),
        }
    }
}

#[derive(Serialize, Deserialize)]
struct File {
    format: u32,
    root: String,
    entries: HashMap<String, (Stamp, Digest)>,
}

/// The cache of one context directory, loaded before a scan and saved after it.
pub struct ScanCache {
    path: PathBuf,
    root: String,
    old: HashMap<String, (Stamp, Digest)>,
    new: HashMap<String, (Stamp, Digest)>,
    /// Files whose ctime is before this (ns since the epoch) may be recorded.
    settled_before_ns: i128,
}

impl ScanCache {
    /// The cache of `root` kept in `dir` (one file per context directory, named by a digest of
    /// its canonical path); empty if there is none yet or it cannot be read.
    pub fn load(dir: &Path, root: &Path, now: SystemTime) -> ScanCache {
        let root = fs::canonicalize(root).unwrap_or_else(|_| root.to_path_buf()).to_string_lossy().into_owned();
        let path = dir.join(format!("{}.scan", &Digest::of(root.as_bytes()).hex()[..32]));
        let old = fs::read(&path)
            .ok()
            .and_then(|bytes| postcard::from_bytes::<File>(&bytes).ok())
            .filter(|f| f.format == FORMAT && f.root == root)
            .map(|f| f.entries)
            .unwrap_or_default();
        let now = now.duration_since(UNIX_EPOCH).unwrap_or_default();
        let settled_before_ns = now.saturating_sub(SETTLED).as_nanos() as i128;
        ScanCache { path, root, old, new: HashMap::new(), settled_before_ns }
    }

    /// The digest recorded for `rel` if its stamp is unchanged.
    pub fn get(&mut self, rel: &str, stamp: &Stamp) -> Option<Digest> {
        let (was, digest) = self.old.get(rel)?;
        if was != stamp {
            return None;
        }
        let digest = digest.clone();
        self.new.insert(rel.to_string(), (stamp.clone(), digest.clone()));
        Some(digest)
    }

    /// Records that `rel`, stamped `stamp` before it was read, hashed to `digest`.
    pub fn put(&mut self, rel: &str, stamp: Stamp, digest: Digest) {
        if stamp.ctime_ns < self.settled_before_ns && stamp.mtime_ns < self.settled_before_ns {
            self.new.insert(rel.to_string(), (stamp, digest));
        }
    }

    /// Writes what this scan saw (only the files it saw: deleted ones drop out), unless nothing
    /// changed. Errors are ignored: the next scan hashes again.
    pub fn save(self) {
        if self.new == self.old {
            return;
        }
        let file = File { format: FORMAT, root: self.root, entries: self.new };
        let Ok(bytes) = postcard::to_allocvec(&file) else { return };
        let Some(dir) = self.path.parent() else { return };
        if fs::create_dir_all(dir).is_err() {
            return;
        }
        let tmp = self.path.with_extension(format!("tmp{}", std::process::id()));
        let written = fs::File::create(&tmp).and_then(|mut f| f.write_all(&bytes));
        if written.is_err() || fs::rename(&tmp, &self.path).is_err() {
            let _ = fs::remove_file(&tmp);
        }
    }
}

/// Where `farm build` keeps its scan caches: `$XDG_CACHE_HOME/farm/scan`, else `~/.cache/farm/scan`.
pub fn default_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").filter(|v| !v.is_empty()).map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("farm").join("scan"))
}
