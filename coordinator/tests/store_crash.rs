//! Acceptance: "SIGKILL during a burst of 1,000 acknowledged state changes loses none of them".
//!
//! Self-exec: the parent test runs this very test binary again, filtered to [`burst_child`], reads
//! its acknowledgements line by line and SIGKILLs it mid-burst; then it reopens the store and checks
//! that every acknowledged change is there, intact, in both tables.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use coordinator::store::{Batch, Store, StoreError};
use serde::{Deserialize, Serialize};

const DIR_ENV: &str = "FARM_STORE_BURST_DIR";
const BURST: u64 = 1000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Record {
    index: u64,
    label: String,
    payload: Vec<u8>,
}

fn task(i: u64) -> Record {
    Record { index: i, label: format!("task {i}"), payload: (0..64).map(|k| (i * 31 + k) as u8).collect() }
}

fn build(i: u64) -> Record {
    Record { index: i, label: format!("b{i}"), payload: (0..48).map(|k| (i * 7 + k * 3) as u8).collect() }
}

/// The child half of the crash test: does nothing unless `FARM_STORE_BURST_DIR` is set; then it
/// commits 1,000 batches (task `i` and build `b{i}` each) and prints `acked {i}` after each commit.
#[test]
fn burst_child() {
    let Some(dir) = std::env::var_os(DIR_ENV) else { return };
    let store = Store::open(Path::new(&dir)).expect("child: open store");
    let mut out = std::io::stdout().lock();
    // libtest may have written "test burst_child ... " without a newline: start on a fresh line.
    writeln!(out).unwrap();
    for i in 0..BURST {
        let mut batch = Batch::default();
        batch.put_task(i, &task(i)).put_build(&format!("b{i}"), &build(i));
        store.commit(&batch).expect("child: commit");
        writeln!(out, "acked {i}").unwrap();
        out.flush().unwrap();
    }
}

struct Round {
    /// Acknowledgements read, including those drained from the pipe after the kill.
    acked: u64,
    /// Changes found on disk afterwards.
    stored: u64,
    elapsed: Duration,
}

/// Runs one child into a fresh directory, kills it after `kill_after` acks (or lets it finish), and
/// checks the store it leaves behind.
fn round(kill_after: Option<u64>) -> Round {
    let dir = tempfile::tempdir().unwrap();
    let start = Instant::now();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["burst_child", "--exact", "--nocapture", "--test-threads=1"])
        .env(DIR_ENV, dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn the child test binary");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut next = 0u64; // acks arrive in order: `next` is how many were seen
    let mut transcript = Vec::new();
    let mut killed = false;
    for line in lines.by_ref() {
        let line = line.expect("read child stdout");
        if let Some(i) = line.strip_prefix("acked ") {
            let i: u64 = i.parse().unwrap_or_else(|_| panic!("bad ack line {line:?}"));
            assert_eq!(i, next, "acks out of order");
            next += 1;
            if next == 1 {
                // The child holds the file: another process must be refused, not let in.
                let err = Store::open(dir.path()).expect_err("a second process opened a store in use");
                assert!(matches!(err, StoreError::Locked { .. }), "{err:?}");
            }
        } else {
            transcript.push(line);
        }
        if kill_after.is_some_and(|n| next >= n) {
            child.kill().expect("SIGKILL the child");
            killed = true;
            break;
        }
    }
    // Whatever the child printed before it died was acknowledged too: drain the pipe to EOF.
    for line in lines {
        if let Some(i) = line.expect("read child stdout").strip_prefix("acked ") {
            assert_eq!(i.parse::<u64>().unwrap(), next, "acks out of order");
            next += 1;
        }
    }
    let status = child.wait().unwrap();
    let elapsed = start.elapsed();
    if killed {
        assert!(!status.success(), "the child should have died of SIGKILL: {status}");
    } else {
        assert!(status.success(), "child failed: {status}; output:\n{}", transcript.join("\n"));
        assert_eq!(next, BURST, "child finished without all acks; output:\n{}", transcript.join("\n"));
    }

    // Reopening takes the lock the dead child held and recovers the file.
    let store = Store::open(dir.path()).expect("reopen after the crash");
    let loaded = store.load::<Record, Record, Record>().expect("every stored record decodes");
    let stored = loaded.tasks.len() as u64;
    // Atomic batches, committed in order: a gap-free prefix 0..stored of tasks, with the same builds.
    for (n, (id, value)) in loaded.tasks.iter().enumerate() {
        assert_eq!(*id, n as u64, "tasks are not a prefix: gap before {id}");
        assert_eq!(*value, task(*id), "task {id} is corrupt");
    }
    let mut builds = loaded.builds;
    builds.sort_by_key(|(_, b)| b.index);
    assert_eq!(builds.len() as u64, stored, "tasks and builds differ: a batch was torn");
    for (n, (id, value)) in builds.iter().enumerate() {
        let n = n as u64;
        assert_eq!(*id, format!("b{n}"), "builds are not the same set as tasks");
        assert_eq!(*value, build(n), "build {id} is corrupt");
    }
    assert!(loaded.agents.is_empty());
    assert!(stored >= next, "lost acknowledged changes: acked {next}, stored {stored}");
    // At most the one commit in flight when the kill landed is there without its ack.
    assert!(stored <= next + 1, "stored {stored} changes but only {next} were acked and one was in flight");
    Round { acked: next, stored, elapsed }
}

#[test]
fn sigkill_during_a_burst_loses_no_acknowledged_change() {
    for kill_after in [100, 400, 700] {
        let r = round(Some(kill_after));
        eprintln!(
            "kill after {kill_after} acks: {} acked, {} stored, {:.2?} ({:.2?}/commit)",
            r.acked,
            r.stored,
            r.elapsed,
            r.elapsed / r.stored.max(1) as u32
        );
        assert!(r.acked >= kill_after);
    }
}

#[test]
fn a_burst_run_to_the_end_keeps_all_1000_changes() {
    let r = round(None);
    eprintln!(
        "full burst: {} acked, {} stored, {:.2?} ({:.2?}/commit)",
        r.acked,
        r.stored,
        r.elapsed,
        r.elapsed / 1000
    );
    assert_eq!((r.acked, r.stored), (BURST, BURST));
}
