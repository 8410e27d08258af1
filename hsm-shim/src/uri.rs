//! PKCS#11 URIs (RFC 7512): how an admin names a token, and the objects on it, in Keyward's
//! configuration.
//!
//! This module owns parsing, validating and printing those URIs, and matching one against a
//! token's identity. It opens no module, reads no PIN file and talks to no device: the PKCS#11
//! backend does that with the values parsed here.
//!
//! We wrote our own parser rather than take a crate: the existing ones are thin (lenient about bad
//! escapes, silent about unknown attributes) or pull in unrelated bindings, and the grammar is
//! small enough to hold in one file. The parser is strict, because a URI that parses "a bit wrong"
//! selects the wrong token, or none, and the admin only finds out at unseal time:
//!
//! - `pin-value` (and the drafts' `x-pin-value`) is **refused**: a PIN in a URI ends up in config
//!   files, process lists and logs. Use `pin-source=file:/path` or a systemd credential.
//! - An attribute name we don't know is an error, so a typo such as `tokn=` never silently widens
//!   a match. Names starting with `x-` are vendor extensions (the `x-` convention of the drafts
//!   that led to RFC 7512): their syntax is checked, then they are ignored. RFC 7512's own example
//!   with `vendor-aaa=` is therefore rejected: a vendor attribute without `x-` can't be told apart
//!   from a typo.
//! - Names are case-sensitive lowercase; each attribute appears at most once, in its own part
//!   (path before `?`, query after it).
//! - Every character outside RFC 7512's `pk11-pchar` (path) or `pk11-qchar` (query) sets must be
//!   percent-encoded (a space is `%20`), and every `%` must start a two-hex-digit escape.
//! - Text values must decode to UTF-8; `id` is raw bytes. `slot-id` is a decimal `u64`, `type` one
//!   of the five classes, `library-version` `M` or `M.N`, `module-path` absolute.
//!
//! [`Pkcs11Uri`]'s `Display` prints a canonical form (attributes in a fixed order, `id` fully
//! percent-encoded, upper-case hex), and `parse(display(u)) == u` for every URI that parses. The
//! parser takes untrusted text, never panics, reads at most [`MAX_URI_LEN`] bytes, and is fuzzed.
//!
//! Note that slot IDs are not stable across processes on every module (SoftHSM renumbers them):
//! name a token by `token`, `serial`, `manufacturer` and `model`.

use std::borrow::Cow;
use std::fmt::{self, Write as _};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use percent_encoding::percent_encode_byte;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use thiserror::Error;

/// Longest URI, in bytes, that [`Pkcs11Uri::from_str`] accepts.
pub const MAX_URI_LEN: usize = 4096;

/// The scheme, matched case-insensitively.
const SCHEME: &str = "pkcs11:";

/// A parsed PKCS#11 URI (RFC 7512). Parse one with [`str::parse`]; print the canonical form with
/// `Display`. Every attribute is optional; an absent attribute matches anything.
///
/// Values are stored decoded: `token: Some("My Token")` for `token=My%20Token`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Pkcs11Uri {
    /// `token`: the token label (`CK_TOKEN_INFO.label`).
    pub token: Option<String>,
    /// `manufacturer`: the token manufacturer (`CK_TOKEN_INFO.manufacturerID`).
    pub manufacturer: Option<String>,
    /// `serial`: the token serial number (`CK_TOKEN_INFO.serialNumber`).
    pub serial: Option<String>,
    /// `model`: the token model (`CK_TOKEN_INFO.model`).
    pub model: Option<String>,
    /// `library-manufacturer`: `CK_INFO.manufacturerID` of the module.
    pub library_manufacturer: Option<String>,
    /// `library-description`: `CK_INFO.libraryDescription` of the module.
    pub library_description: Option<String>,
    /// `library-version`: `CK_INFO.libraryVersion`, as `MAJOR` or `MAJOR.MINOR` in decimal.
    pub library_version: Option<String>,
    /// `slot-manufacturer`: `CK_SLOT_INFO.manufacturerID`.
    pub slot_manufacturer: Option<String>,
    /// `slot-description`: `CK_SLOT_INFO.slotDescription`.
    pub slot_description: Option<String>,
    /// `slot-id`: the `CK_SLOT_ID`. Not stable across processes on every module.
    pub slot_id: Option<u64>,
    /// `object`: the object's `CKA_LABEL`.
    pub object: Option<String>,
    /// `id`: the object's `CKA_ID`, raw bytes.
    pub id: Option<Vec<u8>>,
    /// `type`: the object's class.
    pub object_type: Option<ObjectType>,
    /// `module-path` (query): absolute path of the PKCS#11 module to load.
    pub module_path: Option<PathBuf>,
    /// `module-name` (query): the module's name, without directory or suffix (e.g. `softhsm2`).
    pub module_name: Option<String>,
    /// `pin-source` (query): where the PIN is, typically `file:/path`. Not a secret itself; the
    /// PKCS#11 backend decides which forms it reads.
    pub pin_source: Option<String>,
}

/// The `type` attribute: the class of the object a URI names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ObjectType {
    /// `cert`: `CKO_CERTIFICATE`.
    Cert,
    /// `data`: `CKO_DATA`.
    Data,
    /// `private`: `CKO_PRIVATE_KEY`.
    Private,
    /// `public`: `CKO_PUBLIC_KEY`.
    Public,
    /// `secret-key`: `CKO_SECRET_KEY`.
    SecretKey,
}

impl ObjectType {
    /// Every type, in wire-name order.
    pub const ALL: [ObjectType; 5] = [
        Self::Cert,
        Self::Data,
        Self::Private,
        Self::Public,
        Self::SecretKey,
    ];

    /// The name in a URI.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cert => "cert",
            Self::Data => "data",
            Self::Private => "private",
            Self::Public => "public",
            Self::SecretKey => "secret-key",
        }
    }
}

impl fmt::Display for ObjectType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ObjectType {
    type Err = UriError;

    /// # Errors
    /// [`UriError::InvalidValue`] for anything but the five lowercase wire names.
    fn from_str(s: &str) -> Result<Self, UriError> {
        Self::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| UriError::InvalidValue {
                attribute: "type".to_owned(),
                reason: format!(
                    "expected one of cert, data, private, public, secret-key; got {s:?}"
                ),
            })
    }
}

/// A token's identity as the module reports it (`CK_TOKEN_INFO`), with the blank padding
/// removed, for [`Pkcs11Uri::matches_token`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenFields<'a> {
    /// `label`.
    pub label: &'a str,
    /// `manufacturerID`.
    pub manufacturer: &'a str,
    /// `serialNumber`.
    pub serial: &'a str,
    /// `model`.
    pub model: &'a str,
}

/// The two parts of a PKCS#11 URI: the path (`;`-separated, before `?`) and the query
/// (`&`-separated, after `?`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UriPart {
    /// Before `?`: what to find (token, slot, library, object).
    Path,
    /// After `?`: how to get there (module, PIN source).
    Query,
}

impl UriPart {
    fn separator(self) -> char {
        match self {
            Self::Path => ';',
            Self::Query => '&',
        }
    }
}

impl fmt::Display for UriPart {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Path => "path",
            Self::Query => "query",
        })
    }
}

/// Why a string is not an acceptable PKCS#11 URI. Messages are written for the admin who typed
/// it, and never contain a PIN.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum UriError {
    /// The URI, or its canonical form (which percent-encodes all of `id`), is longer than
    /// [`MAX_URI_LEN`] bytes.
    #[error("the PKCS#11 URI is {len} bytes long (written with id fully percent-encoded); at most {MAX_URI_LEN} are accepted")]
    TooLong {
        /// Its length in bytes.
        len: usize,
    },
    /// The text does not start with `pkcs11:`.
    #[error(
        "not a PKCS#11 URI: it must start with \"pkcs11:\" \
         (e.g. pkcs11:token=my-token or pkcs11:serial=1234abcd)"
    )]
    MissingScheme,
    /// An attribute with no name: an empty segment (`;;`, a trailing `;`) or `=value`.
    #[error(
        "an attribute in the {part} part of the PKCS#11 URI has no name (a stray '{sep}'?); \
         attributes there are name=value separated by '{sep}'",
        sep = part.separator()
    )]
    EmptyAttribute {
        /// Where.
        part: UriPart,
    },
    /// A segment without `=`.
    #[error(
        "{segment:?} in the {part} part of the PKCS#11 URI is not name=value \
         (an empty value is written name=)"
    )]
    MissingEquals {
        /// The segment as written.
        segment: String,
        /// Where.
        part: UriPart,
    },
    /// An attribute given twice.
    #[error("attribute {0:?} appears more than once in the PKCS#11 URI; give each attribute once")]
    DuplicateAttribute(String),
    /// An attribute name RFC 7512 doesn't define and that is not a vendor extension (`x-…`).
    #[error("{}", unknown_message(name, *part))]
    UnknownAttribute {
        /// The name as written.
        name: String,
        /// Where it was found.
        part: UriPart,
    },
    /// A path attribute in the query part, or a query attribute in the path part.
    #[error("{}", misplaced_message(name, *found))]
    MisplacedAttribute {
        /// The attribute.
        name: String,
        /// The part it was found in (the other part is where it belongs).
        found: UriPart,
    },
    /// A `%` not followed by two hex digits.
    #[error(
        "bad percent-encoding {escape:?} in attribute {attribute:?} of the PKCS#11 URI: \
         '%' must be followed by two hex digits (a literal '%' is written %25)"
    )]
    BadPercentEncoding {
        /// The attribute whose value holds the escape.
        attribute: String,
        /// The escape as written (up to three characters from the `%`).
        escape: String,
    },
    /// A character that RFC 7512 requires to be percent-encoded, written as is.
    #[error(
        "character {character:?} in attribute {attribute:?} of the PKCS#11 URI must be \
         percent-encoded, as {}",
        encode_char(*character)
    )]
    InvalidCharacter {
        /// The attribute whose value holds the character.
        attribute: String,
        /// The character.
        character: char,
    },
    /// A text attribute whose decoded bytes are not UTF-8.
    #[error(
        "attribute {0:?} of the PKCS#11 URI does not decode to UTF-8 text \
         (only id may hold arbitrary bytes)"
    )]
    NotUtf8(String),
    /// A value that is well-formed but not acceptable for its attribute.
    #[error("invalid value for attribute {attribute:?} of the PKCS#11 URI: {reason}")]
    InvalidValue {
        /// The attribute.
        attribute: String,
        /// What is wrong, and what is expected.
        reason: String,
    },
    /// The URI carries a PIN (`pin-value`, or the drafts' `x-pin-value`).
    #[error(
        "the PKCS#11 URI carries a PIN (pin-value), which Keyward refuses: a PIN in a URI ends up \
         in config files, process lists and logs. Keep the PIN in a file readable only by keywardd \
         and point to it with pin-source=file:/path/to/pin, or pass it as a systemd credential"
    )]
    PinValueRefused,
}

fn unknown_message(name: &str, part: UriPart) -> String {
    let known: Vec<&str> = Attr::ALL
        .into_iter()
        .filter(|a| a.part() == part)
        .map(Attr::name)
        .collect();
    let case_hint = if Attr::lookup(&name.to_ascii_lowercase()).is_some() {
        "; attribute names are lowercase"
    } else {
        ""
    };
    format!(
        "unknown attribute {name:?} in the {part} part of the PKCS#11 URI \
         (known there: {}; vendor extensions start with \"x-\"){case_hint}",
        known.join(", ")
    )
}

fn misplaced_message(name: &str, found: UriPart) -> String {
    match found {
        UriPart::Path => format!(
            "attribute {name:?} belongs in the query part of the PKCS#11 URI (after '?', \
             separated by '&'), not in the path part"
        ),
        UriPart::Query => format!(
            "attribute {name:?} belongs in the path part of the PKCS#11 URI (before '?', \
             separated by ';'), not in the query part"
        ),
    }
}

fn encode_char(c: char) -> String {
    let mut buf = [0u8; 4];
    c.encode_utf8(&mut buf)
        .bytes()
        .map(percent_encode_byte)
        .collect()
}

/// The attributes RFC 7512 defines, minus `pin-value`. `ALL` is the canonical print order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Attr {
    Token,
    Manufacturer,
    Serial,
    Model,
    LibraryManufacturer,
    LibraryDescription,
    LibraryVersion,
    SlotManufacturer,
    SlotDescription,
    SlotId,
    Object,
    Type,
    Id,
    ModuleName,
    ModulePath,
    PinSource,
}

impl Attr {
    const ALL: [Attr; 16] = [
        Self::Token,
        Self::Manufacturer,
        Self::Serial,
        Self::Model,
        Self::LibraryManufacturer,
        Self::LibraryDescription,
        Self::LibraryVersion,
        Self::SlotManufacturer,
        Self::SlotDescription,
        Self::SlotId,
        Self::Object,
        Self::Type,
        Self::Id,
        Self::ModuleName,
        Self::ModulePath,
        Self::PinSource,
    ];

    fn name(self) -> &'static str {
        match self {
            Self::Token => "token",
            Self::Manufacturer => "manufacturer",
            Self::Serial => "serial",
            Self::Model => "model",
            Self::LibraryManufacturer => "library-manufacturer",
            Self::LibraryDescription => "library-description",
            Self::LibraryVersion => "library-version",
            Self::SlotManufacturer => "slot-manufacturer",
            Self::SlotDescription => "slot-description",
            Self::SlotId => "slot-id",
            Self::Object => "object",
            Self::Type => "type",
            Self::Id => "id",
            Self::ModuleName => "module-name",
            Self::ModulePath => "module-path",
            Self::PinSource => "pin-source",
        }
    }

    fn part(self) -> UriPart {
        match self {
            Self::ModuleName | Self::ModulePath | Self::PinSource => UriPart::Query,
            _ => UriPart::Path,
        }
    }

    fn lookup(name: &str) -> Option<Attr> {
        Self::ALL.into_iter().find(|a| a.name() == name)
    }
}

impl FromStr for Pkcs11Uri {
    type Err = UriError;

    /// Parse and validate a PKCS#11 URI (see the module documentation for the rules).
    ///
    /// # Errors
    /// A [`UriError`] naming the first problem found, and the attribute it is in.
    fn from_str(s: &str) -> Result<Self, UriError> {
        if s.len() > MAX_URI_LEN {
            return Err(UriError::TooLong { len: s.len() });
        }
        let rest = s
            .get(..SCHEME.len())
            .filter(|scheme| scheme.eq_ignore_ascii_case(SCHEME))
            .and_then(|_| s.get(SCHEME.len()..))
            .ok_or(UriError::MissingScheme)?;
        // '?' may appear unencoded inside the query, never in the path: the first one splits.
        let (path, query) = match rest.split_once('?') {
            Some((path, query)) => (path, query),
            None => (rest, ""),
        };
        let mut uri = Self::default();
        let mut seen = Vec::new();
        for (text, part) in [(path, UriPart::Path), (query, UriPart::Query)] {
            // An empty part has no attributes; inside a non-empty one, every segment is name=value.
            if text.is_empty() {
                continue;
            }
            for segment in text.split(part.separator()) {
                uri.parse_attribute(segment, part, &mut seen)?;
            }
        }
        // The canonical form prints `id` fully percent-encoded, three bytes for each raw one:
        // refuse what could not be read back once written out, so that every accepted URI
        // round-trips.
        let canonical = uri.to_string().len();
        if canonical > MAX_URI_LEN {
            return Err(UriError::TooLong { len: canonical });
        }
        Ok(uri)
    }
}

impl Pkcs11Uri {
    /// Whether `t` is a token this URI names: every token attribute (`token`, `manufacturer`,
    /// `serial`, `model`) present in the URI equals the corresponding field; absent attributes
    /// match anything. Trailing spaces (the padding of `CK_TOKEN_INFO` fields) are ignored on both
    /// sides. Other attributes (slot, library, object) are not considered here.
    pub fn matches_token(&self, t: &TokenFields<'_>) -> bool {
        fn same(want: Option<&str>, have: &str) -> bool {
            want.is_none_or(|w| w.trim_end_matches(' ') == have.trim_end_matches(' '))
        }
        same(self.token.as_deref(), t.label)
            && same(self.manufacturer.as_deref(), t.manufacturer)
            && same(self.serial.as_deref(), t.serial)
            && same(self.model.as_deref(), t.model)
    }

    /// Whether the URI names a token at all: at least one of `token`, `manufacturer`, `serial`,
    /// `model` is present (possibly empty, as in `serial=`). The daemon requires this, so that a
    /// URI like `pkcs11:object=x` doesn't pick whichever token comes first.
    pub fn names_token(&self) -> bool {
        self.token.is_some()
            || self.manufacturer.is_some()
            || self.serial.is_some()
            || self.model.is_some()
    }

    /// Parse one `name=value` segment of `part` into `self`.
    fn parse_attribute(
        &mut self,
        segment: &str,
        part: UriPart,
        seen: &mut Vec<Attr>,
    ) -> Result<(), UriError> {
        let Some((name, raw)) = segment.split_once('=') else {
            return Err(if segment.is_empty() {
                UriError::EmptyAttribute { part }
            } else {
                UriError::MissingEquals {
                    segment: segment.to_owned(),
                    part,
                }
            });
        };
        if name.is_empty() {
            return Err(UriError::EmptyAttribute { part });
        }
        // Before anything else, so that a malformed PIN is refused as a PIN and never echoed.
        if name == "pin-value" || name == "x-pin-value" {
            return Err(UriError::PinValueRefused);
        }
        if is_vendor_name(name) {
            decode(raw, name, part)?;
            return Ok(());
        }
        let attr = Attr::lookup(name).ok_or_else(|| UriError::UnknownAttribute {
            name: name.to_owned(),
            part,
        })?;
        if attr.part() != part {
            return Err(UriError::MisplacedAttribute {
                name: name.to_owned(),
                found: part,
            });
        }
        if seen.contains(&attr) {
            return Err(UriError::DuplicateAttribute(name.to_owned()));
        }
        seen.push(attr);
        let bytes = decode(raw, name, part)?;
        self.set(attr, bytes)
    }

    /// Validate a decoded value and store it.
    fn set(&mut self, attr: Attr, bytes: Vec<u8>) -> Result<(), UriError> {
        match attr {
            Attr::Token => self.token = Some(text(attr, bytes)?),
            Attr::Manufacturer => self.manufacturer = Some(text(attr, bytes)?),
            Attr::Serial => self.serial = Some(text(attr, bytes)?),
            Attr::Model => self.model = Some(text(attr, bytes)?),
            Attr::LibraryManufacturer => self.library_manufacturer = Some(text(attr, bytes)?),
            Attr::LibraryDescription => self.library_description = Some(text(attr, bytes)?),
            Attr::LibraryVersion => {
                self.library_version = Some(library_version(text(attr, bytes)?)?)
            }
            Attr::SlotManufacturer => self.slot_manufacturer = Some(text(attr, bytes)?),
            Attr::SlotDescription => self.slot_description = Some(text(attr, bytes)?),
            Attr::SlotId => self.slot_id = Some(slot_id(&text(attr, bytes)?)?),
            Attr::Object => self.object = Some(text(attr, bytes)?),
            Attr::Type => self.object_type = Some(text(attr, bytes)?.parse()?),
            Attr::Id => self.id = Some(bytes),
            Attr::ModuleName => self.module_name = Some(module_name(text(attr, bytes)?)?),
            Attr::ModulePath => self.module_path = Some(module_path(text(attr, bytes)?)?),
            Attr::PinSource => self.pin_source = Some(pin_source(text(attr, bytes)?)?),
        }
        Ok(())
    }

    /// The value of `attr` as the bytes to percent-encode, if present.
    fn wire_value(&self, attr: Attr) -> Option<Cow<'_, [u8]>> {
        fn text(s: &Option<String>) -> Option<Cow<'_, [u8]>> {
            s.as_deref().map(|s| Cow::Borrowed(s.as_bytes()))
        }
        match attr {
            Attr::Token => text(&self.token),
            Attr::Manufacturer => text(&self.manufacturer),
            Attr::Serial => text(&self.serial),
            Attr::Model => text(&self.model),
            Attr::LibraryManufacturer => text(&self.library_manufacturer),
            Attr::LibraryDescription => text(&self.library_description),
            Attr::LibraryVersion => text(&self.library_version),
            Attr::SlotManufacturer => text(&self.slot_manufacturer),
            Attr::SlotDescription => text(&self.slot_description),
            Attr::SlotId => self.slot_id.map(|n| Cow::Owned(n.to_string().into_bytes())),
            Attr::Object => text(&self.object),
            Attr::Type => self
                .object_type
                .map(|t| Cow::Borrowed(t.as_str().as_bytes())),
            Attr::Id => self.id.as_deref().map(Cow::Borrowed),
            Attr::ModuleName => text(&self.module_name),
            Attr::ModulePath => self
                .module_path
                .as_deref()
                .map(|p| Cow::Borrowed(p.as_os_str().as_encoded_bytes())),
            Attr::PinSource => text(&self.pin_source),
        }
    }
}

impl fmt::Display for Pkcs11Uri {
    /// The canonical form: `pkcs11:`, the path attributes present in a fixed order joined by `;`,
    /// then `?` and the query attributes joined by `&` if there are any. Bytes outside RFC 7512's
    /// `pk11-pchar`/`pk11-qchar` sets are percent-encoded (upper-case hex); `id` is encoded in
    /// full.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(SCHEME)?;
        for part in [UriPart::Path, UriPart::Query] {
            let mut first = true;
            for attr in Attr::ALL.into_iter().filter(|a| a.part() == part) {
                let Some(value) = self.wire_value(attr) else {
                    continue;
                };
                match (first, part) {
                    (true, UriPart::Path) => {}
                    (true, UriPart::Query) => f.write_char('?')?,
                    (false, _) => f.write_char(part.separator())?,
                }
                first = false;
                f.write_str(attr.name())?;
                f.write_char('=')?;
                for &b in value.iter() {
                    if attr != Attr::Id && allowed_raw(b, part) {
                        f.write_char(char::from(b))?;
                    } else {
                        f.write_str(percent_encode_byte(b))?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// Serialised as the canonical URI string, for configuration files.
impl Serialize for Pkcs11Uri {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// Read from a URI string, with the same rules as [`Pkcs11Uri::from_str`].
impl<'de> Deserialize<'de> for Pkcs11Uri {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// Whether byte `b` may appear unencoded in a value of `part`: RFC 7512's `pk11-pchar` and
/// `pk11-qchar` minus `pct-encoded`. Used both to check input and to encode output.
fn allowed_raw(b: u8, part: UriPart) -> bool {
    // unreserved (RFC 3986) and pk11-res-avail
    b.is_ascii_alphanumeric()
        || matches!(
            b,
            b'-' | b'.'
                | b'_'
                | b'~'
                | b':'
                | b'['
                | b']'
                | b'@'
                | b'!'
                | b'$'
                | b'\''
                | b'('
                | b')'
                | b'*'
                | b'+'
                | b','
                | b'='
        )
        || match part {
            // pk11-path-res-avail
            UriPart::Path => b == b'&',
            // pk11-query-res-avail
            UriPart::Query => matches!(b, b'/' | b'?' | b'|'),
        }
}

/// `x-` followed by at least one `pk11-v-attr-nm-char` (letter, digit, `-`, `_`).
fn is_vendor_name(name: &str) -> bool {
    name.strip_prefix("x-").is_some_and(|rest| {
        !rest.is_empty()
            && rest
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    })
}

fn hex_value(b: u8) -> Option<u8> {
    char::from(b)
        .to_digit(16)
        .and_then(|d| u8::try_from(d).ok())
}

/// Check the characters of `raw` against `part`'s set and percent-decode it, strictly.
fn decode(raw: &str, attribute: &str, part: UriPart) -> Result<Vec<u8>, UriError> {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'%' {
            let hi = bytes.get(i + 1).copied().and_then(hex_value);
            let lo = bytes.get(i + 2).copied().and_then(hex_value);
            let (Some(hi), Some(lo)) = (hi, lo) else {
                return Err(UriError::BadPercentEncoding {
                    attribute: attribute.to_owned(),
                    escape: raw.get(i..).unwrap_or_default().chars().take(3).collect(),
                });
            };
            out.push(hi * 16 + lo);
            i += 3;
        } else if allowed_raw(b, part) {
            out.push(b);
            i += 1;
        } else {
            // Only ASCII has been consumed so far, so `i` is on a character boundary.
            let character = raw
                .get(i..)
                .and_then(|s| s.chars().next())
                .unwrap_or(char::REPLACEMENT_CHARACTER);
            return Err(UriError::InvalidCharacter {
                attribute: attribute.to_owned(),
                character,
            });
        }
    }
    Ok(out)
}

fn invalid(attr: Attr, reason: String) -> UriError {
    UriError::InvalidValue {
        attribute: attr.name().to_owned(),
        reason,
    }
}

fn text(attr: Attr, bytes: Vec<u8>) -> Result<String, UriError> {
    String::from_utf8(bytes).map_err(|_| UriError::NotUtf8(attr.name().to_owned()))
}

/// `1*DIGIT [ "." 1*DIGIT ]`, each part a `CK_VERSION` byte.
fn library_version(value: String) -> Result<String, UriError> {
    let (major, minor) = match value.split_once('.') {
        Some((major, minor)) => (major, Some(minor)),
        None => (value.as_str(), None),
    };
    for number in std::iter::once(major).chain(minor) {
        if number.is_empty() || !number.bytes().all(|b| b.is_ascii_digit()) {
            return Err(invalid(
                Attr::LibraryVersion,
                format!("expected MAJOR or MAJOR.MINOR in decimal digits (e.g. 2 or 2.6), got {value:?}"),
            ));
        }
        if number.parse::<u8>().is_err() {
            return Err(invalid(
                Attr::LibraryVersion,
                format!("{number} is out of range: each part of a CK_VERSION is 0 to 255"),
            ));
        }
    }
    Ok(value)
}

/// `1*DIGIT`, a `CK_SLOT_ID`.
fn slot_id(value: &str) -> Result<u64, UriError> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid(
            Attr::SlotId,
            format!("expected a decimal number, got {value:?}"),
        ));
    }
    value.parse().map_err(|_| {
        invalid(
            Attr::SlotId,
            format!("{value} is out of range (at most {})", u64::MAX),
        )
    })
}

fn module_name(value: String) -> Result<String, UriError> {
    if value.is_empty() || value.contains(['/', '\0']) {
        return Err(invalid(
            Attr::ModuleName,
            format!(
                "expected a module name without directory (e.g. softhsm2), got {value:?}; \
                 give a path with module-path"
            ),
        ));
    }
    Ok(value)
}

fn module_path(value: String) -> Result<PathBuf, UriError> {
    if value.contains('\0') {
        return Err(invalid(
            Attr::ModulePath,
            "a path cannot contain a NUL byte".to_owned(),
        ));
    }
    if !Path::new(&value).is_absolute() {
        return Err(invalid(
            Attr::ModulePath,
            format!(
                "must be an absolute path (e.g. /usr/lib/softhsm/libsofthsm2.so), got {value:?}: \
                 a relative one would depend on the daemon's working directory and library search path"
            ),
        ));
    }
    Ok(PathBuf::from(value))
}

fn pin_source(value: String) -> Result<String, UriError> {
    if value.is_empty() || value.contains('\0') {
        return Err(invalid(
            Attr::PinSource,
            "expected where the PIN is, e.g. pin-source=file:/etc/keyward/token.pin".to_owned(),
        ));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Pkcs11Uri {
        match s.parse() {
            Ok(uri) => uri,
            Err(e) => panic!("{s:?} should parse: {e}"),
        }
    }

    fn err(s: &str) -> UriError {
        match s.parse::<Pkcs11Uri>() {
            Ok(uri) => panic!("{s:?} should not parse, got {uri:?}"),
            Err(e) => e,
        }
    }

    fn round_trip(uri: &Pkcs11Uri) {
        let printed = uri.to_string();
        assert_eq!(&parse(&printed), uri, "round trip through {printed:?}");
        // Printing is canonical: a second round gives the same text.
        assert_eq!(parse(&printed).to_string(), printed);
    }

    // RFC 7512 section 3 examples.

    #[test]
    fn rfc_empty_uri() {
        let uri = parse("pkcs11:");
        assert_eq!(uri, Pkcs11Uri::default());
        assert!(!uri.names_token());
        assert_eq!(uri.to_string(), "pkcs11:");
    }

    #[test]
    fn rfc_object_and_type() {
        let uri = parse("pkcs11:object=my-pubkey;type=public");
        assert_eq!(uri.object.as_deref(), Some("my-pubkey"));
        assert_eq!(uri.object_type, Some(ObjectType::Public));
        assert_eq!(uri.to_string(), "pkcs11:object=my-pubkey;type=public");
    }

    #[test]
    fn rfc_pin_source() {
        let uri = parse("pkcs11:object=my-key;type=private?pin-source=file:/etc/token");
        assert_eq!(uri.object.as_deref(), Some("my-key"));
        assert_eq!(uri.object_type, Some(ObjectType::Private));
        assert_eq!(uri.pin_source.as_deref(), Some("file:/etc/token"));
        assert_eq!(
            uri.to_string(),
            "pkcs11:object=my-key;type=private?pin-source=file:/etc/token"
        );
    }

    #[test]
    fn rfc_full_token_and_id() {
        let uri = parse(
            "pkcs11:token=The%20Software%20PKCS%2311%20Softtoken;\
             manufacturer=Snake%20Oil,%20Inc.;model=1.0;object=my-certificate;type=cert;\
             id=%69%95%3E%5C%F4%BE%2D%C5%B2%5B%8C%0A%99%9D%8E%1E%97%DB%C7%4F%03;serial=",
        );
        assert_eq!(uri.token.as_deref(), Some("The Software PKCS#11 Softtoken"));
        assert_eq!(uri.manufacturer.as_deref(), Some("Snake Oil, Inc."));
        assert_eq!(uri.model.as_deref(), Some("1.0"));
        assert_eq!(uri.object.as_deref(), Some("my-certificate"));
        assert_eq!(uri.object_type, Some(ObjectType::Cert));
        assert_eq!(
            uri.id.as_deref(),
            Some(
                &[
                    0x69, 0x95, 0x3e, 0x5c, 0xf4, 0xbe, 0x2d, 0xc5, 0xb2, 0x5b, 0x8c, 0x0a, 0x99,
                    0x9d, 0x8e, 0x1e, 0x97, 0xdb, 0xc7, 0x4f, 0x03
                ][..]
            )
        );
        assert_eq!(uri.serial.as_deref(), Some(""));
        assert!(uri.names_token());
        round_trip(&uri);
    }

    #[test]
    fn rfc_escaped_percent_and_semicolon() {
        let uri = parse(
            "pkcs11:token=A%20name%20with%20a%20substring%20%25%3B;object=my-certificate;type=cert",
        );
        assert_eq!(uri.token.as_deref(), Some("A name with a substring %;"));
        assert_eq!(
            uri.to_string(),
            "pkcs11:token=A%20name%20with%20a%20substring%20%25%3B;object=my-certificate;type=cert"
        );
    }

    #[test]
    fn rfc_utf8_label() {
        let uri = parse(
            "pkcs11:token=Name%20with%20a%20small%20A%20with%20acute:%20%C3%A1;\
             object=my-certificate;type=cert",
        );
        // 34 bytes: longer than CK_TOKEN_INFO.label, but it is the RFC's example, so no width check.
        assert_eq!(
            uri.token.as_deref(),
            Some("Name with a small A with acute: \u{e1}")
        );
        round_trip(&uri);
    }

    /// RFC 7512's vendor example uses names without "x-"; we refuse those (see the module docs).
    #[test]
    fn rfc_vendor_attributes_without_x_prefix_are_refused() {
        let e = err(
            "pkcs11:token=my-token;object=my-certificate;type=cert;vendor-aaa=value-a\
             ?pin-source=file:/etc/token&vendor-bbb=value-b",
        );
        assert_eq!(
            e,
            UriError::UnknownAttribute {
                name: "vendor-aaa".into(),
                part: UriPart::Path
            }
        );
        let e = err("pkcs11:token=my-token?pin-source=file:/etc/token&vendor-bbb=value-b");
        assert_eq!(
            e,
            UriError::UnknownAttribute {
                name: "vendor-bbb".into(),
                part: UriPart::Query
            }
        );
    }

    #[test]
    fn vendor_attributes_with_x_prefix_are_ignored() {
        let uri = parse(
            "pkcs11:token=my-token;object=my-certificate;type=cert;x-vendor-aaa=value-a\
             ?pin-source=file:/etc/token&x-vendor_bbb=value/b&x-vendor_bbb=again",
        );
        assert_eq!(uri.token.as_deref(), Some("my-token"));
        assert_eq!(uri.pin_source.as_deref(), Some("file:/etc/token"));
        assert_eq!(
            uri.to_string(),
            "pkcs11:token=my-token;object=my-certificate;type=cert?pin-source=file:/etc/token"
        );
        // Their syntax is still checked.
        assert!(matches!(
            err("pkcs11:x-a=%zz"),
            UriError::BadPercentEncoding { .. }
        ));
        assert!(matches!(
            err("pkcs11:x-=1"),
            UriError::UnknownAttribute { .. }
        ));
        assert!(matches!(
            err("pkcs11:x-a.b=1"),
            UriError::UnknownAttribute { .. }
        ));
    }

    #[test]
    fn rfc_other_examples() {
        let uri = parse("pkcs11:object=my-sign-key;type=private?module-name=mypkcs11");
        assert_eq!(uri.module_name.as_deref(), Some("mypkcs11"));
        let uri = parse("pkcs11:object=my-sign-key;type=private?module-path=/mnt/libmypkcs11.so.1");
        assert_eq!(
            uri.module_path.as_deref(),
            Some(Path::new("/mnt/libmypkcs11.so.1"))
        );
        assert_eq!(
            uri.to_string(),
            "pkcs11:object=my-sign-key;type=private?module-path=/mnt/libmypkcs11.so.1"
        );
        let uri = parse("pkcs11:slot-description=Sun%20Metaslot");
        assert_eq!(uri.slot_description.as_deref(), Some("Sun Metaslot"));
        let uri = parse(
            "pkcs11:library-manufacturer=Snake%20Oil,%20Inc.;\
             library-description=Soft%20Token%20Library;library-version=1.23",
        );
        assert_eq!(uri.library_manufacturer.as_deref(), Some("Snake Oil, Inc."));
        assert_eq!(
            uri.library_description.as_deref(),
            Some("Soft Token Library")
        );
        assert_eq!(uri.library_version.as_deref(), Some("1.23"));
        let uri = parse("pkcs11:token=Software%20PKCS%2311%20softtoken;slot-id=0");
        assert_eq!(uri.slot_id, Some(0));
        let uri = parse("pkcs11:token=my-token;type=secret-key;id=%01%02");
        assert_eq!(uri.object_type, Some(ObjectType::SecretKey));
        assert_eq!(uri.id.as_deref(), Some(&[1u8, 2][..]));
    }

    #[test]
    fn scheme_is_case_insensitive_names_are_not() {
        assert_eq!(parse("PKCS11:token=a").token.as_deref(), Some("a"));
        assert_eq!(parse("Pkcs11:token=a").to_string(), "pkcs11:token=a");
        let e = err("pkcs11:Token=a");
        assert!(matches!(e, UriError::UnknownAttribute { .. }));
        assert!(e.to_string().contains("lowercase"), "{e}");
    }

    #[test]
    fn empty_values_and_empty_query() {
        let uri = parse("pkcs11:token=;object=;id=");
        assert_eq!(uri.token.as_deref(), Some(""));
        assert_eq!(uri.object.as_deref(), Some(""));
        assert_eq!(uri.id.as_deref(), Some(&[][..]));
        round_trip(&uri);
        assert_eq!(parse("pkcs11:?"), Pkcs11Uri::default());
        assert_eq!(parse("pkcs11:token=a?").to_string(), "pkcs11:token=a");
        assert_eq!(
            parse("pkcs11:?module-name=softhsm2").to_string(),
            "pkcs11:?module-name=softhsm2"
        );
    }

    #[test]
    fn lowercase_hex_and_encoded_unreserved_are_accepted() {
        let uri = parse("pkcs11:token=%6d%79;id=%ab%CD");
        assert_eq!(uri.token.as_deref(), Some("my"));
        assert_eq!(uri.id.as_deref(), Some(&[0xab, 0xcd][..]));
        assert_eq!(uri.to_string(), "pkcs11:token=my;id=%AB%CD");
    }

    #[test]
    fn characters_allowed_per_part() {
        // '&' is plain in the path, '/', '?' and '|' in the query.
        let uri = parse("pkcs11:token=a&b;object=x=y?pin-source=file:/a?b|c");
        assert_eq!(uri.token.as_deref(), Some("a&b"));
        assert_eq!(uri.object.as_deref(), Some("x=y"));
        assert_eq!(uri.pin_source.as_deref(), Some("file:/a?b|c"));
        round_trip(&uri);
        assert_eq!(
            err("pkcs11:token=a/b"),
            UriError::InvalidCharacter {
                attribute: "token".into(),
                character: '/'
            }
        );
        assert_eq!(
            err("pkcs11:?pin-source=file:/a;b"),
            UriError::InvalidCharacter {
                attribute: "pin-source".into(),
                character: ';'
            }
        );
        let e = err("pkcs11:token=My Token");
        assert_eq!(
            e,
            UriError::InvalidCharacter {
                attribute: "token".into(),
                character: ' '
            }
        );
        assert!(e.to_string().contains("%20"), "{e}");
        let e = err("pkcs11:token=\u{e1}");
        assert!(e.to_string().contains("%C3%A1"), "{e}");
        assert!(matches!(
            err("pkcs11:token=a#frag"),
            UriError::InvalidCharacter { character: '#', .. }
        ));
    }

    // Malformed URIs.

    #[test]
    fn missing_scheme() {
        for s in [
            "",
            "token=a",
            "pkcs11",
            "pkcs12:token=a",
            "file:/etc/token",
            "\u{e1}\u{e1}\u{e1}\u{e1}",
        ] {
            assert_eq!(err(s), UriError::MissingScheme, "{s:?}");
        }
    }

    #[test]
    fn bad_percent_escape() {
        let e = err("pkcs11:token=a%G1b");
        assert_eq!(
            e,
            UriError::BadPercentEncoding {
                attribute: "token".into(),
                escape: "%G1".into()
            }
        );
        assert!(e.to_string().contains("\"token\""), "{e}");
        assert!(matches!(
            err("pkcs11:object=%\u{e1}"),
            UriError::BadPercentEncoding { .. }
        ));
    }

    #[test]
    fn truncated_percent_escape() {
        assert_eq!(
            err("pkcs11:id=%01%4"),
            UriError::BadPercentEncoding {
                attribute: "id".into(),
                escape: "%4".into()
            }
        );
        assert_eq!(
            err("pkcs11:object=x;id=%"),
            UriError::BadPercentEncoding {
                attribute: "id".into(),
                escape: "%".into()
            }
        );
    }

    #[test]
    fn duplicate_attribute() {
        assert_eq!(
            err("pkcs11:token=a;object=b;token=a"),
            UriError::DuplicateAttribute("token".into())
        );
        assert_eq!(
            err("pkcs11:?module-name=a&module-name=b"),
            UriError::DuplicateAttribute("module-name".into())
        );
    }

    #[test]
    fn unknown_attribute() {
        let e = err("pkcs11:tokn=a");
        assert_eq!(
            e,
            UriError::UnknownAttribute {
                name: "tokn".into(),
                part: UriPart::Path
            }
        );
        let msg = e.to_string();
        assert!(
            msg.starts_with("unknown attribute \"tokn\" in the path part of the PKCS#11 URI (known there: token, manufacturer, serial, model,"),
            "{msg}"
        );
        let msg = err("pkcs11:?modul-path=/x").to_string();
        assert!(
            msg.contains("known there: module-name, module-path, pin-source;"),
            "{msg}"
        );
    }

    #[test]
    fn misplaced_attribute() {
        assert_eq!(
            err("pkcs11:token=a;module-path=/usr/lib/x.so"),
            UriError::MisplacedAttribute {
                name: "module-path".into(),
                found: UriPart::Path
            }
        );
        assert_eq!(
            err("pkcs11:?token=a"),
            UriError::MisplacedAttribute {
                name: "token".into(),
                found: UriPart::Query
            }
        );
    }

    #[test]
    fn pin_value_is_refused_and_not_echoed() {
        for s in [
            "pkcs11:token=a?pin-value=123456",
            "pkcs11:token=a?pin-source=file:/x&pin-value=123456",
            "pkcs11:token=a;pin-value=123456",
            "pkcs11:token=a?x-pin-value=123456",
            "pkcs11:token=a?pin-value=123%456",
        ] {
            let e = err(s);
            assert_eq!(e, UriError::PinValueRefused, "{s:?}");
            let msg = e.to_string();
            assert!(!msg.contains("123"), "{msg}");
            assert!(msg.contains("pin-source=file:"), "{msg}");
            assert!(!format!("{e:?}").contains("123"));
        }
    }

    #[test]
    fn bad_type() {
        let e = err("pkcs11:type=secret");
        assert!(
            matches!(&e, UriError::InvalidValue { attribute, .. } if attribute == "type"),
            "{e:?}"
        );
        assert!(e.to_string().contains("secret-key"), "{e}");
        for s in ["pkcs11:type=Cert", "pkcs11:type=", "pkcs11:type=secret_key"] {
            assert!(matches!(err(s), UriError::InvalidValue { .. }), "{s:?}");
        }
    }

    #[test]
    fn bad_slot_id() {
        for s in [
            "pkcs11:slot-id=",
            "pkcs11:slot-id=-1",
            "pkcs11:slot-id=+1",
            "pkcs11:slot-id=0x10",
            "pkcs11:slot-id=1.0",
            "pkcs11:slot-id=18446744073709551616",
        ] {
            assert!(
                matches!(err(s), UriError::InvalidValue { ref attribute, .. } if attribute == "slot-id"),
                "{s:?}"
            );
        }
        assert_eq!(
            parse("pkcs11:slot-id=18446744073709551615").slot_id,
            Some(u64::MAX)
        );
        assert_eq!(parse("pkcs11:slot-id=007").slot_id, Some(7));
    }

    #[test]
    fn bad_library_version() {
        for s in ["2", "2.40", "0.0", "255.255"] {
            parse(&format!("pkcs11:library-version={s}"));
        }
        for s in ["", "2.", ".4", "2.4.1", "v2", "256", "1.256", "%20"] {
            assert!(
                matches!(
                    err(&format!("pkcs11:library-version={s}")),
                    UriError::InvalidValue { .. }
                ),
                "{s:?}"
            );
        }
    }

    #[test]
    fn relative_module_path() {
        let e = err("pkcs11:token=a?module-path=libsofthsm2.so");
        assert!(
            matches!(&e, UriError::InvalidValue { attribute, .. } if attribute == "module-path"),
            "{e:?}"
        );
        assert!(e.to_string().contains("absolute"), "{e}");
        assert!(matches!(
            err("pkcs11:?module-path="),
            UriError::InvalidValue { .. }
        ));
        assert!(matches!(
            err("pkcs11:?module-path=/usr/lib/x%00.so"),
            UriError::InvalidValue { .. }
        ));
    }

    #[test]
    fn bad_module_name_and_pin_source() {
        assert!(matches!(
            err("pkcs11:?module-name=/usr/lib/libx.so"),
            UriError::InvalidValue { .. }
        ));
        assert!(matches!(
            err("pkcs11:?module-name="),
            UriError::InvalidValue { .. }
        ));
        assert!(matches!(
            err("pkcs11:?pin-source="),
            UriError::InvalidValue { .. }
        ));
    }

    #[test]
    fn non_utf8_label() {
        assert_eq!(
            err("pkcs11:token=%C3%28"),
            UriError::NotUtf8("token".into())
        );
        assert_eq!(err("pkcs11:object=%FF"), UriError::NotUtf8("object".into()));
        // id takes any bytes.
        assert_eq!(
            parse("pkcs11:id=%FF%00").id.as_deref(),
            Some(&[0xff, 0][..])
        );
    }

    #[test]
    fn structural_errors() {
        for (s, part) in [
            ("pkcs11:;", UriPart::Path),
            ("pkcs11:token=a;", UriPart::Path),
            ("pkcs11:token=a;;object=b", UriPart::Path),
            ("pkcs11:=a", UriPart::Path),
            ("pkcs11:token=a?&", UriPart::Query),
            ("pkcs11:?=x", UriPart::Query),
        ] {
            assert_eq!(err(s), UriError::EmptyAttribute { part }, "{s:?}");
        }
        assert_eq!(
            err("pkcs11:token"),
            UriError::MissingEquals {
                segment: "token".into(),
                part: UriPart::Path
            }
        );
        assert!(matches!(
            err("pkcs11://token=a"),
            UriError::UnknownAttribute { .. }
        ));
    }

    #[test]
    fn length_limit() {
        let ok = format!("pkcs11:object={}", "o".repeat(MAX_URI_LEN - 14));
        assert_eq!(ok.len(), MAX_URI_LEN);
        parse(&ok);
        let long = format!("{ok}o");
        assert_eq!(
            err(&long),
            UriError::TooLong {
                len: MAX_URI_LEN + 1
            }
        );
    }

    #[test]
    fn errors_name_the_attribute() {
        for (s, attr) in [
            ("pkcs11:object=%G1", "\"object\""),
            ("pkcs11:model=%C3", "\"model\""),
            ("pkcs11:slot-id=x", "\"slot-id\""),
            ("pkcs11:token=a?module-path=rel", "\"module-path\""),
            ("pkcs11:token=a;token=b", "\"token\""),
        ] {
            let msg = err(s).to_string();
            assert!(msg.contains(attr), "{s:?}: {msg}");
        }
    }

    // Matching.

    fn token<'a>(label: &'a str, serial: &'a str) -> TokenFields<'a> {
        TokenFields {
            label,
            manufacturer: "SoftHSM project",
            serial,
            model: "SoftHSM v2",
        }
    }

    #[test]
    fn matches_token_cases() {
        let t = token("keyward", "a1b2c3d4");
        assert!(parse("pkcs11:").matches_token(&t));
        assert!(parse("pkcs11:token=keyward").matches_token(&t));
        assert!(parse("pkcs11:token=keyward;serial=a1b2c3d4").matches_token(&t));
        assert!(parse(
            "pkcs11:manufacturer=SoftHSM%20project;model=SoftHSM%20v2;object=k;type=private"
        )
        .matches_token(&t));
        assert!(!parse("pkcs11:token=keyward;serial=ffff").matches_token(&t));
        assert!(!parse("pkcs11:token=Keyward").matches_token(&t));
        assert!(!parse("pkcs11:token=keyw").matches_token(&t));
        assert!(!parse("pkcs11:token=").matches_token(&t));
        assert!(!parse("pkcs11:model=SoftHSM").matches_token(&t));
        // Padding is ignored on both sides.
        assert!(parse("pkcs11:token=keyward%20%20").matches_token(&t));
        assert!(parse("pkcs11:token=keyward").matches_token(&token("keyward   ", "x")));
        // An empty attribute matches an empty field only.
        assert!(parse("pkcs11:serial=").matches_token(&token("x", "")));
        assert!(!parse("pkcs11:serial=").matches_token(&t));
        // Non-token attributes don't take part.
        assert!(parse("pkcs11:token=keyward;slot-id=99;library-version=9").matches_token(&t));
    }

    #[test]
    fn names_token_cases() {
        assert!(!parse("pkcs11:").names_token());
        assert!(!parse("pkcs11:object=k;type=private;id=%01;slot-id=1").names_token());
        assert!(!parse("pkcs11:?module-path=/usr/lib/x.so").names_token());
        assert!(parse("pkcs11:token=a").names_token());
        assert!(parse("pkcs11:manufacturer=m").names_token());
        assert!(parse("pkcs11:serial=1").names_token());
        assert!(parse("pkcs11:model=x").names_token());
    }

    // Printing.

    #[test]
    fn display_is_canonical() {
        let uri = parse(
            "pkcs11:type=private;id=%4b%57;object=k;serial=1;token=t\
             ?pin-source=file:/etc/p&module-path=/usr/lib/x.so&module-name=x",
        );
        assert_eq!(
            uri.to_string(),
            "pkcs11:token=t;serial=1;object=k;type=private;id=%4B%57\
             ?module-name=x&module-path=/usr/lib/x.so&pin-source=file:/etc/p"
        );
    }

    #[test]
    fn display_round_trips() {
        let all_bytes: Vec<u8> = (0..=255).collect();
        let awkward: String = (1..128u8).map(char::from).chain("é€😀".chars()).collect();
        let uris = [
            Pkcs11Uri::default(),
            Pkcs11Uri {
                token: Some("The Software PKCS#11 Softtoken".into()),
                manufacturer: Some("Snake Oil, Inc.".into()),
                serial: Some(String::new()),
                model: Some("1.0".into()),
                library_manufacturer: Some("lib & co; ok?".into()),
                library_description: Some("100% [soft] 'token'".into()),
                library_version: Some("2.40".into()),
                slot_manufacturer: Some("slot/maker|x".into()),
                slot_description: Some("=a=b=".into()),
                slot_id: Some(u64::MAX),
                object: Some(awkward.clone()),
                id: Some(all_bytes),
                object_type: Some(ObjectType::SecretKey),
                module_path: Some(PathBuf::from("/opt/my token/lib;x&y?.so")),
                module_name: Some("my%module&".into()),
                pin_source: Some("file:/etc/keyward/pin#1 & 2;3|4?5".into()),
            },
            Pkcs11Uri {
                object: Some("\u{0}\t\n\r%25".into()),
                ..Pkcs11Uri::default()
            },
            Pkcs11Uri {
                pin_source: Some(awkward),
                ..Pkcs11Uri::default()
            },
            Pkcs11Uri {
                id: Some(Vec::new()),
                object_type: Some(ObjectType::Data),
                ..Pkcs11Uri::default()
            },
        ];
        for uri in &uris {
            round_trip(uri);
        }
        for t in ObjectType::ALL {
            round_trip(&Pkcs11Uri {
                object_type: Some(t),
                ..Pkcs11Uri::default()
            });
        }
    }

    #[test]
    fn display_encodes_exactly_outside_the_rfc_sets() {
        for b in 1..=255u8 {
            // A two-byte UTF-8 character for non-ASCII bytes: always encoded.
            let c = char::from(b);
            let uri = Pkcs11Uri {
                object: Some(c.to_string()),
                pin_source: Some(c.to_string()),
                ..Pkcs11Uri::default()
            };
            let printed = uri.to_string();
            let path_raw = b.is_ascii_alphanumeric() || b"-._~:[]@!$'()*+,=&".contains(&b);
            let query_raw = b.is_ascii_alphanumeric() || b"-._~:[]@!$'()*+,=/?|".contains(&b);
            let expect = |raw: bool| {
                if raw {
                    c.to_string()
                } else {
                    encode_char(c)
                }
            };
            assert_eq!(
                printed,
                format!(
                    "pkcs11:object={}?pin-source={}",
                    expect(path_raw),
                    expect(query_raw)
                ),
                "byte {b:#04x}"
            );
            round_trip(&uri);
        }
    }

    #[test]
    fn serde_uses_the_uri_string() {
        let uri = parse("pkcs11:token=my%20token;id=%01");
        let json = serde_json::to_string(&uri).unwrap();
        assert_eq!(json, "\"pkcs11:token=my%20token;id=%01\"");
        assert_eq!(serde_json::from_str::<Pkcs11Uri>(&json).unwrap(), uri);
        let e = serde_json::from_str::<Pkcs11Uri>("\"pkcs11:token=a?pin-value=1\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("pin-source"), "{e}");
    }

    #[test]
    fn object_type_names() {
        for t in ObjectType::ALL {
            assert_eq!(t.as_str().parse::<ObjectType>().unwrap(), t);
            assert_eq!(t.to_string(), t.as_str());
        }
        assert!("Private".parse::<ObjectType>().is_err());
    }
}

/// Generated round trips and bad input: any URI Keyward can hold prints to text that parses
/// back to it, and no input makes the parser panic.
#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::collection::vec;
    use proptest::option::of;
    use proptest::prelude::*;

    /// Any text, control characters and non-ASCII included, up to `max` characters.
    fn text(max: usize) -> impl Strategy<Value = String> {
        vec(any::<char>(), 0..=max).prop_map(String::from_iter)
    }

    /// Text without `forbidden` characters, at least one character long.
    fn text_without(forbidden: &'static [char], max: usize) -> impl Strategy<Value = String> {
        vec(
            any::<char>().prop_filter("forbidden", move |c| !forbidden.contains(c)),
            1..=max,
        )
        .prop_map(String::from_iter)
    }

    fn object_type() -> impl Strategy<Value = ObjectType> {
        proptest::sample::select(ObjectType::ALL.to_vec())
    }

    /// Every value the parser can produce, so every field can be exercised. Sixteen fields of
    /// at most 12 characters (12 bytes after percent-encoding each) stay under `MAX_URI_LEN`.
    fn uri() -> impl Strategy<Value = Pkcs11Uri> {
        let token = (of(text(12)), of(text(12)), of(text(12)), of(text(12)));
        let library = (
            of(text(12)),
            of(text(12)),
            of((any::<u8>(), of(any::<u8>()))),
        );
        let slot = (of(text(12)), of(text(12)), of(any::<u64>()));
        let object = (of(text(12)), of(vec(any::<u8>(), 0..32)), of(object_type()));
        let query = (
            of(text_without(&['\0'], 12).prop_map(|p| PathBuf::from(format!("/{p}")))),
            of(text_without(&['/', '\0'], 12)),
            of(text_without(&['\0'], 12)),
        );
        (token, library, slot, object, query).prop_map(
            |(
                (token, manufacturer, serial, model),
                (library_manufacturer, library_description, version),
                (slot_manufacturer, slot_description, slot_id),
                (object, id, object_type),
                (module_path, module_name, pin_source),
            )| Pkcs11Uri {
                token,
                manufacturer,
                serial,
                model,
                library_manufacturer,
                library_description,
                library_version: version.map(|(major, minor)| match minor {
                    Some(minor) => format!("{major}.{minor}"),
                    None => major.to_string(),
                }),
                slot_manufacturer,
                slot_description,
                slot_id,
                object,
                id,
                object_type,
                module_path,
                module_name,
                pin_source,
            },
        )
    }

    /// Input shaped like a URI: the scheme, then segments built from attribute names (known,
    /// vendor, misspelt, misplaced) and values of characters the grammar cares about.
    fn uri_like() -> impl Strategy<Value = String> {
        let name = prop_oneof![
            proptest::sample::select(Attr::ALL.map(Attr::name).to_vec()).prop_map(str::to_owned),
            Just("x-vendor".to_owned()),
            Just("pin-value".to_owned()),
            Just("Token".to_owned()),
            "[a-z-]{0,6}",
        ];
        let value = "([a-zA-Z0-9/?|&;=%:._~ -]|%[0-9a-fA-F]{2}|%[0-9a-zA-Z]?){0,8}";
        let segment = (name, of(value)).prop_map(|(name, value)| match value {
            Some(value) => format!("{name}={value}"),
            None => name,
        });
        (
            proptest::sample::select(vec!["pkcs11:", "PKCS11:", "pkcs11", ""]),
            vec(segment, 0..5),
            of(vec(
                (
                    proptest::sample::select(vec!["pin-source", "module-name", "module-path"]),
                    "[a-z/%0-9?]{0,8}",
                ),
                0..4,
            )),
        )
            .prop_map(|(scheme, path, query)| {
                let mut s = format!("{scheme}{}", path.join(";"));
                if let Some(query) = query {
                    let query: Vec<String> =
                        query.into_iter().map(|(n, v)| format!("{n}={v}")).collect();
                    s.push('?');
                    s.push_str(&query.join("&"));
                }
                s
            })
    }

    /// What every accepted input must satisfy: its canonical form parses back to the same
    /// URI and prints the same again.
    fn check_canonical(uri: &Pkcs11Uri) -> Result<(), TestCaseError> {
        let printed = uri.to_string();
        let back = printed.parse::<Pkcs11Uri>();
        prop_assert_eq!(back.as_ref(), Ok(uri), "through {:?}", printed);
        prop_assert_eq!(back.map(|u| u.to_string()), Ok(printed));
        Ok(())
    }

    proptest! {
        #[test]
        fn display_then_parse_is_the_identity(uri in uri()) {
            check_canonical(&uri)?;
        }

        #[test]
        fn arbitrary_text_never_panics(s in text(200)) {
            if let Ok(uri) = s.parse::<Pkcs11Uri>() {
                check_canonical(&uri)?;
            }
        }

        #[test]
        fn uri_shaped_input_never_panics_and_what_parses_is_canonical(s in uri_like()) {
            match s.parse::<Pkcs11Uri>() {
                Ok(uri) => check_canonical(&uri)?,
                // A PIN is refused and never echoed.
                Err(e @ UriError::PinValueRefused) => {
                    prop_assert!(!e.to_string().contains("pin-value="));
                }
                Err(_) => {}
            }
        }

        /// Percent-encoding characters that need none, in either hex case, changes nothing.
        #[test]
        fn needless_escapes_read_the_same(
            label in "[a-zA-Z0-9._~-]{1,20}",
            mask in vec(any::<(bool, bool)>(), 20),
        ) {
            let escaped: String = label
                .bytes()
                .zip(mask)
                .map(|(b, (escape, lower))| match (escape, lower) {
                    (false, _) => char::from(b).to_string(),
                    (true, false) => format!("%{b:02X}"),
                    (true, true) => format!("%{b:02x}"),
                })
                .collect();
            let uri: Pkcs11Uri = format!("pkcs11:token={escaped}").parse().map_err(|e: UriError| {
                TestCaseError::fail(e.to_string())
            })?;
            prop_assert_eq!(uri.token.as_deref(), Some(label.as_str()));
            prop_assert_eq!(uri.to_string(), format!("pkcs11:token={label}"));
        }

        /// A URI naming a token by label matches that token whatever its padding, and no other.
        #[test]
        fn a_label_matches_itself_padded(label in text(12), pad in 0usize..32, other in text(12)) {
            let uri = Pkcs11Uri { token: Some(label.clone()), ..Pkcs11Uri::default() };
            let padded = format!("{label}{}", " ".repeat(pad));
            let token = |label| TokenFields { label, manufacturer: "m", serial: "s", model: "x" };
            prop_assert!(uri.matches_token(&token(&padded)));
            prop_assert_eq!(
                uri.matches_token(&token(&other)),
                other.trim_end_matches(' ') == label.trim_end_matches(' ')
            );
        }
    }

    /// `id` is printed fully percent-encoded, three bytes for each raw one: an input that fits
    /// but whose canonical form would not is refused, so everything accepted can be written
    /// out and read back.
    #[test]
    fn a_uri_whose_canonical_form_would_not_fit_is_refused() {
        let prefix = "pkcs11:id=";
        let uri = format!("{prefix}{}", "a".repeat(MAX_URI_LEN - prefix.len()));
        let printed = match uri.parse::<Pkcs11Uri>() {
            Ok(parsed) => parsed.to_string(),
            Err(UriError::TooLong { len }) => {
                assert_eq!(
                    len,
                    uri.len() * 3 - 2 * prefix.len(),
                    "the canonical length"
                );
                return;
            }
            Err(e) => panic!("{e}"),
        };
        let back = printed.parse::<Pkcs11Uri>();
        assert!(back.is_ok(), "{} bytes: {back:?}", printed.len());
        // At the limit exactly, in canonical form: accepted.
        let fits = format!("{prefix}{}", "%61".repeat((MAX_URI_LEN - prefix.len()) / 3));
        let parsed: Pkcs11Uri = fits.parse().unwrap();
        assert_eq!(parsed.to_string(), fits);
    }
}
