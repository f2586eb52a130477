//! The coordinator's durable state: one redb file, `<state dir>/state.redb`.
//!
//! Why it looks like this:
//! - one module owns every table and every transaction, so what is on disk, and how it changes, is
//!   read in one place, and the core never holds a transaction open across an await or a decision;
//! - records are postcard bytes (`&[u8]` values), so the core's types stay plain serde types defined
//!   elsewhere. Postcard is not self-describing: a record type may evolve (fields appended at the
//!   end) only together with a bump of [`SCHEMA_VERSION`] and a migration here; the version kept in
//!   the `meta` table is checked on [`Store::open`], so an old farm never misreads a newer file;
//! - every commit uses [`Durability::Immediate`] (fsync before [`Store::commit`] returns), because
//!   the coordinator acknowledges a build, an assignment or a result only once it is on disk:
//!   after a crash, everything it acknowledged is still there, and each [`Batch`] is all or nothing.

use std::fmt;
use std::path::{Path, PathBuf};

use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// The layout of the records in this file; bumped whenever a record type changes.
/// 4: a build's spec gained annotations, labels, `ssh` (its `--ssh` ids) and `inputs`.
/// 5: a build's spec gained `sign` and `notify`.
pub const SCHEMA_VERSION: u64 = 5;

/// The file inside the state directory.
pub const FILE_NAME: &str = "state.redb";

const BUILDS: TableDefinition<&str, &[u8]> = TableDefinition::new("builds");
const TASKS: TableDefinition<u64, &[u8]> = TableDefinition::new("tasks");
const AGENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("agents");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Join tokens by id (the secret itself is never stored, only its hash).
const TOKENS: TableDefinition<&str, &[u8]> = TableDefinition::new("tokens");
/// Revoked identities by name.
const REVOKED: TableDefinition<&str, &[u8]> = TableDefinition::new("revoked");
const SCHEMA_KEY: &str = "schema_version";
const EPOCH_KEY: &str = "epoch";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create state directory {path}: {source}")]
    CreateDir { path: PathBuf, source: std::io::Error },
    #[error(
        "state file {path} is locked by another process: is another coordinator running with the same --state-dir?"
    )]
    Locked { path: PathBuf },
    #[error(
        "state file {path} was written by a newer farm (schema {found}, this farm reads {SCHEMA_VERSION}): \
         upgrade farm or use another --state-dir"
    )]
    NewerSchema { path: PathBuf, found: u64 },
    #[error(
        "state file {path} was written by an older farm (schema {found}, this farm reads {SCHEMA_VERSION}) that \
         this farm cannot migrate: move it aside to start with an empty state"
    )]
    OlderSchema { path: PathBuf, found: u64 },
    #[error("state file {path} is damaged: {source}; move it aside to start with an empty state")]
    Damaged { path: PathBuf, source: Box<redb::Error> },
    #[error(
        "state file {path}: record {key} of table {table} cannot be read ({reason}); \
         move the file aside to start with an empty state"
    )]
    Decode { path: PathBuf, table: &'static str, key: String, reason: String },
    #[error("cannot encode record {key} of table {table} for state file {path}: {source} (nothing was written)")]
    Encode { path: PathBuf, table: &'static str, key: String, source: postcard::Error },
    #[error("cannot {action} state file {path}: {source}; check the disk (space, permissions, I/O errors)")]
    Io { path: PathBuf, action: &'static str, source: Box<redb::Error> },
}

/// The durable state. Cheap to share behind an `Arc`: redb serialises write transactions itself.
pub struct Store {
    db: Database,
    path: PathBuf,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish_non_exhaustive()
    }
}

#[derive(Debug, Clone)]
enum Op {
    PutBuild(String, Vec<u8>),
    DeleteBuild(String),
    PutTask(u64, Vec<u8>),
    DeleteTask(u64),
    PutAgent(String, Vec<u8>),
    PutToken(String, Vec<u8>),
    DeleteToken(String),
    PutRevoked(String, Vec<u8>),
    /// A value that did not encode: the whole batch is refused at commit.
    Unencodable {
        table: &'static str,
        key: String,
        error: postcard::Error,
    },
}

/// A set of changes committed atomically, applied in the order they were added.
///
/// Values are encoded when added, so that [`Store::commit`] needs no type parameters; a value that
/// cannot be encoded makes the commit of the whole batch fail with [`StoreError::Encode`].
#[derive(Debug, Clone, Default)]
pub struct Batch {
    ops: Vec<Op>,
}

impl Batch {
    /// Whether this batch writes a build record (for a test failpoint).
    pub fn has_builds(&self) -> bool {
        self.ops.iter().any(|op| matches!(op, Op::PutBuild(..)))
    }

    /// Appends `other`'s changes after this one's, so both commit in one transaction.
    pub fn extend(&mut self, other: Batch) {
        self.ops.extend(other.ops);
    }

    pub fn put_build<T: Serialize>(&mut self, id: &str, value: &T) -> &mut Self {
        self.put(value, "builds", || format!("{id:?}"), |bytes| Op::PutBuild(id.to_owned(), bytes))
    }

    pub fn delete_build(&mut self, id: &str) -> &mut Self {
        self.ops.push(Op::DeleteBuild(id.to_owned()));
        self
    }

    pub fn put_task<T: Serialize>(&mut self, id: u64, value: &T) -> &mut Self {
        self.put(value, "tasks", || id.to_string(), |bytes| Op::PutTask(id, bytes))
    }

    pub fn delete_task(&mut self, id: u64) -> &mut Self {
        self.ops.push(Op::DeleteTask(id));
        self
    }

    pub fn put_agent<T: Serialize>(&mut self, name: &str, value: &T) -> &mut Self {
        self.put(value, "agents", || format!("{name:?}"), |bytes| Op::PutAgent(name.to_owned(), bytes))
    }

    pub fn put_token<T: Serialize>(&mut self, id: &str, value: &T) -> &mut Self {
        self.put(value, "tokens", || format!("{id:?}"), |bytes| Op::PutToken(id.to_owned(), bytes))
    }

    pub fn delete_token(&mut self, id: &str) -> &mut Self {
        self.ops.push(Op::DeleteToken(id.to_owned()));
        self
    }

    pub fn put_revoked<T: Serialize>(&mut self, name: &str, value: &T) -> &mut Self {
        self.put(value, "revoked", || format!("{name:?}"), |bytes| Op::PutRevoked(name.to_owned(), bytes))
    }

    /// Encodes `value` into the op `make` builds; a value that cannot be encoded becomes an op
    /// that makes the whole commit fail, naming `table` and `key`.
    fn put<T: Serialize>(
        &mut self,
        value: &T,
        table: &'static str,
        key: impl FnOnce() -> String,
        make: impl FnOnce(Vec<u8>) -> Op,
    ) -> &mut Self {
        self.ops.push(match postcard::to_allocvec(value) {
            Ok(bytes) => make(bytes),
            Err(error) => Op::Unencodable { table, key: key(), error },
        });
        self
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// How many changes the batch holds.
    pub fn len(&self) -> usize {
        self.ops.len()
    }
}

/// The whole state, decoded; each list sorted by key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loaded<B, T, A> {
    pub builds: Vec<(String, B)>,
    pub tasks: Vec<(u64, T)>,
    pub agents: Vec<(String, A)>,
}

/// redb's page cache. Its default (1 GiB) lets the coordinator's memory grow with the file, page
/// by page, for as long as it runs; the store is read in full once, at start, and otherwise only
/// written, so a small cache costs nothing measurable.
const CACHE_BYTES: usize = 4 << 20;

impl Store {
    /// Opens or creates `<dir>/state.redb` (creating dir), creates missing tables, checks/writes the
    /// schema version in a `meta` table.
    ///
    /// The whole file is verified (page checksums) on open, so that a damaged file is refused with
    /// [`StoreError::Damaged`] here rather than trusted (redb may panic on a damaged page otherwise).
    /// The state is small; this costs little, once per start.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::CreateDir { path: dir.to_owned(), source })?;
        let path = dir.join(FILE_NAME);
        let db = Database::builder()
            .set_check_integrity_on_open(true)
            .set_cache_size(CACHE_BYTES)
            .create(&path)
            .map_err(|e| classify(&path, "open", e.into()))?;
        let store = Store { db, path };
        store.init()?;
        Ok(store)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Checks the schema version first (a newer file's tables may not even have our key types), then
    /// creates whatever is missing, in one durable transaction.
    fn init(&self) -> Result<(), StoreError> {
        let fail = |e: redb::Error| classify(&self.path, "initialise", e);
        let mut txn = self.db.begin_write().map_err(|e| fail(e.into()))?;
        txn.set_durability(Durability::Immediate).map_err(|e| fail(e.into()))?;
        {
            let mut meta = txn.open_table(META).map_err(|e| fail(e.into()))?;
            let found = meta.get(SCHEMA_KEY).map_err(|e| fail(e.into()))?.map(|v| v.value());
            match found {
                Some(found) if found > SCHEMA_VERSION => {
                    return Err(StoreError::NewerSchema { path: self.path.clone(), found });
                }
                Some(found) if found < SCHEMA_VERSION => {
                    return Err(StoreError::OlderSchema { path: self.path.clone(), found });
                }
                Some(_) => {}
                None => {
                    meta.insert(SCHEMA_KEY, SCHEMA_VERSION).map_err(|e| fail(e.into()))?;
                }
            }
            txn.open_table(BUILDS).map_err(|e| fail(e.into()))?;
            txn.open_table(TASKS).map_err(|e| fail(e.into()))?;
            txn.open_table(AGENTS).map_err(|e| fail(e.into()))?;
            txn.open_table(TOKENS).map_err(|e| fail(e.into()))?;
            txn.open_table(REVOKED).map_err(|e| fail(e.into()))?;
        }
        txn.commit().map_err(|e| fail(e.into()))
    }

    /// One write transaction with redb's immediate durability (fsync before returning). Empty batch: no-op.
    pub fn commit(&self, batch: &Batch) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        if let Some(Op::Unencodable { table, key, error }) =
            batch.ops.iter().find(|op| matches!(op, Op::Unencodable { .. }))
        {
            return Err(StoreError::Encode { path: self.path.clone(), table, key: key.clone(), source: error.clone() });
        }
        let fail = |e: redb::Error| classify(&self.path, "write", e);
        let mut txn = self.db.begin_write().map_err(|e| fail(e.into()))?;
        txn.set_durability(Durability::Immediate).map_err(|e| fail(e.into()))?;
        {
            let mut builds = txn.open_table(BUILDS).map_err(|e| fail(e.into()))?;
            let mut tasks = txn.open_table(TASKS).map_err(|e| fail(e.into()))?;
            let mut agents = txn.open_table(AGENTS).map_err(|e| fail(e.into()))?;
            let mut tokens = txn.open_table(TOKENS).map_err(|e| fail(e.into()))?;
            let mut revoked = txn.open_table(REVOKED).map_err(|e| fail(e.into()))?;
            for op in &batch.ops {
                let done = match op {
                    Op::PutBuild(id, bytes) => builds.insert(id.as_str(), bytes.as_slice()).map(drop),
                    Op::DeleteBuild(id) => builds.remove(id.as_str()).map(drop),
                    Op::PutTask(id, bytes) => tasks.insert(id, bytes.as_slice()).map(drop),
                    Op::DeleteTask(id) => tasks.remove(id).map(drop),
                    Op::PutAgent(name, bytes) => agents.insert(name.as_str(), bytes.as_slice()).map(drop),
                    Op::PutToken(id, bytes) => tokens.insert(id.as_str(), bytes.as_slice()).map(drop),
                    Op::DeleteToken(id) => tokens.remove(id.as_str()).map(drop),
                    Op::PutRevoked(name, bytes) => revoked.insert(name.as_str(), bytes.as_slice()).map(drop),
                    Op::Unencodable { .. } => unreachable!("refused above"),
                };
                done.map_err(|e| fail(e.into()))?;
            }
        }
        txn.commit().map_err(|e| fail(e.into()))
    }

    /// Starts a new run of the coordinator: durably counts it and returns its number (1, 2, ...).
    /// Task ids carry it ([`crate::core::Core::start_epoch`]), so an id handed to an agent in a
    /// run that crashed before writing it down is never handed out again.
    pub fn begin_epoch(&self) -> Result<u64, StoreError> {
        let fail = |e: redb::Error| classify(&self.path, "write", e);
        let mut txn = self.db.begin_write().map_err(|e| fail(e.into()))?;
        txn.set_durability(Durability::Immediate).map_err(|e| fail(e.into()))?;
        let epoch = {
            let mut meta = txn.open_table(META).map_err(|e| fail(e.into()))?;
            let last = meta.get(EPOCH_KEY).map_err(|e| fail(e.into()))?.map(|v| v.value()).unwrap_or(0);
            meta.insert(EPOCH_KEY, last + 1).map_err(|e| fail(e.into()))?;
            last + 1
        };
        txn.commit().map_err(|e| fail(e.into()))?;
        Ok(epoch)
    }

    /// Whether the builds table holds `id` (ended builds leave the coordinator's memory, not the store).
    pub fn has_build(&self, id: &str) -> Result<bool, StoreError> {
        let fail = |e: redb::Error| classify(&self.path, "read", e);
        let txn = self.db.begin_read().map_err(|e| fail(e.into()))?;
        let table = txn.open_table(BUILDS).map_err(|e| fail(e.into()))?;
        Ok(table.get(id).map_err(|e| fail(e.into()))?.is_some())
    }

    /// Ids in the builds table that start with `prefix` (at most `limit`).
    pub fn builds_with_prefix(&self, prefix: &str, limit: usize) -> Result<Vec<String>, StoreError> {
        let fail = |e: redb::Error| classify(&self.path, "read", e);
        let txn = self.db.begin_read().map_err(|e| fail(e.into()))?;
        let table = txn.open_table(BUILDS).map_err(|e| fail(e.into()))?;
        let mut out = Vec::new();
        for entry in table.range(prefix..).map_err(|e| fail(e.into()))? {
            let (key, _) = entry.map_err(|e| fail(e.into()))?;
            let id = key.value();
            if !id.starts_with(prefix) || out.len() == limit {
                break;
            }
            out.push(id.to_owned());
        }
        Ok(out)
    }

    /// One build's record, decoded.
    pub fn get_build<B: DeserializeOwned>(&self, id: &str) -> Result<Option<B>, StoreError> {
        let fail = |e: redb::Error| classify(&self.path, "read", e);
        let txn = self.db.begin_read().map_err(|e| fail(e.into()))?;
        let table = txn.open_table(BUILDS).map_err(|e| fail(e.into()))?;
        let Some(value) = table.get(id).map_err(|e| fail(e.into()))? else { return Ok(None) };
        Ok(Some(self.decode(value.value(), "builds", || format!("{id:?}"))?))
    }

    /// Everything, decoded. A record that fails to decode is an error naming table and key.
    pub fn load<B: DeserializeOwned, T: DeserializeOwned, A: DeserializeOwned>(
        &self,
    ) -> Result<Loaded<B, T, A>, StoreError> {
        let fail = |e: redb::Error| classify(&self.path, "read", e);
        let txn = self.db.begin_read().map_err(|e| fail(e.into()))?;
        let mut loaded = Loaded { builds: Vec::new(), tasks: Vec::new(), agents: Vec::new() };

        let table = txn.open_table(BUILDS).map_err(|e| fail(e.into()))?;
        for entry in table.iter().map_err(|e| fail(e.into()))? {
            let (key, value) = entry.map_err(|e| fail(e.into()))?;
            let id = key.value();
            let record = self.decode(value.value(), "builds", || format!("{id:?}"))?;
            loaded.builds.push((id.to_owned(), record));
        }

        let table = txn.open_table(TASKS).map_err(|e| fail(e.into()))?;
        for entry in table.iter().map_err(|e| fail(e.into()))? {
            let (key, value) = entry.map_err(|e| fail(e.into()))?;
            let id = key.value();
            let record = self.decode(value.value(), "tasks", || id.to_string())?;
            loaded.tasks.push((id, record));
        }

        let table = txn.open_table(AGENTS).map_err(|e| fail(e.into()))?;
        for entry in table.iter().map_err(|e| fail(e.into()))? {
            let (key, value) = entry.map_err(|e| fail(e.into()))?;
            let name = key.value();
            let record = self.decode(value.value(), "agents", || format!("{name:?}"))?;
            loaded.agents.push((name.to_owned(), record));
        }

        Ok(loaded)
    }

    /// Join tokens and revoked identities, decoded; each list sorted by key.
    #[allow(clippy::type_complexity)]
    pub fn load_security<K: DeserializeOwned, R: DeserializeOwned>(
        &self,
    ) -> Result<(Vec<(String, K)>, Vec<(String, R)>), StoreError> {
        let fail = |e: redb::Error| classify(&self.path, "read", e);
        let txn = self.db.begin_read().map_err(|e| fail(e.into()))?;
        let mut out = (Vec::new(), Vec::new());
        let table = txn.open_table(TOKENS).map_err(|e| fail(e.into()))?;
        for entry in table.iter().map_err(|e| fail(e.into()))? {
            let (key, value) = entry.map_err(|e| fail(e.into()))?;
            let id = key.value();
            out.0.push((id.to_owned(), self.decode(value.value(), "tokens", || format!("{id:?}"))?));
        }
        let table = txn.open_table(REVOKED).map_err(|e| fail(e.into()))?;
        for entry in table.iter().map_err(|e| fail(e.into()))? {
            let (key, value) = entry.map_err(|e| fail(e.into()))?;
            let name = key.value();
            out.1.push((name.to_owned(), self.decode(value.value(), "revoked", || format!("{name:?}"))?));
        }
        Ok(out)
    }

    /// Strict: trailing bytes mean the record is not of this type either.
    fn decode<R: DeserializeOwned>(
        &self,
        bytes: &[u8],
        table: &'static str,
        key: impl FnOnce() -> String,
    ) -> Result<R, StoreError> {
        let reason = match postcard::take_from_bytes::<R>(bytes) {
            Ok((record, [])) => return Ok(record),
            Ok((_, rest)) => format!("{} unexpected trailing bytes", rest.len()),
            Err(e) => e.to_string(),
        };
        Err(StoreError::Decode { path: self.path.clone(), table, key: key(), reason })
    }
}

/// Sorts a redb error into what the operator should do about it.
fn classify(path: &Path, action: &'static str, error: redb::Error) -> StoreError {
    let path = path.to_owned();
    match error {
        redb::Error::DatabaseAlreadyOpen | redb::Error::LockProtocolMismatch => StoreError::Locked { path },
        redb::Error::Corrupted(_)
        | redb::Error::RepairAborted
        | redb::Error::UpgradeRequired(_)
        | redb::Error::TableTypeMismatch { .. }
        | redb::Error::TableIsMultimap(_)
        | redb::Error::TypeDefinitionChanged { .. } => StoreError::Damaged { path, source: Box::new(error) },
        // What `create` says of a file that is not a redb database at all.
        redb::Error::Io(ref io) if io.kind() == std::io::ErrorKind::InvalidData => {
            StoreError::Damaged { path, source: Box::new(error) }
        }
        source => StoreError::Io { path, action, source: Box::new(source) },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::{Deserialize, Serializer};

    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    struct Build {
        tag: String,
        platforms: Vec<String>,
    }

    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    struct Task {
        build: String,
        attempt: u32,
    }

    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    struct Agent {
        slots: u32,
        labels: Vec<(String, String)>,
    }

    type All = Loaded<Build, Task, Agent>;

    fn build(tag: &str) -> Build {
        Build { tag: tag.into(), platforms: vec!["linux/amd64".into(), "linux/arm64".into()] }
    }

    fn task(build: &str, attempt: u32) -> Task {
        Task { build: build.into(), attempt }
    }

    fn agent(slots: u32) -> Agent {
        Agent { slots, labels: vec![("gpu".into(), "no".into())] }
    }

    #[test]
    fn store_and_its_error_can_cross_threads() {
        fn check<T: Send + Sync + 'static>() {}
        check::<Store>();
        check::<StoreError>();
    }

    #[test]
    fn round_trip_of_all_three_tables_sorted_by_key() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("state")).unwrap();
        assert_eq!(store.path(), dir.path().join("state").join("state.redb"));
        assert_eq!(store.load::<Build, Task, Agent>().unwrap(), All { builds: vec![], tasks: vec![], agents: vec![] });

        let mut batch = Batch::default();
        batch
            .put_build("web", &build("web:1"))
            .put_build("api", &build("api:2"))
            .put_task(10, &task("web", 1))
            .put_task(2, &task("api", 1))
            .put_task(3, &task("api", 2))
            .put_agent("zeta", &agent(4))
            .put_agent("alpha", &agent(1));
        assert_eq!(batch.len(), 7);
        assert!(!batch.is_empty());
        store.commit(&batch).unwrap();

        let loaded: All = store.load().unwrap();
        assert_eq!(loaded.builds, vec![("api".into(), build("api:2")), ("web".into(), build("web:1"))]);
        assert_eq!(loaded.tasks, vec![(2, task("api", 1)), (3, task("api", 2)), (10, task("web", 1))]);
        assert_eq!(loaded.agents, vec![("alpha".into(), agent(1)), ("zeta".into(), agent(4))]);

        // A put over an existing key replaces it; ops apply in order within a batch.
        let mut batch = Batch::default();
        batch.put_agent("alpha", &agent(2)).put_agent("alpha", &agent(8));
        store.commit(&batch).unwrap();
        let loaded: All = store.load().unwrap();
        assert_eq!(loaded.agents, vec![("alpha".into(), agent(8)), ("zeta".into(), agent(4))]);
    }

    #[test]
    fn delete_removes_builds_and_tasks_and_ignores_missing_keys() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut batch = Batch::default();
        batch
            .put_build("a", &build("a"))
            .put_build("b", &build("b"))
            .put_task(1, &task("a", 1))
            .put_task(2, &task("b", 1));
        store.commit(&batch).unwrap();

        let mut batch = Batch::default();
        batch.delete_build("a").delete_task(1).delete_build("never").delete_task(99);
        store.commit(&batch).unwrap();
        let loaded: All = store.load().unwrap();
        assert_eq!(loaded.builds, vec![("b".into(), build("b"))]);
        assert_eq!(loaded.tasks, vec![(2, task("b", 1))]);

        // Put then delete in one batch: deleted.
        let mut batch = Batch::default();
        batch.put_task(5, &task("b", 2)).delete_task(5);
        store.commit(&batch).unwrap();
        assert_eq!(store.load::<Build, Task, Agent>().unwrap().tasks, vec![(2, task("b", 1))]);
    }

    #[test]
    fn reopen_keeps_data() {
        let dir = tempfile::tempdir().unwrap();
        let mut batch = Batch::default();
        batch.put_build("web", &build("web:1")).put_task(7, &task("web", 3)).put_agent("arm1", &agent(2));
        {
            let store = Store::open(dir.path()).unwrap();
            store.commit(&batch).unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        let loaded: All = store.load().unwrap();
        assert_eq!(loaded.builds, vec![("web".into(), build("web:1"))]);
        assert_eq!(loaded.tasks, vec![(7, task("web", 3))]);
        assert_eq!(loaded.agents, vec![("arm1".into(), agent(2))]);
    }

    #[test]
    fn each_run_gets_a_new_epoch_that_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            assert_eq!(store.begin_epoch().unwrap(), 1);
            assert_eq!(store.begin_epoch().unwrap(), 2);
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.begin_epoch().unwrap(), 3);
    }

    #[test]
    fn empty_batch_is_a_no_op() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let before = std::fs::read(store.path()).unwrap();
        let batch = Batch::default();
        assert!(batch.is_empty());
        assert_eq!(batch.len(), 0);
        store.commit(&batch).unwrap();
        assert_eq!(std::fs::read(store.path()).unwrap(), before, "an empty batch must not write");
        assert_eq!(store.load::<Build, Task, Agent>().unwrap(), All { builds: vec![], tasks: vec![], agents: vec![] });
    }

    fn write_schema_version(path: &Path, version: u64) {
        let db = Database::create(path).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(META).unwrap().insert(SCHEMA_KEY, version).unwrap();
        txn.commit().unwrap();
    }

    #[test]
    fn a_new_file_gets_the_current_schema_version() {
        let dir = tempfile::tempdir().unwrap();
        let path = Store::open(dir.path()).unwrap().path().to_owned();
        let db = Database::create(&path).unwrap();
        let txn = db.begin_read().unwrap();
        let version = txn.open_table(META).unwrap().get(SCHEMA_KEY).unwrap().map(|v| v.value());
        assert_eq!(version, Some(SCHEMA_VERSION));
    }

    #[test]
    fn a_newer_schema_is_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let path = Store::open(dir.path()).unwrap().path().to_owned();
        write_schema_version(&path, SCHEMA_VERSION + 1);

        let err = Store::open(dir.path()).unwrap_err();
        let newer = SCHEMA_VERSION + 1;
        assert!(matches!(err, StoreError::NewerSchema { found, .. } if found == newer), "{err:?}");
        assert_eq!(
            err.to_string(),
            format!(
                "state file {} was written by a newer farm (schema {newer}, this farm reads {SCHEMA_VERSION}): \
                 upgrade farm or use another --state-dir",
                path.display()
            )
        );
        // Refusing wrote nothing: still refused, still the newer schema.
        assert!(matches!(Store::open(dir.path()), Err(StoreError::NewerSchema { found, .. }) if found == newer));
    }

    #[test]
    fn an_older_schema_is_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let path = Store::open(dir.path()).unwrap().path().to_owned();
        write_schema_version(&path, 0);
        let err = Store::open(dir.path()).unwrap_err();
        assert!(matches!(err, StoreError::OlderSchema { found: 0, .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains(&path.display().to_string()) && msg.contains("move it aside"), "{msg}");
    }

    #[test]
    fn a_second_open_of_the_same_file_is_locked() {
        let dir = tempfile::tempdir().unwrap();
        let first = Store::open(dir.path()).unwrap();
        let err = Store::open(dir.path()).unwrap_err();
        assert!(matches!(err, StoreError::Locked { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            format!(
                "state file {} is locked by another process: is another coordinator running with the same \
                 --state-dir?",
                first.path().display()
            )
        );
        drop(first);
        Store::open(dir.path()).expect("the lock goes with the first store");
    }

    #[test]
    fn a_damaged_file_is_reported_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        std::fs::write(&path, vec![0xa5; 64 * 1024]).unwrap();
        let err = Store::open(dir.path()).unwrap_err();
        assert!(matches!(err, StoreError::Damaged { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.starts_with(&format!("state file {} is damaged: ", path.display())), "{msg}");
        assert!(msg.ends_with("; move it aside to start with an empty state"), "{msg}");
    }

    #[test]
    fn damaged_pages_are_refused_at_open_not_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let path = {
            let store = Store::open(dir.path()).unwrap();
            for i in 0..200 {
                let mut batch = Batch::default();
                batch.put_task(i, &task("web", 1)).put_build(&format!("b{i}"), &build("web:1"));
                store.commit(&batch).unwrap();
            }
            store.path().to_owned()
        };
        // Everything after redb's header page: the trees the header points at no longer verify.
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[4096..].iter_mut().for_each(|b| *b ^= 0x5a);
        std::fs::write(&path, &bytes).unwrap();

        let err = Store::open(dir.path()).unwrap_err();
        assert!(matches!(err, StoreError::Damaged { .. }), "{err:?}");
        assert!(err.to_string().ends_with("; move it aside to start with an empty state"), "{err}");
    }

    #[test]
    fn a_record_of_the_wrong_type_names_table_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();

        // Decodes as a `Task` prefix, but leaves bytes over: refused, not silently misread.
        let mut batch = Batch::default();
        batch.put_task(7, &(task("web", 1), 12345u64));
        store.commit(&batch).unwrap();
        let err = store.load::<Build, Task, Agent>().unwrap_err();
        assert!(matches!(&err, StoreError::Decode { table: "tasks", key, .. } if key == "7"), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("record 7 of table tasks") && msg.contains("trailing bytes"), "{msg}");
        assert!(msg.contains(&store.path().display().to_string()), "{msg}");

        // Too short for a `Build`.
        let mut batch = Batch::default();
        batch.delete_task(7).put_build("web", &1u8);
        store.commit(&batch).unwrap();
        let err = store.load::<Build, Task, Agent>().unwrap_err();
        assert!(matches!(&err, StoreError::Decode { table: "builds", key, .. } if key == "\"web\""), "{err:?}");
        assert!(err.to_string().contains("record \"web\" of table builds"), "{err}");

        // Agents too.
        let mut batch = Batch::default();
        batch.delete_build("web").put_agent("arm1", &"not an agent");
        store.commit(&batch).unwrap();
        let err = store.load::<Build, Task, Agent>().unwrap_err();
        assert!(matches!(&err, StoreError::Decode { table: "agents", key, .. } if key == "\"arm1\""), "{err:?}");
    }

    struct Unencodable;

    impl Serialize for Unencodable {
        fn serialize<S: Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
            Err(serde::ser::Error::custom("no"))
        }
    }

    #[test]
    fn a_value_that_cannot_be_encoded_fails_the_whole_batch() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut batch = Batch::default();
        batch.put_build("web", &build("web:1")).put_task(3, &Unencodable);
        let err = store.commit(&batch).unwrap_err();
        assert!(matches!(&err, StoreError::Encode { table: "tasks", key, .. } if key == "3"), "{err:?}");
        assert_eq!(store.load::<Build, Task, Agent>().unwrap(), All { builds: vec![], tasks: vec![], agents: vec![] });
    }
}
