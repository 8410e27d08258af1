//! The typed rows of each table and the SQL that reads and writes them.
//!
//! Functions that change something take a [`Transaction`] (run them inside [`super::Store::write`]
//! so that a multi-record change is one commit); functions that only read take a [`Connection`]
//! (inside [`super::Store::read`], or on a transaction, which derefs to one). Every blob is opaque
//! here: sealed keyrings, sealed keyslot material, secret ciphertexts and device-key handles are
//! produced and checked by the vault. Times are RFC 3339 UTC strings from [`now_rfc3339`].

use std::fmt;
use std::time::SystemTime;

use rusqlite::{params, Connection, OptionalExtension as _, Row, Transaction};

use keyward_proto::kinds::{KeyAlgorithm, KeyslotKind};

use super::StoreError;

/// A column holding one of the contract's names (a keyslot kind, an algorithm), read back as
/// its value: a name this version does not know is a conversion failure, which the store
/// reports as corruption.
fn parsed<T>(row: &Row<'_>, column: usize) -> rusqlite::Result<T>
where
    T: std::str::FromStr,
    T::Err: std::error::Error + Send + Sync + 'static,
{
    let text: String = row.get(column)?;
    text.parse().map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(column, rusqlite::types::Type::Text, Box::new(e))
    })
}

/// The current time as RFC 3339 UTC with second precision, e.g. `2026-11-23T17:42:53Z`
/// (the audit log's millisecond form, cut to the second).
pub fn now_rfc3339() -> String {
    rfc3339(SystemTime::now())
}

/// `t` as RFC 3339 UTC with second precision (the audit log's millisecond form, cut).
pub fn rfc3339(t: SystemTime) -> String {
    let mut text = keyward_proto::audit::rfc3339_millis(t);
    // `YYYY-MM-DDTHH:MM:SS.mmmZ` -> `YYYY-MM-DDTHH:MM:SSZ`
    text.replace_range(19.., "Z");
    text
}

/// A byte count for `Debug`: blobs are opaque and long, so only their size is shown.
struct Len(usize);

impl fmt::Debug for Len {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<{} bytes>", self.0)
    }
}

// ---------------------------------------------------------------------------------------------
// meta

/// The vault's one metadata row.
#[derive(Clone, PartialEq, Eq)]
pub struct Meta {
    /// Random id of this vault; every AEAD binds it.
    pub vault_id: [u8; 16],
    pub created: String,
    /// The keyring, sealed under the VMK.
    pub keyring: Vec<u8>,
    /// The keyring's current term (not secret: shown while sealed).
    pub keyring_term: u32,
}

impl fmt::Debug for Meta {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Meta")
            .field("vault_id", &keyward_proto::text::hex(&self.vault_id))
            .field("created", &self.created)
            .field("keyring", &Len(self.keyring.len()))
            .field("keyring_term", &self.keyring_term)
            .finish()
    }
}

/// The vault's metadata, or `None` when no vault was created yet.
///
/// # Errors
/// A SQLite failure; [`StoreError::Corrupt`] when the row does not decode.
pub fn get_meta(conn: &Connection) -> Result<Option<Meta>, StoreError> {
    Ok(conn
        .query_row(
            "SELECT vault_id, created, keyring, keyring_term FROM meta WHERE id = 1",
            [],
            |row| {
                Ok(Meta {
                    vault_id: row.get(0)?,
                    created: row.get(1)?,
                    keyring: row.get(2)?,
                    keyring_term: row.get(3)?,
                })
            },
        )
        .optional()?)
}

/// Store the vault's metadata.
///
/// # Errors
/// [`StoreError::VaultExists`] when a vault is already stored; a SQLite failure.
pub fn insert_meta(tx: &Transaction<'_>, meta: &Meta) -> Result<(), StoreError> {
    let inserted = tx.execute(
        "INSERT INTO meta (id, vault_id, created, keyring, keyring_term)
         VALUES (1, ?1, ?2, ?3, ?4) ON CONFLICT (id) DO NOTHING",
        params![meta.vault_id, meta.created, meta.keyring, meta.keyring_term],
    )?;
    if inserted == 0 {
        return Err(StoreError::VaultExists);
    }
    Ok(())
}

/// Replace the sealed keyring (after a rotate or a rekey) and record its current term.
///
/// # Errors
/// [`StoreError::NotFound`] when no vault is stored; a SQLite failure.
pub fn update_keyring(tx: &Transaction<'_>, keyring: &[u8], term: u32) -> Result<(), StoreError> {
    let updated = tx.execute(
        "UPDATE meta SET keyring = ?1, keyring_term = ?2 WHERE id = 1",
        params![keyring, term],
    )?;
    if updated == 0 {
        return Err(StoreError::NotFound {
            kind: "vault",
            name: "meta".into(),
        });
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// keyslots

/// A keyslot to store: everything but the id and creation time, which the store assigns.
#[derive(Clone, PartialEq, Eq)]
pub struct NewKeyslot {
    pub kind: KeyslotKind,
    pub device: Option<String>,
    pub pcrs: Option<Vec<u8>>,
    pub pin: bool,
    pub threshold: Option<u8>,
    pub shares: Option<u8>,
    /// The slot's sealed material (a device blob, or the recovery slot's wrapped VMK).
    pub blob: Vec<u8>,
    /// Unix seconds until which a recovery slot waits for its shares to be confirmed; `None`
    /// for a confirmed slot (and every device slot).
    pub unconfirmed_until: Option<u64>,
}

impl fmt::Debug for NewKeyslot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NewKeyslot")
            .field("kind", &self.kind)
            .field("device", &self.device)
            .field("pcrs", &self.pcrs)
            .field("pin", &self.pin)
            .field("threshold", &self.threshold)
            .field("shares", &self.shares)
            .field("blob", &Len(self.blob.len()))
            .field("unconfirmed_until", &self.unconfirmed_until)
            .finish()
    }
}

/// A stored keyslot.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyslotRow {
    /// Assigned by the store, increasing, never reused (even after a removal).
    pub id: u32,
    pub kind: KeyslotKind,
    pub device: Option<String>,
    pub pcrs: Option<Vec<u8>>,
    pub pin: bool,
    pub threshold: Option<u8>,
    pub shares: Option<u8>,
    pub blob: Vec<u8>,
    pub created: String,
    /// See [`NewKeyslot::unconfirmed_until`].
    pub unconfirmed_until: Option<u64>,
}

impl fmt::Debug for KeyslotRow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyslotRow")
            .field("id", &self.id)
            .field("kind", &self.kind)
            .field("device", &self.device)
            .field("pcrs", &self.pcrs)
            .field("pin", &self.pin)
            .field("threshold", &self.threshold)
            .field("shares", &self.shares)
            .field("blob", &Len(self.blob.len()))
            .field("created", &self.created)
            .field("unconfirmed_until", &self.unconfirmed_until)
            .finish()
    }
}

/// PCR indexes as a JSON array (`[7,11]`); infallible, unlike a serializer.
fn pcrs_to_json(pcrs: &[u8]) -> String {
    let items: Vec<String> = pcrs.iter().map(u8::to_string).collect();
    format!("[{}]", items.join(","))
}

const KEYSLOT_COLUMNS: &str =
    "id, kind, device, pcrs, pin, threshold, shares, blob, created, unconfirmed_until";

fn keyslot_from_row(row: &Row<'_>) -> rusqlite::Result<(KeyslotRow, Option<String>)> {
    let pcrs: Option<String> = row.get(3)?;
    Ok((
        KeyslotRow {
            id: row.get(0)?,
            kind: parsed(row, 1)?,
            device: row.get(2)?,
            pcrs: None,
            pin: row.get(4)?,
            threshold: row.get(5)?,
            shares: row.get(6)?,
            blob: row.get(7)?,
            created: row.get(8)?,
            unconfirmed_until: row.get(9)?,
        },
        pcrs,
    ))
}

/// Decode the PCR list kept as JSON text.
fn with_pcrs((mut slot, pcrs): (KeyslotRow, Option<String>)) -> Result<KeyslotRow, StoreError> {
    if let Some(text) = pcrs {
        slot.pcrs = Some(serde_json::from_str(&text).map_err(|_| {
            StoreError::Corrupt(format!(
                "keyslot {}: pcrs is not a list of PCR indexes",
                slot.id
            ))
        })?);
    }
    Ok(slot)
}

/// Store a new keyslot; returns it with its id and creation time.
///
/// # Errors
/// A SQLite failure (a threshold or share count of 0 is a [`StoreError::Conflict`]).
pub fn insert_keyslot(tx: &Transaction<'_>, slot: &NewKeyslot) -> Result<KeyslotRow, StoreError> {
    let created = now_rfc3339();
    let id: u32 = tx.query_row(
        "INSERT INTO keyslots
             (kind, device, pcrs, pin, threshold, shares, blob, created, unconfirmed_until)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) RETURNING id",
        params![
            slot.kind.as_str(),
            slot.device,
            slot.pcrs.as_deref().map(pcrs_to_json),
            slot.pin,
            slot.threshold,
            slot.shares,
            slot.blob,
            created,
            slot.unconfirmed_until,
        ],
        |row| row.get(0),
    )?;
    Ok(KeyslotRow {
        id,
        kind: slot.kind,
        device: slot.device.clone(),
        pcrs: slot.pcrs.clone(),
        pin: slot.pin,
        threshold: slot.threshold,
        shares: slot.shares,
        blob: slot.blob.clone(),
        created,
        unconfirmed_until: slot.unconfirmed_until,
    })
}

/// Every keyslot, by id.
///
/// # Errors
/// A SQLite failure; [`StoreError::Corrupt`] when a row does not decode.
pub fn list_keyslots(conn: &Connection) -> Result<Vec<KeyslotRow>, StoreError> {
    let mut stmt = conn.prepare(&format!(
        "SELECT {KEYSLOT_COLUMNS} FROM keyslots ORDER BY id"
    ))?;
    let rows = stmt.query_map([], keyslot_from_row)?;
    rows.map(|r| with_pcrs(r?)).collect()
}

/// One keyslot.
///
/// # Errors
/// A SQLite failure; [`StoreError::Corrupt`] when the row does not decode.
pub fn get_keyslot(conn: &Connection, id: u32) -> Result<Option<KeyslotRow>, StoreError> {
    conn.query_row(
        &format!("SELECT {KEYSLOT_COLUMNS} FROM keyslots WHERE id = ?1"),
        [id],
        keyslot_from_row,
    )
    .optional()?
    .map(with_pcrs)
    .transpose()
}

/// Remove a keyslot; `false` when there was none with this id.
///
/// # Errors
/// A SQLite failure.
pub fn delete_keyslot(tx: &Transaction<'_>, id: u32) -> Result<bool, StoreError> {
    Ok(tx.execute("DELETE FROM keyslots WHERE id = ?1", [id])? > 0)
}

/// Replace a keyslot's sealed material (rekey).
///
/// # Errors
/// [`StoreError::NotFound`] when there is no keyslot with this id; a SQLite failure.
pub fn update_keyslot_blob(tx: &Transaction<'_>, id: u32, blob: &[u8]) -> Result<(), StoreError> {
    let updated = tx.execute(
        "UPDATE keyslots SET blob = ?1 WHERE id = ?2",
        params![blob, id],
    )?;
    if updated == 0 {
        return Err(StoreError::NotFound {
            kind: "keyslot",
            name: id.to_string(),
        });
    }
    Ok(())
}

/// Mark a recovery keyslot's shares as confirmed; `false` when there is no such keyslot.
///
/// # Errors
/// A SQLite failure.
pub fn confirm_keyslot(tx: &Transaction<'_>, id: u32) -> Result<bool, StoreError> {
    Ok(tx.execute(
        "UPDATE keyslots SET unconfirmed_until = NULL WHERE id = ?1",
        [id],
    )? > 0)
}

/// Drop the unconfirmed recovery keyslots whose time ran out at `now` (unix seconds), except
/// when that would leave the vault without any keyslot; returns the ids dropped.
///
/// # Errors
/// A SQLite failure.
pub fn drop_expired_keyslots(tx: &Transaction<'_>, now: u64) -> Result<Vec<u32>, StoreError> {
    let expired = lapsed_keyslots(&list_keyslots(tx)?, now);
    for id in &expired {
        delete_keyslot(tx, *id)?;
    }
    Ok(expired)
}

/// The ids among `rows` of unconfirmed recovery keyslots whose time ran out at `now`, unless
/// they are all the keyslots there are (the vault's only way in is never dropped).
pub fn lapsed_keyslots(rows: &[KeyslotRow], now: u64) -> Vec<u32> {
    let lapsed: Vec<u32> = rows
        .iter()
        .filter(|r| r.unconfirmed_until.is_some_and(|t| t <= now))
        .map(|r| r.id)
        .collect();
    if lapsed.len() == rows.len() {
        Vec::new()
    } else {
        lapsed
    }
}

// ---------------------------------------------------------------------------------------------
// pending rekey

/// A rekey waiting for its new recovery shares to be confirmed.
#[derive(Clone, PartialEq, Eq)]
pub struct PendingRekey {
    /// Unix seconds after which it is void.
    pub expires: u64,
    /// The new material of every keyslot (the vault's own encoding), opaque here.
    pub slots: Vec<u8>,
    pub created: String,
}

impl fmt::Debug for PendingRekey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PendingRekey")
            .field("expires", &self.expires)
            .field("slots", &Len(self.slots.len()))
            .field("created", &self.created)
            .finish()
    }
}

/// The pending rekey, if there is one.
///
/// # Errors
/// A SQLite failure.
pub fn get_pending_rekey(conn: &Connection) -> Result<Option<PendingRekey>, StoreError> {
    Ok(conn
        .query_row(
            "SELECT expires, slots, created FROM pending_rekey WHERE id = 1",
            [],
            |row| {
                Ok(PendingRekey {
                    expires: row.get(0)?,
                    slots: row.get(1)?,
                    created: row.get(2)?,
                })
            },
        )
        .optional()?)
}

/// Store `pending` as the one pending rekey, replacing any earlier one.
///
/// # Errors
/// A SQLite failure.
pub fn put_pending_rekey(tx: &Transaction<'_>, pending: &PendingRekey) -> Result<(), StoreError> {
    tx.execute(
        "INSERT OR REPLACE INTO pending_rekey (id, expires, slots, created)
         VALUES (1, ?1, ?2, ?3)",
        params![pending.expires, pending.slots, pending.created],
    )?;
    Ok(())
}

/// Forget the pending rekey; `false` when there was none.
///
/// # Errors
/// A SQLite failure.
pub fn delete_pending_rekey(tx: &Transaction<'_>) -> Result<bool, StoreError> {
    Ok(tx.execute("DELETE FROM pending_rekey", [])? > 0)
}

// ---------------------------------------------------------------------------------------------
// secrets

/// One version of a secret.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretRow {
    pub name: String,
    /// Per name, from 1, never reused (see [`next_secret_version`]).
    pub version: u64,
    /// The keyring term whose key encrypted it.
    pub term: u32,
    /// Nonce, ciphertext and tag; the AAD binds vault, name, version and term.
    pub ciphertext: Vec<u8>,
    pub created: String,
}

impl fmt::Debug for SecretRow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretRow")
            .field("name", &self.name)
            .field("version", &self.version)
            .field("term", &self.term)
            .field("ciphertext", &Len(self.ciphertext.len()))
            .field("created", &self.created)
            .finish()
    }
}

/// Reserve the next version number of `name`: 1 for a name never seen, else one more than the
/// last one ever reserved, even if that version was since deleted. Call it in the transaction
/// that inserts the version, before encrypting (the AAD binds the version).
///
/// # Errors
/// A SQLite failure.
pub fn next_secret_version(tx: &Transaction<'_>, name: &str) -> Result<u64, StoreError> {
    Ok(tx
        .prepare_cached(
            "INSERT INTO secret_names (name, next_version) VALUES (?1, 2)
             ON CONFLICT (name) DO UPDATE SET next_version = next_version + 1
             RETURNING next_version - 1",
        )?
        .query_row([name], |row| row.get(0))?)
}

/// Store one version of a secret, whose version was reserved by [`next_secret_version`].
///
/// # Errors
/// [`StoreError::Conflict`] when the version exists or was never reserved; a SQLite failure.
pub fn insert_secret(tx: &Transaction<'_>, row: &SecretRow) -> Result<(), StoreError> {
    let reserved: Option<u64> = tx
        .prepare_cached("SELECT next_version FROM secret_names WHERE name = ?1")?
        .query_row([&row.name], |r| r.get(0))
        .optional()?;
    let was_reserved = matches!(reserved, Some(next) if row.version < next);
    if !was_reserved {
        return Err(StoreError::Conflict(format!(
            "secret version {} was not reserved",
            row.version
        )));
    }
    tx.prepare_cached(
        "INSERT INTO secrets (name, version, term, ciphertext, created)
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![
        row.name,
        row.version,
        row.term,
        row.ciphertext,
        row.created
    ])?;
    Ok(())
}

const LATEST_SECRET: &str = "SELECT name, version, term, ciphertext, created FROM secrets \
     WHERE name = ?1 ORDER BY version DESC LIMIT 1";
const SECRET_VERSION: &str = "SELECT name, version, term, ciphertext, created FROM secrets \
     WHERE name = ?1 AND version = ?2";

fn secret_from_row(row: &Row<'_>) -> rusqlite::Result<SecretRow> {
    Ok(SecretRow {
        name: row.get(0)?,
        version: row.get(1)?,
        term: row.get(2)?,
        ciphertext: row.get(3)?,
        created: row.get(4)?,
    })
}

/// A version of a secret (`None`: the latest), or `None` when there is no such version.
///
/// # Errors
/// A SQLite failure; [`StoreError::Corrupt`] when the row does not decode.
pub fn get_secret(
    conn: &Connection,
    name: &str,
    version: Option<u64>,
) -> Result<Option<SecretRow>, StoreError> {
    // Cached statements: this is the read hot path, and compiling the SQL costs more than
    // running it.
    let row = match version {
        None => conn
            .prepare_cached(LATEST_SECRET)?
            .query_row([name], secret_from_row)
            .optional()?,
        Some(version) => {
            // Larger than SQLite's integers: certainly absent.
            let Ok(version) = i64::try_from(version) else {
                return Ok(None);
            };
            conn.prepare_cached(SECRET_VERSION)?
                .query_row(params![name, version], secret_from_row)
                .optional()?
        }
    };
    Ok(row)
}

/// Names that have at least one version, sorted, optionally only those starting with `prefix`
/// (compared literally: `%` and `_` are not wildcards).
///
/// # Errors
/// A SQLite failure.
pub fn list_secret_names(
    conn: &Connection,
    prefix: Option<&str>,
) -> Result<Vec<String>, StoreError> {
    let prefix = prefix.unwrap_or("");
    let mut stmt = conn.prepare(
        "SELECT DISTINCT name FROM secrets
         WHERE substr(name, 1, length(?1)) = ?1 ORDER BY name",
    )?;
    let names = stmt
        .query_map([prefix], |row| row.get(0))?
        .collect::<Result<Vec<String>, _>>()?;
    Ok(names)
}

/// The versions of a secret that exist: `(version, term, created)`, oldest first. Empty when
/// there are none.
///
/// # Errors
/// A SQLite failure; [`StoreError::Corrupt`] when a row does not decode.
pub fn secret_versions(
    conn: &Connection,
    name: &str,
) -> Result<Vec<(u64, u32, String)>, StoreError> {
    let mut stmt = conn
        .prepare("SELECT version, term, created FROM secrets WHERE name = ?1 ORDER BY version")?;
    let versions = stmt
        .query_map([name], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(versions)
}

/// Delete every version of a secret (the rows, not a tombstone; with `secure_delete` the freed
/// pages are zeroed). The name's version counter is kept, so versions are never reused.
/// `true` when something was deleted.
///
/// # Errors
/// A SQLite failure.
pub fn delete_secret(tx: &Transaction<'_>, name: &str) -> Result<bool, StoreError> {
    Ok(tx.execute("DELETE FROM secrets WHERE name = ?1", [name])? > 0)
}

/// How many secrets (names with at least one version) are stored.
///
/// # Errors
/// A SQLite failure.
pub fn count_secrets(conn: &Connection) -> Result<u64, StoreError> {
    Ok(
        conn.query_row("SELECT count(DISTINCT name) FROM secrets", [], |row| {
            row.get(0)
        })?,
    )
}

// ---------------------------------------------------------------------------------------------
// keys

/// A key pair that lives in a device.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyRow {
    pub name: String,
    /// The configured device that holds it.
    pub device: String,
    pub algorithm: KeyAlgorithm,
    /// How the device finds the key again (JSON of `hsm_shim::KeyHandle`; opaque here).
    pub handle: Vec<u8>,
    /// DER SubjectPublicKeyInfo.
    pub public_key: Vec<u8>,
    pub created: String,
}

impl fmt::Debug for KeyRow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyRow")
            .field("name", &self.name)
            .field("device", &self.device)
            .field("algorithm", &self.algorithm)
            .field("handle", &Len(self.handle.len()))
            .field("public_key", &Len(self.public_key.len()))
            .field("created", &self.created)
            .finish()
    }
}

/// Store a key record.
///
/// # Errors
/// [`StoreError::AlreadyExists`] (kind `key`) when the name is taken; a SQLite failure.
pub fn insert_key(tx: &Transaction<'_>, key: &KeyRow) -> Result<(), StoreError> {
    let inserted = tx.execute(
        "INSERT INTO keys (name, device, algorithm, handle, public_key, created)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (name) DO NOTHING",
        params![
            key.name,
            key.device,
            key.algorithm.as_str(),
            key.handle,
            key.public_key,
            key.created
        ],
    )?;
    if inserted == 0 {
        return Err(StoreError::AlreadyExists {
            kind: "key",
            name: key.name.clone(),
        });
    }
    Ok(())
}

const KEY_COLUMNS: &str = "name, device, algorithm, handle, public_key, created";

fn key_from_row(row: &Row<'_>) -> rusqlite::Result<KeyRow> {
    Ok(KeyRow {
        name: row.get(0)?,
        device: row.get(1)?,
        algorithm: parsed(row, 2)?,
        handle: row.get(3)?,
        public_key: row.get(4)?,
        created: row.get(5)?,
    })
}

/// One key record.
///
/// # Errors
/// A SQLite failure; [`StoreError::Corrupt`] when the row does not decode.
pub fn get_key(conn: &Connection, name: &str) -> Result<Option<KeyRow>, StoreError> {
    Ok(conn
        .query_row(
            &format!("SELECT {KEY_COLUMNS} FROM keys WHERE name = ?1"),
            [name],
            key_from_row,
        )
        .optional()?)
}

/// Every key record, by name.
///
/// # Errors
/// A SQLite failure; [`StoreError::Corrupt`] when a row does not decode.
pub fn list_keys(conn: &Connection) -> Result<Vec<KeyRow>, StoreError> {
    let mut stmt = conn.prepare(&format!("SELECT {KEY_COLUMNS} FROM keys ORDER BY name"))?;
    let keys = stmt
        .query_map([], key_from_row)?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(keys)
}

/// Remove a key record; `false` when there was none.
///
/// # Errors
/// A SQLite failure.
pub fn delete_key(tx: &Transaction<'_>, name: &str) -> Result<bool, StoreError> {
    Ok(tx.execute("DELETE FROM keys WHERE name = ?1", [name])? > 0)
}

// ---------------------------------------------------------------------------------------------
// key intents

/// What an unfinished device-key operation was doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IntentAction {
    /// Generating a key on the device, to be recorded in `keys`.
    Create,
    /// Destroying a recorded key's device object, then its record.
    Delete,
}

impl IntentAction {
    fn as_str(self) -> &'static str {
        match self {
            Self::Create => "create",
            Self::Delete => "delete",
        }
    }
}

/// A device-key operation that was started and has not finished (see schema v3). Nothing in
/// it is secret: a name, a device, an algorithm and an object id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyIntent {
    /// The key's name (one operation per name at a time).
    pub name: String,
    pub action: IntentAction,
    /// The configured device the operation runs on.
    pub device: String,
    pub algorithm: KeyAlgorithm,
    /// `Create`: the id the device was asked to give the new key (PKCS#11 `CKA_ID`).
    pub object_id: Option<Vec<u8>>,
    pub created: String,
}

/// Record that an operation on key `intent.name` starts.
///
/// # Errors
/// [`StoreError::AlreadyExists`] (kind `key operation`) when one is recorded for the name
/// already; a SQLite failure (a `create` without an object id is refused by the schema).
pub fn insert_key_intent(tx: &Transaction<'_>, intent: &KeyIntent) -> Result<(), StoreError> {
    let inserted = tx.execute(
        "INSERT INTO key_intents (name, action, device, algorithm, object_id, created)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (name) DO NOTHING",
        params![
            intent.name,
            intent.action.as_str(),
            intent.device,
            intent.algorithm.as_str(),
            intent.object_id,
            intent.created
        ],
    )?;
    if inserted == 0 {
        return Err(StoreError::AlreadyExists {
            kind: "key operation",
            name: intent.name.clone(),
        });
    }
    Ok(())
}

fn intent_from_row(row: &Row<'_>) -> rusqlite::Result<KeyIntent> {
    let action: String = row.get(1)?;
    let action = match action.as_str() {
        "create" => IntentAction::Create,
        "delete" => IntentAction::Delete,
        _ => {
            return Err(rusqlite::Error::FromSqlConversionFailure(
                1,
                rusqlite::types::Type::Text,
                format!("unknown key operation {action:?}").into(),
            ))
        }
    };
    Ok(KeyIntent {
        name: row.get(0)?,
        action,
        device: row.get(2)?,
        algorithm: parsed(row, 3)?,
        object_id: row.get(4)?,
        created: row.get(5)?,
    })
}

const INTENT_COLUMNS: &str = "name, action, device, algorithm, object_id, created";

/// The unfinished operation on key `name`, if any.
///
/// # Errors
/// A SQLite failure; [`StoreError::Corrupt`] when the row does not decode.
pub fn get_key_intent(conn: &Connection, name: &str) -> Result<Option<KeyIntent>, StoreError> {
    Ok(conn
        .query_row(
            &format!("SELECT {INTENT_COLUMNS} FROM key_intents WHERE name = ?1"),
            [name],
            intent_from_row,
        )
        .optional()?)
}

/// Every unfinished operation, oldest first.
///
/// # Errors
/// A SQLite failure; [`StoreError::Corrupt`] when a row does not decode.
pub fn list_key_intents(conn: &Connection) -> Result<Vec<KeyIntent>, StoreError> {
    let mut stmt = conn.prepare(&format!(
        "SELECT {INTENT_COLUMNS} FROM key_intents ORDER BY created, name"
    ))?;
    let intents = stmt
        .query_map([], intent_from_row)?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(intents)
}

/// The operation on key `name` is over; `false` when none was recorded.
///
/// # Errors
/// A SQLite failure.
pub fn delete_key_intent(tx: &Transaction<'_>, name: &str) -> Result<bool, StoreError> {
    Ok(tx.execute("DELETE FROM key_intents WHERE name = ?1", [name])? > 0)
}

// ---------------------------------------------------------------------------------------------
// transit keys

/// One version of a transit key.
#[derive(Clone, PartialEq, Eq)]
pub struct TransitKeyRow {
    pub name: String,
    /// From 1, one more per rotation.
    pub version: u32,
    /// The keyring term whose key sealed it.
    pub term: u32,
    /// The data key: nonce, ciphertext and tag; the AAD binds vault, name, version and term.
    pub sealed: Vec<u8>,
    pub created: String,
}

impl fmt::Debug for TransitKeyRow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TransitKeyRow")
            .field("name", &self.name)
            .field("version", &self.version)
            .field("term", &self.term)
            .field("sealed", &Len(self.sealed.len()))
            .field("created", &self.created)
            .finish()
    }
}

/// The newest version of transit key `name`, or `None` when there is no such key.
///
/// # Errors
/// A SQLite failure.
pub fn latest_transit_version(conn: &Connection, name: &str) -> Result<Option<u32>, StoreError> {
    Ok(conn
        .prepare_cached("SELECT max(version) FROM transit_keys WHERE name = ?1")?
        .query_row([name], |row| row.get(0))?)
}

/// Store one version of a transit key.
///
/// # Errors
/// [`StoreError::Conflict`] when that version exists; a SQLite failure.
pub fn insert_transit_key(tx: &Transaction<'_>, row: &TransitKeyRow) -> Result<(), StoreError> {
    let inserted = tx.execute(
        "INSERT INTO transit_keys (name, version, term, sealed, created)
         VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT DO NOTHING",
        params![row.name, row.version, row.term, row.sealed, row.created],
    )?;
    if inserted == 0 {
        return Err(StoreError::Conflict(format!(
            "transit key version {} exists",
            row.version
        )));
    }
    Ok(())
}

/// A version of a transit key (`None`: the newest), or `None` when there is no such version.
///
/// # Errors
/// A SQLite failure.
pub fn get_transit_key(
    conn: &Connection,
    name: &str,
    version: Option<u32>,
) -> Result<Option<TransitKeyRow>, StoreError> {
    let from_row = |row: &Row<'_>| {
        Ok(TransitKeyRow {
            name: row.get(0)?,
            version: row.get(1)?,
            term: row.get(2)?,
            sealed: row.get(3)?,
            created: row.get(4)?,
        })
    };
    // Cached statements: every Encrypt and Decrypt reads one row.
    let row = match version {
        None => conn
            .prepare_cached(
                "SELECT name, version, term, sealed, created FROM transit_keys \
                 WHERE name = ?1 ORDER BY version DESC LIMIT 1",
            )?
            .query_row([name], from_row)
            .optional()?,
        Some(version) => conn
            .prepare_cached(
                "SELECT name, version, term, sealed, created FROM transit_keys \
                 WHERE name = ?1 AND version = ?2",
            )?
            .query_row(params![name, version], from_row)
            .optional()?,
    };
    Ok(row)
}

// the OpenBao upstream sync

/// A local secret as the upstream sync last wrote it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamRow {
    pub secret: String,
    /// The KV v2 path it came from.
    pub remote: String,
    pub remote_version: u64,
    pub local_version: u64,
    pub synced: String,
    pub note: Option<String>,
}

/// Record (or replace) what the upstream sync wrote to `row.secret`.
///
/// # Errors
/// A SQLite failure.
pub fn put_upstream_version(tx: &Transaction<'_>, row: &UpstreamRow) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO upstream_versions (secret, remote, remote_version, local_version, synced, note)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT (secret) DO UPDATE SET remote = ?2, remote_version = ?3,
             local_version = ?4, synced = ?5, note = ?6",
        params![
            row.secret,
            row.remote,
            row.remote_version,
            row.local_version,
            row.synced,
            row.note
        ],
    )?;
    Ok(())
}

/// Set (or clear) the note on `secret`'s row; `false` when there is no row.
///
/// # Errors
/// A SQLite failure.
pub fn note_upstream_version(
    tx: &Transaction<'_>,
    secret: &str,
    note: Option<&str>,
) -> Result<bool, StoreError> {
    Ok(tx.execute(
        "UPDATE upstream_versions SET note = ?2 WHERE secret = ?1",
        params![secret, note],
    )? > 0)
}

/// Forget what the upstream sync wrote to `secret`.
///
/// # Errors
/// A SQLite failure.
pub fn delete_upstream_version(tx: &Transaction<'_>, secret: &str) -> Result<bool, StoreError> {
    Ok(tx.execute("DELETE FROM upstream_versions WHERE secret = ?1", [secret])? > 0)
}

/// Every row, by secret name.
///
/// # Errors
/// A SQLite failure.
pub fn list_upstream_versions(conn: &Connection) -> Result<Vec<UpstreamRow>, StoreError> {
    let mut stmt = conn.prepare(
        "SELECT secret, remote, remote_version, local_version, synced, note
         FROM upstream_versions ORDER BY secret",
    )?;
    let rows = stmt.query_map([], |row| {
        Ok(UpstreamRow {
            secret: row.get(0)?,
            remote: row.get(1)?,
            remote_version: row.get(2)?,
            local_version: row.get(3)?,
            synced: row.get(4)?,
            note: row.get(5)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

// the audit outbox

/// An audit record committed with the change it records, waiting to be appended to the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutboxRow {
    /// Its number: the line in the log carries it.
    pub id: u64,
    /// The log's next seq when it was made: its line comes at or after it.
    pub after_seq: u64,
    /// When the change was made (the line's time).
    pub time: String,
    /// The record's body, as the log writes it (JSON).
    pub record: String,
}

/// Add a record to the outbox; returns its id.
///
/// # Errors
/// A SQLite failure.
pub fn insert_outbox(
    tx: &Transaction<'_>,
    after_seq: u64,
    time: &str,
    record: &str,
) -> Result<u64, StoreError> {
    tx.prepare_cached("INSERT INTO audit_outbox (after_seq, time, record) VALUES (?1, ?2, ?3)")?
        .execute(params![after_seq, time, record])?;
    u64::try_from(tx.last_insert_rowid())
        .map_err(|_| StoreError::Corrupt("a negative audit outbox id".into()))
}

/// The outbox's rows with an id above `after`, in id order (the order the log takes them).
///
/// # Errors
/// A SQLite failure; a row that does not decode.
pub fn outbox_after(conn: &Connection, after: u64) -> Result<Vec<OutboxRow>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, after_seq, time, record FROM audit_outbox WHERE id > ?1 ORDER BY id",
    )?;
    let rows = stmt.query_map([after], |row| {
        Ok(OutboxRow {
            id: row.get(0)?,
            after_seq: row.get(1)?,
            time: row.get(2)?,
            record: row.get(3)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Drop the rows up to id `through` (their lines are durable in the log); returns how many.
///
/// # Errors
/// A SQLite failure.
pub fn delete_outbox_through(tx: &Transaction<'_>, through: u64) -> Result<usize, StoreError> {
    Ok(tx
        .prepare_cached("DELETE FROM audit_outbox WHERE id <= ?1")?
        .execute([through])?)
}

#[cfg(test)]
mod tests {
    #[test]
    fn timestamps_are_rfc3339_to_the_second() {
        let t = super::now_rfc3339();
        assert_eq!(t.len(), 20, "{t}");
        assert!(t.ends_with('Z') && t.as_bytes()[10] == b'T', "{t}");
    }
}
