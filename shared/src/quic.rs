//! The only place that builds quinn endpoints.
//!
//! Keeping endpoint construction here guarantees that every connection, whoever opens it, uses the
//! farm's mutual TLS and the same bounded transport limits (quinn's defaults let one peer make
//! us buffer without limit), and that handshake failures reach people as sentences that say
//! which side refused which certificate, not as numeric TLS alerts.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{NoInitialCipherSuite, QuicClientConfig, QuicServerConfig};
use quinn::{ConnectionError, IdleTimeout, TransportErrorCode, VarInt};
use rustls::AlertDescription;
use rustls_pki_types::CertificateDer;

use crate::tls::{self, Credentials, Identity, TlsError};

/// Transport limits shared by both ends. In configuration files durations are in seconds
/// (fractions allowed) and missing keys take the defaults below.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct TransportLimits {
    /// A connection silent for this long is dead (default 30 s; 0 disables the timeout).
    #[serde(with = "secs")]
    pub idle_timeout: Duration,
    /// Ping interval when otherwise idle (default 5 s, well inside the idle timeout, so that
    /// home-NAT mappings stay open; 0 disables keep-alives).
    #[serde(with = "secs")]
    pub keep_alive: Duration,
    /// Bytes a peer may send on one stream before we read them (default 1 MiB).
    pub stream_receive_window: u32,
    /// Bytes a peer may send on a whole connection before we read them (default 8 MiB; quinn's
    /// own default is unlimited).
    pub connection_receive_window: u32,
    /// Bytes we buffer for sending on a connection (default 8 MiB).
    pub send_window: u64,
    /// Concurrent bidirectional streams a peer may open (default 16: a client uses one per
    /// request or build it follows, an agent one or two per task; quinn reserves state for each
    /// allowed stream up front on every connection).
    pub max_bidi_streams: u32,
    /// Concurrent unidirectional streams a peer may open (default 0: farm uses none).
    pub max_uni_streams: u32,
    /// Server only: connections waiting to be accepted or still handshaking (default 4096).
    pub max_incoming: usize,
}

const MIB: u32 = 1024 * 1024;

impl Default for TransportLimits {
    fn default() -> Self {
        Self {
            idle_timeout: Duration::from_secs(30),
            keep_alive: Duration::from_secs(5),
            stream_receive_window: MIB,
            connection_receive_window: 8 * MIB,
            send_window: 8 * u64::from(MIB),
            max_bidi_streams: 16,
            max_uni_streams: 0,
            max_incoming: 4096,
        }
    }
}

/// Durations as (possibly fractional) seconds: readable in TOML, and still a plain number on
/// non-self-describing formats.
mod secs {
    use serde::{de::Error, Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let secs = f64::deserialize(d)?;
        Duration::try_from_secs_f64(secs).map_err(|_| D::Error::custom(format!("invalid duration: {secs} seconds")))
    }
}

/// The quinn transport configuration for `limits`.
pub fn transport_config(limits: &TransportLimits) -> quinn::TransportConfig {
    let mut config = quinn::TransportConfig::default();
    let idle = IdleTimeout::try_from(limits.idle_timeout).unwrap_or(IdleTimeout::from(VarInt::MAX));
    config
        .max_idle_timeout(Some(idle))
        .keep_alive_interval((!limits.keep_alive.is_zero()).then_some(limits.keep_alive))
        .stream_receive_window(VarInt::from_u32(limits.stream_receive_window))
        .receive_window(VarInt::from_u32(limits.connection_receive_window))
        .send_window(limits.send_window)
        .max_concurrent_bidi_streams(VarInt::from_u32(limits.max_bidi_streams))
        .max_concurrent_uni_streams(VarInt::from_u32(limits.max_uni_streams));
    config
}

#[derive(Debug, thiserror::Error)]
pub enum QuicError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("the TLS configuration cannot be used for QUIC: {0}")]
    Crypto(#[from] NoInitialCipherSuite),
    #[error("cannot bind UDP {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("invalid address {target:?}: {reason}")]
    Target { target: String, reason: &'static str },
    #[error("cannot resolve {target}: {source}")]
    Resolve { target: String, source: std::io::Error },
    #[error("cannot connect to {target}: {source}")]
    Connect { target: String, source: quinn::ConnectError },
    #[error("connection to {target} failed: {source}")]
    Connection { target: String, source: ConnectionError },
    /// The peer rejected our certificate during the handshake.
    #[error("the coordinator at {target} refused this certificate ({alert}): {hint}")]
    Refused { target: String, alert: &'static str, hint: &'static str },
    /// We rejected the peer's certificate during the handshake.
    #[error("the server at {target} presented {problem}")]
    UntrustedServer { target: String, problem: String },
    #[error("cannot tell who the peer is: {0}")]
    PeerIdentity(String),
}

impl QuicError {
    /// Wraps a connection error seen while talking to `target`, turning certificate refusals
    /// (ours or the peer's) into plain words. Use it for errors from streams too: with TLS 1.3 a
    /// server's refusal of our certificate may only show up after the handshake.
    pub fn connection(target: impl Into<String>, source: ConnectionError) -> Self {
        let target = target.into();
        match &source {
            ConnectionError::ConnectionClosed(close) => {
                let alert = tls_alert(close.error_code);
                if let Some(name) = alert.and_then(certificate_alert) {
                    let hint = if alert == Some(AlertDescription::CertificateExpired) {
                        "renew it with `farm ca issue --force`"
                    } else {
                        "is it signed by this farm's CA? issue one with `farm ca issue`"
                    };
                    return QuicError::Refused { target, alert: name, hint };
                }
            }
            ConnectionError::TransportError(err) => {
                if let Some(alert) = tls_alert(err.code).filter(|a| certificate_alert(*a).is_some()) {
                    // A CA of another farm: unknown issuer, or a bad signature when its
                    // subject happens to match ours.
                    let problem = if matches!(alert, AlertDescription::UnknownCA | AlertDescription::DecryptError) {
                        "a certificate not signed by this farm's CA (is this the right farm?)".into()
                    } else {
                        format!("an unacceptable certificate: {}", err.reason)
                    };
                    return QuicError::UntrustedServer { target, problem };
                }
            }
            _ => {}
        }
        QuicError::Connection { target, source }
    }

    /// True when the peer answered (so trying another of its addresses is pointless).
    fn peer_answered(&self) -> bool {
        match self {
            QuicError::Refused { .. } | QuicError::UntrustedServer { .. } => true,
            QuicError::Connection { source, .. } => !matches!(source, ConnectionError::TimedOut),
            _ => false,
        }
    }
}

/// The TLS alert carried by a QUIC CRYPTO_ERROR code (0x100..=0x1ff), if it is one.
fn tls_alert(code: TransportErrorCode) -> Option<AlertDescription> {
    let code = u64::from(code);
    (0x100..=0x1ff).contains(&code).then(|| AlertDescription::from((code - 0x100) as u8))
}

/// Words for the alerts that mean "this certificate was not accepted".
fn certificate_alert(alert: AlertDescription) -> Option<&'static str> {
    Some(match alert {
        AlertDescription::BadCertificate => "bad certificate",
        AlertDescription::UnknownCA => "unknown CA",
        AlertDescription::CertificateExpired => "certificate expired",
        AlertDescription::CertificateRevoked => "certificate revoked",
        AlertDescription::CertificateUnknown => "certificate unknown",
        AlertDescription::UnsupportedCertificate => "unsupported certificate",
        AlertDescription::CertificateRequired => "no certificate presented",
        AlertDescription::DecryptError => "bad signature",
        _ => return None,
    })
}

/// Binds a server endpoint on `addr`: mutual TLS with `creds`, transport `limits`.
pub fn server_endpoint(
    addr: SocketAddr,
    creds: &Credentials,
    limits: &TransportLimits,
) -> Result<quinn::Endpoint, QuicError> {
    let crypto = QuicServerConfig::try_from(tls::server_config(creds)?)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(Arc::new(transport_config(limits))).max_incoming(limits.max_incoming);
    let bind = |source| QuicError::Bind { addr, source };
    let socket = std::net::UdpSocket::bind(addr).map_err(bind)?;
    let runtime = quinn::default_runtime().ok_or_else(|| bind(std::io::Error::other("no async runtime is running")))?;
    quinn::Endpoint::new(endpoint_config(creds), Some(config), socket, runtime).map_err(bind)
}

/// The endpoint's stateless-reset key, derived from the server's private key so that it is the
/// same after a restart. A restarted coordinator then answers packets of connections it no
/// longer knows with a valid reset, and agents reconnect at once instead of waiting out the idle
/// timeout. (A random key per process, quinn's default, makes those resets unverifiable.) The
/// connection-ID generator's key is derived likewise: quinn silently drops packets whose CID
/// fails its check, so a new key would never even reach the reset.
fn endpoint_config(creds: &Credentials) -> quinn::EndpointConfig {
    use ring::hmac;
    let derive = |label: &[u8]| hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, creds.key.secret_der()), label);
    let reset = derive(b"farm/1 stateless reset key");
    let cid = derive(b"farm/1 connection id key");
    let cid_key = u64::from_le_bytes(cid.as_ref()[..8].try_into().expect("HMAC-SHA256 has 32 bytes"));
    let mut config = quinn::EndpointConfig::new(Arc::new(hmac::Key::new(hmac::HMAC_SHA256, reset.as_ref())));
    config.cid_generator(move || Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key)));
    config
}

/// Connects to `target` (`host:port`, `1.2.3.4:port` or `[::1]:port`) and verifies the server
/// against the farm's CA under the name `host`. Returns the endpoint too: the connection lives
/// only as long as it.
///
/// When the name resolves to both IPv6 and IPv4, the first address of each family is tried at
/// once and the first to answer wins: over UDP a dead address only shows up as an idle timeout.
pub async fn connect(
    target: &str,
    creds: &Credentials,
    limits: &TransportLimits,
) -> Result<(quinn::Endpoint, quinn::Connection), QuicError> {
    connect_with(target, tls::client_config(creds)?, limits).await
}

/// Connects to join a farm with a token: no client certificate, and the coordinator is trusted
/// only if its CA has the token's fingerprint (checked before anything secret is sent).
pub async fn connect_to_join(
    target: &str,
    ca_sha256: &str,
    limits: &TransportLimits,
) -> Result<(quinn::Endpoint, quinn::Connection), QuicError> {
    connect_with(target, tls::join_client_config(ca_sha256)?, limits).await
}

async fn connect_with(
    target: &str,
    tls_config: rustls::ClientConfig,
    limits: &TransportLimits,
) -> Result<(quinn::Endpoint, quinn::Connection), QuicError> {
    let (host, port) =
        split_host_port(target).map_err(|reason| QuicError::Target { target: target.to_string(), reason })?;
    let resolve_error = |source| QuicError::Resolve { target: target.to_string(), source };
    let resolved: Vec<SocketAddr> = tokio::net::lookup_host((host, port)).await.map_err(resolve_error)?.collect();
    let mut candidates: Vec<SocketAddr> = Vec::new();
    for addr in resolved {
        if !candidates.iter().any(|c| c.is_ipv4() == addr.is_ipv4()) {
            candidates.push(addr);
        }
    }
    if candidates.is_empty() {
        return Err(resolve_error(std::io::Error::new(std::io::ErrorKind::NotFound, "the name has no address")));
    }

    let mut config = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls_config)?));
    config.transport_config(Arc::new(transport_config(limits)));

    let mut attempts = tokio::task::JoinSet::new();
    for addr in candidates {
        let (config, host, target) = (config.clone(), host.to_string(), target.to_string());
        attempts.spawn(async move { connect_to(addr, &host, config, target).await });
    }
    let mut first_error = None;
    while let Some(joined) = attempts.join_next().await {
        match joined {
            Ok(Ok(connected)) => return Ok(connected),
            Ok(Err(err)) if err.peer_answered() => return Err(err),
            Ok(Err(err)) => {
                first_error.get_or_insert(err);
            }
            Err(join) => std::panic::resume_unwind(join.into_panic()),
        }
    }
    Err(first_error.expect("at least one attempt ran"))
}

async fn connect_to(
    addr: SocketAddr,
    host: &str,
    config: quinn::ClientConfig,
    target: String,
) -> Result<(quinn::Endpoint, quinn::Connection), QuicError> {
    let bind = if addr.is_ipv4() {
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))
    } else {
        SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0))
    };
    let endpoint = quinn::Endpoint::client(bind).map_err(|source| QuicError::Bind { addr: bind, source })?;
    let connecting = endpoint
        .connect_with(config, addr, host)
        .map_err(|source| QuicError::Connect { target: target.clone(), source })?;
    let conn = connecting.await.map_err(|source| QuicError::connection(target, source))?;
    Ok((endpoint, conn))
}

/// Splits "host:port" / "[v6]:port"; the host comes back without brackets.
fn split_host_port(target: &str) -> Result<(&str, u16), &'static str> {
    let (host, port) = if let Some(rest) = target.strip_prefix('[') {
        rest.split_once("]:").ok_or("expected [IPv6]:PORT, e.g. [::1]:3276")?
    } else {
        let (host, port) = target.rsplit_once(':').ok_or("expected HOST:PORT")?;
        if host.contains(':') {
            return Err("put an IPv6 address in brackets, e.g. [::1]:3276");
        }
        (host, port)
    };
    if host.is_empty() {
        return Err("expected HOST:PORT");
    }
    let port = port.parse().map_err(|_| "the port must be a number from 0 to 65535")?;
    Ok((host, port))
}

/// Who the peer of `conn` is, read from the certificate it proved during the handshake.
/// The peer's identity, or `None` if it presented no certificate (it may only join).
pub fn peer_identity_if_any(conn: &quinn::Connection) -> Result<Option<Identity>, QuicError> {
    match conn.peer_identity() {
        None => Ok(None),
        Some(_) => peer_identity(conn).map(Some),
    }
}

pub fn peer_identity(conn: &quinn::Connection) -> Result<Identity, QuicError> {
    let any =
        conn.peer_identity().ok_or_else(|| QuicError::PeerIdentity("the peer presented no certificate".into()))?;
    let certs = any
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| QuicError::PeerIdentity("the peer's identity is not a certificate".into()))?;
    let leaf = certs.first().ok_or_else(|| QuicError::PeerIdentity("the peer presented no certificate".into()))?;
    tls::identity_from_cert(leaf).map_err(|e| QuicError::PeerIdentity(e.to_string()))
}

/// `sha256:<hex>` of the peer's leaf certificate (DER): how provenance names the agent's certificate.
pub fn peer_certificate_sha256(conn: &quinn::Connection) -> Option<String> {
    let certs = conn.peer_identity()?.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    certs.first().map(|leaf| format!("sha256:{}", crate::digest::sha256_hex(leaf.as_ref())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::{init_ca, issue, load_credentials, Role, COORDINATOR_NAME};
    use std::future::Future;
    use std::path::Path;
    use tokio::sync::mpsc;

    const WAIT: Duration = Duration::from_secs(10);

    async fn within<F: Future>(future: F) -> F::Output {
        tokio::time::timeout(WAIT, future).await.expect("timed out after 10 s")
    }

    /// A CA directory with the coordinator and one agent "pi-4".
    fn farm() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        init_ca(dir.path(), &[]).unwrap();
        issue(dir.path(), Role::Agent, "pi-4", false).unwrap();
        dir
    }

    fn creds(dir: &Path, name: &str) -> Credentials {
        load_credentials(dir, name).unwrap()
    }

    /// Serves on loopback: reports each handshake's outcome, then echoes every bi-stream.
    fn serve(creds: &Credentials) -> (quinn::Endpoint, String, mpsc::UnboundedReceiver<Result<Identity, String>>) {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        let endpoint = server_endpoint(addr, creds, &TransportLimits::default()).unwrap();
        let target = endpoint.local_addr().unwrap().to_string();
        let (tx, rx) = mpsc::unbounded_channel();
        let server = endpoint.clone();
        tokio::spawn(async move {
            while let Some(incoming) = server.accept().await {
                let tx = tx.clone();
                tokio::spawn(async move {
                    let conn = match incoming.await {
                        Ok(conn) => conn,
                        Err(e) => return drop(tx.send(Err(e.to_string()))),
                    };
                    let _ = tx.send(peer_identity(&conn).map_err(|e| e.to_string()));
                    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                        let Ok(data) = recv.read_to_end(1 << 20).await else {
                            break;
                        };
                        if send.write_all(&data).await.is_err() || send.finish().is_err() {
                            break;
                        }
                    }
                });
            }
        });
        (endpoint, target, rx)
    }

    async fn echo(conn: &quinn::Connection, data: &[u8]) -> Result<Vec<u8>, String> {
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        send.write_all(data).await.map_err(|e| e.to_string())?;
        send.finish().map_err(|e| e.to_string())?;
        recv.read_to_end(1 << 20).await.map_err(|e| e.to_string())
    }

    #[tokio::test]
    async fn same_ca_peers_connect_and_know_each_other() {
        let farm = farm();
        let (_server, target, mut seen) = serve(&creds(farm.path(), COORDINATOR_NAME));

        let agent = creds(farm.path(), "pi-4");
        let (_endpoint, conn) = within(connect(&target, &agent, &TransportLimits::default())).await.unwrap();
        assert_eq!(peer_identity(&conn).unwrap(), Identity { name: COORDINATOR_NAME.into(), role: Role::Coordinator });
        assert_eq!(within(echo(&conn, b"hello farm")).await.unwrap(), b"hello farm");
        assert_eq!(within(seen.recv()).await.unwrap().unwrap(), Identity { name: "pi-4".into(), role: Role::Agent });
    }

    #[tokio::test]
    async fn client_roles_are_seen_by_the_server() {
        let farm = farm();
        issue(farm.path(), Role::Client, "alice", false).unwrap();
        let (_server, target, mut seen) = serve(&creds(farm.path(), COORDINATOR_NAME));
        let alice = creds(farm.path(), "alice");
        let (_endpoint, conn) = within(connect(&target, &alice, &TransportLimits::default())).await.unwrap();
        assert_eq!(within(echo(&conn, b"x")).await.unwrap(), b"x");
        assert_eq!(within(seen.recv()).await.unwrap().unwrap(), Identity { name: "alice".into(), role: Role::Client });
    }

    #[tokio::test]
    async fn a_certificate_from_another_ca_is_refused_and_the_server_goes_on() {
        let farm = farm();
        let stranger = self::farm();
        let (_server, target, mut seen) = serve(&creds(farm.path(), COORDINATOR_NAME));
        let limits = TransportLimits::default();

        // Trusts our coordinator, but its own certificate comes from another CA.
        let mut intruder = creds(stranger.path(), "pi-4");
        intruder.ca = creds(farm.path(), "pi-4").ca;
        let err = match within(connect(&target, &intruder, &limits)).await {
            Err(err) => err,
            Ok((_endpoint, conn)) => {
                // With TLS 1.3 the client may finish its handshake before the server checks
                // its certificate: the refusal then arrives on the first stream.
                assert!(within(echo(&conn, b"let me in")).await.is_err());
                QuicError::connection(&target, within(conn.closed()).await)
            }
        };
        let msg = err.to_string();
        assert!(matches!(err, QuicError::Refused { .. }), "{err:?}");
        assert!(msg.starts_with(&format!("the coordinator at {target} refused this certificate (")), "{msg}");
        assert!(msg.contains("farm ca issue"), "{msg}");
        assert!(within(seen.recv()).await.unwrap().is_err());

        let agent = creds(farm.path(), "pi-4");
        let (_endpoint, conn) = within(connect(&target, &agent, &limits)).await.unwrap();
        assert_eq!(within(echo(&conn, b"still here")).await.unwrap(), b"still here");
        assert_eq!(within(seen.recv()).await.unwrap().unwrap().name, "pi-4");
    }

    #[tokio::test]
    async fn a_client_trusting_another_ca_refuses_the_server() {
        let farm = farm();
        let stranger = self::farm();
        let (_server, target, _seen) = serve(&creds(farm.path(), COORDINATOR_NAME));

        let mut agent = creds(farm.path(), "pi-4");
        agent.ca = creds(stranger.path(), "pi-4").ca;
        let err = within(connect(&target, &agent, &TransportLimits::default())).await.unwrap_err();
        assert!(matches!(err, QuicError::UntrustedServer { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            format!(
                "the server at {target} presented a certificate not signed by this farm's CA \
                 (is this the right farm?)"
            )
        );
    }

    #[test]
    fn targets_split_into_host_and_port() {
        assert_eq!(split_host_port("127.0.0.1:7000"), Ok(("127.0.0.1", 7000)));
        assert_eq!(split_host_port("[::1]:7000"), Ok(("::1", 7000)));
        assert_eq!(split_host_port("build.example.org:3276"), Ok(("build.example.org", 3276)));
        for bad in ["localhost", "::1:7000", "[::1]", ":7000", "host:port", "host:70000"] {
            assert!(split_host_port(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn bad_targets_fail_before_any_packet() {
        let farm = farm();
        let agent = creds(farm.path(), "pi-4");
        let err = connect("::1:7000", &agent, &TransportLimits::default()).await.unwrap_err();
        assert!(err.to_string().contains("brackets"), "{err}");
    }

    #[test]
    fn handshake_alerts_become_sentences() {
        let close = |alert: AlertDescription| {
            ConnectionError::ConnectionClosed(quinn::ConnectionClose {
                error_code: TransportErrorCode::crypto(u8::from(alert)),
                frame_type: None,
                reason: Default::default(),
            })
        };
        let err = QuicError::connection("127.0.0.1:7000", close(AlertDescription::BadCertificate));
        assert_eq!(
            err.to_string(),
            "the coordinator at 127.0.0.1:7000 refused this certificate (bad certificate): is it \
             signed by this farm's CA? issue one with `farm ca issue`"
        );
        let err = QuicError::connection("h:1", close(AlertDescription::NoApplicationProtocol));
        assert!(matches!(err, QuicError::Connection { .. }), "{err:?}");
        let local = ConnectionError::TransportError(quinn_proto::TransportError {
            code: TransportErrorCode::crypto(u8::from(AlertDescription::DecryptError)),
            frame: None,
            reason: "invalid peer certificate: BadSignature".into(),
        });
        let err = QuicError::connection("h:1", local);
        assert!(matches!(err, QuicError::UntrustedServer { .. }), "{err:?}");
        assert!(err.to_string().contains("not signed by this farm's CA"), "{err}");
        let err = QuicError::connection("h:1", ConnectionError::TimedOut);
        assert_eq!(err.to_string(), "connection to h:1 failed: timed out");
    }

    #[test]
    fn limits_have_documented_defaults_and_round_trip() {
        let limits = TransportLimits::default();
        assert_eq!(limits.idle_timeout, Duration::from_secs(30));
        assert_eq!(limits.keep_alive, Duration::from_secs(5));
        assert_eq!(limits.stream_receive_window, 1 << 20);
        assert_eq!(limits.connection_receive_window, 8 << 20);
        assert_eq!(limits.send_window, 8 << 20);
        assert_eq!((limits.max_bidi_streams, limits.max_uni_streams), (16, 0));
        assert_eq!(limits.max_incoming, 4096);
        let _ = transport_config(&limits);

        let custom = TransportLimits { keep_alive: Duration::from_millis(2500), ..limits };
        let bytes = postcard::to_allocvec(&custom).unwrap();
        assert_eq!(postcard::from_bytes::<TransportLimits>(&bytes).unwrap(), custom);
    }
}
