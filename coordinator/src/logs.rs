//! Build logs on the coordinator's disk, so that they outlive the terminal that started the build.
//!
//! One file per build holds the lines a person saw live (each event's `describe()` line,
//! prefixed with its platform) in the order they happened, so `farm logs` replays exactly what
//! `farm build` showed. Each platform's share is bounded; past the bound one line says so.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::PathBuf;

use shared::Platform;

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
}
