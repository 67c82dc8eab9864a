//! The dead-letter store: one SQLite database file, shared by every pipeline
//! of the host and opened by the `eliot dead-letters` CLI at the same time.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use base64::Engine as _;
use rusqlite::types::Value;
use rusqlite::{params, Connection, ErrorCode, OpenFlags, OptionalExtension, TransactionBehavior};

use super::{DeadLetter, FailureKind};
use crate::wasm::{Message, Qos};

/// Schema version kept in `PRAGMA user_version`. Version 0 is a new, empty
/// database file. Version 2 added the replay claims, and a version 1 file
/// is migrated when it is opened.
pub const SCHEMA_VERSION: i64 = 2;

/// Age at which a replay's claim on a dead letter expires, so that the
/// claim of a replay that died (a killed `eliot dead-letters replay`, a
/// host that crashed in an API replay) blocks its letters for this long
/// and no longer. A running replay renews its claims well within it.
pub const CLAIM_EXPIRY: Duration = Duration::from_secs(5 * 60);

/// How long a statement waits for another connection's write lock, for
/// example the host's while the CLI purges.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

const SCHEMA: &str = "
CREATE TABLE dead_letters (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    stored_at_ms INTEGER NOT NULL,
    pipeline TEXT NOT NULL,
    stage TEXT NOT NULL,
    kind TEXT NOT NULL,
    reason TEXT NOT NULL,
    -- NULL when the topic is not valid UTF-8; topic_bytes is always exact.
    topic TEXT,
    topic_bytes BLOB NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL CHECK (qos IN (0, 1, 2)),
    retain INTEGER NOT NULL CHECK (retain IN (0, 1)),
    received_at_ms INTEGER NOT NULL,
    -- JSON array of [name, value] pairs.
    headers TEXT NOT NULL,
    replay_count INTEGER NOT NULL DEFAULT 0,
    last_replayed_at_ms INTEGER,
    -- The replay that is sending the letter now and when it claimed it, or
    -- NULL. See DeadLetterStore::claim.
    claimed_by TEXT,
    claimed_at_ms INTEGER
);
CREATE INDEX dead_letters_by_origin ON dead_letters (pipeline, stage, kind);
";

/// Turns a version 1 file into version 2. Adding a column that may be NULL
/// leaves every row as it is.
const MIGRATION_TO_2: &str = "
ALTER TABLE dead_letters ADD COLUMN claimed_by TEXT;
ALTER TABLE dead_letters ADD COLUMN claimed_at_ms INTEGER;
";

const COLUMNS: &str =
    "id, stored_at_ms, pipeline, stage, kind, reason, topic, topic_bytes, payload, qos, retain, \
                       received_at_ms, headers, replay_count, last_replayed_at_ms";

/// An error of the dead-letter store. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    #[error("cannot create the folder of the dead-letter store {path}: {source}")]
    CreateFolder {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("dead-letter store {path} does not exist")]
    NotFound { path: PathBuf },
    #[error(
        "{path} is not an SQLite database; dead_letters.path must name an SQLite file, for example \
         dead-letters.sqlite (the JSON-lines dead-letter files of earlier versions are not read)"
    )]
    NotADatabase { path: PathBuf },
    #[error(
        "dead-letter store {path} has schema version {found}, but this eliot reads version {SCHEMA_VERSION}; \
         use the eliot version that wrote it"
    )]
    NewerSchema { path: PathBuf, found: i64 },
    #[error(
        "{path} is an SQLite database of something else: it has tables but no Eliot schema version; \
         name a new file in dead_letters.path, or move that file away"
    )]
    ForeignDatabase { path: PathBuf },
    #[error("dead-letter store {path}: cannot {operation}: {source}")]
    Sqlite {
        path: PathBuf,
        operation: &'static str,
        source: rusqlite::Error,
    },
    #[error("dead-letter store {path}: row {id} is invalid: {problem}")]
    InvalidRow {
        path: PathBuf,
        id: i64,
        problem: String,
    },
}

/// A selection of dead letters to list, count or purge. Every field that is
/// set must match. Rows are taken in id order, which is the order they were
/// stored in.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListFilter {
    pub pipeline: Option<String>,
    /// Stage name, or `sink:NAME` for a sink failure.
    pub stage: Option<String>,
    pub kind: Option<FailureKind>,
    /// Matched against the topic's bytes, so it also finds topics that are
    /// not valid UTF-8.
    pub topic_prefix: Option<String>,
    /// At most this many rows; `None` for all.
    pub limit: Option<usize>,
    /// Only rows with a greater id, for paging.
    pub after_id: Option<i64>,
}

impl ListFilter {
    /// Returns true when no field narrows the selection by content
    /// (`limit` and `after_id` only page through it).
    pub fn matches_everything(&self) -> bool {
        self.pipeline.is_none()
            && self.stage.is_none()
            && self.kind.is_none()
            && self.topic_prefix.is_none()
    }
}

/// One stored dead letter, as read back.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredDeadLetter {
    pub id: i64,
    /// When the host stored it, in milliseconds since the Unix epoch.
    pub stored_at_ms: u64,
    pub pipeline: String,
    pub stage: String,
    pub kind: FailureKind,
    pub reason: String,
    /// `None` when the topic is not valid UTF-8.
    pub topic: Option<String>,
    pub topic_bytes: Vec<u8>,
    /// The original payload, byte for byte.
    pub payload: Vec<u8>,
    pub qos: Qos,
    pub retain: bool,
    pub received_at_ms: u64,
    pub headers: Vec<(String, String)>,
    pub replay_count: u64,
    pub last_replayed_at_ms: Option<u64>,
}

impl StoredDeadLetter {
    /// Rebuilds the original message, or `None` when its topic is not valid
    /// UTF-8, which no plugin can receive.
    pub fn message(&self) -> Option<Message> {
        Some(Message {
            topic: self.topic.clone()?,
            payload: self.payload.clone(),
            qos: self.qos,
            retain: self.retain,
            received_at_ms: self.received_at_ms,
            headers: self.headers.clone(),
        })
    }

    /// Renders every field as one JSON object. Times are RFC 3339 in UTC;
    /// the topic and payload are also given in base64, which is exact, and
    /// `payload_text` is present only when the payload is valid UTF-8.
    pub fn to_json(&self) -> serde_json::Value {
        let base64 = &base64::engine::general_purpose::STANDARD;
        let mut object = serde_json::json!({
            "id": self.id,
            "stored_at": crate::clock::rfc3339_ms(self.stored_at_ms),
            "pipeline": self.pipeline,
            "stage": self.stage,
            "kind": self.kind.as_str(),
            "reason": self.reason,
            "topic": self.topic,
            "topic_base64": base64.encode(&self.topic_bytes),
            "qos": qos_number(self.qos),
            "retain": self.retain,
            "received_at": crate::clock::rfc3339_ms(self.received_at_ms),
            "headers": self.headers,
            "payload_base64": base64.encode(&self.payload),
            "replay_count": self.replay_count,
            "last_replayed_at": self.last_replayed_at_ms.map(crate::clock::rfc3339_ms),
        });
        if let Ok(text) = std::str::from_utf8(&self.payload) {
            object["payload_text"] = text.into();
        }
        object
    }
}

/// The dead letters that a replay asked to claim, by what became of each.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Claimed {
    /// Letters now claimed by the caller, as stored at the moment of the
    /// claim, in the order asked for.
    pub letters: Vec<StoredDeadLetter>,
    /// Letters that another replay has claimed, with its claim.
    pub claimed_by_others: Vec<ReplayClaim>,
    /// Ids that are not in the store.
    pub missing: Vec<i64>,
    /// The expired claims of other replays that the caller took over; their
    /// letters are in `letters`.
    pub taken_over: Vec<ReplayClaim>,
}

/// A replay's claim on one dead letter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayClaim {
    pub id: i64,
    /// The name the replay claimed it under.
    pub claimer: String,
    /// When it claimed or last renewed it, in milliseconds since the Unix
    /// epoch.
    pub claimed_at_ms: u64,
}

/// The new failure of a dead letter that failed again when replayed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayFailure {
    pub id: i64,
    pub stage: String,
    pub kind: FailureKind,
    pub reason: String,
}

/// The SQLite dead-letter store. One connection behind a mutex, so one
/// store can be shared by every pipeline's sink task.
pub struct DeadLetterStore {
    path: PathBuf,
    connection: Mutex<Connection>,
    /// Device and inode of the file the connection has open, to notice a
    /// file removed or replaced under a running host.
    file: Mutex<Option<(u64, u64)>>,
}

/// Device and inode of the file at `path`, if there is one.
fn file_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

impl DeadLetterStore {
    /// Opens the store at `path`, creating the file, its folder and the
    /// schema when they do not exist.
    ///
    /// # Errors
    ///
    /// See [`DeadLetterError`]: the folder or file cannot be created, the file
    /// is not an SQLite database, or it has a newer schema.
    pub fn open(path: &Path) -> Result<Self, DeadLetterError> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|source| DeadLetterError::CreateFolder {
                path: path.to_owned(),
                source,
            })?;
        }
        Self::open_with(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE,
        )
    }

    /// Opens the store at `path` only if the file exists, as the CLI does,
    /// so that a wrong path is reported instead of creating a new store.
    ///
    /// # Errors
    ///
    /// [`DeadLetterError::NotFound`] when there is no file, and the errors
    /// of [`DeadLetterStore::open`].
    pub fn open_existing(path: &Path) -> Result<Self, DeadLetterError> {
        if !path.is_file() {
            return Err(DeadLetterError::NotFound {
                path: path.to_owned(),
            });
        }
        Self::open_with(path, OpenFlags::SQLITE_OPEN_READ_WRITE)
    }

    fn open_with(path: &Path, flags: OpenFlags) -> Result<Self, DeadLetterError> {
        let store_error = |operation| {
            move |source: rusqlite::Error| {
                if source.sqlite_error_code() == Some(ErrorCode::NotADatabase) {
                    DeadLetterError::NotADatabase {
                        path: path.to_owned(),
                    }
                } else {
                    DeadLetterError::Sqlite {
                        path: path.to_owned(),
                        operation,
                        source,
                    }
                }
            }
        };
        let flags = flags | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let connection =
            Connection::open_with_flags(path, flags).map_err(store_error("open the database"))?;
        connection
            .busy_timeout(BUSY_TIMEOUT)
            .map_err(store_error("set the busy timeout"))?;

        let version: i64 = connection
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .map_err(store_error("read the schema version"))?;
        if version > SCHEMA_VERSION {
            return Err(DeadLetterError::NewerSchema {
                path: path.to_owned(),
                found: version,
            });
        }
        // Version 0 is a new file, or another program's database, which
        // must not get Eliot's tables (or WAL mode) added to it.
        if version == 0 {
            let tables: i64 = connection
                .query_row(
                    "SELECT count(*) FROM sqlite_master WHERE type = 'table'",
                    [],
                    |row| row.get(0),
                )
                .map_err(store_error("read the list of tables"))?;
            if tables > 0 {
                return Err(DeadLetterError::ForeignDatabase {
                    path: path.to_owned(),
                });
            }
        }

        // WAL lets the CLI read and purge while the host appends. The mode
        // is stored in the file; setting it again is a no-op.
        let mode: String = connection
            .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
            .map_err(store_error("switch to WAL mode"))?;
        if !mode.eq_ignore_ascii_case("wal") {
            tracing::warn!(path = %path.display(), journal_mode = mode, "dead-letter store is not in WAL mode; the CLI may wait for the host's writes");
        }
        // FULL syncs the WAL on every commit. A dead letter is the only copy
        // of its message once the broker has the acknowledgement, so a
        // commit must survive a power loss, not only a crash of the process.
        connection
            .pragma_update(None, "synchronous", "FULL")
            .map_err(store_error("set synchronous = FULL"))?;

        if version < SCHEMA_VERSION {
            migrate(&connection).map_err(store_error("create or migrate the schema"))?;
        }
        Ok(Self {
            path: path.to_owned(),
            connection: Mutex::new(connection),
            file: Mutex::new(file_id(path)),
        })
    }

    /// Opens the store again when its file was removed or replaced since it
    /// was opened (an operator's `rm`, a restore from a backup). Writing on
    /// would put the dead letters into a file that no path names any more,
    /// and they are the only copy of their messages.
    fn reopen_if_replaced(&self, connection: &mut Connection) -> Result<(), DeadLetterError> {
        let mut known = self.file.lock().unwrap_or_else(|e| e.into_inner());
        let now = file_id(&self.path);
        if now.is_some() && now == *known {
            return Ok(());
        }
        tracing::error!(
            path = %self.path.display(),
            "the dead-letter store's file was removed or replaced while the host ran; opening {} again, \
             and new dead letters go there",
            self.path.display()
        );
        let fresh = Self::open(&self.path)?;
        *connection = fresh
            .connection
            .into_inner()
            .unwrap_or_else(|e| e.into_inner());
        *known = fresh.file.into_inner().unwrap_or_else(|e| e.into_inner());
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn lock(&self) -> MutexGuard<'_, Connection> {
        self.connection.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn sqlite_error(
        &self,
        operation: &'static str,
    ) -> impl FnOnce(rusqlite::Error) -> DeadLetterError + '_ {
        move |source| DeadLetterError::Sqlite {
            path: self.path.clone(),
            operation,
            source,
        }
    }

    /// Stores `letters` in one transaction: when this returns `Ok`, every
    /// letter is on disk, and otherwise none is.
    ///
    /// # Errors
    ///
    /// The SQLite error; the caller must not acknowledge the messages then.
    pub fn append(&self, letters: &[&DeadLetter]) -> Result<(), DeadLetterError> {
        let mut connection = self.lock();
        self.reopen_if_replaced(&mut connection)?;
        let transaction = connection
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(self.sqlite_error("begin a transaction"))?;
        {
            let mut insert = transaction
                .prepare_cached(
                    "INSERT INTO dead_letters (stored_at_ms, pipeline, stage, kind, reason, topic, topic_bytes, \
                     payload, qos, retain, received_at_ms, headers) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
                )
                .map_err(self.sqlite_error("prepare the insert"))?;
            let stored_at_ms = to_sql_ms(crate::clock::now_ms());
            for letter in letters {
                let message = &letter.message;
                let topic_bytes = letter.topic_bytes();
                let topic = std::str::from_utf8(topic_bytes).ok();
                let headers = serde_json::to_string(&message.headers)
                    .expect("string pairs serialize to JSON");
                insert
                    .execute(params![
                        stored_at_ms,
                        letter.pipeline,
                        letter.stage,
                        letter.kind.as_str(),
                        letter.reason,
                        topic,
                        topic_bytes,
                        message.payload,
                        qos_number(message.qos),
                        message.retain,
                        to_sql_ms(message.received_at_ms),
                        headers,
                    ])
                    .map_err(self.sqlite_error("insert a dead letter"))?;
            }
        }
        // Dropping the transaction on an error above rolls it back.
        transaction
            .commit()
            .map_err(self.sqlite_error("commit the dead letters"))
    }

    /// Returns the dead letters that match `filter`, oldest first.
    ///
    /// # Errors
    ///
    /// The SQLite error, or [`DeadLetterError::InvalidRow`] for a row this
    /// version cannot read.
    pub fn list(&self, filter: &ListFilter) -> Result<Vec<StoredDeadLetter>, DeadLetterError> {
        let (selection, values) = selection_sql(filter);
        let sql =
            format!("SELECT {COLUMNS} FROM dead_letters WHERE id IN ({selection}) ORDER BY id");
        self.query_letters(&sql, values)
    }

    /// Returns the dead letter with `id`, if it exists.
    ///
    /// # Errors
    ///
    /// As [`DeadLetterStore::list`].
    pub fn get(&self, id: i64) -> Result<Option<StoredDeadLetter>, DeadLetterError> {
        let sql = format!("SELECT {COLUMNS} FROM dead_letters WHERE id = ?1");
        Ok(self.query_letters(&sql, vec![Value::Integer(id)])?.pop())
    }

    /// Returns the ids of `ids` that are not in the store, in the order
    /// given.
    ///
    /// # Errors
    ///
    /// The SQLite error.
    pub fn missing(&self, ids: &[i64]) -> Result<Vec<i64>, DeadLetterError> {
        let connection = self.lock();
        let mut exists = connection
            .prepare_cached("SELECT 1 FROM dead_letters WHERE id = ?1")
            .map_err(self.sqlite_error("prepare the query"))?;
        let mut missing = Vec::new();
        for &id in ids {
            if !exists
                .exists([id])
                .map_err(self.sqlite_error("look up a dead letter"))?
            {
                missing.push(id);
            }
        }
        Ok(missing)
    }

    /// Claims the dead letters `ids` for the replay named `claimer`, in one
    /// write transaction, so that two replays, in this process or in
    /// another, never send the same letter at once. A letter that another
    /// replay claimed is left to it, unless that claim is older than
    /// [`CLAIM_EXPIRY`] at `now_ms`; then it is taken over. Repeated ids
    /// count once.
    ///
    /// The claims end when the letters are deleted, or with
    /// [`DeadLetterStore::release`].
    ///
    /// # Errors
    ///
    /// The SQLite error, or [`DeadLetterError::InvalidRow`]; then nothing
    /// is claimed.
    pub fn claim(
        &self,
        ids: &[i64],
        claimer: &str,
        now_ms: u64,
    ) -> Result<Claimed, DeadLetterError> {
        let expiry_ms = u64::try_from(CLAIM_EXPIRY.as_millis()).unwrap_or(u64::MAX);
        let expired_at_or_before = to_sql_ms(now_ms.saturating_sub(expiry_ms));
        let mut connection = self.lock();
        let transaction = connection
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(self.sqlite_error("begin a transaction"))?;
        let mut claimed = Claimed::default();
        let mut seen = std::collections::HashSet::new();
        {
            let mut read = transaction
                .prepare_cached("SELECT claimed_by, claimed_at_ms FROM dead_letters WHERE id = ?1")
                .map_err(self.sqlite_error("prepare the query"))?;
            let mut take = transaction
                .prepare_cached(
                    "UPDATE dead_letters SET claimed_by = ?2, claimed_at_ms = ?3 WHERE id = ?1",
                )
                .map_err(self.sqlite_error("prepare the claim"))?;
            let sql = format!("SELECT {COLUMNS} FROM dead_letters WHERE id = ?1");
            for &id in ids.iter().filter(|id| seen.insert(**id)) {
                let claim: Option<(Option<String>, Option<i64>)> = read
                    .query_row([id], |row| Ok((row.get(0)?, row.get(1)?)))
                    .optional()
                    .map_err(self.sqlite_error("read a claim"))?;
                let Some(claim) = claim else {
                    claimed.missing.push(id);
                    continue;
                };
                if let (Some(other), Some(at)) = claim {
                    if other != claimer {
                        let existing = ReplayClaim {
                            id,
                            claimer: other,
                            claimed_at_ms: from_sql_ms(at),
                        };
                        if at > expired_at_or_before {
                            claimed.claimed_by_others.push(existing);
                            continue;
                        }
                        claimed.taken_over.push(existing);
                    }
                }
                take.execute(params![id, claimer, to_sql_ms(now_ms)])
                    .map_err(self.sqlite_error("claim a dead letter"))?;
                claimed.letters.extend(self.read_letters(
                    &transaction,
                    &sql,
                    vec![Value::Integer(id)],
                )?);
            }
        }
        transaction
            .commit()
            .map_err(self.sqlite_error("commit the claims"))?;
        Ok(claimed)
    }

    /// Renews every claim of `claimer` to `now_ms`, so that they do not
    /// expire while its replay runs, and returns how many there are.
    ///
    /// # Errors
    ///
    /// The SQLite error.
    pub fn renew_claims(&self, claimer: &str, now_ms: u64) -> Result<usize, DeadLetterError> {
        self.lock()
            .execute(
                "UPDATE dead_letters SET claimed_at_ms = ?2 WHERE claimed_by = ?1",
                params![claimer, to_sql_ms(now_ms)],
            )
            .map_err(self.sqlite_error("renew claims"))
    }

    /// Ends the claims of `claimer` on `ids`, and returns how many it held.
    /// Claims of other replays stay.
    ///
    /// # Errors
    ///
    /// The SQLite error; then no claim is released.
    pub fn release(&self, ids: &[i64], claimer: &str) -> Result<usize, DeadLetterError> {
        let mut connection = self.lock();
        let transaction = connection
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(self.sqlite_error("begin a transaction"))?;
        let mut released = 0;
        {
            let mut release = transaction
                .prepare_cached(
                    "UPDATE dead_letters SET claimed_by = NULL, claimed_at_ms = NULL \
                     WHERE id = ?1 AND claimed_by = ?2",
                )
                .map_err(self.sqlite_error("prepare the release"))?;
            for &id in ids {
                released += release
                    .execute(params![id, claimer])
                    .map_err(self.sqlite_error("release a claim"))?;
            }
        }
        transaction
            .commit()
            .map_err(self.sqlite_error("commit the released claims"))?;
        Ok(released)
    }

    /// Deletes the dead letters with these ids in one transaction and
    /// returns how many existed.
    ///
    /// # Errors
    ///
    /// The SQLite error; then nothing is deleted.
    pub fn delete(&self, ids: &[i64]) -> Result<usize, DeadLetterError> {
        let mut connection = self.lock();
        let transaction = connection
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(self.sqlite_error("begin a transaction"))?;
        let mut deleted = 0;
        {
            let mut delete = transaction
                .prepare_cached("DELETE FROM dead_letters WHERE id = ?1")
                .map_err(self.sqlite_error("prepare the delete"))?;
            for id in ids {
                deleted += delete
                    .execute([id])
                    .map_err(self.sqlite_error("delete a dead letter"))?;
            }
        }
        transaction
            .commit()
            .map_err(self.sqlite_error("commit the delete"))?;
        Ok(deleted)
    }

    /// Deletes every dead letter that matches `filter` (including its
    /// `limit` and `after_id`) and returns how many were deleted.
    ///
    /// # Errors
    ///
    /// The SQLite error; then nothing is deleted.
    pub fn purge(&self, filter: &ListFilter) -> Result<usize, DeadLetterError> {
        let (selection, values) = selection_sql(filter);
        let sql = format!("DELETE FROM dead_letters WHERE id IN ({selection})");
        self.lock()
            .execute(&sql, rusqlite::params_from_iter(values))
            .map_err(self.sqlite_error("purge dead letters"))
    }

    /// Counts the dead letters that match `filter`, including its `limit`
    /// and `after_id`.
    ///
    /// # Errors
    ///
    /// The SQLite error.
    pub fn count(&self, filter: &ListFilter) -> Result<u64, DeadLetterError> {
        let (selection, values) = selection_sql(filter);
        let sql = format!("SELECT count(*) FROM ({selection})");
        let count: i64 = self
            .lock()
            .query_row(&sql, rusqlite::params_from_iter(values), |row| row.get(0))
            .map_err(self.sqlite_error("count dead letters"))?;
        Ok(count.max(0) as u64)
    }

    /// Returns the names of the pipelines that the dead letters matching
    /// `filter` came from, sorted.
    ///
    /// # Errors
    ///
    /// The SQLite error.
    pub fn pipelines(&self, filter: &ListFilter) -> Result<Vec<String>, DeadLetterError> {
        let (selection, values) = selection_sql(filter);
        let sql = format!("SELECT DISTINCT pipeline FROM dead_letters WHERE id IN ({selection}) ORDER BY pipeline");
        let connection = self.lock();
        let mut statement = connection
            .prepare(&sql)
            .map_err(self.sqlite_error("prepare the query"))?;
        let rows = statement
            .query_map(rusqlite::params_from_iter(values), |row| row.get(0))
            .map_err(self.sqlite_error("list pipelines"))?;
        rows.collect::<Result<_, _>>()
            .map_err(self.sqlite_error("list pipelines"))
    }

    /// Returns the highest id stored, or `None` when the store is empty.
    ///
    /// # Errors
    ///
    /// The SQLite error.
    pub fn last_id(&self) -> Result<Option<i64>, DeadLetterError> {
        self.lock()
            .query_row("SELECT max(id) FROM dead_letters", [], |row| row.get(0))
            .map_err(self.sqlite_error("read the last id"))
    }

    /// Records, in one transaction, that these dead letters failed again when
    /// replayed: each gets its new stage, kind and reason, its replay count
    /// goes up by one and its last replay time is now. Returns how many of
    /// the ids existed.
    ///
    /// # Errors
    ///
    /// The SQLite error; then nothing is changed.
    pub fn mark_replayed(&self, failures: &[ReplayFailure]) -> Result<usize, DeadLetterError> {
        let mut connection = self.lock();
        let transaction = connection
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(self.sqlite_error("begin a transaction"))?;
        let now = to_sql_ms(crate::clock::now_ms());
        let mut updated = 0;
        {
            let mut update = transaction
                .prepare_cached(
                    "UPDATE dead_letters SET stage = ?2, kind = ?3, reason = ?4, \
                     replay_count = replay_count + 1, last_replayed_at_ms = ?5 WHERE id = ?1",
                )
                .map_err(self.sqlite_error("prepare the update"))?;
            for failure in failures {
                updated += update
                    .execute(params![
                        failure.id,
                        failure.stage,
                        failure.kind.as_str(),
                        failure.reason,
                        now
                    ])
                    .map_err(self.sqlite_error("record a replay"))?;
            }
        }
        transaction
            .commit()
            .map_err(self.sqlite_error("commit the replay results"))?;
        Ok(updated)
    }

    fn query_letters(
        &self,
        sql: &str,
        values: Vec<Value>,
    ) -> Result<Vec<StoredDeadLetter>, DeadLetterError> {
        let connection = self.lock();
        self.read_letters(&connection, sql, values)
    }

    /// Runs the query `sql`, which selects [`COLUMNS`], on `connection`,
    /// which the caller has locked.
    fn read_letters(
        &self,
        connection: &Connection,
        sql: &str,
        values: Vec<Value>,
    ) -> Result<Vec<StoredDeadLetter>, DeadLetterError> {
        let mut statement = connection
            .prepare_cached(sql)
            .map_err(self.sqlite_error("prepare the query"))?;
        let rows = statement
            .query_map(rusqlite::params_from_iter(values), RawRow::read)
            .map_err(self.sqlite_error("read dead letters"))?;
        let mut letters = Vec::new();
        for row in rows {
            let row = row.map_err(self.sqlite_error("read dead letters"))?;
            letters.push(row.into_letter(&self.path)?);
        }
        Ok(letters)
    }
}

/// Creates the schema in a new file, or migrates an older one to
/// [`SCHEMA_VERSION`].
fn migrate(connection: &Connection) -> rusqlite::Result<()> {
    // IMMEDIATE takes the write lock first, so of two processes that open a
    // file at once, the second one finds the schema the first created or
    // migrated.
    let transaction =
        rusqlite::Transaction::new_unchecked(connection, TransactionBehavior::Immediate)?;
    let version: i64 = transaction.pragma_query_value(None, "user_version", |row| row.get(0))?;
    match version {
        0 => transaction.execute_batch(SCHEMA)?,
        1 => transaction.execute_batch(MIGRATION_TO_2)?,
        _ => {}
    }
    if version < SCHEMA_VERSION {
        transaction.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    }
    transaction.commit()
}

/// Builds `SELECT id FROM dead_letters WHERE ... ORDER BY id LIMIT ...` for
/// `filter`, and its parameters.
fn selection_sql(filter: &ListFilter) -> (String, Vec<Value>) {
    let mut conditions = Vec::new();
    let mut values = Vec::new();
    if let Some(pipeline) = &filter.pipeline {
        values.push(Value::Text(pipeline.clone()));
        conditions.push(format!("pipeline = ?{}", values.len()));
    }
    if let Some(stage) = &filter.stage {
        values.push(Value::Text(stage.clone()));
        conditions.push(format!("stage = ?{}", values.len()));
    }
    if let Some(kind) = filter.kind {
        values.push(Value::Text(kind.as_str().to_owned()));
        conditions.push(format!("kind = ?{}", values.len()));
    }
    if let Some(prefix) = &filter.topic_prefix {
        // A byte comparison: LIKE would treat '%' and '_' in topics as
        // wildcards.
        values.push(Value::Blob(prefix.as_bytes().to_vec()));
        let n = values.len();
        conditions.push(format!("substr(topic_bytes, 1, length(?{n})) = ?{n}"));
    }

    if let Some(after_id) = filter.after_id {
        values.push(Value::Integer(after_id));
        conditions.push(format!("id > ?{}", values.len()));
    }

    let conditions = if conditions.is_empty() {
        "1".to_owned()
    } else {
        conditions.join(" AND ")
    };
    // SQLite reads a negative LIMIT as no limit.
    let limit = filter
        .limit
        .map_or(-1, |limit| i64::try_from(limit).unwrap_or(i64::MAX));
    values.push(Value::Integer(limit));
    let sql = format!(
        "SELECT id FROM dead_letters WHERE {conditions} ORDER BY id LIMIT ?{}",
        values.len()
    );
    (sql, values)
}

/// One row as SQLite returns it, before the values are checked.
struct RawRow {
    id: i64,
    stored_at_ms: i64,
    pipeline: String,
    stage: String,
    kind: String,
    reason: String,
    topic: Option<String>,
    topic_bytes: Vec<u8>,
    payload: Vec<u8>,
    qos: i64,
    retain: bool,
    received_at_ms: i64,
    headers: String,
    replay_count: i64,
    last_replayed_at_ms: Option<i64>,
}

impl RawRow {
    fn read(row: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
        Ok(Self {
            id: row.get(0)?,
            stored_at_ms: row.get(1)?,
            pipeline: row.get(2)?,
            stage: row.get(3)?,
            kind: row.get(4)?,
            reason: row.get(5)?,
            topic: row.get(6)?,
            topic_bytes: row.get(7)?,
            payload: row.get(8)?,
            qos: row.get(9)?,
            retain: row.get(10)?,
            received_at_ms: row.get(11)?,
            headers: row.get(12)?,
            replay_count: row.get(13)?,
            last_replayed_at_ms: row.get(14)?,
        })
    }

    fn into_letter(self, path: &Path) -> Result<StoredDeadLetter, DeadLetterError> {
        let invalid = |problem: String| DeadLetterError::InvalidRow {
            path: path.to_owned(),
            id: self.id,
            problem,
        };
        let kind = self.kind.parse::<FailureKind>().map_err(invalid)?;
        let qos = match self.qos {
            0 => Qos::AtMostOnce,
            1 => Qos::AtLeastOnce,
            2 => Qos::ExactlyOnce,
            other => return Err(invalid(format!("QoS {other} does not exist"))),
        };
        let headers = serde_json::from_str(&self.headers).map_err(|e| {
            invalid(format!(
                "headers are not a JSON array of [name, value] pairs: {e}"
            ))
        })?;
        Ok(StoredDeadLetter {
            id: self.id,
            stored_at_ms: from_sql_ms(self.stored_at_ms),
            pipeline: self.pipeline,
            stage: self.stage,
            kind,
            reason: self.reason,
            topic: self.topic,
            topic_bytes: self.topic_bytes,
            payload: self.payload,
            qos,
            retain: self.retain,
            received_at_ms: from_sql_ms(self.received_at_ms),
            headers,
            replay_count: self.replay_count.max(0) as u64,
            last_replayed_at_ms: self.last_replayed_at_ms.map(from_sql_ms),
        })
    }
}

pub(crate) fn qos_number(qos: Qos) -> u8 {
    match qos {
        Qos::AtMostOnce => 0,
        Qos::AtLeastOnce => 1,
        Qos::ExactlyOnce => 2,
    }
}

/// SQLite integers are signed; times past the year 292 million saturate.
fn to_sql_ms(ms: u64) -> i64 {
    i64::try_from(ms).unwrap_or(i64::MAX)
}

fn from_sql_ms(ms: i64) -> u64 {
    u64::try_from(ms).unwrap_or(0)
}

#[cfg(test)]
mod tests;
