//! The scheduler's redb file: schedules by id, recurring names, the due index that the
//! release loop reads in time order, and the expiry index of finished one-shot schedules.
//!
//! Reads open their own read transaction. Every write goes through the [`Writer`]: one
//! thread that takes all waiting operations, runs them in one write transaction, commits
//! once, and then returns each one's result.

use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use docket_proto::storage::{Release, ScheduleRecord};
use docket_proto::v1::{ScheduleKind, ScheduleState};
use prost::Message;
use redb::{Database, ReadableDatabase, ReadableTable, Table, TableDefinition, WriteTransaction};
use tokio::sync::{mpsc, oneshot};

use crate::error::SchedulerError;

/// A schedule id: the 128 bits of its UUIDv7.
pub type Id = u128;

/// Schedules by id.
const SCHEDULES: TableDefinition<u128, &[u8]> = TableDefinition::new("schedules");
/// Ids of recurring schedules by name.
const NAMES: TableDefinition<&str, u128> = TableDefinition::new("names");
/// Active schedules by next fire time.
const DUE: TableDefinition<(i64, u128), ()> = TableDefinition::new("due");
/// Releases in progress by schedule id: fire times claimed and not yet recorded.
const RELEASES: TableDefinition<u128, &[u8]> = TableDefinition::new("releases");
/// One-shot schedules that no longer fire, by the time they are deleted.
const EXPIRY: TableDefinition<(i64, u128), ()> = TableDefinition::new("expiry");
/// Metadata: the schema version.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// Version of the table layout this scheduler writes.
const SCHEMA_VERSION: u64 = 1;

/// The scheduler's store, for reads. Writes go through a [`Writer`].
pub struct Store {
    db: Arc<Database>,
}

impl Store {
    /// Opens or creates the store at `path`, creating `data_dir` first.
    pub fn open(data_dir: &Path, path: &Path, cache_bytes: usize) -> Result<Store, StoreOpenError> {
        std::fs::create_dir_all(data_dir).map_err(|source| StoreOpenError::DataDir {
            path: data_dir.to_path_buf(),
            source,
        })?;
        let db = match Database::builder().set_cache_size(cache_bytes).create(path) {
            Ok(db) => db,
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
                return Err(StoreOpenError::AlreadyOpen(path.to_path_buf()));
            }
            Err(err) => return Err(SchedulerError::from(err).into()),
        };
        let txn = db.begin_write().map_err(SchedulerError::from)?;
        {
            let mut meta = txn.open_table(META).map_err(SchedulerError::from)?;
            let version = meta
                .get("schema_version")
                .map_err(SchedulerError::from)?
                .map(|value| value.value());
            match version {
                None => {
                    meta.insert("schema_version", SCHEMA_VERSION)
                        .map_err(SchedulerError::from)?;
                }
                Some(SCHEMA_VERSION) => {}
                Some(version) => return Err(StoreOpenError::Version(version)),
            }
            let tables = Tables::open(&txn)?;
            drop(tables);
        }
        txn.commit().map_err(SchedulerError::from)?;
        Ok(Store { db: Arc::new(db) })
    }

    /// Returns the schedule with id `id`.
    pub fn get(&self, id: Id) -> Result<Option<ScheduleRecord>, SchedulerError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(SCHEDULES)?;
        let value = table.get(id)?;
        value.map(|value| decode(id, value.value())).transpose()
    }

    /// Returns the id of the recurring schedule named `name`.
    pub fn id_of(&self, name: &str) -> Result<Option<Id>, SchedulerError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(NAMES)?;
        Ok(table.get(name)?.map(|value| value.value()))
    }

    /// Returns up to `limit` entries of the due index, (next fire time, id), whose time is
    /// at or before `now`, earliest first.
    pub fn due(&self, now: i64, limit: usize) -> Result<Vec<(i64, Id)>, SchedulerError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(DUE)?;
        let mut due = Vec::new();
        for entry in table.range(..=(now, u128::MAX))?.take(limit) {
            due.push(entry?.0.value());
        }
        Ok(due)
    }

    /// Returns whether a one-shot schedule's retention ended at or before `now`.
    pub fn any_expired(&self, now: i64) -> Result<bool, SchedulerError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(EXPIRY)?;
        Ok(table.first()?.is_some_and(|(key, _)| key.value().0 <= now))
    }

    /// Returns the earliest next fire time of any active schedule.
    pub fn earliest_due(&self) -> Result<Option<i64>, SchedulerError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(DUE)?;
        Ok(table.first()?.map(|(key, _)| key.value().0))
    }

    /// Returns up to `limit` recurring schedules whose names sort after `after`, in name
    /// order.
    pub fn recurring_after(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(Id, ScheduleRecord)>, SchedulerError> {
        let txn = self.db.begin_read()?;
        let names = txn.open_table(NAMES)?;
        let schedules = txn.open_table(SCHEDULES)?;
        let range = match after {
            Some(name) => names.range((Bound::Excluded(name), Bound::Unbounded))?,
            None => names.range(..)?,
        };
        let mut found = Vec::new();
        for entry in range.take(limit) {
            let id = entry?.1.value();
            if let Some(value) = schedules.get(id)? {
                found.push((id, decode(id, value.value())?));
            }
        }
        Ok(found)
    }

    /// Returns up to `limit` one-shot schedules with ids after `after`, in id order, which
    /// is the order they were created in.
    pub fn one_shot_after(
        &self,
        after: Option<Id>,
        limit: usize,
    ) -> Result<Vec<(Id, ScheduleRecord)>, SchedulerError> {
        let txn = self.db.begin_read()?;
        let schedules = txn.open_table(SCHEDULES)?;
        let range = match after {
            Some(id) => schedules.range((Bound::Excluded(id), Bound::Unbounded))?,
            None => schedules.range(..)?,
        };
        let mut found = Vec::new();
        for entry in range {
            let (key, value) = entry?;
            let id = key.value();
            let record = decode(id, value.value())?;
            if record.kind() == ScheduleKind::OneShot {
                found.push((id, record));
                if found.len() == limit {
                    break;
                }
            }
        }
        Ok(found)
    }
}

/// An error that keeps the store from opening.
#[derive(Debug, thiserror::Error)]
pub enum StoreOpenError {
    /// The data folder could not be created.
    #[error("cannot create the data folder {path}: {source}")]
    DataDir {
        /// The folder.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },

    /// Another process has the file open.
    #[error("{0} is open in another process; run one scheduler per data folder")]
    AlreadyOpen(PathBuf),

    /// The file was written by a newer scheduler.
    #[error(
        "the data file has schema version {0}, newer than this scheduler's {SCHEMA_VERSION}; upgrade the scheduler"
    )]
    Version(u64),

    /// redb failed.
    #[error(transparent)]
    Store(#[from] SchedulerError),
}

fn decode(id: Id, bytes: &[u8]) -> Result<ScheduleRecord, SchedulerError> {
    ScheduleRecord::decode(bytes).map_err(|err| {
        SchedulerError::Corrupt(format!("schedule {}: {err}", uuid::Uuid::from_u128(id)))
    })
}

/// The tables of one write transaction.
pub struct Tables<'txn> {
    schedules: Table<'txn, u128, &'static [u8]>,
    names: Table<'txn, &'static str, u128>,
    due: Table<'txn, (i64, u128), ()>,
    expiry: Table<'txn, (i64, u128), ()>,
    releases: Table<'txn, u128, &'static [u8]>,
}

impl<'txn> Tables<'txn> {
    fn open(txn: &'txn WriteTransaction) -> Result<Self, SchedulerError> {
        Ok(Tables {
            schedules: txn.open_table(SCHEDULES)?,
            names: txn.open_table(NAMES)?,
            due: txn.open_table(DUE)?,
            expiry: txn.open_table(EXPIRY)?,
            releases: txn.open_table(RELEASES)?,
        })
    }

    /// Returns the schedule with id `id`, including changes of this transaction.
    pub fn get(&self, id: Id) -> Result<Option<ScheduleRecord>, SchedulerError> {
        let value = self.schedules.get(id)?;
        value.map(|value| decode(id, value.value())).transpose()
    }

    /// Returns the id of the recurring schedule named `name`.
    pub fn id_of(&self, name: &str) -> Result<Option<Id>, SchedulerError> {
        Ok(self.names.get(name)?.map(|value| value.value()))
    }

    /// Stores `record` under `id`, replacing `previous`, which must be the record stored
    /// before, and keeps the name, due and expiry indexes in step with it.
    pub fn put(
        &mut self,
        id: Id,
        record: &ScheduleRecord,
        previous: Option<&ScheduleRecord>,
    ) -> Result<(), SchedulerError> {
        if let Some(previous) = previous {
            self.remove_indexes(id, previous)?;
        }
        self.schedules
            .insert(id, record.encode_to_vec().as_slice())?;
        if !record.name.is_empty() {
            self.names.insert(record.name.as_str(), id)?;
        }
        if let Some(next) = due_time(record) {
            self.due.insert((next, id), ())?;
        }
        if let Some(expire) = record.expire_nanos {
            self.expiry.insert((expire, id), ())?;
        }
        Ok(())
    }

    /// Returns up to `limit` entries of the due index, (next fire time, id), whose time is
    /// at or before `now`, earliest first, including changes of this transaction.
    pub fn due(&self, now: i64, limit: usize) -> Result<Vec<(i64, Id)>, SchedulerError> {
        let mut due = Vec::new();
        for entry in self.due.range(..=(now, u128::MAX))?.take(limit) {
            due.push(entry?.0.value());
        }
        Ok(due)
    }

    /// Returns the earliest next fire time of any active schedule.
    pub fn earliest_due(&self) -> Result<Option<i64>, SchedulerError> {
        Ok(self.due.first()?.map(|(key, _)| key.value().0))
    }

    /// Returns the release in progress of schedule `id`.
    pub fn release(&self, id: Id) -> Result<Option<Release>, SchedulerError> {
        let value = self.releases.get(id)?;
        value
            .map(|value| {
                Release::decode(value.value()).map_err(|err| {
                    SchedulerError::Corrupt(format!(
                        "release of schedule {}: {err}",
                        uuid::Uuid::from_u128(id)
                    ))
                })
            })
            .transpose()
    }

    /// Stores `release` as the release in progress of schedule `id`.
    pub fn put_release(&mut self, id: Id, release: &Release) -> Result<(), SchedulerError> {
        self.releases
            .insert(id, release.encode_to_vec().as_slice())?;
        Ok(())
    }

    /// Removes the release in progress of schedule `id`.
    pub fn remove_release(&mut self, id: Id) -> Result<(), SchedulerError> {
        self.releases.remove(id)?;
        Ok(())
    }

    /// Removes the due-index entry of `id` at `time`.
    pub fn remove_due(&mut self, time: i64, id: Id) -> Result<(), SchedulerError> {
        self.due.remove((time, id))?;
        Ok(())
    }

    /// Deletes the schedule `record` stored under `id`, with its index entries.
    pub fn delete(&mut self, id: Id, record: &ScheduleRecord) -> Result<(), SchedulerError> {
        self.remove_indexes(id, record)?;
        self.releases.remove(id)?;
        self.schedules.remove(id)?;
        Ok(())
    }

    fn remove_indexes(&mut self, id: Id, record: &ScheduleRecord) -> Result<(), SchedulerError> {
        if !record.name.is_empty() {
            self.names.remove(record.name.as_str())?;
        }
        if let Some(next) = due_time(record) {
            self.due.remove((next, id))?;
        }
        if let Some(expire) = record.expire_nanos {
            self.expiry.remove((expire, id))?;
        }
        Ok(())
    }

    /// Deletes up to `limit` one-shot schedules whose expiry time is at or before `now`,
    /// and returns how many it deleted.
    pub fn purge_expired(&mut self, now: i64, limit: usize) -> Result<usize, SchedulerError> {
        let mut expired = Vec::new();
        for entry in self.expiry.range(..=(now, u128::MAX))?.take(limit) {
            expired.push(entry?.0.value());
        }
        for &(expire, id) in &expired {
            match self.get(id)? {
                Some(record) => self.delete(id, &record)?,
                None => {
                    self.expiry.remove((expire, id))?;
                }
            }
        }
        Ok(expired.len())
    }
}

/// Returns the due-index time of `record`: its next fire time while it is active.
fn due_time(record: &ScheduleRecord) -> Option<i64> {
    match record.state() {
        ScheduleState::Active => record.next_fire_nanos,
        _ => None,
    }
}

/// The callback that delivers a write operation's result once the commit is known.
type Completion = Box<dyn FnOnce(Result<(), String>) + Send>;

/// A write operation, run on the writer thread inside the batch's transaction, or given
/// the error that kept the transaction from starting.
type Job =
    Box<dyn for<'txn> FnOnce(Result<&mut Tables<'txn>, String>) -> (bool, Completion) + Send>;

/// The handle that sends write operations to the writer thread.
#[derive(Clone)]
pub struct Writer {
    jobs: mpsc::Sender<Job>,
}

impl Writer {
    /// Starts the writer thread over `store`'s database. The thread ends once every
    /// `Writer` handle is dropped and the operations sent so far are committed.
    pub fn spawn(
        store: &Store,
        max_batch: usize,
    ) -> std::io::Result<(Writer, std::thread::JoinHandle<()>)> {
        let (jobs, receiver) = mpsc::channel(1024);
        let db = Arc::clone(&store.db);
        let thread = std::thread::Builder::new()
            .name("docket-scheduler-writer".into())
            .spawn(move || run_writer(&db, receiver, max_batch.max(1)))?;
        Ok((Writer { jobs }, thread))
    }

    /// Runs `operation` in a write transaction and returns its result once the
    /// transaction is durably committed.
    ///
    /// An operation that returns an error other than a storage error must not have
    /// written anything, since the transaction it shares with others still commits.
    pub async fn run<T: Send + 'static>(
        &self,
        operation: impl for<'txn> FnOnce(&mut Tables<'txn>) -> Result<T, SchedulerError>
        + Send
        + 'static,
    ) -> Result<T, SchedulerError> {
        let (reply, answer) = oneshot::channel();
        let job: Job = Box::new(move |tables| {
            let result = match tables {
                Ok(tables) => operation(tables),
                Err(message) => Err(SchedulerError::CommitFailed(message)),
            };
            let failed = matches!(&result, Err(err) if err.is_storage());
            let completion: Completion = Box::new(move |commit| {
                // An operation's own error explains more than the failed commit it caused.
                let result = match (result, commit) {
                    (Err(err), _) => Err(err),
                    (Ok(value), Ok(())) => Ok(value),
                    (Ok(_), Err(message)) => Err(SchedulerError::CommitFailed(message)),
                };
                let _ = reply.send(result);
            });
            (failed, completion)
        });
        self.jobs
            .send(job)
            .await
            .map_err(|_| SchedulerError::Unavailable("shutting down"))?;
        answer
            .await
            .map_err(|_| SchedulerError::Unavailable("shutting down"))?
    }
}

fn run_writer(db: &Database, mut jobs: mpsc::Receiver<Job>, max_batch: usize) {
    let mut batch = Vec::with_capacity(max_batch);
    while let Some(first) = jobs.blocking_recv() {
        batch.push(first);
        while batch.len() < max_batch {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let (commit, completions) = write_batch(db, &mut batch);
        for completion in completions {
            completion(commit.clone());
        }
    }
}

/// Runs `batch` in one transaction and commits it, unless an operation failed in the
/// store.
fn write_batch(db: &Database, batch: &mut Vec<Job>) -> (Result<(), String>, Vec<Completion>) {
    let txn = match db.begin_write() {
        Ok(txn) => txn,
        Err(err) => return fail_all(batch, format!("cannot begin a write transaction: {err}")),
    };
    let mut completions = Vec::with_capacity(batch.len());
    let mut failed = false;
    {
        let mut tables = match Tables::open(&txn) {
            Ok(tables) => tables,
            Err(err) => return fail_all(batch, err.to_string()),
        };
        for job in batch.drain(..) {
            let (job_failed, completion) = job(Ok(&mut tables));
            failed |= job_failed;
            completions.push(completion);
        }
    }
    let commit = if failed {
        // The operation that failed has its own error. The others in the batch get an error
        // saying that the batch was not committed.
        let _ = txn.abort();
        Err("another write in the same transaction failed in the store".to_string())
    } else {
        txn.commit().map_err(|err| {
            tracing::error!(error = %err, "commit failed");
            format!("commit failed: {err}")
        })
    };
    (commit, completions)
}

fn fail_all(batch: &mut Vec<Job>, message: String) -> (Result<(), String>, Vec<Completion>) {
    tracing::error!(error = %message, "write transaction failed");
    let completions = batch
        .drain(..)
        .map(|job| job(Err(message.clone())).1)
        .collect();
    (Err(message), completions)
}
