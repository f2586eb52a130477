//! Child processes the bench starts, and what it reads about them from /proc.
//!
//! Every child dies with the bench (PR_SET_PDEATHSIG), is killed on drop, and keeps its output
//! lines so that a failure can say what the child said. Waiting is always "until a condition
//! holds, or fail at a deadline", never a fixed sleep.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Makes `cmd`'s child die when the bench dies (even by SIGKILL), so nothing outlives a run.
/// The kernel ties this to the thread that forks: the bench spawns from its main thread only.
pub fn die_with_parent(cmd: &mut Command) -> &mut Command {
    // SAFETY: prctl is async-signal-safe and touches only the (forked) child.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    cmd
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Ctrl-C or SIGTERM: the bench stops after the current step and still cleans up (the children,
/// in the same process group, get the terminal's SIGINT themselves and end the step early).
pub fn install_interrupt_handler() {
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
}

pub fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// Writes every dirty page to disk (sync(2)), so that a measurement does not pay for writeback
/// of what the bench generated before it: both sides of a comparison start from clean caches.
pub fn flush_dirty_pages() {
    // SAFETY: sync(2) has no preconditions.
    unsafe { libc::sync() };
}

/// Raises the soft open-files limit to the hard one: 1,000 QUIC connections and their streams.
pub fn raise_nofile() -> u64 {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                return raised.rlim_cur;
            }
        }
    }
    lim.rlim_cur
}

/// A long-running child (registry, coordinator, agent): its output lines are kept and can be
/// waited on.
pub struct Service {
    pub name: String,
    child: Option<Child>,
    lines: Arc<Mutex<Vec<String>>>,
    rx: mpsc::Receiver<String>,
}

impl Service {
    pub fn spawn(name: &str, cmd: &mut Command) -> Result<Service> {
        let mut child = die_with_parent(cmd)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        let (tx, rx) = mpsc::channel();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let readers: [Box<dyn Read + Send>; 2] =
            [Box::new(child.stdout.take().expect("piped")), Box::new(child.stderr.take().expect("piped"))];
        let echo = std::env::var_os("FARM_BENCH_ECHO").is_some();
        for stream in readers {
            let (keep, tx, tag) = (lines.clone(), tx.clone(), name.to_string());
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if echo {
                        eprintln!("[{tag}] {line}");
                    }
                    let mut keep = keep.lock().expect("not poisoned");
                    // A chatty child must not grow the bench: keep the most recent lines.
                    if keep.len() >= 20_000 {
                        keep.drain(..10_000);
                    }
                    keep.push(line.clone());
                    drop(keep);
                    let _ = tx.send(line);
                }
            });
        }
        Ok(Service { name: name.to_string(), child: Some(child), lines, rx })
    }

    /// Waits for an output line containing every one of `needles`.
    pub fn wait_for_line(&mut self, needles: &[&str], timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        let matches = |l: &str| needles.iter().all(|n| l.contains(n));
        if let Some(l) = self.lines.lock().expect("not poisoned").iter().find(|l| matches(l)) {
            return Ok(l.clone());
        }
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left.min(Duration::from_millis(200))) {
                Ok(l) if matches(&l) => return Ok(l),
                Ok(_) => {}
                Err(_) if Instant::now() >= deadline => {
                    bail!("{}: no line with {needles:?} within {timeout:?}; its output:\n{}", self.name, self.tail(30))
                }
                Err(_) => {
                    if let Some(status) = self.exited() {
                        bail!(
                            "{} exited ({status}) before printing {needles:?}; its output:\n{}",
                            self.name,
                            self.tail(30)
                        )
                    }
                }
            }
        }
    }

    /// The last `n` output lines.
    pub fn tail(&self, n: usize) -> String {
        let lines = self.lines.lock().expect("not poisoned");
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    /// SIGTERM, then SIGKILL if it has not gone within `grace`.
    pub fn stop(&mut self, grace: Duration) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + grace;
            while Instant::now() < deadline {
                if matches!(c.try_wait(), Ok(Some(_))) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A command run to its end, timed from spawn to exit, with each stdout line stamped with the
/// time (since spawn) it arrived.
pub struct Timed {
    pub ok: bool,
    pub status: String,
    pub wall: Duration,
    pub stdout: Vec<(Duration, String)>,
    pub stderr: String,
}

impl Timed {
    pub fn wall_s(&self) -> f64 {
        self.wall.as_secs_f64()
    }

    /// The error to report when the command failed: its status and the end of its stderr.
    pub fn failure(&self, what: &str) -> anyhow::Error {
        let tail: Vec<&str> = self.stderr.lines().rev().take(25).collect::<Vec<_>>().into_iter().rev().collect();
        let out: Vec<&str> =
            self.stdout.iter().rev().take(10).map(|(_, l)| l.as_str()).collect::<Vec<_>>().into_iter().rev().collect();
        anyhow::anyhow!("{what} failed ({}):\n{}\n{}", self.status, tail.join("\n"), out.join("\n"))
    }
}

pub fn run_timed(cmd: &mut Command) -> Result<Timed> {
    let program = format!("{:?}", cmd.get_program());
    let start = Instant::now();
    let mut child = die_with_parent(cmd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {program}"))?;
    let out = child.stdout.take().expect("piped");
    let mut err = child.stderr.take().expect("piped");
    let reader = std::thread::spawn(move || {
        BufReader::new(out).lines().map_while(Result::ok).map(|l| (start.elapsed(), l)).collect::<Vec<_>>()
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let status = child.wait().with_context(|| format!("waiting for {program}"))?;
    let wall = start.elapsed();
    let stdout = reader.join().unwrap_or_default();
    let stderr = err_reader.join().unwrap_or_default();
    Ok(Timed { ok: status.success(), status: status.to_string(), wall, stdout, stderr })
}

/// Runs `cmd`, which must succeed; returns its stdout.
pub fn run_ok(cmd: &mut Command, what: &str) -> Result<String> {
    let t = run_timed(cmd)?;
    if !t.ok {
        return Err(t.failure(what));
    }
    Ok(t.stdout.into_iter().map(|(_, l)| l).collect::<Vec<_>>().join("\n"))
}

/// Re-evaluates `probe` until it returns `Some`, or fails at the deadline. The short pause between
/// probes is a poll interval, not a synchronisation: the condition decides.
pub fn wait_until<T>(what: &str, timeout: Duration, mut probe: impl FnMut() -> Option<T>) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = probe() {
            return Ok(v);
        }
        check_interrupted()?;
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Resident set size of `pid` in bytes (VmRSS from /proc/PID/status).
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_vmrss(&status)
}

pub fn parse_vmrss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// CPU time `pid` has used (user + system), from /proc/PID/stat.
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let ticks = parse_stat_ticks(&stat)?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some(Duration::from_secs_f64(ticks as f64 / hz))
}

/// utime + stime (fields 14 and 15) of a /proc/PID/stat line; the command name in parentheses
/// may hold spaces, so fields are counted after its closing parenthesis.
pub fn parse_stat_ticks(stat: &str) -> Option<u64> {
    let after = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // After ")": field 3 (state) is index 0, so field N is index N - 3.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Samples a process's RSS in a background thread until dropped; remembers every sample.
pub struct RssSampler {
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<(Instant, u64)>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RssSampler {
    pub fn start(pid: u32, every: Duration) -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let (s, keep) = (stop.clone(), samples.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                if let Some(rss) = rss_bytes(pid) {
                    keep.lock().expect("not poisoned").push((Instant::now(), rss));
                }
                std::thread::sleep(every);
            }
        });
        RssSampler { stop, samples, thread: Some(thread) }
    }

    /// The largest sample taken between `from` and `to`.
    pub fn max_between(&self, from: Instant, to: Instant) -> Option<u64> {
        self.samples.lock().expect("not poisoned").iter().filter(|(t, _)| *t >= from && *t <= to).map(|s| s.1).max()
    }

    pub fn values_between(&self, from: Instant, to: Instant) -> Vec<u64> {
        self.samples.lock().expect("not poisoned").iter().filter(|(t, _)| *t >= from && *t <= to).map(|s| s.1).collect()
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Is `tool` on PATH?
pub fn have_tool(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|d| is_executable(&d.join(tool))))
        .unwrap_or(false)
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata().map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false)
}

/// Detaches every mount under `root` (buildah's overlay storage leaves its own bind mount behind),
/// deepest first, so that the directory can be removed.
pub fn unmount_under(root: &Path) {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else { return };
    let prefix = root.to_string_lossy().to_string();
    let mut points: Vec<String> = info
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .map(unescape_mount_path)
        .filter(|p| p == &prefix || p.starts_with(&format!("{prefix}/")))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in points {
        if let Ok(c) = std::ffi::CString::new(p) {
            // SAFETY: umount2 on a path we own; failures are ignored (already gone).
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape_mount_path(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\' {
            let code: String = chars.by_ref().take(3).collect();
            match u8::from_str_radix(&code, 8) {
                Ok(b) => out.push(b as char),
                Err(_) => {
                    out.push('\\');
                    out.push_str(&code);
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_vmrss_and_cpu_ticks() {
        let status = "Name:\tfarm\nVmPeak:\t  99999 kB\nVmRSS:\t   12345 kB\nThreads:\t4\n";
        assert_eq!(parse_vmrss(status), Some(12345 * 1024));
        assert_eq!(parse_vmrss("Name: x\n"), None);
        let stat = "4242 (farm (co) x) S 1 4242 4242 0 -1 4194560 1000 0 0 0 150 25 0 0 20 0 8 0 100 0 0";
        assert_eq!(parse_stat_ticks(stat), Some(175));
        assert!(rss_bytes(std::process::id()).unwrap() > 0);
        assert!(cpu_time(std::process::id()).is_some());
    }

    #[test]
    fn mount_paths_are_unescaped() {
        assert_eq!(unescape_mount_path(r"/var/tmp/a\040b"), "/var/tmp/a b");
        assert_eq!(unescape_mount_path("/plain"), "/plain");
    }
}
