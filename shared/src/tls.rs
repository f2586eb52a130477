//! The farm's own certificate authority and the identities it issues.
//!
//! Peers reach each other over networks farm does not control (home NATs, shared labs), so every
//! connection is mutually authenticated and the only trust anchor is the farm's CA: a peer is who
//! its certificate says (name in Subject CN, role in Subject OU), and nothing else is believed.
//! There is deliberately no plaintext mode and no "skip verification" switch; instead, every
//! failure says which file is missing or which command fixes it.

use std::fmt;
use std::fs::{self, DirBuilder, OpenOptions};
use std::io::{self, Write};
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use crate::digest::sha256_hex;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::SignatureScheme;
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};

/// File name of the CA certificate inside a CA directory.
pub const CA_CERT: &str = "ca.crt";
/// File name of the CA private key inside a CA directory.
pub const CA_KEY: &str = "ca.key";
/// The coordinator's identity name; its files are `coordinator.crt` and `coordinator.key`.
pub const COORDINATOR_NAME: &str = "coordinator";
/// The ALPN protocol every farm connection negotiates.
pub const ALPN: &[u8] = b"farm/1";

/// Subject O of every certificate the farm issues.
const ORGANIZATION: &str = "farm";
/// Subject CN of the CA certificate, followed by a short id of its key: two farms' CAs must never
/// share a subject, or a peer of one farm would be refused for a bad signature instead of an
/// unknown issuer.
const CA_COMMON_NAME: &str = "farm CA";
const CA_VALIDITY_DAYS: i64 = 3653;
const LEAF_VALIDITY_DAYS: i64 = 730;
/// notBefore is backdated this much so that peers with slightly slow clocks accept new certs.
const CLOCK_SKEW: time::Duration = time::Duration::hours(1);
/// Names that can never be issued with `issue`: "ca" would collide with the CA's own files and
/// the coordinator's certificate is only made by `init_ca`.
const RESERVED_NAMES: [&str; 2] = ["ca", COORDINATOR_NAME];

/// What a peer is allowed to be. Carried in the certificate's Subject OU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Coordinator,
    Agent,
    Client,
    Admin,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Coordinator, Role::Agent, Role::Client, Role::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Coordinator => "coordinator",
            Role::Agent => "agent",
            Role::Client => "client",
            Role::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = TlsError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL.into_iter().find(|role| role.as_str() == s).ok_or_else(|| TlsError::UnknownRole(s.to_string()))
    }
}

/// Who a peer is, as proven by its certificate.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Identity {
    pub name: String,
    pub role: Role,
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {:?}", self.role, self.name)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("not a farm join token: expected farm1.<64 hex>.<8 hex>.<32 hex>, as `farm token create` prints it")]
    BadToken,
    #[error(
        "invalid name {0:?}: names are 1 to 63 characters, start with a lowercase letter or a \
         digit, and continue with lowercase letters, digits, '.', '_' or '-'"
    )]
    InvalidName(String),
    #[error("the name {0:?} is reserved; choose another name")]
    ReservedName(String),
    #[error("unknown role {0:?}: expected one of coordinator, agent, client, admin")]
    UnknownRole(String),
    #[error(
        "role {0} cannot be issued with `farm ca issue` (the coordinator's certificate is made by \
         `farm ca init`); use agent, client or admin"
    )]
    RoleNotIssuable(Role),
    #[error(
        "invalid subject alternative name {san:?}: expected an IP address or a DNS name such as \
         build.example.org"
    )]
    InvalidSan { san: String },
    #[error("no farm CA in {}: {CA_CERT} not found; create one with `farm ca init --dir {}`", .dir.display(), .dir.display())]
    NoCa { dir: PathBuf },
    #[error(
        "no CA key in {}: {CA_KEY} not found; certificates can only be issued where the farm CA \
         was created (`farm ca init`)",
        .dir.display()
    )]
    NoCaKey { dir: PathBuf },
    #[error("{}/{CA_KEY} does not belong to {}/{CA_CERT}; restore the pair that `farm ca init` created", .dir.display(), .dir.display())]
    CaKeyMismatch { dir: PathBuf },
    #[error("{} already exists: refusing to overwrite a farm CA (delete the directory to start over)", .path.display())]
    CaExists { path: PathBuf },
    #[error(
        "no identity {name:?} in {}: {name}.crt not found; issue one with `farm ca issue --dir {} \
         --role agent --name {name}`",
        .dir.display(), .dir.display()
    )]
    NoIdentity { dir: PathBuf, name: String },
    #[error(
        "no key for identity {name:?} in {}: {name}.key not found; reissue it with `farm ca issue \
         --dir {} --role <role> --name {name} --force`",
        .dir.display(), .dir.display()
    )]
    NoKey { dir: PathBuf, name: String },
    #[error("{} already exists: refusing to replace it (pass --force to reissue)", .path.display())]
    IdentityExists { path: PathBuf },
    #[error("cannot {action} {}: {source}", .path.display())]
    Io { action: &'static str, path: PathBuf, source: io::Error },
    #[error("{} is not a valid PEM {what}: {reason}", .path.display())]
    Pem { path: PathBuf, what: &'static str, reason: String },
    #[error("not a farm certificate: {0}")]
    BadCertificate(String),
    #[error("cannot generate a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("cannot build the TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    #[error("cannot build the client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// Checks that `name` can be an identity (and a file name): 1..=63 characters, `[a-z0-9]`
/// first, then `[a-z0-9._-]`.
pub fn validate_name(name: &str) -> Result<(), TlsError> {
    let bytes = name.as_bytes();
    let valid = (1..=63).contains(&bytes.len())
        && (bytes[0].is_ascii_lowercase() || bytes[0].is_ascii_digit())
        && bytes[1..].iter().all(|&b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
    if valid {
        Ok(())
    } else {
        Err(TlsError::InvalidName(name.to_string()))
    }
}

/// What `init_ca` created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaInit {
    pub ca_cert: PathBuf,
    pub coordinator_cert: PathBuf,
    /// The coordinator certificate's subject alternative names, as written.
    pub sans: Vec<String>,
    /// [`fingerprint`] of the new CA certificate.
    pub fingerprint: String,
}

/// What `issue` wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Creates `dir` (0700) with `ca.crt`, `ca.key`, `coordinator.crt` and `coordinator.key` (keys
/// 0600). The coordinator certificate is valid for "localhost", 127.0.0.1, ::1, this host's name
/// (when it is a valid DNS name) and every `extra_sans` entry (an IP literal becomes an IP SAN,
/// anything else a DNS SAN). CA valid 10 years, coordinator 2 years, ECDSA P-256 keys.
pub fn init_ca(dir: &Path, extra_sans: &[String]) -> Result<CaInit, TlsError> {
    let mut sans = vec!["localhost".to_string(), "127.0.0.1".to_string(), "::1".to_string()];
    sans.extend(local_hostname());
    for san in extra_sans {
        sans.push(normalize_san(san)?);
    }
    let mut seen = std::collections::HashSet::new();
    sans.retain(|san| seen.insert(san.clone()));

    DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(|source| io_error("create", dir, source))?;
    for file in [CA_KEY, CA_CERT] {
        let path = dir.join(file);
        if path.exists() {
            return Err(TlsError::CaExists { path });
        }
    }

    let now = time::OffsetDateTime::now_utc();
    let ca_key = KeyPair::generate()?;
    let key_id = sha256_hex(ca_key.public_key_raw());
    let mut ca_params = CertificateParams::default();
    ca_params.distinguished_name = rcgen::DistinguishedName::new();
    ca_params.distinguished_name.push(DnType::CommonName, format!("{CA_COMMON_NAME} {}", &key_id[..12]));
    ca_params.distinguished_name.push(DnType::OrganizationName, ORGANIZATION);
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    ca_params.not_before = now - CLOCK_SKEW;
    ca_params.not_after = now + time::Duration::days(CA_VALIDITY_DAYS);
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);

    let mut params = CertificateParams::new(sans.clone())?;
    leaf_params(&mut params, COORDINATOR_NAME, Role::Coordinator, now, now + time::Duration::days(LEAF_VALIDITY_DAYS));
    let leaf_key = KeyPair::generate()?;
    let leaf_cert = params.signed_by(&leaf_key, &issuer)?;

    // ca.key is written first and only if absent: it is what marks a directory as holding a CA.
    let ca_key_path = dir.join(CA_KEY);
    write_file(&ca_key_path, issuer.key().serialize_pem().as_bytes(), 0o600, false).map_err(|e| match e {
        TlsError::Io { source, .. } if source.kind() == io::ErrorKind::AlreadyExists => {
            TlsError::CaExists { path: ca_key_path.clone() }
        }
        e => e,
    })?;
    let ca_cert_path = dir.join(CA_CERT);
    write_file(&ca_cert_path, ca_cert.pem().as_bytes(), 0o644, true)?;
    let key_path = dir.join(format!("{COORDINATOR_NAME}.key"));
    write_file(&key_path, leaf_key.serialize_pem().as_bytes(), 0o600, true)?;
    let coordinator_cert = dir.join(format!("{COORDINATOR_NAME}.crt"));
    write_file(&coordinator_cert, leaf_cert.pem().as_bytes(), 0o644, true)?;

    Ok(CaInit { ca_cert: ca_cert_path, coordinator_cert, sans, fingerprint: fingerprint(ca_cert.der()) })
}

/// Issues `<dir>/<name>.crt` and `<dir>/<name>.key`, signed by `<dir>/ca.key`, with CN=name,
/// OU=role, O=farm, valid 2 years (never beyond the CA). Refuses reserved names, the coordinator
/// role, and replacing an existing `<name>.crt` unless `force`.
pub fn issue(dir: &Path, role: Role, name: &str, force: bool) -> Result<Issued, TlsError> {
    if role == Role::Coordinator {
        return Err(TlsError::RoleNotIssuable(role));
    }
    validate_name(name)?;
    if RESERVED_NAMES.contains(&name) {
        return Err(TlsError::ReservedName(name.to_string()));
    }

    let ca = CertAuthority::open(dir)?;
    let cert_path = dir.join(format!("{name}.crt"));
    if !force && cert_path.exists() {
        return Err(TlsError::IdentityExists { path: cert_path });
    }

    let now = time::OffsetDateTime::now_utc();
    let not_after = (now + time::Duration::days(LEAF_VALIDITY_DAYS)).min(ca.not_after);
    let mut params = CertificateParams::default();
    leaf_params(&mut params, name, role, now, not_after);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &ca.issuer)?;

    let key_path = dir.join(format!("{name}.key"));
    write_file(&key_path, key.serialize_pem().as_bytes(), 0o600, true)?;
    write_file(&cert_path, cert.pem().as_bytes(), 0o644, true)?;
    Ok(Issued { cert: cert_path, key: key_path })
}

/// The farm CA's signing half: `ca.crt` with `ca.key`. The coordinator holds one when it may
/// enroll peers itself (join tokens); `farm ca issue` uses it directly.
pub struct CertAuthority {
    issuer: Issuer<'static, KeyPair>,
    pub cert: CertificateDer<'static>,
    not_after: time::OffsetDateTime,
}

impl fmt::Debug for CertAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertAuthority").field("cert", &fingerprint(&self.cert)).finish_non_exhaustive()
    }
}

impl CertAuthority {
    /// Reads `dir/ca.crt` and `dir/ca.key` and checks that they belong together.
    pub fn open(dir: &Path) -> Result<CertAuthority, TlsError> {
        let ca_der = read_ca_cert(dir)?;
        let ca_key_path = dir.join(CA_KEY);
        let ca_key_pem = match fs::read_to_string(&ca_key_path) {
            Ok(pem) => pem,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(TlsError::NoCaKey { dir: dir.to_path_buf() }),
            Err(source) => return Err(io_error("read", &ca_key_path, source)),
        };
        let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(|e| TlsError::Pem {
            path: ca_key_path.clone(),
            what: "private key",
            reason: e.to_string(),
        })?;
        let (_, ca) = x509_parser::parse_x509_certificate(&ca_der).map_err(|e| TlsError::Pem {
            path: dir.join(CA_CERT),
            what: "certificate",
            reason: e.to_string(),
        })?;
        if ca.public_key().subject_public_key.data.as_ref() != ca_key.public_key_raw() {
            return Err(TlsError::CaKeyMismatch { dir: dir.to_path_buf() });
        }
        let not_after = ca.validity().not_after.to_datetime();
        let issuer = Issuer::from_ca_cert_der(&ca_der, ca_key)?;
        Ok(CertAuthority { issuer, cert: ca_der, not_after })
    }

    /// Signs a certificate signing request: the key is the requester's (it never leaves its
    /// host); name and role are the CA's decision, not the request's.
    pub fn sign_csr(&self, csr_der: &[u8], name: &str, role: Role) -> Result<String, TlsError> {
        validate_name(name)?;
        // "admin" is the identity `farm ca init` makes: an agent of that name could be mistaken
        // for it, and revoking one (revocation is by name) would lock out the other.
        if RESERVED_NAMES.contains(&name) || (name == "admin" && role != Role::Admin) {
            return Err(TlsError::ReservedName(name.to_string()));
        }
        if role == Role::Coordinator {
            return Err(TlsError::RoleNotIssuable(role));
        }
        let csr_der = rustls_pki_types::CertificateSigningRequestDer::from(csr_der.to_vec());
        let mut csr = rcgen::CertificateSigningRequestParams::from_der(&csr_der)?;
        let now = time::OffsetDateTime::now_utc();
        let not_after = (now + time::Duration::days(LEAF_VALIDITY_DAYS)).min(self.not_after);
        let mut params = CertificateParams::default();
        leaf_params(&mut params, name, role, now, not_after);
        csr.params = params;
        Ok(csr.signed_by(&self.issuer)?.pem())
    }
}

/// A fresh key pair and a certificate signing request for `name`: the key stays here (PEM).
pub fn new_csr(name: &str) -> Result<(String, Vec<u8>), TlsError> {
    validate_name(name)?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, name);
    let csr = params.serialize_request(&key)?;
    Ok((key.serialize_pem(), csr.der().to_vec()))
}

/// Stores what joining returned: the CA certificate and this peer's certificate and key (0600).
pub fn store_joined(dir: &Path, name: &str, key_pem: &str, cert_pem: &str, ca_pem: &str) -> Result<Issued, TlsError> {
    validate_name(name)?;
    fs::create_dir_all(dir).map_err(|e| io_error("create", dir, e))?;
    write_file(&dir.join(CA_CERT), ca_pem.as_bytes(), 0o644, true)?;
    let key = dir.join(format!("{name}.key"));
    let cert = dir.join(format!("{name}.crt"));
    write_file(&key, key_pem.as_bytes(), 0o600, true)?;
    write_file(&cert, cert_pem.as_bytes(), 0o644, true)?;
    Ok(Issued { cert, key })
}

/// A join token: `farm1.<sha256 of the CA certificate>.<id>.<secret>`. The fingerprint lets the
/// joiner check that it talks to the right farm before sending the secret (as k3s's `K10<hash>`
/// tokens and kubeadm's CA pin do); the id names the token for revocation; only a hash of the
/// secret is kept by the coordinator.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    pub ca_sha256: String,
    pub id: String,
    pub secret: String,
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JoinToken({}, secret <redacted>)", self.id)
    }
}

impl fmt::Display for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "farm1.{}.{}.{}", self.ca_sha256, self.id, self.secret)
    }
}

impl FromStr for JoinToken {
    type Err = TlsError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || TlsError::BadToken;
        let mut parts = s.trim().split('.');
        let (Some("farm1"), Some(ca), Some(id), Some(secret), None) =
            (parts.next(), parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        let hex =
            |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase());
        if !hex(ca, 64) || !hex(id, 8) || !hex(secret, 32) {
            return Err(bad());
        }
        Ok(JoinToken { ca_sha256: ca.into(), id: id.into(), secret: secret.into() })
    }
}

/// Client side of joining: no client certificate yet; the server is trusted only if its chain
/// carries a CA certificate with the token's fingerprint, and its leaf verifies against it.
pub fn join_client_config(ca_sha256: &str) -> Result<rustls::ClientConfig, TlsError> {
    let verifier = Arc::new(PinnedCaVerifier { ca_sha256: ca_sha256.to_string(), provider: provider() });
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(config)
}

#[derive(Debug)]
struct PinnedCaVerifier {
    ca_sha256: String,
    provider: Arc<CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &rustls_pki_types::ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let ca = intermediates.iter().find(|c| sha256_hex(c.as_ref()) == self.ca_sha256).ok_or_else(|| {
            rustls::Error::General(
                "the coordinator's CA does not match the join token's fingerprint: wrong coordinator, or a \
                 machine in the middle; nothing secret was sent"
                    .into(),
            )
        })?;
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, &[], server_name, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// SHA-256 of a certificate's DER, as `sha256:<lowercase hex>`.
pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    format!("sha256:{}", sha256_hex(cert.as_ref()))
}

/// Everything a peer needs to connect: the CA to trust, its own chain and key, and who it is.
pub struct Credentials {
    pub ca: CertificateDer<'static>,
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub identity: Identity,
}

impl Clone for Credentials {
    fn clone(&self) -> Self {
        Self {
            ca: self.ca.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            identity: self.identity.clone(),
        }
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("identity", &self.identity)
            .field("ca", &fingerprint(&self.ca))
            .field("chain_len", &self.chain.len())
            .finish_non_exhaustive()
    }
}

/// Reads `dir/ca.crt`, `dir/<name>.crt` and `dir/<name>.key` (PEM); the identity comes from the
/// certificate itself.
pub fn load_credentials(dir: &Path, name: &str) -> Result<Credentials, TlsError> {
    validate_name(name)?;
    let ca = read_ca_cert(dir)?;

    let cert_path = dir.join(format!("{name}.crt"));
    let pem = match fs::read(&cert_path) {
        Ok(pem) => pem,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(TlsError::NoIdentity { dir: dir.to_path_buf(), name: name.to_string() })
        }
        Err(source) => return Err(io_error("read", &cert_path, source)),
    };
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(&cert_path, "certificate", e))?;
    if chain.is_empty() {
        return Err(pem_error(&cert_path, "certificate", rustls_pki_types::pem::Error::NoItemsFound));
    }

    let key_path = dir.join(format!("{name}.key"));
    let pem = match fs::read(&key_path) {
        Ok(pem) => pem,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(TlsError::NoKey { dir: dir.to_path_buf(), name: name.to_string() })
        }
        Err(source) => return Err(io_error("read", &key_path, source)),
    };
    let key = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| pem_error(&key_path, "private key", e))?;

    let identity = identity_from_cert(&chain[0])?;
    Ok(Credentials { ca, chain, key, identity })
}

/// Reads name (Subject CN) and role (Subject OU) from a certificate.
pub fn identity_from_cert(cert: &CertificateDer<'_>) -> Result<Identity, TlsError> {
    let bad = |reason: String| TlsError::BadCertificate(reason);
    let (_, cert) =
        x509_parser::parse_x509_certificate(cert.as_ref()).map_err(|e| bad(format!("cannot parse it: {e}")))?;
    let subject = cert.subject();
    let name = subject
        .iter_common_name()
        .next()
        .ok_or_else(|| bad("no Subject CN (the peer's name)".into()))?
        .as_str()
        .map_err(|e| bad(format!("unreadable Subject CN: {e}")))?;
    validate_name(name).map_err(|_| bad(format!("Subject CN {name:?} is not a farm name")))?;
    let role = subject
        .iter_organizational_unit()
        .next()
        .ok_or_else(|| bad("no Subject OU (the peer's role)".into()))?
        .as_str()
        .map_err(|e| bad(format!("unreadable Subject OU: {e}")))?;
    let role = role.parse::<Role>().map_err(|_| bad(format!("unknown role {role:?} in Subject OU")))?;
    Ok(Identity { name: name.to_string(), role })
}

/// Server side: TLS 1.3 only, ALPN `farm/1`. A client certificate, when presented, must chain to
/// `creds.ca` (refusals are logged with who the peer claims to be). A peer without one is let
/// through the handshake only to join with a token: the coordinator serves it nothing else. The
/// CA certificate is sent along, so that joiners can check it against their token.
pub fn server_config(creds: &Credentials) -> Result<rustls::ServerConfig, TlsError> {
    let provider = provider();
    let inner = WebPkiClientVerifier::builder_with_provider(Arc::new(roots(creds)?), provider.clone())
        .allow_unauthenticated()
        .build()?;
    let verifier = Arc::new(LoggingClientVerifier { inner, logged: Default::default() });
    let mut chain = creds.chain.clone();
    if !chain.contains(&creds.ca) {
        chain.push(creds.ca.clone());
    }
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, creds.key.clone_key())?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(config)
}

/// The web dashboard's HTTPS side: the coordinator's own certificate (and the CA after it), no
/// client certificates (browsers log in with a token instead), TLS 1.2 and 1.3, ALPN `http/1.1`.
pub fn https_server_config(creds: &Credentials) -> Result<rustls::ServerConfig, TlsError> {
    let mut chain = creds.chain.clone();
    if !chain.contains(&creds.ca) {
        chain.push(creds.ca.clone());
    }
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_single_cert(chain, creds.key.clone_key())?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// Client side: TLS 1.3 only, ALPN `farm/1`, trusts `creds.ca` alone (no system roots) and
/// presents `creds.chain`.
pub fn client_config(creds: &Credentials) -> Result<rustls::ClientConfig, TlsError> {
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(creds)?)
        .with_client_auth_cert(creds.chain.clone(), creds.key.clone_key())?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(config)
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(creds: &Credentials) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    roots.add(creds.ca.clone())?;
    Ok(roots)
}

/// The WebPki verifier, plus one log line per refused client saying who it claimed to be and
/// how to fix it: without it, a refused agent only shows up as a handshake error on its side.
/// The same refusal again is logged at most every [`crate::refusals::QUIET`] (a peer retrying
/// in a loop would flood the log); the coordinator counts every one in its metrics.
#[derive(Debug)]
struct LoggingClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    logged: std::sync::Mutex<crate::refusals::RefusalLog<String>>,
}

impl ClientCertVerifier for LoggingClientVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner.verify_client_cert(end_entity, intermediates, now).inspect_err(|err| {
            let message = refusal_message(end_entity, err);
            let log = self.logged.lock().unwrap().note(message.clone(), std::time::Instant::now());
            match log {
                Some(0) => tracing::warn!(
                    "{message} (the same refusal again is logged at most every {} s)",
                    crate::refusals::QUIET.as_secs()
                ),
                Some(n) => tracing::warn!("{message} ({n} more since its last line)"),
                None => tracing::debug!("{message}"),
            }
        })
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }

    fn requires_raw_public_keys(&self) -> bool {
        self.inner.requires_raw_public_keys()
    }
}

fn refusal_message(end_entity: &CertificateDer<'_>, err: &rustls::Error) -> String {
    let who = match identity_from_cert(end_entity) {
        Ok(identity) => identity.to_string(),
        Err(_) => "a peer".to_string(),
    };
    let why = match err {
        rustls::Error::InvalidCertificate(e @ (CertificateError::UnknownIssuer | CertificateError::BadSignature)) => {
            format!("certificate not signed by this farm's CA ({e:?}); issue one with `farm ca issue`")
        }
        err => err.to_string(),
    };
    format!("refused {who}: {why}")
}

/// Lowercases DNS names and canonicalises IP literals (brackets around IPv6 are accepted).
fn normalize_san(san: &str) -> Result<String, TlsError> {
    let trimmed = san.trim();
    let unbracketed = trimmed.strip_prefix('[').and_then(|s| s.strip_suffix(']')).unwrap_or(trimmed);
    if let Ok(ip) = unbracketed.parse::<IpAddr>() {
        return Ok(ip.to_string());
    }
    let name = trimmed.to_ascii_lowercase();
    if is_dns_name(&name) {
        Ok(name)
    } else {
        Err(TlsError::InvalidSan { san: san.to_string() })
    }
}

fn is_dns_name(name: &str) -> bool {
    !name.is_empty() && name.parse::<IpAddr>().is_err() && rustls_pki_types::DnsName::try_from(name).is_ok()
}

/// This host's name, lowercased, if it is usable as a DNS SAN.
fn local_hostname() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for `buf.len()` bytes; gethostname writes at most that many.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let from_libc = (rc == 0)
        .then(|| {
            let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
            String::from_utf8_lossy(&buf[..end]).into_owned()
        })
        .filter(|name| !name.is_empty());
    let name = from_libc.or_else(|| fs::read_to_string("/etc/hostname").ok())?;
    let name = name.trim().to_ascii_lowercase();
    is_dns_name(&name).then_some(name)
}

fn leaf_params(
    params: &mut CertificateParams,
    name: &str,
    role: Role,
    now: time::OffsetDateTime,
    not_after: time::OffsetDateTime,
) {
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    params.distinguished_name.push(DnType::OrganizationalUnitName, role.as_str());
    params.distinguished_name.push(DnType::OrganizationName, ORGANIZATION);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    // Only the coordinator serves; everyone (the coordinator included) may authenticate as a client.
    params.extended_key_usages = match role {
        Role::Coordinator => vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth],
        _ => vec![ExtendedKeyUsagePurpose::ClientAuth],
    };
    params.use_authority_key_identifier_extension = true;
    params.not_before = now - CLOCK_SKEW;
    params.not_after = not_after;
}

fn read_ca_cert(dir: &Path) -> Result<CertificateDer<'static>, TlsError> {
    let path = dir.join(CA_CERT);
    let pem = match fs::read(&path) {
        Ok(pem) => pem,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(TlsError::NoCa { dir: dir.to_path_buf() }),
        Err(source) => return Err(io_error("read", &path, source)),
    };
    CertificateDer::from_pem_slice(&pem).map_err(|e| pem_error(&path, "certificate", e))
}

/// Writes `contents` to `path` with `mode`. Key files are created with their final mode, so they
/// are never readable by others, not even while being written; an existing file is truncated
/// and re-moded before anything is written.
fn write_file(path: &Path, contents: &[u8], mode: u32, overwrite: bool) -> Result<(), TlsError> {
    let mut options = OpenOptions::new();
    options.write(true).mode(mode);
    if overwrite {
        options.create(true).truncate(true);
    } else {
        options.create_new(true);
    }
    let write = || -> io::Result<()> {
        let mut file = options.open(path)?;
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        file.write_all(contents)?;
        file.sync_all()
    };
    write().map_err(|source| io_error("write", path, source))
}

fn io_error(action: &'static str, path: &Path, source: io::Error) -> TlsError {
    TlsError::Io { action, path: path.to_path_buf(), source }
}

fn pem_error(path: &Path, what: &'static str, err: rustls_pki_types::pem::Error) -> TlsError {
    TlsError::Pem { path: path.to_path_buf(), what, reason: err.to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    fn read_cert(path: &Path) -> CertificateDer<'static> {
        CertificateDer::from_pem_file(path).unwrap()
    }

    #[test]
    fn init_ca_creates_four_files_with_private_keys() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ca");
        let init = init_ca(&dir, &["build.example.org".into(), "10.1.2.3".into()]).unwrap();

        assert_eq!(mode(&dir), 0o700);
        for file in ["ca.crt", "coordinator.crt"] {
            assert!(dir.join(file).is_file(), "{file}");
        }
        for file in ["ca.key", "coordinator.key"] {
            assert_eq!(mode(&dir.join(file)), 0o600, "{file}");
        }
        assert_eq!(init.ca_cert, dir.join(CA_CERT));
        assert_eq!(init.coordinator_cert, dir.join("coordinator.crt"));
        for san in ["localhost", "127.0.0.1", "::1", "build.example.org", "10.1.2.3"] {
            assert!(init.sans.iter().any(|s| s == san), "{san} in {:?}", init.sans);
        }
        assert_eq!(init.fingerprint, fingerprint(&read_cert(&init.ca_cert)));

        let creds = load_credentials(&dir, COORDINATOR_NAME).unwrap();
        assert_eq!(creds.identity, Identity { name: COORDINATOR_NAME.into(), role: Role::Coordinator });
    }

    #[test]
    fn init_ca_refuses_a_second_init() {
        let tmp = tempfile::tempdir().unwrap();
        init_ca(tmp.path(), &[]).unwrap();
        let before = fs::read(tmp.path().join(CA_KEY)).unwrap();
        let err = init_ca(tmp.path(), &[]).unwrap_err();
        assert!(matches!(err, TlsError::CaExists { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("ca.key already exists: refusing to overwrite a farm CA"), "{msg}");
        assert_eq!(fs::read(tmp.path().join(CA_KEY)).unwrap(), before);
    }

    #[test]
    fn two_farms_have_distinct_ca_subjects() {
        let subject = |dir: &Path| {
            let der = read_cert(&dir.join(CA_CERT));
            let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).unwrap();
            cert.subject().to_string()
        };
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        init_ca(a.path(), &[]).unwrap();
        init_ca(b.path(), &[]).unwrap();
        assert!(subject(a.path()).contains("farm CA "), "{}", subject(a.path()));
        assert_ne!(subject(a.path()), subject(b.path()));
    }

    #[test]
    fn init_ca_refuses_bad_sans() {
        let tmp = tempfile::tempdir().unwrap();
        let err = init_ca(tmp.path(), &["not a name".into()]).unwrap_err();
        assert!(matches!(err, TlsError::InvalidSan { .. }), "{err:?}");
        assert!(!tmp.path().join(CA_KEY).exists());
    }

    #[test]
    fn sans_are_normalised() {
        assert_eq!(normalize_san("[::1]").unwrap(), "::1");
        assert_eq!(normalize_san("Build.Example.org").unwrap(), "build.example.org");
        assert_eq!(normalize_san("192.168.1.2").unwrap(), "192.168.1.2");
    }

    #[test]
    fn issue_and_load_round_trip() {
        let tmp = tempfile::tempdir().unwrap();
        let init = init_ca(tmp.path(), &[]).unwrap();
        for (role, name) in [(Role::Agent, "pi-4"), (Role::Client, "alice"), (Role::Admin, "ops.1")] {
            let issued = issue(tmp.path(), role, name, false).unwrap();
            assert_eq!(issued.cert, tmp.path().join(format!("{name}.crt")));
            assert_eq!(mode(&issued.key), 0o600);
            let creds = load_credentials(tmp.path(), name).unwrap();
            assert_eq!(creds.identity, Identity { name: name.into(), role });
            assert_eq!(fingerprint(&creds.ca), init.fingerprint);
            assert_eq!(creds.chain.len(), 1);
            let clone = creds.clone();
            assert_eq!(clone.key.secret_der(), creds.key.secret_der());
        }
    }

    #[test]
    fn issue_refuses_to_overwrite_unless_forced() {
        let tmp = tempfile::tempdir().unwrap();
        init_ca(tmp.path(), &[]).unwrap();
        issue(tmp.path(), Role::Agent, "pi-4", false).unwrap();
        let before = fs::read(tmp.path().join("pi-4.crt")).unwrap();
        let err = issue(tmp.path(), Role::Agent, "pi-4", false).unwrap_err();
        assert!(matches!(err, TlsError::IdentityExists { .. }), "{err:?}");
        assert_eq!(fs::read(tmp.path().join("pi-4.crt")).unwrap(), before);

        issue(tmp.path(), Role::Client, "pi-4", true).unwrap();
        assert_ne!(fs::read(tmp.path().join("pi-4.crt")).unwrap(), before);
        let creds = load_credentials(tmp.path(), "pi-4").unwrap();
        assert_eq!(creds.identity.role, Role::Client);
    }

    #[test]
    fn issue_refuses_reserved_and_bad_names_and_the_coordinator_role() {
        let tmp = tempfile::tempdir().unwrap();
        init_ca(tmp.path(), &[]).unwrap();
        for name in ["ca", COORDINATOR_NAME] {
            let err = issue(tmp.path(), Role::Agent, name, true).unwrap_err();
            assert!(matches!(err, TlsError::ReservedName(_)), "{name}: {err:?}");
        }
        for name in ["", "Pi", "../etc", "-x", "a b"] {
            let err = issue(tmp.path(), Role::Agent, name, false).unwrap_err();
            assert!(matches!(err, TlsError::InvalidName(_)), "{name:?}: {err:?}");
        }
        let err = issue(tmp.path(), Role::Coordinator, "other", false).unwrap_err();
        assert!(matches!(err, TlsError::RoleNotIssuable(_)), "{err:?}");
    }

    #[test]
    fn missing_files_say_how_to_fix_them() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().display();
        let err = issue(tmp.path(), Role::Agent, "pi-4", false).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("no farm CA in {dir}: ca.crt not found; create one with `farm ca init --dir {dir}`")
        );
        init_ca(tmp.path(), &[]).unwrap();
        let err = load_credentials(tmp.path(), "pi-4").unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "no identity \"pi-4\" in {dir}: pi-4.crt not found; issue one with \
                 `farm ca issue --dir {dir} --role agent --name pi-4`"
            )
        );
        fs::remove_file(tmp.path().join(CA_KEY)).unwrap();
        let err = issue(tmp.path(), Role::Agent, "pi-4", false).unwrap_err();
        assert!(matches!(err, TlsError::NoCaKey { .. }), "{err:?}");
    }

    #[test]
    fn issue_refuses_a_ca_key_of_another_ca() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        init_ca(a.path(), &[]).unwrap();
        init_ca(b.path(), &[]).unwrap();
        fs::copy(b.path().join(CA_KEY), a.path().join(CA_KEY)).unwrap();
        let err = issue(a.path(), Role::Agent, "pi-4", false).unwrap_err();
        assert!(matches!(err, TlsError::CaKeyMismatch { .. }), "{err:?}");
    }

    #[test]
    fn identity_from_the_coordinator_cert() {
        let tmp = tempfile::tempdir().unwrap();
        let init = init_ca(tmp.path(), &[]).unwrap();
        let identity = identity_from_cert(&read_cert(&init.coordinator_cert)).unwrap();
        assert_eq!(identity, Identity { name: "coordinator".into(), role: Role::Coordinator });
        // The CA itself carries no role: it is not an identity.
        let err = identity_from_cert(&read_cert(&init.ca_cert)).unwrap_err();
        assert!(matches!(err, TlsError::BadCertificate(_)), "{err:?}");
    }

    #[test]
    fn names_follow_the_rule() {
        for ok in ["a", "pi-4", "build.01", "x_y", "0", &"a".repeat(63)] {
            assert!(validate_name(ok).is_ok(), "{ok:?}");
        }
        for bad in ["", "Pi", "-a", ".a", "_a", "a/b", "a b", "é", &"a".repeat(64)] {
            let err = validate_name(bad).unwrap_err();
            assert!(err.to_string().contains("1 to 63 characters"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn roles_parse_and_display() {
        for role in Role::ALL {
            assert_eq!(role.to_string().parse::<Role>().unwrap(), role);
        }
        assert_eq!("agent".parse::<Role>().unwrap(), Role::Agent);
        let err = "root".parse::<Role>().unwrap_err().to_string();
        assert!(err.contains("coordinator, agent, client, admin"), "{err}");
    }

    #[test]
    fn fingerprint_format() {
        let fp = fingerprint(&CertificateDer::from(b"abc".to_vec()));
        assert_eq!(fp, "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }

    #[test]
    fn refusal_messages_name_the_peer() {
        let tmp = tempfile::tempdir().unwrap();
        init_ca(tmp.path(), &[]).unwrap();
        issue(tmp.path(), Role::Agent, "pi-4", false).unwrap();
        let cert = read_cert(&tmp.path().join("pi-4.crt"));
        let err = rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer);
        assert_eq!(
            refusal_message(&cert, &err),
            "refused agent \"pi-4\": certificate not signed by this farm's CA (UnknownIssuer); \
             issue one with `farm ca issue`"
        );
        let err = rustls::Error::InvalidCertificate(CertificateError::BadSignature);
        assert!(refusal_message(&cert, &err).contains("not signed by this farm's CA (BadSignature)"));
        let garbage = CertificateDer::from(b"garbage".to_vec());
        assert!(refusal_message(&garbage, &err).starts_with("refused a peer: "));
    }

    #[test]
    fn configs_build() {
        let tmp = tempfile::tempdir().unwrap();
        init_ca(tmp.path(), &[]).unwrap();
        issue(tmp.path(), Role::Agent, "pi-4", false).unwrap();
        let server = server_config(&load_credentials(tmp.path(), COORDINATOR_NAME).unwrap()).unwrap();
        assert_eq!(server.alpn_protocols, vec![ALPN.to_vec()]);
        let client = client_config(&load_credentials(tmp.path(), "pi-4").unwrap()).unwrap();
        assert_eq!(client.alpn_protocols, vec![ALPN.to_vec()]);
    }
}
