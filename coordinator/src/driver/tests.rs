//! The driver over a real store, without sockets: requests about builds that left its memory.

use super::*;
use shared::proto::BuildSpec;
use shared::{Digest, Platform};

/// The core tests' one-platform spec, without tags or registries: nothing here is pushed.
fn spec() -> BuildSpec {
    BuildSpec {
        tags: vec![],
        insecure_registries: vec![],
        context: Digest::of(b"context"),
        ..crate::core::tests::spec(&["linux/amd64"])
    }
}

/// A driver whose store holds the builds `ended` (cancelled) and `live` (queued: no agent), and
/// which keeps no ended build in memory; and the channel its events go to.
struct Farm {
    dir: tempfile::TempDir,
    events: mpsc::Sender<Event>,
    hold: Arc<tokio::sync::Mutex<()>>,
}

impl Farm {
    fn start(ended: &[&str], live: &[&str]) -> Farm {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        {
            let store = Store::open(&state).unwrap();
            let mut core = Core::new(15_000, 3);
            for (i, id) in ended.iter().enumerate() {
                core.submit(i as u64, id, "admin", spec(), None).unwrap();
                core.cancel(i as u64, id).unwrap();
            }
            for id in live {
                core.submit(100, id, "admin", spec(), None).unwrap();
            }
            store.commit(&core.take_batch()).unwrap();
        }
        let mut config = crate::Config::new(dir.path().join("ca"), state.clone());
        config.keep_ended_builds = 0;
        let (events, rx) = mpsc::channel(16);
        let driver = Driver::new(
            &config,
            Store::open(&state).unwrap(),
            Security::restore(vec![], vec![]),
            None,
            Arc::new(Gate::new([])),
            Arc::new(RegistryPool::default()),
            Arc::new(shared::context::BlobStore::open(&state.join("blobs")).unwrap()),
            events.clone(),
            Arc::new(crate::metrics::Metrics::new()),
            None,
        )
        .unwrap();
        let hold = driver.reader.hold.clone();
        tokio::spawn(driver.run(rx));
        Farm { dir, events, hold }
    }

    fn state(&self) -> std::path::PathBuf {
        self.dir.path().join("state")
    }

    async fn send(&self, req: Request) -> oneshot::Receiver<Response> {
        let (reply, rx) = oneshot::channel();
        let peer = Identity { name: "admin".into(), role: Role::Admin };
        self.events.send(Event::Request { peer, req, reply }).await.unwrap();
        rx
    }

    async fn ask(&self, req: Request) -> Response {
        self.send(req).await.await.unwrap()
    }

    async fn get(&self, build: &str) -> Result<(String, String), String> {
        match self.ask(Request::GetBuild { build: build.into() }).await {
            Response::Builds(views) if views.len() == 1 => Ok((views[0].id.clone(), views[0].state.clone())),
            Response::Error(e) => Err(e),
            other => panic!("GetBuild {build}: {other:?}"),
        }
    }

    async fn follow(&self, build: &str) -> Result<(), String> {
        let (events, _rx) = mpsc::unbounded_channel();
        let (reply, rx) = oneshot::channel();
        self.events.send(Event::Follow { build: build.into(), events, reply }).await.unwrap();
        rx.await.unwrap()
    }

    /// `farm logs BUILD`: the stored lines, once the log thread dropped the sink.
    async fn logs(&self, build: &str) -> Result<Vec<(Platform, String)>, String> {
        let (sink, mut lines) = mpsc::unbounded_channel();
        let (reply, rx) = oneshot::channel();
        let event = Event::Logs { build: build.into(), platform: None, follow: true, sink, reply };
        self.events.send(event).await.unwrap();
        rx.await.unwrap()?;
        let mut out = vec![];
        while let Some(line) = lines.recv().await {
            out.push(line);
        }
        Ok(out)
    }
}

const ENDED: [&str; 3] = ["aaa111", "aaa222", "abd000"];

#[tokio::test]
async fn a_build_forgotten_from_memory_is_found_in_the_store_by_id_and_by_unique_prefix() {
    let farm = Farm::start(&ENDED, &["abc000"]);
    // Memory holds only the live build.
    match farm.ask(Request::ListBuilds { limit: 100 }).await {
        Response::Builds(views) => assert_eq!(views.iter().map(|v| v.id.as_str()).collect::<Vec<_>>(), ["abc000"]),
        other => panic!("{other:?}"),
    }
    let cancelled = |id: &str| Ok((id.to_string(), "cancelled".to_string()));
    assert_eq!(farm.get("aaa111").await, cancelled("aaa111"));
    assert_eq!(farm.get("aaa2").await, cancelled("aaa222"));
    assert_eq!(farm.get("abd").await, cancelled("abd000"));
    assert_eq!(farm.get("abc").await, Ok(("abc000".into(), "queued".into())));
    assert_eq!(
        farm.get("aaa").await,
        Err("build id \"aaa\" is ambiguous: 2 builds start with it (aaa111, aaa222); give more of the id".into())
    );
    // One candidate in memory, one in the store.
    assert_eq!(
        farm.get("ab").await,
        Err("build id \"ab\" is ambiguous: 2 builds start with it (abc000, abd000); give more of the id".into())
    );
    assert_eq!(farm.get("zzz").await, Err("no build zzz; `farm builds` lists them".into()));
    assert_eq!(farm.get("").await, Err("no build ; `farm builds` lists them".into()));

    // Cancel, follow and logs find it alike.
    let cancel = farm.ask(Request::Cancel { build: "aaa1".into() }).await;
    assert_eq!(cancel, Response::Error("build aaa111 has already ended".into()));
    let cancel = farm.ask(Request::Cancel { build: "zzz".into() }).await;
    assert_eq!(cancel, Response::Error("no build zzz; `farm builds` lists them".into()));
    assert_eq!(farm.follow("aaa2").await, Err("build aaa222 has already ended".into()));
    assert_eq!(farm.follow("aaa222").await, Err("build aaa222 has already ended".into()));
    assert_eq!(
        farm.follow("a").await,
        Err(
            "build id \"a\" is ambiguous: 4 builds start with it (aaa111, aaa222, abc000, abd000); give more of the id"
                .into()
        )
    );
    std::fs::write(farm.state().join("logs/aaa111.log"), "linux/amd64 STEP 1/1: FROM busybox\n").unwrap();
    let amd64: Platform = "linux/amd64".parse().unwrap();
    assert_eq!(farm.logs("aaa1").await, Ok(vec![(amd64.clone(), "STEP 1/1: FROM busybox".to_string())]));
    assert_eq!(farm.logs("aaa111").await, Ok(vec![(amd64, "STEP 1/1: FROM busybox".to_string())]));
    assert_eq!(farm.logs("zzz").await, Err("no build zzz; `farm builds` lists them".into()));
}

#[tokio::test]
async fn the_driver_answers_others_while_the_store_is_read_for_a_forgotten_build() {
    let farm = Farm::start(&ENDED, &[]);
    let held = farm.hold.clone().lock_owned().await;
    let mut lookup = farm.send(Request::GetBuild { build: "aaa1".into() }).await;
    // The store read waits on the hold, on its own thread: the driver goes on answering.
    assert_eq!(farm.ask(Request::Echo("still here".into())).await, Response::Echo("still here".into()));
    assert_eq!(farm.ask(Request::ListBuilds { limit: 10 }).await, Response::Builds(vec![]));
    assert!(matches!(lookup.try_recv(), Err(oneshot::error::TryRecvError::Empty)));
    drop(held);
    match lookup.await.unwrap() {
        Response::Builds(views) => assert_eq!((views[0].id.as_str(), views[0].state.as_str()), ("aaa111", "cancelled")),
        other => panic!("{other:?}"),
    }
}
