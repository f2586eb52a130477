//! Who is connected, by name, and who may no longer connect: shared by the connection tasks
//! (checked on every new connection) and the driver (which revokes).

use crate::fleet::ConnId;

/// Who is connected, by name, and who may no longer connect. Shared by the connection tasks
/// (checked on every new connection) and the driver (which revokes).
#[derive(Default)]
pub struct Gate {
    revoked: std::sync::RwLock<std::collections::HashSet<String>>,
    live: std::sync::Mutex<std::collections::HashMap<String, Vec<(ConnId, quinn::Connection)>>>,
    /// Every identity that has connected since the coordinator started.
    seen: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl Gate {
    pub fn new(revoked: impl IntoIterator<Item = String>) -> Gate {
        Gate {
            revoked: std::sync::RwLock::new(revoked.into_iter().collect()),
            live: Default::default(),
            seen: Default::default(),
        }
    }

    /// Whether `name` has connected since the coordinator started.
    pub fn has_seen(&self, name: &str) -> bool {
        self.seen.lock().unwrap().contains(name)
    }

    pub fn is_revoked(&self, name: &str) -> bool {
        self.revoked.read().unwrap().contains(name)
    }

    /// Refuses `name` from now on and closes its live connections.
    pub fn revoke(&self, name: &str) {
        self.revoked.write().unwrap().insert(name.to_string());
        for (_, conn) in self.live.lock().unwrap().remove(name).unwrap_or_default() {
            conn.close(3u32.into(), format!("the certificate of {name:?} was revoked").as_bytes());
        }
    }

    pub(crate) fn enter(&self, name: &str, id: ConnId, conn: &quinn::Connection) {
        if !self.has_seen(name) {
            self.seen.lock().unwrap().insert(name.to_string());
        }
        self.live.lock().unwrap().entry(name.to_string()).or_default().push((id, conn.clone()));
    }

    pub(crate) fn leave(&self, name: &str, id: ConnId) {
        let mut live = self.live.lock().unwrap();
        if let Some(v) = live.get_mut(name) {
            v.retain(|(i, _)| *i != id);
            if v.is_empty() {
                live.remove(name);
            }
        }
    }
}
