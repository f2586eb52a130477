//! The farm's signing key on disk, and signatures pushed to a registry in cosign's formats (the
//! formats themselves are the pure [`crate::cosign`]).
//!
//! The key is `signing.key` (PKCS#8 PEM, mode 0600) in the coordinator's CA directory, made by
//! `farm ca init` or `farm signing init`. Only the coordinator reads it; nothing prints it.
//!
//! - [`sign_image`]: the simple-signing signature of an image (the build's index) under
//!   `sha256-<hex>.sig`, what `cosign verify --key` checks;
//! - [`attest`]: any in-toto statement about an image as a DSSE envelope under
//!   `sha256-<hex>.att`, what `cosign verify-attestation --key --type` checks.

use std::fs::{self, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use crate::cosign::{self, CosignError, Layer, SigningKey};
use crate::oci::{ImageRef, OCI_MANIFEST};
use crate::registry::{Registry, RegistryError};
use crate::Digest;

/// The private key's file in the CA directory.
pub const SIGNING_KEY: &str = "signing.key";

#[derive(Debug, thiserror::Error)]
pub enum SigningError {
    #[error(
        "{} already exists: refusing to replace the farm's signing key (images signed with it would no longer verify \
         against a new public key); move it away first if you really mean to",
        .path.display()
    )]
    Exists { path: PathBuf },
    #[error(
        "no signing key in {}: run `farm signing init --dir {}` on the coordinator's machine (then restart the coordinator)",
        .dir.display(), .dir.display()
    )]
    NoKey { dir: PathBuf },
    #[error("{} holds no farm CA (ca.crt): create one with `farm ca init --dir {}`", .dir.display(), .dir.display())]
    NoCa { dir: PathBuf },
    #[error("cannot {action} {}: {source}", .path.display())]
    Io { action: &'static str, path: PathBuf, source: io::Error },
    #[error("{}: {source}", .path.display())]
    BadKey { path: PathBuf, source: CosignError },
    #[error(transparent)]
    Cosign(#[from] CosignError),
    #[error("signing in {repo}: {source}")]
    Registry { repo: String, source: RegistryError },
}

/// Creates `dir/signing.key` (a new ECDSA P-256 key, 0600) in a directory that holds a farm CA;
/// refuses to replace an existing one. Returns the key (for its public half) and the path.
pub fn init_signing_key(dir: &Path) -> Result<(SigningKey, PathBuf), SigningError> {
    if !dir.join(crate::tls::CA_CERT).exists() {
        return Err(SigningError::NoCa { dir: dir.to_path_buf() });
    }
    let path = dir.join(SIGNING_KEY);
    if path.exists() {
        return Err(SigningError::Exists { path });
    }
    let key = loop {
        let mut secret = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut secret).expect("the OS has randomness");
        if let Some(key) = SigningKey::from_secret(&secret) {
            break key;
        }
    };
    let io = |action, source| SigningError::Io { action, path: path.clone(), source };
    let mut file = OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path).map_err(|e| {
        if e.kind() == io::ErrorKind::AlreadyExists {
            SigningError::Exists { path: path.clone() }
        } else {
            io("create", e)
        }
    })?;
    file.set_permissions(fs::Permissions::from_mode(0o600)).map_err(|e| io("set the mode of", e))?;
    file.write_all(key.to_pem().as_bytes()).and_then(|()| file.sync_all()).map_err(|e| io("write", e))?;
    Ok((key, path))
}

/// Reads `dir/signing.key`; `Ok(None)` if there is none.
pub fn load_signing_key(dir: &Path) -> Result<Option<SigningKey>, SigningError> {
    let path = dir.join(SIGNING_KEY);
    let pem = match fs::read_to_string(&path) {
        Ok(pem) => pem,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(SigningError::Io { action: "read", path, source }),
    };
    SigningKey::from_pem(&pem).map(Some).map_err(|source| SigningError::BadKey { path, source })
}

/// Like [`load_signing_key`], but a missing key is an error that says how to make one.
pub fn require_signing_key(dir: &Path) -> Result<SigningKey, SigningError> {
    load_signing_key(dir)?.ok_or_else(|| SigningError::NoKey { dir: dir.to_path_buf() })
}

/// Signs image `digest` of `repo` (its index or a manifest) as `cosign sign --key` does: a
/// simple-signing payload naming `registry/repository` and the digest, appended to the
/// signature image tagged `sha256-<hex>.sig` in the same repository (nothing pushed if that
/// exact signature is already there). Returns the signature image's digest.
pub async fn sign_image(
    registry: &Registry,
    key: &SigningKey,
    repo: &ImageRef,
    digest: &Digest,
) -> Result<Digest, SigningError> {
    let (payload, layer) = cosign::signature_layer(key, &repo.name(), digest);
    push_layer(registry, repo, digest, cosign::SIG_SUFFIX, &payload, layer).await
}

/// Attaches an in-toto `statement` (any predicate type; its subject must name `subject` by
/// sha256 for cosign to match it) to image `subject` of `repo` as `cosign attest --key` does: a
/// DSSE envelope (payload type `application/vnd.in-toto+json`, keyid ""), appended to the
/// attestation image tagged `sha256-<hex>.att` with the `predicateType` annotation. Returns the
/// attestation image's digest.
pub async fn attest(
    registry: &Registry,
    key: &SigningKey,
    repo: &ImageRef,
    subject: &Digest,
    statement: &[u8],
) -> Result<Digest, SigningError> {
    let (envelope, layer) = cosign::attestation_layer(key, statement)?;
    push_layer(registry, repo, subject, cosign::ATT_SUFFIX, &envelope, layer).await
}

/// Appends `layer` (whose blob is `blob`) to the signature image `sha256-<hex>.<suffix>` of
/// `digest` in `repo`, creating it if there is none.
async fn push_layer(
    registry: &Registry,
    repo: &ImageRef,
    digest: &Digest,
    suffix: &str,
    blob: &[u8],
    layer: Layer,
) -> Result<Digest, SigningError> {
    let wrap = |source| SigningError::Registry { repo: repo.name(), source };
    let tag = repo.with_tag(&cosign::tag_for(digest, suffix));
    let existing = match registry.fetch_manifest(&tag).await {
        Ok((bytes, _, _)) => cosign::parse_layers(&bytes)?,
        Err(RegistryError::NotFound { .. }) => Vec::new(),
        Err(e) => return Err(wrap(e)),
    };
    let Some(layers) = cosign::append_layer(existing.clone(), layer) else {
        let (_, manifest) = cosign::signature_image(&existing);
        return Ok(Digest::of(&manifest));
    };
    registry.push_blob(repo, blob).await.map_err(wrap)?;
    let (config, manifest) = cosign::signature_image(&layers);
    registry.push_blob(repo, &config).await.map_err(wrap)?;
    registry.push_manifest(&tag, &manifest, OCI_MANIFEST).await.map_err(wrap)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn init_writes_a_0600_key_once_and_only_beside_a_ca() {
        let dir = tempfile::tempdir().unwrap();
        let err = init_signing_key(dir.path()).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "{} holds no farm CA (ca.crt): create one with `farm ca init --dir {}`",
                dir.path().display(),
                dir.path().display()
            )
        );
        fs::write(dir.path().join(crate::tls::CA_CERT), "x").unwrap();
        assert!(load_signing_key(dir.path()).unwrap().is_none());
        assert!(require_signing_key(dir.path()).unwrap_err().to_string().contains("run `farm signing init --dir"));
        let (key, path) = init_signing_key(dir.path()).unwrap();
        assert_eq!(path, dir.path().join(SIGNING_KEY));
        assert_eq!(mode(&path), 0o600);
        assert_eq!(load_signing_key(dir.path()).unwrap().unwrap().public_key_pem(), key.public_key_pem());
        let before = fs::read(&path).unwrap();
        let err = init_signing_key(dir.path()).unwrap_err();
        assert!(
            err.to_string().starts_with(&format!("{} already exists: refusing to replace", path.display())),
            "{err}"
        );
        assert_eq!(fs::read(&path).unwrap(), before);
    }
}
