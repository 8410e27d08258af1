//! Secrets: versioned values, each version AEAD-encrypted under the keyring's current term
//! with AAD binding vault, name, version and term, so a stored record can't be moved to
//! another name or version, or replayed from another vault.
//!
//! A put or delete made for a client carries its audit record ([`Staged`]) into its
//! transaction: the change and its record are one commit.

use keyward_proto::api::{self, SecretName, SecretValue};

use super::crypto::{self, Key32};
use super::Vault;
use crate::audit::Staged;
use crate::error::{Error, Param, Thing};
use crate::store::{self, tables::OutboxRow, tables::SecretRow};

impl Vault {
    /// `PutSecret`: a new version of `name`, with its audit `record` (saying which version)
    /// in the same transaction. Returns the version and the record's outbox row once committed.
    ///
    /// # Errors
    /// `Sealed`, `TooLarge`, store failures.
    pub async fn put_secret(
        &self,
        name: SecretName,
        value: SecretValue,
        record: Staged,
    ) -> Result<(u64, Option<OutboxRow>), Error> {
        self.put_version(name, value, None, Some(record)).await
    }

    /// A new version of `name` from the OpenBao upstream: the secret version and the record of
    /// the upstream path and version it holds are one transaction, so neither is ever on disk
    /// without the other.
    ///
    /// # Errors
    /// As [`Vault::put_secret`].
    pub async fn put_synced_secret(
        &self,
        name: SecretName,
        value: SecretValue,
        remote: String,
        remote_version: u64,
    ) -> Result<u64, Error> {
        let (version, _) = self
            .put_version(name, value, Some((remote, remote_version)), None)
            .await?;
        Ok(version)
    }

    /// What the upstream sync wrote, by secret.
    ///
    /// # Errors
    /// Store failures.
    pub async fn synced_secrets(&self) -> Result<Vec<store::tables::UpstreamRow>, Error> {
        Ok(self
            .store
            .read(store::tables::list_upstream_versions)
            .await?)
    }

    /// Set or clear the note on a synced secret's record (nothing when there is none).
    ///
    /// # Errors
    /// Store failures.
    pub async fn note_synced_secret(
        &self,
        name: String,
        note: Option<String>,
    ) -> Result<(), Error> {
        self.store
            .write(move |tx| store::tables::note_upstream_version(tx, &name, note.as_deref()))
            .await?;
        Ok(())
    }

    async fn put_version(
        &self,
        name: SecretName,
        value: SecretValue,
        upstream: Option<(String, u64)>,
        record: Option<Staged>,
    ) -> Result<(u64, Option<OutboxRow>), Error> {
        let name = String::from(name);
        if value.expose().len() > api::MAX_SECRET_LEN {
            return Err(Error::TooLarge {
                parameter: Param::Value,
                limit: api::MAX_SECRET_LEN as u64,
            });
        }
        let (vault_id, term, key) = self
            .with_open(|o| {
                let (term, key) = o.keyring.current_key();
                Key32::from_bytes(key.expose()).map(|k| (o.vault_id, term, k))
            })
            .await?
            .map_err(Error::Encrypt)?;
        let committed = self
            .store
            .try_write(move |tx| {
                let version = store::tables::next_secret_version(tx, &name)?;
                let aad = crypto::secret_aad(&vault_id, &name, version, term);
                let ciphertext =
                    crypto::seal(&key, &aad, value.expose()).map_err(Error::Encrypt)?;
                let created = store::tables::now_rfc3339();
                if let Some((remote, remote_version)) = upstream {
                    store::tables::put_upstream_version(
                        tx,
                        &store::tables::UpstreamRow {
                            secret: name.clone(),
                            remote,
                            remote_version,
                            local_version: version,
                            synced: created.clone(),
                            note: None,
                        },
                    )?;
                }
                store::tables::insert_secret(
                    tx,
                    &SecretRow {
                        name,
                        version,
                        term,
                        ciphertext,
                        created,
                    },
                )?;
                let id = record
                    .map(|r| r.commit(tx, Some(format!("version {version}"))))
                    .transpose()?;
                Ok::<_, Error>((version, id))
            })
            .await?;
        Ok(committed)
    }

    /// `GetSecret`: the latest version, or the one asked for.
    ///
    /// # Errors
    /// `Sealed`, `NotFound`, integrity failures of stored data.
    pub async fn get_secret(
        &self,
        name: SecretName,
        version: Option<u64>,
    ) -> Result<(SecretValue, u64), Error> {
        let name = String::from(name);
        self.with_open(|_| ()).await?;
        // A point lookup: run in place rather than on a blocking thread (see `read_now`).
        let row = self
            .store
            .read_now(|c| store::tables::get_secret(c, &name, version))?
            .ok_or_else(|| Error::NotFound {
                what: Thing::Secret,
                name: match version {
                    Some(v) => format!("{name}@{v}"),
                    None => name.clone(),
                },
            })?;
        let plain = self
            .with_open(|o| {
                let key = o
                    .keyring
                    .key(row.term)
                    .ok_or(crypto::CryptoError::Integrity)?;
                let aad = crypto::secret_aad(&o.vault_id, &row.name, row.version, row.term);
                crypto::open(key, &aad, &row.ciphertext)
            })
            .await?
            .map_err(Error::Decrypt)?;
        Ok((SecretValue::from(plain), row.version))
    }

    /// `ListSecrets`: names with at least one version, optionally under a prefix.
    ///
    /// # Errors
    /// `Sealed`, store failures.
    pub async fn list_secrets(&self, prefix: Option<String>) -> Result<Vec<String>, Error> {
        self.with_open(|_| ()).await?;
        self.store
            .read(move |c| store::tables::list_secret_names(c, prefix.as_deref()))
            .await
            .map_err(Error::from)
    }

    /// `SecretVersions`.
    ///
    /// # Errors
    /// `Sealed`, `NotFound`, store failures.
    pub async fn secret_versions(
        &self,
        name: SecretName,
    ) -> Result<Vec<api::SecretVersion>, Error> {
        let name = String::from(name);
        self.with_open(|_| ()).await?;
        let lookup = name.clone();
        let versions = self
            .store
            .read(move |c| store::tables::secret_versions(c, &lookup))
            .await?;
        if versions.is_empty() {
            return Err(Error::NotFound {
                what: Thing::Secret,
                name,
            });
        }
        Ok(versions
            .into_iter()
            .map(|(version, term, created)| api::SecretVersion {
                version,
                term,
                created,
            })
            .collect())
    }

    /// `DeleteSecret`: every version, securely deleted from the database file, and the upstream
    /// sync's record of it.
    ///
    /// # Errors
    /// `Sealed`, `NotFound`, store failures.
    pub async fn delete_secret(&self, name: SecretName) -> Result<(), Error> {
        self.delete_version(name, None).await.map(|_| ())
    }

    /// `DeleteSecret` for a client: [`Vault::delete_secret`] with its audit `record` in the
    /// same transaction. Returns the record's outbox row once committed.
    ///
    /// # Errors
    /// As [`Vault::delete_secret`].
    pub async fn delete_secret_recorded(
        &self,
        name: SecretName,
        record: Staged,
    ) -> Result<Option<OutboxRow>, Error> {
        self.delete_version(name, Some(record)).await
    }

    async fn delete_version(
        &self,
        name: SecretName,
        record: Option<Staged>,
    ) -> Result<Option<OutboxRow>, Error> {
        let name = String::from(name);
        self.with_open(|_| ()).await?;
        let target = name.clone();
        self.store
            .try_write(move |tx| {
                // A synced secret deleted here is forgotten by the sync too: the next change
                // upstream brings it back.
                store::tables::delete_upstream_version(tx, &target)?;
                if !store::tables::delete_secret(tx, &target)? {
                    // Nothing changed: no record in the outbox (the refusal is recorded as a
                    // read's is).
                    return Err(Error::NotFound {
                        what: Thing::Secret,
                        name: target,
                    });
                }
                Ok(record.map(|r| r.commit(tx, None)).transpose()?)
            })
            .await
    }
}
