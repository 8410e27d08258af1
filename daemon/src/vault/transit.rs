//! Transit keys: named, versioned data keys that the vault makes and keeps, for encryption as a
//! service (`Encrypt`/`Decrypt`, and the OpenBao-compatible transit socket that auto-unseals an
//! OpenBao node). Each version is a random 256-bit key sealed under a keyring term, as a secret
//! version is; so it is bound to the master key (and so to the TPM or token that releases it),
//! survives a rekey untouched, and stays readable after a keyring rotation. Rotating a transit
//! key adds a version; older versions keep decrypting what they encrypted.
//!
//! Ciphertexts are `vault:v<version>:<base64>`, the form OpenBao's transit engine writes and its
//! transit seal parses. The base64 is a [`crypto::seal`] blob whose AAD binds the key name, the
//! version and the caller's associated data.
//!
//! Must not: return, log or put into an error any key, plaintext or ciphertext bytes. A
//! ciphertext that does not decrypt is the caller's `InvalidArgument`, never a store integrity
//! failure.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use keyward_proto::api::{SecretValue, TransitKeyName};

use super::crypto::{self, Key32};
use super::Vault;
use crate::error::{invalid, Error, Param, Thing};
use crate::store::{self, tables::TransitKeyRow};

/// The prefix of every transit ciphertext, before the version number.
const PREFIX: &str = "vault:v";

/// Largest plaintext, in bytes (OpenBao seals its root key: tens of bytes).
pub const MAX_PLAINTEXT: usize = keyward_proto::api::MAX_SECRET_LEN;

/// `vault:v<version>:<base64 of blob>`.
fn format_ciphertext(version: u32, blob: &[u8]) -> String {
    format!("{PREFIX}{version}:{}", B64.encode(blob))
}

/// The version and blob of a ciphertext from [`format_ciphertext`].
fn parse_ciphertext(text: &str) -> Result<(u32, Vec<u8>), Error> {
    let bad = |reason: &str| invalid(Param::Ciphertext, reason);
    let rest = text
        .strip_prefix(PREFIX)
        .ok_or_else(|| bad("not a transit ciphertext: it starts with vault:v<version>:"))?;
    let (version, data) = rest
        .split_once(':')
        .ok_or_else(|| bad("no ':' after the version"))?;
    let digits = !version.is_empty() && version.len() <= 10;
    let version = version
        .parse::<u32>()
        .ok()
        .filter(|v| *v >= 1 && digits && version.bytes().all(|b| b.is_ascii_digit()))
        .ok_or_else(|| bad("the version is not a number from 1"))?;
    let blob = B64
        .decode(data)
        .map_err(|_| bad("the data after the version is not base64"))?;
    Ok((version, blob))
}

/// A fresh data key sealed under the keyring's `term` key: one new row.
fn new_version(
    vault_id: &[u8; 16],
    term: u32,
    term_key: &Key32,
    name: &str,
    version: u32,
) -> Result<TransitKeyRow, Error> {
    let key = Key32::random();
    let aad = crypto::transit_key_aad(vault_id, name, version, term);
    // The data key goes straight from its locked buffer into the cipher.
    let sealed = crypto::seal(term_key, &aad, key.expose()).map_err(Error::Encrypt)?;
    Ok(TransitKeyRow {
        name: name.to_owned(),
        version,
        term,
        sealed,
        created: store::tables::now_rfc3339(),
    })
}

impl Vault {
    /// `CreateTransitKey`: version 1 of a new transit key.
    ///
    /// # Errors
    /// `Sealed`, `AlreadyExists`, store failures.
    pub async fn create_transit_key(&self, name: TransitKeyName) -> Result<u32, Error> {
        self.add_transit_version(name, false).await
    }

    /// `RotateTransitKey`: a new version of an existing transit key; older ones stay.
    ///
    /// # Errors
    /// `Sealed`, `NotFound`, store failures.
    pub async fn rotate_transit_key(&self, name: TransitKeyName) -> Result<u32, Error> {
        self.add_transit_version(name, true).await
    }

    /// Add the next version of `name` in one transaction: version 1 when `rotate` is false and
    /// the key is new, the newest plus one when `rotate` is true and the key exists.
    async fn add_transit_version(&self, name: TransitKeyName, rotate: bool) -> Result<u32, Error> {
        let name = String::from(name);
        let (vault_id, term, term_key) = self
            .with_open(|o| {
                let (term, key) = o.keyring.current_key();
                Key32::from_bytes(key.expose()).map(|k| (o.vault_id, term, k))
            })
            .await?
            .map_err(Error::Encrypt)?;
        self.store
            .try_write(move |tx| {
                let latest = store::tables::latest_transit_version(tx, &name)?;
                let version = match (latest, rotate) {
                    (None, false) => 1,
                    (Some(v), true) => v.checked_add(1).ok_or_else(|| {
                        invalid(Param::Name, "the key has no versions left to rotate to")
                    })?,
                    (Some(_), false) => {
                        return Err(Error::AlreadyExists {
                            what: Thing::TransitKey,
                            name,
                        })
                    }
                    (None, true) => {
                        return Err(Error::NotFound {
                            what: Thing::TransitKey,
                            name,
                        })
                    }
                };
                let row = new_version(&vault_id, term, &term_key, &name, version)?;
                store::tables::insert_transit_key(tx, &row)?;
                Ok(version)
            })
            .await
    }

    /// The data key of `name` at `version` (`None`: the newest), opened with the keyring.
    async fn transit_key(&self, name: &str, version: Option<u32>) -> Result<(u32, Key32), Error> {
        self.with_open(|_| ()).await?;
        // A point lookup: run in place rather than on a blocking thread (see `read_now`).
        let row = self
            .store
            .read_now(|c| store::tables::get_transit_key(c, name, version))?
            .ok_or_else(|| Error::NotFound {
                what: Thing::TransitKey,
                name: match version {
                    Some(v) => format!("{name}@{v}"),
                    None => name.to_owned(),
                },
            })?;
        let key = self
            .with_open(|o| {
                let term_key = o
                    .keyring
                    .key(row.term)
                    .ok_or(crypto::CryptoError::Integrity)?;
                let aad = crypto::transit_key_aad(&o.vault_id, &row.name, row.version, row.term);
                let bytes = crypto::open(term_key, &aad, &row.sealed)?;
                Key32::from_bytes(&bytes)
            })
            .await?
            .map_err(Error::Decrypt)?;
        Ok((row.version, key))
    }

    /// `Encrypt`: `plaintext` under the newest version of `name`, bound to `associated`.
    ///
    /// # Errors
    /// `Sealed`, `NotFound`, `TooLarge`, integrity failures of stored data.
    pub async fn transit_encrypt(
        &self,
        name: TransitKeyName,
        plaintext: &SecretValue,
        associated: Option<&[u8]>,
    ) -> Result<String, Error> {
        if plaintext.expose().len() > MAX_PLAINTEXT {
            return Err(Error::TooLarge {
                parameter: Param::Value,
                limit: MAX_PLAINTEXT as u64,
            });
        }
        let (version, key) = self.transit_key(&name, None).await?;
        let aad = crypto::transit_aad(&name, version, associated.unwrap_or_default());
        let blob = crypto::seal(&key, &aad, plaintext.expose()).map_err(Error::Encrypt)?;
        Ok(format_ciphertext(version, &blob))
    }

    /// `Decrypt`: a ciphertext of [`Vault::transit_encrypt`], with the version it names.
    ///
    /// # Errors
    /// `Sealed`, `NotFound` (no such key or version), `InvalidArgument` for a
    /// ciphertext that is malformed or does not decrypt (altered, another key's, other
    /// associated data).
    pub async fn transit_decrypt(
        &self,
        name: TransitKeyName,
        ciphertext: &str,
        associated: Option<&[u8]>,
    ) -> Result<SecretValue, Error> {
        let (version, blob) = parse_ciphertext(ciphertext)?;
        let (_, key) = self.transit_key(&name, Some(version)).await?;
        let aad = crypto::transit_aad(&name, version, associated.unwrap_or_default());
        let plain = crypto::open(&key, &aad, &blob).map_err(|_| {
            invalid(
                Param::Ciphertext,
                "does not decrypt: altered, made with another key, or with other associated data",
            )
        })?;
        Ok(SecretValue::from(plain))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ciphertexts_parse_as_they_are_written() {
        let text = format_ciphertext(7, b"\x00\x01blob");
        assert!(text.starts_with("vault:v7:"), "{text}");
        assert_eq!(
            parse_ciphertext(&text).unwrap(),
            (7, b"\x00\x01blob".to_vec())
        );
        // OpenBao's seal splits on ':' and wants three parts.
        assert_eq!(text.split(':').count(), 3);
        for bad in [
            "",
            "vault:",
            "vault:v:AAAA",
            "vault:v0:AAAA",
            "vault:v+1:AAAA",
            "vault:v-1:AAAA",
            "vault:v99999999999:AAAA",
            "vault:v1",
            "vault:v1:not base64!",
            "other:v1:AAAA",
        ] {
            let e = parse_ciphertext(bad).unwrap_err();
            assert!(
                matches!(
                    e,
                    Error::InvalidArgument {
                        parameter: Param::Ciphertext,
                        ..
                    }
                ),
                "{bad}: {e}"
            );
        }
    }
}
