//! Big images at wire speed (rows 15-16): a 1 GiB OCI layout of four incompressible layers, made
//! once per run, pushed by farm's registry client (`Registry::push_layout_from`, the agent's push
//! phase) and by `skopeo copy oci:DIR docker://…` to fresh repositories of one docker-registry,
//! sides alternating; each repetition gets a registry of its own, so that neither side can mount
//! or skip what an earlier repetition pushed. Then an image sharing three of the four layers is
//! pushed by the same client to another repository through a counting proxy in front of the
//! registry: the bytes that reach the registry should be the new layer's and no more.

use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use serde_json::json;
use shared::oci::{read_layout, ImageRef, Layout, OCI_MANIFEST};
use shared::registry::Registry;
use shared::Digest;

use crate::env::{path, Env};
use crate::procs;
use crate::report::{median, Goal, Row, Unit};

const MIB: f64 = 1048576.0;

/// A writer that hashes what goes through it.
struct Hashing<W> {
    inner: W,
    hasher: shared::digest::Hasher,
    written: u64,
}

impl<W: std::io::Write> std::io::Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Writes a gzip stream of `len` pseudo-random (incompressible) bytes from `seed`, in stored
/// blocks as real layers of incompressible files are, to `dir/blobs/sha256/<digest>`; its digest
/// and size. gzip, so that skopeo copies it as it is (it compresses layers it finds uncompressed).
fn random_blob(dir: &Path, len: u64, seed: u64) -> Result<(Digest, u64)> {
    let blobs = dir.join("blobs").join("sha256");
    std::fs::create_dir_all(&blobs)?;
    let tmp = blobs.join(format!("tmp-{seed}"));
    let file = std::io::BufWriter::with_capacity(4 << 20, std::fs::File::create(&tmp)?);
    let hashing = Hashing { inner: file, hasher: shared::digest::Hasher::default(), written: 0 };
    let mut out = flate2::write::GzEncoder::new(hashing, flate2::Compression::none());
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut block = vec![0u8; 4 << 20];
    let mut left = len;
    while left > 0 {
        for word in block.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            word.copy_from_slice(&x.to_le_bytes());
        }
        let n = left.min(block.len() as u64) as usize;
        out.write_all(&block[..n])?;
        left -= n as u64;
    }
    let mut hashing = out.finish()?;
    hashing.flush()?;
    let (digest, size) = (hashing.hasher.finish(), hashing.written);
    std::fs::rename(&tmp, blobs.join(digest.hex()))?;
    Ok((digest, size))
}

/// An OCI layout at `dir` of a linux/amd64 image with these layers (already under `dir/blobs`).
fn write_layout(dir: &Path, layers: &[(Digest, u64)]) -> Result<Layout> {
    let blobs = dir.join("blobs").join("sha256");
    let put = |bytes: &[u8]| -> Result<serde_json::Value> {
        let d = Digest::of(bytes);
        std::fs::write(blobs.join(d.hex()), bytes)?;
        Ok(json!({"digest": d.as_str(), "size": bytes.len()}))
    };
    let descs: Vec<_> = layers
        .iter()
        .map(|(d, size)| json!({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d.as_str(), "size": size}))
        .collect();
    let diff_ids: Vec<_> = layers.iter().map(|(d, _)| d.as_str()).collect();
    let config = json!({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": diff_ids}});
    let mut config = put(config.to_string().as_bytes())?;
    config["mediaType"] = "application/vnd.oci.image.config.v1+json".into();
    let manifest = json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config, "layers": descs});
    let mut manifest = put(manifest.to_string().as_bytes())?;
    manifest["mediaType"] = OCI_MANIFEST.into();
    std::fs::write(dir.join("index.json"), json!({"schemaVersion": 2, "manifests": [manifest]}).to_string())?;
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#)?;
    Ok(read_layout(dir)?)
}

/// What a counting proxy in front of the registry saw: bytes sent to the registry, and upload
/// requests (PATCH; POST with `mount=`).
#[derive(Default)]
struct Counts {
    bytes_in: AtomicU64,
    patches: AtomicU64,
    mounts: AtomicU64,
}

/// A TCP proxy to `upstream` on 127.0.0.1:random that counts what goes to the registry.
fn counting_proxy(upstream: String) -> Result<(String, Arc<Counts>)> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?.to_string();
    let counts = Arc::new(Counts::default());
    let c = counts.clone();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(mut client) = client else { return };
            let Ok(mut server) = TcpStream::connect(&upstream) else { return };
            let (Ok(mut client_r), Ok(mut server_w)) = (client.try_clone(), server.try_clone()) else { return };
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut server, &mut client);
                let _ = client.shutdown(std::net::Shutdown::Both);
            });
            let c = c.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 256 << 10];
                while let Ok(n) = client_r.read(&mut buf) {
                    if n == 0 || server_w.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    let data = &buf[..n];
                    c.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
                    // Request lines: hyper writes a request's head in one piece.
                    if data.starts_with(b"PATCH /v2/") {
                        c.patches.fetch_add(1, Ordering::Relaxed);
                    }
                    if data.starts_with(b"POST /v2/") && data.windows(7).any(|w| w == b"?mount=") {
                        c.mounts.fetch_add(1, Ordering::Relaxed);
                    }
                }
                let _ = server_w.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    Ok((addr, counts))
}

fn sync_disks() {
    let _ = Command::new("sync").status();
}

/// Rows 15 and 16.
pub async fn big_images(env: &Env, reps: usize, layer_bytes: u64) -> Vec<Row> {
    let mut wire = Row::new(
        "15",
        &format!("push a {:.0} MiB four-layer image (one registry per repetition)", 4.0 * layer_bytes as f64 / MIB),
        Unit::Seconds,
        Goal::RatioAtMost(1.1),
    );
    wire.farm_label = "farm's registry client (agent push phase)".into();
    wire.baseline_label = "skopeo copy oci:DIR docker://…".into();
    let new_layer_mib = layer_bytes as f64 / MIB;
    let mut shared_row = Row::new(
        "16",
        "second push sharing 3 of 4 layers with another repository: MiB sent to the registry",
        Unit::Mebibytes,
        // The new layer (a gzip stream a little bigger than its content), the config and the
        // manifest, the requests' heads: within a MiB.
        Goal::AtMost(new_layer_mib + 1.1),
    );
    shared_row.farm_label = "bytes into the registry (counting proxy)".into();
    shared_row.baseline_label = "the new layer alone".into();
    match measure(env, reps, layer_bytes, &mut wire, &mut shared_row).await {
        Ok(()) => vec![wire, shared_row],
        Err(e) => {
            let msg = format!("{e:#}");
            vec![wire.failed(&msg), shared_row.failed(&msg)]
        }
    }
}

async fn measure(env: &Env, reps: usize, layer_bytes: u64, wire: &mut Row, second: &mut Row) -> Result<()> {
    ensure!(procs::have_tool("skopeo"), "skopeo is not installed: apt-get install skopeo");
    let root = env.root.join("push");
    let first_dir = root.join("image");
    let second_dir = root.join("second");
    eprintln!("farm-bench: writing a four-layer image of {} MiB", (4 * layer_bytes) >> 20);
    let t0 = Instant::now();
    let layers: Vec<(Digest, u64)> =
        (0..4).map(|i| random_blob(&first_dir, layer_bytes, 1000 + i)).collect::<Result<_>>()?;
    let first = write_layout(&first_dir, &layers)?;
    // The second image: the first three layers hard-linked, a new fourth one.
    let mut second_layers = layers[..3].to_vec();
    std::fs::create_dir_all(second_dir.join("blobs").join("sha256"))?;
    for (d, _) in &second_layers {
        std::fs::hard_link(
            first_dir.join("blobs/sha256").join(d.hex()),
            second_dir.join("blobs/sha256").join(d.hex()),
        )?;
    }
    second_layers.push(random_blob(&second_dir, layer_bytes, 2000)?);
    let second_layout = write_layout(&second_dir, &second_layers)?;
    eprintln!("farm-bench: images written in {:.1} s", t0.elapsed().as_secs_f64());
    let new_layer_mib = second_layers[3].1 as f64 / MIB;

    let (mut patches, mut mounts, mut reports) = (vec![], vec![], vec![]);
    for rep in 0..reps {
        procs::check_interrupted()?;
        let reg_dir = root.join(format!("registry-{rep}"));
        let (mut svc, addr) = env.spawn_registry(&reg_dir, "push registry")?;
        let client = Registry::new(std::slice::from_ref(&addr), None);
        let farm_repo: ImageRef = format!("{addr}/farm-{rep}").parse()?;
        for side in if rep % 2 == 0 { ["farm", "skopeo"] } else { ["skopeo", "farm"] } {
            sync_disks();
            let t = Instant::now();
            if side == "farm" {
                let report = client.push_layout(&first, &farm_repo).await?;
                ensure!(report.blobs_uploaded == 5, "farm uploaded {} of 5 blobs: {report:?}", report.blobs_uploaded);
                wire.farm.push(t.elapsed().as_secs_f64());
            } else {
                let dest = format!("docker://{addr}/skopeo-{rep}:1");
                let src = format!("oci:{}", path(&first_dir));
                let mut cmd = Command::new("skopeo");
                // --preserve-digests: the same bytes as farm pushes, or a loud failure.
                cmd.args(["copy", "--quiet", "--preserve-digests", "--dest-tls-verify=false", &src, &dest]);
                env.isolate(&mut cmd);
                procs::run_ok(&mut cmd, "skopeo copy")?;
                wire.baseline.push(t.elapsed().as_secs_f64());
            }
        }
        // The second image, through a proxy that counts what reaches the registry; the client
        // knows where the shared layers are from its first push.
        let (proxy, counts) = counting_proxy(addr.clone())?;
        // The client learns where the first image's blobs are as an agent does, pushing it (to
        // the same repository: all present); then only what the second push sends is counted.
        let via_proxy = Registry::new(std::slice::from_ref(&proxy), None);
        let again = via_proxy.push_layout(&first, &format!("{proxy}/farm-{rep}").parse()?).await?;
        ensure!(again.blobs_skipped == 5, "the first image is not all in farm-{rep}: {again:?}");
        counts.bytes_in.store(0, Ordering::Relaxed);
        counts.patches.store(0, Ordering::Relaxed);
        let target: ImageRef = format!("{proxy}/second-{rep}").parse()?;
        let report = via_proxy.push_layout(&second_layout, &target).await?;
        let sent = counts.bytes_in.load(Ordering::Relaxed) as f64 / MIB;
        second.farm.push(sent);
        second.baseline.push(new_layer_mib);
        patches.push(counts.patches.load(Ordering::Relaxed) as f64);
        mounts.push(counts.mounts.load(Ordering::Relaxed) as f64);
        reports.push(format!(
            "{} uploaded, {} mounted, {} present",
            report.blobs_uploaded, report.blobs_mounted, report.blobs_skipped
        ));
        svc.stop(Duration::from_secs(5));
        let _ = std::fs::remove_dir_all(&reg_dir);
    }
    let rate = |xs: &[f64]| median(xs).map(|s| 4.0 * layer_bytes as f64 / 1e6 / s).unwrap_or(0.0);
    wire.note(format!(
        "throughput: farm {:.0} MB/s, skopeo {:.0} MB/s (medians); farm pushes 4 blobs at once in 32 MiB PATCHes",
        rate(&wire.farm),
        rate(&wire.baseline)
    ));
    second.note(format!(
        "at the registry (counting proxy), medians: {:.0} PATCH requests, {:.0} mount requests; farm's report: {}",
        median(&patches).unwrap_or(0.0),
        median(&mounts).unwrap_or(0.0),
        reports.first().cloned().unwrap_or_default()
    ));
    let _ = std::fs::remove_dir_all(&root);
    Ok(())
}
