//! The vault's symmetric cryptography: the [`Key32`] secret-key type, XChaCha20-Poly1305
//! sealing ([`seal`] / [`open`]), and the associated-data (AAD) encodings that bind every
//! ciphertext to its place (vault, secret name, version, term), so stored records can't be
//! swapped or replayed elsewhere.
//!
//! XChaCha20-Poly1305 takes a random 192-bit nonce per message, which is safe to pick at random
//! for any number of messages we will ever write. A sealed blob is `nonce (24) || ciphertext ||
//! tag (16)`. Failures say only "integrity": which check failed is nobody's business.
//!
//! Must not: log, print or return key or plaintext bytes anywhere but through the zeroizing
//! types here.

use std::fmt;

use chacha20poly1305::aead::rand_core::RngCore as _;
use chacha20poly1305::aead::{AeadInPlace as _, KeyInit as _, OsRng};
use chacha20poly1305::{Key, XChaCha20Poly1305, XNonce};
use zeroize::{Zeroize as _, Zeroizing};

use crate::sys::LockedBytes;

/// Bytes in a key.
pub const KEY_LEN: usize = 32;
/// Bytes in a nonce.
pub const NONCE_LEN: usize = 24;
/// Bytes in a tag.
pub const TAG_LEN: usize = 16;
/// What [`seal`] adds to the plaintext's length.
pub const OVERHEAD: usize = NONCE_LEN + TAG_LEN;

/// A crypto failure. Never carries key or plaintext bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    /// The tag does not verify, or the blob is too short: wrong key, wrong AAD, or altered.
    #[error("integrity check failed: wrong key, or the data was altered")]
    Integrity,
    /// A key of the wrong length.
    #[error("a key is {KEY_LEN} bytes, not {0}")]
    KeyLength(usize),
    /// More plaintext than the cipher can take in one message (about 256 GiB).
    #[error("too much data to encrypt in one message")]
    TooLong,
    /// Authentic plaintext whose layout this build does not understand.
    #[error("malformed {0}")]
    Malformed(&'static str),
    /// No term number is left to rotate to.
    #[error("no key terms left to rotate to")]
    TermsExhausted,
}

/// A 256-bit secret key (the VMK, a data key, a recovery key).
///
/// Zeroized on drop; no `Clone`, no `Serialize`; `Debug` prints nothing of it. The bytes live
/// in locked pages of their own ([`LockedBytes`]: never swapped, never in a core dump) that
/// never move, so moving a `Key32` leaves no copy behind (an inline array would be copied, and
/// the old copy not zeroized, on every move).
pub struct Key32(LockedBytes<KEY_LEN>);

impl Key32 {
    fn zeroed() -> Self {
        Self(LockedBytes::zeroed())
    }

    /// A fresh key from the operating system's random source.
    pub fn random() -> Self {
        let mut key = Self::zeroed();
        OsRng.fill_bytes(key.0.get_mut());
        key
    }

    /// A key from exactly 32 bytes.
    ///
    /// # Errors
    /// [`CryptoError::KeyLength`] for any other length.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CryptoError> {
        if bytes.len() != KEY_LEN {
            return Err(CryptoError::KeyLength(bytes.len()));
        }
        let mut key = Self::zeroed();
        key.0.get_mut().copy_from_slice(bytes);
        Ok(key)
    }

    /// The key bytes. Callers hand them straight to a cipher, a device or a zeroizing buffer,
    /// and say why at the call site.
    pub fn expose(&self) -> &[u8; KEY_LEN] {
        self.0.get()
    }
}

impl fmt::Debug for Key32 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Key32(redacted)")
    }
}

fn cipher(key: &Key32) -> XChaCha20Poly1305 {
    // The cipher copies the key and zeroizes its copy on drop.
    let key: &Key = key.expose().into();
    XChaCha20Poly1305::new(key)
}

/// Encrypt `plaintext` under `key`, bound to `aad`, with a random nonce: returns
/// `nonce || ciphertext || tag`.
///
/// # Errors
/// [`CryptoError::TooLong`] beyond the cipher's message limit (about 256 GiB).
pub fn seal(key: &Key32, aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, CryptoError> {
    let mut nonce = XNonce::default();
    OsRng.fill_bytes(&mut nonce);
    // Room for everything up front: growing the vector would leave plaintext in freed memory.
    let mut out = Vec::with_capacity(OVERHEAD.saturating_add(plaintext.len()));
    out.extend_from_slice(&nonce);
    out.extend_from_slice(plaintext);
    match cipher(key).encrypt_in_place_detached(&nonce, aad, &mut out[NONCE_LEN..]) {
        Ok(tag) => {
            out.extend_from_slice(&tag);
            Ok(out)
        }
        Err(_) => {
            out.zeroize();
            Err(CryptoError::TooLong)
        }
    }
}

/// Decrypt a blob from [`seal`] made with the same `key` and `aad`.
///
/// # Errors
/// [`CryptoError::Integrity`] when the blob is too short, or the key, the AAD or the blob
/// differ from what was sealed.
pub fn open(key: &Key32, aad: &[u8], blob: &[u8]) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
    if blob.len() < OVERHEAD {
        return Err(CryptoError::Integrity);
    }
    let (nonce, rest) = blob.split_at(NONCE_LEN);
    let (ciphertext, tag) = rest.split_at(rest.len() - TAG_LEN);
    let nonce: &[u8; NONCE_LEN] = nonce.try_into().map_err(|_| CryptoError::Integrity)?;
    let tag: &[u8; TAG_LEN] = tag.try_into().map_err(|_| CryptoError::Integrity)?;
    let mut plaintext = Zeroizing::new(ciphertext.to_vec());
    cipher(key)
        .decrypt_in_place_detached(nonce.into(), aad, &mut plaintext, tag.into())
        .map_err(|_| CryptoError::Integrity)?;
    Ok(plaintext)
}

/// Domain strings: each AAD starts with one, so an AAD of one kind never equals another's.
const SECRET_DOMAIN: &[u8] = b"keyward/secret/v1\0";
const KEYRING_DOMAIN: &[u8] = b"keyward/keyring/v1\0";
const RECOVERY_DOMAIN: &[u8] = b"keyward/recovery/v1\0";
const TRANSIT_KEY_DOMAIN: &[u8] = b"keyward/transit-key/v1\0";
const TRANSIT_DOMAIN: &[u8] = b"keyward/transit/v1\0";

/// Append a variable-length field as `length (u64 BE) || bytes`.
fn put_var(out: &mut Vec<u8>, field: &[u8]) {
    out.extend_from_slice(&(field.len() as u64).to_be_bytes());
    out.extend_from_slice(field);
}

/// The AAD of one secret version: `domain || vault_id || len(name) || name || version || term`.
pub fn secret_aad(vault_id: &[u8; 16], name: &str, version: u64, term: u32) -> Vec<u8> {
    let mut aad = Vec::with_capacity(SECRET_DOMAIN.len() + 16 + 8 + name.len() + 8 + 4);
    aad.extend_from_slice(SECRET_DOMAIN);
    aad.extend_from_slice(vault_id);
    put_var(&mut aad, name.as_bytes());
    aad.extend_from_slice(&version.to_be_bytes());
    aad.extend_from_slice(&term.to_be_bytes());
    aad
}

/// The AAD of the sealed keyring: `domain || vault_id`.
pub fn keyring_aad(vault_id: &[u8; 16]) -> Vec<u8> {
    let mut aad = KEYRING_DOMAIN.to_vec();
    aad.extend_from_slice(vault_id);
    aad
}

/// The AAD of a recovery slot's wrapped VMK: `domain || vault_id || len(set_id) || set_id`.
pub fn recovery_aad(vault_id: &[u8; 16], set_id: &[u8]) -> Vec<u8> {
    let mut aad = RECOVERY_DOMAIN.to_vec();
    aad.extend_from_slice(vault_id);
    put_var(&mut aad, set_id);
    aad
}

/// The AAD of one sealed transit key version:
/// `domain || vault_id || len(name) || name || version || term`.
pub fn transit_key_aad(vault_id: &[u8; 16], name: &str, version: u32, term: u32) -> Vec<u8> {
    let mut aad = TRANSIT_KEY_DOMAIN.to_vec();
    aad.extend_from_slice(vault_id);
    put_var(&mut aad, name.as_bytes());
    aad.extend_from_slice(&version.to_be_bytes());
    aad.extend_from_slice(&term.to_be_bytes());
    aad
}

/// The AAD of a transit ciphertext: `domain || len(name) || name || version || len(ad) || ad`,
/// where `ad` is the caller's associated data (empty when none was given).
pub fn transit_aad(name: &str, version: u32, associated: &[u8]) -> Vec<u8> {
    let mut aad = TRANSIT_DOMAIN.to_vec();
    put_var(&mut aad, name.as_bytes());
    aad.extend_from_slice(&version.to_be_bytes());
    put_var(&mut aad, associated);
    aad
}

#[cfg(test)]
mod tests {
    use super::*;

    const VAULT: [u8; 16] = [1; 16];

    #[test]
    fn round_trip() {
        let key = Key32::random();
        let aad = secret_aad(&VAULT, "db/password", 3, 2);
        let blob = seal(&key, &aad, b"hunter2").unwrap();
        assert_eq!(blob.len(), 7 + OVERHEAD);
        assert_eq!(&*open(&key, &aad, &blob).unwrap(), b"hunter2");
        // Empty plaintext works too.
        let empty = seal(&key, &aad, b"").unwrap();
        assert!(open(&key, &aad, &empty).unwrap().is_empty());
        // Nonces are random: the same input seals differently.
        assert_ne!(seal(&key, &aad, b"hunter2").unwrap(), blob);
    }

    #[test]
    fn aad_binds_every_field() {
        let key = Key32::random();
        let aad = secret_aad(&VAULT, "db", 1, 1);
        let blob = seal(&key, &aad, b"v").unwrap();
        for other in [
            secret_aad(&[2; 16], "db", 1, 1),
            secret_aad(&VAULT, "dc", 1, 1),
            secret_aad(&VAULT, "db", 2, 1),
            secret_aad(&VAULT, "db", 1, 2),
            keyring_aad(&VAULT),
            recovery_aad(&VAULT, b"db"),
            transit_key_aad(&VAULT, "db", 1, 1),
            transit_aad("db", 1, b""),
        ] {
            assert_eq!(
                open(&key, &other, &blob).unwrap_err(),
                CryptoError::Integrity
            );
        }
        assert_eq!(
            open(&Key32::random(), &aad, &blob).unwrap_err(),
            CryptoError::Integrity
        );
    }

    #[test]
    fn aad_encodings_are_unambiguous() {
        // Moving bytes between the name and the numbers must change the AAD.
        assert_ne!(
            secret_aad(&VAULT, "a\0\0\0\0\0\0\0\x01", 1, 1),
            secret_aad(&VAULT, "a", 1, 1)
        );
        assert_ne!(recovery_aad(&VAULT, b"ab"), recovery_aad(&VAULT, b"a"));
        assert_ne!(keyring_aad(&VAULT), keyring_aad(&[2; 16]));
    }

    #[test]
    fn tampering_is_caught() {
        let key = Key32::random();
        let blob = seal(&key, b"aad", b"some plaintext").unwrap();
        for i in 0..blob.len() {
            let mut bad = blob.clone();
            bad[i] ^= 0x01;
            assert_eq!(
                open(&key, b"aad", &bad).unwrap_err(),
                CryptoError::Integrity
            );
        }
        assert_eq!(
            open(&key, b"aad", &blob[..blob.len() - 1]).unwrap_err(),
            CryptoError::Integrity
        );
        assert_eq!(
            open(&key, b"aad", &blob[..OVERHEAD - 1]).unwrap_err(),
            CryptoError::Integrity
        );
        assert_eq!(open(&key, b"aad", b"").unwrap_err(), CryptoError::Integrity);
    }

    #[test]
    fn keys() {
        assert_eq!(
            Key32::from_bytes(&[0; 31]).unwrap_err(),
            CryptoError::KeyLength(31)
        );
        let k = Key32::from_bytes(&[0xab; 32]).unwrap();
        assert_eq!(k.expose(), &[0xab; 32]);
        assert_eq!(format!("{k:?}"), "Key32(redacted)");
        assert_ne!(Key32::random().expose(), Key32::random().expose());
    }
}
