//! The sending side: a directory walked into a manifest with `.dockerignore` applied, each file
//! hashed (or its digest taken from the scan cache), and a context tar from stdin unpacked.

use std::collections::HashMap;
use std::fs::{self, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::dockerignore::{clean, DockerIgnore};
use super::{io_err, ContextError, ContextLimits, ContextManifest, Entry, EntryKind, BUF_SIZE};
use crate::digest::{Digest, Hasher};

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::context::fixtures::*;
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;

    fn entry<'a>(m: &'a ContextManifest, path: &str) -> Option<&'a Entry> {
        m.entries.iter().find(|e| e.path == path)
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
}
