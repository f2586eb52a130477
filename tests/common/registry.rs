//! A real OCI registry (Debian's docker-registry, the CNCF distribution registry) on a random
//! loopback port, seeded with a multi-arch busybox made from Debian's busybox-static packages,
//! and helpers to read back what a build pushed.

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use shared::oci::{self, ImageRef};
use shared::registry::Registry as Client;
use shared::Digest;

use super::{require_tool, wait_until, Proc};

pub struct Registry {
    pub addr: String,
    _proc: Proc,
    _dir: tempfile::TempDir,
}

impl Registry {
    /// A registry on 127.0.0.1.
    pub fn start() -> Registry {
        Self::start_on(std::net::Ipv4Addr::LOCALHOST)
    }

    /// A registry bound to `ip`: loopback, or an address of a link a test created (e.g. the root
    /// side of a [`super::netns::Netns`] link, so that both namespaces reach it).
    pub fn start_on(ip: std::net::Ipv4Addr) -> Registry {
        require_tool("docker-registry");
        let dir = tempfile::tempdir().unwrap();
        let port = TcpListener::bind((ip, 0)).unwrap().local_addr().unwrap().port();
        let addr = format!("{ip}:{port}");
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n",
                dir.path().join("data").display()
            ),
        )
        .unwrap();
        let mut cmd = Command::new("docker-registry");
        cmd.arg("serve").arg(&config);
        let proc = Proc::spawn("registry", &mut cmd);
        wait_until("the registry to answer", Duration::from_secs(20), || {
            http_get(&addr, "/v2/").filter(|(status, _)| *status == 200).map(|_| ())
        });
        Registry { addr, _proc: proc, _dir: dir }
    }

    /// Pushes the multi-arch busybox base image; returns its reference.
    pub fn seed_busybox(&self) -> String {
        self.seed_busybox_as("busybox:latest")
    }

    /// Pushes the multi-arch busybox base image as `repository:tag` (e.g. `library/busybox:1.35`,
    /// as a Docker Hub mirror holds it); returns its reference.
    pub fn seed_busybox_as(&self, repository_tag: &str) -> String {
        require_tool("buildah");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/busybox-image.sh");
        let out = Command::new("bash").arg(script).args(["push", &self.addr, repository_tag]).output().unwrap();
        assert!(
            out.status.success(),
            "pushing the busybox base image failed (run `deploy/install.sh --test-deps`): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        format!("{}/{repository_tag}", self.addr)
    }

    /// `farm build` flags (after any client flags) that build `context` for `platforms` on the
    /// seeded base image and push it as `tag` in this registry.
    pub fn build_flags(&self, base: &str, platforms: &str, tag: &str, context: &std::path::Path) -> Vec<String> {
        [
            "--platform",
            platforms,
            "--insecure-registry",
            &self.addr,
            "--build-arg",
            &format!("BASE={base}"),
            "-t",
            &format!("{}/{tag}", self.addr),
            context.to_str().unwrap(),
        ]
        .map(String::from)
        .to_vec()
    }

    /// The user's tags of a repository (not the `sha256-<hex>` referrers fallback tags provenance
    /// writes), or none if it does not exist.
    pub fn tags(&self, repo: &str) -> Vec<String> {
        self.all_tags(repo).into_iter().filter(|t| !t.starts_with("sha256-")).collect()
    }

    /// Every tag of a repository, referrers fallback tags included.
    pub fn all_tags(&self, repo: &str) -> Vec<String> {
        match http_get(&self.addr, &format!("/v2/{repo}/tags/list")) {
            Some((200, body)) => {
                let v: serde_json::Value = serde_json::from_str(&body).unwrap();
                v["tags"]
                    .as_array()
                    .map(|t| t.iter().map(|s| s.as_str().unwrap().to_string()).collect())
                    .unwrap_or_default()
            }
            _ => vec![],
        }
    }

    /// The repositories the registry holds (its catalog).
    #[allow(dead_code)]
    pub fn catalog(&self) -> Vec<String> {
        match http_get(&self.addr, "/v2/_catalog") {
            Some((200, body)) => {
                let v: serde_json::Value = serde_json::from_str(&body).unwrap();
                v["repositories"].as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_string()).collect()
            }
            other => panic!("the registry's catalog: {other:?}"),
        }
    }

    /// Where the registry keeps its blobs.
    pub fn data_dir(&self) -> std::path::PathBuf {
        self._dir.path().join("data")
    }

    pub fn client(&self) -> Client {
        Client::new(std::slice::from_ref(&self.addr), None)
    }
}

/// A minimal HTTP/1.0 GET on loopback: (status, body).
fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    use std::io::Write;
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Some((status, body))
}

/// One platform's image as the registry holds it.
#[derive(Debug)]
pub struct PlatformImage {
    pub platform: String,
    pub digest: Digest,
    pub config: oci::OciPlatform,
    /// Files of every layer, path → contents (later layers win).
    pub files: std::collections::BTreeMap<String, Vec<u8>>,
}

/// Reads the index at `reference` and every platform's config and layers.
pub fn read_image(registry: &Registry, reference: &str) -> (Digest, String, Vec<PlatformImage>) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let client = registry.client();
        let r: ImageRef = reference.parse().unwrap();
        let (bytes, media_type, digest) = client.fetch_manifest(&r).await.expect("fetch the image index");
        let mut images = Vec::new();
        for d in oci::parse_index(&bytes).unwrap() {
            // buildx's attestation manifests (provenance) are no platform's image.
            if d.annotations.get("vnd.docker.reference.type").is_some_and(|t| t == "attestation-manifest") {
                continue;
            }
            let (mbytes, _, _) = client.fetch_manifest(&r.with_digest(&d.digest)).await.unwrap();
            let m: serde_json::Value = serde_json::from_slice(&mbytes).unwrap();
            let config_digest: Digest = m["config"]["digest"].as_str().unwrap().parse().unwrap();
            let config = client.fetch_blob(&r, &config_digest).await.unwrap();
            let mut files = std::collections::BTreeMap::new();
            for layer in m["layers"].as_array().unwrap() {
                let ld: Digest = layer["digest"].as_str().unwrap().parse().unwrap();
                let blob = client.fetch_blob(&r, &ld).await.unwrap();
                let gz = layer["mediaType"].as_str().unwrap().ends_with("gzip");
                let reader: Box<dyn Read> =
                    if gz { Box::new(flate2::read::GzDecoder::new(&blob[..])) } else { Box::new(&blob[..]) };
                let mut archive = tar::Archive::new(reader);
                for entry in archive.entries().unwrap() {
                    let mut entry = entry.unwrap();
                    let path = entry.path().unwrap().to_string_lossy().trim_start_matches("./").to_string();
                    let mut data = Vec::new();
                    entry.read_to_end(&mut data).unwrap();
                    files.insert(path, data);
                }
            }
            let p = d.platform.clone().expect("index entries carry a platform");
            let platform = match &p.variant {
                Some(v) => format!("{}/{}/{}", p.os, p.architecture, v),
                None => format!("{}/{}", p.os, p.architecture),
            };
            images.push(PlatformImage {
                platform,
                digest: d.digest,
                config: oci::config_platform(&config).unwrap(),
                files,
            });
        }
        (digest, media_type, images)
    })
}

impl PlatformImage {
    pub fn text(&self, path: &str) -> String {
        let bytes =
            self.files.get(path).unwrap_or_else(|| panic!("{} has no {path}: {:?}", self.platform, self.files.keys()));
        String::from_utf8_lossy(bytes).trim().to_string()
    }
}
