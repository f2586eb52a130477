//! Where `farm build`'s image goes: the output flags checked before anything is sent, and,
//! after the build, the index and its blobs fetched from the coordinator and written out
//! (`shared::export` does the writing), `--load`, `--metadata-file`, `--iidfile`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::json;
use shared::annotation::{self, Annotation, AnnotationKind};
use shared::client::Client;
use shared::export::{self, Dest, LayoutSink, Output};
use shared::oci::{self, Descriptor, ImageRef};
use shared::proto::{PlatformResult, Request, Response};
use shared::{Digest, Platform};

use crate::cli::{BuildArgs, LoadInto, Progress};

/// What the output flags ask for, checked.
pub struct Plan {
    /// Push to the registry the tags name (and nothing else).
    pub registry: bool,
    pub outputs: Vec<Output>,
    pub load: Option<Load>,
    /// An output goes to standard output: the summary does not.
    pub stdout: bool,
    /// The tags, parsed (any, with or without a registry host, when nothing is pushed).
    pub tags: Vec<ImageRef>,
    /// `--annotation`, parsed, each platform filter naming a platform of the build.
    pub annotations: Vec<Annotation>,
    /// `--label`, parsed.
    pub labels: Vec<(String, String)>,
}

pub struct Load {
    pub into: LoadInto,
    pub platform: Platform,
    /// Whether the build has other platforms too (then only this one is loaded).
    pub of_many: bool,
}

/// Checks `-o`, `--push`, `--load`, `--metadata-file` and `--iidfile` before anything is sent.
pub fn plan(args: &BuildArgs, platforms: &[Platform]) -> Result<Plan> {
    let mut outputs = args.outputs.iter().map(|o| export::parse_output(o)).collect::<Result<Vec<_>, _>>()?;
    if args.push && !outputs.contains(&Output::Registry) {
        outputs.push(Output::Registry);
    }
    if outputs.is_empty() && args.load.is_none() {
        outputs.push(Output::Registry);
    }
    let registry = outputs.iter().any(Output::is_registry);
    if registry && (outputs.len() > 1 || args.load.is_some()) {
        bail!(
            "-o type=registry (or --push) and a local output (-o type=oci|local|tar, --load) in one build: farm \
             either pushes to a registry or brings the image back, not both; drop one, or pull the pushed tag \
             (e.g. skopeo copy --all docker://TAG oci-archive:FILE)"
        );
    }
    let stdout = outputs.iter().filter(|o| o.writes_stdout()).count();
    if stdout > 1 {
        bail!("-o: two outputs write to stdout (dest=-); give all but one a file");
    }
    if stdout == 1 && args.progress == Progress::Json {
        bail!("-o ...,dest=- writes the image to stdout, where --progress json writes too; use --progress plain");
    }
    let tags = args.tags.iter().map(|t| oci::push_tag(t)).collect::<Result<Vec<_>, _>>()?;
    let annotations = annotation::parse_annotations(&args.annotations, platforms)?;
    let labels = annotation::parse_labels(&args.labels)?;
    for (flag, path) in [("--metadata-file", &args.metadata_file), ("--iidfile", &args.iidfile)] {
        if let Some(p) = path {
            check_parent(flag, p)?;
        }
    }
    let load = match args.load {
        None => None,
        Some(into) => {
            if tags.is_empty() {
                bail!("--load needs a name for the image in the local store: add -t NAME:TAG (e.g. -t hello:1)");
            }
            let platform = match platforms {
                [one] => one.clone(),
                many => {
                    let native = crate::build::host_platform()?;
                    if !many.contains(&native) {
                        let list = many.iter().map(ToString::to_string).collect::<Vec<_>>().join(",");
                        bail!(
                            "--load loads this machine's platform ({native}), which --platform {list} does not \
                             build: add {native} to --platform, or use -o type=oci,dest=FILE for the others"
                        );
                    }
                    native
                }
            };
            Some(Load { into, platform, of_many: platforms.len() > 1 })
        }
    };
    Ok(Plan { registry, outputs, load, stdout: stdout == 1, tags, annotations, labels })
}

fn check_parent(flag: &str, p: &Path) -> Result<()> {
    match p.parent() {
        Some(dir) if !dir.as_os_str().is_empty() && !dir.is_dir() => bail!(
            "{flag} {}: the directory {} does not exist: create it first, or write the file elsewhere",
            p.display(),
            dir.display()
        ),
        _ => Ok(()),
    }
}

/// `--load`'s platform must be one a connected agent builds (natively, or emulated unless
/// `--emulation never`): checked before the context is uploaded.
pub async fn check_load_platform(client: &Client, load: &Load, never_emulate: bool) -> Result<()> {
    let agents = match client.request(&Request::ListAgents).await? {
        Response::Agents(a) => a,
        other => bail!("the coordinator answered {other:?} to a list of agents"),
    };
    let p = &load.platform;
    let able = agents.iter().any(|a| a.native.contains(p) || (!never_emulate && a.emulated.contains(p)));
    if !able {
        bail!(
            "--load {p}: no connected agent builds {p} (`farm agents` lists what each builds); start an agent that \
             runs it, or drop --load and use -o type=oci,dest=FILE"
        );
    }
    Ok(())
}

/// After a successful build: the outputs written (their blobs fetched from the coordinator),
/// the native image loaded, the metadata and iid files written.
pub async fn deliver(
    client: &Client,
    plan: &Plan,
    args: &BuildArgs,
    build: &str,
    index: &Digest,
    platforms: &[PlatformResult],
    registry: Option<&shared::registry::Registry>,
) -> Result<()> {
    let entries: Vec<(Platform, Descriptor)> = platforms
        .iter()
        .map(|r| {
            (r.platform.clone(), Descriptor::new(&r.manifest.media_type, r.manifest.digest.clone(), r.manifest.size))
        })
        .collect();
    let index_bytes = annotation::stitch(&entries, &plan.annotations);
    let mut index_desc = Descriptor::new(oci::OCI_INDEX, index.clone(), index_bytes.len() as u64);
    // `index-descriptor` annotations: on the index's entry in an OCI layout's index.json.
    let mut layout_desc = index_desc.clone();
    layout_desc.annotations = annotation::of_kind(&plan.annotations, AnnotationKind::IndexDescriptor);
    if Digest::of(&index_bytes) != *index && plan.registry {
        // A pushed index also lists provenance's attestation manifests: its size is the
        // registry's, read back only for --metadata-file.
        if let (Some(registry), Some(tag), Some(_)) = (registry, plan.tags.first(), &args.metadata_file) {
            let (bytes, _, _) = registry.fetch_manifest(&tag.with_digest(index)).await?;
            index_desc.size = bytes.len() as u64;
        }
    } else if Digest::of(&index_bytes) != *index {
        bail!("the index the coordinator stitched ({index}) is not the one its platforms make; report this as a bug");
    }
    if !plan.registry {
        let tmp = tempfile_dir()?;
        let store = shared::context::BlobStore::open(&tmp.path().join("blobs"))?;
        let blob = |d: &Digest| store.path(d);
        // Index, manifests, then configs and layers: each fetched once, verified by digest.
        let manifests: Vec<Digest> = platforms.iter().map(|p| p.manifest.digest.clone()).collect();
        let mut fetched = client.fetch_blobs(&manifests, &store).await?;
        let mut blobs: Vec<Digest> = manifests.clone();
        let mut per_platform = Vec::new();
        for p in platforms {
            let bytes = std::fs::read(blob(&p.manifest.digest))?;
            let named = export::manifest_blobs(&bytes)?;
            blobs.extend(named.iter().map(|d| d.digest.clone()));
            per_platform.push((p.platform.clone(), named));
        }
        fetched += client.fetch_blobs(&blobs, &store).await?;
        store.put(&index_bytes)?;
        blobs.push(index.clone());
        eprintln!("fetched {} of results from the coordinator", crate::output::bytes(fetched));
        for o in &plan.outputs {
            write_output(o, &layout_desc, &plan.tags, &blobs, &blob, &per_platform, &tmp.path().join("rootfs"))?;
        }
        if let Some(load) = &plan.load {
            load_image(load, &plan.tags[0], platforms, &blob, &per_platform, tmp.path())?;
        }
    }
    if let Some(path) = &args.iidfile {
        write_atomically(path, index.to_string().as_bytes())?;
    }
    if let Some(path) = &args.metadata_file {
        let builders = builders(client).await;
        let m = metadata(build, &index_desc, &args.tags, platforms, &builders);
        write_atomically(path, &serde_json::to_vec_pretty(&m)?)?;
    }
    Ok(())
}

fn tempfile_dir() -> Result<tempfile::TempDir> {
    tempfile::Builder::new().prefix("farm-results-").tempdir().context("creating a temporary directory")
}

type PerPlatform = [(Platform, Vec<Descriptor>)];

fn write_output(
    o: &Output,
    index: &Descriptor,
    tags: &[ImageRef],
    blobs: &[Digest],
    blob: &dyn Fn(&Digest) -> PathBuf,
    per_platform: &PerPlatform,
    scratch: &Path,
) -> Result<()> {
    match o {
        Output::Registry => Ok(()),
        Output::Oci { dest, tar } => {
            let index_json = export::layout_index(index, tags);
            match (dest, tar) {
                (Dest::Path(dir), false) => export::write_oci_layout(&index_json, blobs, blob, LayoutSink::Dir(dir))
                    .with_context(|| format!("writing the OCI layout {}", dir.display()))?,
                (dest, _) => to_dest(dest, "OCI layout archive", &mut |w| {
                    export::write_oci_layout(&index_json, blobs, blob, LayoutSink::Tar(w))
                })?,
            }
            if let Dest::Path(p) = dest {
                eprintln!("wrote {} (OCI layout, {} platforms)", p.display(), per_platform.len());
            }
            Ok(())
        }
        Output::Local { dest } => {
            unpack(per_platform, blob, dest)?;
            eprintln!("wrote {}", dest.display());
            Ok(())
        }
        Output::Tar { dest } => {
            let _ = std::fs::remove_dir_all(scratch);
            unpack(per_platform, blob, scratch)?;
            to_dest(dest, "root filesystem tar", &mut |w| export::tar_directory(scratch, w))?;
            std::fs::remove_dir_all(scratch).ok();
            if let Dest::Path(p) = dest {
                eprintln!("wrote {}", p.display());
            }
            Ok(())
        }
    }
}

/// Each platform's root filesystem: in `dest` for one platform, else `dest/linux_amd64/`...
fn unpack(per_platform: &PerPlatform, blob: &dyn Fn(&Digest) -> PathBuf, dest: &Path) -> Result<()> {
    for (platform, named) in per_platform {
        let root = if per_platform.len() == 1 {
            dest.to_path_buf()
        } else {
            dest.join(export::platform_dir(&platform.into()))
        };
        let layers: Vec<(Descriptor, PathBuf)> = named[1..].iter().map(|d| (d.clone(), blob(&d.digest))).collect();
        export::unpack_layers(&layers, &root)
            .with_context(|| format!("unpacking {platform}'s root filesystem into {}", root.display()))?;
    }
    Ok(())
}

/// Writes a file through a temporary one beside it, renamed into place (stdout: directly).
fn to_dest(
    dest: &Dest,
    what: &str,
    write: &mut dyn FnMut(&mut dyn std::io::Write) -> std::io::Result<()>,
) -> Result<()> {
    match dest {
        Dest::Stdout => {
            let mut out = std::io::stdout().lock();
            write(&mut out).with_context(|| format!("writing the {what} to stdout"))
        }
        Dest::Path(p) => {
            let tmp = temp_beside(p);
            let result = (|| {
                let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
                write(&mut f)?;
                f.into_inner().map_err(|e| e.into_error())?.sync_all()?;
                std::fs::rename(&tmp, p)
            })();
            if result.is_err() {
                let _ = std::fs::remove_file(&tmp);
            }
            result.with_context(|| format!("writing the {what} {}", p.display()))
        }
    }
}

fn temp_beside(p: &Path) -> PathBuf {
    let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    p.with_file_name(format!(".{name}.farm-{}.tmp", std::process::id()))
}

/// Writes `bytes` to `path` atomically: a temporary file beside it, synced, renamed into place.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    to_dest(&Dest::Path(path.to_path_buf()), "file", &mut |w| w.write_all(bytes))
}

/// `--load`: a one-image OCI layout of the platform, copied by skopeo into the chosen store.
fn load_image(
    load: &Load,
    tag: &ImageRef,
    platforms: &[PlatformResult],
    blob: &dyn Fn(&Digest) -> PathBuf,
    per_platform: &PerPlatform,
    tmp: &Path,
) -> Result<()> {
    let Some(r) = platforms.iter().find(|r| r.platform == load.platform) else {
        bail!("--load: the build has no {} image", load.platform);
    };
    let named = &per_platform.iter().find(|(p, _)| *p == load.platform).expect("every platform was fetched").1;
    let mut blobs: Vec<Digest> = named.iter().map(|d| d.digest.clone()).collect();
    blobs.push(r.manifest.digest.clone());
    let mut entry = Descriptor::new(&r.manifest.media_type, r.manifest.digest.clone(), r.manifest.size);
    entry.platform = Some((&r.platform).into());
    let dir = tmp.join("load");
    export::write_oci_layout(&oci::image_index(&[entry]), &blobs, blob, LayoutSink::Dir(&dir))?;
    let (store, dest) = match load.into {
        LoadInto::Podman => ("containers-storage (podman, buildah)", format!("containers-storage:{tag}")),
        LoadInto::Docker => ("the Docker Engine", format!("docker-daemon:{tag}")),
    };
    let out = std::process::Command::new("skopeo")
        .args(["copy", "--quiet", &format!("oci:{}", dir.display()), &dest])
        .output()
        .context("running skopeo to load the image (install skopeo, e.g. apt-get install skopeo)")?;
    if !out.status.success() {
        bail!(
            "--load: skopeo copy into {store} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim().lines().last().unwrap_or("no message")
        );
    }
    let more = if load.of_many { " (this machine's platform; the others are not loaded)" } else { "" };
    eprintln!("loaded {} as {tag} into {store}{more}", load.platform);
    Ok(())
}

/// Agent name → (builder, version), for the metadata file.
async fn builders(client: &Client) -> std::collections::HashMap<String, (String, String)> {
    match client.request(&Request::ListAgents).await {
        Ok(Response::Agents(a)) => a.into_iter().map(|a| (a.name, (a.builder, a.builder_version))).collect(),
        _ => Default::default(),
    }
}

/// buildx's metadata keys, and farm's per platform.
fn metadata(
    build: &str,
    index: &Descriptor,
    tags: &[String],
    platforms: &[PlatformResult],
    builders: &std::collections::HashMap<String, (String, String)>,
) -> serde_json::Value {
    let per: serde_json::Map<String, serde_json::Value> = platforms
        .iter()
        .map(|r| {
            let mode = r.mode();
            let (builder, version) = builders.get(&r.agent).cloned().unwrap_or_default();
            let timings: serde_json::Map<String, serde_json::Value> =
                r.timings.iter().map(|p| (p.name.clone(), json!(p.ms))).collect();
            let v = json!({
                "digest": r.manifest.digest.to_string(),
                "mediaType": r.manifest.media_type,
                "size": r.manifest.size,
                "agent": r.agent,
                "mode": mode,
                "builder": builder,
                "builderVersion": version,
                "durationMs": r.duration_ms,
                "timingsMs": timings,
            });
            (r.platform.to_string(), v)
        })
        .collect();
    json!({
        "buildx.build.ref": build,
        "farm.build.ref": build,
        "containerimage.digest": index.digest.to_string(),
        "containerimage.descriptor": {
            "mediaType": index.media_type,
            "digest": index.digest.to_string(),
            "size": index.size,
        },
        "image.name": tags.join(","),
        "farm.platforms": per,
    })
}

/// `--wait=false`: the build id, and that it is not done.
pub fn pending_metadata(build: &str) -> Vec<u8> {
    let m = json!({ "buildx.build.ref": build, "farm.build.ref": build, "status": "pending" });
    serde_json::to_vec_pretty(&m).expect("plain JSON")
}
