//! The keyring: the data keys that encrypt secrets, one per term, sealed as a whole under the
//! VMK.
//!
//! New secret versions are encrypted under the current term's key; a rotation adds a term and
//! makes it current, and old terms stay so that older versions still decrypt. A rekey (new VMK)
//! only re-seals this small keyring, whatever the number of secrets. The keyring's AEAD tag is
//! also the vault's check value: a VMK that opens it is the right one.
//!
//! Sealed layout (inside the AEAD, version 1): `0x01 || current term (u32 BE) || count (u32 BE)
//! || count × (term (u32 BE) || key (32 bytes))`, terms strictly increasing. Hand-written and
//! versioned rather than a serializer's format, so it never changes under us.
//!
//! Must not: print a key (`Debug` shows only term numbers), or keep a key outside [`Key32`].

use std::collections::BTreeMap;
use std::fmt;

use zeroize::Zeroizing;

use super::crypto::{self, CryptoError, Key32, KEY_LEN};

/// The layout version written by [`Keyring::seal`].
const LAYOUT_V1: u8 = 1;
/// Version, current term, count.
const HEADER_LEN: usize = 1 + 4 + 4;
/// Term, key.
const RECORD_LEN: usize = 4 + KEY_LEN;

/// Data keys by term. No `Clone`; `Debug` shows term numbers only.
///
/// The current key is kept apart from the older ones, so "the current term has a key" holds by
/// construction; every older term is smaller than the current one.
pub struct Keyring {
    current: u32,
    current_key: Key32,
    older: BTreeMap<u32, Key32>,
}

impl Keyring {
    /// A keyring with one term (1) and a fresh random key.
    #[allow(clippy::new_without_default)] // `default()` shouldn't quietly create key material
    pub fn new() -> Self {
        Self {
            current: 1,
            current_key: Key32::random(),
            older: BTreeMap::new(),
        }
    }

    /// The term new secret versions are encrypted under.
    pub fn current_term(&self) -> u32 {
        self.current
    }

    /// The current term and its key.
    pub fn current_key(&self) -> (u32, &Key32) {
        (self.current, &self.current_key)
    }

    /// The key of `term`, if the keyring has it.
    pub fn key(&self, term: u32) -> Option<&Key32> {
        if term == self.current {
            Some(&self.current_key)
        } else {
            self.older.get(&term)
        }
    }

    /// Every term, oldest first.
    pub fn terms(&self) -> impl Iterator<Item = u32> + '_ {
        self.older
            .keys()
            .copied()
            .chain(std::iter::once(self.current))
    }

    /// How many terms the keyring holds.
    pub fn term_count(&self) -> usize {
        self.older.len() + 1
    }

    /// Add a term with a fresh key and make it current; returns the new term. Old terms stay.
    ///
    /// # Errors
    /// [`CryptoError::TermsExhausted`] after 2³² − 1 terms (not in this universe's lifetime).
    pub fn rotate(&mut self) -> Result<u32, CryptoError> {
        let next = self
            .current
            .checked_add(1)
            .ok_or(CryptoError::TermsExhausted)?;
        let previous = std::mem::replace(&mut self.current_key, Key32::random());
        self.older.insert(self.current, previous);
        self.current = next;
        Ok(next)
    }

    /// Serialize and seal the keyring under `vmk`, bound to `vault_id`.
    ///
    /// # Errors
    /// [`CryptoError::TooLong`] (not reachable with any realistic number of terms).
    pub fn seal(&self, vmk: &Key32, vault_id: &[u8; 16]) -> Result<Vec<u8>, CryptoError> {
        let count = u32::try_from(self.term_count()).map_err(|_| CryptoError::TooLong)?;
        let len = HEADER_LEN.saturating_add(RECORD_LEN.saturating_mul(self.term_count()));
        // Sized up front, so the buffer never reallocates and leaves key bytes behind.
        let mut plain = Zeroizing::new(Vec::with_capacity(len));
        plain.push(LAYOUT_V1);
        plain.extend_from_slice(&self.current.to_be_bytes());
        plain.extend_from_slice(&count.to_be_bytes());
        let current = std::iter::once((&self.current, &self.current_key));
        for (term, key) in self.older.iter().chain(current) {
            plain.extend_from_slice(&term.to_be_bytes());
            plain.extend_from_slice(key.expose());
        }
        crypto::seal(vmk, &crypto::keyring_aad(vault_id), &plain)
    }

    /// Open a keyring sealed by [`Keyring::seal`].
    ///
    /// # Errors
    /// [`CryptoError::Integrity`] when `vmk` is not the key it was sealed under (or the blob or
    /// vault id differ); [`CryptoError::Malformed`] for authentic content this build can't read.
    pub fn open(vmk: &Key32, vault_id: &[u8; 16], blob: &[u8]) -> Result<Keyring, CryptoError> {
        let plain = crypto::open(vmk, &crypto::keyring_aad(vault_id), blob)?;
        let (header, mut records) = plain
            .split_at_checked(HEADER_LEN)
            .ok_or(CryptoError::Malformed("keyring: too short"))?;
        if header[0] != LAYOUT_V1 {
            return Err(CryptoError::Malformed("keyring: unknown layout version"));
        }
        let current = be_u32(&header[1..5]);
        let count = usize::try_from(be_u32(&header[5..9]))
            .map_err(|_| CryptoError::Malformed("keyring: too many terms"))?;
        if count == 0 || Some(records.len()) != count.checked_mul(RECORD_LEN) {
            return Err(CryptoError::Malformed("keyring: wrong length"));
        }
        let mut older = BTreeMap::new();
        let mut current_key = None;
        let mut last = 0;
        while let Some((record, rest)) = records.split_at_checked(RECORD_LEN) {
            records = rest;
            let term = be_u32(&record[..4]);
            if term <= last {
                return Err(CryptoError::Malformed("keyring: terms out of order"));
            }
            last = term;
            let key = Key32::from_bytes(&record[4..])?;
            if term == current {
                current_key = Some(key);
            } else {
                older.insert(term, key);
            }
        }
        let Some(current_key) = current_key else {
            return Err(CryptoError::Malformed(
                "keyring: no key for the current term",
            ));
        };
        if last != current {
            return Err(CryptoError::Malformed(
                "keyring: a term newer than the current one",
            ));
        }
        Ok(Keyring {
            current,
            current_key,
            older,
        })
    }
}

fn be_u32(bytes: &[u8]) -> u32 {
    let mut b = [0; 4];
    b.copy_from_slice(&bytes[..4]);
    u32::from_be_bytes(b)
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring")
            .field("current", &self.current)
            .field("terms", &self.terms().collect::<Vec<_>>())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VAULT: [u8; 16] = [3; 16];

    #[test]
    fn new_rotate_seal_open() {
        let vmk = Key32::random();
        let mut ring = Keyring::new();
        assert_eq!(ring.current_term(), 1);
        let first = *ring.key(1).unwrap().expose();
        assert_eq!(ring.rotate().unwrap(), 2);
        assert_eq!(ring.rotate().unwrap(), 3);
        let (term, key) = ring.current_key();
        assert_eq!(term, 3);
        let third = *key.expose();
        assert_ne!(first, third);

        let blob = ring.seal(&vmk, &VAULT).unwrap();
        assert_eq!(blob.len(), crypto::OVERHEAD + HEADER_LEN + 3 * RECORD_LEN);
        let back = Keyring::open(&vmk, &VAULT, &blob).unwrap();
        assert_eq!(back.current_term(), 3);
        assert_eq!(back.terms().collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(back.key(1).unwrap().expose(), &first);
        assert_eq!(back.current_key().1.expose(), &third);
        assert!(back.key(4).is_none());
    }

    #[test]
    fn wrong_vmk_or_vault_is_integrity() {
        let vmk = Key32::random();
        let blob = Keyring::new().seal(&vmk, &VAULT).unwrap();
        assert_eq!(
            Keyring::open(&Key32::random(), &VAULT, &blob).unwrap_err(),
            CryptoError::Integrity
        );
        assert_eq!(
            Keyring::open(&vmk, &[4; 16], &blob).unwrap_err(),
            CryptoError::Integrity
        );
        let mut bad = blob.clone();
        bad[30] ^= 1;
        assert_eq!(
            Keyring::open(&vmk, &VAULT, &bad).unwrap_err(),
            CryptoError::Integrity
        );
    }

    #[test]
    fn malformed_content_is_refused() {
        let vmk = Key32::random();
        let seal = |plain: &[u8]| crypto::seal(&vmk, &crypto::keyring_aad(&VAULT), plain).unwrap();
        let record = |term: u32| {
            let mut r = term.to_be_bytes().to_vec();
            r.extend_from_slice(&[9; 32]);
            r
        };
        let build = |version: u8, current: u32, terms: &[u32]| {
            let mut p = vec![version];
            p.extend_from_slice(&current.to_be_bytes());
            p.extend_from_slice(&(terms.len() as u32).to_be_bytes());
            for t in terms {
                p.extend(record(*t));
            }
            p
        };
        assert!(Keyring::open(&vmk, &VAULT, &seal(&build(1, 2, &[1, 2]))).is_ok());
        for bad in [
            vec![],
            build(2, 1, &[1]),
            build(1, 3, &[1, 2]),
            build(1, 1, &[]),
            build(1, 2, &[2, 1]),
            build(1, 1, &[1, 1]),
            build(1, 1, &[1, 2]),
            {
                let mut p = build(1, 1, &[1]);
                p.pop();
                p
            },
        ] {
            assert!(
                matches!(
                    Keyring::open(&vmk, &VAULT, &seal(&bad)),
                    Err(CryptoError::Malformed(_))
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn debug_shows_terms_not_keys() {
        let mut ring = Keyring::new();
        ring.rotate().unwrap();
        let shown = format!("{ring:?}");
        assert_eq!(shown, "Keyring { current: 2, terms: [1, 2] }");
    }
}
