//! Build logs on the coordinator's disk, so that they outlive the terminal that started the build.
//!
//! One file per build holds the lines a person saw live (each event's `describe()` line,
//! prefixed with its platform) in the order they happened, so `farm logs` replays exactly what
//! `farm build` showed. Each platform's share is bounded; past the bound one line says so.
//!
//! The files are written by one thread of their own ([`LogWriter`]), never by the driver: the
//! driver hands it lines and goes on, so a slow disk (a journal commit, a full page cache) never
//! holds up dispatch. The same thread feeds `farm logs --follow`, so a follower gets the stored
//! lines and then the live ones in exactly the order they were written.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::PathBuf;

use shared::Platform;
use tokio::sync::mpsc;

use crate::events::LogSink;

pub const DEFAULT_MAX_BYTES_PER_TASK: u64 = 8 << 20;

pub struct Logs {
    dir: PathBuf,
    max_bytes: u64,
    open: HashMap<String, BufWriter<File>>,
    written: HashMap<(String, Platform), u64>,
    truncated: HashSet<(String, Platform)>,
}

/// Build ids are ours (hex), but requests name them: refuse anything that could leave the dir.
fn valid_id(build: &str) -> bool {
    !build.is_empty() && build.len() <= 64 && build.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

impl Logs {
    pub fn new(dir: PathBuf, max_bytes: u64) -> Logs {
        Logs { dir, max_bytes, open: HashMap::new(), written: HashMap::new(), truncated: HashSet::new() }
    }

    fn path(&self, build: &str) -> PathBuf {
        self.dir.join(format!("{build}.log"))
    }

    pub fn append(&mut self, build: &str, platform: &Platform, line: &str) {
        if !valid_id(build) {
            return;
        }
        let key = (build.to_string(), platform.clone());
        let used = self.written.entry(key.clone()).or_default();
        let text = if *used + line.len() as u64 > self.max_bytes {
            if !self.truncated.insert(key) {
                return;
            }
            format!("farm: log truncated after {} bytes (config key max_log_bytes_per_task)", self.max_bytes)
        } else {
            *used += line.len() as u64 + 1;
            line.replace('\n', " ")
        };
        if !self.open.contains_key(build) {
            let _ = std::fs::create_dir_all(&self.dir);
            match OpenOptions::new().create(true).append(true).open(self.path(build)) {
                Ok(f) => {
                    self.open.insert(build.to_string(), BufWriter::new(f));
                }
                Err(e) => {
                    tracing::warn!(%build, "cannot write the build log: {e}");
                    return;
                }
            }
        }
        let w = self.open.get_mut(build).expect("opened above");
        let _ = writeln!(w, "{platform} {text}");
    }

    pub fn flush(&mut self) {
        for w in self.open.values_mut() {
            let _ = w.flush();
        }
    }

    /// The build has ended: its file is complete.
    pub fn close(&mut self, build: &str) {
        if let Some(mut w) = self.open.remove(build) {
            let _ = w.flush();
        }
        self.written.retain(|(b, _), _| b != build);
        self.truncated.retain(|(b, _)| b != build);
    }

    /// The stored lines of a build, optionally of one platform, in order.
    pub fn read(&mut self, build: &str, platform: Option<&Platform>) -> Vec<(Platform, String)> {
        if !valid_id(build) {
            return vec![];
        }
        if let Some(w) = self.open.get_mut(build) {
            let _ = w.flush();
        }
        let Ok(file) = File::open(self.path(build)) else { return vec![] };
        BufReader::new(file)
            .lines()
            .map_while(Result::ok)
            .filter_map(|l| {
                let (p, line) = l.split_once(' ')?;
                let p: Platform = p.parse().ok()?;
                platform.is_none_or(|want| *want == p).then(|| (p, line.to_string()))
            })
            .collect()
    }
}

/// What the driver asks of the log thread.
enum Command {
    Append {
        build: String,
        platform: Platform,
        line: String,
    },
    /// Stored lines of `build` (of `platform` or all) to `sink`; then live ones too if `live`.
    Follow {
        build: String,
        platform: Option<Platform>,
        sink: LogSink,
        live: bool,
    },
    Flush,
    /// The build ended: its file is complete and its followers are told (their sinks close).
    Close {
        build: String,
    },
}

/// The handle to the thread that owns the build log files: every call returns at once.
#[derive(Clone)]
pub struct LogWriter {
    tx: mpsc::UnboundedSender<Command>,
}

impl LogWriter {
    /// Starts the thread; it ends when every handle is dropped, after writing what it was given.
    pub fn spawn(logs: Logs) -> std::io::Result<LogWriter> {
        let (tx, mut rx) = mpsc::unbounded_channel();
        std::thread::Builder::new().name("farm-logs".into()).spawn(move || {
            let mut logs = logs;
            let mut followers: HashMap<String, Vec<(Option<Platform>, LogSink)>> = HashMap::new();
            while let Some(cmd) = rx.blocking_recv() {
                match cmd {
                    Command::Append { build, platform, line } => {
                        logs.append(&build, &platform, &line);
                        if let Some(f) = followers.get_mut(&build) {
                            f.retain(|(want, sink)| {
                                want.as_ref().is_some_and(|w| *w != platform)
                                    || sink.send((platform.clone(), line.clone())).is_ok()
                            });
                        }
                    }
                    Command::Follow { build, platform, sink, live } => {
                        let stored = logs.read(&build, platform.as_ref());
                        if stored.into_iter().all(|line| sink.send(line).is_ok()) && live {
                            followers.entry(build).or_default().push((platform, sink));
                        }
                    }
                    Command::Flush => logs.flush(),
                    Command::Close { build } => {
                        logs.close(&build);
                        followers.remove(&build);
                    }
                }
            }
            logs.flush();
        })?;
        Ok(LogWriter { tx })
    }

    pub fn append(&self, build: &str, platform: &Platform, line: &str) {
        let cmd = Command::Append { build: build.into(), platform: platform.clone(), line: line.into() };
        let _ = self.tx.send(cmd);
    }

    /// Sends `build`'s stored lines to `sink`, then, if `live`, each line appended after this call
    /// until the build is closed.
    pub fn follow(&self, build: &str, platform: Option<Platform>, sink: LogSink, live: bool) {
        let _ = self.tx.send(Command::Follow { build: build.into(), platform, sink, live });
    }

    pub fn flush(&self) {
        let _ = self.tx.send(Command::Flush);
    }

    pub fn close(&self, build: &str) {
        let _ = self.tx.send(Command::Close { build: build.into() });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_come_back_in_order_filtered_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let mut logs = Logs::new(dir.path().to_path_buf(), 30);
        let (a, b): (Platform, Platform) = ("linux/amd64".parse().unwrap(), "linux/arm64".parse().unwrap());
        logs.append("b1", &a, "one");
        logs.append("b1", &b, "two words");
        logs.append("b1", &a, "three");
        assert_eq!(
            logs.read("b1", None),
            vec![(a.clone(), "one".into()), (b.clone(), "two words".into()), (a.clone(), "three".into())]
        );
        assert_eq!(logs.read("b1", Some(&b)), vec![(b.clone(), "two words".into())]);
        for _ in 0..10 {
            logs.append("b1", &b, "0123456789");
        }
        logs.close("b1");
        let lines = logs.read("b1", Some(&b));
        // "two words" and one "0123456789" fit in 30 bytes (with their newlines); then one notice.
        assert_eq!(lines.len(), 3, "{lines:?}");
        assert!(lines[2].1.contains("log truncated after 30 bytes"));
        assert!(logs.read("../etc/passwd", None).is_empty());
    }

    #[tokio::test]
    async fn a_follower_gets_stored_lines_then_live_ones_in_order_until_the_build_closes() {
        let dir = tempfile::tempdir().unwrap();
        let writer = LogWriter::spawn(Logs::new(dir.path().to_path_buf(), 1 << 20)).unwrap();
        let a: Platform = "linux/amd64".parse().unwrap();
        writer.append("b1", &a, "stored");
        let (sink, mut lines) = mpsc::unbounded_channel();
        writer.follow("b1", None, sink, true);
        writer.append("b1", &a, "live");
        writer.close("b1");
        let mut got = vec![];
        while let Some((_, line)) = lines.recv().await {
            got.push(line);
        }
        assert_eq!(got, ["stored", "live"]);

        // An ended build: its stored lines, then the sink closes.
        let (sink, mut lines) = mpsc::unbounded_channel();
        writer.follow("b1", None, sink, false);
        let mut got = vec![];
        while let Some((_, line)) = lines.recv().await {
            got.push(line);
        }
        assert_eq!(got, ["stored", "live"]);
    }
}
