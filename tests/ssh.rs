//! End to end, `--ssh`: a RUN with `--mount=type=ssh` reaches the user's ssh-agent (and, with
//! `ID=KEYFILE`, a private agent the CLI starts for the build) through agent, coordinator and
//! client; the private keys appear in no layer, log or state file.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::registry::{read_image, Registry};
use common::*;

/// Every file under `dir` (not following symlinks) that contains `needle`.
fn files_containing(dir: &Path, needle: &str) -> Vec<String> {
    let out = Command::new("grep").args(["-rlaF", "--no-messages"]).arg(needle).arg(dir).output().unwrap();
    String::from_utf8_lossy(&out.stdout).lines().map(String::from).collect()
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    let (so, se) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{cmd:?} failed:\n{so}\n{se}");
    so.into_owned()
}

/// A new ed25519 key without a passphrase; returns its path and its fingerprint (`SHA256:...`).
fn keygen(dir: &Path, name: &str) -> (PathBuf, String) {
    let key = dir.join(name);
    run_ok(Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"]).arg(&key));
    let listed = run_ok(Command::new("ssh-keygen").arg("-lf").arg(&key));
    (key, listed.split_whitespace().nth(1).unwrap().to_string())
}

/// The lines of a private key file's body: what must never leave this machine.
fn key_lines(key: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(key).unwrap();
    let lines: Vec<String> = text.lines().filter(|l| !l.starts_with("-----")).map(String::from).collect();
    assert!(lines.len() >= 3, "{text}");
    lines
}

/// `ssh-add` and the shared libraries `ldd` lists (with the dynamic loader) copied into `dir`,
/// so a busybox RUN can speak to an ssh-agent socket.
fn ship_ssh_add(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::copy("/usr/bin/ssh-add", dir.join("ssh-add")).unwrap();
    let ldd = run_ok(Command::new("ldd").arg("/usr/bin/ssh-add"));
    for lib in ldd.split_whitespace().filter(|w| w.starts_with('/')) {
        let name = Path::new(lib).file_name().unwrap();
        std::fs::copy(lib, dir.join(name)).unwrap();
    }
    assert!(dir.join("ld-linux-x86-64.so.2").exists(), "ldd named no loader: {ldd}");
}

#[test]
fn a_run_reaches_the_users_ssh_agent_and_a_key_file_and_no_key_is_written_anywhere() {
    for tool in ["ssh-agent", "ssh-add", "ssh-keygen", "ldd"] {
        require_tool(tool);
    }
    let registry = Registry::start();
    let base = registry.seed_busybox();
    let mut farm = Farm::start(3);
    farm.agent("x86", &[]);
    let tmp = farm.tmp.path().to_path_buf();

    // The user's own agent, holding one key; a second key is only a file.
    let keys = tmp.join("keys");
    std::fs::create_dir_all(&keys).unwrap();
    let (agent_key, agent_fp) = keygen(&keys, "in-agent");
    let (file_key, file_fp) = keygen(&keys, "in-file");
    let sock = tmp.join("agent.sock");
    let _ssh_agent = Proc::spawn("ssh-agent", Command::new("ssh-agent").arg("-D").arg("-a").arg(&sock));
    wait_until("the ssh-agent's socket", Duration::from_secs(10), || sock.exists().then_some(()));
    run_ok(Command::new("ssh-add").arg(&agent_key).env("SSH_AUTH_SOCK", &sock));

    let ctx = tmp.join("ctx");
    ship_ssh_add(&ctx.join("tools"));
    let list = "/tools/ld-linux-x86-64.so.2 --library-path /tools /tools/ssh-add -l";
    std::fs::write(
        ctx.join("Dockerfile"),
        format!(
            "ARG BASE\nFROM ${{BASE}}\n\
             RUN --mount=type=ssh --mount=type=bind,source=tools,target=/tools {list} > /keys\n\
             RUN --mount=type=ssh,id=deploy --mount=type=bind,source=tools,target=/tools {list} > /deploy-keys\n"
        ),
    )
    .unwrap();
    let cli_tmp = tmp.join("cli-tmp");
    std::fs::create_dir_all(&cli_tmp).unwrap();
    let tag = format!("{}/ssh:1", registry.addr);
    let mut args = vec!["build".to_string(), "--progress".into(), "plain".into()];
    args.extend(farm.client_args());
    args.extend(["--ssh".into(), "default".into(), "--ssh".into(), format!("deploy={}", file_key.display())]);
    args.extend(registry.build_flags(&base, "linux/amd64", "ssh:1", &ctx));
    let out = Command::new(farm_bin())
        .args(&args)
        .env("SSH_AUTH_SOCK", &sock)
        .env("TMPDIR", &cli_tmp)
        .env("FARM_LOG", "warn")
        .output()
        .unwrap();
    let (so, se) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{so}\n{se}\nagent:\n{}", farm.agents["x86"].log());

    // Each RUN listed the key of its id, and only that one.
    let (_, _, images) = read_image(&registry, &tag);
    assert_eq!(images.len(), 1);
    let image = &images[0];
    let listed = image.text("keys");
    assert!(listed.contains(&agent_fp) && listed.contains("in-agent"), "/keys: {listed:?}, want {agent_fp}");
    assert_eq!(listed.lines().count(), 1, "{listed}");
    let deployed = image.text("deploy-keys");
    assert!(deployed.contains(&file_fp), "/deploy-keys: {deployed:?}, want {file_fp}");
    assert_eq!(deployed.lines().count(), 1, "{deployed}");
    assert!(!image.files.keys().any(|p| p.starts_with("tools/")), "the bind mount left files in a layer");

    // No private key's bytes in a layer, a registry blob, a log, or a state or work directory.
    let logs = [so.to_string(), se.to_string(), farm.coordinator.log(), farm.agents["x86"].log()];
    for key in [&agent_key, &file_key] {
        for line in key_lines(key) {
            for (path, bytes) in &image.files {
                assert!(!bytes.windows(line.len()).any(|w| w == line.as_bytes()), "key in layer file {path}");
            }
            assert!(!logs.iter().any(|l| l.contains(&line)), "key in a log");
            for dir in [tmp.join("coordinator"), tmp.join("agent-x86"), registry.data_dir(), cli_tmp.clone()] {
                let found = files_containing(&dir, &line);
                assert!(found.is_empty(), "key found in {found:?}");
            }
        }
    }
    // Nobody else may open the build's forwards: an agent that runs no task of it, or a client.
    let id = farm.builds()[0]["id"].as_str().unwrap().to_string();
    farm.ca.issue("agent", "intruder");
    let forward = shared::proto::Request::SshForward { build: id.clone(), id: "default".into() };
    for (who, refusal) in [
        (
            "intruder",
            format!("agent intruder runs no task of build {id}: only the agents building it may use its --ssh"),
        ),
        ("admin", "admin \"admin\" may not open ssh forwards (agents only, for the builds they run)".to_string()),
    ] {
        let e = ask(&farm, who, &forward).unwrap_err();
        assert!(e.ends_with(&refusal), "{who}: {e}");
    }
    // The task's sockets and the CLI's private agent are gone.
    let sockets: Vec<_> = walk(&tmp.join("agent-x86")).into_iter().filter(|p| p.ends_with("ssh")).collect();
    assert!(sockets.is_empty(), "ssh socket directories left: {sockets:?}");
    let left: Vec<_> = std::fs::read_dir(&cli_tmp).unwrap().filter_map(Result::ok).map(|e| e.path()).collect();
    assert!(left.is_empty(), "the CLI's private ssh-agent left {left:?}");
}

/// One request as identity `name` of the farm; the coordinator's answer or its refusal.
fn ask(farm: &Farm, name: &str, req: &shared::proto::Request) -> Result<shared::proto::Response, String> {
    let creds = shared::tls::load_credentials(Path::new(farm.ca.path()), name).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let client = shared::client::Client::connect(&farm.addr, &creds, &Default::default(), 1 << 20).await.unwrap();
        let r = client.request(req).await.map_err(|e| e.to_string());
        client.finish().await;
        r
    })
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().filter_map(Result::ok) {
        let p = e.path();
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            out.extend(walk(&p));
            out.push(p);
        }
    }
    out
}

#[test]
fn bad_ssh_flags_are_refused_before_anything_is_sent() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("Dockerfile"), "FROM scratch\n").unwrap();
    let ctx = tmp.path().to_str().unwrap().to_string();
    // Nothing answers at this coordinator: a refusal that mentions no connection came first.
    let nowhere = format!("127.0.0.1:{}", free_udp_port());
    let refuse = |ssh: &[&str], auth_sock: Option<&Path>| {
        let mut cmd = Command::new(farm_bin());
        cmd.args(["build", "--coordinator", &nowhere, "--platform", "linux/amd64", "--push", "-t", "127.0.0.1:1/x:1"])
            .args(ssh)
            .arg(&ctx)
            .env_remove("SSH_AUTH_SOCK")
            .env("FARM_LOG", "warn");
        if let Some(s) = auth_sock {
            cmd.env("SSH_AUTH_SOCK", s);
        }
        let out = cmd.output().unwrap();
        assert!(!out.status.success());
        let e = String::from_utf8_lossy(&out.stderr).trim().to_string();
        assert!(!e.contains(&nowhere), "refused only after trying the coordinator: {e}");
        e
    };
    let e = refuse(&["--ssh", "default"], None);
    assert!(
        e.contains("--ssh default: SSH_AUTH_SOCK is not set, so there is no ssh-agent to forward; start one"),
        "{e}"
    );
    let gone = tmp.path().join("gone.sock");
    let e = refuse(&["--ssh", "default"], Some(&gone));
    assert!(e.contains(&format!("--ssh default: {} does not exist: is the ssh-agent running?", gone.display())), "{e}");
    let e = refuse(&["--ssh", &format!("git={}", gone.display())], None);
    assert!(
        e.contains(&format!(
            "--ssh git: {} does not exist: name an ssh-agent socket or a private key file",
            gone.display()
        )),
        "{e}"
    );
    require_tool("ssh-agent");
    let not_a_key = tmp.path().join("Dockerfile");
    let e = refuse(&["--ssh", &format!("deploy={}", not_a_key.display())], None);
    let k = not_a_key.display();
    let (start, end) = (
        format!("--ssh deploy: {k} is not a private key farm can load ("),
        format!(
            "name a private key without a passphrase, or add a key with one to your own agent (`ssh-add {k}`) and \
             pass --ssh ID=$SSH_AUTH_SOCK"
        ),
    );
    assert!(e.contains(&start) && e.ends_with(&end), "{e}");
    let e = refuse(&["--ssh", "default", "--wait=false"], None);
    assert!(e.contains("--ssh needs the command to follow the build"), "{e}");
    let e = refuse(&["--ssh", "a b"], None);
    assert!(e.contains("--ssh \"a b\": expected default, ID, ID=SOCKET or ID=KEYFILE"), "{e}");
}

#[test]
fn the_embedded_farm_forwards_ssh_too() {
    for tool in ["ssh-agent", "ssh-add", "ssh-keygen", "ldd"] {
        require_tool(tool);
    }
    let registry = Registry::start();
    let base = registry.seed_busybox();
    let home = tempfile::tempdir().unwrap();
    let keys = tempfile::tempdir().unwrap();
    let (key, fp) = keygen(keys.path(), "embedded");
    let ctx = home.path().join("ctx");
    ship_ssh_add(&ctx.join("tools"));
    std::fs::write(
        ctx.join("Dockerfile"),
        "ARG BASE\nFROM ${BASE}\nRUN --mount=type=ssh,id=k --mount=type=bind,source=tools,target=/tools \
         /tools/ld-linux-x86-64.so.2 --library-path /tools /tools/ssh-add -l > /keys\n",
    )
    .unwrap();
    let dest = home.path().join("out");
    let out = Command::new(farm_bin())
        .args(["build", "--embedded", "--progress", "plain", "--platform", "linux/amd64"])
        .args(["--insecure-registry", &registry.addr, "--build-arg", &format!("BASE={base}")])
        .args(["--ssh", &format!("k={}", key.display()), "-o", &format!("type=local,dest={}", dest.display())])
        .arg(&ctx)
        .env("HOME", home.path())
        .env_remove("XDG_CONFIG_HOME")
        .env_remove("XDG_STATE_HOME")
        .env_remove("FARM_COORDINATOR")
        .env_remove("SSH_AUTH_SOCK")
        .env("FARM_LOG", "warn")
        .output()
        .unwrap();
    let (so, se) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{so}\n{se}");
    let listed = std::fs::read_to_string(dest.join("keys")).unwrap();
    assert!(listed.contains(&fp), "/keys: {listed:?}, want {fp}");
    for line in key_lines(&key) {
        assert!(!so.contains(&line) && !se.contains(&line), "key in the output");
        let found = files_containing(home.path(), &line);
        assert!(found.is_empty(), "key found in {found:?}");
    }
}

#[test]
fn a_docker_agent_forwards_ssh_with_the_engines_buildkit() {
    for tool in ["ssh-agent", "ssh-add", "ssh-keygen", "ldd"] {
        require_tool(tool);
    }
    let registry = Registry::start();
    let base = registry.seed_busybox();
    let engine = common::docker::Engine::start();
    let mut farm = Farm::start(3);
    farm.agent("dock", &["--builder", "docker", "--docker-host", &engine.host]);
    let tmp = farm.tmp.path().to_path_buf();
    let (key, fp) = keygen(&tmp, "docker-key");
    let ctx = tmp.join("ctx");
    ship_ssh_add(&ctx.join("tools"));
    std::fs::write(
        ctx.join("Dockerfile"),
        "ARG BASE\nFROM ${BASE}\nRUN --mount=type=ssh --mount=type=bind,source=tools,target=/tools \
         /tools/ld-linux-x86-64.so.2 --library-path /tools /tools/ssh-add -l > /keys\n",
    )
    .unwrap();
    let mut args = farm.client_args();
    args.extend(["--ssh".into(), format!("default={}", key.display())]);
    args.extend(registry.build_flags(&base, "linux/amd64", "ssh-docker:1", &ctx));
    let (ok, so, se) = build(&args);
    assert!(ok, "{so}\n{se}\n{}", farm.agents["dock"].log());
    let (_, _, images) = read_image(&registry, &format!("{}/ssh-docker:1", registry.addr));
    let listed = images[0].text("keys");
    assert!(listed.contains(&fp), "/keys: {listed:?}, want {fp}");
    for line in key_lines(&key) {
        assert!(![&so, &se, &farm.agents["dock"].log()].iter().any(|l| l.contains(&line)), "key in a log");
        for dir in [tmp.join("agent-dock"), engine.dir.path().join("data"), registry.data_dir()] {
            let found = files_containing(&dir, &line);
            assert!(found.is_empty(), "key found in {found:?}");
        }
    }
}
