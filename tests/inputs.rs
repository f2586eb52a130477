//! End to end, the inputs of a build besides its context: a named context (`--build-context`)
//! used by `COPY --from` and `RUN --mount=...,from=`, a secret from an environment variable that
//! reaches its RUN and nothing else, `--add-host`, `--pull`, `--network none`, a context sent
//! as a tar on stdin (`farm build ... -`) and a Dockerfile on stdin (`-f -`). One farm (a coordinator and an agent as processes).

mod common;

use std::io::Write as _;
use std::process::{Command, Stdio};

use common::registry::{read_image, Registry};
use common::*;

/// Every file under `dir` (not following symlinks) that contains `needle`.
fn files_containing(dir: &std::path::Path, needle: &str) -> Vec<String> {
    let out = Command::new("grep").args(["-rlaF", "--no-messages", needle]).arg(dir).output().unwrap();
    String::from_utf8_lossy(&out.stdout).lines().map(String::from).collect()
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(std::process::id() as u64);
    h.finish()
}

#[test]
fn named_contexts_env_secrets_hosts_no_network_and_a_context_on_stdin() {
    require_tool("buildah");
    require_tool("tar");
    let registry = Registry::start();
    let base = registry.seed_busybox();
    let mut farm = Farm::start(3);
    farm.agent("x86", &["--capacity", "2"]);
    let tmp = farm.tmp.path().to_path_buf();
    let common_flags = |tag: &str| -> Vec<String> {
        let mut a = vec!["build".to_string(), "--progress".into(), "plain".into()];
        a.extend(farm.client_args());
        a.extend(
            [
                "--platform",
                "linux/amd64",
                "--insecure-registry",
                &registry.addr,
                "--build-arg",
                &format!("BASE={base}"),
                "-t",
                &format!("{}/{tag}", registry.addr),
            ]
            .map(String::from),
        );
        a
    };

    // An unset variable is refused before anything is uploaded, naming the flag and the fix.
    let mut unset = common_flags("never:1");
    unset.extend(["--secret", "id=tok,env=FARM_TEST_UNSET_VARIABLE", "."].map(String::from));
    let out = Command::new(farm_bin()).args(&unset).env_remove("FARM_TEST_UNSET_VARIABLE").output().unwrap();
    assert!(!out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "error: --secret id=tok,env=FARM_TEST_UNSET_VARIABLE: the environment variable FARM_TEST_UNSET_VARIABLE \
         is not set; set it (export FARM_TEST_UNSET_VARIABLE=...) or pass the secret from a file: --secret \
         id=tok,src=FILE"
    );
    assert_eq!(farm.builds().as_array().unwrap().len(), 0, "nothing was submitted");

    // A named context with a .dockerignore of its own.
    let extra = tmp.join("extra");
    std::fs::create_dir_all(&extra).unwrap();
    std::fs::write(extra.join("file"), "from the named context\n").unwrap();
    std::fs::write(extra.join("ignored.txt"), "never uploaded\n").unwrap();
    std::fs::write(extra.join(".dockerignore"), "ignored.txt\n").unwrap();
    let ctx = tmp.join("ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(
        ctx.join("Dockerfile"),
        "ARG BASE\nFROM ${BASE}\n\
         COPY --from=extra /file /x\n\
         RUN --mount=type=bind,from=extra,target=/e cat /e/file > /y && ls /e > /extra-ls\n\
         RUN --mount=type=secret,id=tok cat /run/secrets/tok | sha256sum | cut -d' ' -f1 > /tokhash\n\
         RUN grep db.internal /etc/hosts > /hosts\n",
    )
    .unwrap();
    let secret = format!("tok-{:016x}", rand_u64());
    let mut args = common_flags("inputs:1");
    args.extend(
        [
            "--build-context",
            &format!("extra={}", extra.display()),
            "--secret",
            "id=tok,env=TOKVAR",
            "--add-host",
            "db.internal:10.1.2.3",
            "--pull",
            ctx.to_str().unwrap(),
        ]
        .map(String::from),
    );
    let out = Command::new(farm_bin()).args(&args).env("TOKVAR", &secret).env("FARM_LOG", "warn").output().unwrap();
    let (so, se) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{so}\n{se}");
    assert!(se.contains("context extra: 2 files"), "the named context's upload is reported: {se}");

    let (_, _, images) = read_image(&registry, &format!("{}/inputs:1", registry.addr));
    let image = &images[0];
    assert_eq!(image.text("x"), "from the named context");
    assert_eq!(image.text("y"), "from the named context");
    assert_eq!(image.text("extra-ls"), "file", ".dockerignore of the named context is honoured");
    assert_eq!(image.text("tokhash"), shared::digest::sha256_hex(secret.as_bytes()));
    assert_eq!(image.text("hosts").split_whitespace().collect::<Vec<_>>(), ["10.1.2.3", "db.internal"]);
    // The secret is in no layer, no log, no state file.
    for (path, bytes) in &image.files {
        assert!(!bytes.windows(secret.len()).any(|w| w == secret.as_bytes()), "secret in layer file {path}");
    }
    assert!(!image.files.keys().any(|p| p.starts_with("run/secrets/tok")), "secret file left in a layer");
    assert!(!so.contains(&secret) && !se.contains(&secret));
    assert!(!farm.coordinator.log().contains(&secret), "secret in the coordinator's log");
    assert!(!farm.agents["x86"].log().contains(&secret), "secret in the agent's log");
    for dir in [tmp.join("coordinator"), tmp.join("agent-x86"), registry.data_dir()] {
        assert_eq!(files_containing(&dir, &secret), Vec::<String>::new(), "secret under {}", dir.display());
    }

    // The context as a tar on stdin, built with no network: RUN sees only loopback.
    let stdin_ctx = tmp.join("stdin-ctx");
    std::fs::create_dir_all(&stdin_ctx).unwrap();
    std::fs::write(
        stdin_ctx.join("Dockerfile"),
        "ARG BASE\nFROM ${BASE}\nCOPY hello.txt /hello.txt\nRUN cat /proc/net/dev > /netdev\n",
    )
    .unwrap();
    std::fs::write(stdin_ctx.join("hello.txt"), "sent on stdin\n").unwrap();
    let tar = Command::new("tar").arg("-C").arg(&stdin_ctx).args(["-c", "."]).output().unwrap();
    assert!(tar.status.success());
    let mut args = common_flags("stdin:1");
    args.extend(["--network", "none", "-"].map(String::from));
    let mut child = Command::new(farm_bin())
        .args(&args)
        .env("FARM_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(&tar.stdout).unwrap();
    let out = child.wait_with_output().unwrap();
    let (so, se) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{so}\n{se}");
    let (_, _, images) = read_image(&registry, &format!("{}/stdin:1", registry.addr));
    assert_eq!(images[0].text("hello.txt"), "sent on stdin");
    let interfaces: Vec<String> =
        images[0].text("netdev").lines().skip(2).map(|l| l.split(':').next().unwrap().trim().to_string()).collect();
    assert_eq!(interfaces, ["lo"], "--network none leaves only loopback");

    // `-f -`: the Dockerfile on stdin, the context a directory.
    let mut args = common_flags("stdinfile:1");
    args.extend(["-f", "-", stdin_ctx.to_str().unwrap()].map(String::from));
    let mut child = Command::new(farm_bin())
        .args(&args)
        .env("FARM_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"ARG BASE\nFROM ${BASE}\nCOPY hello.txt /again.txt\n").unwrap();
    let out = child.wait_with_output().unwrap();
    let (so, se) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{so}\n{se}");
    let (_, _, images) = read_image(&registry, &format!("{}/stdinfile:1", registry.addr));
    assert_eq!(images[0].text("again.txt"), "sent on stdin");
    assert!(!images[0].files.contains_key("netdev"), "built from the Dockerfile on stdin, not the one in the context");
}
