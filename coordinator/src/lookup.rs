//! Requests about a build that the driver's memory cannot answer alone: a build named by a
//! prefix of its id, or one that ended long ago and left memory (it stays in the store). The
//! driver hands such a request, with what it knows from memory, to the [`StoreReader`], which
//! reads the store on a blocking thread (redb read transactions run beside the driver's write
//! transactions) and hands the answer back ([`Looked`]); the driver then replies or acts on the
//! build's full id. So the driver never waits on the store's disk to answer a request.

use std::sync::Arc;

use shared::proto::{BuildEvent, BuildView, Response};
use shared::tls::Identity;
use shared::Platform;
use tokio::sync::{mpsc, oneshot};

use crate::events::LogSink;
use crate::store::Store;

/// What the driver does with a build's full id once the store has been asked.
pub enum Then {
    Cancel { peer: Identity, reply: oneshot::Sender<Response> },
    Follow { events: mpsc::UnboundedSender<BuildEvent>, reply: oneshot::Sender<Result<(), String>> },
    Logs { platform: Option<Platform>, follow: bool, sink: LogSink, reply: oneshot::Sender<Result<(), String>> },
}

/// What the reader hands back to the driver.
pub enum Looked {
    /// `GetBuild`'s answer: the driver sends it once what it did before is on disk.
    Reply(oneshot::Sender<Response>, Response),
    /// The full id of the build a request named (or why it names none), to act on.
    Resolved(Result<String, String>, Then),
}

/// Reads builds from the store off the driver's task, one blocking thread per lookup.
pub struct StoreReader {
    store: Arc<Store>,
    done: mpsc::UnboundedSender<Looked>,
    /// Tests hold it to keep lookups from finishing, to see the driver answer meanwhile.
    #[cfg(test)]
    pub(crate) hold: Arc<tokio::sync::Mutex<()>>,
}

impl StoreReader {
    /// A reader of `store`, and where its answers arrive (the driver's).
    pub fn new(store: Arc<Store>) -> (StoreReader, mpsc::UnboundedReceiver<Looked>) {
        let (done, answers) = mpsc::unbounded_channel();
        let reader = StoreReader {
            store,
            done,
            #[cfg(test)]
            hold: Default::default(),
        };
        (reader, answers)
    }

    /// `GetBuild` of `wanted`, which is not the id of a build in memory; `in_memory` holds the
    /// views of the builds in memory whose ids start with it.
    pub fn view(&self, wanted: String, in_memory: Vec<BuildView>, reply: oneshot::Sender<Response>) {
        self.spawn(move |store| {
            let ids = in_memory.iter().map(|v| v.id.clone()).collect();
            let response = match resolve(store, &wanted, ids) {
                Ok(id) => match in_memory.into_iter().find(|v| v.id == id) {
                    Some(view) => Response::Builds(vec![view]),
                    None => match store.get_build::<crate::core::Build>(&id) {
                        Ok(Some(b)) => Response::Builds(vec![crate::core::stored_view(&id, &b)]),
                        Ok(None) => Response::Error(format!("no build {id}; `farm builds` lists them")),
                        Err(e) => Response::Error(format!("reading build {id} from the store: {e}")),
                    },
                },
                Err(e) => Response::Error(e),
            };
            Looked::Reply(reply, response)
        });
    }

    /// The full id of the build `wanted` names, which is not the id of a build in memory;
    /// `in_memory` holds the ids of the builds in memory that start with it.
    pub fn resolve(&self, wanted: String, in_memory: Vec<String>, then: Then) {
        self.spawn(move |store| Looked::Resolved(resolve(store, &wanted, in_memory), then));
    }

    fn spawn(&self, lookup: impl FnOnce(&Store) -> Looked + Send + 'static) {
        let (store, done) = (self.store.clone(), self.done.clone());
        #[cfg(test)]
        let hold = self.hold.clone();
        tokio::task::spawn_blocking(move || {
            #[cfg(test)]
            drop(hold.blocking_lock());
            // The driver gone (shutting down), nobody waits for the answer.
            let _ = done.send(lookup(&store));
        });
    }
}

/// The full id of the build `wanted` names: itself if the store has it, or the one build, in
/// memory (`in_memory`: those whose ids start with `wanted`) or in the store, whose id starts
/// with it. An unreadable store answers no, and says why in the log.
fn resolve(store: &Store, wanted: &str, mut ids: Vec<String>) -> Result<String, String> {
    let stored = store.has_build(wanted).unwrap_or_else(|e| {
        tracing::warn!(build = %wanted, "looking the build up in the store failed: {e}");
        false
    });
    if stored {
        return Ok(wanted.to_string());
    }
    // An empty prefix names no build (the driver passes no ids for it either).
    if !wanted.is_empty() {
        ids.extend(store.builds_with_prefix(wanted, 10).unwrap_or_default());
        ids.sort();
        ids.dedup();
    }
    match ids.as_slice() {
        [] => Err(format!("no build {wanted}; `farm builds` lists them")),
        [one] => Ok(one.clone()),
        many => Err(format!(
            "build id {wanted:?} is ambiguous: {} builds start with it ({}); give more of the id",
            many.len(),
            many.join(", ")
        )),
    }
}
