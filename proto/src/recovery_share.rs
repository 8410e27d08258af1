//! The text of a recovery share: how `keywardd` prints one and how anything that takes one back
//! (the daemon, the `keyward` CLI before it sends it, the fuzz targets) reads it. One parser and
//! one printer, so that a share printed once stays readable and every side names a typo alike.
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
//! ([`ShareError::BadChecksum`]), with guarantees rather than odds: any one wrong character,
//! any two transposed, and any run of up to four wrong characters in a row are always caught;
//! other errors slip through once in 2²⁰. (A truncated hash, the first design, lets about one
//! single-character typo in a million through; a generated test found one.) Input is read
//! forgivingly: any case, spaces or dashes anywhere between data characters, and `I`/`L` read as
//! `1`, `O` as `0`.
//!
//! `KW1-` shares came from development builds whose check was a truncated hash; they are
//! refused by name ([`ShareError::RetiredVersion`]), never misread as a typo.
//!
//! What the data is (a point of Shamir's scheme) and what opens with it is the daemon's: this
//! module holds no key, does no cryptography and no I/O.
//!
//! Must not: echo share text or bytes in an error or `Debug`.

use std::fmt;

use zeroize::Zeroizing;

/// Most shares in one set, and so the largest threshold and share number.
pub const MAX_SHARES: u8 = 16;
/// Data bytes in a share.
pub const DATA_LEN: usize = 32;
/// The share format this build writes and reads.
const VERSION: &str = "2";
/// Data characters in a share: 32 bytes of base32.
const DATA_CHARS: usize = (DATA_LEN * 8).div_ceil(5);
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

/// Text that is not a share this build reads. Never quotes the text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShareError {
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
}

/// A share read from text: which set and index it claims, and its data (secret).
pub struct Share {
    /// The recovery set's id.
    pub set_id: [u8; 4],
    /// Shares needed to open (`k`), 1 to [`MAX_SHARES`].
    pub threshold: u8,
    /// This share's number, 1 to [`MAX_SHARES`].
    pub index: u8,
    data: Zeroizing<[u8; DATA_LEN]>,
}

impl fmt::Debug for Share {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Share")
            .field("set_id", &set_id_text(&self.set_id))
            .field("threshold", &self.threshold)
            .field("index", &self.index)
            .field("data", &format_args!("redacted"))
            .finish()
    }
}

impl Share {
    /// The share's data bytes: secret.
    pub fn expose_data(&self) -> &[u8; DATA_LEN] {
        &self.data
    }

    /// The set id as printed on the share (8 uppercase hex digits).
    pub fn set_id_text(&self) -> String {
        set_id_text(&self.set_id)
    }

    /// The share's canonical text, as enrollment prints it (upper case, groups of four). Text
    /// that parses reads back from this to the same share; the fuzz target checks that.
    pub fn to_text(&self) -> Zeroizing<String> {
        render(&self.set_id, self.threshold, self.index, &self.data)
    }
}

/// A set id as printed on its shares (8 uppercase hex digits).
pub fn set_id_text(set_id: &[u8; 4]) -> String {
    base16ct::upper::encode_string(set_id)
}

/// A set id from exactly 8 hex digits, either case (a share may be retyped in lower case).
pub fn parse_set_id(text: &str) -> Option<[u8; 4]> {
    let mut out = [0u8; 4];
    (text.len() == 8 && base16ct::mixed::decode(text, &mut out).is_ok()).then_some(out)
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

/// The text of share number `index` of set `set_id`, `threshold` of which are needed. It reads
/// back only when `threshold` and `index` are 1 to [`MAX_SHARES`].
pub fn render(
    set_id: &[u8; 4],
    threshold: u8,
    index: u8,
    data: &[u8; DATA_LEN],
) -> Zeroizing<String> {
    let values = base32_values(data);
    let mut body = Zeroizing::new(String::with_capacity(DATA_CHARS + CHECK_CHARS));
    body.extend(
        values
            .iter()
            .map(|&v| char::from(ALPHABET[usize::from(v & 31)])),
    );
    let check = checksum(set_id, threshold, index, &values);
    for shift in (0..CHECK_CHARS).rev() {
        body.push(char::from(ALPHABET[((check >> (5 * shift)) & 31) as usize]));
    }
    let header = format!("KW{VERSION}-{}-{threshold}-{index}", set_id_text(set_id));
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
/// [`ShareError::BadFormat`] saying what is wrong; [`ShareError::BadChecksum`] for a typo;
/// [`ShareError::UnsupportedVersion`] for a share from a newer format;
/// [`ShareError::RetiredVersion`] for a `KW1-` share.
pub fn parse(text: &str) -> Result<Share, ShareError> {
    let bad = |what: &str| ShareError::BadFormat(what.to_owned());
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
            ShareError::RetiredVersion
        } else if !number.is_empty() && number.bytes().all(|b| b.is_ascii_digit()) {
            ShareError::UnsupportedVersion
        } else {
            bad("a recovery share starts with \"KW2-\"")
        });
    }

    let set_id = tokens
        .next()
        .and_then(parse_set_id)
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
                ShareError::BadFormat(format!(
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
        return Err(ShareError::BadFormat(format!(
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
        return Err(ShareError::BadChecksum);
    }
    // Non-zero padding bits can only be a typo in the last data character (which the check
    // has caught already).
    let decoded = base32_decode(data_values).ok_or(ShareError::BadChecksum)?;
    let mut data = Zeroizing::new([0u8; DATA_LEN]);
    if decoded.len() != DATA_LEN {
        return Err(ShareError::BadChecksum);
    }
    data.copy_from_slice(&decoded);
    Ok(Share {
        set_id,
        threshold,
        index,
        data,
    })
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

#[cfg(test)]
mod tests;
