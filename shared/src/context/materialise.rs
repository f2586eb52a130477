//! The receiving side: a validated context recreated on disk from the blob store.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use super::{io_err, BlobStore, ContextError, EntryKind, ValidManifest};
use crate::digest::Digest;

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
    use crate::context::fixtures::*;
    use crate::context::{scan, ContextLimits, Entry, Scanned};

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
