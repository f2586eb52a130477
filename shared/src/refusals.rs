//! Refused connections (failed TLS handshakes, revoked certificates), logged without letting a
//! peer flood the log: the first refusal of each peer is logged, later ones are only counted
//! (the coordinator's metric `farm_tls_refusals_total{reason}` counts every one) until [`QUIET`]
//! has passed, when one line says how many were left out. Pure: the caller passes the time in.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// After a peer's logged refusal, how long its further refusals are only counted.
pub const QUIET: Duration = Duration::from_secs(300);

/// How many peers are remembered; past that the one logged longest ago is forgotten (and would
/// be logged again), so that a flood of addresses cannot grow this without bound.
pub const PEERS: usize = 4096;

/// Why a connection was refused: the metric's `reason` label, from a fixed set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// The certificate is not signed by this farm's CA.
    UnknownCa,
    /// A certificate this farm's CA signed, but revoked.
    Revoked,
    /// No certificate at all.
    NoCertificate,
    /// A certificate refused for another reason (expired, malformed, wrong usage).
    BadCertificate,
    /// The handshake failed otherwise (protocol, ALPN, timeout, reset).
    Other,
}

impl Reason {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Reason::UnknownCa => "unknown_ca",
            Reason::Revoked => "revoked",
            Reason::NoCertificate => "no_certificate",
            Reason::BadCertificate => "bad_certificate",
            Reason::Other => "other",
        }
    }

    /// Reads a failed handshake's error text (rustls' reasons as quinn reports them).
    pub fn of_handshake_error(text: &str) -> Reason {
        let t = text.to_ascii_lowercase();
        if t.contains("unknownissuer") || t.contains("unknown ca") || t.contains("unknown_ca") {
            Reason::UnknownCa
        } else if t.contains("revoked") {
            Reason::Revoked
        } else if t.contains("no certificate") || t.contains("nocertificate") || t.contains("certificate required") {
            Reason::NoCertificate
        } else if t.contains("certificate") {
            Reason::BadCertificate
        } else {
            Reason::Other
        }
    }
}

#[derive(Debug)]
struct Peer {
    logged_at: Instant,
    /// Refusals since the last logged one.
    unlogged: u64,
}

/// A peer: its address and what it presented (the reason its handshake failed, or the revoked
/// identity), so that two refused identities on one machine are each logged.
pub type PeerKey = (IpAddr, String);

/// Which refusals to log, per peer (`K`: what tells peers apart; [`PeerKey`] by default).
#[derive(Debug)]
pub struct RefusalLog<K = PeerKey> {
    peers: HashMap<K, Peer>,
}

impl<K> Default for RefusalLog<K> {
    fn default() -> Self {
        RefusalLog { peers: HashMap::new() }
    }
}

impl<K: Hash + Eq + Clone> RefusalLog<K> {
    /// A refusal of `peer` at `now`: `Some(n)` to log it, `n` being how many of this peer's
    /// refusals were not logged since its last line; `None` to count it only.
    pub fn note(&mut self, peer: K, now: Instant) -> Option<u64> {
        if let Some(p) = self.peers.get_mut(&peer) {
            if now.saturating_duration_since(p.logged_at) < QUIET {
                p.unlogged += 1;
                return None;
            }
            let left_out = p.unlogged;
            *p = Peer { logged_at: now, unlogged: 0 };
            return Some(left_out);
        }
        if self.peers.len() >= PEERS {
            self.peers.retain(|_, p| now.saturating_duration_since(p.logged_at) < QUIET);
            if self.peers.len() >= PEERS {
                if let Some(oldest) = self.peers.iter().min_by_key(|(_, p)| p.logged_at).map(|(k, _)| k.clone()) {
                    self.peers.remove(&oldest);
                }
            }
        }
        self.peers.insert(peer, Peer { logged_at: now, unlogged: 0 });
        Some(0)
    }

    /// Peers remembered (for tests).
    pub fn len(&self) -> usize {
        self.peers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> PeerKey {
        (s.parse().unwrap(), "unknown_ca".into())
    }

    fn nth(i: u32) -> PeerKey {
        (IpAddr::from(std::net::Ipv4Addr::from(i)), "unknown_ca".into())
    }

    #[test]
    fn the_first_refusal_of_each_peer_is_logged_and_the_rest_counted_until_the_quiet_time_passes() {
        let mut log: RefusalLog = RefusalLog::default();
        let t0 = Instant::now();
        assert_eq!(log.note(ip("10.0.0.1"), t0), Some(0));
        for i in 1..200 {
            assert_eq!(log.note(ip("10.0.0.1"), t0 + Duration::from_millis(i)), None);
        }
        // Another peer is logged on its own.
        assert_eq!(log.note(ip("10.0.0.2"), t0 + Duration::from_secs(1)), Some(0));
        assert_eq!(log.note(ip("10.0.0.2"), t0 + Duration::from_secs(2)), None);
        // So is another identity from the same address.
        let revoked = (ip("10.0.0.1").0, "agent \"pi\"".to_string());
        assert_eq!(log.note(revoked.clone(), t0 + Duration::from_secs(3)), Some(0));
        assert_eq!(log.note(revoked, t0 + Duration::from_secs(4)), None);
        // Once the quiet time has passed: one line, saying how many were left out.
        assert_eq!(log.note(ip("10.0.0.1"), t0 + QUIET), Some(199));
        assert_eq!(log.note(ip("10.0.0.1"), t0 + QUIET + Duration::from_secs(1)), None);
        assert_eq!(log.note(ip("10.0.0.1"), t0 + QUIET * 2), Some(1));
    }

    #[test]
    fn the_peers_remembered_are_bounded() {
        let mut log: RefusalLog = RefusalLog::default();
        let t0 = Instant::now();
        for i in 0..(PEERS as u32 + 100) {
            assert_eq!(log.note(nth(i), t0 + Duration::from_millis(i as u64)), Some(0));
            assert!(log.len() <= PEERS);
        }
        assert_eq!(log.len(), PEERS);
        // The most recent are still remembered; the first were forgotten.
        assert_eq!(log.note(nth(PEERS as u32 + 99), t0 + Duration::from_secs(10)), None);
        assert_eq!(log.note(nth(0), t0 + Duration::from_secs(10)), Some(0));
    }

    #[test]
    fn reasons_are_read_from_the_handshake_error() {
        let cases = [
            ("TLS handshake failed: the cryptographic handshake failed: error 48: invalid peer certificate: UnknownIssuer", "unknown_ca"),
            ("peer sent no certificates", "no_certificate"),
            ("invalid peer certificate: Expired", "bad_certificate"),
            ("its certificate was revoked", "revoked"),
            ("timed out", "other"),
        ];
        for (text, label) in cases {
            assert_eq!(Reason::of_handshake_error(text).label(), label, "{text}");
        }
    }
}
