//! Config files and defaults. Precedence: flags, then FARM_* environment variables (both via
//! clap), then the TOML file, then defaults that work on one machine on loopback.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Deserialize;

/// Every key a farm config file may hold; each command reads the ones it needs. Unknown keys are
/// an error, so that a typo does not silently fall back to a default.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub coordinator: Option<String>,
    pub ca_dir: Option<PathBuf>,
    pub name: Option<String>,
    pub listen: Option<String>,
    pub state_dir: Option<PathBuf>,
    pub heartbeat_timeout_secs: Option<f64>,
    pub max_frame_bytes: Option<usize>,
    pub work_dir: Option<PathBuf>,
    pub capacity: Option<u32>,
    pub drain_timeout_secs: Option<f64>,
    pub cache_limit_gb: Option<f64>,
    /// `buildah`, `docker` or `auto`.
    pub builder: Option<String>,
    /// The Docker Engine, `unix:///PATH` or `tcp://HOST:PORT`.
    pub docker_host: Option<String>,
    /// Each build's memory limit: `"2GiB"`, `"512MiB"`, `"1.5G"` or a number of bytes.
    pub memory_limit: Option<Size>,
    /// Registry host → mirror to pull base images from.
    #[serde(default)]
    pub mirrors: BTreeMap<String, String>,
    /// Builds may ask for the host's network (`farm build --network host`).
    pub allow_host_network: Option<bool>,
    /// Builds may ask for every capability and no seccomp (`--allow security.insecure`).
    pub allow_insecure: Option<bool>,
    /// The coordinator signs every index it pushes (as `farm build --sign`).
    pub sign: Option<bool>,
    pub max_log_bytes_per_task: Option<u64>,
    pub max_attempts: Option<u32>,
    /// Coordinator: where Prometheus scrapes `GET /metrics` (plain HTTP), e.g. "127.0.0.1:9376".
    pub metrics_listen: Option<String>,
    /// Coordinator: where the web dashboard is served (HTTPS with the coordinator's certificate),
    /// e.g. "0.0.0.0:8443"; `farm dashboard` prints a login link.
    pub dashboard_listen: Option<String>,
    /// Coordinator: `[[webhooks]]` told when any build ends.
    #[serde(default)]
    pub webhooks: Vec<WebhookFile>,
    /// Coordinator: signs the notices sent to builds' own `--notify` URLs.
    pub notify_secret: Option<String>,
    pub max_context_files: Option<usize>,
    pub max_context_bytes: Option<u64>,
    pub max_builds_per_client: Option<usize>,
    pub max_platforms_per_build: Option<usize>,
    pub max_build_args: Option<usize>,
    pub max_build_arg_bytes: Option<usize>,
    pub max_tags: Option<usize>,
    pub max_secrets: Option<usize>,
    pub max_secret_bytes: Option<usize>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub platforms: PlatformsFile,
    pub transport: Option<shared::quic::TransportLimits>,
    /// `host:port` registries reached over plain HTTP.
    #[serde(default)]
    pub insecure_registries: Vec<String>,
    /// Coordinator: `REGISTRY/REPOSITORY[:TAG]` under which every build's platforms share their
    /// layer cache (`--cache-to` / `--cache-from` override it per build).
    pub cache_repo: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookFile {
    pub url: String,
    /// Makes the `X-Farm-Signature-256` header (HMAC-SHA256 of the body).
    pub secret: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlatformsFile {
    pub native: Option<Vec<String>>,
    pub emulated: Option<Vec<String>>,
    #[serde(default)]
    pub extra_native: Vec<String>,
    #[serde(default)]
    pub extra_emulated: Vec<String>,
    pub binfmt_dir: Option<PathBuf>,
}

/// A size in a config file: a string with a unit, or a number of bytes.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Size {
    Bytes(u64),
    Text(String),
}

/// The agent's `memory_limit`: the flag (and FARM_MEMORY_LIMIT), then the file; an error names
/// the key.
pub fn memory_limit(flag: Option<&str>, file: Option<&Size>) -> Result<Option<u64>> {
    let (text, key) = match (flag, file) {
        (Some(f), _) => (f.to_string(), "--memory-limit"),
        (None, Some(Size::Text(t))) => (t.clone(), "memory_limit"),
        (None, Some(Size::Bytes(b))) => (b.to_string(), "memory_limit"),
        (None, None) => return Ok(None),
    };
    agent::cgroup::parse_size(&text).map(Some).map_err(|e| anyhow::anyhow!("{key}: {e}"))
}

/// `$XDG_CONFIG_HOME/farm`, else `~/.config/farm`.
pub fn config_home() -> PathBuf {
    xdg("XDG_CONFIG_HOME", ".config").join("farm")
}

/// `$XDG_STATE_HOME/farm`, else `~/.local/state/farm`.
pub fn state_home() -> PathBuf {
    xdg("XDG_STATE_HOME", ".local/state").join("farm")
}

fn xdg(var: &str, fallback: &str) -> PathBuf {
    match std::env::var_os(var) {
        Some(v) if !v.is_empty() => PathBuf::from(v),
        _ => std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/root")).join(fallback),
    }
}

/// Loads `explicit` (an error if missing) or, for the CLI, `~/.config/farm/config.toml` if present.
pub fn load(explicit: Option<&Path>, user_default: bool) -> Result<FileConfig> {
    let path = match explicit {
        Some(p) => p.to_path_buf(),
        None if user_default => {
            let p = config_home().join("config.toml");
            if !p.exists() {
                return Ok(FileConfig::default());
            }
            p
        }
        None => return Ok(FileConfig::default()),
    };
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read config file {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("invalid config file {}", path.display()))
}

/// `KEY=VALUE` labels from flags, on top of the file's.
pub fn labels(file: &BTreeMap<String, String>, flags: &[String]) -> Result<BTreeMap<String, String>> {
    labels_flag(file, flags, "--label")
}

/// The same, for the flag named `flag` (its name is in the error).
pub fn labels_flag(file: &BTreeMap<String, String>, flags: &[String], flag: &str) -> Result<BTreeMap<String, String>> {
    let mut out = file.clone();
    for l in flags {
        let (k, v) = l
            .split_once('=')
            .filter(|(k, _)| !k.is_empty())
            .with_context(|| format!("{flag} {l:?} is not KEY=VALUE (e.g. {flag} gpu=nvidia)"))?;
        out.insert(k.to_string(), v.to_string());
    }
    Ok(out)
}

/// Platforms from repeatable, comma-separated flags; `none` is the empty list.
pub fn platforms(values: &[String]) -> Result<Option<Vec<shared::Platform>>> {
    if values.is_empty() {
        return Ok(None);
    }
    let mut out = Vec::new();
    for v in values {
        if v.trim() == "none" {
            continue;
        }
        for p in shared::Platform::parse_list(v)? {
            if !out.contains(&p) {
                out.push(p);
            }
        }
    }
    Ok(Some(out))
}

pub fn parse_all(values: &[String]) -> Result<Vec<shared::Platform>> {
    Ok(platforms(values)?.unwrap_or_default())
}

/// Writes the client config (`coordinator`, `ca_dir`, `name`) that `farm ca init` and `farm
/// login` imply, unless the user already has one; says what it did.
pub fn write_client(coordinator: &str, ca_dir: &Path, name: &str) -> Result<String> {
    let path = config_home().join("config.toml");
    if path.exists() {
        return Ok(format!(
            "{} exists and was left alone; to use this farm set coordinator = {coordinator:?}, ca_dir = {:?}, name = {name:?} in it",
            path.display(),
            ca_dir.display().to_string()
        ));
    }
    std::fs::create_dir_all(config_home()).with_context(|| format!("creating {}", config_home().display()))?;
    let ca_dir = &std::fs::canonicalize(ca_dir).unwrap_or_else(|_| ca_dir.to_path_buf());
    let text = format!("coordinator = {coordinator:?}\nca_dir = {:?}\nname = {name:?}\n", ca_dir.display().to_string());
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(format!(
        "wrote {}: farm commands on this machine now use the coordinator at {coordinator} as {name:?}",
        path.display()
    ))
}

/// The agent's builder and Docker Engine: flags (and FARM_BUILDER, FARM_DOCKER_HOST), then the file.
pub fn builder(
    flag: Option<&str>,
    flag_host: Option<&str>,
    file_builder: Option<&str>,
    file_host: Option<&str>,
) -> Result<(agent::BuilderChoice, Option<String>)> {
    let choice = match flag.or(file_builder) {
        Some(b) => b.parse().map_err(anyhow::Error::msg)?,
        None => agent::BuilderChoice::Auto,
    };
    Ok((choice, flag_host.or(file_host).map(str::to_string)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agent_example_config_parses_with_its_limits_and_mirrors() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/agent.toml.example");
        let file = load(Some(&path), false).unwrap();
        assert_eq!(memory_limit(None, file.memory_limit.as_ref()).unwrap(), Some(2 << 30));
        assert_eq!(file.mirrors.get("docker.io").map(String::as_str), Some("mirror.lan:5000"));
        // The flag wins; a number of bytes is a size too; errors name the key they came from.
        assert_eq!(memory_limit(Some("512MiB"), file.memory_limit.as_ref()).unwrap(), Some(512 << 20));
        assert_eq!(memory_limit(None, Some(&Size::Bytes(1 << 30))).unwrap(), Some(1 << 30));
        let e = memory_limit(None, Some(&Size::Text("big".into()))).unwrap_err().to_string();
        assert!(e.starts_with("memory_limit: \"big\" is not a size"), "{e}");
        assert_eq!(memory_limit(None, None).unwrap(), None);
    }
}
