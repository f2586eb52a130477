//! Blob uploads, spoken directly over HTTP (oci-client sends a whole blob in 4 MiB PATCHes and
//! cannot resume): a cross-repository mount first when farm knows another repository of the same
//! registry that may hold the blob, else chunked PATCHes read from disk as they are sent, and after
//! a dropped connection or a 5xx the upload's status (`GET` on its URL, `Range: 0-<last>`) says
//! where to continue from; a registry that lost or refused the upload (distribution 2.x cancels an
//! upload whose size differs from the offset its URL was signed with, i.e. after a PATCH that was
//! cut in the middle) gets it again from the start. Both a bounded number of times.
//!
//! The arithmetic is pure ([`next_chunk`], [`content_range`], [`parse_range`], [`after_failure`]);
//! [`BlobLocations`] remembers which repositories hold which blobs.

use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;
use std::sync::{Arc, Mutex};

use crate::digest::Digest;
use crate::oci::ImageRef;

/// PATCH size: big enough that a 1 GiB image is a few dozen requests, small enough that a
/// dropped connection costs little to resend.
pub(crate) const CHUNK: u64 = 32 << 20;
/// How many failed requests one blob may meet before the push gives up.
pub(crate) const MAX_FAILURES: u32 = 5;
/// Repositories a mount is tried from, at most, per blob.
pub(crate) const MAX_MOUNT_SOURCES: usize = 3;
/// The read size while streaming a chunk from disk.
const READ_SIZE: usize = 1 << 20;

/// The byte range of the chunk that starts at `offset` of a blob of `size` bytes, or `None` when
/// everything is sent.
pub(crate) fn next_chunk(offset: u64, size: u64, chunk: u64) -> Option<Range<u64>> {
    (offset < size).then(|| offset..size.min(offset.saturating_add(chunk.max(1))))
}

/// A chunk's `Content-Range` as the distribution spec spells it: inclusive bounds, no unit.
pub(crate) fn content_range(r: &Range<u64>) -> String {
    format!("{}-{}", r.start, r.end.saturating_sub(1))
}

/// The offset to continue from that an upload's status `Range` header (`0-<last byte>`, or with a
/// `bytes=` in front) gives. distribution answers `0-0` for an empty upload (and for one byte,
/// which farm never leaves behind: its chunks are bigger), so `0-0` is 0.
pub(crate) fn parse_range(value: &str) -> Option<u64> {
    let v = value.trim();
    let v = v.strip_prefix("bytes=").unwrap_or(v);
    let (start, end) = v.split_once('-')?;
    if start.trim() != "0" {
        return None;
    }
    let end: u64 = end.trim().parse().ok()?;
    Some(if end == 0 { 0 } else { end + 1 })
}

/// What to do after a request of an upload failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Next {
    /// Continue from this offset with the URL the status answer gave.
    Resume(u64),
    /// Start a new upload of the blob.
    Restart,
}

/// Given the offset the registry reports for the upload (`None`: it no longer knows the upload,
/// or refused to say), the bytes it had acknowledged before the failure and the blob's size.
/// An offset below what was acknowledged or past the blob is not believed.
pub(crate) fn after_failure(reported: Option<u64>, acknowledged: u64, size: u64) -> Next {
    match reported {
        Some(offset) if offset >= acknowledged && offset <= size => Next::Resume(offset),
        _ => Next::Restart,
    }
}

/// Which repositories of which registry are known to hold a blob: those farm pushed it to, found
/// it in, mounted it into or pulled it from, plus any the caller names. Mount candidates, never
/// trusted further: a failed mount falls back to an upload. Cloning shares the table; it keeps at
/// most [`BlobLocations::CAPACITY`] blobs (past that it starts over) and a few repositories each.
#[derive(Clone, Default)]
pub struct BlobLocations {
    table: Arc<Mutex<Table>>,
}

/// (registry, digest) → repositories, the newest first.
type Table = HashMap<(String, Digest), Vec<String>>;

impl std::fmt::Debug for BlobLocations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobLocations").field("blobs", &self.lock().len()).finish()
    }
}

impl BlobLocations {
    pub const CAPACITY: usize = 100_000;
    const PER_BLOB: usize = 4;

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records that `repo`'s repository holds `digest` (the newest first).
    pub fn remember(&self, repo: &ImageRef, digest: &Digest) {
        let mut table = self.lock();
        if table.len() >= Self::CAPACITY {
            table.clear();
        }
        let repos = table.entry((repo.registry.clone(), digest.clone())).or_default();
        repos.retain(|r| *r != repo.repository);
        repos.insert(0, repo.repository.clone());
        repos.truncate(Self::PER_BLOB);
    }

    /// The repositories to try mounting `digest` into `target` from: the known ones, then `hints`
    /// (in the same registry), never `target` itself, at most `MAX_MOUNT_SOURCES`.
    pub fn sources(&self, target: &ImageRef, digest: &Digest, hints: &[ImageRef]) -> Vec<String> {
        let known = self.lock().get(&(target.registry.clone(), digest.clone())).cloned().unwrap_or_default();
        let hinted = hints.iter().filter(|h| h.registry == target.registry).map(|h| h.repository.clone());
        let mut out: Vec<String> = Vec::new();
        for r in known.into_iter().chain(hinted) {
            if r != target.repository && !out.contains(&r) {
                out.push(r);
            }
        }
        out.truncate(MAX_MOUNT_SOURCES);
        out
    }
}

/// A chunk of the file at `path`, read as it is sent.
pub(crate) async fn chunk_body(path: &Path, range: &Range<u64>) -> std::io::Result<reqwest::Body> {
    use tokio::io::{AsyncReadExt as _, AsyncSeekExt as _};
    let mut file = tokio::fs::File::open(path).await?;
    file.seek(std::io::SeekFrom::Start(range.start)).await?;
    let reader = file.take(range.end - range.start);
    let stream = futures_util::stream::try_unfold(reader, |mut r| async move {
        let mut buf = bytes::BytesMut::with_capacity(READ_SIZE);
        let n = r.read_buf(&mut buf).await?;
        Ok::<_, std::io::Error>((n > 0).then(|| (buf.freeze(), r)))
    });
    Ok(reqwest::Body::wrap_stream(stream))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_the_blob_once_in_order() {
        let mut ranges = Vec::new();
        let mut offset = 0;
        while let Some(r) = next_chunk(offset, 10, 4) {
            offset = r.end;
            ranges.push(content_range(&r));
        }
        assert_eq!(ranges, ["0-3", "4-7", "8-9"]);
        assert_eq!(next_chunk(0, 0, 4), None, "an empty blob is no PATCH");
        assert_eq!(next_chunk(10, 10, 4), None);
        assert_eq!(next_chunk(6, 10, 4), Some(6..10), "a resumed upload continues mid-chunk");
        assert_eq!(next_chunk(0, 3, 0), Some(0..1), "a zero chunk size still makes progress");
        assert_eq!(next_chunk(u64::MAX - 1, u64::MAX, 8), Some(u64::MAX - 1..u64::MAX));
    }

    #[test]
    fn upload_status_ranges() {
        assert_eq!(parse_range("0-1048575"), Some(1 << 20));
        assert_eq!(parse_range("bytes=0-9"), Some(10));
        assert_eq!(parse_range(" 0-0 "), Some(0));
        assert_eq!(parse_range("5-9"), None, "a status range starts at 0");
        assert_eq!(parse_range("0-"), None);
        assert_eq!(parse_range("garbage"), None);
    }

    #[test]
    fn resume_only_from_what_the_registry_can_have() {
        assert_eq!(after_failure(Some(64), 64, 100), Next::Resume(64), "the cut PATCH wrote nothing");
        assert_eq!(after_failure(Some(80), 64, 100), Next::Resume(80), "part of the cut PATCH was kept");
        assert_eq!(after_failure(Some(100), 64, 100), Next::Resume(100), "all of it: only the commit is left");
        assert_eq!(after_failure(Some(32), 64, 100), Next::Restart, "less than it acknowledged");
        assert_eq!(after_failure(Some(101), 64, 100), Next::Restart, "more than the blob");
        assert_eq!(after_failure(None, 64, 100), Next::Restart, "the upload is gone");
    }

    #[test]
    fn mount_sources_known_first_then_hints_same_registry_only() {
        let r = |s: &str| s.parse::<ImageRef>().unwrap();
        let d = Digest::of(b"layer");
        let locations = BlobLocations::default();
        let target = r("reg:5000/app");
        assert!(locations.sources(&target, &d, &[]).is_empty());
        locations.remember(&r("reg:5000/one"), &d);
        locations.remember(&r("reg:5000/app"), &d);
        locations.remember(&r("other:5000/x"), &d);
        locations.remember(&r("reg:5000/two"), &d);
        let hints = [r("reg:5000/library/base:1"), r("elsewhere/base:1"), r("reg:5000/one")];
        assert_eq!(locations.sources(&target, &d, &hints), ["two", "one", "library/base"]);
        assert_eq!(locations.sources(&target, &Digest::of(b"other"), &hints), ["library/base", "one"]);
        for i in 0..10 {
            locations.remember(&r(&format!("reg:5000/r{i}")), &d);
        }
        assert_eq!(locations.lock()[&("reg:5000".to_owned(), d.clone())].len(), BlobLocations::PER_BLOB);
        let shared = locations.clone();
        shared.remember(&r("reg:5000/via-clone"), &Digest::of(b"x"));
        assert_eq!(locations.sources(&target, &Digest::of(b"x"), &[]), ["via-clone"], "clones share the table");
    }
}
