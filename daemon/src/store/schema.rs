//! The database schema and its forward migrations.
//!
//! The version lives in `PRAGMA user_version`; [`MIGRATIONS`]`[i]` takes a database from
//! version `i` to `i + 1`, each in its own transaction, so a crash mid-migration leaves the
//! previous version intact. A database newer than this build is refused, never guessed at.
//! `PRAGMA application_id` marks the file as Keyward's, so we never migrate someone else's
//! SQLite file. Migrations only ever get appended: never edit one that has shipped.

use rusqlite::{Connection, TransactionBehavior};

use super::StoreError;

/// `PRAGMA application_id` of a Keyward database: "KWRD".
pub const APPLICATION_ID: i32 = 0x4b57_5244;

/// Schema v1: the vault's metadata, keyslots, secrets (with a per-name version counter that
/// outlives deletion, so a version number is never reused: the AEAD binds it) and device keys.
///
/// `STRICT` tables make SQLite enforce the column types.
const V1: &str = "
CREATE TABLE meta (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    vault_id BLOB NOT NULL CHECK (length(vault_id) = 16),
    created TEXT NOT NULL,
    keyring BLOB NOT NULL,
    keyring_term INTEGER NOT NULL CHECK (keyring_term >= 1)
) STRICT;

CREATE TABLE keyslots (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    device TEXT,
    pcrs TEXT,
    pin INTEGER NOT NULL CHECK (pin IN (0, 1)),
    threshold INTEGER CHECK (threshold BETWEEN 1 AND 255),
    shares INTEGER CHECK (shares BETWEEN 1 AND 255),
    blob BLOB NOT NULL,
    created TEXT NOT NULL
) STRICT;

CREATE TABLE secret_names (
    name TEXT PRIMARY KEY,
    next_version INTEGER NOT NULL CHECK (next_version >= 1)
) STRICT, WITHOUT ROWID;

CREATE TABLE secrets (
    name TEXT NOT NULL REFERENCES secret_names (name),
    version INTEGER NOT NULL CHECK (version >= 1),
    term INTEGER NOT NULL CHECK (term >= 1),
    ciphertext BLOB NOT NULL,
    created TEXT NOT NULL,
    PRIMARY KEY (name, version)
) STRICT;

CREATE TABLE keys (
    name TEXT PRIMARY KEY,
    device TEXT NOT NULL,
    algorithm TEXT NOT NULL,
    handle BLOB NOT NULL,
    public_key BLOB NOT NULL,
    created TEXT NOT NULL
) STRICT;
";

/// Schema v2: recovery shares that nobody has yet proved to hold.
///
/// `keyslots.unconfirmed_until` (unix seconds) marks a recovery keyslot whose shares were
/// handed out but not yet typed back: it opens the vault (and is confirmed by doing so), but
/// it is not counted as a way in, and it is dropped once the time passes unless it is the
/// vault's only keyslot. `pending_rekey` holds a rekey waiting for the same proof: every
/// keyslot's material sealed to the next master key, which takes over only once the new
/// recovery shares are confirmed; until then the current key and every old share stay valid.
const V2: &str = "
ALTER TABLE keyslots ADD COLUMN unconfirmed_until INTEGER;

CREATE TABLE pending_rekey (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    expires INTEGER NOT NULL,
    slots BLOB NOT NULL,
    created TEXT NOT NULL
) STRICT;
";

/// Schema v3: device-key operations that were started and not yet finished.
///
/// Creating a key is two steps, the device's and the store's, and a crash between them would
/// leave a key on the device that no record names (deleting one, a record whose key is gone). A
/// row here is written, durably, before the device is touched, and removed in the transaction
/// that records the outcome; a row found at start-up is an operation the last run did not finish,
/// and says exactly what to clean up: a `create` names the `object_id` the device was asked to
/// give the new key (so that only that object is ever destroyed, never another application's), a
/// `delete` the key whose record is to go once its device object is gone.
const V3: &str = "
CREATE TABLE key_intents (
    name TEXT PRIMARY KEY,
    action TEXT NOT NULL CHECK (action IN ('create', 'delete')),
    device TEXT NOT NULL,
    algorithm TEXT NOT NULL,
    object_id BLOB CHECK ((action = 'create') = (object_id IS NOT NULL)),
    created TEXT NOT NULL
) STRICT;
";

/// Schema v4: transit keys, the data keys behind `Encrypt`/`Decrypt` and the OpenBao-compatible
/// transit socket.
///
/// Each version of a key is a random data key sealed under a keyring term (like a secret
/// version), so a rekey leaves these rows alone and a rotation of the keyring leaves them
/// readable. Versions are never deleted: a ciphertext names the version that decrypts it.
const V4: &str = "
CREATE TABLE transit_keys (
    name TEXT NOT NULL,
    version INTEGER NOT NULL CHECK (version >= 1),
    term INTEGER NOT NULL CHECK (term >= 1),
    sealed BLOB NOT NULL,
    created TEXT NOT NULL,
    PRIMARY KEY (name, version)
) STRICT;
";

/// Schema v5: what the OpenBao upstream sync wrote, per local secret.
///
/// A row is written in the transaction that stores the secret version it names, so the local
/// version and the upstream version it came from can't disagree after a crash. `note` keeps
/// what the last sync saw that was not a new value (the upstream deleted the secret).
const V5: &str = "
CREATE TABLE upstream_versions (
    secret TEXT PRIMARY KEY,
    remote TEXT NOT NULL,
    remote_version INTEGER NOT NULL CHECK (remote_version >= 1),
    local_version INTEGER NOT NULL CHECK (local_version >= 1),
    synced TEXT NOT NULL,
    note TEXT
) STRICT, WITHOUT ROWID;
";

/// Schema v6: the audit outbox.
///
/// The audit record of a secret's put or delete is inserted here in the transaction that makes
/// the change, so the change and its record reach the disk with one commit, or neither does.
/// The audit log appends each row to `audit.log` afterwards, in `id` order, the line carrying
/// the row's `id`, and the row is deleted once its line is durable there. `after_seq` is the
/// log's next seq when the record was made: its line can only come at or after it, which bounds
/// what a start-up after a crash reads to find the rows the log already holds. `AUTOINCREMENT`:
/// an id is never given out again once its row is deleted (the log's lines name it). `record`
/// is the record's body as the log writes it (JSON; names, never a value).
const V6: &str = "
CREATE TABLE audit_outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    after_seq INTEGER NOT NULL CHECK (after_seq >= 0),
    time TEXT NOT NULL,
    record TEXT NOT NULL
) STRICT;
";

/// The migrations, in order. The schema version this build writes is their count.
pub const MIGRATIONS: &[&str] = &[V1, V2, V3, V4, V5, V6];

/// The schema version this build knows.
pub fn current_version() -> i64 {
    // A handful of migrations: the cast cannot truncate.
    MIGRATIONS.len() as i64
}

fn user_version(conn: &Connection) -> Result<i64, StoreError> {
    Ok(conn.pragma_query_value(None, "user_version", |row| row.get(0))?)
}

fn application_id(conn: &Connection) -> Result<i32, StoreError> {
    Ok(conn.pragma_query_value(None, "application_id", |row| row.get(0))?)
}

/// Bring the database to [`current_version`], one transaction per step.
///
/// # Errors
/// [`StoreError::TooNew`] for a database from a newer build; [`StoreError::Corrupt`] for a
/// SQLite file that is not Keyward's; any SQLite failure (the failed step is rolled back).
pub fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let known = current_version();
    loop {
        // IMMEDIATE: read the version under the write lock, so two processes can't both apply
        // the same step.
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let found = user_version(&tx)?;
        if found > known {
            return Err(StoreError::TooNew { found, known });
        }
        if found < 0 {
            return Err(StoreError::Corrupt(format!(
                "the file has a negative schema version ({found})"
            )));
        }
        let app = application_id(&tx)?;
        if found == 0 {
            let objects: i64 =
                tx.query_row("SELECT count(*) FROM sqlite_schema", [], |row| row.get(0))?;
            if app != 0 || objects != 0 {
                return Err(StoreError::Corrupt(
                    "the file is an SQLite database that is not Keyward's".into(),
                ));
            }
        } else if app != APPLICATION_ID {
            return Err(StoreError::Corrupt(format!(
                "the file is not a Keyward database (application_id {app:#x})"
            )));
        }
        let Some(step) = usize::try_from(found).ok().and_then(|i| MIGRATIONS.get(i)) else {
            // found == known: nothing left to do.
            tx.commit()?;
            return Ok(());
        };
        tx.execute_batch(step)?;
        tx.pragma_update(None, "user_version", found + 1)?;
        tx.pragma_update(None, "application_id", APPLICATION_ID)?;
        tx.commit()?;
        tracing::info!(from = found, to = found + 1, "database schema migrated");
    }
}
