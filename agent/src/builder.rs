//! The program that turns a context into an image. Only buildah for now (daemonless, runs as a
//! plain process per build); the interface is small so docker buildx or BuildKit can follow.

use std::process::Command;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuilderInfo {
    pub name: String,
    pub version: String,
}

#[derive(Debug, thiserror::Error)]
pub enum BuilderError {
    #[error("buildah not found ({0}); install it with `deploy/install.sh` or `apt-get install buildah`")]
    Missing(std::io::Error),
    #[error("`buildah --version` failed: {0}")]
    Version(String),
}

/// Finds buildah and its version (`buildah version 1.28.2 (image-spec ...)`).
pub fn detect() -> Result<BuilderInfo, BuilderError> {
    let out = Command::new("buildah").arg("--version").output().map_err(BuilderError::Missing)?;
    if !out.status.success() {
        return Err(BuilderError::Version(String::from_utf8_lossy(&out.stderr).trim().to_string()));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let version = parse_version(&text).ok_or_else(|| BuilderError::Version(format!("unexpected output {text:?}")))?;
    Ok(BuilderInfo { name: "buildah".into(), version })
}

fn parse_version(text: &str) -> Option<String> {
    let mut words = text.split_whitespace();
    (words.next()? == "buildah" && words.next()? == "version").then(|| words.next().map(str::to_string))?
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_buildah_version() {
        let v = super::parse_version("buildah version 1.28.2 (image-spec 1.0.2-dev, runtime-spec 1.0.2-dev)\n");
        assert_eq!(v.as_deref(), Some("1.28.2"));
        assert_eq!(super::parse_version("podman version 4"), None);
    }
}
