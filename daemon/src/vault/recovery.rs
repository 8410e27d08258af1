//! Recovery keyslots: a random recovery key wraps the VMK, and is split with Shamir's scheme
//! (over GF(256), via `blahaj`) into `n` shares printed once, any `k` of which open the vault.
//! The store keeps only the wrapped VMK and the set's metadata ([`RecoverySlotData`]); Keyward
//! keeps no share.
//!
//! A share is text meant to be typed back or read aloud:
//!
//! ```text
//! KW2-<set id: 8 hex>-<k>-<index>-XXXX-XXXX-…-XXXX-CCCC
//! ```
//!
//! The 32 data bytes are 52 characters of Crockford base32 (`0-9 A-Z` without `I L O U`), in
//! groups of four, followed by a four-character group that checks everything before it (the
//! version, the set id's hex digits, `k`, the index and the data characters): four check
//! symbols of a cyclic code over GF(32) whose generator has the roots α, α², α³, α⁴ (as in a
//! Reed-Solomon code). So a typo is caught before the share is used
//! ([`RecoveryError::BadChecksum`]), with guarantees rather than odds: any one wrong character,
//! any two transposed, and any run of up to four wrong characters in a row are always caught;
//! other errors slip through once in 2²⁰. (A truncated hash, the first design, lets about one
//! single-character typo in a million through; a generated test found one.) Input is read
//! forgivingly: any case, spaces or dashes anywhere between data characters, and `I`/`L` read as
//! `1`, `O` as `0`.
//!
//! `KW1-` shares came from development builds whose check was a truncated hash; they are
//! refused by name ([`RecoveryError::RetiredVersion`]), never misread as a typo.
//!
//! Limits: `1 ≤ k ≤ n ≤ 16`. `k = 1` is allowed and means each share alone opens the vault
//! (useful for one share in a safe); the admin chooses.
//!
//! Must not: echo share text or bytes in an error, a log or `Debug`.

use std::collections::HashSet;
use std::fmt;

use base64::engine::general_purpose::STANDARD as B64;
use blahaj::{Share, Sharks};
use chacha20poly1305::aead::rand_core::RngCore as _;
use chacha20poly1305::aead::OsRng;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::crypto::{self, CryptoError, Key32, KEY_LEN};

/// Most shares in one set.
pub const MAX_SHARES: u8 = 16;
/// The share format this build writes and reads.
const VERSION: &str = "2";
/// Data characters in a share: 32 bytes of base32.
const DATA_CHARS: usize = (KEY_LEN * 8).div_ceil(5);
/// Check characters (20 bits).
const CHECK_CHARS: usize = 4;
/// Characters per group when printed.
const GROUP: usize = 4;
/// Crockford's base32 alphabet.
const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
/// The check code's generator, `(x − α)(x − α²)(x − α³)(x − α⁴)` over GF(32) = GF(2)[α]/(α⁵ +
/// α² + 1): its coefficients of `x⁰` to `x³` (that of `x⁴` is 1).
const GENERATOR: [u8; CHECK_CHARS] = [17, 9, 6, 30];
/// The version as the first check symbol: a share of another format never checks out.
const VERSION_SYMBOL: u8 = 2;

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
        hex_upper(&self.set_id)
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
    /// The text is not shaped like a share; says what is wrong, never what was typed.
    #[error("not a recovery share: {0}")]
    BadFormat(String),
    /// A typo: the share is well formed but its check group does not match.
    #[error("share has a typo: its checksum does not match")]
    BadChecksum,
    /// A share in a format newer than this build reads.
    #[error("unsupported recovery share format: this keywardd reads KW2 shares")]
    UnsupportedVersion,
    /// A `KW1-` share: a development format whose check missed typos.
    #[error("this is a KW1 share, a development-build format that is no longer read: open the vault with another keyslot and enroll new recovery shares")]
    RetiredVersion,
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

/// A share read from text: which set and index it claims, and its data (secret).
pub struct ParsedShare {
    pub set_id: [u8; 4],
    pub threshold: u8,
    pub index: u8,
    data: Zeroizing<Vec<u8>>,
}

impl fmt::Debug for ParsedShare {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ParsedShare")
            .field("set_id", &hex_upper(&self.set_id))
            .field("threshold", &self.threshold)
            .field("index", &self.index)
            .field("data", &format_args!("redacted"))
            .finish()
    }
}

impl ParsedShare {
    /// The set id as printed on the share (8 uppercase hex digits).
    pub fn set_id_text(&self) -> String {
        hex_upper(&self.set_id)
    }

    /// The share's canonical text, as enrollment prints it (upper case, groups of four). Text
    /// that parses reads back from this to the same share; the fuzz targets check that.
    pub fn to_text(&self) -> Zeroizing<String> {
        let set = RecoverySet {
            set_id: self.set_id,
            threshold: self.threshold,
            shares: MAX_SHARES,
        };
        render(&set, self.index, &self.data)
    }
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
/// [`RecoveryError::Integrity`] if the shares fail their own test (a bug, never expected).
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
            match bytes.split_first() {
                Some((index, data)) => Ok(render(&set, *index, data)),
                None => Err(RecoveryError::Integrity),
            }
        })
        .collect::<Result<_, _>>()?;
    let slot = RecoverySlotData { set, wrapped_vmk };

    // Self-test: every share reads back, and the first and the last `threshold` of them open
    // the slot to this very VMK.
    let parsed = texts
        .iter()
        .map(|t| parse_share(t))
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
    shares: &[ParsedShare],
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
            let mut bytes = Zeroizing::new(Vec::with_capacity(1 + s.data.len()));
            bytes.push(s.index);
            bytes.extend_from_slice(&s.data);
            Share::try_from(&bytes[..]).map_err(|_| RecoveryError::Integrity)
        })
        .collect::<Result<Vec<Share>, _>>()?;
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

/// Multiplication in GF(32), modulo `x⁵ + x² + 1`.
const fn gf32_mul(a: u8, b: u8) -> u8 {
    let mut product: u16 = 0;
    let mut bit = 0;
    while bit < 5 {
        if (b >> bit) & 1 == 1 {
            product ^= (a as u16) << bit;
        }
        bit += 1;
    }
    let mut bit = 9;
    while bit >= 5 {
        if (product >> bit) & 1 == 1 {
            product ^= 0b10_0101 << (bit - 5);
        }
        bit -= 1;
    }
    (product & 31) as u8
}

/// For each value of the symbol shifted out, what it adds back: `top · x⁴ mod g(x)`, packed
/// like the remainder in [`polymod`].
const FEEDBACK: [u32; 32] = {
    let mut table = [0u32; 32];
    let mut top = 0;
    while top < 32 {
        let mut i = 0;
        while i < CHECK_CHARS {
            table[top] ^= (gf32_mul(top as u8, GENERATOR[i]) as u32) << (5 * i);
            i += 1;
        }
        top += 1;
    }
    table
};

/// The remainder of the polynomial whose coefficients are `symbols` (5-bit values, highest
/// power first) divided by [`GENERATOR`]: four symbols, packed highest first into 20 bits.
fn polymod(symbols: impl IntoIterator<Item = u8>) -> u32 {
    let mut rest: u32 = 0;
    for symbol in symbols {
        let top = (rest >> 15) & 31;
        rest = ((rest & 0x7fff) << 5) | u32::from(symbol & 31);
        rest ^= FEEDBACK[top as usize];
    }
    rest
}

/// The 20-bit check value of a share: the check symbols that make the version, the set id's
/// hex digits, `k`, the index, the data characters' values and the check symbols themselves a
/// codeword. Every field is one symbol per character as printed, so that one wrong character
/// is one wrong symbol, which the code always detects.
fn checksum(set_id: &[u8; 4], threshold: u8, index: u8, data_values: &[u8]) -> u32 {
    let hex_digits = set_id.iter().flat_map(|b| [b >> 4, b & 15]);
    polymod(
        std::iter::once(VERSION_SYMBOL)
            .chain(hex_digits)
            .chain([threshold, index])
            .chain(data_values.iter().copied())
            .chain([0; CHECK_CHARS]),
    )
}

/// Render one share as text.
fn render(set: &RecoverySet, index: u8, data: &[u8]) -> Zeroizing<String> {
    let values = base32_values(data);
    let mut body = Zeroizing::new(String::with_capacity(DATA_CHARS + CHECK_CHARS));
    body.extend(
        values
            .iter()
            .map(|&v| char::from(ALPHABET[usize::from(v & 31)])),
    );
    let check = checksum(&set.set_id, set.threshold, index, &values);
    for shift in (0..CHECK_CHARS).rev() {
        body.push(char::from(ALPHABET[((check >> (5 * shift)) & 31) as usize]));
    }
    let header = format!(
        "KW{VERSION}-{}-{}-{index}",
        hex_upper(&set.set_id),
        set.threshold
    );
    let mut text = Zeroizing::new(String::with_capacity(
        header.len() + body.len() + body.len() / GROUP + 1,
    ));
    text.push_str(&header);
    for (i, c) in body.chars().enumerate() {
        if i % GROUP == 0 {
            text.push('-');
        }
        text.push(c);
    }
    text
}

/// Read a share typed or pasted by a person.
///
/// # Errors
/// [`RecoveryError::BadFormat`] saying what is wrong; [`RecoveryError::BadChecksum`] for a
/// typo; [`RecoveryError::UnsupportedVersion`] for a share from a newer format.
pub fn parse_share(text: &str) -> Result<ParsedShare, RecoveryError> {
    let bad = |what: &str| RecoveryError::BadFormat(what.to_owned());
    let mut tokens = text
        .trim()
        .split(|c: char| c == '-' || c.is_whitespace())
        .filter(|t| !t.is_empty());

    let version = tokens.next().ok_or_else(|| bad("the share is empty"))?;
    let number = version
        .get(..2)
        .filter(|p| p.eq_ignore_ascii_case("KW"))
        .and_then(|_| version.get(2..))
        .ok_or_else(|| bad("a recovery share starts with \"KW2-\""))?;
    if number != VERSION {
        return Err(if number == "1" {
            RecoveryError::RetiredVersion
        } else if !number.is_empty() && number.bytes().all(|b| b.is_ascii_digit()) {
            RecoveryError::UnsupportedVersion
        } else {
            bad("a recovery share starts with \"KW2-\"")
        });
    }

    let set_id = tokens
        .next()
        .and_then(parse_hex4)
        .ok_or_else(|| bad("after \"KW2-\" comes the set id: 8 hex digits"))?;
    let threshold = tokens
        .next()
        .and_then(|t| t.parse::<u8>().ok())
        .filter(|k| (1..=MAX_SHARES).contains(k))
        .ok_or_else(|| bad("after the set id comes the number of shares needed (1 to 16)"))?;
    let index = tokens
        .next()
        .and_then(|t| t.parse::<u8>().ok())
        .filter(|i| (1..=MAX_SHARES).contains(i))
        .ok_or_else(|| {
            bad("after the number of shares needed comes the share's number (1 to 16)")
        })?;

    // The rest: data and check characters, dashes and spaces anywhere.
    let mut values = Zeroizing::new(Vec::with_capacity(DATA_CHARS + CHECK_CHARS));
    for token in tokens {
        for c in token.chars() {
            let v = base32_value(c).ok_or_else(|| {
                RecoveryError::BadFormat(format!(
                    "character {} of the share's data is not one of 0-9 A-Z (except U)",
                    values.len() + 1
                ))
            })?;
            if values.len() == DATA_CHARS + CHECK_CHARS {
                return Err(bad(
                    "the share has too many characters: a group is doubled or another share ran into it",
                ));
            }
            values.push(v);
        }
    }
    if values.len() != DATA_CHARS + CHECK_CHARS {
        return Err(RecoveryError::BadFormat(format!(
            "the share has {} data characters, not {}: a group is missing",
            values.len(),
            DATA_CHARS + CHECK_CHARS
        )));
    }
    let (data_values, check_values) = values.split_at(DATA_CHARS);
    let check = check_values
        .iter()
        .fold(0u32, |acc, v| (acc << 5) | u32::from(*v));
    if check != checksum(&set_id, threshold, index, data_values) {
        return Err(RecoveryError::BadChecksum);
    }
    // Non-zero padding bits can only be a typo in the last data character (which the check
    // has caught already).
    let data = base32_decode(data_values).ok_or(RecoveryError::BadChecksum)?;
    if data.len() != KEY_LEN {
        return Err(RecoveryError::BadChecksum);
    }
    Ok(ParsedShare {
        set_id,
        threshold,
        index,
        data,
    })
}

fn hex_upper(bytes: &[u8]) -> String {
    base16ct::upper::encode_string(bytes)
}

fn parse_hex4(text: &str) -> Option<[u8; 4]> {
    let mut out = [0u8; 4];
    // Exactly 8 hex digits, either case (a share may be retyped in lower case).
    (text.len() == 8 && base16ct::mixed::decode(text, &mut out).is_ok()).then_some(out)
}

/// The 5-bit values of `bytes` in base32, most significant bit first, zero-padded to a whole
/// character.
fn base32_values(bytes: &[u8]) -> Zeroizing<Vec<u8>> {
    let mut out = Zeroizing::new(Vec::with_capacity((bytes.len() * 8).div_ceil(5)));
    let mut acc: u32 = 0;
    let mut bits = 0u32;
    for &b in bytes {
        acc = (acc << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(((acc >> bits) & 31) as u8);
        }
        acc &= (1 << bits) - 1;
    }
    if bits > 0 {
        out.push(((acc << (5 - bits)) & 31) as u8);
    }
    out
}

/// Crockford base32 text of `bytes`.
#[cfg(test)]
fn base32_encode(bytes: &[u8], out: &mut String) {
    out.extend(
        base32_values(bytes)
            .iter()
            .map(|&v| char::from(ALPHABET[usize::from(v)])),
    );
}

/// The value of a Crockford base32 character, any case; `I`/`L` read as 1 and `O` as 0.
fn base32_value(c: char) -> Option<u8> {
    let c = match c.to_ascii_uppercase() {
        'O' => '0',
        'I' | 'L' => '1',
        other => other,
    };
    let c = u8::try_from(c).ok()?;
    ALPHABET
        .iter()
        .position(|&a| a == c)
        .and_then(|p| u8::try_from(p).ok())
}

/// Decode 5-bit values; `None` unless the left-over bits are fewer than 5 and all zero.
fn base32_decode(values: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
    let mut out = Zeroizing::new(Vec::with_capacity(values.len() * 5 / 8));
    let mut acc: u32 = 0;
    let mut bits = 0u32;
    for &v in values {
        acc = (acc << 5) | u32::from(v & 31);
        bits += 5;
        if bits >= 8 {
            bits -= 8;
            out.push(((acc >> bits) & 0xff) as u8);
        }
        acc &= (1 << bits) - 1;
    }
    (acc == 0).then_some(out)
}

/// `[u8; 4]` as 8 hex digits in JSON.
mod hex4 {
    use serde::{Deserialize as _, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(id: &[u8; 4], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::hex_upper(id))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 4], D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        super::parse_hex4(&text).ok_or_else(|| serde::de::Error::custom("expected 8 hex digits"))
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

    const VAULT: [u8; 16] = [5; 16];

    fn parse_all(texts: &[Zeroizing<String>]) -> Vec<ParsedShare> {
        texts.iter().map(|t| parse_share(t).unwrap()).collect()
    }

    #[test]
    fn two_of_three() {
        let vmk = Key32::random();
        let (slot, texts) = enroll(&vmk, &VAULT, 2, 3).unwrap();
        assert_eq!(texts.len(), 3);
        assert_eq!((slot.set.threshold, slot.set.shares), (2, 3));
        for pair in [[0, 1], [0, 2], [1, 2], [2, 0]] {
            let shares: Vec<_> = pair
                .iter()
                .map(|&i| parse_share(&texts[i]).unwrap())
                .collect();
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
        let one = [parse_share(&texts[1]).unwrap()];
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

    #[test]
    fn share_text_shape() {
        let (slot, texts) = enroll(&Key32::random(), &VAULT, 3, 5).unwrap();
        for (i, text) in texts.iter().enumerate() {
            let prefix = format!("KW2-{}-3-{}-", slot.set.id_text(), i + 1);
            assert!(text.starts_with(&prefix), "{}", text.as_str());
            let groups: Vec<&str> = text[prefix.len()..].split('-').collect();
            assert_eq!(groups.len(), (DATA_CHARS + CHECK_CHARS) / GROUP);
            assert!(groups
                .iter()
                .all(|g| g.len() == GROUP && g.bytes().all(|b| ALPHABET.contains(&b))));
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
            let one = [parse_share(t).unwrap()];
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

    #[test]
    fn a_typo_is_a_bad_checksum() {
        let (_, texts) = enroll(&Key32::random(), &VAULT, 2, 3).unwrap();
        let text = texts[0].as_str();
        let header_len = "KW2-XXXXXXXX-2-1-".len();
        // Change each data or check character in turn to another valid one.
        for (pos, c) in text.char_indices().skip(header_len) {
            if c == '-' {
                continue;
            }
            let other = if c == 'Z' { 'Y' } else { 'Z' };
            let typo = format!("{}{}{}", &text[..pos], other, &text[pos + 1..]);
            assert!(
                matches!(parse_share(&typo), Err(RecoveryError::BadChecksum)),
                "position {pos}"
            );
        }
        // A typo in the set id, k or index is caught by the checksum too.
        let set_typo = format!(
            "KW2-{}{}",
            if &text[4..5] == "0" { "1" } else { "0" },
            &text[5..]
        );
        assert!(matches!(
            parse_share(&set_typo),
            Err(RecoveryError::BadChecksum)
        ));
        let index_typo = format!("{}2{}", &text[..15], &text[16..]);
        assert!(matches!(
            parse_share(&index_typo),
            Err(RecoveryError::BadChecksum)
        ));
    }

    #[test]
    fn input_is_forgiving() {
        let vmk = Key32::random();
        let (slot, texts) = enroll(&vmk, &VAULT, 2, 2).unwrap();
        // Lower case, spaces instead of dashes, regrouped data, surrounding whitespace.
        let lower = texts[0].to_lowercase();
        let (header, data) = split_header(&texts[1]);
        let data: String = data.chars().filter(|&c| c != '-').collect();
        let regrouped: Vec<&str> = data
            .as_bytes()
            .chunks(5)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect();
        let spaced = format!(
            "  {}  {}\n",
            header.replace('-', " "),
            regrouped.join(" - ")
        );
        let shares = [parse_share(&lower).unwrap(), parse_share(&spaced).unwrap()];
        assert_eq!(
            unwrap_vmk(&slot, &VAULT, &shares).unwrap().expose(),
            vmk.expose()
        );
        // Crockford aliases in the data: O for 0, I and L for 1.
        let (header, data) = split_header(&texts[0]);
        for alias in [
            data.replace('0', "o").replace('1', "l"),
            data.replace('1', "I"),
        ] {
            assert_eq!(parse_share(&format!("{header}-{alias}")).unwrap().index, 1);
        }
    }

    /// `KW2-SETID-K-INDEX` and the data groups after it.
    fn split_header(text: &str) -> (&str, &str) {
        let end = text.match_indices('-').nth(3).unwrap().0;
        (&text[..end], &text[end + 1..])
    }

    #[test]
    fn format_errors_are_precise_and_never_echo() {
        let (_, texts) = enroll(&Key32::random(), &VAULT, 2, 3).unwrap();
        let text = texts[0].as_str();
        let data_part = &text["KW2-XXXXXXXX-2-1-".len()..];
        let cases = [
            ("", "empty"),
            ("hello", "starts with"),
            (&format!("KX1{}", &text[3..]), "starts with"),
            (&format!("KW2-12345-2-1-{data_part}"), "set id"),
            (&format!("KW2-1234567G-2-1-{data_part}"), "set id"),
            (&format!("{}0-1-{data_part}", &text[..13]), "needed"),
            (
                &format!("{}2-17-{data_part}", &text[..13]),
                "share's number",
            ),
            (&format!("{}-U", text), "except U"),
            (&text[..text.len() - 5], "missing"),
            (&format!("{text}-AAAA"), "too many"),
        ];
        for (input, expect) in cases {
            let e = parse_share(input).unwrap_err();
            let shown = e.to_string();
            assert!(
                matches!(e, RecoveryError::BadFormat(_)),
                "{input:?}: {shown}"
            );
            assert!(shown.contains(expect), "{input:?}: {shown}");
            // No 4-character run of the data appears in the message.
            for group in data_part.split('-') {
                assert!(!shown.contains(group), "{shown}");
            }
        }
        assert!(matches!(
            parse_share(&format!("KW3{}", &text[3..])),
            Err(RecoveryError::UnsupportedVersion)
        ));
        assert!(matches!(
            parse_share(&format!("KW1{}", &text[3..])),
            Err(RecoveryError::RetiredVersion)
        ));
    }

    #[test]
    fn shares_of_another_set_are_refused() {
        let vmk = Key32::random();
        let (slot_a, texts_a) = enroll(&vmk, &VAULT, 2, 3).unwrap();
        let (_, texts_b) = enroll(&vmk, &VAULT, 2, 3).unwrap();
        let mixed = [
            parse_share(&texts_a[0]).unwrap(),
            parse_share(&texts_b[1]).unwrap(),
        ];
        assert!(matches!(
            unwrap_vmk(&slot_a, &VAULT, &mixed),
            Err(RecoveryError::WrongSet)
        ));
        let dup = [
            parse_share(&texts_a[0]).unwrap(),
            parse_share(&texts_a[0]).unwrap(),
        ];
        assert!(matches!(
            unwrap_vmk(&slot_a, &VAULT, &dup),
            Err(RecoveryError::DuplicateShare { index: 1 })
        ));
        // A share claiming an index beyond the set's size.
        let b = parse_share(&texts_b[0]).unwrap();
        let beyond = ParsedShare {
            set_id: slot_a.set.set_id,
            threshold: 2,
            index: 4,
            data: b.data,
        };
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
        let b2 = parse_share(&texts_b[1]).unwrap();
        let forged = render(&slot_a.set, 2, &b2.data);
        let shares = [
            parse_share(&texts_a[0]).unwrap(),
            parse_share(&forged).unwrap(),
        ];
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
    }

    #[test]
    fn debug_never_shows_share_data() {
        let vmk = Key32::random();
        let (slot, texts) = enroll(&vmk, &VAULT, 2, 3).unwrap();
        let share = parse_share(&texts[0]).unwrap();
        let shown = format!("{share:?} {slot:?}");
        assert!(shown.contains("redacted"), "{shown}");
        let data_part = &texts[0]["KW2-XXXXXXXX-2-1-".len()..];
        for group in data_part.split('-') {
            assert!(!shown.contains(group), "{shown}");
        }
        let hex_data = keyward_proto::text::hex(&share.data);
        assert!(!shown.contains(&hex_data[..8]));
        assert!(!shown.contains(&format!("{:?}", &share.data[..4])));
    }

    #[test]
    fn base32_round_trip() {
        for len in 0usize..40 {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            let mut text = String::new();
            base32_encode(&bytes, &mut text);
            assert_eq!(text.len(), (len * 8).div_ceil(5));
            let values: Vec<u8> = text.chars().map(|c| base32_value(c).unwrap()).collect();
            assert_eq!(&*base32_decode(&values).unwrap(), &bytes);
        }
        assert_eq!(base32_value('u'), None);
        assert_eq!(base32_value('é'), None);
        assert_eq!(base32_value('o'), Some(0));
        assert_eq!(base32_value('L'), Some(1));
        assert_eq!(base32_value('z'), Some(31));
    }
}

/// Generated shares: every share prints to text that reads back to it, any single-character
/// change is refused or reads as the very same share, and no input panics.
#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    fn set() -> impl Strategy<Value = RecoverySet> {
        (any::<[u8; 4]>(), 1..=MAX_SHARES).prop_map(|(set_id, threshold)| RecoverySet {
            set_id,
            threshold,
            shares: MAX_SHARES,
        })
    }

    fn same(a: &ParsedShare, b: &ParsedShare) -> bool {
        a.set_id == b.set_id && a.threshold == b.threshold && a.index == b.index && a.data == b.data
    }

    /// Every character a person might type in place of another: the alphabet in both cases,
    /// Crockford's aliases, `U`, separators and a few strays.
    fn replacements() -> Vec<char> {
        let mut all: Vec<char> = ALPHABET.iter().map(|&b| char::from(b)).collect();
        all.extend(all.clone().iter().map(char::to_ascii_lowercase));
        all.extend("IiLlOoUu- _.é".chars());
        all
    }

    /// Shares are printed on paper: the text of a given share must never change. These were
    /// computed independently of this code, from the description in the module documentation.
    #[test]
    fn known_shares_render_exactly() {
        let set = |set_id, threshold| RecoverySet {
            set_id,
            threshold,
            shares: MAX_SHARES,
        };
        let counting: Vec<u8> = (0..32).collect();
        assert_eq!(
            *render(&set([0x0A, 0x1B, 0x2C, 0x3D], 2), 1, &counting),
            "KW2-0A1B2C3D-2-1-000G-40R4-0M30-E209-185G-R38E-1W81-24GK-2GAH-C5RR-34D1-P70X-3RFG-WJ8N"
        );
        assert_eq!(
            *render(&set([0xFF; 4], 16), 16, &[0xFF; 32]),
            "KW2-FFFFFFFF-16-16-ZZZZ-ZZZZ-ZZZZ-ZZZZ-ZZZZ-ZZZZ-ZZZZ-ZZZZ-ZZZZ-ZZZZ-ZZZZ-ZZZZ-ZZZG-6REW"
        );
    }

    proptest! {
        // The typo test parses about 6,000 variants per case (unoptimised in tests): its
        // guarantee holds for every share, so a few shares show it.
        #![proptest_config(ProptestConfig::with_cases(16))]

        #[test]
        fn render_then_parse_is_the_identity(
            set in set(),
            index in 1..=MAX_SHARES,
            data in any::<[u8; KEY_LEN]>(),
        ) {
            let text = render(&set, index, &data);
            let share = parse_share(&text).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(share.set_id, set.set_id);
            prop_assert_eq!(share.threshold, set.threshold);
            prop_assert_eq!(share.index, index);
            prop_assert_eq!(&share.data[..], &data[..]);
            prop_assert_eq!(&*share.to_text(), &*text);
        }

        /// Every position, every replacement: refused, or (case, aliases, separators) the
        /// same share. A typo never yields a different share that passes its check. The same
        /// for every swap of two neighbouring characters, and for a run of up to four wrong
        /// data characters.
        #[test]
        fn typos_are_refused_or_harmless(
            set in set(),
            index in 1..=MAX_SHARES,
            data in any::<[u8; KEY_LEN]>(),
            burst_at in 0..DATA_CHARS + CHECK_CHARS - 4,
            burst in proptest::collection::vec(0..32u8, 1..=4),
        ) {
            let text = render(&set, index, &data);
            let original = parse_share(&text).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let chars: Vec<char> = text.chars().collect();
            let check = |typo: Vec<char>, what: &dyn Fn() -> String| -> Result<(), TestCaseError> {
                let typo: String = typo.into_iter().collect();
                if let Ok(read) = parse_share(&typo) {
                    prop_assert!(same(&read, &original), "{} reads as another share", what());
                }
                Ok(())
            };
            let replacements = replacements();
            for pos in 0..chars.len() {
                for &c in replacements.iter().filter(|&&c| c != chars[pos]) {
                    let mut typo = chars.clone();
                    typo[pos] = c;
                    check(typo, &|| format!("{c:?} at {pos}"))?;
                }
                if pos + 1 < chars.len() {
                    let mut typo = chars.clone();
                    typo.swap(pos, pos + 1);
                    check(typo, &|| format!("the swap at {pos}"))?;
                }
            }
            // A burst of symbol errors in the data and check groups (dashes skipped).
            let header = "KW2-XXXXXXXX-".len() + format!("{}-{index}-", set.threshold).len();
            let symbol_positions: Vec<usize> =
                (header..chars.len()).filter(|&p| chars[p] != '-').collect();
            let mut typo = chars.clone();
            for (k, e) in burst.iter().enumerate() {
                let p = symbol_positions[burst_at + k];
                let v = base32_value(typo[p]).unwrap_or_default() ^ e;
                typo[p] = char::from(ALPHABET[usize::from(v)]);
            }
            check(typo, &|| format!("a burst at {burst_at}"))?;
        }

        #[test]
        fn arbitrary_text_never_panics(text in "\\PC{0,120}") {
            let _ = parse_share(&text);
        }

        /// Share-shaped text: a plausible header and data of plausible characters.
        #[test]
        fn share_shaped_text_never_panics_and_never_echoes(
            header in "(KW|kw|KX)[0-9]{0,2}-[0-9A-Fa-fG]{7,9}-[0-9]{1,3}-[0-9]{1,3}",
            data in "[0-9A-Za-z -]{0,80}",
        ) {
            let text = format!("{header}-{data}");
            if let Err(e) = parse_share(&text) {
                let shown = e.to_string();
                let run: String = data.chars().filter(|c| c.is_ascii_alphanumeric()).take(6).collect();
                prop_assert!(run.len() < 6 || !shown.contains(&run), "{}", shown);
            }
        }

        #[test]
        fn slot_blobs_round_trip_and_arbitrary_blobs_never_panic(
            set in set(),
            shares in 1..=MAX_SHARES,
            wrapped in proptest::collection::vec(any::<u8>(), 0..80),
            junk in proptest::collection::vec(any::<u8>(), 0..200),
        ) {
            let set = RecoverySet { threshold: set.threshold.min(shares), shares, ..set };
            let slot = RecoverySlotData { set, wrapped_vmk: wrapped };
            let blob = slot.to_blob().map_err(|e| TestCaseError::fail(e.to_string()))?;
            let back = RecoverySlotData::from_blob(&blob).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(back, slot);
            let _ = RecoverySlotData::from_blob(&junk);
        }
    }

    proptest! {
        // Each case enrolls (two test unwraps) and unwraps once: a few cases cover it.
        #![proptest_config(ProptestConfig::with_cases(16))]

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
            let picked: Vec<ParsedShare> = order
                .into_iter()
                .filter(|&i| i < texts.len())
                .take(usize::from(threshold))
                .map(|i| parse_share(&texts[i]))
                .collect::<Result<_, _>>()
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            let opened = unwrap_vmk(&slot, &vault, &picked)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(opened.expose(), vmk.expose());
        }
    }
}
