//! Who may join the farm and who has been thrown out, as plain data.
//!
//! Join tokens follow k3s and kubeadm: the token names the farm (its CA's fingerprint, checked by
//! the joiner) and carries a secret (checked here). Only a hash of the secret is kept, so the
//! state file cannot be used to join. Tokens expire (24 h unless told otherwise), can be limited
//! to a number of uses, and can be revoked. Identities are revoked by name: a revoked name is
//! refused at connection time whatever certificate it shows, and cannot join again.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use shared::tls::Role;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TokenRecord {
    pub role: Role,
    pub secret_sha256: String,
    pub created_ms: u64,
    pub created_by: String,
    pub expires_ms: Option<u64>,
    pub uses_left: Option<u32>,
    pub revoked: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RevokedRecord {
    pub at_ms: u64,
    pub by: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JoinError {
    #[error(
        "join token {0} is unknown to this coordinator (or its secret is wrong); create one with `farm token create`"
    )]
    Unknown(String),
    #[error("join token {id} expired {ago_s} s ago; create a new one with `farm token create`")]
    Expired { id: String, ago_s: u64 },
    #[error("join token {0} has been used as often as it allows; create a new one with `farm token create`")]
    UsedUp(String),
    #[error("join token {0} was revoked; create a new one with `farm token create`")]
    Revoked(String),
    #[error("the name {0:?} was revoked from this farm; join under another name")]
    NameRevoked(String),
    #[error("join token {id} makes {} {token_role}, not {} {wanted}: {fix}", article(*token_role), article(*wanted))]
    WrongRole { id: String, token_role: Role, wanted: Role, fix: &'static str },
}

fn article(role: Role) -> &'static str {
    match role {
        Role::Agent | Role::Admin => "an",
        _ => "a",
    }
}

#[derive(Debug, Default)]
pub struct Security {
    tokens: BTreeMap<String, TokenRecord>,
    revoked: BTreeMap<String, RevokedRecord>,
}

fn same(a: &str, b: &str) -> bool {
    // Constant-time over the (fixed-length) hex digests.
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Security {
    pub fn restore(tokens: Vec<(String, TokenRecord)>, revoked: Vec<(String, RevokedRecord)>) -> Security {
        Security { tokens: tokens.into_iter().collect(), revoked: revoked.into_iter().collect() }
    }

    /// Records a new token whose id and secret the caller generated; returns the record to persist.
    #[allow(clippy::too_many_arguments)]
    pub fn create(
        &mut self,
        now: u64,
        id: &str,
        secret: &str,
        role: Role,
        ttl_ms: Option<u64>,
        uses: Option<u32>,
        by: &str,
    ) -> TokenRecord {
        let record = TokenRecord {
            role,
            secret_sha256: shared::digest::sha256_hex(secret.as_bytes()),
            created_ms: now,
            created_by: by.into(),
            expires_ms: ttl_ms.map(|t| now + t),
            uses_left: uses,
            revoked: false,
        };
        self.tokens.insert(id.into(), record.clone());
        record
    }

    /// Checks a token and uses it up once; returns the role it grants and the record to persist.
    pub fn redeem(
        &mut self,
        now: u64,
        id: &str,
        secret: &str,
        name: &str,
        wanted: Role,
    ) -> Result<(Role, TokenRecord), JoinError> {
        if self.revoked.contains_key(name) {
            return Err(JoinError::NameRevoked(name.into()));
        }
        let t = self.tokens.get_mut(id).ok_or_else(|| JoinError::Unknown(id.into()))?;
        if !same(&t.secret_sha256, &shared::digest::sha256_hex(secret.as_bytes())) {
            return Err(JoinError::Unknown(id.into()));
        }
        if t.revoked {
            return Err(JoinError::Revoked(id.into()));
        }
        // Checked before the token is used up: the wrong command costs nothing.
        if t.role != wanted && !(wanted == Role::Client && t.role == Role::Admin) {
            let fix = if t.role == Role::Agent { "use `farm agent join`" } else { "use `farm login`" };
            return Err(JoinError::WrongRole { id: id.into(), token_role: t.role, wanted, fix });
        }
        if let Some(exp) = t.expires_ms.filter(|e| now >= *e) {
            return Err(JoinError::Expired { id: id.into(), ago_s: (now - exp) / 1000 });
        }
        match &mut t.uses_left {
            Some(0) => return Err(JoinError::UsedUp(id.into())),
            Some(n) => *n -= 1,
            None => {}
        }
        Ok((t.role, t.clone()))
    }

    pub fn revoke_token(&mut self, id: &str) -> Option<TokenRecord> {
        let t = self.tokens.get_mut(id)?;
        t.revoked = true;
        Some(t.clone())
    }

    pub fn revoke_name(&mut self, now: u64, name: &str, by: &str) -> RevokedRecord {
        let r = RevokedRecord { at_ms: now, by: by.into() };
        self.revoked.insert(name.into(), r.clone());
        r
    }

    pub fn is_revoked(&self, name: &str) -> bool {
        self.revoked.contains_key(name)
    }

    pub fn revoked_names(&self) -> impl Iterator<Item = &str> {
        self.revoked.keys().map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_grants_its_role_until_it_expires_is_used_up_or_revoked() {
        let mut s = Security::default();
        s.create(0, "aa", "secret", Role::Agent, Some(1_000), Some(2), "admin");
        assert_eq!(s.redeem(10, "aa", "wrong", "pi", Role::Agent).unwrap_err(), JoinError::Unknown("aa".into()));
        assert_eq!(s.redeem(10, "zz", "secret", "pi", Role::Agent).unwrap_err(), JoinError::Unknown("zz".into()));
        assert_eq!(s.redeem(10, "aa", "secret", "pi", Role::Agent).unwrap().0, Role::Agent);
        assert_eq!(s.redeem(20, "aa", "secret", "pi2", Role::Agent).unwrap().1.uses_left, Some(0));
        assert_eq!(s.redeem(30, "aa", "secret", "pi3", Role::Agent).unwrap_err(), JoinError::UsedUp("aa".into()));
        s.create(0, "bb", "s2", Role::Client, Some(1_000), None, "admin");
        let wrong = s.redeem(10, "bb", "s2", "me", Role::Agent).unwrap_err();
        assert_eq!(wrong.to_string(), "join token bb makes a client, not an agent: use `farm login`");
        let err = s.redeem(4_000, "bb", "s2", "me", Role::Client).unwrap_err();
        assert_eq!(err, JoinError::Expired { id: "bb".into(), ago_s: 3 });
        assert!(err.to_string().contains("expired 3 s ago"), "{err}");
        s.create(0, "cc", "s3", Role::Agent, None, None, "admin");
        s.revoke_token("cc");
        assert_eq!(s.redeem(1, "cc", "s3", "x", Role::Agent).unwrap_err(), JoinError::Revoked("cc".into()));
    }

    #[test]
    fn a_revoked_name_cannot_join_again_and_secrets_are_stored_hashed() {
        let mut s = Security::default();
        let rec = s.create(0, "aa", "topsecret", Role::Agent, None, None, "admin");
        assert!(!rec.secret_sha256.contains("topsecret"));
        s.revoke_name(5, "pi", "admin");
        assert!(s.is_revoked("pi"));
        assert_eq!(s.redeem(6, "aa", "topsecret", "pi", Role::Agent).unwrap_err(), JoinError::NameRevoked("pi".into()));
        let restored = Security::restore(
            vec![("aa".into(), rec)],
            vec![("pi".into(), RevokedRecord { at_ms: 5, by: "admin".into() })],
        );
        assert!(restored.is_revoked("pi"));
    }
}
