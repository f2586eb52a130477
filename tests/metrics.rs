//! `metrics_listen`: a real Prometheus scrapes the coordinator while a real build runs, and its
//! query API answers with the farm's families (agents, slots, tasks, builds, durations, bytes).

mod common;

use std::process::Command;
use std::time::Duration;

use common::registry::Registry;
use common::*;

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
fn prometheus_scrapes_the_coordinator_s_metrics() {
    require_tool("prometheus");
    require_tool("curl");
    require_tool("buildah");
    let registry = Registry::start();
    let base = registry.seed_busybox();
    let mut farm = Farm::start(3);
    let metrics = format!("127.0.0.1:{}", free_tcp_port());
    let config = farm.tmp.path().join("coordinator.toml");
    std::fs::write(&config, format!("metrics_listen = \"{metrics}\"\n")).unwrap();
    farm.restart_coordinator_env(&[("FARM_CONFIG", config.to_str().unwrap())]);
    farm.agent("x86", &["--capacity", "2"]);

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
    args.extend(registry.build_flags(&base, "linux/amd64,linux/arm64", "metrics:1", &ctx));
    let (ok, out, err) = build(&args);
    assert!(ok, "{out}\n{err}");

    let eventually = |query: &str, want: &str| {
        wait_until(&format!("Prometheus to answer {query} = {want}"), Duration::from_secs(60), || {
            instant(&web, query).filter(|v| v == want)
        })
    };
    eventually(r#"up{job="farm"}"#, "1");
    eventually(r#"farm_builds_total{result="succeeded"}"#, "1");
    eventually(r#"farm_tasks_total{platform="linux/amd64",placement="native",result="succeeded"}"#, "1");
    eventually(r#"farm_tasks_total{platform="linux/arm64",placement="emulated",result="succeeded"}"#, "1");
    eventually(r#"farm_agents{state="online",platform="linux/amd64",placement="native"}"#, "1");
    eventually(r#"farm_agent_slots{agent="x86",state="free"}"#, "2");
    eventually(r#"farm_build_duration_seconds_count"#, "1");
    eventually(r#"sum(farm_task_duration_seconds_count{phase="build"})"#, "2");
    eventually(r#"farm_context_bytes_total{direction="in"} > bool 0"#, "1");
    eventually(r#"process_resident_memory_bytes{job="farm"} > bool 0"#, "1");
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
}
