//! End to end: a build cannot touch another build or its agent. Two clients' builds run at once on
//! one agent (capacity 2); the first one's RUN attacks the second through /proc, the host's
//! loopback and its capabilities, and records what it saw in its own image; the second's image
//! and log show no trace of it. Host networking only when asked for and allowed.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::netns::Netns;
use common::registry::{read_image, Registry};
use common::*;

const HOST_BUSYBOX: &str = "/var/cache/farm-test/busybox/amd64/busybox";
// busybox-static's `wget -T` crashes (Debian 12): `timeout N wget` bounds it instead.
const BUILD_TIMEOUT: Duration = Duration::from_secs(240);

fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `busybox httpd` serving `dir` on `addr`, in namespace `ns` if given.
fn httpd(name: &str, ns: Option<&Netns>, addr: &str, dir: &Path) -> Proc {
    let mut cmd = match ns {
        Some(ns) => ns.command(HOST_BUSYBOX),
        None => Command::new(HOST_BUSYBOX),
    };
    cmd.args(["httpd", "-f", "-p", addr, "-h"]).arg(dir);
    let p = Proc::spawn(name, &mut cmd);
    // Answers once it listens.
    let probe = dir.join("probe");
    std::fs::write(&probe, "up").unwrap();
    wait_until(&format!("{name} to listen on {addr}"), Duration::from_secs(10), || {
        let mut c = ns.map(|ns| ns.command(HOST_BUSYBOX)).unwrap_or_else(|| Command::new(HOST_BUSYBOX));
        let out = c
            .args(["timeout", "2", HOST_BUSYBOX, "wget", "-q", "-O", "-", &format!("http://{addr}/probe")])
            .output()
            .unwrap();
        (String::from_utf8_lossy(&out.stdout) == "up").then_some(())
    });
    p
}

fn client_args(farm: &Farm, name: &str) -> Vec<String> {
    ["--coordinator", &farm.addr, "--ca-dir", farm.ca.path(), "--name", name].map(String::from).to_vec()
}

fn write(dir: &Path, files: &[(&str, &str)]) {
    std::fs::create_dir_all(dir).unwrap();
    for (name, text) in files {
        std::fs::write(dir.join(name), text).unwrap();
    }
}

/// `farm build --progress plain` as a running process, so that the test can wait on its lines.
fn spawn_build(name: &str, client: Vec<String>, extra: &[String]) -> Proc {
    let mut cmd = Command::new(farm_bin());
    cmd.args(["build", "--progress", "plain"]).args(client).args(extra).env("FARM_LOG", "warn").env("NO_COLOR", "1");
    Proc::spawn(name, &mut cmd)
}

fn finish(mut p: Proc, timeout: Duration) -> (bool, String) {
    let Some(status) = poll_until(timeout, || p.exit_status()) else {
        panic!("{} did not end within {timeout:?}:\n{}", p.name, p.log());
    };
    (status.success(), p.log())
}

/// The capability bits a CapEff line holds.
fn cap_eff(text: &str) -> u64 {
    let line = text.lines().find(|l| l.starts_with("CapEff:")).unwrap_or_else(|| panic!("no CapEff in {text}"));
    u64::from_str_radix(line["CapEff:".len()..].trim(), 16).unwrap()
}

#[test]
fn one_build_cannot_reach_another_build_or_the_agent_host() {
    require_tool("buildah");
    require_tool("runc");
    require_tool("slirp4netns");
    let registry = Registry::start();
    let base = registry.seed_busybox();
    assert!(Path::new(HOST_BUSYBOX).is_file(), "{HOST_BUSYBOX} is made by tests/fixtures/busybox-image.sh prepare");
    let mut farm = Farm::start(3);
    farm.agent("x86", &["--capacity", "2"]);
    farm.ca.issue("client", "alice");
    farm.ca.issue("client", "bob");
    let tmp = farm.tmp.path().to_path_buf();
    let work = tmp.join("agent-x86");

    // A service on the agent host's loopback, and one in a namespace standing for the internet.
    let loop_port = free_tcp_port();
    let loop_dir = tmp.join("loopback-www");
    write(&loop_dir, &[("hostfile", "host-loopback-answer")]);
    let _loopback = httpd("loopback httpd", None, &format!("127.0.0.1:{loop_port}"), &loop_dir);
    let internet = Netns::create();
    let net_ip = internet.links[0].ns_ip.to_string();
    let net_dir = tmp.join("internet-www");
    write(&net_dir, &[("hello", "internet-answer")]);
    let _internet_httpd = httpd("internet httpd", Some(&internet), &format!("{net_ip}:8080"), &net_dir);

    // Bob's build: a secret, a context file, and a RUN that waits (holding its secret mounted)
    // until the test releases it through the "internet", then records its own /tmp and root.
    let bob_secret = "bob-secret-7f3a9c";
    let secret_file = tmp.join("bob-secret.txt");
    std::fs::write(&secret_file, bob_secret).unwrap();
    let bob_ctx = tmp.join("bob");
    write(
        &bob_ctx,
        &[
            (
                "Dockerfile",
                "ARG BASE\nFROM ${BASE}\nARG NET\nCOPY bob-context.txt b.sh /\n\
                 RUN --mount=type=secret,id=bobkey sh /b.sh\n",
            ),
            ("bob-context.txt", "bob-context-4b1d"),
            (
                "b.sh",
                "echo bob is waiting\n\
                 i=0\n\
                 until timeout 3 wget -q -O /dev/null http://$NET/release; do\n\
                 i=$((i+1)); [ $i -gt 100 ] && { echo never released; exit 1; }; sleep 1\n\
                 done\n\
                 echo bob was released\n\
                 ls -a /tmp > /b-tmp.txt\n\
                 ls -a / > /b-root.txt\n\
                 sha256sum /run/secrets/bobkey | cut -d' ' -f1 > /b-secret-hash\n",
            ),
        ],
    );
    let mut bob_args: Vec<String> = vec!["--secret".into(), format!("id=bobkey,src={}", secret_file.display())];
    bob_args.extend(["--build-arg".into(), format!("NET={net_ip}:8080")]);
    bob_args.extend(registry.build_flags(&base, "linux/amd64", "bob:1", &bob_ctx));
    let bob = spawn_build("bob's build", client_args(&farm, "bob"), &bob_args);
    bob.wait_for_line(&["bob is waiting"], BUILD_TIMEOUT);

    // Alice's build runs beside it and attacks.
    let alice_ctx = tmp.join("alice");
    write(
        &alice_ctx,
        &[
            ("Dockerfile", "ARG BASE\nFROM ${BASE}\nARG WORK\nARG LOOP\nARG NET\nCOPY attack.sh /\nRUN sh /attack.sh 2>&1 | tee /attack.txt\n"),
            (
                "attack.sh",
                "echo processes:; ps -o pid,args\n\
                 echo pids: $(ls -d /proc/[0-9]* | wc -l)\n\
                 for f in /proc/[0-9]*/root/run/secrets/* /proc/[0-9]*/root/dev/shm/farm-secrets-*/*; do\n\
                 [ -r \"$f\" ] && echo \"SECRET READ $f: $(cat \"$f\")\"; done\n\
                 for f in /proc/[0-9]*/root$WORK/tasks/*/context/bob-context.txt /proc/[0-9]*/root/bob-context.txt; do\n\
                 [ -r \"$f\" ] && echo \"CONTEXT READ $f: $(cat \"$f\")\"; done\n\
                 for d in /proc/[0-9]*/root/tmp; do echo planted-by-alice > $d/planted-by-alice 2>/dev/null; done\n\
                 grep -E 'CapEff|NoNewPrivs|Seccomp:' /proc/self/status\n\
                 for a in 127.0.0.1 10.0.2.2; do\n\
                 timeout 3 wget -q -O - http://$a:$LOOP/hostfile >/dev/null 2>&1 && echo \"loopback $a: REACHED\" || echo \"loopback $a: refused\"; done\n\
                 echo internet: $(timeout 5 wget -q -O - http://$NET/hello)\n",
            ),
        ],
    );
    let mut alice_args: Vec<String> = vec![];
    for (k, v) in
        [("WORK", work.display().to_string()), ("LOOP", loop_port.to_string()), ("NET", format!("{net_ip}:8080"))]
    {
        alice_args.extend(["--build-arg".into(), format!("{k}={v}")]);
    }
    alice_args.extend(registry.build_flags(&base, "linux/amd64", "alice:1", &alice_ctx));
    let alice = spawn_build("alice's build", client_args(&farm, "alice"), &alice_args);
    let (ok, alice_log) = finish(alice, BUILD_TIMEOUT);
    assert!(ok, "alice's build failed:\n{alice_log}\n{}", farm.agents["x86"].log());
    assert!(!bob.log().contains("bob was released"), "bob finished before alice's attack");

    // Release bob, and let him finish.
    std::fs::write(net_dir.join("release"), "go").unwrap();
    let (ok, bob_log) = finish(bob, BUILD_TIMEOUT);
    assert!(ok, "bob's build failed:\n{bob_log}\n{}", farm.agents["x86"].log());

    // What alice's RUN saw, from her own image.
    let (_, _, images) = read_image(&registry, &format!("{}/alice:1", registry.addr));
    let seen = images[0].text("attack.txt");
    eprintln!("alice's RUN saw:\n{seen}");
    let processes: Vec<&str> =
        seen.lines().skip_while(|l| *l != "processes:").skip(2).take_while(|l| !l.starts_with("pids:")).collect();
    assert!(!processes.is_empty(), "{seen}");
    for p in &processes {
        assert!(p.contains("attack.sh") || p.contains("ps -o") || p.contains("tee"), "a process not her own: {p}");
    }
    let pids: usize = seen.lines().find_map(|l| l.strip_prefix("pids: ")).unwrap().trim().parse().unwrap();
    assert!(pids <= 8, "alice's RUN sees {pids} processes:\n{seen}");
    assert!(!seen.contains("SECRET READ") && !seen.contains(bob_secret), "{seen}");
    assert!(!seen.contains("CONTEXT READ") && !seen.contains("bob-context-4b1d"), "{seen}");
    let caps = cap_eff(&seen);
    assert_eq!(caps & (1 << 21), 0, "CAP_SYS_ADMIN in {caps:x}");
    assert_eq!(caps & (1 << 19), 0, "CAP_SYS_PTRACE in {caps:x}");
    assert_eq!(caps & (1 << 12), 0, "CAP_NET_ADMIN in {caps:x}");
    assert!(seen.contains("NoNewPrivs:\t1"), "{seen}");
    assert!(seen.contains("Seccomp:\t2"), "{seen}");
    assert!(seen.contains("loopback 127.0.0.1: refused") && seen.contains("loopback 10.0.2.2: refused"), "{seen}");
    assert!(seen.contains("internet: internet-answer"), "{seen}");
    // Her attempts are in her log.
    assert!(alice_log.contains("loopback 127.0.0.1: refused"), "{alice_log}");

    // Bob's image and log show no trace of alice.
    let (_, _, images) = read_image(&registry, &format!("{}/bob:1", registry.addr));
    let bob_image = &images[0];
    assert_eq!(bob_image.text("b-secret-hash"), shared::digest::sha256_hex(bob_secret.as_bytes()));
    assert_eq!(bob_image.text("b-tmp.txt").split_whitespace().collect::<Vec<_>>(), [".", ".."]);
    assert!(!bob_image.text("b-root.txt").contains("planted"));
    for (path, bytes) in &bob_image.files {
        assert!(!path.contains("planted"), "{path} in bob's image");
        assert!(!String::from_utf8_lossy(bytes).contains("planted-by-alice"), "{path} in bob's image");
    }
    let builds = farm.builds();
    let bob_build = builds
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["tags"].to_string().contains("/bob:1"))
        .unwrap_or_else(|| panic!("bob's build in {builds}"));
    let mut logs_args = vec!["logs".to_string(), bob_build["id"].as_str().unwrap().to_string()];
    logs_args.extend(farm.client_args());
    let stored = farm_ok(&logs_args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(stored.contains("bob was released"), "{stored}");
    assert!(!stored.contains("alice") && !stored.contains("planted") && !stored.contains("attack"), "{stored}");
    assert!(!bob_log.contains("alice") && !bob_log.contains("planted") && !bob_log.contains("attack"), "{bob_log}");

    // Host networking: asked for, it waits for an agent that allows it, naming the key ...
    let host_ctx = tmp.join("host");
    write(
        &host_ctx,
        &[(
            "Dockerfile",
            "ARG BASE\nFROM ${BASE}\nARG LOOP\nRUN timeout 5 wget -q -O /host.txt http://127.0.0.1:$LOOP/hostfile\n",
        )],
    );
    let mut host_args: Vec<String> = vec!["--network".into(), "host".into()];
    host_args.extend(["--build-arg".into(), format!("LOOP={loop_port}")]);
    host_args.extend(registry.build_flags(&base, "linux/amd64", "host:1", &host_ctx));
    let host = spawn_build("alice's host build", client_args(&farm, "alice"), &host_args);
    host.wait_for_line(&["allowing network.host (agent config allow_host_network = true)"], BUILD_TIMEOUT);
    // ... and runs on it, reaching the host's loopback.
    farm.agent("open", &["--allow-host-network"]);
    let (ok, log) = finish(host, BUILD_TIMEOUT);
    assert!(ok, "the host-network build failed:\n{log}\n{}", farm.agents["open"].log());
    assert!(summary(&log).values().all(|(agent, _)| agent == "open"), "{log}");
    let (_, _, images) = read_image(&registry, &format!("{}/host:1", registry.addr));
    assert_eq!(images[0].text("host.txt"), "host-loopback-answer");

    // Nothing of the sandboxes is left: no network namespace, no slirp4netns.
    let left: Vec<_> = std::fs::read_dir(work.join("buildah/netns"))
        .map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "network namespaces left: {left:?}");
}
