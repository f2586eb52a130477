//! The web dashboard (`dashboard_listen`) in headless Chromium (Debian's `chromium`, driven
//! through `chromedriver`'s WebDriver HTTP API): logging in with the link `farm dashboard` prints,
//! both agents listed, a real buildah build started from the CLI watched going running →
//! succeeded with its log lines arriving live, another build cancelled from its page. Without a
//! session every page redirects to the login page and every API answers 401; a used link fails; a
//! client sees only its own builds; a coordinator restart ends every session. Screenshots of each
//! page: `target/test-artifacts/dashboard/`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::registry::Registry;
use common::*;

const USED: &str = "this login link was already used: each link logs in once. Run `farm dashboard` for a new one.";
const UNKNOWN: &str = "this login link is not valid here (a coordinator restart forgets every link and session). Run \
                       `farm dashboard` for a new one.";
const NO_TOKEN: &str = "log in with the link `farm dashboard` prints (run by an admin or client identity).";

fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn artifacts() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-artifacts/dashboard");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// One HTTPS answer, as curl (trusting only the farm's CA) got it.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// `METHOD https://DASH/PATH` with the session cookie, if any.
fn https(dash: &str, ca: &Ca, method: &str, path: &str, session: Option<&str>) -> Answer {
    let ca_crt = ca.dir.join("ca.crt");
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "-i", "--max-time", "20", "-X", method, "--cacert", ca_crt.to_str().unwrap()]);
    if method == "POST" {
        cmd.args(["-H", "x-farm-dashboard: 1"]);
    }
    if let Some(s) = session {
        cmd.args(["-H", &format!("Cookie: farm_session={s}")]);
    }
    let out = cmd.arg(format!("https://{dash}{path}")).output().unwrap();
    assert!(out.status.success(), "curl {method} {path}: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines.next().unwrap().split_whitespace().nth(1).unwrap().parse().unwrap();
    let headers = lines.filter_map(|l| l.split_once(':')).map(|(k, v)| (k.trim().into(), v.trim().into())).collect();
    Answer { status, headers, body: body.to_string() }
}

/// `farm dashboard` as `name`: the link it prints.
fn dashboard_link(farm: &Farm, name: &str) -> String {
    let args = ["dashboard", "--coordinator", &farm.addr, "--ca-dir", farm.ca.path(), "--name", name];
    let link = farm_ok(&args).trim().to_string();
    assert!(link.starts_with("https://127.0.0.1:") && link.contains("/login?token="), "{link}");
    link
}

/// Logs in with a fresh link as `name` (with curl); returns the session cookie's value.
fn session(farm: &Farm, dash: &str, name: &str) -> String {
    let link = dashboard_link(farm, name);
    let path = &link[link.find("/login").unwrap()..];
    let a = https(dash, &farm.ca, "GET", path, None);
    assert_eq!((a.status, a.header("location")), (303, Some("/")), "{a:?}");
    let cookie = a.header("set-cookie").unwrap();
    for attr in ["HttpOnly", "Secure", "SameSite=Strict", "Path=/"] {
        assert!(cookie.split("; ").any(|c| c == attr), "the session cookie lacks {attr}: {cookie}");
    }
    cookie.strip_prefix("farm_session=").unwrap().split(';').next().unwrap().to_string()
}

/// chromedriver and one headless Chromium session; both end on drop.
struct Browser {
    driver: String,
    session: String,
    _chromedriver: Proc,
    _profile: tempfile::TempDir,
}

impl Browser {
    fn start() -> Browser {
        let port = free_tcp_port();
        let chromedriver = Proc::spawn("chromedriver", Command::new("chromedriver").arg(format!("--port={port}")));
        let driver = format!("http://127.0.0.1:{port}");
        wait_until("chromedriver to be ready", Duration::from_secs(30), || {
            let out = Command::new("curl").args(["-s", &format!("{driver}/status")]).output().ok()?;
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            (v["value"]["ready"] == true).then_some(())
        });
        let profile = tempfile::tempdir().unwrap();
        let caps = serde_json::json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "acceptInsecureCerts": true,
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--window-size=1400,1000", format!("--user-data-dir={}", profile.path().display())],
            },
        }}});
        let v = wd(&driver, "POST", "/session", Some(caps));
        let session = v["sessionId"].as_str().unwrap().to_string();
        Browser { driver, session, _chromedriver: chromedriver, _profile: profile }
    }

    fn call(&self, method: &str, path: &str, body: Option<serde_json::Value>) -> serde_json::Value {
        wd(&self.driver, method, &format!("/session/{}{path}", self.session), body)
    }

    fn goto(&self, url: &str) {
        self.call("POST", "/url", Some(serde_json::json!({ "url": url })));
    }

    fn url(&self) -> String {
        self.call("GET", "/url", None).as_str().unwrap().to_string()
    }

    /// Runs `script` (a function body) in the page; its return value.
    fn js(&self, script: &str) -> serde_json::Value {
        self.call("POST", "/execute/sync", Some(serde_json::json!({ "script": script, "args": [] })))
    }

    fn text(&self, selector: &str) -> String {
        let script = format!("const e = document.querySelector({selector:?}); return e ? e.textContent : null;");
        self.js(&script).as_str().unwrap_or_default().to_string()
    }

    fn screenshot(&self, name: &str) -> PathBuf {
        use base64::Engine;
        let png = self.call("GET", "/screenshot", None);
        let bytes = base64::engine::general_purpose::STANDARD.decode(png.as_str().unwrap()).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
        let path = artifacts().join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = Command::new("curl")
            .args(["-s", "-X", "DELETE", &format!("{}/session/{}", self.driver, self.session)])
            .output();
    }
}

/// One WebDriver command; its `value`, or a panic with the driver's error.
fn wd(driver: &str, method: &str, path: &str, body: Option<serde_json::Value>) -> serde_json::Value {
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "--max-time", "60", "-X", method, &format!("{driver}{path}")]);
    if let Some(b) = body {
        cmd.args(["-H", "Content-Type: application/json", "-d", &b.to_string()]);
    }
    let out = cmd.output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("WebDriver {method} {path}: {e}: {}", String::from_utf8_lossy(&out.stdout)));
    if v["value"].get("error").is_some() {
        panic!("WebDriver {method} {path}: {}", v["value"]);
    }
    v["value"].clone()
}

/// The state the build page shows for each platform, in order.
fn platform_states(b: &Browser) -> Vec<(String, String)> {
    let v = b.js("return Array.from(document.querySelectorAll('#platforms tr.platform')).map(r => \
         [r.dataset.platform, r.querySelector('.state').textContent]);");
    v.as_array()
        .unwrap()
        .iter()
        .map(|p| (p[0].as_str().unwrap().to_string(), p[1].as_str().unwrap().to_string()))
        .collect()
}

fn build_ids(a: &Answer) -> Vec<String> {
    let v: serde_json::Value = serde_json::from_str(&a.body).unwrap_or_else(|e| panic!("{e}: {}", a.body));
    v["builds"].as_array().unwrap().iter().map(|b| b["id"].as_str().unwrap().to_string()).collect()
}

#[test]
fn the_dashboard_in_chromium_logs_in_once_watches_a_build_and_cancels_another() {
    for tool in ["chromium", "chromedriver", "curl", "buildah"] {
        require_tool(tool);
    }
    let registry = Registry::start();
    let base = registry.seed_busybox();
    let mut farm = Farm::start(3);
    farm.ca.issue("client", "alice");
    farm.ca.issue("client", "bob");
    let dash = format!("127.0.0.1:{}", free_tcp_port());
    let config = farm.tmp.path().join("coordinator.toml");
    std::fs::write(&config, format!("dashboard_listen = \"{dash}\"\n")).unwrap();
    farm.restart_coordinator_env(&[("FARM_CONFIG", config.to_str().unwrap())]);
    farm.agent("x86", &["--native", "linux/amd64", "--emulated", "none", "--capacity", "2"]);
    farm.agent("pi64", &["--native", "linux/arm64", "--emulated", "none", "--capacity", "1"]);

    // Without a session: every page redirects to the login page, every API answers 401.
    for path in ["/", "/builds/0123456789ab", "/static/app.js", "/static/style.css", "/anything"] {
        let a = https(&dash, &farm.ca, "GET", path, None);
        assert_eq!((a.status, a.header("location")), (303, Some("/login")), "GET {path}: {a:?}");
    }
    for (method, path) in [
        ("GET", "/api/overview"),
        ("GET", "/api/builds/0123456789ab"),
        ("GET", "/api/builds/0123456789ab/logs"),
        ("POST", "/api/builds/0123456789ab/cancel"),
        ("GET", "/api/anything"),
    ] {
        let a = https(&dash, &farm.ca, method, path, None);
        assert_eq!(a.status, 401, "{method} {path}: {a:?}");
    }
    let a = https(&dash, &farm.ca, "GET", "/login", None);
    assert_eq!(a.status, 401);
    assert!(a.body.contains(NO_TOKEN), "{}", a.body);
    let a = https(&dash, &farm.ca, "GET", "/login?token=00ff", None);
    assert_eq!(a.status, 401);
    assert!(a.body.contains(UNKNOWN), "{}", a.body);
    let a = https(&dash, &farm.ca, "GET", "/api/overview", Some("not-a-session"));
    assert_eq!(a.status, 401, "{a:?}");

    // The admin logs in in Chromium with the printed link, and sees both agents.
    let browser = Browser::start();
    let link = dashboard_link(&farm, "admin");
    browser.goto(&link);
    assert_eq!(browser.url(), format!("https://{dash}/"));
    let agents = wait_until("both agents on the overview", Duration::from_secs(20), || {
        let v = browser.js("return Array.from(document.querySelectorAll('#agents tr.agent')).map(r => \
             [r.dataset.agent, r.querySelector('.state').textContent, r.querySelector('.native').textContent, \
             r.querySelector('.slots').textContent]);");
        (v.as_array().unwrap().len() == 2).then_some(v)
    });
    let mut agents: Vec<Vec<String>> = agents.as_array().unwrap().iter().map(strings).collect();
    agents.sort();
    assert_eq!(agents, [["pi64", "online", "linux/arm64", "0/1"], ["x86", "online", "linux/amd64", "0/2"]]);
    assert_eq!(browser.text("#me"), "admin (admin)");
    println!("overview: {}", browser.screenshot("overview.png").display());
    // The link logged in once: a second use fails with its message.
    let path = &link[link.find("/login").unwrap()..];
    let again = https(&dash, &farm.ca, "GET", path, None);
    assert_eq!(again.status, 401, "{again:?}");
    assert!(again.body.contains(USED), "{}", again.body);
    assert!(again.header("set-cookie").is_none());

    // Alice starts a real build from the CLI; the admin watches it on its page.
    let ctx = farm.tmp.path().join("ticks");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(
        ctx.join("Dockerfile"),
        "ARG BASE\nFROM $BASE\nRUN for i in 1 2 3 4 5 6 7 8; do echo tick $i; sleep 1; done; echo ticks-done\n",
    )
    .unwrap();
    let alice = |mut flags: Vec<String>| {
        let mut a: Vec<String> =
            ["--coordinator", &farm.addr, "--ca-dir", farm.ca.path(), "--name", "alice"].map(String::from).to_vec();
        a.append(&mut flags);
        a
    };
    let watched = submit(&alice(registry.build_flags(&base, "linux/amd64,linux/arm64", "ticks:1", &ctx)));
    browser.goto(&format!("https://{dash}/builds/{watched}"));
    let mut seen: Vec<Vec<(String, String)>> = vec![];
    // Running, with log lines of both platforms already on the page (not yet ended: live).
    wait_until("both platforms running with live log lines", Duration::from_secs(180), || {
        let states = platform_states(&browser);
        if seen.last() != Some(&states) {
            seen.push(states.clone());
        }
        let log = browser.text("#log");
        let running = states.len() == 2 && states.iter().all(|(_, s)| s == "running");
        let live = ["linux/amd64", "linux/arm64"].iter().all(|p| log.contains(&format!("[{p}] tick 1")));
        (running && live && browser.text("#log-state") == "(live)").then_some(())
    });
    println!("build running: {}", browser.screenshot("build-running.png").display());
    wait_until("the watched build to succeed on the page", Duration::from_secs(300), || {
        let states = platform_states(&browser);
        if seen.last() != Some(&states) {
            seen.push(states.clone());
        }
        let done = states.len() == 2 && states.iter().all(|(_, s)| s == "succeeded");
        (done && browser.text("#state") == "succeeded" && browser.text("#log-state") == "(ended)").then_some(())
    });
    let last = seen.last().unwrap().clone();
    assert_eq!(
        last,
        [("linux/amd64".into(), "succeeded".into()), ("linux/arm64".into(), "succeeded".into())],
        "states seen: {seen:?}"
    );
    let first_running = seen.iter().position(|s| s.iter().all(|(_, st)| st == "running")).unwrap();
    assert!(
        seen[first_running..].iter().all(|s| s.iter().all(|(_, st)| st == "running" || st == "succeeded")),
        "states seen: {seen:?}"
    );
    let log = browser.text("#log");
    for p in ["linux/amd64", "linux/arm64"] {
        for line in ["tick 1", "tick 8", "ticks-done"] {
            assert!(log.contains(&format!("[{p}] {line}")), "no [{p}] {line} in the page's log:\n{log}");
        }
    }
    // Each platform's agent and placement, and a timeline split by phase.
    let rows = browser.js("return Array.from(document.querySelectorAll('#platforms tr.platform')).map(r => \
         [r.dataset.platform, r.querySelector('.agent').textContent, r.querySelector('.placement').textContent, \
         Array.from(r.querySelectorAll('.bar span')).map(s => s.className).join(' ')]);");
    let rows: Vec<Vec<String>> = rows.as_array().unwrap().iter().map(strings).collect();
    for (row, (platform, agent)) in rows.iter().zip([("linux/amd64", "x86"), ("linux/arm64", "pi64")]) {
        assert_eq!((row[0].as_str(), row[1].as_str(), row[2].as_str()), (platform, agent, "native"));
        for phase in ["sync", "materialise", "build", "export", "push"] {
            assert!(row[3].split(' ').any(|c| c == phase), "{platform}'s timeline has no {phase}: {row:?}");
        }
    }
    println!("build succeeded: {}", browser.screenshot("build-succeeded.png").display());

    // Bob's build waits for a file nobody creates (at most 5 minutes); the admin cancels it from its page.
    let waits = farm.tmp.path().join("waits");
    std::fs::create_dir_all(&waits).unwrap();
    std::fs::write(
        waits.join("Dockerfile"),
        "ARG BASE\nFROM $BASE\nRUN echo waiting-for-gate; i=0; while [ ! -e /gate ] && [ $i -lt 300 ]; do sleep 1; \
         i=$((i+1)); done\n",
    )
    .unwrap();
    let mut bob: Vec<String> =
        ["--coordinator", &farm.addr, "--ca-dir", farm.ca.path(), "--name", "bob"].map(String::from).to_vec();
    bob.extend(registry.build_flags(&base, "linux/amd64", "waits:1", &waits));
    let cancelled = submit(&bob);
    browser.goto(&format!("https://{dash}/builds/{cancelled}"));
    wait_until("bob's build to run and log", Duration::from_secs(120), || {
        let running = platform_states(&browser) == [("linux/amd64".to_string(), "running".to_string())];
        (running && browser.text("#log").contains("[linux/amd64] waiting-for-gate")).then_some(())
    });
    browser.js("document.getElementById('cancel').click(); return null;");
    wait_until("the page to show the build cancelled", Duration::from_secs(30), || {
        (browser.text("#cancel-result") == "cancelled" && browser.text("#state") == "cancelled").then_some(())
    });
    println!("build cancelled: {}", browser.screenshot("build-cancelled.png").display());
    let ended = farm.wait_build_end(&cancelled, Duration::from_secs(30));
    assert_eq!(ended["state"], "cancelled", "{ended}");
    // Back on the overview: both builds, each platform's state.
    browser.goto(&format!("https://{dash}/"));
    wait_until("both builds on the overview", Duration::from_secs(20), || {
        let v = browser.js("return Array.from(document.querySelectorAll('#builds tr.build')).map(r => \
             [r.dataset.build, r.querySelector('.state').textContent]);");
        let rows: Vec<Vec<String>> = v.as_array().unwrap().iter().map(strings).collect();
        let want = [vec![cancelled.clone(), "cancelled".into()], vec![watched.clone(), "succeeded".into()]];
        (rows == want).then_some(())
    });
    println!("overview with builds: {}", browser.screenshot("overview-builds.png").display());

    // A client sees and cancels only its own builds; the admin all of them.
    let (alice_s, bob_s, admin_s) =
        (session(&farm, &dash, "alice"), session(&farm, &dash, "bob"), session(&farm, &dash, "admin"));
    let overview = |s: &str| build_ids(&https(&dash, &farm.ca, "GET", "/api/overview", Some(s)));
    assert_eq!(overview(&alice_s), vec![watched.clone()]);
    assert_eq!(overview(&bob_s), vec![cancelled.clone()]);
    assert_eq!(overview(&admin_s), [cancelled.clone(), watched.clone()]);
    for (method, path) in [
        ("GET", format!("/builds/{watched}")),
        ("GET", format!("/api/builds/{watched}")),
        ("GET", format!("/api/builds/{watched}/logs")),
        ("POST", format!("/api/builds/{watched}/cancel")),
    ] {
        let a = https(&dash, &farm.ca, method, &path, Some(&bob_s));
        assert_eq!(a.status, 404, "bob {method} {path}: {a:?}");
        assert_eq!(a.body, format!("no build {watched} that client \"bob\" may see\n"));
        let own = https(&dash, &farm.ca, "GET", &format!("/api/builds/{watched}"), Some(&alice_s));
        assert_eq!(own.status, 200, "{own:?}");
    }
    let a = https(&dash, &farm.ca, "GET", &format!("/builds/{cancelled}"), Some(&alice_s));
    assert_eq!(a.status, 404, "{a:?}");
    // Sessions live in the coordinator's memory: a restart logs everyone out.
    farm.restart_coordinator_env(&[("FARM_CONFIG", config.to_str().unwrap())]);
    let a = https(&dash, &farm.ca, "GET", "/api/overview", Some(&admin_s));
    assert_eq!(a.status, 401, "after a restart: {a:?}");
    // Agents cannot ask for a link.
    let out = common::farm(&["dashboard", "--coordinator", &farm.addr, "--ca-dir", farm.ca.path(), "--name", "x86"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("agent \"x86\" may not log into the dashboard (admin and client identities only)"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
