//! The content-addressed blob store: blobs named by digest, verified before they take their name.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use super::{
    io_err, ContextError, ContextLimits, ContextManifest, EntryKind, ValidManifest, BUF_SIZE, MAX_MANIFEST_BYTES,
};
use crate::digest::{Digest, Hasher};

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

    /// Stores a validated context manifest as a blob (its encoding, [`ContextManifest::to_bytes`],
    /// whose digest is [`ContextManifest::digest`]) and returns that digest. Manifests travel
    /// between the CLI, the coordinator and agents as blobs, so a context of any allowed size fits
    /// no frame limit.
    pub fn put_manifest(&self, m: &ValidManifest) -> Result<Digest, ContextError> {
        self.put(&m.to_bytes())
    }

    /// The manifest stored under `d`, decoded and validated under `limits` (the receiving side's):
    /// the one way a manifest comes out of a store. At most [`MAX_MANIFEST_BYTES`] are read.
    pub fn get_manifest(&self, d: &Digest, limits: &ContextLimits) -> Result<ValidManifest, ContextError> {
        self.read_manifest(d)?.into_valid(limits)
    }

    /// The digest of the file at `path` in the manifest stored under `d`, if it lists a file
    /// there. The manifest is not validated: for a lookup that writes nothing, in a manifest the
    /// caller validated when it arrived (the coordinator finding a build's Dockerfile).
    pub fn manifest_file(&self, d: &Digest, path: &str) -> Result<Option<Digest>, ContextError> {
        let manifest = self.read_manifest(d)?;
        Ok(manifest.entries.into_iter().find(|e| e.path == path).and_then(|e| match e.kind {
            EntryKind::File { digest, .. } => Some(digest),
            _ => None,
        }))
    }

    fn read_manifest(&self, d: &Digest) -> Result<ContextManifest, ContextError> {
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
        ContextManifest::decode(d, &bytes)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::context::Entry;

    #[test]
    fn manifests_go_in_validated_and_come_out_validated() {
        let tmp = tempfile::tempdir().unwrap();
        let store = BlobStore::open(tmp.path()).unwrap();
        let limits = ContextLimits::default();
        let file = |path: &str, bytes: &[u8]| Entry {
            path: path.into(),
            mode: 0o644,
            kind: EntryKind::File { size: bytes.len() as u64, digest: Digest::of(bytes) },
        };
        let dir = Entry { path: "src".into(), mode: 0o755, kind: EntryKind::Dir };
        let m = ContextManifest { entries: vec![file("Dockerfile", b"FROM x\n"), dir] };
        let valid = m.clone().into_valid(&limits).unwrap();

        let d = store.put_manifest(&valid).unwrap();
        assert_eq!(d, m.digest());
        assert_eq!(fs::read(store.path(&d)).unwrap(), m.to_bytes());
        assert_eq!(store.get_manifest(&d, &limits).unwrap(), valid);
        assert_eq!(store.manifest_file(&d, "Dockerfile").unwrap(), Some(Digest::of(b"FROM x\n")));
        assert_eq!(store.manifest_file(&d, "src").unwrap(), None, "a directory is no file");
        assert_eq!(store.manifest_file(&d, "nope").unwrap(), None);

        // Whatever is stored, only a manifest valid under the reader's limits comes out.
        let tight = ContextLimits { max_files: 1, ..Default::default() };
        let err = store.get_manifest(&d, &tight).unwrap_err();
        assert!(matches!(err, ContextError::TooManyFiles { count: 2, limit: 1 }), "{err:?}");
        let escaping = store.put(&ContextManifest { entries: vec![file("../x", b"x")] }.to_bytes()).unwrap();
        let err = store.get_manifest(&escaping, &limits).unwrap_err();
        assert_eq!(err.to_string(), r#"context path "../x" leaves the context (".." is not allowed)"#);
        let junk = store.put(b"\xff\xff\xff").unwrap();
        let err = store.get_manifest(&junk, &limits).unwrap_err().to_string();
        assert!(err.starts_with(&format!("context manifest {junk}: not a manifest (")), "{err}");
        let absent = Digest::of(b"absent");
        assert!(matches!(store.get_manifest(&absent, &limits), Err(ContextError::MissingBlob(d)) if d == absent));
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
}
