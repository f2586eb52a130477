//! End to end: secrets reach the RUN that mounts them and nothing else; registry credentials are
//! never written anywhere.

mod common;

use std::process::Command;

use common::registry::{read_image, Registry};
use common::*;

/// Every file under `dir` (not following symlinks) that contains `needle`.
fn files_containing(dir: &std::path::Path, needle: &[u8]) -> Vec<String> {
    let out = Command::new("grep")
        .args(["-rlaF", "--no-messages"])
        .arg(std::str::from_utf8(needle).unwrap())
        .arg(dir)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).lines().map(String::from).collect()
}

#[test]
fn a_secret_reaches_its_run_and_no_layer_and_a_planted_password_is_written_nowhere() {
    let registry = Registry::start();
    let base = registry.seed_busybox();
    let mut farm = Farm::start(3);
    farm.agent("x86", &["--capacity", "2"]);
    let tmp = farm.tmp.path().to_path_buf();

    // A registry password the client holds in its Docker config.
    let password = format!("planted-{:016x}", rand_u64());
    let home = tmp.join("home");
    std::fs::create_dir_all(home.join(".docker")).unwrap();
    let auth = base64(&format!("farmuser:{password}"));
    std::fs::write(
        home.join(".docker/config.json"),
        format!(r#"{{"auths":{{"{}":{{"auth":"{auth}"}}}}}}"#, registry.addr),
    )
    .unwrap();

    // A secret the RUN reads; it records only the secret's hash.
    let secret_value = format!("s3cret-{:016x}", rand_u64());
    let secret_file = tmp.join("token.txt");
    std::fs::write(&secret_file, &secret_value).unwrap();
    let ctx = tmp.join("ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(
        ctx.join("Dockerfile"),
        "ARG BASE\nFROM ${BASE}\nRUN --mount=type=secret,id=api sha256sum /run/secrets/api | cut -d' ' -f1 > /secret-hash && echo used the secret\n",
    )
    .unwrap();
    let mut args = vec!["build".to_string(), "--progress".into(), "plain".into()];
    args.extend(farm.client_args());
    args.extend(
        [
            "--platform",
            "linux/amd64,linux/arm64",
            "--secret",
            &format!("id=api,src={}", secret_file.display()),
            "--insecure-registry",
            &registry.addr,
            "--build-arg",
            &format!("BASE={base}"),
            "-t",
            &format!("{}/secrets:1", registry.addr),
            ctx.to_str().unwrap(),
        ]
        .map(String::from),
    );
    let out = Command::new(farm_bin()).args(&args).env("HOME", &home).env("FARM_LOG", "warn").output().unwrap();
    let (so, se) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{so}\n{se}");

    // The RUN saw the secret: the hash it wrote is the secret's.
    let (_, _, images) = read_image(&registry, &format!("{}/secrets:1", registry.addr));
    let want = shared::digest::sha256_hex(secret_value.as_bytes());
    for image in &images {
        assert_eq!(image.text("secret-hash"), want, "{}", image.platform);
        for (path, bytes) in &image.files {
            assert!(
                !bytes.windows(secret_value.len()).any(|w| w == secret_value.as_bytes()),
                "secret in layer file {path}"
            );
        }
        assert!(!image.files.keys().any(|p| p.starts_with("run/secrets/api")), "secret file left in a layer");
    }
    // Neither the secret nor the password is in any state dir, log or registry blob.
    assert!(!so.contains(&password) && !se.contains(&password) && !se.contains(&secret_value));
    for p in farm.agents.values() {
        assert!(!p.log().contains(&password) && !p.log().contains(&secret_value));
    }
    assert!(!farm.coordinator.log().contains(&password) && !farm.coordinator.log().contains(&secret_value));
    for needle in [password.as_bytes(), secret_value.as_bytes()] {
        let found = files_containing(&tmp.join("coordinator"), needle);
        assert!(found.is_empty(), "found in the coordinator's state: {found:?}");
        let found = files_containing(&tmp.join("agent-x86"), needle);
        assert!(found.is_empty(), "found in the agent's work dir: {found:?}");
        let found = files_containing(&registry.data_dir(), needle);
        assert!(found.is_empty(), "found in the registry's blobs: {found:?}");
    }
    // The secret file itself was removed after the build.
    let left: Vec<_> = std::fs::read_dir("/dev/shm")
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("farm-secrets-"))
        .collect();
    assert!(left.is_empty(), "secret files left: {left:?}");
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(std::process::id() as u64);
    h.finish()
}

fn base64(s: &str) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let b = s.as_bytes();
    let mut out = String::new();
    for c in b.chunks(3) {
        let n = (c[0] as u32) << 16 | (*c.get(1).unwrap_or(&0) as u32) << 8 | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}
