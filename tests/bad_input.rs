//! End to end: bad input. One farm (a coordinator started with a config file that sets low limits,
//! one x86 agent, a real registry seeded with busybox) is fed every kind of bad input a user, a
//! misconfigured machine or a hostile peer can produce: bad flags, bad contexts, bad manifests,
//! bad frames, bad certificates, bad tokens, bad registries. Each case asserts the exact message
//! its user sees (the CLI's `error:` line, the answer on the wire, the agent's log line), and
//! after each group a normal one-platform build must still succeed, proving that nothing a bad
//! request touched was lost and that the coordinator keeps serving.
//!
//! Cases do not stop at the first mismatch: every case runs, and the test fails at the end with
//! the list of those whose message differs.

mod common;

use std::io::{Read, Seek, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::registry::Registry;
use common::*;
use shared::client::{handshake, Client, ClientError};
use shared::context::{ContextManifest, Entry, EntryKind};
use shared::proto::io::{expect_msg, write_msg};
use shared::proto::{
    encode, AgentInfo, AgentMsg, BuildSpec, CoordMsg, Emulation, Hello, HelloReply, Request, Response,
    DEFAULT_MAX_FRAME,
};
use shared::quic::TransportLimits;
use shared::tls::Credentials;
use shared::Digest;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

/// Longest a single CLI command may take here (a build included) before the case fails.
const CLI_TIMEOUT: Duration = Duration::from_secs(180);

/// The coordinator's config file: limits low enough for a test to cross them.
const COORDINATOR_TOML: &str = "max_platforms_per_build = 2\nmax_context_files = 50\n";

/// `farmuser:right-password`, bcrypt (cost 4), as `htpasswd -Bbn farmuser right-password` writes
/// it (made once with Python's `crypt.crypt(..., crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16))`;
/// fixed here so that the test needs neither apache2-utils nor a Python with bcrypt).
const HTPASSWD: &str = "farmuser:$2b$04$PHkZw07L4pUvsY/B58Pt5udBdQiIzDCCqRPl97Kd/uEIegk1pUhgm\n";

/// Variables that would point a CLI run at another farm or config than the test's.
const FARM_ENV: &[&str] = &[
    "FARM_CONFIG",
    "FARM_COORDINATOR",
    "FARM_CA_DIR",
    "FARM_NAME",
    "FARM_TOKEN",
    "FARM_LISTEN",
    "FARM_STATE_DIR",
    "FARM_HEARTBEAT_TIMEOUT",
    "FARM_WORK_DIR",
    "XDG_CONFIG_HOME",
    "XDG_STATE_HOME",
];

#[test]
fn bad_input_is_refused_with_the_exact_message_and_a_normal_build_succeeds_right_after() {
    let started = Instant::now();
    require_tool("mkfifo");
    let registry = Registry::start();
    let base = registry.seed_busybox();
    let mut farm = Farm::start(3);
    let config = farm.tmp.path().join("coordinator.toml");
    std::fs::write(&config, COORDINATOR_TOML).unwrap();
    farm.restart_coordinator_env(&[("FARM_CONFIG", config.to_str().unwrap())]);
    farm.agent("x86", &[]);
    let mut w = World::new(farm, registry, base);
    w.normal_build("the farm started");

    cli_refuses_before_sending_anything(&mut w);
    w.normal_build("the CLI's own refusals");
    coordinator_refuses_requests(&mut w);
    w.normal_build("requests the coordinator refused");
    manifests_refused_on_the_wire(&mut w);
    w.normal_build("manifests refused on the wire");
    broken_streams(&mut w);
    w.normal_build("broken streams and handshakes");
    wrong_roles(&mut w);
    w.normal_build("requests from the wrong role");
    certificates_and_tokens(&mut w);
    w.normal_build("refused certificates and tokens");
    revoked_identities(&mut w);
    w.normal_build("revoked identities");
    configuration_and_processes(&mut w);
    w.normal_build("refused configurations");
    registries(&mut w);
    w.normal_build("registry failures");
    first_hour(&mut w);
    w.normal_build("a newcomer's first-hour mistakes");
    w.nothing_accepted_was_lost();

    w.finish(started);
}

// ---------------------------------------------------------------------------------------------
// 1. The CLI refuses before it sends anything: platforms, tags, contexts, Dockerfiles.

fn cli_refuses_before_sending_anything(w: &mut World) {
    let reg = w.registry.addr.clone();
    let tag = format!("{reg}/app:1");
    let root = w.scratch("local");
    let ctx = w.context(&root, "ctx", "FROM scratch\n");

    let run = w.build(&["--platform", "linux/mips", "-t", &tag], &ctx);
    w.refused(
        "bad platform",
        &run,
        "error: unknown platform \"linux/mips\": farm builds for linux/amd64, linux/386, linux/arm64, \
         linux/arm/v7, linux/arm/v6, linux/riscv64, linux/ppc64le, linux/s390x",
    );

    let run = w.build(&["--platform", "windows/amd64", "-t", &tag], &ctx);
    w.refused(
        "a platform of another operating system",
        &run,
        "error: unsupported operating system \"windows\" in \"windows/amd64\": farm builds Linux images only \
         (linux/amd64, linux/386, linux/arm64, linux/arm/v7, linux/arm/v6, linux/riscv64, linux/ppc64le, linux/s390x)",
    );

    let run = w.build(&["--platform", "linux/amd64,x86_64", "-t", &tag], &ctx);
    w.refused(
        "one platform listed twice under two spellings",
        &run,
        "error: platform linux/amd64 is listed twice (as \"linux/amd64\" and \"x86_64\")",
    );

    let upper = format!("{reg}/App:1");
    let run = w.build(&["--platform", "linux/amd64", "-t", &upper], &ctx);
    w.refused(
        "bad tag (uppercase repository)",
        &run,
        &format!("error: invalid tag \"{upper}\": repository names must be lowercase (\"App\")"),
    );

    let run = w.build(&["--platform", "linux/amd64"], &ctx);
    w.refused(
        "no tag",
        &run,
        "error: no tag given: pass -t REGISTRY/REPOSITORY:TAG to push to a registry, or choose an output that needs \
         none: -o type=oci,dest=FILE, -o type=local,dest=DIR or --load",
    );

    let empty = root.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let run = w.build(&["--platform", "linux/amd64", "-t", &tag], &empty);
    w.refused(
        "missing Dockerfile",
        &run,
        &format!(
            "error: reading the build context {}: there is no Dockerfile at {}; use -f to point at another one",
            empty.display(),
            empty.join("Dockerfile").display()
        ),
    );

    let outside = root.join("outside.Dockerfile");
    std::fs::write(&outside, "FROM scratch\n").unwrap();
    let run = w.build(&["--platform", "linux/amd64", "-t", &tag, "-f", outside.to_str().unwrap()], &ctx);
    w.refused(
        "-f outside the context",
        &run,
        &format!(
            "error: Dockerfile {} is outside the build context {}; move it inside",
            outside.display(),
            ctx.display()
        ),
    );

    let nowhere = ctx.join("Nope.Dockerfile");
    let run = w.build(&["--platform", "linux/amd64", "-t", &tag, "-f", nowhere.to_str().unwrap()], &ctx);
    w.refused(
        "-f naming no file",
        &run,
        &format!(
            "error: Dockerfile {} not found (check -f): No such file or directory (os error 2)",
            nowhere.display()
        ),
    );

    let sub = ctx.join("sub");
    std::fs::create_dir_all(&sub).unwrap();
    let run = w.build(&["--platform", "linux/amd64", "-t", &tag, "-f", sub.to_str().unwrap()], &ctx);
    w.refused(
        "-f naming a directory",
        &run,
        &format!(
            "error: reading the build context {}: the Dockerfile {} is not a regular file; use -f to point at the \
             Dockerfile",
            ctx.display(),
            sub.display()
        ),
    );
    std::fs::remove_dir(&sub).unwrap();

    let file = ctx.join("Dockerfile");
    let run = w.build(&["--platform", "linux/amd64", "-t", &tag], &file);
    w.refused(
        "context not a directory",
        &run,
        &format!(
            "error: build context {} is not a directory (give a directory, or - for a tar on stdin)",
            file.display()
        ),
    );

    let escaping = w.context(&root, "escaping", "FROM scratch\n");
    std::os::unix::fs::symlink("../../etc/passwd", escaping.join("leak")).unwrap();
    let run = w.build(&["--platform", "linux/amd64", "-t", &tag], &escaping);
    w.refused(
        "context with a symlink escaping through ..",
        &run,
        &format!(
            "error: reading the build context {}: symlink \"leak\" points to \"../../etc/passwd\", outside the \
             context; make it point inside the context or add it to .dockerignore",
            escaping.display()
        ),
    );

    let absolute = w.context(&root, "absolute", "FROM scratch\n");
    std::os::unix::fs::symlink("/etc/passwd", absolute.join("passwd")).unwrap();
    let run = w.build(&["--platform", "linux/amd64", "-t", &tag], &absolute);
    w.refused(
        "context with an absolute symlink",
        &run,
        &format!(
            "error: reading the build context {}: symlink \"passwd\" points to \"/etc/passwd\", outside the \
             context; make it point inside the context or add it to .dockerignore",
            absolute.display()
        ),
    );

    let fifo = w.context(&root, "fifo", "FROM scratch\n");
    let made = Command::new("mkfifo").arg(fifo.join("pipe")).status().unwrap();
    assert!(made.success(), "mkfifo failed");
    let run = w.build(&["--platform", "linux/amd64", "-t", &tag], &fifo);
    w.refused(
        "a FIFO in the context",
        &run,
        &format!(
            "error: reading the build context {}: \"pipe\" is a FIFO (named pipe); build contexts may hold only \
             files, directories and symlinks (add it to .dockerignore)",
            fifo.display()
        ),
    );

    let latin1 = w.context(&root, "latin1", "FROM scratch\n");
    let bad_name = latin1.join(std::ffi::OsStr::from_bytes(b"caf\xe9.txt"));
    std::fs::write(&bad_name, "x").unwrap();
    let run = w.build(&["--platform", "linux/amd64", "-t", &tag], &latin1);
    w.refused(
        "a file name that is not UTF-8",
        &run,
        &format!(
            "error: reading the build context {}: {} has a name that is not valid UTF-8, which a context cannot \
             carry; rename it or add it to .dockerignore",
            latin1.display(),
            bad_name.display()
        ),
    );

    let ignore = w.context(&root, "ignore", "FROM scratch\n");
    std::fs::write(ignore.join(".dockerignore"), "# build output\n[abc\n").unwrap();
    let run = w.build(&["--platform", "linux/amd64", "-t", &tag], &ignore);
    w.refused(
        "a .dockerignore pattern that does not parse",
        &run,
        &format!(
            "error: reading the build context {}: .dockerignore line 2: the pattern \"[abc\" has a '[' without its \
             closing ']'",
            ignore.display()
        ),
    );
}

// ---------------------------------------------------------------------------------------------
// 1b. A newcomer's first-hour mistakes: each refused at once, before anything is uploaded or built.

fn first_hour(w: &mut World) {
    let reg = w.registry.addr.clone();
    let ctx = w.ok_ctx.clone();

    let before = w.work_done();
    let run = w.build(&["--platform", "linux/amd64,linux/arm64", "-t", "myapp:1"], &ctx);
    w.refused(
        "a tag without a registry",
        &run,
        "error: -t myapp:1: names no registry, so it would be pushed to Docker Hub; name yours (e.g. -t \
         registry.lan:5000/myapp:1), write docker.io/... to mean Docker Hub, or choose an output that needs no \
         registry: -o type=oci,dest=FILE, -o type=local,dest=DIR or --load",
    );
    w.nothing_done_since("a tag without a registry", before);

    // Output specs: refused before anything is uploaded, naming the flag and the fix.
    let run = w.build(&["--platform", "linux/amd64", "-t", "myapp:1", "-o", "type=nope"], &ctx);
    w.refused(
        "an unknown output type",
        &run,
        "error: -o type=nope: unknown output type \"nope\": farm writes type=registry, type=oci, type=local or type=tar",
    );
    let run = w.build(&["--platform", "linux/amd64", "-t", "myapp:1", "-o", "type=oci"], &ctx);
    w.refused(
        "type=oci without dest",
        &run,
        "error: -o type=oci: type=oci needs dest=FILE (a tar; dest=- for stdout), or dest=DIR,tar=false for a \
         directory",
    );
    let nowhere = w.scratch("outputs").join("missing");
    let oci = format!("type=oci,dest={}/out.tar", nowhere.display());
    let run = w.build(&["--platform", "linux/amd64", "-t", "myapp:1", "-o", &oci], &ctx);
    w.refused(
        "an output in a missing directory",
        &run,
        &format!(
            "error: -o {oci}: the directory {} does not exist: create it first, or give a dest= in a directory that \
             exists",
            nowhere.display()
        ),
    );
    let run = w.build(&["--platform", "linux/arm64", "--emulation", "never", "-t", "myapp:1", "--load"], &ctx);
    w.refused(
        "--load of a platform no agent builds",
        &run,
        "error: --load linux/arm64: no connected agent builds linux/arm64 (`farm agents` lists what each builds); \
         start an agent that runs it, or drop --load and use -o type=oci,dest=FILE",
    );
    w.nothing_done_since("bad output specs", before);

    let typo = w.context(&w.scratch("typo"), "ctx", "ARG BASE\nFROM ${BASE}\nRUNN make\n");
    let run = w.build(&["--platform", "linux/amd64", "-t", &format!("{reg}/app:1")], &typo);
    w.refused(
        "a Dockerfile with an unknown instruction",
        &run,
        &format!(
            "error: {}:3: unknown instruction \"RUNN\" in \"RUNN make\"; did you mean RUN?",
            typo.join("Dockerfile").display()
        ),
    );
    w.nothing_done_since("a Dockerfile with an unknown instruction", before);

    let stages = w.context(
        &w.scratch("stages"),
        "ctx",
        "ARG BASE\nFROM ${BASE} AS build\nRUN true\nFROM ${BASE} AS final\nCOPY --from=later /x /x\nFROM ${BASE} AS later\n",
    );
    let run = w.build(&["--platform", "linux/amd64", "-t", &format!("{reg}/app:1")], &stages);
    w.refused(
        "COPY --from a stage defined later",
        &run,
        &format!(
            "error: {}:5: COPY --from=later refers to stage \"later\", which is defined after this one (line 6)",
            stages.join("Dockerfile").display()
        ),
    );
    let run = w.build(&["--platform", "linux/amd64", "-t", &format!("{reg}/app:1"), "--target", "tset"], &ctx);
    w.refused(
        "--target naming no stage",
        &run,
        &format!(
            "error: --target \"tset\": no stage of that name in {} (no stage has a name: name one with FROM \
             <image> AS <name>)",
            ctx.join("Dockerfile").display()
        ),
    );
    w.nothing_done_since("Dockerfile stage mistakes", before);

    let nobody = free_udp_port();
    let started = Instant::now();
    let run = w.cli(&[
        "build",
        "--coordinator",
        &format!("127.0.0.1:{nobody}"),
        "--ca-dir",
        w.farm.ca.path(),
        "-t",
        &format!("{reg}/app:1"),
        ctx.to_str().unwrap(),
    ]);
    let config = w.home.join(".config/farm/config.toml");
    w.refused(
        "a coordinator address where nothing answers",
        &run,
        &format!(
            "error: no coordinator answered at 127.0.0.1:{nobody} (UDP) within 3 s: is `farm coordinator` running \
             there, and is UDP port {nobody} open to this machine? Point farm at another one with --coordinator \
             HOST:PORT, FARM_COORDINATOR or `coordinator = ...` in {}",
            config.display()
        ),
    );
    let took = started.elapsed();
    w.check("an unreachable coordinator fails within 5 s", took < Duration::from_secs(5), || format!("{took:?}"));
    w.nothing_done_since("a coordinator address where nothing answers", before);

    let run = w.build(&["--platform", "linux/amd64", "-t", &format!("{reg}/app:1"), "--sbom=true"], &ctx);
    w.check("a buildx flag farm lacks exits 2", run.code == Some(2), || run.tail());
    w.only_error(
        "a buildx flag farm lacks is named, with what to do instead",
        &run,
        "error: farm build has no --sbom (a docker buildx build flag): farm does not attach SBOMs yet; `farm build \
         --help` lists its flags",
    );
    w.nothing_done_since("a buildx flag farm lacks", before);

    let run = w.build(&["--platform", "linux/amd64", "-t", &format!("{reg}/app:1"), "--cache-to", "type=inline"], &ctx);
    w.refused(
        "a cache type other than registry",
        &run,
        "error: --cache-to type=inline: type=inline: farm's agents share their layer cache only through a registry \
         (each keeps its own between builds); use --cache-to type=registry,ref=REGISTRY/REPOSITORY[:TAG][,mode=max]",
    );
    w.nothing_done_since("a cache type other than registry", before);

    let run = w.cli(&[&["agents", "revoke", "nosuch"][..], &w.client_args()].concat());
    w.refused(
        "revoking a name that never connected",
        &run,
        &format!(
            "error: coordinator at {} answered with an error: no agent or client named \"nosuch\" has ever \
             connected to this farm (`farm agents` lists agents); check the name, or revoke it anyway with `farm \
             agents revoke --force nosuch`",
            w.farm.addr
        ),
    );
    let run = w.cli(&[&["agents", "revoke", "--force", "stolen"][..], &w.client_args()].concat());
    w.check("--force revokes a name that never connected", run.code == Some(0), || run.tail());

    // A base image on a plain-HTTP registry that the build did not name with --insecure-registry:
    // the builder's error, with the same fix as a push gets.
    let second = Registry::start();
    let base = second.seed_busybox();
    let plain = w.context(&w.scratch("plain-base"), "ctx", &format!("FROM {base}\nRUN true\n"));
    let run = w.build(&["--platform", "linux/amd64", "-t", &format!("{reg}/app:1")], &plain);
    let hint = format!(
        "the registry {a} answered in plain HTTP, not HTTPS: name it with --insecure-registry {a}; no tag was pushed",
        a = second.addr
    );
    let ok = run.failed() && run.error_line().ends_with(&hint) && run.error_line().contains("linux/amd64 failed: ");
    w.check("a plain-HTTP base registry gets the --insecure-registry hint", ok, || run.tail());
}

// ---------------------------------------------------------------------------------------------
// 2. The coordinator (or the CLI after connecting) refuses a request: flags, limits, unknown builds.

fn coordinator_refuses_requests(w: &mut World) {
    let reg = w.registry.addr.clone();
    let addr = w.farm.addr.clone();
    let tag = format!("{reg}/app:1");
    let ctx = w.ok_ctx.clone();

    let run = w.build(&["--platform", "linux/amd64", "-t", &tag, "--build-arg", "=x"], &ctx);
    w.only_error("--build-arg without a name", &run, "error: --build-arg \"=x\" has no name; use KEY=VALUE");

    let run = w.build(&["--platform", "linux/amd64", "-t", &tag, "--secret", "api"], &ctx);
    w.only_error(
        "--secret with bad syntax",
        &run,
        "error: --secret \"api\": expected id=ID,src=FILE, id=ID,env=VAR or type=env,id=ID",
    );

    let run = w.build(&["--platform", "linux/amd64", "-t", &tag, "--require", "gpu"], &ctx);
    w.only_error(
        "--require without a value",
        &run,
        "error: --require \"gpu\" is not KEY=VALUE (e.g. --require gpu=nvidia)",
    );

    let missing = w.scratch("secrets").join("api-token");
    let secret = format!("id=api,src={}", missing.display());
    let run = w.build(&["--platform", "linux/amd64", "-t", &tag, "--secret", &secret], &ctx);
    w.only_error(
        "--secret naming a missing file",
        &run,
        &format!("error: --secret api: cannot read {}: No such file or directory (os error 2)", missing.display()),
    );

    let other = format!("{reg}/other:1");
    let run = w.build(&["--platform", "linux/amd64", "-t", &tag, "-t", &other], &ctx);
    w.refused(
        "tags in two repositories",
        &run,
        &format!(
            "error: coordinator at {addr} answered with an error: tags {tag} and {other} name different \
             repositories; all tags of one build must share one repository"
        ),
    );

    let run = w.build(&["--platform", "linux/amd64,linux/arm64,linux/arm/v7", "-t", &tag], &ctx);
    w.refused(
        "more platforms than max_platforms_per_build",
        &run,
        &format!(
            "error: coordinator at {addr} answered with an error: the number of platforms is 3, over the limit of \
             2 (config key max_platforms_per_build)"
        ),
    );

    let big = w.context(&w.scratch("big"), "big", "FROM scratch\nCOPY . /\n");
    for i in 0..60 {
        std::fs::write(big.join(format!("f{i:02}")), format!("{i}\n")).unwrap();
    }
    let run = w.build(&["--platform", "linux/amd64", "-t", &tag], &big);
    w.refused(
        "a context with more files than max_context_files",
        &run,
        &format!(
            "error: coordinator at {addr} answered with an error: build context refused: the context has 61 \
             entries (files, directories and symlinks), over the limit of 50 (config key max_context_files); \
             exclude what the build does not need in .dockerignore or raise the limit"
        ),
    );

    let run = w.farm_cli(&["logs", "0123456789ab"]);
    w.refused(
        "farm logs of an unknown build",
        &run,
        &format!(
            "error: coordinator at {addr} answered with an error: no build 0123456789ab; `farm builds` lists them"
        ),
    );

    let finished = w.last_build.clone();
    let run = w.farm_cli(&["cancel", &finished]);
    w.refused(
        "farm cancel of a finished build",
        &run,
        &format!("error: coordinator at {addr} answered with an error: build {finished} has already ended (succeeded)"),
    );

    let run = w.farm_cli(&["token", "create", "--role", "agent", "--ttl", "soon"]);
    w.refused(
        "--ttl that is not a duration",
        &run,
        "error: --ttl \"soon\" is not a duration like 30m, 24h or 7d: expected number at 0",
    );

    let run = w.farm_cli(&["token", "create", "--role", "coordinator"]);
    w.refused(
        "a join token for the coordinator role",
        &run,
        &format!("error: coordinator at {addr} answered with an error: tokens are for agents, clients and admins"),
    );

    let run = w.farm_cli(&["token", "revoke", "deadbeef"]);
    w.refused(
        "revoking an unknown token",
        &run,
        &format!("error: coordinator at {addr} answered with an error: no join token deadbeef"),
    );

    // The client's own frame limit, crossed by the coordinator's answer.
    let small = w.scratch("small-frames").join("client.toml");
    std::fs::write(&small, "max_frame_bytes = 16\n").unwrap();
    let run = w.farm_cli(&["agents", "--config", small.to_str().unwrap()]);
    w.refused_number(
        "an answer over the client's max_frame_bytes",
        &run,
        &format!("error: coordinator at {addr}: frame of "),
        " bytes exceeds the limit of 16 bytes (config key `max_frame_bytes`)",
    );
}

// ---------------------------------------------------------------------------------------------
// 3. Context manifests a client sends over the wire itself (PutContext): refused, and no build can
//    name them.

fn manifests_refused_on_the_wire(w: &mut World) {
    let addr = w.farm.addr.clone();
    let refused = |what: &str| format!("coordinator at {addr} answered with an error: build context refused: {what}");

    let got = w.admin_offer(vec![file("../etc/passwd")]);
    w.eq(
        "a manifest with ../etc/passwd",
        &got,
        &refused("context path \"../etc/passwd\" leaves the context (\"..\" is not allowed)"),
    );
    // Refused means not stored: a build of that manifest finds no context.
    let passwd = ContextManifest { entries: vec![file("../etc/passwd")] }.digest();
    let got = w.admin_build(spec(&w.registry.addr, passwd.clone()));
    w.eq(
        "a refused manifest cannot be built",
        &got,
        &format!(
            "coordinator at {addr} answered with an error: context {passwd} was not uploaded; upload it before \
             submitting"
        ),
    );

    let got = w.admin_offer(vec![file("/etc/passwd")]);
    w.eq(
        "a manifest with an absolute path",
        &got,
        &refused("context path \"/etc/passwd\" is absolute (paths must be relative to the context root)"),
    );

    let got = w.admin_offer(vec![file("Dockerfile"), file("Dockerfile")]);
    w.eq(
        "a manifest listing one path twice",
        &got,
        &refused("context path \"Dockerfile\" appears more than once in the manifest"),
    );

    let got = w.admin_offer(vec![file("b"), file("a")]);
    w.eq(
        "an unsorted manifest",
        &got,
        &refused("context path \"a\" comes after \"b\"; manifest entries must be sorted by path (byte order)"),
    );

    let got = w.admin_offer(vec![file("Dockerfile"), link("leak", "../../etc/passwd")]);
    w.eq(
        "a manifest with a symlink escaping the context",
        &got,
        &refused(
            "symlink \"leak\" points to \"../../etc/passwd\", outside the context; make it point inside the \
             context or add it to .dockerignore",
        ),
    );

    let got = w.admin_offer(vec![link("d", "/etc"), file("d/passwd")]);
    w.eq(
        "a manifest with a file under a symlink",
        &got,
        &refused(
            "context path \"d/passwd\" is inside \"d\", which the manifest lists as a symlink; only directories may \
             hold entries (a path under a symlink could leave the context)",
        ),
    );

    let never = Digest::of(b"a context nobody uploaded");
    let got = w.admin_build(spec(&w.registry.addr, never.clone()));
    w.eq(
        "a build of a context that was never uploaded",
        &got,
        &format!(
            "coordinator at {addr} answered with an error: context {never} was not uploaded; upload it before \
             submitting"
        ),
    );
}

// ---------------------------------------------------------------------------------------------
// 4. Broken frames on a request stream, and broken hellos. After each broken stream, the same
//    connection still answers on its next stream.

fn broken_streams(w: &mut World) {
    const STILL_HERE: &str = "Echo(\"still here\")";

    // A header announcing 5 MiB, over the coordinator's 4 MiB max_frame_bytes.
    let (got, echo) = w.raw_then_echo(&(5u32 << 20).to_be_bytes());
    w.eq(
        "an oversize frame on a request stream",
        &got,
        "frame of 5242880 bytes exceeds the limit of 4194304 bytes (config key `max_frame_bytes`)",
    );
    w.eq("the connection serves again after an oversize frame", &echo, STILL_HERE);

    let mut garbage = 6u32.to_be_bytes().to_vec();
    garbage.extend([0xff; 6]);
    let (got, echo) = w.raw_then_echo(&garbage);
    w.eq(
        "garbage on a request stream",
        &got,
        "malformed message: Found a varint that didn't terminate. Is the usize too big for this platform?",
    );
    w.eq("the connection serves again after garbage", &echo, STILL_HERE);

    let mut cut = 100u32.to_be_bytes().to_vec();
    cut.extend([0u8; 10]);
    let (got, echo) = w.raw_then_echo(&cut);
    w.eq(
        "a request stream ending mid-frame",
        &got,
        "connection ended in the middle of a frame (14 of 104 bytes received)",
    );
    w.eq("the connection serves again after a cut frame", &echo, STILL_HERE);

    let ours = shared::FARM_VERSION;
    let newer = Hello { protocol: 99, farm_version: "9.9.9".into(), ..Hello::ours() };
    let got = w.hello(newer);
    w.eq(
        "a hello with protocol version 99",
        &got,
        &format!(
            "refused: protocol version mismatch: this is farm {ours} speaking protocol {}, the peer is farm 9.9.9 \
             speaking protocol 99; run the same farm release on both sides",
            shared::proto::PROTOCOL_VERSION
        ),
    );

    let http = Hello { magic: *b"HTTP", ..Hello::ours() };
    let got = w.hello(http);
    w.eq(
        "a hello with the wrong magic",
        &got,
        "refused: the peer is not speaking the farm protocol (bad handshake magic)",
    );
}

// ---------------------------------------------------------------------------------------------
// 5. Identities asking for what their role may not do.

fn wrong_roles(w: &mut World) {
    let addr = w.farm.addr.clone();
    w.farm.ca.issue("client", "alice");
    w.farm.ca.issue("agent", "double");
    w.farm.ca.issue("agent", "spare");

    let got = w.registered_agent_request("double", Request::ListBuilds { limit: 10 });
    w.eq(
        "an agent identity listing builds (on its connection)",
        &got,
        "agent \"double\" may not submit, list, follow or cancel builds (agent identities only build)",
    );
    let never = Digest::of(b"an agent's build");
    let got = w.registered_agent_request("double", Request::Build(Box::new(spec(&w.registry.addr, never))));
    w.eq(
        "an agent identity submitting a build (on its connection)",
        &got,
        "agent \"double\" may not submit, list, follow or cancel builds (agent identities only build)",
    );

    let run = w.cli(&["builds", "--coordinator", &addr, "--ca-dir", w.farm.ca.path(), "--name", "spare"]);
    w.refused(
        "farm builds with an agent identity",
        &run,
        &format!(
            "error: coordinator at {addr} answered with an error: agent \"spare\" may not submit, list, follow or \
             cancel builds (agent identities only build)"
        ),
    );

    let ca = w.farm.ca.path().to_string();
    let alice = ["--coordinator", &addr, "--ca-dir", &ca, "--name", "alice"];
    let mut args = vec!["token", "create", "--role", "agent"];
    args.extend(alice);
    let run = w.cli(&args);
    w.refused(
        "farm token create with a client identity",
        &run,
        &format!(
            "error: coordinator at {addr} answered with an error: client \"alice\" may not create or revoke tokens \
             or identities (admin identities only)"
        ),
    );

    let mut args = vec!["agents", "revoke", "x86"];
    args.extend(alice);
    let run = w.cli(&args);
    w.refused(
        "farm agents revoke with a client identity",
        &run,
        &format!(
            "error: coordinator at {addr} answered with an error: client \"alice\" may not create or revoke tokens \
             or identities (admin identities only)"
        ),
    );

    let got = w.request_as(
        "alice",
        Request::Join {
            token_id: "00000000".into(),
            secret: "0".repeat(32),
            name: "alice".into(),
            csr: vec![],
            role: shared::tls::Role::Client,
        },
    );
    w.eq(
        "a member joining again",
        &got,
        &format!("coordinator at {addr} answered with an error: client \"alice\" is already a member of this farm"),
    );

    let got = w.joiner_request(Request::ListAgents);
    w.eq(
        "a peer without a certificate asking for more than joining",
        &got,
        "this connection presented no certificate: it may only join the farm with a token (`farm agent join` or \
         `farm login`)",
    );
}

// ---------------------------------------------------------------------------------------------
// 6. Certificates of another farm, and join tokens that are no good.

fn certificates_and_tokens(w: &mut World) {
    let addr = w.farm.addr.clone();
    let other_root = w.scratch("other-farm");
    let other = Ca::init(&other_root);

    let run = w.cli(&["agents", "--coordinator", &addr, "--ca-dir", other.path(), "--name", "admin"]);
    w.refused(
        "a client trusting another farm's CA",
        &run,
        &format!(
            "error: the server at {addr} presented a certificate not signed by this farm's CA (is this the right \
             farm?)"
        ),
    );

    // This farm's CA certificate, but a client certificate signed by the other farm's CA.
    let mixed = other_root.join("mixed");
    std::fs::create_dir_all(&mixed).unwrap();
    std::fs::copy(w.farm.ca.dir.join("ca.crt"), mixed.join("ca.crt")).unwrap();
    for f in ["admin.crt", "admin.key"] {
        std::fs::copy(other.dir.join(f), mixed.join(f)).unwrap();
    }
    let run = w.cli(&["agents", "--coordinator", &addr, "--ca-dir", mixed.to_str().unwrap(), "--name", "admin"]);
    w.refused(
        "a client certificate from another CA",
        &run,
        &format!(
            "error: the coordinator at {addr} refused this certificate (unknown CA): is it signed by this farm's \
             CA? issue one with `farm ca issue`"
        ),
    );

    let run = w.farm_cli(&["agents", "--name", "nobody"]);
    w.refused(
        "an identity that was never issued",
        &run,
        &format!(
            "error: no identity \"nobody\" in {dir}: nobody.crt not found; issue one with `farm ca issue --dir {dir} \
             --role agent --name nobody`",
            dir = w.farm.ca.path()
        ),
    );

    let answered =
        |what: &str| format!("error: joining the farm at {addr}: coordinator at {addr} answered with an error: {what}");

    // An expired token: refused once its hour has come (joins before that succeed, each into a
    // directory of its own; the condition decides, not a sleep).
    let short = w.token("agent", &["--ttl", "1s"]);
    let short_id = token_id(&short);
    let mut attempt = 0;
    let run = wait_until("the 1 s join token to expire", Duration::from_secs(30), || {
        attempt += 1;
        let run = w.join(&short, "late", &format!("late-{attempt}"));
        run.error_line().contains("expired").then_some(run)
    });
    w.refused_number(
        "an expired join token",
        &run,
        &answered(&format!("join token {short_id} expired ")),
        " s ago; create a new one with `farm token create`",
    );

    let revoked = w.token("agent", &[]);
    let revoked_id = token_id(&revoked);
    let run = w.farm_cli(&["token", "revoke", &revoked_id]);
    w.eq("farm token revoke says so", run.stdout.trim_end(), &format!("join token {revoked_id} revoked"));
    let run = w.join(&revoked, "pi", "revoked");
    w.refused(
        "a revoked join token",
        &run,
        &answered(&format!("join token {revoked_id} was revoked; create a new one with `farm token create`")),
    );

    let good = w.token("agent", &[]);
    let mut parts: Vec<&str> = good.split('.').collect();
    parts[2] = "00000000";
    let unknown = parts.join(".");
    let run = w.join(&unknown, "pi", "unknown");
    w.refused(
        "an unknown join token id",
        &run,
        &answered(
            "join token 00000000 is unknown to this coordinator (or its secret is wrong); create one with `farm \
             token create`",
        ),
    );

    let run = w.join("farm1.abc", "pi", "malformed");
    w.refused(
        "a malformed join token",
        &run,
        "error: not a farm join token: expected farm1.<64 hex>.<8 hex>.<32 hex>, as `farm token create` prints it",
    );

    let run = w.join(&good, "Bad Name", "bad-name");
    w.refused(
        "joining under an invalid name",
        &run,
        &format!(
            "error: joining the farm at {addr}: invalid name \"Bad Name\": names are 1 to 63 characters, start with \
             a lowercase letter or a digit, and continue with lowercase letters, digits, '.', '_' or '-'"
        ),
    );

    let run = w.join(&good, "coordinator", "reserved");
    w.refused(
        "joining under the coordinator's name",
        &run,
        &answered("cannot sign the certificate request: the name \"coordinator\" is reserved; choose another name"),
    );

    let run = w.join(&good, "admin", "impostor");
    w.refused(
        "joining under the admin's name",
        &run,
        &answered("cannot sign the certificate request: the name \"admin\" is reserved; choose another name"),
    );

    // The joiner says which role it wants, so the coordinator refuses before using the token up.
    let home = w.scratch("login-home");
    let run = w.cli_in(&home, &["login", "--token", &good, "--coordinator", &addr, "--name", "bob"]);
    let id = good.split('.').nth(2).unwrap();
    w.refused(
        "farm login with an agent token",
        &run,
        &answered(&format!("join token {id} makes an agent, not a client: use `farm agent join`")),
    );
}

// ---------------------------------------------------------------------------------------------
// 7. Revoked identities coming back.

fn revoked_identities(w: &mut World) {
    let addr = w.farm.addr.clone();

    // A running agent (it builds only linux/s390x, so it takes none of the test's builds).
    w.farm.agent("rogue", &["--native", "linux/s390x", "--emulated", "none"]);
    let run = w.farm_cli(&["agents", "revoke", "rogue"]);
    w.eq(
        "farm agents revoke says so",
        run.stdout.trim_end(),
        "rogue revoked: its connections are closed and it cannot connect or join again",
    );
    w.farm.wait_agent("rogue", "offline");
    let rogue = w.farm.agents.remove("rogue").unwrap();
    let kicked = format!(
        "session ended: connection to {addr} failed: closed by peer: the certificate of \"rogue\" was revoked (code 3)"
    );
    let line = rogue.wait_for_line(&[&kicked], Duration::from_secs(20));
    w.check("a revoked agent is told why its session ended", line.contains(&kicked), || line.clone());
    // It reconnects (with backoff), and is refused at the door each time.
    let refused =
        format!("session ended: connection to {addr} failed: closed by peer: this certificate was revoked (code 3)");
    let line = rogue.wait_for_line(&[&refused], Duration::from_secs(30));
    w.check("a revoked agent reconnecting is refused, saying why", line.contains(&refused), || line.clone());
    let line = w
        .farm
        .coordinator
        .wait_for_line(&["agent \"rogue\" refused: its certificate was revoked"], Duration::from_secs(30));
    w.check("the coordinator logs the refused reconnection", !line.is_empty(), || line.clone());
    let state = agent(&agents_json(&addr, &w.farm.ca), "rogue").map(|a| a["state"].clone());
    w.check("a revoked agent stays offline", state == Some("offline".into()), || format!("{state:?}"));
    drop(rogue);

    let run = w.farm_cli(&["agents", "revoke", "alice"]);
    w.check("farm agents revoke of a client succeeds", run.code == Some(0), || run.stderr.clone());
    let run = w.cli(&["builds", "--coordinator", &addr, "--ca-dir", w.farm.ca.path(), "--name", "alice"]);
    w.refused(
        "a revoked client",
        &run,
        &format!("error: connection to {addr} failed: closed by peer: this certificate was revoked (code 3)"),
    );
}

// ---------------------------------------------------------------------------------------------
// 8. Configuration files, flags of long-running processes, and the CA's own commands.

fn configuration_and_processes(w: &mut World) {
    let root = w.scratch("config");
    let ca = w.farm.ca.path().to_string();
    let state = root.join("state");
    let state = state.to_str().unwrap();

    let typo = root.join("typo.toml");
    std::fs::write(&typo, "heartbeat_timeout_secs = 10\nmax_platform_per_build = 2\n").unwrap();
    let run = w.cli(&["coordinator", "--config", typo.to_str().unwrap(), "--ca-dir", &ca, "--state-dir", state]);
    w.refused(
        "an unknown key in a config file",
        &run,
        &format!("error: invalid config file {}: TOML parse error at line 2, column 1", typo.display()),
    );
    let names = "unknown field `max_platform_per_build`, expected one of `coordinator`, `ca_dir`, `name`, `listen`,";
    w.check("the config error names the unknown key and the known ones", run.stderr.contains(names), || {
        run.stderr.clone()
    });

    let run = w.cli(&["coordinator", "--listen", "nope", "--ca-dir", &ca, "--state-dir", state]);
    w.refused(
        "--listen that is not an address",
        &run,
        "error: --listen \"nope\" is not an IP:PORT address (e.g. 0.0.0.0:3276): invalid socket address syntax",
    );

    let run = w.cli(&["coordinator", "--heartbeat-timeout", "0", "--ca-dir", &ca, "--state-dir", state]);
    w.refused(
        "a heartbeat timeout of zero",
        &run,
        "error: heartbeat timeout must be a positive number of seconds, got 0",
    );

    let taken = w.farm.addr.clone();
    let run = w.cli(&["coordinator", "--listen", &taken, "--ca-dir", &ca, "--state-dir", state]);
    w.refused(
        "--listen on the port of the running coordinator",
        &run,
        &format!("error: cannot start the coordinator: cannot bind UDP {taken}: Address already in use (os error 98)"),
    );

    let run = w.farm_cli(&["agents", "--coordinator", "nonsense"]);
    w.refused("a coordinator address without a port", &run, "error: invalid address \"nonsense\": expected HOST:PORT");

    let run = w.cli(&["ca", "issue", "--dir", &ca, "--role", "wizard", "--name", "merlin"]);
    w.refused(
        "farm ca issue --role wizard",
        &run,
        "error: unknown role \"wizard\": expected one of coordinator, agent, client, admin",
    );

    let run = w.cli(&["ca", "issue", "--dir", &ca, "--role", "agent", "--name", "Bad Name"]);
    w.refused(
        "farm ca issue --name \"Bad Name\"",
        &run,
        "error: invalid name \"Bad Name\": names are 1 to 63 characters, start with a lowercase letter or a digit, \
         and continue with lowercase letters, digits, '.', '_' or '-'",
    );

    let run = w.cli(&["ca", "issue", "--dir", &ca, "--role", "coordinator", "--name", "second"]);
    w.refused(
        "farm ca issue --role coordinator",
        &run,
        "error: role coordinator cannot be issued with `farm ca issue` (the coordinator's certificate is made by \
         `farm ca init`); use agent, client or admin",
    );
}

// ---------------------------------------------------------------------------------------------
// 9. Registries that cannot take the image: the build fails for that platform, saying why, and
//    no tag is pushed. The base image always comes from the live registry.

fn registries(w: &mut World) {
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let home = w.home.clone();
    let run = w.registry_build(&home, &dead, true);
    w.platform_failed(
        "registry unreachable",
        &run,
        &format!("pushing the image: registry {dead} unreachable: connection refused (is it running?)"),
    );

    let auth = AuthRegistry::start();
    let right = w.scratch("home-right");
    docker_config(&right, &auth.addr, "farmuser", "right-password");
    let run = w.registry_build(&right, &auth.addr, true);
    w.check("an authenticating registry takes the image with the right credentials", run.code == Some(0), || {
        format!("{}\n{}", run.stdout, run.stderr)
    });

    let wrong = w.scratch("home-wrong");
    docker_config(&wrong, &auth.addr, "farmuser", "wrong-password");
    let run = w.registry_build(&wrong, &auth.addr, true);
    w.platform_failed(
        "registry refusing credentials",
        &run,
        &format!(
            "pushing the image: registry {} refused the credentials for user \"farmuser\": check \
             ~/.docker/config.json or run docker login",
            auth.addr
        ),
    );

    let none = w.scratch("home-none");
    let run = w.registry_build(&none, &auth.addr, true);
    w.platform_failed(
        "registry requiring credentials none were given for",
        &run,
        &format!(
            "pushing the image: registry {a} requires credentials and none were found for it: add them to \
             ~/.docker/config.json (docker login {a})",
            a = auth.addr
        ),
    );

    let run = w.registry_build(&right, &auth.addr, false);
    w.platform_failed(
        "a plain-HTTP registry not named with --insecure-registry",
        &run,
        &format!(
            "pushing the image: registry {a} answered in plain HTTP, not HTTPS: name it with --insecure-registry {a}",
            a = auth.addr
        ),
    );
}

// ---------------------------------------------------------------------------------------------
// The world the cases share, and how they check.

/// One `farm` CLI run.
struct Run {
    /// `None` if it was killed at [`CLI_TIMEOUT`] or by a signal.
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    /// The line the CLI failed with: its last `error: ` line.
    fn error_line(&self) -> &str {
        self.stderr.lines().rev().find(|l| l.starts_with("error: ")).unwrap_or("")
    }

    fn failed(&self) -> bool {
        self.code.is_some_and(|c| c != 0)
    }

    fn tail(&self) -> String {
        let lines: Vec<&str> = self.stderr.lines().collect();
        let from = lines.len().saturating_sub(15);
        format!("exit {:?}; stderr ends:\n    {}", self.code, lines[from..].join("\n    "))
    }
}

struct World {
    farm: Farm,
    registry: Registry,
    base: String,
    /// HOME of the CLI runs: no ~/.config/farm, no ~/.docker of the machine's.
    home: PathBuf,
    /// The context of the normal builds; a stamp file changes before each.
    ok_ctx: PathBuf,
    builds: u32,
    /// The id of the last normal build.
    last_build: String,
    /// Every normal build's id and tag.
    normal: Vec<(String, String)>,
    admin: Credentials,
    rt: tokio::runtime::Runtime,
    results: Vec<(String, Result<(), String>)>,
}

impl World {
    fn new(farm: Farm, registry: Registry, base: String) -> World {
        let home = farm.tmp.path().join("home");
        std::fs::create_dir_all(&home).unwrap();
        let ok_ctx = farm.tmp.path().join("ok");
        std::fs::create_dir_all(&ok_ctx).unwrap();
        std::fs::write(ok_ctx.join("Dockerfile"), "ARG BASE\nFROM ${BASE}\nCOPY stamp /stamp\nRUN cat /stamp\n")
            .unwrap();
        let admin = shared::tls::load_credentials(&farm.ca.dir, "admin").unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        World {
            farm,
            registry,
            base,
            home,
            ok_ctx,
            builds: 0,
            last_build: String::new(),
            normal: Vec::new(),
            admin,
            rt,
            results: Vec::new(),
        }
    }

    /// A fresh directory under the farm's temporary directory.
    fn scratch(&self, name: &str) -> PathBuf {
        let dir = self.farm.tmp.path().join("cases").join(name);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// A context directory `root/name` holding a Dockerfile.
    fn context(&self, root: &Path, name: &str, dockerfile: &str) -> PathBuf {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("Dockerfile"), dockerfile).unwrap();
        dir
    }

    // --- recording ---------------------------------------------------------------------------

    fn check(&mut self, case: &str, ok: bool, detail: impl FnOnce() -> String) {
        assert!(!self.results.iter().any(|(c, _)| c == case), "two cases named {case:?}");
        let result = if ok { Ok(()) } else { Err(detail()) };
        eprintln!("{} {case}", if ok { "ok  " } else { "FAIL" });
        self.results.push((case.to_string(), result));
    }

    fn eq(&mut self, case: &str, got: &str, want: &str) {
        self.check(case, got == want, || format!("expected\n    {want}\ngot\n    {got}"));
    }

    /// The CLI failed, and its `error:` line is exactly `want`.
    fn refused(&mut self, case: &str, run: &Run, want: &str) {
        let ok = run.failed() && run.error_line() == want;
        self.check(case, ok, || format!("expected the CLI to fail with\n    {want}\ngot {}", run.tail()));
    }

    /// The CLI failed, and `want` is all it printed on stderr.
    fn only_error(&mut self, case: &str, run: &Run, want: &str) {
        let ok = run.failed() && run.stderr.trim_end() == want;
        self.check(case, ok, || format!("expected the CLI to fail printing only\n    {want}\ngot {}", run.tail()));
    }

    /// The CLI failed with `prefix` + a number + `suffix` as its `error:` line.
    fn refused_number(&mut self, case: &str, run: &Run, prefix: &str, suffix: &str) {
        let line = run.error_line();
        let number = line.strip_prefix(prefix).and_then(|rest| rest.strip_suffix(suffix));
        let ok = run.failed() && number.is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
        self.check(case, ok, || format!("expected the CLI to fail with\n    {prefix}<N>{suffix}\ngot {}", run.tail()));
    }

    /// The build failed because linux/amd64 failed with `error`: the CLI said so on its own line,
    /// and its `error:` line gives the build's id, that reason and that no tag was pushed.
    fn platform_failed(&mut self, case: &str, run: &Run, error: &str) {
        let id = build_id(run).unwrap_or_default();
        let platform = format!("linux/amd64 failed: {error}");
        let want = format!("error: build {id} failed: {platform}; no tag was pushed");
        let ok =
            run.failed() && !id.is_empty() && run.stderr.lines().any(|l| l == platform) && run.error_line() == want;
        self.check(case, ok, || format!("expected the lines\n    {platform}\n    {want}\ngot {}", run.tail()));
    }

    /// How much work the farm has taken on so far: contexts received, builds accepted, tasks assigned.
    fn work_done(&self) -> usize {
        let count = |log: String, what: &str| log.lines().filter(|l| l.contains(what)).count();
        let coordinator = self.farm.coordinator.log();
        count(coordinator.clone(), "context files received")
            + count(coordinator, "build accepted")
            + self.farm.agents.values().map(|a| count(a.log(), "task assigned")).sum::<usize>()
    }

    /// Nothing was uploaded, accepted or built since `before` (from [`World::work_done`]).
    fn nothing_done_since(&mut self, case: &str, before: usize) {
        let now = self.work_done();
        self.check(&format!("{case}: nothing uploaded or built"), now == before, || format!("{before} -> {now}"));
    }

    fn client_args(&self) -> Vec<&str> {
        vec!["--coordinator", &self.farm.addr, "--ca-dir", self.farm.ca.path(), "--name", "admin"]
    }

    /// Every normal build is still listed as succeeded, and every tag it pushed is still there.
    fn nothing_accepted_was_lost(&mut self) {
        let builds = self.farm.builds();
        let tags = self.registry.tags("ok");
        let lost: Vec<String> = self
            .normal
            .iter()
            .filter(|(id, tag)| {
                let listed =
                    builds.as_array().unwrap().iter().any(|b| b["id"] == id.as_str() && b["state"] == "succeeded");
                !listed || !tags.contains(tag)
            })
            .map(|(id, tag)| format!("build {id:?} (ok:{tag})"))
            .collect();
        self.check("every normal build is still listed as succeeded and its tag still there", lost.is_empty(), || {
            format!("lost: {lost:?}\nfarm builds: {builds}\ntags: {tags:?}")
        });
    }

    fn finish(self, started: Instant) {
        let failed: Vec<&(String, Result<(), String>)> = self.results.iter().filter(|(_, r)| r.is_err()).collect();
        let normal = |c: &str| c.starts_with("a normal build succeeds") || c.starts_with("every normal build");
        let cases = self.results.iter().filter(|(c, _)| !normal(c)).count();
        let builds = self.results.len() - cases;
        eprintln!(
            "{cases} bad-input checks and {builds} normal-build checks in {:.0?}: {} failed",
            started.elapsed(),
            failed.len()
        );
        assert!(cases >= 25, "only {cases} distinct bad-input checks");
        let report: Vec<String> = failed
            .iter()
            .map(|(c, r)| format!("- {c}:\n  {}", r.as_ref().unwrap_err().replace('\n', "\n  ")))
            .collect();
        assert!(failed.is_empty(), "{} of {} checks failed:\n{}", failed.len(), self.results.len(), report.join("\n"));
    }

    // --- the CLI -------------------------------------------------------------------------------

    /// `farm ARGS` with the test's HOME and no FARM_* environment.
    fn cli(&self, args: &[&str]) -> Run {
        self.cli_in(&self.home, args)
    }

    fn cli_in(&self, home: &Path, args: &[&str]) -> Run {
        let mut out = tempfile::tempfile().unwrap();
        let mut err = tempfile::tempfile().unwrap();
        let mut cmd = Command::new(farm_bin());
        cmd.args(args).env("HOME", home).env("FARM_LOG", "warn").env("NO_COLOR", "1");
        for v in FARM_ENV {
            cmd.env_remove(v);
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(err.try_clone().unwrap())
            .spawn()
            .expect("run farm");
        let code = match poll_until(CLI_TIMEOUT, || child.try_wait().unwrap()) {
            Some(status) => status.code(),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                None
            }
        };
        let read = |f: &mut std::fs::File| {
            let mut s = String::new();
            f.rewind().unwrap();
            f.read_to_string(&mut s).unwrap();
            s
        };
        Run { code, stdout: read(&mut out), stderr: read(&mut err) }
    }

    /// `farm ARGS` as this farm's admin.
    fn farm_cli(&self, args: &[&str]) -> Run {
        let mut all: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        // Flags given by the case come first; clap refuses a flag given twice, so only missing ones
        // are added.
        for pair in self.farm.client_args().chunks(2) {
            if !args.contains(&pair[0].as_str()) {
                all.extend(pair.iter().cloned());
            }
        }
        self.cli(&all.iter().map(String::as_str).collect::<Vec<_>>())
    }

    /// `farm build --progress plain` as the admin, base image from the live registry.
    fn build(&self, extra: &[&str], ctx: &Path) -> Run {
        self.build_in(&self.home, extra, ctx)
    }

    fn build_in(&self, home: &Path, extra: &[&str], ctx: &Path) -> Run {
        let base = format!("BASE={}", self.base);
        let mut args =
            vec!["build", "--progress", "plain", "--insecure-registry", &self.registry.addr, "--build-arg", &base];
        args.extend(extra);
        args.push(ctx.to_str().unwrap());
        let mut all: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        all.splice(1..1, self.farm.client_args());
        self.cli_in(home, &all.iter().map(String::as_str).collect::<Vec<_>>())
    }

    /// A one-platform build of a fresh context tagged on `registry` (named insecure or not).
    fn registry_build(&mut self, home: &Path, registry: &str, insecure: bool) -> Run {
        self.builds += 1;
        std::fs::write(self.ok_ctx.join("stamp"), format!("registry case {}\n", self.builds)).unwrap();
        let tag = format!("{registry}/pushed:{}", self.builds);
        let mut extra = vec!["--platform", "linux/amd64", "-t", &tag];
        if insecure {
            extra.extend(["--insecure-registry", registry]);
        }
        let ctx = self.ok_ctx.clone();
        self.build_in(home, &extra, &ctx)
    }

    /// A normal one-platform build that must succeed, built by the agent (not a cached result) and
    /// pushed under its tag.
    fn normal_build(&mut self, after: &str) {
        self.builds += 1;
        let n = self.builds;
        std::fs::write(self.ok_ctx.join("stamp"), format!("normal build {n}\n")).unwrap();
        let tag = format!("{}/ok:{n}", self.registry.addr);
        let ctx = self.ok_ctx.clone();
        let run = self.build(&["--platform", "linux/amd64", "-t", &tag], &ctx);
        let row = summary(&run.stdout).get("linux/amd64").cloned();
        let pushed = self.registry.tags("ok").contains(&n.to_string());
        let ok = run.code == Some(0) && row == Some(("x86".into(), "native".into())) && pushed;
        self.last_build = build_id(&run).unwrap_or_default();
        self.normal.push((self.last_build.clone(), n.to_string()));
        self.check(&format!("a normal build succeeds after {after}"), ok, || {
            format!("row {row:?}, tag pushed: {pushed}\n{}\n{}", run.stdout, run.tail())
        });
    }

    /// `farm agent join` with `token` as `name`, storing the identity in a directory of its own.
    fn join(&self, token: &str, name: &str, dir: &str) -> Run {
        let dir = self.scratch("joins").join(dir);
        let addr = &self.farm.addr;
        self.cli(&join_args(token, addr, name, &dir))
    }

    /// A join token made by the admin.
    fn token(&self, role: &str, extra: &[&str]) -> String {
        let mut args = vec!["token", "create", "--role", role];
        args.extend(extra);
        let run = self.farm_cli(&args);
        assert_eq!(run.code, Some(0), "farm token create: {}", run.tail());
        run.stdout.trim().to_string()
    }

    // --- in-process peers ----------------------------------------------------------------------

    /// One request on a fresh connection with `creds`; the error as the CLI would print it, or
    /// the answer.
    fn request_with(&self, creds: &Credentials, req: Request) -> String {
        self.rt.block_on(async {
            let client = Client::connect(&self.farm.addr, creds, &TransportLimits::default(), DEFAULT_MAX_FRAME)
                .await
                .expect("connect as an in-process client");
            let r = client.request(&req).await;
            client.close();
            outcome(r)
        })
    }

    fn request_as(&self, name: &str, req: Request) -> String {
        let creds = shared::tls::load_credentials(&self.farm.ca.dir, name).unwrap();
        self.request_with(&creds, req)
    }

    /// Offers a context manifest as the admin, as the CLI does (the manifest as a blob, then by
    /// digest); the refusal as the CLI would print it.
    fn admin_offer(&self, entries: Vec<Entry>) -> String {
        self.rt.block_on(async {
            let client = Client::connect(&self.farm.addr, &self.admin, &TransportLimits::default(), DEFAULT_MAX_FRAME)
                .await
                .expect("connect as an in-process client");
            let r = client.offer_context(&ContextManifest { entries }).await.map(Response::Missing);
            client.close();
            outcome(r)
        })
    }

    /// Submits `spec` as the admin; the refusal as the CLI would print it.
    fn admin_build(&self, spec: BuildSpec) -> String {
        self.rt.block_on(async {
            let client = Client::connect(&self.farm.addr, &self.admin, &TransportLimits::default(), DEFAULT_MAX_FRAME)
                .await
                .expect("connect as an in-process client");
            let r = client.build(spec).await.map(|f| Response::Accepted { build: f.build });
            client.close();
            outcome(r)
        })
    }

    /// On one admin connection: `raw` bytes as a request stream, then an Echo on the next stream.
    /// Returns both answers.
    fn raw_then_echo(&self, raw: &[u8]) -> (String, String) {
        self.rt.block_on(async {
            let (_endpoint, conn) = shared::quic::connect(&self.farm.addr, &self.admin, &TransportLimits::default())
                .await
                .expect("connect as an in-process client");
            let (mut first, _) = handshake(&conn, DEFAULT_MAX_FRAME).await.expect("hello");
            let _ = first.finish();
            let (send, recv) = conn.open_bi().await.expect("a request stream");
            let answer = exchange(send, recv, raw).await;
            let echo = encode(&Request::Echo("still here".into()), DEFAULT_MAX_FRAME).unwrap();
            let (send, recv) = conn.open_bi().await.expect("a second request stream");
            let again = exchange(send, recv, &echo).await;
            conn.close(0u32.into(), b"done");
            (answer, again)
        })
    }

    /// Sends `hello` as the admin's first message; the coordinator's reply.
    fn hello(&self, hello: Hello) -> String {
        self.rt.block_on(async {
            let (_endpoint, conn) = shared::quic::connect(&self.farm.addr, &self.admin, &TransportLimits::default())
                .await
                .expect("connect as an in-process client");
            let (mut send, mut recv) = conn.open_bi().await.expect("the first stream");
            write_msg(&mut send, &hello, DEFAULT_MAX_FRAME).await.expect("send the hello");
            let got = match expect_msg::<HelloReply, _>(&mut recv, DEFAULT_MAX_FRAME, "a hello reply").await {
                Ok(r) if r.accepted => format!("accepted: {r:?}"),
                Ok(r) => format!("refused: {}", r.message),
                Err(e) => format!("no reply: {e} (connection: {:?})", conn.close_reason()),
            };
            conn.close(0u32.into(), b"done");
            got
        })
    }

    /// As agent `name`: registers on its control stream (native linux/s390x only), then sends
    /// `req` on a request stream; the answer.
    fn registered_agent_request(&self, name: &str, req: Request) -> String {
        let creds = shared::tls::load_credentials(&self.farm.ca.dir, name).unwrap();
        let info = AgentInfo {
            native: vec!["linux/s390x".parse().unwrap()],
            emulated: vec![],
            labels: Default::default(),
            capacity: 1,
            builder: "bad-input double".into(),
            builder_version: "0".into(),
            farm_version: shared::FARM_VERSION.into(),
            memory_limit: None,
            allowed: vec![],
        };
        self.rt.block_on(async {
            let (_endpoint, conn) = shared::quic::connect(&self.farm.addr, &creds, &TransportLimits::default())
                .await
                .expect("connect as an in-process agent");
            let (mut send, mut recv) = handshake(&conn, DEFAULT_MAX_FRAME).await.expect("hello");
            write_msg(&mut send, &AgentMsg::Register(info), DEFAULT_MAX_FRAME).await.expect("register");
            match expect_msg::<CoordMsg, _>(&mut recv, DEFAULT_MAX_FRAME, "a registration answer").await {
                Ok(CoordMsg::Registered { .. }) => {}
                other => panic!("the double's registration was answered with {other:?}"),
            }
            let (s, r) = conn.open_bi().await.expect("a request stream");
            let got = exchange(s, r, &encode(&req, DEFAULT_MAX_FRAME).unwrap()).await;
            conn.close(0u32.into(), b"done");
            got
        })
    }

    /// A peer without a certificate (as a joiner connects) sending `req` after the hello.
    fn joiner_request(&self, req: Request) -> String {
        let ca_sha256 = shared::digest::sha256_hex(self.admin.ca.as_ref());
        self.rt.block_on(async {
            let (_endpoint, conn) =
                shared::quic::connect_to_join(&self.farm.addr, &ca_sha256, &TransportLimits::default())
                    .await
                    .expect("connect without a certificate");
            let (mut first, _) = handshake(&conn, DEFAULT_MAX_FRAME).await.expect("hello");
            let _ = first.finish();
            let (s, r) = conn.open_bi().await.expect("a request stream");
            let got = exchange(s, r, &encode(&req, DEFAULT_MAX_FRAME).unwrap()).await;
            conn.close(0u32.into(), b"done");
            got
        })
    }
}

/// Writes `bytes` on a request stream, ends it, and reads the one answer: an error's text, any
/// other answer's Debug form, or why there was none.
async fn exchange<W: AsyncWrite + Unpin, R: AsyncRead + Unpin>(mut send: W, mut recv: R, bytes: &[u8]) -> String {
    if let Err(e) = send.write_all(bytes).await {
        return format!("cannot send: {e}");
    }
    let _ = send.shutdown().await;
    match expect_msg::<Response, _>(&mut recv, DEFAULT_MAX_FRAME, "an answer").await {
        Ok(Response::Error(message)) => message,
        Ok(other) => format!("{other:?}"),
        Err(e) => format!("no answer: {e}"),
    }
}

fn outcome(r: Result<Response, ClientError>) -> String {
    match r {
        Ok(resp) => format!("(no error) {resp:?}"),
        Err(e) => e.to_string(),
    }
}

fn file(path: &str) -> Entry {
    Entry { path: path.into(), mode: 0o644, kind: EntryKind::File { size: 5, digest: Digest::of(b"root\n") } }
}

fn link(path: &str, target: &str) -> Entry {
    Entry { path: path.into(), mode: 0o777, kind: EntryKind::Symlink { target: target.into() } }
}

fn spec(registry: &str, context: Digest) -> BuildSpec {
    BuildSpec {
        platforms: vec!["linux/amd64".parse().unwrap()],
        tags: vec![format!("{registry}/never:1")],
        dockerfile: "Dockerfile".into(),
        build_args: vec![],
        target: None,
        no_cache: false,
        emulation: Emulation::Fallback,
        require: Default::default(),
        context,
        insecure_registries: vec![registry.to_string()],
        credentials: None,
        secrets: vec![],
        entitlements: vec![],
        annotations: vec![],
        labels: vec![],
        ssh: vec![],
        inputs: Default::default(),
        notify: vec![],
        sign: false,
        provenance: Default::default(),
        cache_to: None,
        cache_from: vec![],
    }
}

/// The id in "build ID accepted".
fn build_id(run: &Run) -> Option<String> {
    run.stderr.lines().find_map(|l| l.strip_prefix("build ")?.strip_suffix(" accepted").map(String::from))
}

/// The id of a join token (its third part).
fn token_id(token: &str) -> String {
    token.split('.').nth(2).unwrap_or_default().to_string()
}

/// `HOME/.docker/config.json` with `user:password` for `registry`.
fn docker_config(home: &Path, registry: &str, user: &str, password: &str) {
    std::fs::create_dir_all(home.join(".docker")).unwrap();
    let auth = base64(&format!("{user}:{password}"));
    let text = format!(r#"{{"auths":{{"{registry}":{{"auth":"{auth}"}}}}}}"#);
    std::fs::write(home.join(".docker/config.json"), text).unwrap();
}

fn base64(s: &str) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in s.as_bytes().chunks(3) {
        let n = ((c[0] as u32) << 16) | ((*c.get(1).unwrap_or(&0) as u32) << 8) | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            out.push(if i <= c.len() { T[((n >> (18 - 6 * i)) & 63) as usize] as char } else { '=' });
        }
    }
    out
}

/// A docker-registry on a free loopback port that wants basic auth (htpasswd): user `farmuser`,
/// password `right-password`.
struct AuthRegistry {
    addr: String,
    _proc: Proc,
    _dir: tempfile::TempDir,
}

impl AuthRegistry {
    fn start() -> AuthRegistry {
        require_tool("docker-registry");
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let addr = format!("127.0.0.1:{port}");
        let htpasswd = dir.path().join("htpasswd");
        std::fs::write(&htpasswd, HTPASSWD).unwrap();
        let config = dir.path().join("config.yml");
        let mut f = std::fs::File::create(&config).unwrap();
        write!(
            f,
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n\
             auth:\n  htpasswd:\n    realm: farm-test\n    path: {}\n",
            dir.path().join("data").display(),
            htpasswd.display()
        )
        .unwrap();
        let mut cmd = Command::new("docker-registry");
        cmd.arg("serve").arg(&config);
        let proc = Proc::spawn("auth registry", &mut cmd);
        wait_until("the authenticating registry to answer 401", Duration::from_secs(20), || {
            (http_status(&addr, "/v2/") == Some(401)).then_some(())
        });
        AuthRegistry { addr, _proc: proc, _dir: dir }
    }
}

/// The status of a plain HTTP/1.0 GET on loopback.
fn http_status(addr: &str, path: &str) -> Option<u16> {
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    text.split_whitespace().nth(1)?.parse().ok()
}
