//! `farm build`'s live view on a real terminal: the build runs in a tmux pane (a pseudo-terminal
//! of 160x50) against a real farm, and the test reads the screen as a person would, mid-build and
//! at the end. Off a terminal the same build prints plain lines without a single escape.

mod common;

use std::process::Command;
use std::time::Duration;

use common::registry::Registry;
use common::*;

const PLATFORMS: [&str; 3] = ["linux/amd64", "linux/arm64", "linux/arm/v7"];
/// A step that takes a few seconds and prints as it goes, so the screen can be read mid-step.
const DOCKERFILE: &str = "ARG BASE\nFROM ${BASE}\nRUN for i in 1 2 3 4 5 6; do echo tick $i; sleep 1; done\n";

/// A tmux server of its own with one 160x50 pane running a command; killed on drop.
struct Tmux {
    socket: String,
    _conf: tempfile::NamedTempFile,
    /// Where the pane's shell writes the command's exit status when it ends.
    status: tempfile::TempPath,
}

impl Tmux {
    fn run(argv: &[String], env: &[(&str, &str)]) -> Tmux {
        require_tool("tmux");
        let conf = tempfile::NamedTempFile::new().unwrap();
        // The pane stays after the command exits, so its last screen and exit status can be read.
        std::fs::write(conf.path(), "set -g remain-on-exit on\nset -g status off\nset -g history-limit 10000\n")
            .unwrap();
        let socket = format!("farm-live-{}-{}", std::process::id(), free_udp_port());
        let quote = |s: &str| format!("'{}'", s.replace('\'', r"'\''"));
        // The shell survives the Ctrl-C (its trap is a handler, which the command does not
        // inherit) and writes the command's exit status to a file: tmux's own pane status proved
        // unreliable to read under load.
        let status = tempfile::NamedTempFile::new().unwrap().into_temp_path();
        let mut line = "trap : INT; env -u NO_COLOR".to_string();
        for (k, v) in env {
            line += &format!(" {k}={}", quote(v));
        }
        for a in argv {
            line += &format!(" {}", quote(a));
        }
        line += &format!("; echo $? > {}", quote(status.to_str().unwrap()));
        let tmux = Tmux { socket, _conf: conf, status };
        let st = tmux
            .cmd()
            .args(["-f", tmux._conf.path().to_str().unwrap(), "new-session", "-d", "-x", "160", "-y", "50", &line])
            .env_remove("TMUX")
            .status()
            .unwrap();
        assert!(st.success(), "tmux new-session failed");
        tmux
    }

    fn cmd(&self) -> Command {
        let mut c = Command::new("tmux");
        c.args(["-L", &self.socket]);
        c
    }

    fn tmux(&self, args: &[&str]) -> String {
        let out = self.cmd().args(args).output().unwrap();
        assert!(out.status.success(), "tmux {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    /// The visible screen.
    fn screen(&self) -> String {
        self.tmux(&["capture-pane", "-p"])
    }

    /// The visible screen with colours and attributes as escape sequences.
    fn screen_with_escapes(&self) -> String {
        self.tmux(&["capture-pane", "-p", "-e"])
    }

    /// Everything the pane ever showed: history and screen.
    fn everything(&self) -> String {
        self.tmux(&["capture-pane", "-p", "-S", "-"])
    }

    /// The command's exit status, once it has exited.
    fn exit_status(&self) -> Option<i32> {
        let text = std::fs::read_to_string(&self.status).ok()?;
        text.trim().parse().ok()
    }

    fn wait_exit(&self, timeout: Duration) -> i32 {
        poll_until(timeout, || self.exit_status())
            .unwrap_or_else(|| panic!("farm build still running after {timeout:?}; screen:\n{}", self.screen()))
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.cmd().arg("kill-server").status();
    }
}

/// The live view's rows for `platform` on `screen`: a state glyph, then the platform, then
/// the rest (the summary table's rows start with the platform; plain lines with `[platform]`).
fn rows<'a>(screen: &'a str, platform: &str) -> Vec<(usize, &'a str)> {
    screen
        .lines()
        .enumerate()
        .filter(|(_, l)| {
            let mut t = l.split_whitespace();
            t.next().is_some_and(|g| g.chars().count() == 1) && t.next() == Some(platform)
        })
        .collect()
}

/// Mid-build: every platform's single row shows where it runs and its step, with its last log
/// lines (ticks) right under it. The screen when that holds.
fn mid_build(pane: &Tmux) -> String {
    wait_until("every platform mid-step with ticks under it", Duration::from_secs(240), || {
        if let Some(status) = pane.exit_status() {
            panic!("farm build exited ({status}) before the screen showed its steps:\n{}", pane.everything());
        }
        let screen = pane.screen();
        let lines: Vec<&str> = screen.lines().collect();
        PLATFORMS
            .iter()
            .all(|p| match rows(&screen, p)[..] {
                [(i, row)] => {
                    row.contains("running on x86 (")
                        && row.contains("[2/2] RUN for i in 1 2 3 4 5 6; do echo tick $i; sleep 1; done")
                        && lines.get(i + 1).is_some_and(|l| l.trim_start().starts_with("tick "))
                }
                _ => false,
            })
            .then_some(screen)
    })
}

fn assert_each_row_once(screen: &str, want: &str) {
    for p in PLATFORMS {
        let found = rows(screen, p);
        assert_eq!(found.len(), 1, "{p}: expected one row, found {found:?} in:\n{screen}");
        assert!(found[0].1.contains(want), "{p}: row {:?} should say {want:?}:\n{screen}", found[0].1);
    }
    assert_eq!(screen.matches("[+] Building").count(), 1, "one header:\n{screen}");
}

#[test]
fn live_view_on_a_terminal_plain_lines_off_it() {
    let registry = Registry::start();
    let base = registry.seed_busybox();
    let mut farm = Farm::start(3);
    farm.agent("x86", &["--capacity", "3"]);
    let ctx = farm.tmp.path().join("ticks");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(ctx.join("Dockerfile"), DOCKERFILE).unwrap();
    let argv = |tag: &str, extra: &[&str]| {
        let mut a = vec![farm_bin().to_string(), "build".into()];
        a.extend(extra.iter().map(|s| s.to_string()));
        a.extend(farm.client_args());
        a.extend(registry.build_flags(&base, &PLATFORMS.join(","), tag, &ctx));
        a
    };

    // On a terminal, in colour: each platform's row, its step, its last lines, redrawn in place.
    let pane = Tmux::run(&argv("live:1", &[]), &[("FARM_LOG", "warn")]);
    let screen = mid_build(&pane);
    eprintln!("mid-build screen:\n{screen}");
    if let Some(path) = std::env::var_os("FARM_TEST_LIVE_CAPTURE") {
        std::fs::write(path, &screen).unwrap();
    }
    for p in PLATFORMS {
        let (i, _) = rows(&screen, p)[0];
        let below: Vec<&str> = screen.lines().skip(i + 1).take_while(|l| l.starts_with("     ")).collect();
        assert!((1..=3).contains(&below.len()), "{p}: 1 to 3 log lines under its row:\n{screen}");
    }
    assert!(screen.contains("(0/3 done)"), "{screen}");
    assert!(pane.screen_with_escapes().contains("\x1b["), "colours on a terminal without NO_COLOR");
    assert_eq!(pane.wait_exit(Duration::from_secs(240)), 0, "{}", pane.everything());
    let end = pane.everything();
    eprintln!("final screen:\n{end}");
    assert_each_row_once(&end, "done on x86 (");
    assert!(end.contains("[+] Building ") && end.contains("(3/3 done)"), "{end}");
    let built = end.lines().find(|l| l.starts_with("built 3 platforms in ")).unwrap_or_else(|| panic!("{end}"));
    assert!(built.ends_with('s') && built["built 3 platforms in ".len()..built.len() - 1].parse::<f64>().is_ok());
    assert!(!end.contains("tick "), "log lines fold away when a platform is done:\n{end}");
    drop(pane);

    // Off a terminal: plain lines, as `farm logs` prints them, not one escape sequence.
    let out = Command::new(farm_bin()).args(&argv("live:2", &[])[1..]).env("FARM_LOG", "warn").output().unwrap();
    let (so, se) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{so}\n{se}");
    assert!(!se.contains('\x1b') && !so.contains('\x1b'), "{se}");
    for p in PLATFORMS {
        assert!(se.lines().any(|l| l.starts_with(&format!("[{p}] done: ")) && l.ends_with("(cached)")), "{se}");
    }
    assert!(so.starts_with("built 3 platforms in ") && so.lines().next().unwrap().ends_with("s (all cached)"), "{so}");

    // Ctrl-C mid-build, with NO_COLOR: the last frame stays once, then the note; no colour.
    let pane = Tmux::run(&argv("live:3", &["--no-cache"]), &[("FARM_LOG", "warn"), ("NO_COLOR", "1")]);
    mid_build(&pane);
    assert!(!pane.screen_with_escapes().contains("\x1b["), "NO_COLOR: no colours");
    pane.tmux(&["send-keys", "C-c"]);
    assert_eq!(pane.wait_exit(Duration::from_secs(30)), 130);
    let end = pane.everything();
    eprintln!("after Ctrl-C:\n{end}");
    assert_each_row_once(&end, "running on x86 (");
    assert!(end.contains("keeps running on the farm; follow it with `farm logs "), "{end}");
}
