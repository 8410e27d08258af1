//! Filling a vault with many secrets fast, for the scale figures: a million durable PutSecrets
//! over the socket would take hours, so with the daemon stopped the bench opens the vault the
//! proper way (a recovery share it enrolled unwraps the VMK, the VMK opens the keyring), encrypts
//! each secret with the vault's own crypto for its (name, version 1, current term), and stores
//! batches through the store's bulk insert. The rows are exactly what PutSecret writes: the
//! daemon reads them back normally, which the scale phase checks on random names.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context as _, Result};
use keywardd::store::tables::{self, SecretRow};
use keywardd::store::{Store, StoreError};
use keywardd::vault::crypto::{self, Key32};
use keywardd::vault::keyring::Keyring;
use keywardd::vault::recovery::{self, RecoverySlotData};
use tokio::runtime::Runtime;

/// Secrets per transaction: large enough that commits don't count, small enough that the WAL
/// stays bounded.
const BATCH: u64 = 20_000;

/// The name of filled secret `i`.
pub fn name(i: u64) -> String {
    format!("fill/{i:08}")
}

/// The value of filled secret `i`: 32 bytes, distinct per secret, so a read-back proves the row.
pub fn value(i: u64) -> Vec<u8> {
    format!("value-of-secret-{i:016}").into_bytes()
}

/// What it takes to write secrets the daemon will read: the vault id, the current term and its
/// data key.
struct Sealing {
    vault_id: [u8; 16],
    term: u32,
    key: Key32,
}

/// Add secrets `from..to` (names [`name`], values [`value`]) to the vault in database `db`,
/// opened with recovery share `share`. The daemon must be stopped. Returns the time taken.
///
/// # Errors
/// The store can't be opened, the share does not open the vault, or a write fails.
pub fn fill(rt: &Runtime, db: &Path, share: &str, from: u64, to: u64) -> Result<Duration> {
    let started = Instant::now();
    let store = Store::open(db).with_context(|| format!("opening {}", db.display()))?;
    let sealing = open_vault(rt, &store, share)?;
    let created = tables::now_rfc3339();
    let mut pending: Option<tokio::task::JoinHandle<Result<(), StoreError>>> = None;
    let mut start = from;
    while start < to {
        let end = (start + BATCH).min(to);
        let rows = (start..end)
            .map(|i| {
                let name = name(i);
                let aad = crypto::secret_aad(&sealing.vault_id, &name, 1, sealing.term);
                let ciphertext = crypto::seal(&sealing.key, &aad, &value(i))?;
                Ok(SecretRow {
                    name,
                    version: 1,
                    term: sealing.term,
                    ciphertext,
                    created: created.clone(),
                })
            })
            .collect::<Result<Vec<_>, crypto::CryptoError>>()?;
        // Encrypt the next batch while the writer thread commits this one.
        if let Some(p) = pending.take() {
            rt.block_on(p)??;
        }
        let writer = store.clone();
        pending = Some(rt.spawn(async move {
            writer
                .write(move |tx| tables::insert_new_secrets(tx, &rows))
                .await
        }));
        start = end;
    }
    if let Some(p) = pending.take() {
        rt.block_on(p)??;
    }
    Ok(started.elapsed())
}

/// Unwrap the VMK with the recovery share and open the keyring: its current term's key is the
/// one PutSecret would encrypt with.
fn open_vault(rt: &Runtime, store: &Store, share: &str) -> Result<Sealing> {
    let (meta, slots) =
        rt.block_on(store.read(|c| Ok((tables::get_meta(c)?, tables::list_keyslots(c)?))))?;
    let meta = meta.ok_or_else(|| anyhow!("the database holds no vault"))?;
    let slot = slots
        .iter()
        .find(|s| s.kind == "recovery")
        .ok_or_else(|| anyhow!("the vault has no recovery keyslot"))?;
    let data = RecoverySlotData::from_blob(&slot.blob)?;
    let share = recovery::parse_share(share)?;
    let vmk = recovery::unwrap_vmk(&data, &meta.vault_id, &[share])?;
    let keyring = Keyring::open(&vmk, &meta.vault_id, &meta.keyring)?;
    let (term, key) = keyring.current_key();
    Ok(Sealing {
        vault_id: meta.vault_id,
        term,
        // The key leaves the keyring only into another zeroizing key, for the cipher.
        key: Key32::from_bytes(key.expose())?,
    })
}
