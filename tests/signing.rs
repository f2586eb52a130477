//! End to end: `farm build --sign` signs the pushed index in cosign's format and `cosign verify
//! --key` (cosign 2.x, `deploy/install.sh --test-deps`) accepts it with the key `farm signing
//! public-key` prints, and no other; an in-toto statement attached with
//! `shared::signing::attest` passes `cosign verify-attestation --type slsaprovenance1`; the
//! private key's bytes are in no log, no file outside the CA directory and no registry blob.
//! A three-platform build on two agents (arm64 native by config on one, arm/v7 emulated on the
//! x86_64 one) carries provenance that names each platform's agent and mode, found by `oras
//! discover` through the referrers fallback tags; `buildah pull --platform` still gets each image.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use base64::Engine as _;
use common::registry::{read_image, Registry};
use common::*;
use shared::oci::ImageRef;

const SLSA_V1: &str = "https://slsa.dev/provenance/v1";

fn cosign(args: &[&str]) -> Output {
    // No sigstore setup at all: a home of its own, so nothing cached from elsewhere helps.
    let home = tempfile::tempdir().unwrap();
    let out = Command::new("cosign").args(args).env("HOME", home.path()).output().unwrap();
    out
}

fn text(out: &Output) -> String {
    format!("{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// Every file under `dir` (not following symlinks) that contains the bytes `needle`.
fn files_containing(dir: &Path, needle: &[u8]) -> Vec<String> {
    let pattern: String = needle.iter().map(|b| format!("\\x{b:02x}")).collect();
    let out =
        Command::new("grep").env("LC_ALL", "C").args(["-rlaP", "--no-messages", &pattern]).arg(dir).output().unwrap();
    String::from_utf8_lossy(&out.stdout).lines().map(String::from).collect()
}

/// A minimal SLSA v1 provenance statement about `digest` (the lead's real provenance replaces it).
fn statement(name: &str, digest: &shared::Digest, builder: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "_type": "https://in-toto.io/Statement/v1",
        "subject": [{"name": name, "digest": {"sha256": digest.hex()}}],
        "predicateType": SLSA_V1,
        "predicate": {
            "buildDefinition": {"buildType": "https://farm.invalid/build/v1", "externalParameters": {}},
            "runDetails": {"builder": {"id": builder}},
        },
    }))
    .unwrap()
}

#[test]
fn a_signed_build_verifies_with_cosign_and_its_key_is_written_nowhere_else() {
    require_tool("cosign");
    require_tool("oras");
    require_tool("buildah");
    let registry = Registry::start();
    let base = registry.seed_busybox();
    let mut farm = Farm::start(3);
    farm.agent("x86", &["--capacity", "2"]);
    farm.agent("pi64", &["--native", "linux/arm64", "--emulated", "none"]);
    let ctx = example("hello", farm.tmp.path());
    let ca = farm.ca.path().to_string();

    // `farm ca init` made the key (0600, beside the CA key); `farm signing init` keeps it.
    let key_file = farm.ca.dir.join("signing.key");
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777, 0o600);
    let pem = std::fs::read_to_string(&key_file).unwrap();
    let again = common::farm(&["signing", "init", "--dir", &ca]);
    assert!(!again.status.success());
    assert!(
        text(&again)
            .contains(&format!("{} already exists: refusing to replace the farm's signing key", key_file.display())),
        "{}",
        text(&again)
    );
    assert_eq!(std::fs::read_to_string(&key_file).unwrap(), pem, "signing init changed the key");
    let public = farm_ok(&["signing", "public-key", "--dir", &ca]);
    assert!(public.starts_with("-----BEGIN PUBLIC KEY-----\n") && public.ends_with("-----END PUBLIC KEY-----\n"));
    let pub_file = farm.tmp.path().join("farm.pub");
    std::fs::write(&pub_file, &public).unwrap();

    // A build that pushes nowhere cannot be signed: refused before anything is sent.
    let mut args = farm.client_args();
    let oci = format!("type=oci,dest={}", farm.tmp.path().join("x.tar").display());
    args.extend(["--sign", "-o", &oci, "-t", "hello:1", ctx.to_str().unwrap()].map(String::from));
    let (ok, _, err) = build(&args);
    assert!(!ok);
    assert!(
        err.contains("--sign signs the image in the registry it is pushed to, and this build pushes to none"),
        "{err}"
    );

    // The signed build: three platforms, two agents (arm64 native on pi64, arm/v7 emulated on x86).
    let mut args = farm.client_args();
    args.push("--sign".into());
    args.extend(registry.build_flags(&base, "linux/amd64,linux/arm64,linux/arm/v7", "signed:1", &ctx));
    let (ok, out, err) = build(&args);
    assert!(ok, "{out}\n{err}");
    let reference = format!("{}/signed:1", registry.addr);
    let (index, _, images) = read_image(&registry, &reference);
    let sig_tag = format!("sha256-{}.sig", index.hex());
    assert!(registry.all_tags("signed").contains(&sig_tag), "{:?}", registry.all_tags("signed"));
    assert!(farm.coordinator.log().contains(&format!("signed {}/signed@{index}", registry.addr)));

    // cosign verify, with nothing but the public key.
    let http = ["--insecure-ignore-tlog", "--allow-http-registry", "--allow-insecure-registry"];
    let pub_path = pub_file.to_str().unwrap();
    let mut verify: Vec<&str> = vec!["verify", "--key", pub_path];
    verify.extend(http);
    verify.push(&reference);
    let out = cosign(&verify);
    assert!(out.status.success(), "cosign verify failed: {}", text(&out));
    eprintln!("cosign verify: {}", text(&out));
    let verified: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(verified[0]["critical"]["image"]["docker-manifest-digest"], index.as_str());
    assert_eq!(verified[0]["critical"]["identity"]["docker-reference"], format!("{}/signed", registry.addr));
    assert_eq!(verified[0]["critical"]["type"], "cosign container image signature");

    // farm imagetools inspect says, per platform, which agent built it and how, and that the
    // signature verifies with the key (and not with another farm's, below).
    let inspect = |key: &Path| {
        let mut a = vec!["imagetools".to_string(), "inspect".into(), reference.clone()];
        a.extend(["--insecure-registry".into(), registry.addr.clone(), "--key".into(), key.display().to_string()]);
        a.extend(farm.client_args());
        farm_ok(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let shown = inspect(&pub_file);
    assert!(shown.lines().any(|l| l == "Signature: verified"), "{shown}");
    for needle in ["native on x86", "native on pi64", "emulated on x86"] {
        assert!(shown.contains(needle), "{needle} not in:\n{shown}");
    }

    // Another farm's key does not verify it.
    let other = farm.tmp.path().join("other-ca");
    farm_ok(&["ca", "init", "--dir", other.to_str().unwrap()]);
    let other_pub = farm.tmp.path().join("other.pub");
    std::fs::write(&other_pub, farm_ok(&["signing", "public-key", "--dir", other.to_str().unwrap()])).unwrap();
    let mut wrong: Vec<&str> = vec!["verify", "--key", other_pub.to_str().unwrap()];
    wrong.extend(http);
    wrong.push(&reference);
    let out = cosign(&wrong);
    assert!(!out.status.success(), "another key verified the signature: {}", text(&out));
    assert!(text(&out).contains("no matching signatures"), "{}", text(&out));
    let shown = inspect(&other_pub);
    assert!(
        shown.lines().any(|l| l == "Signature: NOT verified: no signature of this digest verifies with the key"),
        "{shown}"
    );

    // Each platform's SLSA provenance was signed as a cosign attestation by the coordinator:
    // cosign verify-attestation finds exactly that statement, for that platform only.
    let repo: ImageRef = reference.parse().unwrap();
    let verify_attestation = |image: &shared::Digest| -> Vec<serde_json::Value> {
        let by_digest = format!("{}@{}", repo.name(), image);
        let mut args: Vec<&str> = vec!["verify-attestation", "--key", pub_path, "--type", "slsaprovenance1"];
        args.extend(http);
        args.push(&by_digest);
        let out = cosign(&args);
        assert!(out.status.success(), "cosign verify-attestation {by_digest} failed: {}", text(&out));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| {
                let e: serde_json::Value = serde_json::from_str(l).unwrap();
                assert_eq!(e["payloadType"], "application/vnd.in-toto+json");
                let payload = base64::engine::general_purpose::STANDARD.decode(e["payload"].as_str().unwrap()).unwrap();
                serde_json::from_slice(&payload).unwrap()
            })
            .collect()
    };
    let (base_digest, _, _) = read_image(&registry, &base);
    let expected = [("linux/amd64", "x86", false), ("linux/arm64", "pi64", false), ("linux/arm/v7", "x86", true)];
    assert_eq!(images.len(), 3);
    for (image, (platform, agent, emulated)) in images.iter().zip(expected) {
        assert_eq!(image.platform, platform);
        let statements = verify_attestation(&image.digest);
        assert_eq!(statements.len(), 1, "{statements:?}");
        let s = &statements[0];
        assert_eq!(s["predicateType"], SLSA_V1);
        assert_eq!(s["subject"][0]["digest"]["sha256"], image.digest.hex());
        assert_eq!(s["predicate"]["runDetails"]["builder"]["id"], format!("farm://coordinator/agents/{agent}"));
        let internal = &s["predicate"]["buildDefinition"]["internalParameters"];
        assert_eq!(internal["emulated"], emulated, "{platform}: {s}");
        let deps = s["predicate"]["buildDefinition"]["resolvedDependencies"].as_array().unwrap();
        assert!(
            deps.iter().any(|d| d["digest"]["sha256"] == base_digest.hex()),
            "{platform}: the base image {base_digest} is not among {deps:?}"
        );
        println!(
            "{platform}: {} ({})",
            s["predicate"]["runDetails"]["builder"]["id"],
            if emulated { "emulated" } else { "native" }
        );

        // oras finds the provenance artifact through the referrers fallback tag.
        let subject = format!("{}@{}", repo.name(), image.digest);
        let out = Command::new("oras")
            .args([
                "discover",
                "--plain-http",
                "--distribution-spec",
                "v1.1-referrers-tag",
                "--format",
                "json",
                &subject,
            ])
            .output()
            .unwrap();
        assert!(out.status.success(), "oras discover {subject}: {}", text(&out));
        let found: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let kinds: Vec<&str> =
            found["manifests"].as_array().unwrap().iter().filter_map(|m| m["artifactType"].as_str()).collect();
        assert_eq!(kinds, ["application/vnd.in-toto+json"], "{found}");
    }

    // A client pulling one platform still gets that platform's image, and it runs.
    let (_store, conf) = private_storage();
    let buildah = |args: &[&str]| {
        let out = Command::new("buildah").args(args).env("CONTAINERS_STORAGE_CONF", &conf).output().unwrap();
        assert!(out.status.success(), "buildah {args:?}: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    buildah(&["pull", "--quiet", "--tls-verify=false", "--platform", "linux/arm/v7", &reference]);
    let ctr = buildah(&["from", "--pull-never", "--platform", "linux/arm/v7", &reference]);
    assert_eq!(buildah(&["run", "--isolation", "chroot", &ctr, "uname", "-m"]), "armv7l");
    buildah(&["rm", &ctr]);
    buildah(&["rmi", "--all", "--force"]);

    // attest() appends another statement to the same attestation image; the same one again is not.
    let arm64 = images.iter().find(|i| i.platform == "linux/arm64").unwrap();
    let key = shared::signing::require_signing_key(&farm.ca.dir).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let client = registry.client();
    let extra = statement(&repo.name(), &arm64.digest, "https://farm.invalid/agent/second");
    let att = rt.block_on(shared::signing::attest(&client, &key, &repo, &arm64.digest, &extra)).unwrap();
    let again = rt.block_on(shared::signing::attest(&client, &key, &repo, &arm64.digest, &extra)).unwrap();
    assert_eq!(att, again);
    let att_tag = repo.with_tag(&format!("sha256-{}.att", arm64.digest.hex()));
    let (manifest, _, digest) = rt.block_on(client.fetch_manifest(&att_tag)).unwrap();
    assert_eq!(digest, att);
    let manifest: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 2, "{manifest}");
    for l in layers {
        assert_eq!(l["mediaType"], "application/vnd.dsse.envelope.v1+json");
        assert_eq!(l["annotations"]["predicateType"], SLSA_V1);
    }
    let statements = verify_attestation(&arm64.digest);
    assert_eq!(statements.len(), 2);
    assert_eq!(
        serde_json::to_vec(&statements[1]).unwrap(),
        serde_json::to_vec(&serde_json::from_slice::<serde_json::Value>(&extra).unwrap()).unwrap()
    );

    // The private key's bytes: the PEM, the raw scalar and its hex, nowhere but the CA directory.
    let der = base64::engine::general_purpose::STANDARD
        .decode(pem.lines().filter(|l| !l.starts_with("-----")).collect::<String>())
        .unwrap();
    let at = der.windows(5).position(|w| w == [2, 1, 1, 4, 32]).expect("an ECPrivateKey in the PKCS#8") + 5;
    let scalar = der[at..at + 32].to_vec();
    let hex: String = scalar.iter().map(|b| format!("{b:02x}")).collect();
    let pem_line = pem.lines().nth(1).unwrap().as_bytes().to_vec();
    let needles = [scalar.clone(), hex.clone().into_bytes(), pem_line.clone()];
    for needle in &needles {
        let found: Vec<String> = files_containing(farm.tmp.path(), needle)
            .into_iter()
            .chain(files_containing(&registry.data_dir(), needle))
            .filter(|f| !Path::new(f).starts_with(&farm.ca.dir))
            .collect();
        assert!(found.is_empty(), "the signing key's bytes are in {found:?}");
    }
    let pem_text = std::str::from_utf8(&pem_line).unwrap();
    for (name, log) in std::iter::once(("coordinator", farm.coordinator.log()))
        .chain(farm.agents.iter().map(|(n, p)| (n.as_str(), p.log())))
    {
        assert!(!log.contains(&hex) && !log.contains(pem_text), "the signing key is in {name}'s log");
    }
    assert!(!out_contains(&out, &hex));

    // A tag moved to another image no longer verifies.
    let moved = Command::new("skopeo")
        .args(["copy", "--all", "--quiet", "--src-tls-verify=false", "--dest-tls-verify=false"])
        .arg(format!("docker://{base}"))
        .arg(format!("docker://{reference}"))
        .output()
        .unwrap();
    assert!(moved.status.success(), "{}", text(&moved));
    let out = cosign(&verify);
    assert!(!out.status.success(), "a moved tag verified: {}", text(&out));
    assert!(text(&out).contains("no signatures found"), "{}", text(&out));
}

/// A farm whose CA directory lost its key: `sign = true` refuses to start, `--sign` is refused
/// naming the fix; after `farm signing init`, `sign = true` signs a build that did not ask.
#[test]
fn sign_true_signs_every_pushed_index_and_a_missing_key_says_how_to_make_one() {
    require_tool("cosign");
    require_tool("buildah");
    let registry = Registry::start();
    let base = registry.seed_busybox();
    let mut farm = Farm::start(3);
    farm.agent("x86", &[]);
    let ctx = example("hello", farm.tmp.path());
    let ca = farm.ca.path().to_string();
    // The coordinator reads its key once, at start.
    std::fs::remove_file(farm.ca.dir.join("signing.key")).unwrap();
    farm.restart_coordinator();
    farm.wait_agent("x86", "online");
    let missing = format!("no signing key in {ca}: run `farm signing init --dir {ca}` on the coordinator's machine");

    let out = common::farm(&["signing", "public-key", "--dir", &ca]);
    assert!(!out.status.success() && text(&out).contains(&missing), "{}", text(&out));
    let mut args = farm.client_args();
    args.push("--sign".into());
    args.extend(registry.build_flags(&base, "linux/amd64", "auto:1", &ctx));
    let (ok, out, err) = build(&args);
    assert!(!ok, "{out}");
    assert!(err.contains(&missing), "{err}");
    assert!(registry.tags("auto").is_empty());

    let config = farm.tmp.path().join("coordinator.toml");
    std::fs::write(&config, "sign = true\n").unwrap();
    let state = farm.tmp.path().join("state2");
    let coordinator_args = |port: &str| {
        [
            "coordinator",
            "--config",
            config.to_str().unwrap(),
            "--listen",
            port,
            "--ca-dir",
            &ca,
            "--state-dir",
            state.to_str().unwrap(),
        ]
        .map(String::from)
    };
    let refused = Command::new(farm_bin()).args(coordinator_args("127.0.0.1:0")).output().unwrap();
    assert!(!refused.status.success());
    assert!(text(&refused).contains(&missing), "{}", text(&refused));

    let made = farm_ok(&["signing", "init", "--dir", &ca]);
    let public = farm_ok(&["signing", "public-key", "--dir", &ca]);
    assert!(made.contains(&public), "{made}");
    let pub_file = farm.tmp.path().join("farm.pub");
    std::fs::write(&pub_file, &public).unwrap();
    farm.coordinator.kill();
    let listen = farm.addr.clone();
    farm.coordinator =
        Proc::spawn("coordinator", Command::new(farm_bin()).env("FARM_LOG", "info").args(coordinator_args(&listen)));
    farm.coordinator.wait_for_line(&["coordinator listening"], std::time::Duration::from_secs(20));
    farm.wait_agent("x86", "online");

    // No --sign: the coordinator's `sign = true` signs it.
    let mut args = farm.client_args();
    args.extend(registry.build_flags(&base, "linux/amd64", "auto:1", &ctx));
    let (ok, out, err) = build(&args);
    assert!(ok, "{out}\n{err}");
    let reference = format!("{}/auto:1", registry.addr);
    let out = cosign(&[
        "verify",
        "--key",
        pub_file.to_str().unwrap(),
        "--insecure-ignore-tlog",
        "--allow-http-registry",
        &reference,
    ]);
    assert!(out.status.success(), "cosign verify failed: {}", text(&out));
}

fn out_contains(out: &Output, needle: &str) -> bool {
    text(out).contains(needle)
}
