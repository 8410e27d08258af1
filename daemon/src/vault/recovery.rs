//! Recovery keyslots: a random recovery key wraps the VMK, and is split with Shamir's scheme
//! (over GF(256), via `blahaj`) into `n` shares printed once, any `k` of which open the vault.
//! The store keeps only the wrapped VMK and the set's metadata ([`RecoverySlotData`]); Keyward
//! keeps no share.
//!
//! A share's text (`KW2-<set id>-<k>-<index>-…`, its check group, how typed input is read) is
//! the contract crate's [`keyward_proto::recovery_share`], so that the CLI checks a share with
//! the very parser the daemon uses. This module deals the shares and combines them; a share
//! that does not read is a [`RecoveryError::Share`], which says what `recovery_share` says.
//!
//! Limits: `1 ≤ k ≤ n ≤ 16`. `k = 1` is allowed and means each share alone opens the vault
//! (useful for one share in a safe); the admin chooses.
//!
//! Must not: echo share text or bytes in an error, a log or `Debug`.

use std::collections::HashSet;
use std::fmt;

use base64::engine::general_purpose::STANDARD as B64;
use blahaj::Sharks;
use chacha20poly1305::aead::rand_core::RngCore as _;
use chacha20poly1305::aead::OsRng;
use keyward_proto::recovery_share::{self, Share, ShareError, DATA_LEN, MAX_SHARES};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::crypto::{self, CryptoError, Key32, KEY_LEN};

// A share carries the recovery key, a key of the vault's size.
const _: () = assert!(DATA_LEN == KEY_LEN);

/// A recovery share set's public description.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecoverySet {
    /// Random id, printed on every share of the set (hex in JSON).
    #[serde(with = "hex4")]
    pub set_id: [u8; 4],
    /// Shares needed (`k`).
    pub threshold: u8,
    /// Shares made (`n`).
    pub shares: u8,
}

impl RecoverySet {
    /// The set id as printed on its shares (8 uppercase hex digits).
    pub fn id_text(&self) -> String {
        recovery_share::set_id_text(&self.set_id)
    }
}

/// What a recovery keyslot stores: the set and the VMK wrapped under the recovery key.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecoverySlotData {
    pub set: RecoverySet,
    /// `crypto::seal(recovery key, recovery_aad(vault, set id), VMK)` (base64 in JSON).
    #[serde(with = "b64")]
    pub wrapped_vmk: Vec<u8>,
}

impl fmt::Debug for RecoverySlotData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RecoverySlotData")
            .field("set", &self.set)
            .field(
                "wrapped_vmk",
                &format_args!("<{} bytes>", self.wrapped_vmk.len()),
            )
            .finish()
    }
}

/// The keyslot blob: [`RecoverySlotData`] with a format version.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SlotBlob {
    v: u8,
    set: RecoverySet,
    #[serde(with = "b64")]
    wrapped_vmk: Vec<u8>,
}

impl RecoverySlotData {
    /// The bytes to keep in the keyslot's `blob` (versioned JSON).
    ///
    /// # Errors
    /// [`RecoveryError::BadSlot`] if serialization fails (it does not, for these types).
    pub fn to_blob(&self) -> Result<Vec<u8>, RecoveryError> {
        serde_json::to_vec(&SlotBlob {
            v: 1,
            set: self.set.clone(),
            wrapped_vmk: self.wrapped_vmk.clone(),
        })
        .map_err(|e| RecoveryError::BadSlot(json_error_kind(&e).into()))
    }

    /// Read a keyslot `blob` written by [`RecoverySlotData::to_blob`].
    ///
    /// # Errors
    /// [`RecoveryError::BadSlot`] when it does not decode, has an unknown version, or
    /// impossible limits.
    pub fn from_blob(blob: &[u8]) -> Result<Self, RecoveryError> {
        let parsed: SlotBlob = serde_json::from_slice(blob).map_err(|e| {
            RecoveryError::BadSlot(format!("does not decode ({})", json_error_kind(&e)))
        })?;
        if parsed.v != 1 {
            return Err(RecoveryError::BadSlot(format!(
                "unknown format version {}",
                parsed.v
            )));
        }
        check_limits(parsed.set.threshold, parsed.set.shares)
            .map_err(|_| RecoveryError::BadSlot("threshold or share count out of range".into()))?;
        Ok(RecoverySlotData {
            set: parsed.set,
            wrapped_vmk: parsed.wrapped_vmk,
        })
    }
}

/// A `serde_json::Error`'s category: unlike its message, it never quotes the input.
fn json_error_kind(e: &serde_json::Error) -> &'static str {
    use serde_json::error::Category;
    match e.classify() {
        Category::Io => "I/O error",
        Category::Syntax => "not JSON",
        Category::Data => "unexpected fields or values",
        Category::Eof => "truncated",
    }
}

/// A recovery failure. Never quotes a share.
#[derive(Debug, thiserror::Error)]
pub enum RecoveryError {
    /// Threshold and share count out of range.
    #[error(
        "a recovery slot needs 1 <= threshold <= shares <= {MAX_SHARES}, not {threshold} of {shares}"
    )]
    InvalidParameters { threshold: u8, shares: u8 },
    /// A share's text does not read (a typo, not a share, another format).
    #[error(transparent)]
    Share(#[from] ShareError),
    /// The share belongs to a different recovery set (or claims an impossible index).
    #[error("this share belongs to a different recovery set")]
    WrongSet,
    /// Two shares with the same index.
    #[error("share number {index} was given twice")]
    DuplicateShare { index: u8 },
    /// Fewer shares than the threshold.
    #[error("not enough shares: {have} of the {need} needed")]
    NotEnoughShares { have: u8, need: u8 },
    /// The shares combine to a key that does not open the slot (e.g. a forged share).
    #[error("these shares do not open the vault: one of them is altered or from another set")]
    Integrity,
    /// The stored slot data does not decode.
    #[error("recovery slot data: {0}")]
    BadSlot(String),
    /// Sealing the VMK failed.
    #[error(transparent)]
    Crypto(#[from] CryptoError),
}

fn check_limits(threshold: u8, shares: u8) -> Result<(), RecoveryError> {
    if threshold < 1 || threshold > shares || shares > MAX_SHARES {
        return Err(RecoveryError::InvalidParameters { threshold, shares });
    }
    Ok(())
}

/// Make a recovery slot for `vmk`: a fresh recovery key wraps it, and is split into `shares`
/// shares of which `threshold` open it. Returns the slot data to store and the share texts to
/// show once. Before returning, the shares are parsed back and tried.
///
/// # Errors
/// [`RecoveryError::InvalidParameters`] unless `1 <= threshold <= shares <= 16`;
/// [`RecoveryError::Integrity`] or [`RecoveryError::Share`] if the shares fail their own test
/// (a bug, never expected).
pub fn enroll(
    vmk: &Key32,
    vault_id: &[u8; 16],
    threshold: u8,
    shares: u8,
) -> Result<(RecoverySlotData, Vec<Zeroizing<String>>), RecoveryError> {
    check_limits(threshold, shares)?;
    let mut set_id = [0u8; 4];
    OsRng.fill_bytes(&mut set_id);
    let set = RecoverySet {
        set_id,
        threshold,
        shares,
    };
    let recovery_key = Key32::random();
    let wrapped_vmk = crypto::seal(
        &recovery_key,
        &crypto::recovery_aad(vault_id, &set_id),
        vmk.expose(),
    )?;
    let texts: Vec<Zeroizing<String>> = Sharks(threshold)
        .dealer(recovery_key.expose())
        .take(usize::from(shares))
        .map(|share| {
            let bytes = Zeroizing::new(Vec::from(&share));
            let (index, data) = bytes.split_first().ok_or(RecoveryError::Integrity)?;
            let data: &[u8; DATA_LEN] = data.try_into().map_err(|_| RecoveryError::Integrity)?;
            Ok(recovery_share::render(&set_id, threshold, *index, data))
        })
        .collect::<Result<_, RecoveryError>>()?;
    let slot = RecoverySlotData { set, wrapped_vmk };

    // Self-test: every share reads back, and the first and the last `threshold` of them open
    // the slot to this very VMK.
    let parsed = texts
        .iter()
        .map(|t| recovery_share::parse(t))
        .collect::<Result<Vec<_>, _>>()?;
    let k = usize::from(threshold);
    for group in [&parsed[..k], &parsed[parsed.len() - k..]] {
        let back = unwrap_vmk(&slot, vault_id, group)?;
        if back.expose() != vmk.expose() {
            return Err(RecoveryError::Integrity);
        }
    }
    Ok((slot, texts))
}

/// Open a recovery slot with shares: at least `threshold` distinct shares of this set. The first
/// `threshold` shares are combined.
///
/// # Errors
/// [`RecoveryError::WrongSet`] for a share of another set; [`RecoveryError::DuplicateShare`];
/// [`RecoveryError::NotEnoughShares`]; [`RecoveryError::Integrity`] when the shares combine to
/// a key that does not open the slot.
pub fn unwrap_vmk(
    data: &RecoverySlotData,
    vault_id: &[u8; 16],
    shares: &[Share],
) -> Result<Key32, RecoveryError> {
    let set = &data.set;
    let mut seen = HashSet::new();
    for share in shares {
        if share.set_id != set.set_id
            || share.threshold != set.threshold
            || share.index == 0
            || share.index > set.shares
        {
            return Err(RecoveryError::WrongSet);
        }
        if !seen.insert(share.index) {
            return Err(RecoveryError::DuplicateShare { index: share.index });
        }
    }
    let need = usize::from(set.threshold);
    if shares.len() < need || need == 0 {
        return Err(RecoveryError::NotEnoughShares {
            have: u8::try_from(shares.len()).unwrap_or(u8::MAX),
            need: set.threshold,
        });
    }
    let points = shares[..need]
        .iter()
        .map(|s| {
            let mut bytes = Zeroizing::new(Vec::with_capacity(1 + DATA_LEN));
            bytes.push(s.index);
            bytes.extend_from_slice(s.expose_data());
            blahaj::Share::try_from(&bytes[..]).map_err(|_| RecoveryError::Integrity)
        })
        .collect::<Result<Vec<blahaj::Share>, _>>()?;
    let secret = Zeroizing::new(
        Sharks(set.threshold)
            .recover(&points)
            .map_err(|_| RecoveryError::Integrity)?,
    );
    let recovery_key = Key32::from_bytes(&secret).map_err(|_| RecoveryError::Integrity)?;
    let vmk = crypto::open(
        &recovery_key,
        &crypto::recovery_aad(vault_id, &set.set_id),
        &data.wrapped_vmk,
    )
    .map_err(|_| RecoveryError::Integrity)?;
    Key32::from_bytes(&vmk).map_err(|_| RecoveryError::Integrity)
}

/// `[u8; 4]` as 8 hex digits in JSON.
mod hex4 {
    use serde::{Deserialize as _, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(id: &[u8; 4], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&keyward_proto::recovery_share::set_id_text(id))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 4], D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        keyward_proto::recovery_share::parse_set_id(&text)
            .ok_or_else(|| serde::de::Error::custom("expected 8 hex digits"))
    }
}

/// Bytes as base64 in JSON.
mod b64 {
    use base64::Engine as _;
    use serde::{Deserialize as _, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::B64.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        super::B64
            .decode(text.as_bytes())
            .map_err(|_| serde::de::Error::custom("expected base64"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use recovery_share::parse;

    const VAULT: [u8; 16] = [5; 16];

    fn parse_all(texts: &[Zeroizing<String>]) -> Vec<Share> {
        texts.iter().map(|t| parse(t).unwrap()).collect()
    }

    #[test]
    fn two_of_three() {
        let vmk = Key32::random();
        let (slot, texts) = enroll(&vmk, &VAULT, 2, 3).unwrap();
        assert_eq!(texts.len(), 3);
        assert_eq!((slot.set.threshold, slot.set.shares), (2, 3));
        for pair in [[0, 1], [0, 2], [1, 2], [2, 0]] {
            let shares: Vec<_> = pair.iter().map(|&i| parse(&texts[i]).unwrap()).collect();
            assert_eq!(
                unwrap_vmk(&slot, &VAULT, &shares).unwrap().expose(),
                vmk.expose()
            );
        }
        // More than enough is fine too.
        assert_eq!(
            unwrap_vmk(&slot, &VAULT, &parse_all(&texts))
                .unwrap()
                .expose(),
            vmk.expose()
        );
        let one = [parse(&texts[1]).unwrap()];
        assert!(matches!(
            unwrap_vmk(&slot, &VAULT, &one),
            Err(RecoveryError::NotEnoughShares { have: 1, need: 2 })
        ));
        assert!(matches!(
            unwrap_vmk(&slot, &VAULT, &[]),
            Err(RecoveryError::NotEnoughShares { have: 0, need: 2 })
        ));
        // The wrapped VMK is bound to the vault.
        let shares = parse_all(&texts);
        assert!(matches!(
            unwrap_vmk(&slot, &[6; 16], &shares),
            Err(RecoveryError::Integrity)
        ));
    }

    /// Enrollment prints shares numbered 1 to n of its set, in the shared text format.
    #[test]
    fn enrolled_shares_are_numbered_in_their_set() {
        let (slot, texts) = enroll(&Key32::random(), &VAULT, 3, 5).unwrap();
        for (i, text) in texts.iter().enumerate() {
            let prefix = format!("KW2-{}-3-{}-", slot.set.id_text(), i + 1);
            assert!(text.starts_with(&prefix), "{}", text.as_str());
            let share = parse(text).unwrap();
            assert_eq!(
                (share.set_id, share.threshold, usize::from(share.index)),
                (slot.set.set_id, 3, i + 1)
            );
            assert_eq!(*share.to_text(), **text);
        }
    }

    #[test]
    fn k_equals_n_equals_one() {
        let vmk = Key32::random();
        let (slot, texts) = enroll(&vmk, &VAULT, 1, 1).unwrap();
        assert_eq!(
            unwrap_vmk(&slot, &VAULT, &parse_all(&texts))
                .unwrap()
                .expose(),
            vmk.expose()
        );
        // k = 1 of 3: each share alone opens.
        let (slot, texts) = enroll(&vmk, &VAULT, 1, 3).unwrap();
        for t in &texts {
            let one = [parse(t).unwrap()];
            assert_eq!(
                unwrap_vmk(&slot, &VAULT, &one).unwrap().expose(),
                vmk.expose()
            );
        }
    }

    #[test]
    fn limits() {
        let vmk = Key32::random();
        for (k, n) in [(0, 3), (4, 3), (2, 17), (17, 17), (0, 0)] {
            assert!(
                matches!(
                    enroll(&vmk, &VAULT, k, n),
                    Err(RecoveryError::InvalidParameters { .. })
                ),
                "{k} of {n}"
            );
        }
        assert!(enroll(&vmk, &VAULT, 16, 16).is_ok());
    }

    /// A share's text error reads as the text format says it, as it did when the format
    /// lived here (callers send this text to clients).
    #[test]
    fn a_share_that_does_not_read_says_what_the_format_says() {
        let (_, texts) = enroll(&Key32::random(), &VAULT, 2, 3).unwrap();
        let mut typo = texts[0].to_string();
        let last = typo.pop().unwrap();
        typo.push(if last == 'A' { 'B' } else { 'A' });
        let e = RecoveryError::from(parse(&typo).unwrap_err());
        assert!(matches!(e, RecoveryError::Share(ShareError::BadChecksum)));
        assert_eq!(
            e.to_string(),
            "share has a typo: its checksum does not match"
        );
        assert_eq!(
            RecoveryError::from(ShareError::BadFormat("the share is empty".into())).to_string(),
            "not a recovery share: the share is empty"
        );
    }

    #[test]
    fn shares_of_another_set_are_refused() {
        let vmk = Key32::random();
        let (slot_a, texts_a) = enroll(&vmk, &VAULT, 2, 3).unwrap();
        let (_, texts_b) = enroll(&vmk, &VAULT, 2, 3).unwrap();
        let mixed = [parse(&texts_a[0]).unwrap(), parse(&texts_b[1]).unwrap()];
        assert!(matches!(
            unwrap_vmk(&slot_a, &VAULT, &mixed),
            Err(RecoveryError::WrongSet)
        ));
        let dup = [parse(&texts_a[0]).unwrap(), parse(&texts_a[0]).unwrap()];
        assert!(matches!(
            unwrap_vmk(&slot_a, &VAULT, &dup),
            Err(RecoveryError::DuplicateShare { index: 1 })
        ));
        // A share claiming an index beyond the set's size.
        let b = parse(&texts_b[0]).unwrap();
        let beyond = parse(&recovery_share::render(
            &slot_a.set.set_id,
            2,
            4,
            b.expose_data(),
        ))
        .unwrap();
        assert!(matches!(
            unwrap_vmk(&slot_a, &VAULT, &[beyond]),
            Err(RecoveryError::WrongSet)
        ));
    }

    #[test]
    fn a_forged_share_with_a_valid_checksum_fails_integrity() {
        let vmk = Key32::random();
        let (slot_a, texts_a) = enroll(&vmk, &VAULT, 2, 3).unwrap();
        let (_, texts_b) = enroll(&vmk, &VAULT, 2, 3).unwrap();
        // Share 2 of set B, relabelled as set A, with a correct checksum.
        let b2 = parse(&texts_b[1]).unwrap();
        let forged = recovery_share::render(&slot_a.set.set_id, 2, 2, b2.expose_data());
        let shares = [parse(&texts_a[0]).unwrap(), parse(&forged).unwrap()];
        assert!(matches!(
            unwrap_vmk(&slot_a, &VAULT, &shares),
            Err(RecoveryError::Integrity)
        ));
    }

    #[test]
    fn slot_blob_round_trip() {
        let (slot, _) = enroll(&Key32::random(), &VAULT, 2, 3).unwrap();
        let blob = slot.to_blob().unwrap();
        let text = String::from_utf8(blob.clone()).unwrap();
        assert!(
            text.contains(&format!("\"set_id\":\"{}\"", slot.set.id_text())),
            "{text}"
        );
        assert!(text.contains("\"v\":1"), "{text}");
        assert_eq!(RecoverySlotData::from_blob(&blob).unwrap(), slot);
        assert!(RecoverySlotData::from_blob(b"{}").is_err());
        let v2 = text.replace("\"v\":1", "\"v\":2");
        assert!(matches!(
            RecoverySlotData::from_blob(v2.as_bytes()),
            Err(RecoveryError::BadSlot(_))
        ));
        let bad_k = text.replace("\"threshold\":2", "\"threshold\":0");
        assert!(RecoverySlotData::from_blob(bad_k.as_bytes()).is_err());
        // A set id is read in either case, and must be 8 hex digits.
        let id = slot.set.id_text();
        let lower = text.replace(&id, &id.to_lowercase());
        assert_eq!(RecoverySlotData::from_blob(lower.as_bytes()).unwrap(), slot);
        let short = text.replace(&id, &id[1..]);
        assert!(RecoverySlotData::from_blob(short.as_bytes()).is_err());
    }

    #[test]
    fn debug_never_shows_share_data() {
        let vmk = Key32::random();
        let (slot, texts) = enroll(&vmk, &VAULT, 2, 3).unwrap();
        let share = parse(&texts[0]).unwrap();
        let shown = format!("{share:?} {slot:?}");
        assert!(shown.contains("redacted"), "{shown}");
        let data_part = &texts[0]["KW2-XXXXXXXX-2-1-".len()..];
        for group in data_part.split('-') {
            assert!(!shown.contains(group), "{shown}");
        }
        let hex_data = keyward_proto::text::hex(share.expose_data());
        assert!(!shown.contains(&hex_data[..8]));
        assert!(!shown.contains(&format!("{:?}", &share.expose_data()[..4])));
        let wrapped = keyward_proto::text::hex(&slot.wrapped_vmk);
        assert!(!shown.contains(&wrapped[..8]));
    }
}

/// Generated sets: any `threshold` of the shares open, and slot blobs store and load.
#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        // Each case enrolls (two test unwraps) and unwraps once: a few cases cover it.
        #![proptest_config(ProptestConfig::with_cases(16))]

        #[test]
        fn slot_blobs_round_trip_and_arbitrary_blobs_never_panic(
            set_id in any::<[u8; 4]>(),
            (threshold, shares) in (1..=MAX_SHARES).prop_flat_map(|n| (1..=n, Just(n))),
            wrapped in proptest::collection::vec(any::<u8>(), 0..80),
            junk in proptest::collection::vec(any::<u8>(), 0..200),
        ) {
            let set = RecoverySet { set_id, threshold, shares };
            let slot = RecoverySlotData { set, wrapped_vmk: wrapped };
            let blob = slot.to_blob().map_err(|e| TestCaseError::fail(e.to_string()))?;
            let back = RecoverySlotData::from_blob(&blob).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(back, slot);
            let _ = RecoverySlotData::from_blob(&junk);
        }

        /// Any `threshold` distinct shares of a set, in any order, open the slot to the VMK.
        #[test]
        fn any_threshold_of_the_shares_opens(
            (threshold, shares) in (1..=MAX_SHARES).prop_flat_map(|n| (1..=n, Just(n))),
            order in Just(()).prop_perturb(|(), mut rng| {
                let mut keys: Vec<u64> = (0..MAX_SHARES).map(|_| rng.next_u64()).collect();
                let mut order: Vec<usize> = (0..usize::from(MAX_SHARES)).collect();
                order.sort_by_key(|&i| std::mem::take(&mut keys[i]));
                order
            }),
        ) {
            let vault = [9u8; 16];
            let vmk = Key32::random();
            let (slot, texts) = enroll(&vmk, &vault, threshold, shares)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            let picked: Vec<Share> = order
                .into_iter()
                .filter(|&i| i < texts.len())
                .take(usize::from(threshold))
                .map(|i| recovery_share::parse(&texts[i]))
                .collect::<Result<_, _>>()
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            let opened = unwrap_vmk(&slot, &vault, &picked)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(opened.expose(), vmk.expose());
        }
    }
}
