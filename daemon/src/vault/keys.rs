//! Signing keys: created inside a configured device, recorded in the store by name (device,
//! algorithm, the device's handle and the public key), used to sign inside the device.
//!
//! Creating and deleting a key each take a step on the device and one in the store; an intent
//! recorded before the device's step makes a crash in between recoverable, and the sweep at
//! start-up ([`Vault::settle_key_intents`]) settles what is left. It must never destroy a
//! device object it did not make and record: tokens are shared with other applications.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};

use chacha20poly1305::aead::{rand_core::RngCore as _, OsRng};
use hsm_shim::{KeyAlgorithm, KeyHandle, KeySpec, SignData};
use keyward_proto::api::{self, KeyName, SignHash};
use sha2::{Digest as _, Sha512};

use super::Vault;
use crate::error::{corrupt, invalid, Error, Param, Thing};
use crate::store::tables::{IntentAction, KeyIntent, KeyRow};
use crate::store::{self, StoreError};

fn not_found(name: &str) -> Error {
    Error::NotFound {
        what: Thing::Key,
        name: name.to_owned(),
    }
}

/// What signing needs of a key: its device, its decoded handle, its public key.
#[derive(Debug)]
pub(super) struct KeyRef {
    pub(super) device: String,
    pub(super) handle: Arc<KeyHandle>,
    pub(super) public_key: Vec<u8>,
}

/// Keys by name, as the sign path needs them.
///
/// Signing is the hot path, and a key's record never changes after it is created (it can only
/// be deleted), so reading and decoding the store row on every signature is wasted work: the
/// first use fills the entry, a delete drops it. Nothing in it is secret (device handles and
/// public keys). Bounded: past [`KeyCache::MAX`] keys, lookups of the rest go to the store.
#[derive(Debug, Default)]
pub(super) struct KeyCache(RwLock<HashMap<String, Arc<KeyRef>>>);

impl KeyCache {
    const MAX: usize = 4096;

    fn get(&self, name: &str) -> Option<Arc<KeyRef>> {
        self.0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    fn insert(&self, name: &str, key: Arc<KeyRef>) {
        let mut map = self.0.write().unwrap_or_else(|p| p.into_inner());
        if map.len() < Self::MAX {
            map.insert(name.to_owned(), key);
        }
    }

    fn remove(&self, name: &str) {
        self.0
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
    }
}

/// Names of keys that a `CreateKey` or `DeleteKey` of this process is working on. An intent in
/// the store whose name is not here was left by an earlier run (or a cleanup that failed), and
/// may be settled; one whose name is here belongs to a request still running.
#[derive(Debug, Default)]
pub(super) struct KeyOps(Mutex<HashSet<String>>);

/// The claim on one key name; released on drop.
struct KeyOp<'a> {
    ops: &'a KeyOps,
    name: String,
}

impl KeyOps {
    /// Claim `name`, or `Busy` while another operation holds it.
    fn begin(&self, name: &str) -> Result<KeyOp<'_>, Error> {
        let fresh = self
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_owned());
        if !fresh {
            return Err(Error::KeyInUse {
                name: name.to_owned(),
            });
        }
        Ok(KeyOp {
            ops: self,
            name: name.to_owned(),
        })
    }
}

impl Drop for KeyOp<'_> {
    fn drop(&mut self) {
        self.ops
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.name);
    }
}

impl Vault {
    async fn key_row(&self, name: &str) -> Result<KeyRow, Error> {
        self.with_open(|_| ()).await?;
        let lookup = name.to_owned();
        self.store
            .read(move |c| store::tables::get_key(c, &lookup))
            .await?
            .ok_or_else(|| not_found(name))
    }

    /// The key `name`, from the cache or else the store.
    pub(super) async fn key_ref(&self, name: &str) -> Result<Arc<KeyRef>, Error> {
        self.with_open(|_| ()).await?;
        if let Some(key) = self.keys.get(name) {
            return Ok(key);
        }
        let row = self.key_row(name).await?;
        let handle: KeyHandle = serde_json::from_slice(&row.handle)
            .map_err(|_| corrupt(format!("handle of key {name:?}")))?;
        let key = Arc::new(KeyRef {
            device: row.device,
            handle: Arc::new(handle),
            public_key: row.public_key,
        });
        self.keys.insert(name, key.clone());
        Ok(key)
    }

    /// `CreateKey`: generate a key pair inside `device`; returns the DER SPKI public key.
    ///
    /// The store records the intent (with the object id the device is to give the key) before
    /// the device is touched, and drops it in the transaction that records the key: whatever
    /// happens in between, a crash included, what the device made can be found and destroyed
    /// ([`Vault::settle_key_intents`]).
    ///
    /// # Errors
    /// `Sealed`, an unknown device, `AlreadyExists`, `Busy` while another
    /// `CreateKey` or `DeleteKey` of the name runs, device failures.
    pub async fn create_key(
        &self,
        name: KeyName,
        device: String,
        algorithm: KeyAlgorithm,
    ) -> Result<Vec<u8>, Error> {
        let name = String::from(name);
        self.with_open(|_| ()).await?;
        let handle_dev = self.device(&device)?.clone();
        let _op = self.key_ops.begin(&name)?;
        self.settle_leftover(&name).await?;
        let mut object_id = vec![0u8; 16];
        OsRng.fill_bytes(&mut object_id);
        let intent = KeyIntent {
            name: name.clone(),
            action: IntentAction::Create,
            device: device.clone(),
            algorithm,
            object_id: Some(object_id.clone()),
            created: store::tables::now_rfc3339(),
        };
        let recorded = intent.clone();
        self.store
            .try_write(move |tx| {
                if store::tables::get_key(tx, &recorded.name)?.is_some() {
                    return Err(Error::AlreadyExists {
                        what: Thing::Key,
                        name: recorded.name,
                    });
                }
                Ok(store::tables::insert_key_intent(tx, &recorded)?)
            })
            .await?;
        tracing::debug!(key = %name, device = %device, "create intent recorded");
        let spec = KeySpec {
            label: name.clone(),
            algorithm,
            id: Some(object_id),
        };
        let generated = handle_dev
            .call(move |d| {
                let handle = d.generate(&spec)?;
                let public = d.public_key(&handle)?;
                Ok((handle, public))
            })
            .await;
        let (handle, public) = match generated {
            Ok(made) => made,
            Err(e) => {
                // The device may have made the key before failing (or after our wait ended):
                // the undo runs behind it on the device's queue.
                self.undo_quietly(&intent).await;
                return Err(Error::device(&device, e));
            }
        };
        let row = KeyRow {
            name: name.clone(),
            device: device.clone(),
            algorithm,
            handle: serde_json::to_vec(&handle).map_err(|_| Error::Internal {
                reason: "key handle encoding".into(),
            })?,
            public_key: public.0.clone(),
            created: store::tables::now_rfc3339(),
        };
        tracing::debug!(key = %name, device = %device, "the device made the key; recording it");
        match self
            .store
            .write(move |tx| {
                store::tables::insert_key(tx, &row)?;
                store::tables::delete_key_intent(tx, &row.name)?;
                Ok(())
            })
            .await
        {
            Ok(()) => {
                tracing::info!(key = %name, device = %device, %algorithm, "key created");
                Ok(public.0)
            }
            Err(e) => {
                self.undo_quietly(&intent).await;
                Err(key_clash(&name, e))
            }
        }
    }

    /// `ListKeys`.
    ///
    /// # Errors
    /// `Sealed`, store failures.
    pub async fn list_keys(&self) -> Result<Vec<api::KeyInfo>, Error> {
        self.with_open(|_| ()).await?;
        let rows = self.store.read(store::tables::list_keys).await?;
        Ok(rows
            .into_iter()
            .map(|r| api::KeyInfo {
                name: r.name,
                device: r.device,
                algorithm: r.algorithm,
                created: r.created,
            })
            .collect())
    }

    /// `PublicKey`: DER SPKI, from the store (recorded at creation).
    ///
    /// # Errors
    /// `Sealed`, `NotFound`.
    pub async fn public_key(&self, name: KeyName) -> Result<Vec<u8>, Error> {
        Ok(self.key_ref(&name).await?.public_key.clone())
    }

    /// `Sign` inside the key's device, over `hash` (SHA-256 unless asked; SHA-512 only for
    /// RSA PKCS#1 v1.5 keys, which is what SSH's `rsa-sha2-512` needs). With `prehashed`,
    /// `data` is that hash's digest.
    ///
    /// # Errors
    /// `Sealed`, `NotFound`, a hash the key's algorithm doesn't sign with, a digest of the
    /// wrong length, device failures.
    pub async fn sign(
        &self,
        name: KeyName,
        data: Vec<u8>,
        prehashed: bool,
        hash: Option<SignHash>,
    ) -> Result<Vec<u8>, Error> {
        let key = self.key_ref(&name).await?;
        let algorithm = key.handle.algorithm();
        let hash = hash.unwrap_or(SignHash::Sha256);
        if hash == SignHash::Sha512 && algorithm != KeyAlgorithm::RsaPkcs1_3072 {
            return Err(invalid(
                Param::Hash,
                format!("{algorithm} keys sign over sha256; sha512 is for rsa-pkcs1-3072 keys"),
            ));
        }
        let wrong_length = || {
            invalid(
                Param::Data,
                format!(
                    "a prehashed input is a {}-byte {hash} digest, not {} bytes",
                    hash.digest_len(),
                    data.len()
                ),
            )
        };
        if prehashed && data.len() != hash.digest_len() {
            return Err(wrong_length());
        }
        // No device here takes a message with a hash of the caller's choice: for SHA-512 the
        // host hashes.
        let sha512: Option<[u8; 64]> = match (hash, prehashed) {
            (SignHash::Sha256, _) => None,
            (SignHash::Sha512, false) => Some(Sha512::digest(&data).into()),
            (SignHash::Sha512, true) => {
                Some(<[u8; 64]>::try_from(data.as_slice()).map_err(|_| wrong_length())?)
            }
        };
        let input = match (sha512, <[u8; 32]>::try_from(data.as_slice())) {
            (Some(digest), _) => SignData::Sha512Digest(digest),
            (None, Ok(digest)) if prehashed => SignData::Sha256Digest(digest),
            (None, _) => SignData::Message(data),
        };
        self.device(&key.device)?
            .sign(Arc::clone(&key.handle), input)
            .await
            .map_err(|e| Error::device(&key.device, e))
    }

    /// `DeleteKey`: destroys the device object, then forgets the key.
    ///
    /// The store records the intent first, so a delete cut short (a crash, a device that fails
    /// half-way) is finished later rather than leaving a record whose key is gone: by the next
    /// `DeleteKey` or `CreateKey` of the name, or at the next start.
    ///
    /// # Errors
    /// `Sealed`, `NotFound`, `Busy` while another `CreateKey` or `DeleteKey` of the name runs,
    /// device failures (the delete stays recorded and is finished later).
    pub async fn delete_key(&self, name: KeyName) -> Result<(), Error> {
        let name = String::from(name);
        self.with_open(|_| ()).await?;
        let _op = self.key_ops.begin(&name)?;
        if self.settle_leftover(&name).await? == Some(IntentAction::Delete) {
            // An earlier delete of this key was cut short; it is finished now.
            return Ok(());
        }
        let row = self.key_row(&name).await?;
        let intent = KeyIntent {
            name: name.clone(),
            action: IntentAction::Delete,
            device: row.device.clone(),
            algorithm: row.algorithm,
            object_id: None,
            created: store::tables::now_rfc3339(),
        };
        self.store
            .try_write(move |tx| {
                if store::tables::get_key(tx, &intent.name)?.is_none() {
                    return Err(not_found(&intent.name));
                }
                Ok(store::tables::insert_key_intent(tx, &intent)?)
            })
            .await?;
        self.finish_delete(&name, &row).await
    }

    /// Destroy the device object of `row` (the key `name`), then drop its record and the
    /// delete intent in one transaction.
    async fn finish_delete(&self, name: &str, row: &KeyRow) -> Result<(), Error> {
        let handle: KeyHandle = serde_json::from_slice(&row.handle)
            .map_err(|_| corrupt(format!("handle of key {name:?}")))?;
        // Stop signing with it before it goes.
        self.keys.remove(name);
        let device = row.device.clone();
        self.device(&device)?
            .call(move |d| d.destroy(&handle))
            .await
            .map_err(|e| Error::device(&device, e))?;
        let forget = name.to_owned();
        self.store
            .write(move |tx| {
                store::tables::delete_key(tx, &forget)?;
                store::tables::delete_key_intent(tx, &forget)?;
                Ok(())
            })
            .await?;
        // Again: a signature that ran meanwhile may have cached it anew.
        self.keys.remove(name);
        Ok(())
    }

    /// Undo the create `intent` (destroy what the device made for it, drop the intent), or
    /// leave the intent for later when the device can't be reached now.
    async fn undo_quietly(&self, intent: &KeyIntent) {
        if let Err(e) = self.undo_create(intent).await {
            tracing::warn!(
                key = %intent.name,
                device = %intent.device,
                error = %e,
                "cannot clean up after a failed key creation now; it is retried later"
            );
        }
    }

    /// Destroy the objects the create `intent` asked the device for (found by label and
    /// object id: nothing else on a shared token is touched), then drop the intent. Returns
    /// how many objects were destroyed.
    async fn undo_create(&self, intent: &KeyIntent) -> Result<usize, Error> {
        let spec = KeySpec {
            label: intent.name.clone(),
            algorithm: intent.algorithm,
            id: intent.object_id.clone(),
        };
        // Defensive: an object a key record names is never destroyed here. (The record and
        // the intent's removal are one transaction, so this does not happen.)
        let lookup = intent.name.clone();
        let recorded = self
            .store
            .read(move |c| store::tables::get_key(c, &lookup))
            .await?
            .and_then(|row| serde_json::from_slice::<KeyHandle>(&row.handle).ok());
        let destroyed = match recorded {
            Some(KeyHandle::Pkcs11 { id, .. }) if Some(&id) == intent.object_id.as_ref() => 0,
            _ => self
                .device(&intent.device)?
                .call(move |d| d.destroy_generated(&spec))
                .await
                .map_err(|e| Error::device(&intent.device, e))?,
        };
        let name = intent.name.clone();
        self.store
            .write(move |tx| store::tables::delete_key_intent(tx, &name))
            .await?;
        Ok(destroyed)
    }

    /// Finish the operation `intent` that an earlier run (or a failed cleanup) left. Returns a
    /// line for the log and the audit record.
    async fn settle(&self, intent: &KeyIntent) -> Result<String, Error> {
        let id = intent.object_id.as_deref().map(keyward_proto::text::hex);
        match intent.action {
            IntentAction::Create => {
                let destroyed = self.undo_create(intent).await?;
                Ok(format!(
                    "unfinished create of key {:?} on device {:?} (object id {}): {destroyed} \
                     device objects destroyed",
                    intent.name,
                    intent.device,
                    id.unwrap_or_default()
                ))
            }
            IntentAction::Delete => {
                let lookup = intent.name.clone();
                let row = self
                    .store
                    .read(move |c| store::tables::get_key(c, &lookup))
                    .await?;
                match row {
                    Some(row) => self.finish_delete(&intent.name, &row).await?,
                    None => {
                        let name = intent.name.clone();
                        self.store
                            .write(move |tx| store::tables::delete_key_intent(tx, &name))
                            .await?;
                    }
                }
                Ok(format!(
                    "unfinished delete of key {:?} on device {:?}: finished",
                    intent.name, intent.device
                ))
            }
        }
    }

    /// Settle a leftover operation on key `name`, if the store holds one; which it was. Call
    /// with the name's [`KeyOps`] guard held, so the intent can't be one running now.
    async fn settle_leftover(&self, name: &str) -> Result<Option<IntentAction>, Error> {
        let lookup = name.to_owned();
        let Some(intent) = self
            .store
            .read(move |c| store::tables::get_key_intent(c, &lookup))
            .await?
        else {
            return Ok(None);
        };
        let line = self.settle(&intent).await?;
        tracing::info!(key = %name, "{line}");
        Ok(Some(intent.action))
    }

    /// Finish or undo every device-key operation an earlier run left unfinished (it stopped
    /// between a device's step and the store's): a create's device objects are destroyed (only
    /// those with the label and object id it recorded), a delete is carried through. An
    /// operation whose device is down now stays recorded for the next start (or the next
    /// `CreateKey`/`DeleteKey` of the name). Returns one line per settled operation, for the
    /// audit log; nothing in them is secret.
    ///
    /// The vault need not be open: intents and key records are not encrypted.
    pub async fn settle_key_intents(&self) -> Vec<String> {
        let intents = match self.store.read(store::tables::list_key_intents).await {
            Ok(intents) => intents,
            Err(e) => {
                tracing::error!(error = %e, "cannot read unfinished key operations");
                return Vec::new();
            }
        };
        let mut settled = Vec::new();
        for intent in intents {
            let Ok(_op) = self.key_ops.begin(&intent.name) else {
                continue; // a request is on it already
            };
            match self.settle(&intent).await {
                Ok(line) => {
                    tracing::info!(key = %intent.name, device = %intent.device, "{line}");
                    settled.push(line);
                }
                Err(e) => tracing::warn!(
                    key = %intent.name,
                    device = %intent.device,
                    error = %e,
                    "unfinished key operation kept for later"
                ),
            }
        }
        settled
    }
}

/// A store failure of recording the key `name`: a clash of names (another request created it
/// meanwhile) is the caller's business, anything else the store's.
fn key_clash(name: &str, e: StoreError) -> Error {
    match e {
        StoreError::AlreadyExists { kind: "key", .. } => Error::AlreadyExists {
            what: Thing::Key,
            name: name.to_owned(),
        },
        other => other.into(),
    }
}
