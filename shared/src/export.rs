//! Where a build's image goes besides a registry: `-o type=oci|local|tar` (buildx's syntax) and
//! what the CLI writes for them once it has fetched the index and its blobs from the coordinator.
//!
//! [`parse_output`] and [`manifest_blobs`] are pure; the writers take a function that finds a
//! blob's file by digest (the CLI's verified download store) and write an OCI image layout (a
//! directory or a tar), or each platform's root filesystem (layers applied in order, whiteouts
//! honoured).

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::io::{self, Read, Write};
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;

use crate::digest::Digest;
use crate::oci::{self, Descriptor, OciPlatform};

/// One `-o/--output` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Push to the registry the tags name (also `--push`).
    Registry,
    /// An OCI image layout holding the whole index: a tar at `dest` (`-`: stdout), or a
    /// directory with `tar=false`.
    Oci { dest: Dest, tar: bool },
    /// Each platform's root filesystem in `dest/<os>_<arch>[_<variant>]` (one platform: in `dest`).
    Local { dest: PathBuf },
    /// The same as `Local`, as a tar.
    Tar { dest: Dest },
}

/// A file or standard output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dest {
    Stdout,
    Path(PathBuf),
}

impl Output {
    /// Whether this output needs the image in a registry.
    pub fn is_registry(&self) -> bool {
        matches!(self, Output::Registry)
    }

    pub fn writes_stdout(&self) -> bool {
        matches!(self, Output::Oci { dest: Dest::Stdout, .. } | Output::Tar { dest: Dest::Stdout })
    }
}

/// What is wrong with an `-o` value; the message names the flag, the value and the fix.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[error("-o {value}: {reason}")]
pub struct OutputError {
    pub value: String,
    pub reason: String,
}

/// Parses one `-o` value as buildx does: `type=T[,dest=D][,tar=BOOL]`; a bare path means
/// `type=local,dest=PATH`, a bare `-` a tar on stdout. Checks that `dest`'s directory exists,
/// so that nothing is uploaded for a build whose result could not be written.
pub fn parse_output(value: &str) -> Result<Output, OutputError> {
    let err = |reason: String| OutputError { value: value.to_string(), reason };
    if value.is_empty() {
        return Err(err(
            "empty: use type=registry, type=oci,dest=FILE, type=local,dest=DIR or type=tar,dest=FILE".into()
        ));
    }
    if !value.contains('=') {
        return if value == "-" {
            Ok(Output::Tar { dest: Dest::Stdout })
        } else {
            check_parent(Path::new(value)).map_err(err)?;
            Ok(Output::Local { dest: PathBuf::from(value) })
        };
    }
    let mut fields = BTreeMap::new();
    for part in value.split(',') {
        let Some((k, v)) = part.split_once('=') else {
            return Err(err(format!("{part:?} is not KEY=VALUE")));
        };
        if fields.insert(k, v).is_some() {
            return Err(err(format!("{k}= is given twice")));
        }
    }
    let kind = fields.remove("type").ok_or_else(|| err("no type=: add type=registry, oci, local or tar".into()))?;
    let allowed: &[&str] = match kind {
        "registry" => &["push", "name"],
        "oci" => &["dest", "tar", "name"],
        "local" | "tar" => &["dest"],
        other => {
            return Err(err(format!(
                "unknown output type {other:?}: farm writes type=registry, type=oci, type=local or type=tar"
            )))
        }
    };
    if let Some(k) = fields.keys().find(|k| !allowed.contains(k)) {
        let keys = allowed.iter().map(|k| format!("{k}=")).collect::<Vec<_>>().join(", ");
        return Err(err(format!("type={kind} takes no {k}= (it takes {keys})")));
    }
    if kind == "registry" {
        if fields.get("push").is_some_and(|p| *p != "true") {
            return Err(err("type=registry always pushes; drop push=".into()));
        }
        if fields.contains_key("name") {
            return Err(err("name= is not supported: name the image with -t".into()));
        }
        return Ok(Output::Registry);
    }
    if fields.contains_key("name") {
        return Err(err("name= is not supported: name the image with -t".into()));
    }
    let tar = match fields.get("tar").copied() {
        None | Some("true") => true,
        Some("false") => false,
        Some(other) => return Err(err(format!("tar={other}: expected tar=true or tar=false"))),
    };
    let dest = match fields.get("dest").copied() {
        Some("") | None => {
            let fix = match kind {
                "oci" => "dest=FILE (a tar; dest=- for stdout), or dest=DIR,tar=false for a directory",
                "local" => "dest=DIR",
                _ => "dest=FILE (dest=- for stdout)",
            };
            return Err(err(format!("type={kind} needs {fix}")));
        }
        Some(d) => d,
    };
    let stdout = dest == "-";
    if stdout && (kind == "local" || !tar) {
        return Err(err("a directory cannot go to stdout (dest=-): give dest=DIR".into()));
    }
    if !stdout {
        check_parent(Path::new(dest)).map_err(err)?;
    }
    let to = if stdout { Dest::Stdout } else { Dest::Path(PathBuf::from(dest)) };
    Ok(match kind {
        "oci" => Output::Oci { dest: to, tar },
        "local" => Output::Local { dest: PathBuf::from(dest) },
        _ => Output::Tar { dest: to },
    })
}

/// The directory `dest` would be written in must exist (as buildx: it creates no parents).
fn check_parent(dest: &Path) -> Result<(), String> {
    let parent = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => return Ok(()),
    };
    if parent.is_dir() {
        Ok(())
    } else {
        Err(format!(
            "the directory {} does not exist: create it first, or give a dest= in a directory that exists",
            parent.display()
        ))
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ManifestBlobs {
    config: Descriptor,
    layers: Vec<Descriptor>,
}

/// The blobs an image manifest names: its config, then its layers in order.
pub fn manifest_blobs(manifest: &[u8]) -> Result<Vec<Descriptor>, oci::OciError> {
    let m: ManifestBlobs = serde_json::from_slice(manifest)
        .map_err(|source| oci::OciError::Json { what: "an image manifest".into(), source })?;
    Ok(std::iter::once(m.config).chain(m.layers).collect())
}

/// `linux_amd64`, `linux_arm_v7`: buildx's directory name for a platform.
pub fn platform_dir(p: &OciPlatform) -> String {
    match &p.variant {
        Some(v) => format!("{}_{}_{v}", p.os, p.architecture),
        None => format!("{}_{}", p.os, p.architecture),
    }
}

/// The `index.json` of an OCI layout whose image is the index `index` (one entry per tag, with
/// BuildKit's annotations: the full name in `io.containerd.image.name`, the tag in
/// `org.opencontainers.image.ref.name`; no tags: one entry without a name). `index`'s own
/// annotations (`--annotation index-descriptor:...`) go on every entry.
pub fn layout_index(index: &Descriptor, tags: &[oci::ImageRef]) -> Vec<u8> {
    let mut entries = Vec::new();
    let plain = Descriptor { platform: None, ..index.clone() };
    for t in tags {
        let mut d = plain.clone();
        d.annotations.insert("io.containerd.image.name".into(), t.to_string());
        d.annotations.insert("org.opencontainers.image.ref.name".into(), t.tag.clone().unwrap_or("latest".into()));
        entries.push(d);
    }
    if entries.is_empty() {
        entries.push(plain);
    }
    oci::image_index(&entries)
}

const OCI_LAYOUT: &[u8] = br#"{"imageLayoutVersion":"1.0.0"}"#;

/// Writes an OCI image layout: `oci-layout`, `index.json`, then every blob under
/// `blobs/sha256/` (each once), as a directory (created if missing) or as a tar stream.
pub fn write_oci_layout(
    index_json: &[u8],
    blobs: &[Digest],
    blob_file: &dyn Fn(&Digest) -> PathBuf,
    to: LayoutSink<'_>,
) -> io::Result<()> {
    let mut seen = HashSet::new();
    let unique: Vec<&Digest> = blobs.iter().filter(|d| seen.insert(*d)).collect();
    match to {
        LayoutSink::Dir(dir) => {
            fs::create_dir_all(dir.join("blobs").join("sha256"))?;
            for d in unique {
                let dest = oci::blob_path(dir, d);
                if !dest.exists() {
                    fs::copy(blob_file(d), &dest)?;
                }
            }
            fs::write(dir.join("oci-layout"), OCI_LAYOUT)?;
            fs::write(dir.join("index.json"), index_json)
        }
        LayoutSink::Tar(w) => {
            let mut tar = tar::Builder::new(w);
            tar.mode(tar::HeaderMode::Deterministic);
            append_bytes(&mut tar, "oci-layout", OCI_LAYOUT)?;
            append_bytes(&mut tar, "index.json", index_json)?;
            append_dir(&mut tar, "blobs/")?;
            append_dir(&mut tar, "blobs/sha256/")?;
            for d in unique {
                let mut f = fs::File::open(blob_file(d))?;
                let size = f.metadata()?.len();
                let mut h = file_header(size);
                tar.append_data(&mut h, format!("blobs/sha256/{}", d.hex()), &mut f)?;
            }
            tar.into_inner()?.flush()
        }
    }
}

/// Where [`write_oci_layout`] writes.
pub enum LayoutSink<'a> {
    Dir(&'a Path),
    Tar(&'a mut dyn Write),
}

fn file_header(size: u64) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_uid(0);
    h.set_gid(0);
    h.set_size(size);
    h.set_mode(0o644);
    h.set_mtime(0);
    h.set_entry_type(tar::EntryType::Regular);
    h
}

fn append_bytes<W: Write>(tar: &mut tar::Builder<W>, path: &str, bytes: &[u8]) -> io::Result<()> {
    let mut h = file_header(bytes.len() as u64);
    tar.append_data(&mut h, path, bytes)
}

fn append_dir<W: Write>(tar: &mut tar::Builder<W>, path: &str) -> io::Result<()> {
    let mut h = tar::Header::new_ustar();
    h.set_uid(0);
    h.set_gid(0);
    h.set_size(0);
    h.set_mode(0o755);
    h.set_mtime(0);
    h.set_entry_type(tar::EntryType::Directory);
    tar.append_data(&mut h, path, io::empty())
}

/// Applies image layers in order onto `root` (created if missing), as a container runtime
/// would: `.wh.NAME` removes NAME from the layers below, `.wh..wh..opq` empties its directory
/// of what the layers below put there. Paths that would leave `root` are refused by the tar
/// reader. Layers are gzip-compressed or plain tar, as their media type says.
pub fn unpack_layers(layers: &[(Descriptor, PathBuf)], root: &Path) -> io::Result<()> {
    fs::create_dir_all(root)?;
    let owner = unsafe { libc::geteuid() } == 0;
    for (desc, file) in layers {
        let f = io::BufReader::new(fs::File::open(file)?);
        let reader: Box<dyn Read> = if desc.media_type.contains("zstd") {
            return Err(io::Error::other(format!(
                "layer {} is zstd-compressed ({}), which farm cannot unpack yet",
                desc.digest, desc.media_type
            )));
        } else if desc.media_type.contains("gzip") {
            Box::new(flate2::read::GzDecoder::new(f))
        } else {
            Box::new(f)
        };
        unpack_layer(reader, root, owner)?;
    }
    Ok(())
}

fn unpack_layer(reader: impl Read, root: &Path, owner: bool) -> io::Result<()> {
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_permissions(true);
    archive.set_preserve_mtime(true);
    archive.set_preserve_ownerships(owner);
    archive.set_overwrite(true);
    // What this layer itself put in place, which an opaque whiteout must not remove.
    let mut ours: HashSet<PathBuf> = HashSet::new();
    for entry in archive.entries()? {
        let mut entry = entry?;
        let Some(rel) = clean(&entry.path()?) else { continue };
        let name = rel.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let parent = rel.parent().map(Path::to_path_buf).unwrap_or_default();
        if name == ".wh..wh..opq" {
            let dir = root.join(&parent);
            if let Ok(children) = fs::read_dir(&dir) {
                for c in children.flatten() {
                    if !ours.contains(&parent.join(c.file_name())) {
                        remove(&c.path())?;
                    }
                }
            }
            continue;
        }
        if let Some(hidden) = name.strip_prefix(".wh.") {
            remove(&root.join(&parent).join(hidden))?;
            continue;
        }
        let kind = entry.header().entry_type();
        if !owner && (kind.is_character_special() || kind.is_block_special()) {
            continue;
        }
        let target = root.join(&rel);
        if let Ok(meta) = fs::symlink_metadata(&target) {
            // A directory stays a directory (its contents merge); anything else is replaced.
            if !(meta.is_dir() && kind.is_dir()) {
                remove(&target)?;
            }
        }
        entry.unpack_in(root)?;
        ours.insert(rel);
    }
    Ok(())
}

fn remove(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// A layer path relative to the root, without `.` components; `None` for the root itself and
/// for paths that climb out (`..`).
fn clean(p: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir | Component::Prefix(_) => return None,
        }
    }
    (!out.as_os_str().is_empty()).then_some(out)
}

/// Writes the directory `dir` as a tar stream (symlinks as symlinks).
pub fn tar_directory(dir: &Path, to: &mut dyn Write) -> io::Result<()> {
    let mut tar = tar::Builder::new(to);
    tar.follow_symlinks(false);
    tar.append_dir_all(".", dir)?;
    tar.into_inner()?.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(v: &str) -> Output {
        parse_output(v).unwrap_or_else(|e| panic!("{v}: {e}"))
    }

    fn bad(v: &str) -> String {
        parse_output(v).unwrap_err().to_string()
    }

    #[test]
    fn outputs_parse_as_buildx_spells_them() {
        assert_eq!(ok("type=registry"), Output::Registry);
        assert_eq!(ok("type=oci,dest=out.tar"), Output::Oci { dest: Dest::Path("out.tar".into()), tar: true });
        assert_eq!(ok("type=oci,dest=-"), Output::Oci { dest: Dest::Stdout, tar: true });
        assert_eq!(ok("type=oci,dest=d,tar=false"), Output::Oci { dest: Dest::Path("d".into()), tar: false });
        assert_eq!(ok("type=local,dest=/tmp/x"), Output::Local { dest: "/tmp/x".into() });
        assert_eq!(ok("type=tar,dest=-"), Output::Tar { dest: Dest::Stdout });
        assert_eq!(ok("rootfs"), Output::Local { dest: "rootfs".into() });
        assert_eq!(ok("-"), Output::Tar { dest: Dest::Stdout });
    }

    #[test]
    fn bad_outputs_say_what_to_write() {
        assert_eq!(
            bad("type=nope"),
            "-o type=nope: unknown output type \"nope\": farm writes type=registry, type=oci, type=local or type=tar"
        );
        assert_eq!(
            bad("type=oci"),
            "-o type=oci: type=oci needs dest=FILE (a tar; dest=- for stdout), or dest=DIR,tar=false for a directory"
        );
        assert_eq!(
            bad("type=oci,dest=/no/such/dir/out.tar"),
            "-o type=oci,dest=/no/such/dir/out.tar: the directory /no/such/dir does not exist: create it first, or \
             give a dest= in a directory that exists"
        );
        assert_eq!(
            bad("type=local,dest=-"),
            "-o type=local,dest=-: a directory cannot go to stdout (dest=-): give dest=DIR"
        );
        assert_eq!(
            bad("type=tar,dest=x,tar=false"),
            "-o type=tar,dest=x,tar=false: type=tar takes no tar= (it takes dest=)"
        );
        assert_eq!(bad("dest=x"), "-o dest=x: no type=: add type=registry, oci, local or tar");
    }

    #[test]
    fn a_layout_names_the_index_once_per_tag() {
        let d: Digest = format!("sha256:{}", "a".repeat(64)).parse().unwrap();
        let index = Descriptor::new(oci::OCI_INDEX, d.clone(), 10);
        let tags: Vec<oci::ImageRef> = vec!["hello:1".parse().unwrap()];
        let json: serde_json::Value = serde_json::from_slice(&layout_index(&index, &tags)).unwrap();
        assert_eq!(json["manifests"][0]["digest"], d.to_string());
        assert_eq!(json["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"], "1");
        assert_eq!(json["manifests"][0]["annotations"]["io.containerd.image.name"], "docker.io/library/hello:1");
        let none: serde_json::Value = serde_json::from_slice(&layout_index(&index, &[])).unwrap();
        assert_eq!(none["manifests"].as_array().unwrap().len(), 1);
    }

    fn layer(entries: &[(&str, Option<&str>)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, content) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            match content {
                Some(c) => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_size(c.len() as u64);
                    h.set_mode(0o644);
                    b.append_data(&mut h, path, c.as_bytes()).unwrap();
                }
                None => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_size(0);
                    h.set_mode(0o755);
                    b.append_data(&mut h, path, io::empty()).unwrap();
                }
            }
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn layers_apply_in_order_with_whiteouts() {
        let t = tempfile::tempdir().unwrap();
        let l1 =
            layer(&[("etc/", None), ("etc/a", Some("1")), ("etc/b", Some("2")), ("opt/", None), ("opt/x", Some("x"))]);
        let l2 = layer(&[
            ("etc/.wh.a", Some("")),
            ("etc/b", Some("3")),
            ("opt/.wh..wh..opq", Some("")),
            ("opt/y", Some("y")),
        ]);
        let (p1, p2) = (t.path().join("l1"), t.path().join("l2"));
        fs::write(&p1, &l1).unwrap();
        fs::write(&p2, &l2).unwrap();
        let d = |n| Descriptor::new("application/vnd.oci.image.layer.v1.tar", Digest::of(n), 0);
        let root = t.path().join("root");
        unpack_layers(&[(d(&l1), p1), (d(&l2), p2)], &root).unwrap();
        assert!(!root.join("etc/a").exists());
        assert_eq!(fs::read_to_string(root.join("etc/b")).unwrap(), "3");
        assert!(!root.join("opt/x").exists());
        assert_eq!(fs::read_to_string(root.join("opt/y")).unwrap(), "y");
    }
}
