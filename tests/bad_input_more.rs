//! End to end: more bad input, each refused up front with the exact message its user sees, through
//! the real `farm` binary: tags that carry a digest, platform lists with nothing in them, an empty
//! Dockerfile, and a flood of refused TLS handshakes (one log line per peer, every one counted in
//! the metrics).
//!
//! The CLI cases run against a coordinator (and check that it received nothing: no context, no
//! build) and, where the CLI would otherwise start one, against the farm embedded in the command.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::*;

/// Variables that would point a CLI run at another farm or config than the test's.
const FARM_ENV: &[&str] = &[
    "FARM_CONFIG",
    "FARM_COORDINATOR",
    "FARM_CA_DIR",
    "FARM_NAME",
    "FARM_TOKEN",
    "FARM_STATE_DIR",
    "XDG_CONFIG_HOME",
    "XDG_STATE_HOME",
];

const DIGEST: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

/// `farm ARGS` run in `dir` with HOME = `home` and no farm variables.
fn cli(home: &Path, dir: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new(farm_bin());
    cmd.args(args).current_dir(dir).env("HOME", home).env("FARM_LOG", "warn").env("NO_COLOR", "1");
    for v in FARM_ENV {
        cmd.env_remove(v);
    }
    cmd.stdin(std::process::Stdio::null()).output().expect("run farm")
}

/// The line the CLI failed with (its last `error: ` line), after checking that it failed.
fn refusal(what: &str, out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "{what}: farm succeeded, printing\n{}\n{stderr}",
        String::from_utf8_lossy(&out.stdout)
    );
    stderr.lines().rev().find(|l| l.starts_with("error: ")).unwrap_or_default().to_string()
}

/// A context directory `name` under `root` holding `dockerfile` as its Dockerfile.
fn context(root: &Path, name: &str, dockerfile: &str) -> PathBuf {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("Dockerfile"), dockerfile).unwrap();
    dir
}

/// A coordinator (no agent needed: nothing may reach it) and a HOME for the CLI.
struct Setup {
    farm: Farm,
    home: tempfile::TempDir,
}

impl Setup {
    fn start() -> Setup {
        Setup { farm: Farm::start(3), home: tempfile::tempdir().unwrap() }
    }

    /// `farm build --wait=false` against the coordinator: without the refusal it would submit
    /// and print a build id.
    fn build(&self, dir: &Path, extra: &[&str]) -> Output {
        let mut args = vec!["build".to_string(), "--wait=false".into()];
        args.extend(self.farm.client_args());
        args.extend(extra.iter().map(|s| s.to_string()));
        cli(self.home.path(), dir, &args.iter().map(String::as_str).collect::<Vec<_>>())
    }

    /// `farm build` with no coordinator configured or reachable: the farm embedded in the command.
    fn embedded(&self, dir: &Path, extra: &[&str]) -> Output {
        let mut args = vec!["build", "--embedded", "--progress", "plain"];
        args.extend(extra);
        cli(self.home.path(), dir, &args)
    }

    /// The coordinator received no context and accepted no build.
    fn received_nothing(&self, what: &str) {
        let log = self.farm.coordinator.log();
        for line in ["context files received", "build accepted"] {
            assert!(!log.contains(line), "{what}: the coordinator logged {line:?}:\n{log}");
        }
        assert_eq!(self.farm.builds(), serde_json::json!([]), "{what}: a build was recorded");
    }
}

#[test]
fn a_tag_with_a_digest_is_refused_before_anything_is_sent() {
    let s = Setup::start();
    let ctx = context(s.home.path(), "ctx", "FROM scratch\nCOPY Dockerfile /\n");
    let ctx_arg = ctx.to_str().unwrap();
    let pinned = format!("127.0.0.1:5000/app:1@{DIGEST}");
    let digest_only = format!("127.0.0.1:5000/app@{DIGEST}");
    let cases = [
        (
            &pinned,
            format!(
                "error: invalid tag \"{pinned}\": a tag to push to cannot pin a digest: the pushed image gets a digest \
                 of its own and the tag \"1\" would move to it; drop \"@{DIGEST}\" (-t 127.0.0.1:5000/app:1)"
            ),
        ),
        (
            &digest_only,
            format!(
                "error: invalid tag \"{digest_only}\": it names a digest, not a tag to push the image under; give a \
                 tag instead (e.g. -t 127.0.0.1:5000/app:latest)"
            ),
        ),
    ];
    for (tag, want) in &cases {
        let flags = ["--platform", "linux/amd64,linux/arm64", "-t", tag.as_str(), ctx_arg];
        let got = refusal(&format!("-t {tag} with a coordinator"), &s.build(&ctx, &flags));
        assert_eq!(got, *want, "-t {tag} with a coordinator");
        let got = refusal(&format!("-t {tag} embedded"), &s.embedded(&ctx, &flags));
        assert_eq!(got, *want, "-t {tag} in the embedded farm");
    }
    s.received_nothing("tags with digests");
}

#[test]
fn an_empty_platform_list_or_a_stray_comma_is_refused_not_built_for_the_default_platform() {
    let s = Setup::start();
    let ctx = context(s.home.path(), "ctx", "FROM scratch\nCOPY Dockerfile /\n");
    let ctx_arg = ctx.to_str().unwrap();
    let accepted = "linux/amd64, linux/386, linux/arm64, linux/arm/v7, linux/arm/v6, linux/riscv64, linux/ppc64le, \
                    linux/s390x";
    let empty = format!(
        "error: empty platform list \"\": name one or more platforms, comma-separated, from {accepted} (or leave the \
         flag out to build for this machine's platform)"
    );
    let cases = [
        ("", empty.clone()),
        (
            "linux/amd64,",
            "error: empty platform in the list \"linux/amd64,\": remove the stray comma, or name a platform there".into(),
        ),
        (
            "linux/amd64,,linux/arm64",
            "error: empty platform in the list \"linux/amd64,,linux/arm64\": remove the stray comma, or name a platform \
             there"
                .into(),
        ),
    ];
    for (platforms, want) in &cases {
        let flags = ["--platform", platforms, "-t", "127.0.0.1:5000/app:1", ctx_arg];
        let got = refusal(&format!("--platform {platforms:?}"), &s.build(&ctx, &flags));
        assert_eq!(got, *want, "--platform {platforms:?} with a coordinator");
    }
    let got = refusal(
        "--platform \"\" embedded",
        &s.embedded(&ctx, &["--platform", "", "-t", "127.0.0.1:5000/a:1", ctx_arg]),
    );
    assert_eq!(got, empty, "--platform \"\" in the embedded farm");
    s.received_nothing("empty platforms");
}

/// `GET /metrics` from the coordinator's metrics listener: the exposition text.
fn scrape(addr: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("metrics at {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text
}

/// The value of the sample `name` (with its labels, as exposed), if it is there.
fn sample(exposition: &str, name: &str) -> Option<f64> {
    exposition.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[test]
fn a_flood_of_refused_tls_handshakes_logs_one_line_per_peer_and_counts_every_one() {
    const HANDSHAKES: usize = 200;
    let mut farm = Farm::start(3);
    let metrics = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let config = farm.tmp.path().join("coordinator.toml");
    std::fs::write(&config, format!("metrics_listen = \"{metrics}\"\n")).unwrap();
    farm.restart_coordinator_env(&[("FARM_CONFIG", config.to_str().unwrap())]);
    farm.coordinator.wait_for_line(&["metrics at"], Duration::from_secs(10));

    // A client that trusts this farm's CA but presents a certificate another farm's CA signed.
    let other = Ca::init(&farm.tmp.path().join("other-farm"));
    let mut creds = shared::tls::load_credentials(&other.dir, "admin").unwrap();
    creds.ca = shared::tls::load_credentials(&farm.ca.dir, "admin").unwrap().ca;

    let before = farm.coordinator.log().lines().count();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let refused = runtime.block_on(async {
        let mut refused = 0;
        for _ in 0..HANDSHAKES {
            let limits = shared::quic::TransportLimits::default();
            let connected =
                shared::client::Client::connect(&farm.addr, &creds, &limits, shared::proto::DEFAULT_MAX_FRAME).await;
            match connected {
                Err(e) if e.to_string().contains("refused this certificate (unknown CA)") => refused += 1,
                other => panic!("expected the coordinator to refuse the certificate, got {:?}", other.err()),
            }
        }
        refused
    });
    assert_eq!(refused, HANDSHAKES);

    // Every refusal is counted...
    let name = "farm_tls_refusals_total{reason=\"unknown_ca\"}";
    let counted =
        poll_until(Duration::from_secs(30), || sample(&scrape(&metrics), name).filter(|n| *n >= HANDSHAKES as f64));
    assert_eq!(counted, Some(HANDSHAKES as f64), "{name} in\n{}", scrape(&metrics));
    // ...and logged once: the first, saying who the peer claimed to be, the fix, and that the rest
    // are only counted.
    let log = farm.coordinator.log();
    let added: Vec<&str> = log.lines().skip(before).collect();
    assert_eq!(added.len(), 1, "{HANDSHAKES} refused handshakes logged these lines:\n{}", added.join("\n"));
    let want = "WARN shared::tls: refused admin \"admin\": certificate not signed by this farm's CA (UnknownIssuer); \
                issue one with `farm ca issue` (the same refusal again is logged at most every 300 s)";
    assert!(added[0].ends_with(want), "expected a line ending with\n    {want}\ngot\n    {}", added[0]);
}

#[test]
fn an_empty_dockerfile_is_refused_by_the_client_naming_the_users_file() {
    let s = Setup::start();
    let ctx = context(s.home.path(), "ctx", "");
    std::fs::create_dir_all(ctx.join("ci")).unwrap();
    std::fs::write(ctx.join("ci/Containerfile"), "").unwrap();
    let no_from = "no FROM instruction: a Dockerfile starts a stage with FROM <image>, e.g. FROM busybox:1.36";
    // Run from inside the context, as `farm build .`: the path as the user gave it.
    for (extra, shown) in [(&[][..], "./Dockerfile"), (&["-f", "ci/Containerfile"][..], "ci/Containerfile")] {
        let mut flags = vec!["--platform", "linux/amd64", "-t", "127.0.0.1:5000/app:1"];
        flags.extend(extra);
        flags.push(".");
        let want = format!("error: {shown}: {no_from}");
        let got = refusal(&format!("an empty {shown}"), &s.build(&ctx, &flags));
        assert_eq!(got, want, "an empty {shown} with a coordinator");
        let got = refusal(&format!("an empty {shown} embedded"), &s.embedded(&ctx, &flags));
        assert_eq!(got, want, "an empty {shown} in the embedded farm");
    }
    s.received_nothing("an empty Dockerfile");
}
