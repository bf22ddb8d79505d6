//! The on-node evidence store (redb: an embedded, crash-safe B-tree store with no server).
//! Records are keyed by id (nanoseconds of their first packet, so by time) and indexed by
//! namespace, pod, verdict and policy; retention by age and by size; writes are batched.
//!
//! What the records of one conversation have in common is stored once, under the digest of its
//! encoding, and counted by the records that refer to it: their evidence (the explanation and the
//! policies in force), and the conversation itself (both ends, the verdict and its reasons). A
//! record keeps only its own id, times, source port and counts: the thousands of records of a
//! flood share one conversation and one evidence.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use redb::{
    Database, MultimapTableDefinition, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition,
};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::sync::{broadcast, mpsc};

use super::filter::FlowFilter;
use super::record::{FlowRecord, FlowVerdict, PortSweep};

/// A change to the store: a new record, or new counts for a stored one.
#[derive(Clone, Debug, PartialEq)]
pub enum StoreOp {
    Insert(Box<FlowRecord>),
    /// New cumulative counts for a record already stored.
    Count {
        id: u64,
        packets: u64,
        bytes: u64,
        last_seen: SystemTime,
        attempts: u64,
        /// A scan summary's ports, when they changed.
        ports: Option<PortSweep>,
    },
}

const RECORDS: TableDefinition<u64, &[u8]> = TableDefinition::new("records");
const BY_NAMESPACE: MultimapTableDefinition<&str, u64> = MultimapTableDefinition::new("by_namespace");
const BY_POD: MultimapTableDefinition<&str, u64> = MultimapTableDefinition::new("by_pod");
const BY_VERDICT: MultimapTableDefinition<&str, u64> = MultimapTableDefinition::new("by_verdict");
const BY_POLICY: MultimapTableDefinition<&str, u64> = MultimapTableDefinition::new("by_policy");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Shared contents by the digest of their encoding, and how many records refer to each.
const EVIDENCE: TableDefinition<u128, &[u8]> = TableDefinition::new("evidence");
const EVIDENCE_REFS: TableDefinition<u128, u64> = TableDefinition::new("evidence_refs");
const CONVERSATIONS: TableDefinition<u128, &[u8]> = TableDefinition::new("conversations");
const CONVERSATION_REFS: TableDefinition<u128, u64> = TableDefinition::new("conversation_refs");

/// The first byte of a stored record whose conversation is in [`CONVERSATIONS`]: the
/// conversation's 16-byte digest follows, then [`EVIDENCE_REF`] and the evidence's digest if the
/// record has evidence, then the record's [`Own`] fields.
const CONVERSATION_REF: u8 = b'C';

/// The first byte of a record stored whole whose evidence is in [`EVIDENCE`] (as stores written
/// before conversations were shared hold them): the 16-byte digest follows, then the record's
/// JSON. A record stored as plain JSON (`{`) holds its own evidence, or none.
const EVIDENCE_REF: u8 = b'E';

/// A record's own fields beside its conversation, as a JSON array of about 80 bytes: id, first
/// and last packet (nanoseconds since the epoch), source port, packets, bytes, attempts and a
/// scan summary's ports.
#[derive(Serialize, Deserialize)]
struct Own(u64, u64, u64, u16, u64, u64, u64, Option<PortSweep>);

impl Own {
    fn of(r: &FlowRecord) -> Self {
        Own(r.id, nanos(r.time), nanos(r.last_seen), r.source.port, r.packets, r.bytes, r.attempts, r.ports.clone())
    }

    /// The record of these fields in `conversation`.
    fn into_record(self, mut conversation: FlowRecord) -> FlowRecord {
        let Own(id, time, last_seen, source_port, packets, bytes, attempts, ports) = self;
        conversation.id = id;
        conversation.time = UNIX_EPOCH + Duration::from_nanos(time);
        conversation.last_seen = UNIX_EPOCH + Duration::from_nanos(last_seen);
        conversation.source.port = source_port;
        conversation.packets = packets;
        conversation.bytes = bytes;
        conversation.attempts = attempts;
        conversation.ports = ports;
        conversation
    }
}

/// The record without its own fields and its evidence: what the records of its conversation share.
fn conversation_of(r: &FlowRecord) -> FlowRecord {
    let conversation = FlowRecord { evidence: None, ports: None, ..r.clone() };
    Own(0, 0, 0, 0, 0, 0, 1, None).into_record(conversation)
}

fn digest(content: &[u8]) -> u128 {
    let digest = ring::digest::digest(&ring::digest::SHA256, content);
    u128::from_be_bytes(digest.as_ref()[..16].try_into().expect("a SHA-256 digest has 32 bytes"))
}

/// A record as stored: its value, and the shared contents it refers to.
struct Encoded {
    value: Vec<u8>,
    conversation: (u128, Vec<u8>),
    evidence: Option<(u128, Vec<u8>)>,
}

impl Encoded {
    fn of(r: &FlowRecord) -> Result<Self, StoreError> {
        let conversation = serde_json::to_vec(&conversation_of(r))?;
        let conversation = (digest(&conversation), conversation);
        let evidence = match &r.evidence {
            Some(evidence) => {
                let evidence = serde_json::to_vec(evidence)?;
                Some((digest(&evidence), evidence))
            }
            None => None,
        };
        let value = split_value(conversation.0, evidence.as_ref().map(|(key, _)| *key), &Own::of(r))?;
        Ok(Encoded { value, conversation, evidence })
    }
}

/// The stored value of a record of a shared conversation.
fn split_value(conversation: u128, evidence: Option<u128>, own: &Own) -> Result<Vec<u8>, StoreError> {
    let mut value = Vec::with_capacity(128);
    value.push(CONVERSATION_REF);
    value.extend_from_slice(&conversation.to_be_bytes());
    if let Some(evidence) = evidence {
        value.push(EVIDENCE_REF);
        value.extend_from_slice(&evidence.to_be_bytes());
    }
    serde_json::to_writer(&mut value, own)?;
    Ok(value)
}

/// The parts of a stored value.
enum Stored<'a> {
    Split {
        conversation: u128,
        evidence: Option<u128>,
        own: &'a [u8],
    },
    /// A record stored whole, after the digest of its evidence if that is shared.
    Whole {
        evidence: Option<u128>,
        json: &'a [u8],
    },
}

fn key_at(bytes: &[u8]) -> Option<u128> {
    Some(u128::from_be_bytes(bytes.get(..16)?.try_into().ok()?))
}

impl<'a> Stored<'a> {
    fn parse(value: &'a [u8]) -> Self {
        match value.split_first() {
            Some((&CONVERSATION_REF, rest)) if rest.len() >= 16 => {
                let (conversation, rest) = rest.split_at(16);
                let conversation = key_at(conversation).expect("16 bytes");
                match rest.split_first() {
                    Some((&EVIDENCE_REF, rest)) if rest.len() >= 16 => {
                        Stored::Split { conversation, evidence: key_at(rest), own: &rest[16..] }
                    }
                    _ => Stored::Split { conversation, evidence: None, own: rest },
                }
            }
            Some((&EVIDENCE_REF, rest)) if rest.len() >= 16 => {
                Stored::Whole { evidence: key_at(rest), json: &rest[16..] }
            }
            _ => Stored::Whole { evidence: None, json: value },
        }
    }

    fn conversation(&self) -> Option<u128> {
        match self {
            Stored::Split { conversation, .. } => Some(*conversation),
            Stored::Whole { .. } => None,
        }
    }

    fn evidence(&self) -> Option<u128> {
        match self {
            Stored::Split { evidence, .. } | Stored::Whole { evidence, .. } => *evidence,
        }
    }

    /// The same record with new own fields.
    fn with(&self, r: &FlowRecord) -> Result<Vec<u8>, StoreError> {
        match self {
            Stored::Split { conversation, evidence, .. } => split_value(*conversation, *evidence, &Own::of(r)),
            Stored::Whole { evidence: None, .. } => Ok(serde_json::to_vec(r)?),
            Stored::Whole { evidence: Some(key), .. } => {
                Ok([&[EVIDENCE_REF][..], &key.to_be_bytes(), &serde_json::to_vec(r)?].concat())
            }
        }
    }
}

/// Reads stored records without their evidence, each conversation parsed once.
#[derive(Default)]
struct Records {
    conversations: HashMap<u128, FlowRecord>,
}

impl Records {
    /// Conversations kept parsed; a query that meets more starts again.
    const PARSED: usize = 1024;

    fn read(
        &mut self,
        value: &[u8],
        conversations: &impl ReadableTable<u128, &'static [u8]>,
    ) -> Result<FlowRecord, StoreError> {
        let (key, own) = match Stored::parse(value) {
            Stored::Whole { json, .. } => return Ok(serde_json::from_slice(json)?),
            Stored::Split { conversation, own, .. } => (conversation, own),
        };
        let own: Own = serde_json::from_slice(own)?;
        if let Some(conversation) = self.conversations.get(&key) {
            return Ok(own.into_record(conversation.clone()));
        }
        let content = conversations
            .get(key)?
            .ok_or_else(|| StoreError::Db(format!("a record's conversation {key:032x} is missing")))?;
        let conversation: FlowRecord = serde_json::from_slice(content.value())?;
        if self.conversations.len() >= Self::PARSED {
            self.conversations.clear();
        }
        self.conversations.insert(key, conversation.clone());
        Ok(own.into_record(conversation))
    }
}

const META_BYTES: &str = "bytes";
const META_EVICTIONS: &str = "evictions";

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("evidence store {path}: {message}")]
    Open { path: PathBuf, message: String },
    #[error("evidence store: {0}")]
    Db(String),
    /// The file could not be read or written (a full disk, ...): the database must be reopened
    /// before it takes writes again.
    #[error("evidence store: {0}")]
    Io(String),
    #[error("evidence store: a record could not be encoded or decoded: {0}")]
    Codec(#[from] serde_json::Error),
}

impl From<redb::StorageError> for StoreError {
    fn from(e: redb::StorageError) -> Self {
        match e {
            redb::StorageError::Io(_) | redb::StorageError::PreviousIo => StoreError::Io(e.to_string()),
            e => StoreError::Db(e.to_string()),
        }
    }
}

/// redb's errors wrap a storage error where the file failed; that is what tells I/O apart.
macro_rules! db_err {
    ($($t:ident),*) => {$(
        impl From<redb::$t> for StoreError {
            fn from(e: redb::$t) -> Self {
                match e {
                    redb::$t::Storage(s) => s.into(),
                    e => StoreError::Db(e.to_string()),
                }
            }
        }
    )*};
}
db_err!(TransactionError, TableError, CommitError, DatabaseError);

#[derive(Clone, Debug)]
pub struct Retention {
    pub max_age: Duration,
    /// Bytes of encoded records (the store's payload; the file adds its own overhead).
    pub max_bytes: u64,
}

impl Default for Retention {
    fn default() -> Self {
        Retention { max_age: Duration::from_secs(24 * 3600), max_bytes: 512 << 20 }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StoreStats {
    pub records: u64,
    pub bytes: u64,
    pub evictions: u64,
    /// Write batches that failed (and were kept to retry), over the daemon's life.
    pub failed_writes: u64,
    /// Operations given up because failing writes held more than [`MAX_PENDING`].
    pub lost_operations: u64,
}

/// Whether writes succeed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WriteHealth {
    pub failed_writes: u64,
    pub lost_operations: u64,
    /// While writes fail: since when, and the error that started it (later ones are logged).
    pub failing: Option<(SystemTime, String)>,
}

/// Operations the writer holds while writes fail, to write once they succeed again; beyond it the
/// oldest are given up (and counted).
pub const MAX_PENDING: usize = 100_000;

/// While writes fail, how often the writer tries again.
pub const RETRY_EVERY: Duration = Duration::from_secs(1);

/// While writes fail, at most one log line per this interval.
const FAILURE_LOG_EVERY: Duration = Duration::from_secs(60);

/// What to look for: records matching `filter` and not `exclude`, in a window, newest first (or
/// oldest first).
#[derive(Clone, Debug, Default)]
pub struct Query {
    pub filter: FlowFilter,
    /// Records matching every criterion of this are left out (Hubble's `--not`).
    pub exclude: Option<FlowFilter>,
    pub since: Option<SystemTime>,
    pub until: Option<SystemTime>,
    /// Only records with a larger id (following, or the next page of an oldest-first listing).
    pub after_id: Option<u64>,
    /// Only records with a smaller id (the next page of a listing).
    pub before_id: Option<u64>,
    pub limit: usize,
    /// The oldest matching records instead of the newest (Hubble's `--first`).
    pub oldest_first: bool,
}

/// A query's answer: the newest (or oldest) matching records, and whether others match too
/// (beyond the limit, or beyond what one query reads).
#[derive(Debug, Default)]
pub struct Page {
    pub records: Vec<FlowRecord>,
    pub more: bool,
    /// When `more`: the id the next page starts beyond (the last record returned, or the last one
    /// read when the scan stopped short of the limit).
    pub next: Option<u64>,
}

/// The most records one query may read before it stops, whatever it found: bounded work.
pub const MAX_SCANNED: usize = 200_000;

impl Query {
    pub fn matches(&self, r: &FlowRecord) -> bool {
        self.filter.matches(r)
            && self.exclude.as_ref().is_none_or(|x| x.is_empty() || !x.matches(r))
            && self.since.is_none_or(|s| r.last_seen >= s)
            && self.until.is_none_or(|u| r.time <= u)
            && self.after_id.is_none_or(|a| r.id > a)
    }
}

fn nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

/// The four indexes of a write transaction, kept in step with the records.
struct Indexes<'t> {
    tables: [redb::MultimapTable<'t, &'static str, u64>; 4],
}

impl<'t> Indexes<'t> {
    fn open(txn: &'t redb::WriteTransaction) -> Result<Self, StoreError> {
        Ok(Indexes {
            tables: [
                txn.open_multimap_table(BY_NAMESPACE)?,
                txn.open_multimap_table(BY_POD)?,
                txn.open_multimap_table(BY_VERDICT)?,
                txn.open_multimap_table(BY_POLICY)?,
            ],
        })
    }

    /// (index, key) pairs under which a record is found, in the order of `tables`.
    fn entries(r: &FlowRecord) -> Vec<(usize, String)> {
        let mut out: Vec<(usize, String)> = r.namespaces().into_iter().map(|ns| (0, ns.to_owned())).collect();
        out.extend(r.pods().into_iter().map(|p| (1, p)));
        out.push((2, r.verdict.as_str().to_owned()));
        out.extend(r.policy_keys().into_iter().map(|p| (3, p)));
        out
    }

    fn add(&mut self, r: &FlowRecord) -> Result<(), StoreError> {
        for (table, key) in Self::entries(r) {
            self.tables[table].insert(key.as_str(), r.id)?;
        }
        Ok(())
    }

    fn remove(&mut self, r: &FlowRecord) -> Result<(), StoreError> {
        for (table, key) in Self::entries(r) {
            self.tables[table].remove(key.as_str(), r.id)?;
        }
        Ok(())
    }
}

/// Removes the oldest records while `over(oldest id, payload bytes)` holds, with their index
/// entries and their shares, keeping `bytes` in step; returns how many went.
fn evict_oldest(
    records: &mut redb::Table<'_, u64, &'static [u8]>,
    shares: &mut Shares<'_>,
    indexes: &mut Indexes<'_>,
    bytes: &mut u64,
    over: impl Fn(u64, u64) -> bool,
) -> Result<u64, StoreError> {
    let mut count = 0u64;
    let mut read = Records::default();
    loop {
        let Some(id) = records.first()?.map(|(k, _)| k.value()) else { break };
        if !over(id, *bytes) {
            break;
        }
        let Some(encoded) = records.remove(id)?.map(|v| v.value().to_vec()) else { break };
        *bytes = bytes.saturating_sub(encoded.len() as u64);
        count += 1;
        // Read before its conversation can go with it.
        if let Ok(r) = read.read(&encoded, &shares.conversations.content) {
            indexes.remove(&r)?;
        }
        *bytes = bytes.saturating_sub(shares.release(&encoded)?);
    }
    Ok(count)
}

/// Contents shared by records in a write transaction, counted by the records that refer to them.
struct Shared<'t> {
    content: redb::Table<'t, u128, &'static [u8]>,
    refs: redb::Table<'t, u128, u64>,
}

impl<'t> Shared<'t> {
    fn open(
        txn: &'t redb::WriteTransaction,
        content: TableDefinition<u128, &'static [u8]>,
        refs: TableDefinition<u128, u64>,
    ) -> Result<Self, StoreError> {
        Ok(Shared { content: txn.open_table(content)?, refs: txn.open_table(refs)? })
    }

    /// One more record refers to `content` under `key`: the bytes this adds to the store (its
    /// content, the first time).
    fn hold(&mut self, key: u128, content: &[u8]) -> Result<u64, StoreError> {
        let refs = self.refs.get(key)?.map(|v| v.value()).unwrap_or(0);
        self.refs.insert(key, refs + 1)?;
        if refs > 0 {
            return Ok(0);
        }
        self.content.insert(key, content)?;
        Ok(content.len() as u64)
    }

    /// A record that referred to `key` is gone: the bytes this frees (the content, with the last
    /// reference).
    fn release(&mut self, key: u128) -> Result<u64, StoreError> {
        let refs = self.refs.get(key)?.map(|v| v.value()).unwrap_or(0);
        if refs > 1 {
            self.refs.insert(key, refs - 1)?;
            return Ok(0);
        }
        self.refs.remove(key)?;
        Ok(self.content.remove(key)?.map(|v| v.value().len() as u64).unwrap_or(0))
    }
}

/// The conversations and the evidence of a write transaction.
struct Shares<'t> {
    conversations: Shared<'t>,
    evidence: Shared<'t>,
}

impl<'t> Shares<'t> {
    fn open(txn: &'t redb::WriteTransaction) -> Result<Self, StoreError> {
        Ok(Shares {
            conversations: Shared::open(txn, CONVERSATIONS, CONVERSATION_REFS)?,
            evidence: Shared::open(txn, EVIDENCE, EVIDENCE_REFS)?,
        })
    }

    /// A new record refers to what `encoded` shares: the bytes this adds.
    fn hold(&mut self, encoded: &Encoded) -> Result<u64, StoreError> {
        let (key, content) = &encoded.conversation;
        let mut added = self.conversations.hold(*key, content)?;
        if let Some((key, content)) = &encoded.evidence {
            added += self.evidence.hold(*key, content)?;
        }
        Ok(added)
    }

    /// The record stored as `value` is gone: the bytes this frees.
    fn release(&mut self, value: &[u8]) -> Result<u64, StoreError> {
        let stored = Stored::parse(value);
        let mut freed = 0;
        if let Some(key) = stored.conversation() {
            freed += self.conversations.release(key)?;
        }
        if let Some(key) = stored.evidence() {
            freed += self.evidence.release(key)?;
        }
        Ok(freed)
    }
}

pub struct Store {
    /// None only while the database is being reopened.
    db: RwLock<Option<Database>>,
    path: PathBuf,
    retention: Retention,
    health: Mutex<WriteHealth>,
    last_failure_log: Mutex<Option<Instant>>,
}

fn open_database(path: &Path) -> Result<Database, redb::DatabaseError> {
    Database::builder().set_cache_size(32 << 20).create(path)
}

impl Store {
    /// Opens (or creates) the store. A store whose contents cannot be read is moved aside to
    /// `<path>.corrupt-<unix time>` with an error log, and a fresh one is created: the daemon
    /// keeps observing, and the old file is kept for inspection. A file that cannot be opened at
    /// all (permissions, a read-only or full filesystem) is an error naming the path: it may be
    /// intact.
    pub fn open(path: &Path, retention: Retention) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| StoreError::Open {
                path: path.into(),
                message: format!("cannot create {}: {e}", dir.display()),
            })?;
        }
        let db = match open_database(path) {
            Ok(db) => db,
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
                return Err(StoreError::Open { path: path.into(), message: "already open by another netiso".into() });
            }
            // redb reports a file that is not a store as InvalidData: that one is unreadable.
            Err(redb::DatabaseError::Storage(redb::StorageError::Io(e)))
                if !matches!(e.kind(), std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof) =>
            {
                return Err(StoreError::Open {
                    path: path.into(),
                    message: format!("{e}; the directory must be writable by netiso and have free space"),
                });
            }
            Err(e) => {
                let aside =
                    PathBuf::from(format!("{}.corrupt-{}", path.display(), nanos(SystemTime::now()) / 1_000_000_000));
                std::fs::rename(path, &aside).map_err(|re| StoreError::Open {
                    path: path.into(),
                    message: format!("{e}; moving it aside failed: {re}"),
                })?;
                tracing::error!(path = %path.display(), moved_to = %aside.display(), error = %e, "evidence store unreadable; moved aside, starting a fresh one");
                open_database(path).map_err(|e| StoreError::Open { path: path.into(), message: e.to_string() })?
            }
        };
        // Create the tables so readers never find them missing.
        let txn = db.begin_write()?;
        {
            txn.open_table(RECORDS)?;
            txn.open_table(META)?;
            txn.open_table(EVIDENCE)?;
            txn.open_table(EVIDENCE_REFS)?;
            txn.open_table(CONVERSATIONS)?;
            txn.open_table(CONVERSATION_REFS)?;
            Indexes::open(&txn)?;
        }
        txn.commit()?;
        Ok(Store {
            db: RwLock::new(Some(db)),
            path: path.into(),
            retention,
            health: Mutex::default(),
            last_failure_log: Mutex::default(),
        })
    }

    fn with_db<T>(&self, f: impl FnOnce(&Database) -> Result<T, StoreError>) -> Result<T, StoreError> {
        let guard = self.db.read().expect("store lock");
        let db =
            guard.as_ref().ok_or_else(|| StoreError::Io("the store is being reopened after a write error".into()))?;
        f(db)
    }

    /// Closes and opens the database again: after an I/O error (a full disk) redb refuses every
    /// write until then.
    pub fn reopen(&self) -> Result<(), StoreError> {
        let mut guard = self.db.write().expect("store lock");
        // The file must be closed before it can be opened again.
        *guard = None;
        *guard = Some(open_database(&self.path)?);
        Ok(())
    }

    pub fn health(&self) -> WriteHealth {
        self.health.lock().expect("health lock").clone()
    }

    /// Counts a failed write and logs it, at most once per [`FAILURE_LOG_EVERY`] while failing.
    fn note_failure(&self, error: &StoreError, pending: usize) {
        let mut health = self.health.lock().expect("health lock");
        health.failed_writes += 1;
        let first = health.failing.is_none();
        if first {
            health.failing = Some((SystemTime::now(), error.to_string()));
        }
        let mut last_log = self.last_failure_log.lock().expect("log lock");
        if first || last_log.is_none_or(|at| at.elapsed() >= FAILURE_LOG_EVERY) {
            *last_log = Some(Instant::now());
            tracing::error!(
                path = %self.path.display(),
                error = %error,
                failed_writes = health.failed_writes,
                pending_operations = pending,
                "evidence store writes fail; holding the records to write them when they succeed again"
            );
        }
    }

    fn note_success(&self) {
        let mut health = self.health.lock().expect("health lock");
        if let Some((since, _)) = health.failing.take() {
            let failing_for = SystemTime::now().duration_since(since).unwrap_or_default();
            tracing::info!(path = %self.path.display(), failing_for = ?failing_for, failed_writes = health.failed_writes, "evidence store writes succeed again");
        }
    }

    fn note_lost(&self, operations: usize) {
        self.health.lock().expect("health lock").lost_operations += operations as u64;
        tracing::error!(path = %self.path.display(), lost = operations, "evidence store writes keep failing; oldest held records given up");
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The highest record id stored (0 for an empty store), to continue ids after a restart.
    pub fn last_id(&self) -> Result<u64, StoreError> {
        self.with_db(|db| {
            let txn = db.begin_read()?;
            let table = txn.open_table(RECORDS)?;
            Ok(table.last()?.map(|(k, _)| k.value()).unwrap_or(0))
        })
    }

    /// Counts from the database, and the write health; the latter also when the database cannot
    /// be read.
    pub fn stats(&self) -> StoreStats {
        let health = self.health();
        let stored = self.with_db(|db| {
            let txn = db.begin_read()?;
            let records = txn.open_table(RECORDS)?.len()?;
            let meta = txn.open_table(META)?;
            let get = |k: &str| -> Result<u64, StoreError> { Ok(meta.get(k)?.map(|v| v.value()).unwrap_or(0)) };
            Ok((records, get(META_BYTES)?, get(META_EVICTIONS)?))
        });
        let (records, bytes, evictions) = stored.unwrap_or_default();
        StoreStats {
            records,
            bytes,
            evictions,
            failed_writes: health.failed_writes,
            lost_operations: health.lost_operations,
        }
    }

    /// Applies a batch of operations in one transaction. Returns the dropped records whose counts
    /// it changed, as written (each once), for followers to see repeated attempts.
    pub fn write(&self, ops: &[StoreOp]) -> Result<Vec<FlowRecord>, StoreError> {
        self.with_db(|db| self.write_to(db, ops))
    }

    /// Applies `ops`, then removes the oldest records while the payload exceeds the size limit,
    /// in the same transaction: the limit holds at every write, not only at retention passes.
    fn write_to(&self, db: &Database, ops: &[StoreOp]) -> Result<Vec<FlowRecord>, StoreError> {
        let txn = db.begin_write()?;
        let mut counted: Vec<FlowRecord> = Vec::new();
        {
            let mut records = txn.open_table(RECORDS)?;
            let mut meta = txn.open_table(META)?;
            let mut shares = Shares::open(&txn)?;
            let mut indexes = Indexes::open(&txn)?;
            let mut bytes = meta.get(META_BYTES)?.map(|v| v.value()).unwrap_or(0);
            let mut read = Records::default();
            // Counts are cumulative: of a record's counts in one batch only the last is written,
            // with the latest ports any of them carried.
            let mut last_count: HashMap<u64, (usize, Option<&PortSweep>)> = HashMap::new();
            for (index, op) in ops.iter().enumerate() {
                if let StoreOp::Count { id, ports, .. } = op {
                    let latest = last_count.entry(*id).or_default();
                    *latest = (index, ports.as_ref().or(latest.1));
                }
            }
            for (index, op) in ops.iter().enumerate() {
                match op {
                    StoreOp::Insert(r) => {
                        let encoded = Encoded::of(r)?;
                        if let Some(old) = records.insert(r.id, encoded.value.as_slice())?.map(|v| v.value().to_vec()) {
                            bytes = bytes.saturating_sub(old.len() as u64);
                            bytes = bytes.saturating_sub(shares.release(&old)?);
                        }
                        bytes += encoded.value.len() as u64 + shares.hold(&encoded)?;
                        indexes.add(r)?;
                    }
                    StoreOp::Count { id, packets, bytes: b, last_seen, attempts, .. } => {
                        let Some((_, ports)) = last_count.get(id).filter(|(last, _)| *last == index) else {
                            continue;
                        };
                        let Some(existing) = records.get(*id)?.map(|v| v.value().to_vec()) else { continue };
                        let mut r = read.read(&existing, &shares.conversations.content)?;
                        r.packets = *packets;
                        r.bytes = *b;
                        r.last_seen = *last_seen;
                        r.attempts = *attempts;
                        if let Some(ports) = ports {
                            r.ports = Some((*ports).clone());
                        }
                        let value = Stored::parse(&existing).with(&r)?;
                        bytes = bytes.saturating_sub(existing.len() as u64) + value.len() as u64;
                        records.insert(*id, value.as_slice())?;
                        if r.verdict == FlowVerdict::Dropped {
                            counted.retain(|c| c.id != r.id);
                            counted.push(r);
                        }
                    }
                }
            }
            let max_bytes = self.retention.max_bytes;
            let evicted =
                evict_oldest(&mut records, &mut shares, &mut indexes, &mut bytes, |_, bytes| bytes > max_bytes)?;
            if evicted > 0 {
                let evictions = meta.get(META_EVICTIONS)?.map(|v| v.value()).unwrap_or(0) + evicted;
                meta.insert(META_EVICTIONS, evictions)?;
            }
            meta.insert(META_BYTES, bytes)?;
        }
        txn.commit()?;
        Ok(counted)
    }

    /// Removes records older than the retention age, then the oldest until the payload fits the
    /// size limit. Returns how many were removed.
    pub fn enforce_retention(&self, now: SystemTime) -> Result<u64, StoreError> {
        self.with_db(|db| self.enforce_retention_in(db, now))
    }

    fn enforce_retention_in(&self, db: &Database, now: SystemTime) -> Result<u64, StoreError> {
        let cutoff = nanos(now.checked_sub(self.retention.max_age).unwrap_or(UNIX_EPOCH));
        let txn = db.begin_write()?;
        let removed;
        {
            let mut records = txn.open_table(RECORDS)?;
            let mut meta = txn.open_table(META)?;
            let mut shares = Shares::open(&txn)?;
            let mut indexes = Indexes::open(&txn)?;
            let mut bytes = meta.get(META_BYTES)?.map(|v| v.value()).unwrap_or(0);
            let max_bytes = self.retention.max_bytes;
            let count = evict_oldest(&mut records, &mut shares, &mut indexes, &mut bytes, |id, bytes| {
                id < cutoff || bytes > max_bytes
            })?;
            let evictions = meta.get(META_EVICTIONS)?.map(|v| v.value()).unwrap_or(0) + count;
            meta.insert(META_BYTES, bytes)?;
            meta.insert(META_EVICTIONS, evictions)?;
            removed = count;
        }
        txn.commit()?;
        Ok(removed)
    }

    pub fn get(&self, id: u64) -> Result<Option<FlowRecord>, StoreError> {
        self.with_db(|db| {
            let txn = db.begin_read()?;
            let table = txn.open_table(RECORDS)?;
            let Some(value) = table.get(id)? else { return Ok(None) };
            let mut r = Records::default().read(value.value(), &txn.open_table(CONVERSATIONS)?)?;
            if let Some(key) = Stored::parse(value.value()).evidence() {
                let evidence = txn.open_table(EVIDENCE)?;
                r.evidence = match evidence.get(key)? {
                    Some(v) => Some(serde_json::from_slice(v.value())?),
                    None => None,
                };
            }
            Ok(Some(r))
        })
    }

    /// Records matching `q`, newest first, at most `q.limit`. Reads through the most selective
    /// index the query allows, and at most [`MAX_SCANNED`] records.
    pub fn query(&self, q: &Query) -> Result<Vec<FlowRecord>, StoreError> {
        self.query_page(q).map(|page| page.records)
    }

    /// As [`Store::query`], saying whether more records match than the page holds.
    pub fn query_page(&self, q: &Query) -> Result<Page, StoreError> {
        self.with_db(|db| Self::query_in(db, q))
    }

    fn query_in(db: &Database, q: &Query) -> Result<Page, StoreError> {
        let txn = db.begin_read()?;
        let records = txn.open_table(RECORDS)?;
        let conversations = txn.open_table(CONVERSATIONS)?;
        let mut read = Records::default();
        let limit = if q.limit == 0 { usize::MAX } else { q.limit };
        // A record's id is its first packet's time; one seen since `since` began at most a day
        // before it (the longest a conversation's record is kept open).
        let low = q
            .after_id
            .map(|a| a + 1)
            .unwrap_or(0)
            .max(q.since.map(|s| nanos(s).saturating_sub(86_400_000_000_000)).unwrap_or(0));
        let high = q.before_id.unwrap_or(u64::MAX).min(q.until.map(|u| nanos(u).saturating_add(1)).unwrap_or(u64::MAX));
        let mut out = Vec::new();
        let mut scanned = 0;
        let mut last_read = None;
        // One match beyond the limit tells that there are more.
        let mut consider = |id: u64, encoded: &[u8]| -> Result<bool, StoreError> {
            scanned += 1;
            last_read = Some(id);
            let r = read.read(encoded, &conversations)?;
            if q.matches(&r) {
                out.push(r);
            }
            Ok(out.len() <= limit)
        };
        match Self::indexed_ids(&txn, q, low..high)? {
            Some(ids) => {
                for id in ids.take(MAX_SCANNED) {
                    let id = id?;
                    if let Some(v) = records.get(id)?
                        && !consider(id, v.value())?
                    {
                        break;
                    }
                }
            }
            None => {
                let range = records.range(low..high)?;
                let entries: Box<dyn Iterator<Item = _>> =
                    if q.oldest_first { Box::new(range) } else { Box::new(range.rev()) };
                for entry in entries.take(MAX_SCANNED) {
                    let (id, v) = entry?;
                    if !consider(id.value(), v.value())? {
                        break;
                    }
                }
            }
        }
        let more = out.len() > limit || scanned >= MAX_SCANNED;
        out.truncate(limit);
        let next = match (more, out.len() == limit) {
            (false, _) => None,
            (true, true) => out.last().map(|r| r.id),
            (true, false) => last_read,
        };
        Ok(Page { records: out, more, next })
    }

    /// The ids in `window` of the most selective index the query allows, in the query's order;
    /// none when no index narrows it.
    fn indexed_ids<'t>(
        txn: &'t redb::ReadTransaction,
        q: &Query,
        window: std::ops::Range<u64>,
    ) -> Result<Option<Ids<'t>>, StoreError> {
        let f = &q.filter;
        let order = |ids: Box<dyn DoubleEndedIterator<Item = Result<u64, StoreError>> + 't>| {
            if q.oldest_first { ids } else { Box::new(ids.rev()) as Box<dyn Iterator<Item = _>> }
        };
        let pod_prefix = [&f.pod, &f.from_pod, &f.to_pod].into_iter().flatten().find_map(|p| p.key_prefix());
        if let Some(prefix) = pod_prefix {
            // Every pod whose key starts with the prefix (one pod, or a Deployment's pods).
            let index = txn.open_multimap_table(BY_POD)?;
            let mut ids = Vec::new();
            for entry in index.range(prefix.as_str()..)? {
                let (key, values) = entry?;
                if !key.value().starts_with(&prefix) {
                    break;
                }
                for id in values {
                    let id = id?.value();
                    if window.contains(&id) {
                        ids.push(id);
                    }
                }
            }
            ids.sort_unstable();
            return Ok(Some(order(Box::new(ids.into_iter().map(Ok)))));
        }
        let exact = if let Some(p) = &f.policy {
            Some((BY_POLICY, p.clone()))
        } else if let Some(ns) = f.namespace.as_ref().or(f.from_namespace.as_ref()).or(f.to_namespace.as_ref()) {
            Some((BY_NAMESPACE, ns.clone()))
        } else {
            f.verdict.map(|v| (BY_VERDICT, v.as_str().to_owned()))
        };
        let Some((table, key)) = exact else { return Ok(None) };
        let index = txn.open_multimap_table(table)?;
        let ids = index.get(key.as_str())?.filter_map(move |id| match id {
            Ok(id) => window.contains(&id.value()).then(|| Ok(id.value())),
            Err(e) => Some(Err(StoreError::from(e))),
        });
        Ok(Some(order(Box::new(ids))))
    }
}

/// Record ids read from an index.
type Ids<'t> = Box<dyn Iterator<Item = Result<u64, StoreError>> + 't>;

/// A record as the writer wrote it.
#[derive(Clone, Debug)]
pub enum Written {
    Inserted(Arc<FlowRecord>),
    /// A dropped record with new counts: a repeated attempt, or more packets.
    Counted(Arc<FlowRecord>),
}

/// Handle of the writer task: send operations; subscribers get every inserted record and every
/// dropped record with new counts.
#[derive(Clone)]
pub struct StoreWriter {
    ops: mpsc::Sender<StoreOp>,
    pub written: broadcast::Sender<Written>,
}

impl StoreWriter {
    pub async fn send(&self, op: StoreOp) {
        // A closed channel means shutdown is under way.
        let _ = self.ops.send(op).await;
    }
}

/// Runs the writer: batches operations (up to `batch` or every `flush`), enforces retention
/// every `retention_every`, and returns when every sender is gone, after writing what it holds.
/// A batch that fails is kept and written again (after reopening the database when the file
/// failed) every [`RETRY_EVERY`], so a full disk loses nothing once space returns.
pub fn spawn_writer(
    store: Arc<Store>,
    flush: Duration,
    retention_every: Duration,
) -> (StoreWriter, tokio::task::JoinHandle<()>) {
    const BATCH: usize = 512;
    let (tx, mut rx) = mpsc::channel::<StoreOp>(8192);
    let (written, _) = broadcast::channel(1024);
    let announce = written.clone();
    let task = tokio::spawn(async move {
        let mut last_retention = std::time::Instant::now();
        // Operations not written yet, oldest first: the batch being built and any that failed.
        let mut pending: VecDeque<StoreOp> = VecDeque::new();
        let mut failing = false;
        loop {
            let wait = if failing { RETRY_EVERY } else { flush };
            let first = tokio::time::timeout(wait, rx.recv()).await;
            let closed = matches!(first, Ok(None));
            if let Ok(Some(op)) = first {
                pending.push_back(op);
                for _ in 1..BATCH {
                    match rx.try_recv() {
                        Ok(op) => pending.push_back(op),
                        Err(_) => break,
                    }
                }
            }
            if pending.len() > MAX_PENDING {
                let excess = pending.len() - MAX_PENDING;
                pending.drain(..excess);
                store.note_lost(excess);
            }
            if !pending.is_empty() {
                let writing = store.clone();
                let ops: Vec<StoreOp> = pending.drain(..).collect();
                let written = tokio::task::spawn_blocking(move || {
                    let result = writing.write(&ops);
                    if let Err(StoreError::Io(_)) = &result
                        && let Err(e) = writing.reopen()
                    {
                        tracing::debug!(error = %e, "evidence store not reopened yet");
                    }
                    (result, ops)
                })
                .await;
                match written {
                    Ok((Ok(counted), ops)) => {
                        if failing {
                            store.note_success();
                            failing = false;
                        }
                        for op in ops {
                            if let StoreOp::Insert(r) = op {
                                let _ = announce.send(Written::Inserted(Arc::from(r)));
                            }
                        }
                        for r in counted {
                            let _ = announce.send(Written::Counted(Arc::new(r)));
                        }
                    }
                    Ok((Err(e), ops)) => {
                        store.note_failure(&e, ops.len());
                        failing = true;
                        pending.extend(ops);
                    }
                    Err(e) => tracing::error!(error = %e, "evidence store writer panicked; batch dropped"),
                }
            }
            if !failing && last_retention.elapsed() >= retention_every {
                last_retention = std::time::Instant::now();
                let store = store.clone();
                match tokio::task::spawn_blocking(move || store.enforce_retention(SystemTime::now())).await {
                    Ok(Ok(n)) if n > 0 => tracing::info!(removed = n, "evidence retention"),
                    Ok(Err(e)) => tracing::error!(error = %e, "evidence retention failed"),
                    _ => {}
                }
            }
            if closed {
                if !pending.is_empty() {
                    tracing::error!(
                        lost = pending.len(),
                        "evidence store still failing at shutdown; held records not written"
                    );
                }
                break;
            }
        }
    });
    (StoreWriter { ops: tx, written }, task)
}
