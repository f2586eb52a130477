//! Helpers for fault tests: a small tmpfs to fill a disk, and a TCP proxy in front of a registry
//! that holds image uploads until the test lets them go (to act while an agent is pushing).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Condvar, Mutex};

/// A tmpfs of `size` (`20m`) mounted on a directory (created), lazily unmounted on drop (the
/// processes using it may still run). Needs root, as the tests run.
pub struct Tmpfs {
    pub dir: PathBuf,
}

impl Tmpfs {
    pub fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mounting a {size} tmpfs on {} failed (the fault tests run as root): {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs { dir: dir.to_path_buf() }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

/// A plain TCP proxy to `upstream` that records every HTTP request line it forwards and, while
/// holding, keeps back each request that starts or continues a blob upload (`/blobs/uploads/`)
/// until [`HoldProxy::release`].
pub struct HoldProxy {
    pub addr: String,
    /// (still holding, an upload is being held back), and the release's wake-up.
    gate: Arc<(Mutex<(bool, bool)>, Condvar)>,
    requests: Arc<Mutex<Vec<String>>>,
}

const METHODS: [&str; 6] = ["GET ", "HEAD ", "PUT ", "POST ", "PATCH ", "DELETE "];

impl HoldProxy {
    pub fn start(upstream: &str) -> HoldProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let proxy =
            HoldProxy { addr, gate: Arc::new((Mutex::new((true, false)), Condvar::new())), requests: Arc::default() };
        let (gate, requests, upstream) = (proxy.gate.clone(), proxy.requests.clone(), upstream.to_string());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(server) = TcpStream::connect(&upstream) else { continue };
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || copy(s2, c2));
                let (gate, requests) = (gate.clone(), requests.clone());
                std::thread::spawn(move || upload_side(client, server, &gate, &requests));
            }
        });
        proxy
    }

    /// Whether an upload is being held back now.
    pub fn holding_an_upload(&self) -> bool {
        self.gate.0.lock().unwrap().1
    }

    /// Lets every held and later request through.
    pub fn release(&self) {
        self.gate.0.lock().unwrap().0 = false;
        self.gate.1.notify_all();
    }

    /// The request lines forwarded so far (`PUT /v2/app/manifests/sha256:... HTTP/1.1`).
    pub fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

fn copy(mut from: TcpStream, mut to: TcpStream) {
    let _ = std::io::copy(&mut from, &mut to);
    let _ = to.shutdown(std::net::Shutdown::Write);
}

fn upload_side(
    mut client: TcpStream,
    mut server: TcpStream,
    gate: &(Mutex<(bool, bool)>, Condvar),
    requests: &Mutex<Vec<String>>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match client.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let chunk = &buf[..n];
        let text = String::from_utf8_lossy(chunk);
        let lines: Vec<String> =
            text.lines().filter(|l| METHODS.iter().any(|m| l.starts_with(m))).map(String::from).collect();
        if lines.iter().any(|l| l.contains("/blobs/uploads/")) {
            // Wait for the test's release; the test sees that an upload is held.
            let mut state = gate.0.lock().unwrap();
            if state.0 {
                state.1 = true;
            }
            while state.0 {
                state = gate.1.wait(state).unwrap();
            }
        }
        requests.lock().unwrap().extend(lines);
        if server.write_all(chunk).is_err() {
            break;
        }
    }
    let _ = server.shutdown(std::net::Shutdown::Write);
}
