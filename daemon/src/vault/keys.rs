//! Signing keys: created inside a configured device, recorded in the store by name (device,
//! algorithm, the device's handle and the public key), used to sign inside the device.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use hsm_shim::{KeyAlgorithm, KeyHandle, KeySpec, SignInput};
use keyward_proto::api::{self, ApiError};

use super::{errors, store_error, Vault};
use crate::names::check_key_name;
use crate::store::{self, tables::KeyRow, StoreError};

fn not_found(name: &str) -> ApiError {
    ApiError::NotFound {
        kind: "key".into(),
        name: name.to_owned(),
    }
}

/// What signing needs of a key: its device, its decoded handle, its public key.
#[derive(Debug)]
struct KeyRef {
    device: String,
    handle: Arc<KeyHandle>,
    public_key: Vec<u8>,
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

impl Vault {
    async fn key_row(&self, name: &str) -> Result<KeyRow, ApiError> {
        check_key_name(name)?;
        self.with_open(|_| ()).await?;
        let lookup = name.to_owned();
        self.store
            .read(move |c| store::tables::get_key(c, &lookup))
            .await
            .map_err(store_error)?
            .ok_or_else(|| not_found(name))
    }

    /// The key `name`, from the cache or else the store.
    async fn key_ref(&self, name: &str) -> Result<Arc<KeyRef>, ApiError> {
        check_key_name(name)?;
        self.with_open(|_| ()).await?;
        if let Some(key) = self.keys.get(name) {
            return Ok(key);
        }
        let row = self.key_row(name).await?;
        let handle: KeyHandle =
            serde_json::from_slice(&row.handle).map_err(|_| ApiError::Internal {
                reason: format!("stored handle of key {name:?} does not decode"),
            })?;
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
    /// # Errors
    /// `Sealed`, an invalid name or algorithm, `AlreadyExists`, device failures.
    pub async fn create_key(
        &self,
        name: String,
        device: String,
        algorithm: String,
    ) -> Result<Vec<u8>, ApiError> {
        check_key_name(&name)?;
        self.with_open(|_| ()).await?;
        let algorithm: KeyAlgorithm =
            algorithm
                .parse()
                .map_err(|e: hsm_shim::DeviceError| ApiError::InvalidArgument {
                    parameter: "algorithm".into(),
                    reason: e.to_string(),
                })?;
        let handle_dev = self.device(&device)?.clone();
        let lookup = name.clone();
        if self
            .store
            .read(move |c| store::tables::get_key(c, &lookup))
            .await
            .map_err(store_error)?
            .is_some()
        {
            return Err(ApiError::AlreadyExists {
                kind: "key".into(),
                name,
            });
        }
        let spec = KeySpec {
            label: name.clone(),
            algorithm,
        };
        let (handle, public) = handle_dev
            .call(move |d| {
                let handle = d.generate(&spec)?;
                let public = d.public_key(&handle)?;
                Ok((handle, public))
            })
            .await
            .map_err(|e| errors::device_error(&device, e))?;
        let row = KeyRow {
            name: name.clone(),
            device: device.clone(),
            algorithm: algorithm.as_str().to_owned(),
            handle: serde_json::to_vec(&handle).map_err(|_| ApiError::Internal {
                reason: "key handle encoding".into(),
            })?,
            public_key: public.0.clone(),
            created: store::tables::now_rfc3339(),
        };
        match self
            .store
            .write(move |tx| store::tables::insert_key(tx, &row))
            .await
        {
            Ok(()) => {
                tracing::info!(key = %name, device = %device, %algorithm, "key created");
                Ok(public.0)
            }
            Err(e) => {
                // Don't leave an orphan object on the token.
                let _ = handle_dev.call(move |d| d.destroy(&handle)).await;
                match e {
                    StoreError::AlreadyExists { .. } => Err(ApiError::AlreadyExists {
                        kind: "key".into(),
                        name,
                    }),
                    other => Err(store_error(other)),
                }
            }
        }
    }

    /// `ListKeys`.
    ///
    /// # Errors
    /// `Sealed`, store failures.
    pub async fn list_keys(&self) -> Result<Vec<api::KeyInfo>, ApiError> {
        self.with_open(|_| ()).await?;
        let rows = self
            .store
            .read(store::tables::list_keys)
            .await
            .map_err(store_error)?;
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
    pub async fn public_key(&self, name: String) -> Result<Vec<u8>, ApiError> {
        Ok(self.key_ref(&name).await?.public_key.clone())
    }

    /// `Sign` inside the key's device.
    ///
    /// # Errors
    /// `Sealed`, `NotFound`, a digest of the wrong length, device failures.
    pub async fn sign(
        &self,
        name: String,
        data: Vec<u8>,
        prehashed: bool,
    ) -> Result<Vec<u8>, ApiError> {
        let key = self.key_ref(&name).await?;
        if prehashed && data.len() != 32 {
            return Err(ApiError::InvalidArgument {
                parameter: "data".into(),
                reason: format!(
                    "a prehashed input is a 32-byte SHA-256 digest, not {} bytes",
                    data.len()
                ),
            });
        }
        let handle = key.handle.clone();
        self.device(&key.device)?
            .call(move |d| {
                let input = match <&[u8; 32]>::try_from(data.as_slice()) {
                    Ok(digest) if prehashed => SignInput::Sha256Digest(digest),
                    _ => SignInput::Message(&data),
                };
                d.sign(&handle, input)
            })
            .await
            .map_err(|e| errors::device_error(&key.device, e))
    }

    /// `DeleteKey`: destroys the device object, then forgets the key.
    ///
    /// # Errors
    /// `Sealed`, `NotFound`, device failures (the record stays, so the delete can be retried).
    pub async fn delete_key(&self, name: String) -> Result<(), ApiError> {
        let row = self.key_row(&name).await?;
        let handle: KeyHandle =
            serde_json::from_slice(&row.handle).map_err(|_| ApiError::Internal {
                reason: format!("stored handle of key {name:?} does not decode"),
            })?;
        let device = row.device;
        self.device(&device)?
            .call(move |d| d.destroy(&handle))
            .await
            .map_err(|e| errors::device_error(&device, e))?;
        // Forget the cached entry now: the device object is gone, whatever the store says.
        self.keys.remove(&name);
        self.store
            .write(move |tx| store::tables::delete_key(tx, &name))
            .await
            .map_err(store_error)?;
        Ok(())
    }
}
