//! Context sync: farm's upload (`shared::client::Client::upload_context`, in-process, against
//! the real coordinator process) against a plain quinn stream of the same bytes over loopback
//! with the same TLS setup and transport limits, received by a separate process (`farm-bench
//! quic-sink`) as the coordinator is.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use rand::{Rng, RngCore, SeedableRng};
use shared::context::Scanned;
use shared::quic::TransportLimits;
use shared::tls::Credentials;

use crate::env::Env;
use crate::procs;
use crate::report::{median, Goal, Row, Unit};

/// The plain-stream baseline's receiving end: accepts farm-CA mutual-TLS connections with the
/// coordinator's identity and, per bi-stream, writes every byte to a file (no hashing, no fsync),
/// then answers with the byte count (8 bytes, big-endian).
pub async fn quic_sink(listen: SocketAddr, ca_dir: &Path, dir: &Path) -> Result<()> {
    let creds = shared::tls::load_credentials(ca_dir, shared::tls::COORDINATOR_NAME)?;
    let endpoint = shared::quic::server_endpoint(listen, &creds, &TransportLimits::default())?;
    std::fs::create_dir_all(dir)?;
    println!("quic-sink listening {}", endpoint.local_addr()?);
    while let Some(incoming) = endpoint.accept().await {
        let dir = dir.to_path_buf();
        tokio::spawn(async move {
            let Ok(conn) = incoming.await else { return };
            while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                let file = dir.join(format!("stream-{:016x}", rand::random::<u64>()));
                tokio::spawn(async move {
                    let received = async {
                        let mut out = std::io::BufWriter::with_capacity(256 * 1024, std::fs::File::create(&file)?);
                        let mut buf = vec![0u8; 64 * 1024];
                        let mut n = 0u64;
                        while let Some(k) = recv.read(&mut buf).await? {
                            out.write_all(&buf[..k])?;
                            n += k as u64;
                        }
                        out.flush()?;
                        send.write_all(&n.to_be_bytes()).await?;
                        send.finish()?;
                        anyhow::Ok(n)
                    }
                    .await;
                    let _ = std::fs::remove_file(&file);
                    if let Err(e) = received {
                        eprintln!("quic-sink: stream failed: {e:#}");
                    }
                });
            }
        });
    }
    Ok(())
}

/// Sends `files` one after another on one bi-stream and waits for the sink's count. The time runs
/// from opening the stream to the count's arrival (the connection is already up, as it is for
/// farm's side).
async fn plain_stream(addr: &str, creds: &Credentials, files: &[PathBuf]) -> Result<(Duration, u64)> {
    let (endpoint, conn) = shared::quic::connect(addr, creds, &TransportLimits::default()).await?;
    let t0 = Instant::now();
    let (mut send, mut recv) = conn.open_bi().await?;
    let mut sent = 0u64;
    for f in files {
        let mut file = tokio::fs::File::open(f).await.with_context(|| format!("{}", f.display()))?;
        sent += tokio::io::copy(&mut file, &mut send).await?;
    }
    send.finish()?;
    let mut ack = [0u8; 8];
    recv.read_exact(&mut ack).await?;
    let took = t0.elapsed();
    ensure!(u64::from_be_bytes(ack) == sent, "the sink received {} of {sent} bytes", u64::from_be_bytes(ack));
    conn.close(0u32.into(), b"done");
    endpoint.wait_idle().await;
    Ok((took, sent))
}

/// Writes `files` (relative path, size) of pseudo-random (incompressible) bytes under `dir`, plus a
/// Dockerfile; `seed` makes them differ from run to run.
pub fn write_files(dir: &Path, files: &[(String, usize)], seed: u64) -> Result<()> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    std::fs::create_dir_all(dir)?;
    // The seed in the Dockerfile too, so that no file of a new context is already stored.
    std::fs::write(dir.join("Dockerfile"), format!("# {seed:016x}\nFROM scratch\nCOPY . /ctx/\n"))?;
    let mut buf = vec![];
    for (rel, size) in files {
        let p = dir.join(rel);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent)?;
        }
        buf.resize(*size, 0);
        rng.fill_bytes(&mut buf);
        std::fs::write(&p, &buf).with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

/// About `total` bytes in files from 4 KiB to 4 MiB (log-uniform: many small, some large).
pub fn big_layout(total: u64, seed: u64) -> Vec<(String, usize)> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let (mut out, mut sum) = (vec![], 0u64);
    while sum < total {
        let log: f64 = rng.random_range((4096f64).ln()..(4.0 * 1024.0 * 1024.0f64).ln());
        let size = (log.exp() as u64).min(total - sum).max(1) as usize;
        out.push((format!("d{:02}/blob-{:04}.bin", out.len() % 16, out.len()), size));
        sum += size as u64;
    }
    out
}

/// `n` small files (256 B to 4 KiB) in directories of 100.
pub fn many_layout(n: usize, seed: u64) -> Vec<(String, usize)> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n).map(|i| (format!("src/m{:03}/f{:05}.txt", i / 100, i), rng.random_range(256..4096))).collect()
}

async fn scan(dir: &Path) -> Result<Scanned> {
    let d = dir.to_path_buf();
    Ok(tokio::task::spawn_blocking(move || shared::context::scan(&d, "Dockerfile")).await??)
}

/// As `farm build` scans: with its scan cache (kept in `cache`), hashing only changed files.
async fn scan_as_farm_build(dir: &Path, cache: &Path) -> Result<Scanned> {
    let (d, c) = (dir.to_path_buf(), cache.to_path_buf());
    Ok(tokio::task::spawn_blocking(move || shared::context::scan_cached(&d, "Dockerfile", Some(&c))).await??)
}

/// Every distinct file of a scanned context, in manifest order (the order farm sends them).
fn files_of(s: &Scanned) -> Vec<PathBuf> {
    s.manifest.blobs().into_iter().filter_map(|(d, _)| s.sources.get(&d).cloned()).collect()
}

fn admin(env: &Env) -> Result<Credentials> {
    Ok(shared::tls::load_credentials(&env.ca_dir, "admin")?)
}

/// Row 6: a cold upload of a ~200 MB context, farm against the plain stream.
/// `pids`: the coordinator's and the sink's, whose CPU time per transfer goes into the notes.
pub async fn cold_upload(env: &Env, coordinator: &str, sink: &str, pids: (u32, u32), reps: usize, total: u64) -> Row {
    let mb = total as f64 / 1e6;
    let mut row = Row::new(
        "6",
        &format!("cold upload of a {mb:.0} MB context vs plain quinn stream"),
        Unit::MegabytesPerSec,
        Goal::RatioAtLeast(0.90),
    );
    row.farm_label = "Client::upload_context to the coordinator process (PutContext + PutBlobs; the coordinator \
                      hashes, writes and fsyncs each file into its store on threads of its own)"
        .into();
    row.baseline_label = "one plain quinn bi-stream of the same bytes, same TLS and transport limits, to a separate \
                          process that writes them to one file (no hash, no fsync)"
        .into();
    let mut scans = vec![];
    // CPU seconds per transfer: (receiver, sender) for farm and for the plain stream.
    let (mut farm_cpu, mut plain_cpu) = (vec![], vec![]);
    let cpu = |pid: u32| procs::cpu_time(pid).map(|d| d.as_secs_f64()).unwrap_or(0.0);
    let me = std::process::id();
    let result: Result<()> = async {
        let creds = admin(env)?;
        for rep in 0..reps {
            procs::check_interrupted()?;
            eprintln!("farm-bench: row 6, repetition {}/{}", rep + 1, reps);
            let dir = env.root.join(format!("sync-cold-{rep}"));
            let seed = rand::random::<u64>();
            let layout = big_layout(total, seed);
            write_files(&dir, &layout, seed)?;
            let t = Instant::now();
            let scanned = scan(&dir).await?;
            scans.push(t.elapsed().as_secs_f64());
            let bytes = scanned.manifest.total_size() as f64;
            let files = files_of(&scanned);
            for farm in if rep % 2 == 0 { [true, false] } else { [false, true] } {
                if farm {
                    let client = env.client(coordinator).await?;
                    procs::flush_dirty_pages();
                    let (r0, s0) = (cpu(pids.0), cpu(me));
                    let t = Instant::now();
                    let up = client.upload_context(&scanned).await?;
                    let took = t.elapsed().as_secs_f64();
                    farm_cpu.push((cpu(pids.0) - r0, cpu(me) - s0));
                    client.close();
                    ensure!(
                        up.bytes_sent == up.total_bytes,
                        "not cold: only {} of {} bytes sent",
                        up.bytes_sent,
                        up.total_bytes
                    );
                    row.farm.push(bytes / took / 1e6);
                } else {
                    procs::flush_dirty_pages();
                    let (r0, s0) = (cpu(pids.1), cpu(me));
                    let (took, sent) = plain_stream(sink, &creds, &files).await?;
                    plain_cpu.push((cpu(pids.1) - r0, cpu(me) - s0));
                    ensure!(sent as f64 == bytes, "plain stream sent {sent} of {bytes} bytes");
                    row.baseline.push(bytes / took.as_secs_f64() / 1e6);
                }
            }
            let _ = std::fs::remove_dir_all(&dir);
        }
        Ok(())
    }
    .await;
    if let Some(s) = median(&scans) {
        row.note(format!(
            "files of 4 KiB-4 MiB, new random content each repetition; scanning (hashing) before the upload took {} \
             (not included)",
            Unit::Seconds.show(s)
        ));
    }
    let show = |v: &[(f64, f64)]| {
        let r: Vec<f64> = v.iter().map(|c| c.0).collect();
        let s: Vec<f64> = v.iter().map(|c| c.1).collect();
        format!(
            "receiver {}, sender {}",
            Unit::Seconds.show(median(&r).unwrap_or(0.0)),
            Unit::Seconds.show(median(&s).unwrap_or(0.0))
        )
    };
    if !farm_cpu.is_empty() && !plain_cpu.is_empty() {
        row.note(format!("CPU per transfer: farm {}; plain stream {}", show(&farm_cpu), show(&plain_cpu)));
    }
    match result {
        Ok(()) => row,
        Err(e) => row.failed(e),
    }
}

/// Row 7: one changed file in a context of `n` files: scan + upload, as `farm build` does it.
pub async fn small_change(env: &Env, coordinator: &str, sink: &str, reps: usize, n: usize) -> Row {
    let mut row =
        Row::new("7", &format!("context sync: one changed file in {n} files"), Unit::Seconds, Goal::AtMost(0.2));
    row.farm_label = "scan as farm build does (stat every file, hash those whose stat changed since the last scan) \
                      + Client::upload_context, which sends only the changed file"
        .into();
    row.baseline_label = format!("plain quinn stream of all {n} files (what a sync without a manifest sends)");
    let (mut scans, mut uploads, mut connects, mut hashed) = (vec![], vec![], vec![], vec![]);
    let result: Result<()> = async {
        let creds = admin(env)?;
        let dir = env.root.join("sync-many");
        let layout = many_layout(n, 7);
        write_files(&dir, &layout, rand::random())?;
        let client = env.client(coordinator).await?;
        procs::flush_dirty_pages();
        let t = Instant::now();
        let scan_cache = env.root.join("sync-many-scan-cache");
        let first = client.upload_context(&scan_as_farm_build(&dir, &scan_cache).await?).await?;
        row.note(format!(
            "first (cold) sync of the {} files ({:.1} MB): {}",
            first.files,
            first.total_bytes as f64 / 1e6,
            Unit::Seconds.show(t.elapsed().as_secs_f64())
        ));
        client.close();
        let (changed, size) = layout[n / 2].clone();
        for rep in 0..reps {
            procs::check_interrupted()?;
            eprintln!("farm-bench: row 7, repetition {}/{}", rep + 1, reps);
            let mut bytes = vec![0u8; size];
            rand::rng().fill_bytes(&mut bytes);
            std::fs::write(dir.join(&changed), &bytes)?;
            procs::flush_dirty_pages();
            for farm in if rep % 2 == 0 { [true, false] } else { [false, true] } {
                if farm {
                    let t = Instant::now();
                    let client = env.client(coordinator).await?;
                    connects.push(t.elapsed().as_secs_f64());
                    let t = Instant::now();
                    let scanned = scan_as_farm_build(&dir, &scan_cache).await?;
                    let scanned_at = t.elapsed().as_secs_f64();
                    hashed.push(scanned.hashed);
                    let up = client.upload_context(&scanned).await?;
                    let took = t.elapsed().as_secs_f64();
                    client.close();
                    ensure!(up.blobs_sent == 1, "expected 1 file sent, {} were", up.blobs_sent);
                    scans.push(scanned_at);
                    uploads.push(took - scanned_at);
                    row.farm.push(took);
                } else {
                    let files = files_of(&scan(&dir).await?);
                    let (took, _) = plain_stream(sink, &creds, &files).await?;
                    row.baseline.push(took.as_secs_f64());
                }
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }
    .await;
    if let (Some(s), Some(u)) = (median(&scans), median(&uploads)) {
        row.breakdown.insert("1 scan".into(), s);
        row.breakdown.insert("2 upload".into(), u);
    }
    if let Some(c) = median(&connects) {
        row.note(format!("connecting to the coordinator (not included) took {}", Unit::Seconds.show(c)));
    }
    if !hashed.is_empty() {
        row.note(format!("files hashed by each repetition's scan (the rest came from the scan cache): {hashed:?}"));
    }
    match result {
        Ok(()) => row,
        Err(e) => row.failed(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_have_the_asked_size() {
        let big = big_layout(50_000_000, 1);
        assert_eq!(big.iter().map(|f| f.1 as u64).sum::<u64>(), 50_000_000);
        assert!(big.iter().all(|f| f.1 <= 4 * 1024 * 1024));
        let many = many_layout(10_000, 1);
        assert_eq!(many.len(), 10_000);
        assert!(many.iter().all(|f| (256..4096).contains(&f.1)));
        let mut names: Vec<&String> = many.iter().map(|f| &f.0).collect();
        names.dedup();
        assert_eq!(names.len(), 10_000);
    }

    #[test]
    fn files_are_written_and_scannable() {
        let dir = tempfile::tempdir().unwrap();
        write_files(dir.path(), &many_layout(50, 2), 3).unwrap();
        let s = shared::context::scan(dir.path(), "Dockerfile").unwrap();
        assert_eq!(s.manifest.file_count(), 51);
        assert_eq!(files_of(&s).len(), 51);
    }
}
