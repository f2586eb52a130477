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
//! out of the context, not even through other symlinks. [`materialise`](fn@materialise) takes only a
//! validated manifest, and the blob store renames a blob into place only once its bytes hash to the
//! expected digest.
//!
//! On the sending side, [`scan`](fn@scan) walks a directory with Docker's `.dockerignore` rules
//! ([`DockerIgnore`]), so that a context holds the same files here as it would for `docker build`.
//!
//! Who owns what:
//! - [`manifest`]: [`ContextManifest`] and its entries, [`ContextLimits`], validation
//!   ([`ValidManifest`]), and the manifest's one encoding (what is stored, sent and digested).
//! - [`dockerignore`]: Docker's `.dockerignore` rules ([`DockerIgnore`]).
//! - [`scan`](mod@scan): walking a directory into a manifest ([`Scanned`]), with the scan cache;
//!   unpacking a context tar from stdin.
//! - [`store`]: the content-addressed [`BlobStore`], its [`BlobWriter`] and the [`BlobSink`]
//!   that stores a stream of blobs off the async threads.
//! - [`materialise`](mod@materialise): recreating a validated context on disk.

use std::io;
use std::path::{Path, PathBuf};

use crate::digest::Digest;

pub mod dockerignore;
pub mod manifest;
pub mod materialise;
pub mod scan;
pub mod store;

pub use dockerignore::DockerIgnore;
pub use manifest::{ContextLimits, ContextManifest, Entry, EntryKind, ValidManifest, MAX_MANIFEST_BYTES};
pub use materialise::materialise;
pub use scan::{scan, scan_cached, scan_cached_at, scan_dir, unpack_context_tar, Scanned};
pub use store::{BlobSink, BlobStore, BlobWriter, Written};

/// Buffer size for hashing and copying file contents.
const BUF_SIZE: usize = 64 * 1024;

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

#[cfg(test)]
mod fixtures {
    //! Contexts and manifests the tests of several files use.
    use std::fs;
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;

    use super::{ContextManifest, Entry, EntryKind};
    use crate::digest::Digest;

    pub(super) fn write(path: &Path, contents: &[u8]) {
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).unwrap();
        }
        fs::write(path, contents).unwrap();
    }

    /// A context with nested dirs, an empty dir, an executable, a symlink, duplicate files and a
    /// .dockerignore that excludes files and a directory, and (with `*`) even the Dockerfile.
    pub(super) fn sample(root: &Path) {
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

    pub(super) fn file(path: &str) -> Entry {
        Entry { path: path.into(), mode: 0o644, kind: EntryKind::File { size: 1, digest: Digest::of(path.as_bytes()) } }
    }
    pub(super) fn dir(path: &str) -> Entry {
        Entry { path: path.into(), mode: 0o755, kind: EntryKind::Dir }
    }
    pub(super) fn link(path: &str, target: &str) -> Entry {
        Entry { path: path.into(), mode: 0o777, kind: EntryKind::Symlink { target: target.into() } }
    }
    pub(super) fn manifest(entries: Vec<Entry>) -> ContextManifest {
        ContextManifest { entries }
    }
}
