//! Operating a farm: `metrics_listen` (a real Prometheus scrapes the coordinator while a real build
//! runs, and its query API answers with the farm's families: agents, slots, tasks, builds,
//! durations, bytes), and build notifications (`[[webhooks]]` and `--notify`, signed, retried).

mod common;

use std::process::Command;
use std::time::Duration;

use common::registry::Registry;
use common::*;

/// One POST a receiver got: its headers (lower-case names) and body.
struct Received {
    headers: std::collections::HashMap<String, String>,
    body: Vec<u8>,
}

/// A webhook receiver on loopback: answers 500 to the first `fail_first` POSTs, then 204.
fn receiver(fail_first: usize) -> (String, std::sync::mpsc::Receiver<Received>) {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for (n, stream) in listener.incoming().enumerate() {
            let Ok(mut stream) = stream else { return };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut headers = std::collections::HashMap::new();
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            loop {
                line.clear();
                reader.read_line(&mut line).unwrap();
                let l = line.trim_end();
                if l.is_empty() {
                    break;
                }
                let (k, v) = l.split_once(':').unwrap();
                headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
            }
            let len: usize = headers.get("content-length").map_or(0, |v| v.parse().unwrap());
            let mut body = vec![0; len];
            reader.read_exact(&mut body).unwrap();
            let status = if n < fail_first { "500 Internal Server Error" } else { "204 No Content" };
            let _ = stream
                .write_all(format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").as_bytes());
            if n >= fail_first && tx.send(Received { headers, body }).is_err() {
                return;
            }
        }
    });
    (url, rx)
}

/// `sha256=<hex>` HMAC-SHA256, computed independently of farm (with openssl).
fn hmac_hex(secret: &str, body: &[u8]) -> String {
    use std::io::Write;
    let mut child = Command::new("openssl")
        .args(["dgst", "-sha256", "-hmac", secret, "-r"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(body).unwrap();
    let out = child.wait_with_output().unwrap();
    format!("sha256={}", String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap())
}

fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `query`'s single value from Prometheus's HTTP API, if it has exactly one series.
fn instant(prometheus: &str, query: &str) -> Option<String> {
    let out = Command::new("curl")
        .args(["-sfG", &format!("http://{prometheus}/api/v1/query"), "--data-urlencode", &format!("query={query}")])
        .output()
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let result = v["data"]["result"].as_array()?;
    (result.len() == 1).then(|| result[0]["value"][1].as_str().unwrap_or_default().to_string())
}

#[test]
fn prometheus_scrapes_the_coordinator_s_metrics_and_webhooks_hear_of_the_build() {
    require_tool("prometheus");
    require_tool("promtool");
    require_tool("openssl");
    require_tool("curl");
    require_tool("buildah");
    let registry = Registry::start();
    let base = registry.seed_busybox();
    let mut farm = Farm::start(3);
    let metrics = format!("127.0.0.1:{}", free_tcp_port());
    let config = farm.tmp.path().join("coordinator.toml");
    // The configured webhook fails once (and is retried); the build's own --notify URL does not;
    // a second configured one is down throughout (builds go on regardless).
    let (hook, hooked) = receiver(1);
    let down = free_tcp_port();
    let (own, owned) = receiver(0);
    std::fs::write(
        &config,
        format!(
            "metrics_listen = \"{metrics}\"\nnotify_secret = \"per-build\"\n[[webhooks]]\nurl = \"{hook}\"\nsecret = \
             \"s3cret\"\n[[webhooks]]\nurl = \"http://127.0.0.1:{down}/nobody-listens\"\n"
        ),
    )
    .unwrap();
    farm.restart_coordinator_env(&[("FARM_CONFIG", config.to_str().unwrap())]);
    farm.agent("x86", &["--capacity", "2"]);
    farm.agent("pi32", &["--native", "linux/arm/v7", "--emulated", "none", "--capacity", "1"]);

    // A real Prometheus, scraping every second into a temporary directory.
    let prom_dir = farm.tmp.path().join("prometheus");
    std::fs::create_dir_all(&prom_dir).unwrap();
    let prom_config = prom_dir.join("prometheus.yml");
    std::fs::write(
        &prom_config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: farm\n    static_configs:\n      - targets: \
             ['{metrics}']\n"
        ),
    )
    .unwrap();
    let web = format!("127.0.0.1:{}", free_tcp_port());
    let mut cmd = Command::new("prometheus");
    cmd.args([
        &format!("--config.file={}", prom_config.display()),
        &format!("--storage.tsdb.path={}", prom_dir.join("data").display()),
        &format!("--web.listen-address={web}"),
    ]);
    let _prometheus = Proc::spawn("prometheus", &mut cmd);

    let ctx = example("hello", farm.tmp.path());
    let mut args = farm.client_args();
    args.extend(registry.build_flags(&base, "linux/amd64,linux/arm64,linux/arm/v7", "metrics:1", &ctx));
    args.extend(["--notify".to_string(), own.clone()]);
    let (ok, out, err) = build(&args);
    assert!(ok, "{out}\n{err}");

    // Both receivers hear of it, signed with their own secret; the configured one after a retry.
    let tag = format!("{}/metrics:1", registry.addr);
    for (rx, secret) in [(&hooked, "s3cret"), (&owned, "per-build")] {
        let got = rx.recv_timeout(Duration::from_secs(30)).expect("a notice");
        assert_eq!(got.headers["x-farm-signature-256"], hmac_hex(secret, &got.body));
        assert_eq!(got.headers["x-farm-event"], "build.finished");
        let notice: serde_json::Value = serde_json::from_slice(&got.body).unwrap();
        assert_eq!(notice["result"], "succeeded");
        assert_eq!(notice["tags"], serde_json::json!([tag]));
        assert!(notice["index"].as_str().unwrap().starts_with("sha256:"), "{notice}");
        let placements: Vec<(&str, &str, &str)> = notice["platforms"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| (p["platform"].as_str().unwrap(), p["agent"].as_str().unwrap(), p["placement"].as_str().unwrap()))
            .collect();
        assert_eq!(
            placements,
            [("linux/amd64", "x86", "native"), ("linux/arm64", "x86", "emulated"), ("linux/arm/v7", "pi32", "native")]
        );
        assert!(notice["platforms"][0]["duration_ms"].as_u64().unwrap() > 0);
    }

    let eventually = |query: &str, want: &str| {
        wait_until(&format!("Prometheus to answer {query} = {want}"), Duration::from_secs(60), || {
            instant(&web, query).filter(|v| v == want)
        })
    };
    eventually(r#"up{job="farm"}"#, "1");
    eventually(r#"farm_builds_total{result="succeeded"}"#, "1");
    eventually(r#"farm_tasks_total{platform="linux/amd64",placement="native",result="succeeded"}"#, "1");
    eventually(r#"farm_tasks_total{platform="linux/arm64",placement="emulated",result="succeeded"}"#, "1");
    eventually(r#"sum(farm_tasks_total{placement="emulated"})"#, "1");
    eventually(r#"sum(farm_tasks_total{placement="native"})"#, "2");
    // The agent gauges say what `farm agents` says.
    let agents = agents_json(&farm.addr, &farm.ca);
    for a in agents.as_array().unwrap() {
        let name = a["name"].as_str().unwrap();
        let (capacity, busy) = (a["capacity"].as_u64().unwrap(), a["busy"].as_u64().unwrap());
        eventually(&format!(r#"farm_agent_slots{{agent="{name}",state="free"}}"#), &(capacity - busy).to_string());
        eventually(&format!(r#"farm_agent_slots{{agent="{name}",state="busy"}}"#), &busy.to_string());
        for (key, placement) in [("native", "native"), ("emulated", "emulated")] {
            for p in a[key].as_array().unwrap() {
                let q = format!(
                    r#"farm_agents{{state="{}",platform="{}",placement="{placement}"}}"#,
                    a["state"].as_str().unwrap(),
                    p.as_str().unwrap()
                );
                let holders = agents
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|b| b["state"] == a["state"] && b[key].as_array().unwrap().contains(p))
                    .count();
                eventually(&q, &holders.to_string());
            }
        }
    }
    eventually(r#"sum(farm_queue_depth) or vector(0)"#, "0");
    eventually(r#"farm_build_duration_seconds_count"#, "1");
    eventually(r#"sum(farm_task_duration_seconds_count{phase="build"})"#, "3");
    eventually(r#"farm_context_bytes_total{direction="in"} > bool 0"#, "1");
    eventually(r#"process_resident_memory_bytes{job="farm"} > bool 0"#, "1");
    // promtool accepts the exposition as it is served.
    let exposition = Command::new("curl").args(["-sf", &format!("http://{metrics}/metrics")]).output().unwrap();
    assert!(exposition.status.success());
    let mut check = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut check.stdin.take().unwrap(), &exposition.stdout).unwrap();
    let checked = check.wait_with_output().unwrap();
    assert!(
        checked.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    // No build id or tag became a label.
    let series = Command::new("curl")
        .args(["-sfG", &format!("http://{web}/api/v1/series"), "--data-urlencode", r#"match[]={job="farm"}"#])
        .output()
        .unwrap();
    let series = String::from_utf8_lossy(&series.stdout);
    assert!(series.contains("farm_tasks_total"), "{series}");
    assert!(
        !series.contains("metrics:1") && !series.contains("\"build\":") && !series.contains("\"tag\":"),
        "a build id or tag became a label"
    );

    // A build under way while the coordinator restarts: its notice still comes, once.
    let slow = farm.tmp.path().join("slow");
    std::fs::create_dir_all(&slow).unwrap();
    std::fs::write(slow.join("Dockerfile"), "ARG BASE\nFROM $BASE\nRUN sleep 4 && echo done > /done\n").unwrap();
    let mut args = farm.client_args();
    args.extend(registry.build_flags(&base, "linux/amd64", "slow:1", &slow));
    let id = submit(&args);
    wait_until("the slow build to run", Duration::from_secs(60), || {
        farm.builds()
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["id"] == id)
            .and_then(|b| (b["platforms"][0]["state"] == "running").then_some(()))
    });
    farm.restart_coordinator_env(&[("FARM_CONFIG", config.to_str().unwrap())]);
    assert_eq!(farm.wait_build_end(&id, Duration::from_secs(120))["state"], "succeeded");
    let got = hooked.recv_timeout(Duration::from_secs(30)).expect("a notice after the restart");
    assert_eq!(got.headers["x-farm-signature-256"], hmac_hex("s3cret", &got.body));
    let notice: serde_json::Value = serde_json::from_slice(&got.body).unwrap();
    assert_eq!((notice["id"].as_str(), notice["result"].as_str()), (Some(id.as_str()), Some("succeeded")));
    assert!(hooked.recv_timeout(Duration::from_secs(2)).is_err(), "a second notice for one build");
}
