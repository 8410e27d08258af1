//! The audit log's format, defined once for the daemon that writes it and the `keyward audit`
//! commands that read it, and its offline verification.
//!
//! `audit.log` is one JSON object per line. Every line carries `seq` (0, 1, 2, ...), `time`
//! (RFC 3339 UTC, milliseconds) and `prev`: the hex SHA-256 of the previous line's exact bytes
//! (without its newline; 64 zeros for the first line). That hash chain ties each record to
//! every record before it, so a record can't be edited, removed, inserted or moved without
//! breaking the chain at that point. Records come in four kinds:
//!
//! - `request`: one call — who (`caller`: uid, gid, pid, systemd unit, transport), `op`,
//!   `target` (a secret or key name, a keyslot, or `vault`; never a value, PIN, share or digest)
//!   and `result` (`ok`, `started` for the record a mutation writes before it runs, or the
//!   error's stable wire name). An outcome record names its `started` record in `intent`, and
//!   a call the policy allowed names the rule that did in `rule`. A secret's put or delete has
//!   no `started` record: its record was committed in the same database transaction as the
//!   change and appended here afterwards, and carries its number in that outbox (`outbox`).
//! - `event`: the daemon starting or stopping.
//! - `checkpoint`: an Ed25519 signature by the vault's audit key over the chain head (its own
//!   `seq`, `prev`, `time`, `reason`, `public_key` and `next_public_key`), so one signature
//!   covers every record before it. A checkpoint that names `next_public_key` hands the log
//!   over to the vault's next key (a rekey); the hand-over is pending while later checkpoints
//!   keep naming it, done at the first checkpoint the new key signs, and called off by a
//!   checkpoint of the old key that no longer names it.
//! - `resume`: written by the daemon after bytes it found damaged (a write cut short by a
//!   crash or a full disk). The damaged bytes stay where they are; the resume record gives their
//!   length and SHA-256 and continues the chain from the last good record, so history is
//!   never silently rewritten and [`verify`] can say exactly what was lost.
//!
//! Any record but a checkpoint may also carry `lost`: records the daemon could not write
//! before it (the state directory's file system was full) and answered all the same. Only
//! `Status` calls are answered that way (read-only, nothing secret, and how an admin finds out
//! the disk is full); `lost` gives how many, the times of the first and the last, and why, so
//! the gap in the log is declared, not silent. It is part of its line, so the chain covers it,
//! and [`verify`] reports it.
//!
//! Public keys are base64 DER SubjectPublicKeyInfo everywhere (records, `Status`), and PEM in
//! `audit.pub`.
//!
//! **Files.** The daemon rolls `audit.log` over at a size limit: the full file becomes
//! `audit.log.N` (1, 2, ... oldest first) and the new `audit.log` starts with a `continued`
//! event that carries on the seq and the chain (its `prev` is the hash of the last line of the
//! file before), so the set, read in order, is one log. [`verify`] takes the set's bytes in
//! order ([`set_in`] lists it); a set that starts at a `continued` record (older files removed)
//! verifies from there and says where it starts.
//!
//! **Anchor.** At every checkpoint the daemon also signs an [`Anchor`]: the checkpoint's seq and
//! the hash of its line, with the same key. It keeps the newest in `audit.anchor` beside the log
//! and checks the log against it when the vault opens; `verify` checks a log against an anchor
//! given to it (or `audit.anchor` beside it) and against `--expect-seq`. An anchor catches what
//! the chain alone can't: a log cut short after a checkpoint ([`Problem::Truncated`]), and a log
//! rewritten from an earlier checkpoint on with its seq renumbered and its chain recomputed
//! ([`Problem::AnchorMismatch`]): nobody without the VMK can sign an anchor.
//!
//! The daemon's check at start reads only from the anchored record on ([`verify_from`]): the
//! anchor's `offset` says where its line starts, and the line there must hash to the anchor's
//! `head` ([`find_anchored`] reads the files for it when there is no offset, or it leads
//! elsewhere). That is the part of the log no checkpoint signs yet; what comes before the
//! anchored record is committed to by its `prev`, and `verify` of the whole log checks it.
//!
//! What verification still can't see: records after the anchored checkpoint are protected only
//! by the chain (they were written while sealed, or since the last checkpoint), so an edit
//! among them that recomputes the chain passes. A log rolled back together with its anchor to
//! an older pair (both copied from a backup) passes offline; against the `--expect-seq` or
//! anchor you kept elsewhere (or the checkpoints the daemon copies to the journal) it does not.
//! And a log whose every record and key were replaced passes against the `audit.pub` beside it
//! if that was replaced too: pin the key from `keyward status`, kept elsewhere, with
//! `--public-key`.

use std::fmt::{self, Write as _};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use ed25519_dalek::{Signature, Verifier as _, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

pub use crate::text::hex;
use crate::text::public_key_pem;

/// The log's file name in the state directory.
pub const LOG_FILE: &str = "audit.log";
/// The signing public key's file name, beside the log.
pub const PUBLIC_KEY_FILE: &str = "audit.pub";
/// The newest anchor's file name, beside the log.
pub const ANCHOR_FILE: &str = "audit.anchor";
/// `event` of the first record of a file the log rolled over to.
pub const CONTINUED: &str = "continued";
/// `event` of the first record of a new log the daemon started because the old one did not
/// match its anchor; `detail` says what it found.
pub const NEW_LOG: &str = "new-log";
/// The `prev` of the first record.
pub const GENESIS: [u8; 32] = [0; 32];
/// `result` of the record a mutation writes before it runs.
pub const STARTED: &str = "started";
/// `result` of a request that succeeded.
pub const OK: &str = "ok";

/// What a checkpoint's signature covers starts with this, so the signature means nothing
/// anywhere else.
const SIGNING_CONTEXT: &[u8] = b"keyward audit checkpoint v1\0";

/// What an anchor's signature covers starts with this.
const ANCHOR_CONTEXT: &[u8] = b"keyward audit anchor v1\0";

/// DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410): SEQUENCE { SEQUENCE { OID
/// 1.3.101.112 }, BIT STRING { 32 bytes } }.
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// One line of the log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Position in the chain: the previous record's plus one, from 0.
    pub seq: u64,
    /// When it was written, RFC 3339 UTC with milliseconds.
    pub time: String,
    /// What kind of record, and its fields.
    #[serde(flatten)]
    pub body: Body,
    /// Records the daemon could not write before this one, declared here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lost: Option<Lost>,
    /// Hex SHA-256 of the previous line's exact bytes.
    pub prev: String,
}

/// The kinds of record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Body {
    /// One call of the API or the credential socket.
    Request(RequestRecord),
    /// The daemon started or stopped.
    Event(EventRecord),
    /// A signature over the chain head.
    Checkpoint(Checkpoint),
    /// The chain continues after damaged bytes.
    Resume(Resume),
}

/// Who called, as the kernel said when the client connected.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallerRecord {
    pub uid: u32,
    pub gid: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<i32>,
    /// The caller's systemd unit, when it runs in one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    /// `varlink`, `dbus`, `credentials` or `daemon`.
    pub via: String,
}

/// A request record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestRecord {
    pub caller: CallerRecord,
    /// The method (`GetSecret`), or `Credential` for the credential socket.
    pub op: String,
    /// A secret or key name, `keyslot N`, or `vault`. Never a value.
    pub target: String,
    /// `ok`, `started`, or the error's wire name (`PermissionDenied`).
    pub result: String,
    /// On an outcome record: the seq of the `started` record it closes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intent: Option<u64>,
    /// More about the target (the credential id, the kind of keyslot), never a secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// The number (1-based, in file order) of the policy rule that allowed the call; absent
    /// when it was refused or no rule decides it (`Status`, lists filtered name by name, the
    /// credential socket's map).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<u32>,
    /// On the record of a secret's put or delete: its number in the daemon's audit outbox,
    /// the table the record was committed to in the same transaction as the change. The daemon
    /// appends each outbox record to the log once, in this order; after a crash it finds by
    /// this number which ones the log already holds. Absent on every other record (and on
    /// logs written before the outbox).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outbox: Option<u64>,
}

/// An event record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventRecord {
    /// `start` or `stop`.
    pub event: String,
    pub detail: String,
}

/// A checkpoint record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    /// Why it was written: `unsealed`, `sealed`, `admin`, `periodic`, `stop`, `rekey`, ...
    pub reason: String,
    /// The signer, base64 DER SubjectPublicKeyInfo.
    pub public_key: String,
    /// The key the log is being handed over to (a rekey in progress).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_public_key: Option<String>,
    /// Base64 Ed25519 signature over [`checkpoint_message`].
    pub signature: String,
}

/// A resume record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resume {
    /// Length of the damaged bytes before this record (the newline the daemon added to end
    /// them not counted).
    pub damaged_bytes: u64,
    /// Hex SHA-256 of those bytes.
    pub damaged_sha256: String,
    pub reason: String,
}

/// Records of `Status` calls the daemon answered without writing them (the state directory's
/// file system was full), declared by the next record it could write.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lost {
    /// How many (at least 1).
    pub records: u64,
    /// When the first of them was due (RFC 3339 UTC, milliseconds).
    pub first: String,
    /// When the last of them was due.
    pub last: String,
    /// Why they could not be written (the write's error).
    pub reason: String,
}

/// SHA-256 of a line's bytes (without its newline): the next record's `prev`.
pub fn line_hash(line: &[u8]) -> [u8; 32] {
    Sha256::digest(line).into()
}

/// What a checkpoint's signature covers: a fixed context string, then the chain head
/// (`seq`, the previous line's hash) and every other field of the checkpoint, each
/// length-prefixed so no two checkpoints share a message.
pub fn checkpoint_message(
    seq: u64,
    prev: &[u8; 32],
    time: &str,
    reason: &str,
    public_key: &VerifyingKey,
    next_public_key: Option<&VerifyingKey>,
) -> Vec<u8> {
    let mut m = Vec::with_capacity(SIGNING_CONTEXT.len() + 160 + time.len() + reason.len());
    m.extend_from_slice(SIGNING_CONTEXT);
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(prev);
    for field in [time.as_bytes(), reason.as_bytes()] {
        m.extend_from_slice(&(field.len() as u64).to_be_bytes());
        m.extend_from_slice(field);
    }
    m.extend_from_slice(public_key.as_bytes());
    match next_public_key {
        Some(k) => {
            m.push(1);
            m.extend_from_slice(k.as_bytes());
        }
        None => m.push(0),
    }
    m
}

/// A signed statement of where the log stood at a checkpoint: its `seq` and the hash of its
/// line (`head`). Signed by the checkpoint's key, so only the holder of the VMK can make one;
/// one that names `next_public_key` was signed at a rekey's hand-over.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Anchor {
    /// The checkpoint's seq.
    pub seq: u64,
    /// Hex SHA-256 of the checkpoint's line.
    pub head: String,
    /// When it was signed.
    pub time: String,
    /// The signer, base64 DER SubjectPublicKeyInfo.
    pub public_key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_public_key: Option<String>,
    /// The TPM NV counter value this anchor was written under, when the daemon keeps one:
    /// the counter only goes up, so an anchor put back after a newer one was written is older
    /// than the counter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counter: Option<u64>,
    /// Base64 Ed25519 signature over [`anchor_message`].
    pub signature: String,
    /// Where the anchored record's line starts (bytes) in the file that holds it: where the
    /// daemon's check at start begins to read, so that it reads the records after the anchor
    /// and none before it. Not signed, and it need not be: it is only a hint, and the line found
    /// there must hash to `head` (else the files are searched for the anchored record, as for
    /// an anchor written before the field existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
}

/// What an anchor's signature covers: a fixed context, then every other field.
pub fn anchor_message(
    seq: u64,
    head: &[u8; 32],
    time: &str,
    public_key: &VerifyingKey,
    next_public_key: Option<&VerifyingKey>,
    counter: Option<u64>,
) -> Vec<u8> {
    let mut m = Vec::with_capacity(ANCHOR_CONTEXT.len() + 130 + time.len());
    m.extend_from_slice(ANCHOR_CONTEXT);
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(head);
    m.extend_from_slice(&(time.len() as u64).to_be_bytes());
    m.extend_from_slice(time.as_bytes());
    m.extend_from_slice(public_key.as_bytes());
    match next_public_key {
        Some(k) => {
            m.push(1);
            m.extend_from_slice(k.as_bytes());
        }
        None => m.push(0),
    }
    match counter {
        Some(c) => {
            m.push(1);
            m.extend_from_slice(&c.to_be_bytes());
        }
        None => m.push(0),
    }
    m
}

/// An anchor whose fields and signature checked out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckedAnchor {
    pub seq: u64,
    pub head: [u8; 32],
    pub key: VerifyingKey,
    pub next: Option<VerifyingKey>,
    pub counter: Option<u64>,
    /// [`Anchor::offset`], unchecked (a hint).
    pub offset: Option<u64>,
}

impl Anchor {
    /// Read one (the JSON of `audit.anchor`).
    ///
    /// # Errors
    /// The JSON error when it is not one.
    pub fn parse(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }

    /// Check the signature against the key the anchor names; who that key is, the caller
    /// decides.
    ///
    /// # Errors
    /// A malformed field or a signature that does not verify.
    pub fn check(&self) -> Result<CheckedAnchor, Problem> {
        let key = decode_key(&self.public_key).map_err(|_| Problem::Malformed("anchor key"))?;
        let next = self
            .next_public_key
            .as_deref()
            .map(decode_key)
            .transpose()
            .map_err(|_| Problem::Malformed("anchor next key"))?;
        let head = unhex32(&self.head).ok_or(Problem::Malformed("anchor head"))?;
        let signature = B64
            .decode(self.signature.as_bytes())
            .ok()
            .and_then(|b| Signature::from_slice(&b).ok())
            .ok_or(Problem::Malformed("anchor signature"))?;
        let message = anchor_message(
            self.seq,
            &head,
            &self.time,
            &key,
            next.as_ref(),
            self.counter,
        );
        key.verify(&message, &signature)
            .map_err(|_| Problem::BadAnchor)?;
        Ok(CheckedAnchor {
            seq: self.seq,
            head,
            key,
            next,
            counter: self.counter,
            offset: self.offset,
        })
    }
}

/// The files of the log in `dir`, oldest first: `audit.log.1`, `audit.log.2`, ... then
/// `audit.log` (those that exist).
///
/// # Errors
/// The directory can't be read.
pub fn set_in(dir: &std::path::Path) -> std::io::Result<Vec<std::path::PathBuf>> {
    let mut rolled: Vec<(u64, std::path::PathBuf)> = Vec::new();
    let prefix = format!("{LOG_FILE}.");
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(n) = name
            .to_str()
            .and_then(|n| n.strip_prefix(&prefix))
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        rolled.push((n, entry.path()));
    }
    rolled.sort();
    let mut out: Vec<_> = rolled.into_iter().map(|(_, p)| p).collect();
    let live = dir.join(LOG_FILE);
    if live.exists() {
        out.push(live);
    }
    Ok(out)
}

/// A key that could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("not base64")]
    Base64,
    #[error("not an Ed25519 public key (DER SubjectPublicKeyInfo, PEM, or 32 raw bytes)")]
    NotEd25519,
}

/// A public key as DER SubjectPublicKeyInfo.
pub fn spki_der(key: &VerifyingKey) -> Vec<u8> {
    let mut der = ED25519_SPKI_PREFIX.to_vec();
    der.extend_from_slice(key.as_bytes());
    der
}

/// A public key as base64 DER SubjectPublicKeyInfo (records, `Status`).
pub fn encode_key(key: &VerifyingKey) -> String {
    B64.encode(spki_der(key))
}

/// A public key as PEM (`audit.pub`).
pub fn pem(key: &VerifyingKey) -> String {
    public_key_pem(&spki_der(key))
}

/// A public key from PEM, base64 DER SubjectPublicKeyInfo, or base64 of the 32 raw bytes.
///
/// # Errors
/// [`KeyError`] when it is none of those.
pub fn decode_key(text: &str) -> Result<VerifyingKey, KeyError> {
    let body: String = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with("-----"))
        .collect();
    let bytes = B64.decode(body.as_bytes()).map_err(|_| KeyError::Base64)?;
    let raw: &[u8] = match bytes.strip_prefix(&ED25519_SPKI_PREFIX[..]) {
        Some(raw) => raw,
        None => &bytes,
    };
    let raw: &[u8; 32] = raw.try_into().map_err(|_| KeyError::NotEd25519)?;
    VerifyingKey::from_bytes(raw).map_err(|_| KeyError::NotEd25519)
}

/// `t` as RFC 3339 UTC with milliseconds (`2025-01-31T12:00:00.123Z`).
pub fn rfc3339_millis(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs().min(253_402_300_799);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (hour, minute, second) = (rem / 3600, rem % 3600 / 60, rem % 60);
    // Howard Hinnant's civil_from_days; `days` is at most ~2.9 million, so i64 is ample.
    let z = i64::try_from(days).unwrap_or(0) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    // Digit by digit rather than `format!`: once per record, on the read path.
    let mut out = *b"0000-00-00T00:00:00.000Z";
    let mut put = |at: usize, width: usize, mut v: u64| {
        for i in (at..at + width).rev() {
            out[i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(0, 4, u64::try_from(year).unwrap_or(0));
    put(5, 2, u64::try_from(month).unwrap_or(0));
    put(8, 2, u64::try_from(day).unwrap_or(0));
    put(11, 2, hour);
    put(14, 2, minute);
    put(17, 2, second);
    put(20, 3, u64::from(d.subsec_millis()));
    out.iter().map(|&b| char::from(b)).collect()
}

/// One line of a log file, with where it starts.
#[derive(Clone, Copy, Debug)]
pub struct Line<'a> {
    /// Byte offset of its first byte.
    pub start: usize,
    /// Its bytes, without the newline.
    pub bytes: &'a [u8],
    /// Whether a newline ends it (only a cut-off last line has none).
    pub complete: bool,
}

/// The lines of a log, newline-terminated but for perhaps the last.
pub fn lines(log: &[u8]) -> Vec<Line<'_>> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < log.len() {
        match log[start..].iter().position(|&b| b == b'\n') {
            Some(n) => {
                out.push(Line {
                    start,
                    bytes: &log[start..start + n],
                    complete: true,
                });
                start += n + 1;
            }
            None => {
                out.push(Line {
                    start,
                    bytes: &log[start..],
                    complete: false,
                });
                start = log.len();
            }
        }
    }
    out
}

/// Parse one line as a record.
///
/// # Errors
/// The JSON error when it is not one.
pub fn parse(line: &[u8]) -> Result<Record, serde_json::Error> {
    serde_json::from_slice(line)
}

/// A checkpoint that verified.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CheckpointSummary {
    /// 1-based line number.
    pub line: usize,
    pub seq: u64,
    pub time: String,
    pub reason: String,
    pub public_key: String,
}

/// Damaged bytes the daemon noted with a resume record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Damage {
    /// 1-based line number where the damaged bytes start.
    pub line: usize,
    pub bytes: u64,
    /// The seq of the resume record that noted them.
    pub noted_at_seq: u64,
}

/// Records a later record declares were not written.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LostRecords {
    /// 1-based line number of the record that declares them.
    pub line: usize,
    /// Its seq: the lost records were due before it.
    pub declared_at_seq: u64,
    pub records: u64,
    pub first: String,
    pub last: String,
    pub reason: String,
}

/// What a successful verification found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Report {
    /// Records in the log.
    pub records: u64,
    /// The first record's seq: 0, unless the files given start at a `continued` record.
    pub first_seq: u64,
    /// The last record's seq.
    pub last_seq: u64,
    pub checkpoints: u64,
    /// The last checkpoint: every record up to it is signed (through the chain).
    pub last_checkpoint: CheckpointSummary,
    /// Records after the last checkpoint, protected only by the chain.
    pub unsigned_tail: u64,
    /// The signing keys in the order the log was handed over between them.
    pub keys: Vec<String>,
    /// Damaged bytes the daemon noted and continued after.
    pub damage: Vec<Damage>,
    /// Records the daemon declared it could not write (a full disk), where it declared them.
    pub lost: Vec<LostRecords>,
    /// The seq of the anchor the log was checked against, if one was given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub anchored_seq: Option<u64>,
}

/// What the log must hold beyond its own consistency.
#[derive(Clone, Copy, Debug, Default)]
pub struct Expect<'a> {
    /// The record at the anchor's seq must be the one it signed (so the log reaches it).
    pub anchor: Option<&'a CheckedAnchor>,
    /// The log must reach this seq.
    pub last_seq: Option<u64>,
}

/// Why a log does not verify.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    #[error("not a record: {0}")]
    Unreadable(String),
    #[error("the last line is incomplete: the log was cut inside a record")]
    Incomplete,
    #[error("the log holds no record")]
    Empty,
    #[error("altered: the next record's hash of it does not match")]
    Altered,
    #[error("altered: it says seq {found} where seq {expected} is due")]
    WrongSeq { expected: u64, found: u64 },
    #[error("inserted or moved here: the record after it follows the record before it")]
    Inserted,
    #[error("out of order: seq {expected} is due here and comes later, at line {at_line}")]
    OutOfOrder { expected: u64, at_line: usize },
    #[error("records are missing before it (deleted): seq {expected} is due here")]
    Missing { expected: u64 },
    #[error("the first record does not start the chain: earlier records were deleted, or it was altered")]
    NotFirst,
    #[error("does not follow the record before it (an edit, deletion, insertion or reordering)")]
    Broken,
    #[error("malformed {0}")]
    Malformed(&'static str),
    #[error("the checkpoint's signature does not verify")]
    BadSignature,
    #[error("a checkpoint signed by a key the log was never handed over to")]
    UnknownKey,
    #[error("a resume record without the damaged bytes it claims before it")]
    BadResume,
    #[error("no checkpoint is signed by the trusted public key or a key it handed the log over to: nothing in this log is authenticated by it")]
    Untrusted,
    #[error("truncated: the log ends at seq {last_seq}, but seq {expected} was written: records were cut off its end")]
    Truncated { last_seq: u64, expected: u64 },
    #[error("rewritten: not the record the anchor signed at this seq (the log was rewritten from an earlier point on)")]
    AnchorMismatch,
    #[error("the anchor's signature does not verify")]
    BadAnchor,
    #[error("the anchor is signed by a key that signed none of this log's checkpoints")]
    AnchorKey,
    #[error("the anchored record (seq {anchored}) is before the first record given (seq {first}): give the earlier files too")]
    AnchorBefore { anchored: u64, first: u64 },
}

/// A failed verification: the first bad record and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct Failure {
    /// 1-based line number of the first bad record (`None`: the log as a whole).
    pub line: Option<usize>,
    /// Its seq, when it has one.
    pub seq: Option<u64>,
    pub problem: Problem,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.line, self.seq) {
            (Some(l), Some(s)) => write!(f, "line {l} (seq {s}): {}", self.problem),
            (Some(l), None) => write!(f, "line {l}: {}", self.problem),
            _ => write!(f, "{}", self.problem),
        }
    }
}

/// Where a hand-over of the signing key stands while reading the log.
#[derive(Default)]
struct Keys {
    /// Keys that signed a checkpoint, in hand-over order.
    adopted: Vec<VerifyingKey>,
    /// The key the last checkpoint named as next.
    pending: Option<VerifyingKey>,
}

/// Check a whole log: every line a record, the hash chain unbroken from the genesis value,
/// seq continuous, every checkpoint's signature valid and signed by the log's key or one it
/// was handed over to, and at least one checkpoint signed by `trusted` or a key `trusted`
/// handed over to (or from: a checkpoint covers everything before it). Damaged bytes are
/// accepted only where a resume record accounts for them exactly.
///
/// # Errors
/// The first bad record, as a [`Failure`].
pub fn verify(log: &[u8], trusted: &VerifyingKey) -> Result<Report, Failure> {
    verify_against(log, trusted, Expect::default())
}

/// [`verify`], and the log must also meet `expect`: reach the seq it names and hold the
/// anchored record unchanged. `log` may be a set of files, in order, end to end.
///
/// # Errors
/// The first bad record, or the log as a whole ([`Problem::Truncated`]), as a [`Failure`].
pub fn verify_against(
    log: &[u8],
    trusted: &VerifyingKey,
    expect: Expect<'_>,
) -> Result<Report, Failure> {
    let walk = walk(log, Start::First(expect.anchor))?;
    if walk.records == 0 {
        return Err(whole(Problem::Empty));
    }
    for due in [expect.last_seq, expect.anchor.map(|a| a.seq)]
        .into_iter()
        .flatten()
    {
        if due > walk.last_seq {
            return Err(whole(Problem::Truncated {
                last_seq: walk.last_seq,
                expected: due,
            }));
        }
    }
    if let Some(a) = expect.anchor {
        if a.seq < walk.first_seq {
            return Err(whole(Problem::AnchorBefore {
                anchored: a.seq,
                first: walk.first_seq,
            }));
        }
    }
    let (last_checkpoint, signed) = walk
        .last_checkpoint
        .ok_or_else(|| whole(Problem::Untrusted))?;
    if !walk.keys.adopted.contains(trusted) {
        return Err(whole(Problem::Untrusted));
    }
    if let Some(a) = expect.anchor {
        if !walk.keys.adopted.contains(&a.key) {
            return Err(whole(Problem::AnchorKey));
        }
    }
    Ok(Report {
        records: walk.records,
        first_seq: walk.first_seq,
        anchored_seq: expect.anchor.map(|a| a.seq),
        last_seq: walk.last_seq,
        checkpoints: walk.checkpoints,
        last_checkpoint,
        unsigned_tail: walk.records - signed,
        keys: walk.keys.adopted.iter().map(encode_key).collect(),
        damage: walk.damage,
        lost: walk.lost,
    })
}

/// What [`verify_from`] found: the anchored record and every record after it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Continuation {
    /// Records read, the anchored one included.
    pub records: u64,
    /// The anchored record's seq.
    pub first_seq: u64,
    /// The last record's seq.
    pub last_seq: u64,
    /// Checkpoints after the anchored record (and it, if it is one).
    pub checkpoints: u64,
    /// Records after the last signed one (the anchored record, or a later checkpoint),
    /// protected only by the chain.
    pub unsigned_tail: u64,
    /// The signing keys from the anchor's on, in hand-over order.
    pub keys: Vec<String>,
    /// Damaged bytes the daemon noted after the anchored record and continued after.
    pub damage: Vec<Damage>,
    /// Records declared not written, after the anchored record.
    pub lost: Vec<LostRecords>,
}

/// Check a log from the record `anchor` signed on: `log` starts with that record's line (a
/// file read from [`Anchor::offset`], say, and the files after it) and must hold it unchanged
/// (its line hashes to the anchor's `head`, its seq is the anchor's); every record after it
/// must follow in an unbroken chain, seq continuous, with damaged bytes only where a resume
/// record accounts for them, and every later checkpoint must be signed by the anchor's key or
/// one it was handed over to (the anchor's `next`, or a checkpoint's).
///
/// The anchor is the trust here, in place of the checkpoints before it: the caller checks its
/// signature ([`Anchor::check`]) and whose key it is. Nothing before the anchored record is
/// read, so nothing before it is checked: [`verify`] of the whole log does that (the
/// anchored line's `prev` commits to every record before it through the chain).
///
/// # Errors
/// [`Problem::AnchorMismatch`] when the first line is not the anchored record; else the first
/// bad record after it, as [`verify`] names it.
pub fn verify_from(log: &[u8], anchor: &CheckedAnchor) -> Result<Continuation, Failure> {
    let walk = walk(log, Start::Anchored(anchor))?;
    if walk.records == 0 {
        return Err(whole(Problem::Empty));
    }
    let signed = walk.last_checkpoint.as_ref().map_or(1, |(_, s)| *s);
    Ok(Continuation {
        records: walk.records,
        first_seq: walk.first_seq,
        last_seq: walk.last_seq,
        checkpoints: walk.checkpoints,
        unsigned_tail: walk.records - signed,
        keys: walk.keys.adopted.iter().map(encode_key).collect(),
        damage: walk.damage,
        lost: walk.lost,
    })
}

/// Where the record `anchor` signed starts in `log` (a set of files, end to end), found by
/// reading every record: for an anchor without an [`Anchor::offset`], or one whose offset does
/// not lead to the record. Only the lines are read, not checked: [`verify_from`] checks from
/// there on.
///
/// # Errors
/// [`Problem::Truncated`] when the log ends before the anchored seq; [`Problem::AnchorMismatch`]
/// when the record at that seq is another (the log was rewritten from an earlier point on);
/// [`Problem::AnchorBefore`] when the log starts after it (its earlier files are gone).
pub fn find_anchored(log: &[u8], anchor: &CheckedAnchor) -> Result<usize, Failure> {
    let mut first_seq = None;
    let mut last_seq = None;
    for (i, line) in lines(log).iter().enumerate() {
        let Ok(record) = parse(line.bytes) else {
            continue;
        };
        first_seq.get_or_insert(record.seq);
        if record.seq == anchor.seq {
            if line.complete && line_hash(line.bytes) == anchor.head {
                return Ok(line.start);
            }
            return Err(Failure {
                line: Some(i + 1),
                seq: Some(record.seq),
                problem: Problem::AnchorMismatch,
            });
        }
        last_seq = Some(record.seq);
    }
    Err(whole(match (first_seq, last_seq) {
        (None, _) | (_, None) => Problem::Empty,
        (Some(first), _) if first > anchor.seq => Problem::AnchorBefore {
            anchored: anchor.seq,
            first,
        },
        (_, Some(last_seq)) if last_seq < anchor.seq => Problem::Truncated {
            last_seq,
            expected: anchor.seq,
        },
        // Its seq skipped: not what it signed.
        _ => Problem::AnchorMismatch,
    }))
}

/// A failure of the log as a whole.
fn whole(problem: Problem) -> Failure {
    Failure {
        line: None,
        seq: None,
        problem,
    }
}

/// Where a walk along the chain starts.
#[derive(Clone, Copy)]
enum Start<'a> {
    /// At the log's first line: the genesis, or a `continued` record (files given from the
    /// middle of the set). The record at the anchor's seq, if one is given, must be the one
    /// it signed.
    First(Option<&'a CheckedAnchor>),
    /// At the anchored record, which must be the first line: the anchor vouches for it and
    /// for its key.
    Anchored(&'a CheckedAnchor),
}

/// What a walk along the chain read.
struct Walk {
    records: u64,
    first_seq: u64,
    /// The last record's seq (0 when there is none).
    last_seq: u64,
    checkpoints: u64,
    /// The last checkpoint and how many records it signs (itself and those before it).
    last_checkpoint: Option<(CheckpointSummary, u64)>,
    keys: Keys,
    damage: Vec<Damage>,
    lost: Vec<LostRecords>,
}

/// Read `log` along the chain from `start`: every line a record (or damaged bytes a resume
/// record accounts for), each record's `prev` the previous line's hash, seq continuous, every
/// checkpoint's signature valid and its key the current one or the one handed over to.
fn walk(log: &[u8], start: Start<'_>) -> Result<Walk, Failure> {
    let lines = lines(log);
    let fail = |i: usize, seq: Option<u64>, problem| Failure {
        line: Some(i + 1),
        seq,
        problem,
    };
    let hash_of = |i: usize| line_hash(lines[i].bytes);
    let mut prev = GENESIS;
    let mut expected = 0u64;
    let mut first_seq = 0u64;
    // Index of the last record accepted, if any.
    let mut last: Option<usize> = None;
    let mut records = 0u64;
    let mut checkpoints = 0u64;
    let mut last_checkpoint: Option<(CheckpointSummary, u64)> = None;
    let mut keys = Keys::default();
    if let Start::Anchored(a) = start {
        // The anchor's signer holds the log there, and may have been handing it over.
        keys.adopted.push(a.key);
        keys.pending = a.next;
    }
    let mut damage = Vec::new();
    let mut lost = Vec::new();
    // True when the record at `i` comes right after damaged bytes its resume record explains.
    let mut after_damage = false;
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let anchored_first = match start {
            Start::Anchored(a) if i == 0 => Some(a),
            _ => None,
        };
        if let Some(a) = anchored_first {
            if !line.complete || hash_of(0) != a.head {
                return Err(fail(0, None, Problem::AnchorMismatch));
            }
        }
        if !line.complete {
            return Err(fail(i, None, Problem::Incomplete));
        }
        let record = match parse(line.bytes) {
            Ok(r) => r,
            Err(e) if anchored_first.is_some() => {
                return Err(fail(i, None, Problem::Unreadable(e.to_string())))
            }
            Err(e) => {
                let start = last.map_or(0, |l| lines[l].start + lines[l].bytes.len() + 1);
                match find_resume(&lines, i, start, log, &prev, expected) {
                    Some((j, bytes)) => {
                        damage.push(Damage {
                            line: i + 1,
                            bytes,
                            noted_at_seq: expected,
                        });
                        after_damage = true;
                        i = j;
                        continue;
                    }
                    None => return Err(fail(i, None, Problem::Unreadable(e.to_string()))),
                }
            }
        };
        let seq = Some(record.seq);
        let claimed =
            unhex32(&record.prev).ok_or_else(|| fail(i, seq, Problem::Malformed("prev")))?;
        // Files given from the middle of the set: the first one carries on from a file not
        // given, so its first record is the chain's start here.
        let continued = matches!(start, Start::First(_))
            && records == 0
            && last.is_none()
            && matches!(&record.body, Body::Event(e) if e.event == CONTINUED);
        if continued {
            prev = claimed;
            expected = record.seq;
            first_seq = record.seq;
        }
        // The anchored record: what came before it is the anchor's to vouch for.
        if let Some(a) = anchored_first {
            if record.seq != a.seq {
                return Err(fail(i, seq, Problem::AnchorMismatch));
            }
            prev = claimed;
            expected = record.seq;
            first_seq = record.seq;
        }
        if claimed != prev {
            return Err(diagnose(&lines, i, &record, &claimed, expected, last));
        }
        if record.seq != expected {
            return Err(fail(
                i,
                seq,
                Problem::WrongSeq {
                    expected,
                    found: record.seq,
                },
            ));
        }
        match &record.body {
            Body::Checkpoint(c) => {
                check_checkpoint(&record, c, &prev, &mut keys).map_err(|p| fail(i, seq, p))?;
                checkpoints += 1;
                last_checkpoint = Some((
                    CheckpointSummary {
                        line: i + 1,
                        seq: record.seq,
                        time: record.time.clone(),
                        reason: c.reason.clone(),
                        public_key: c.public_key.clone(),
                    },
                    records + 1,
                ));
            }
            Body::Resume(r) if !after_damage && r.damaged_bytes != 0 => {
                return Err(fail(i, seq, Problem::BadResume));
            }
            _ => {}
        }
        if let Some(l) = &record.lost {
            // Never on a checkpoint: its signature would not cover the declaration.
            if l.records == 0 || matches!(record.body, Body::Checkpoint(_)) {
                return Err(fail(i, seq, Problem::Malformed("lost")));
            }
            lost.push(LostRecords {
                line: i + 1,
                declared_at_seq: record.seq,
                records: l.records,
                first: l.first.clone(),
                last: l.last.clone(),
                reason: l.reason.clone(),
            });
        }
        if let Start::First(Some(a)) = start {
            if a.seq == record.seq && a.head != hash_of(i) {
                return Err(fail(i, seq, Problem::AnchorMismatch));
            }
        }
        after_damage = false;
        records += 1;
        expected = record.seq.saturating_add(1);
        prev = hash_of(i);
        last = Some(i);
        i += 1;
    }
    Ok(Walk {
        records,
        first_seq,
        last_seq: expected.saturating_sub(1),
        checkpoints,
        last_checkpoint,
        keys,
        damage,
        lost,
    })
}

fn unhex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (o, pair) in out.iter_mut().zip(s.as_bytes().chunks(2)) {
        let text = std::str::from_utf8(pair).ok()?;
        *o = u8::from_str_radix(text, 16).ok()?;
    }
    Some(out)
}

/// Damaged bytes start at line `i` (byte `start`): find the resume record that accounts for
/// exactly the bytes from `start` to just before its own line's newline-ended predecessor,
/// continuing the chain from `prev` at `seq`. Returns its line index and the damaged length.
fn find_resume(
    lines: &[Line<'_>],
    i: usize,
    start: usize,
    log: &[u8],
    prev: &[u8; 32],
    seq: u64,
) -> Option<(usize, u64)> {
    for (j, line) in lines.iter().enumerate().skip(i + 1) {
        let Ok(record) = parse(line.bytes) else {
            continue;
        };
        // The first readable record after damage must be the resume record explaining it.
        let Body::Resume(r) = &record.body else {
            return None;
        };
        let len = line.start.checked_sub(1)?.checked_sub(start)?;
        let bytes = log.get(start..start + len)?;
        let ok = record.seq == seq
            && unhex32(&record.prev).as_ref() == Some(prev)
            && r.damaged_bytes == len as u64
            && unhex32(&r.damaged_sha256) == Some(line_hash(bytes));
        return ok.then_some((j, len as u64));
    }
    None
}

/// The chain breaks at line `i` (its `prev` is not the hash of the record before it): say
/// which record is out of place, and how.
fn diagnose(
    lines: &[Line<'_>],
    i: usize,
    record: &Record,
    claimed: &[u8; 32],
    expected: u64,
    last: Option<usize>,
) -> Failure {
    let at = |line: usize, seq: Option<u64>, problem| Failure {
        line: Some(line + 1),
        seq,
        problem,
    };
    let seq_of = |k: usize| parse(lines[k].bytes).ok().map(|r| r.seq);
    let prev_of = |k: usize| {
        lines
            .get(k)
            .and_then(|l| parse(l.bytes).ok())
            .and_then(|r| unhex32(&r.prev))
    };
    let Some(before) = last else {
        return at(i, Some(record.seq), Problem::NotFirst);
    };
    // The next record follows the one before this: this one was slipped in (or moved here).
    if prev_of(i + 1) == Some(line_hash(lines[before].bytes)) {
        return if record.seq > expected {
            match (i + 1..lines.len()).find(|&k| seq_of(k) == Some(expected)) {
                Some(k) => at(
                    i,
                    Some(record.seq),
                    Problem::OutOfOrder {
                        expected,
                        at_line: k + 1,
                    },
                ),
                None => at(i, Some(record.seq), Problem::Inserted),
            }
        } else {
            at(i, Some(record.seq), Problem::Inserted)
        };
    }
    // This one follows the record two back: the one just before it was slipped in.
    if let Some(two_back) = before.checked_sub(1) {
        if *claimed == line_hash(lines[two_back].bytes) {
            return at(before, seq_of(before), Problem::Inserted);
        }
    }
    if record.seq > expected {
        return match (i + 1..lines.len()).find(|&k| seq_of(k) == Some(expected)) {
            Some(k) => at(
                i,
                Some(record.seq),
                Problem::OutOfOrder {
                    expected,
                    at_line: k + 1,
                },
            ),
            None => at(i, Some(record.seq), Problem::Missing { expected }),
        };
    }
    if record.seq < expected {
        return at(i, Some(record.seq), Problem::Broken);
    }
    // In sequence, but not what the record before it hashes to: that one was edited.
    at(before, seq_of(before), Problem::Altered)
}

fn check_checkpoint(
    record: &Record,
    c: &Checkpoint,
    prev: &[u8; 32],
    keys: &mut Keys,
) -> Result<(), Problem> {
    let key = decode_key(&c.public_key).map_err(|_| Problem::Malformed("public_key"))?;
    let next = c
        .next_public_key
        .as_deref()
        .map(decode_key)
        .transpose()
        .map_err(|_| Problem::Malformed("next_public_key"))?;
    let signature = B64
        .decode(c.signature.as_bytes())
        .ok()
        .and_then(|b| Signature::from_slice(&b).ok())
        .ok_or(Problem::Malformed("signature"))?;
    let message = checkpoint_message(
        record.seq,
        prev,
        &record.time,
        &c.reason,
        &key,
        next.as_ref(),
    );
    key.verify(&message, &signature)
        .map_err(|_| Problem::BadSignature)?;
    match keys.adopted.last() {
        None => keys.adopted.push(key),
        Some(current) if *current == key => {}
        Some(_) if keys.pending == Some(key) => keys.adopted.push(key),
        Some(_) => return Err(Problem::UnknownKey),
    }
    keys.pending = next;
    Ok(())
}

/// One record for people: `time  #seq  what`.
pub fn human(record: &Record) -> String {
    let what = match &record.body {
        Body::Request(r) => {
            let c = &r.caller;
            let mut who = format!("uid={} gid={}", c.uid, c.gid);
            if let Some(pid) = c.pid {
                let _ = write!(who, " pid={pid}");
            }
            if let Some(unit) = &c.unit {
                let _ = write!(who, " unit={unit}");
            }
            let mut s = format!("{who} via {}  {} {}  {}", c.via, r.op, r.target, r.result);
            if let Some(intent) = r.intent {
                let _ = write!(s, " (of #{intent})");
            }
            if let Some(d) = &r.detail {
                let _ = write!(s, "  [{d}]");
            }
            if let Some(rule) = r.rule {
                let _ = write!(s, "  (policy rule {rule})");
            }
            if let Some(n) = r.outbox {
                let _ = write!(s, "  (outbox #{n})");
            }
            s
        }
        Body::Event(e) => format!("daemon {}: {}", e.event, e.detail),
        Body::Checkpoint(c) => {
            let mut s = format!("checkpoint ({}) signed by {}", c.reason, c.public_key);
            if let Some(n) = &c.next_public_key {
                let _ = write!(s, ", handing over to {n}");
            }
            s
        }
        Body::Resume(r) => format!(
            "resume after {} damaged bytes ({})",
            r.damaged_bytes, r.reason
        ),
    };
    let lost = match &record.lost {
        Some(l) => format!(
            "  [{} record(s) before this one not written, {} to {}: {}]",
            l.records, l.first, l.last, l.reason
        ),
        None => String::new(),
    };
    format!("{}  #{}  {what}{lost}", record.time, record.seq)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::{Signer as _, SigningKey};

    #[test]
    fn rfc3339_dates() {
        let at = |secs: u64| rfc3339_millis(UNIX_EPOCH + std::time::Duration::from_secs(secs));
        assert_eq!(at(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(at(951_782_400), "2000-02-29T00:00:00.000Z");
        assert_eq!(at(1_795_455_773), "2026-11-23T17:42:53.000Z");
        assert_eq!(at(4_107_542_400), "2100-03-01T00:00:00.000Z");
        assert_eq!(at(u64::MAX / 4), "9999-12-31T23:59:59.000Z");
        assert_eq!(
            rfc3339_millis(UNIX_EPOCH + std::time::Duration::from_millis(1_500)),
            "1970-01-01T00:00:01.500Z"
        );
    }

    /// A log writer as small as the daemon's, for building test logs.
    struct Writer {
        out: Vec<u8>,
        seq: u64,
        prev: [u8; 32],
        key: SigningKey,
        next: Option<SigningKey>,
        /// Declared by the next record pushed.
        lost: Option<Lost>,
    }

    impl Writer {
        fn new(seed: u8) -> Self {
            Self {
                out: Vec::new(),
                seq: 0,
                prev: GENESIS,
                key: SigningKey::from_bytes(&[seed; 32]),
                next: None,
                lost: None,
            }
        }

        fn push(&mut self, body: Body) {
            let record = Record {
                seq: self.seq,
                time: "2025-01-01T00:00:00.000Z".into(),
                body,
                lost: self.lost.take(),
                prev: hex(&self.prev),
            };
            let line = serde_json::to_vec(&record).unwrap();
            self.prev = line_hash(&line);
            self.out.extend_from_slice(&line);
            self.out.push(b'\n');
            self.seq += 1;
        }

        fn request(&mut self, op: &str, target: &str) {
            self.push(Body::Request(RequestRecord {
                caller: CallerRecord {
                    uid: 0,
                    gid: 0,
                    pid: Some(1),
                    unit: None,
                    via: "varlink".into(),
                },
                op: op.into(),
                target: target.into(),
                result: OK.into(),
                intent: None,
                detail: None,
                rule: None,
                outbox: None,
            }));
        }

        fn checkpoint_by(&mut self, key: &SigningKey, next: Option<&SigningKey>, reason: &str) {
            let time = "2025-01-01T00:00:00.000Z";
            let public = key.verifying_key();
            let next_public = next.map(SigningKey::verifying_key);
            let m = checkpoint_message(
                self.seq,
                &self.prev,
                time,
                reason,
                &public,
                next_public.as_ref(),
            );
            let signature = key.sign(&m);
            self.push(Body::Checkpoint(Checkpoint {
                reason: reason.into(),
                public_key: encode_key(&public),
                next_public_key: next_public.as_ref().map(encode_key),
                signature: B64.encode(signature.to_bytes()),
            }));
        }

        fn checkpoint(&mut self) {
            let key = self.key.clone();
            let next = self.next.clone();
            self.checkpoint_by(&key, next.as_ref(), "periodic");
        }

        fn public(&self) -> VerifyingKey {
            self.key.verifying_key()
        }
    }

    /// 3 requests, a checkpoint, 3 requests, a checkpoint, 2 requests: 10 lines.
    fn sample() -> Writer {
        let mut w = Writer::new(1);
        for n in 0..3 {
            w.request("PutSecret", &format!("s{n}"));
        }
        w.checkpoint();
        for n in 3..6 {
            w.request("GetSecret", &format!("s{n}"));
        }
        w.checkpoint();
        w.request("Status", "vault");
        w.request("Status", "vault");
        w
    }

    fn lines_of(log: &[u8]) -> Vec<Vec<u8>> {
        lines(log).iter().map(|l| l.bytes.to_vec()).collect()
    }

    fn join(lines: &[Vec<u8>]) -> Vec<u8> {
        let mut out = Vec::new();
        for l in lines {
            out.extend_from_slice(l);
            out.push(b'\n');
        }
        out
    }

    fn failure(log: &[u8], key: &VerifyingKey) -> Failure {
        verify(log, key).expect_err("must not verify")
    }

    #[test]
    fn an_intact_log_verifies_and_says_what_is_unsigned() {
        let w = sample();
        let r = verify(&w.out, &w.public()).unwrap();
        assert_eq!(r.records, 10);
        assert_eq!(r.last_seq, 9);
        assert_eq!(r.checkpoints, 2);
        assert_eq!(r.last_checkpoint.seq, 7);
        assert_eq!(r.last_checkpoint.line, 8);
        assert_eq!(r.unsigned_tail, 2);
        assert_eq!(r.keys, [encode_key(&w.public())]);
    }

    #[test]
    fn an_edited_record_is_named() {
        let w = sample();
        let mut l = lines_of(&w.out);
        l[4] = String::from_utf8(l[4].clone())
            .unwrap()
            .replace("\"s3\"", "\"s9\"")
            .into_bytes();
        let f = failure(&join(&l), &w.public());
        assert_eq!(
            (f.line, f.seq, f.problem),
            (Some(5), Some(4), Problem::Altered)
        );
    }

    #[test]
    fn a_deleted_record_is_named() {
        let w = sample();
        let mut l = lines_of(&w.out);
        l.remove(4);
        let f = failure(&join(&l), &w.public());
        assert_eq!(f.line, Some(5));
        assert_eq!(f.seq, Some(5));
        assert_eq!(f.problem, Problem::Missing { expected: 4 });
    }

    #[test]
    fn an_inserted_record_is_named_whether_or_not_it_chains() {
        let w = sample();
        // A forger who chains the record properly onto the one before it.
        let mut l = lines_of(&w.out);
        let mut forged = parse(&l[4]).unwrap();
        forged.seq = 5;
        forged.prev = hex(&line_hash(&l[4]));
        if let Body::Request(r) = &mut forged.body {
            r.target = "forged".into();
        }
        l.insert(5, serde_json::to_vec(&forged).unwrap());
        let f = failure(&join(&l), &w.public());
        assert_eq!(
            (f.line, f.problem.clone()),
            (Some(6), Problem::Inserted),
            "{f}"
        );
        // A copy of an old record.
        let mut l = lines_of(&w.out);
        let old = l[1].clone();
        l.insert(5, old);
        let f = failure(&join(&l), &w.public());
        assert_eq!((f.line, f.seq), (Some(6), Some(1)), "{f}");
        assert_eq!(f.problem, Problem::Inserted);
    }

    #[test]
    fn swapped_records_are_named() {
        let w = sample();
        let mut l = lines_of(&w.out);
        l.swap(4, 5);
        let f = failure(&join(&l), &w.public());
        assert_eq!((f.line, f.seq), (Some(5), Some(5)), "{f}");
        assert_eq!(
            f.problem,
            Problem::OutOfOrder {
                expected: 4,
                at_line: 6
            }
        );
    }

    #[test]
    fn a_changed_signature_or_signed_field_is_named() {
        let w = sample();
        let mut l = lines_of(&w.out);
        let mut cp = parse(&l[3]).unwrap();
        let Body::Checkpoint(c) = &mut cp.body else {
            panic!()
        };
        let mut sig = B64.decode(&c.signature).unwrap();
        sig[0] ^= 1;
        c.signature = B64.encode(sig);
        l[3] = serde_json::to_vec(&cp).unwrap();
        let f = failure(&join(&l), &w.public());
        assert_eq!(
            (f.line, f.seq, f.problem),
            (Some(4), Some(3), Problem::BadSignature)
        );
        // The reason is signed too (the last checkpoint, so no later hash covers it).
        let mut l = lines_of(&w.out);
        l[7] = String::from_utf8(l[7].clone())
            .unwrap()
            .replace("periodic", "admin")
            .into_bytes();
        let f = failure(&join(&l), &w.public());
        assert_eq!((f.line, f.problem), (Some(8), Problem::BadSignature));
    }

    #[test]
    fn a_cut_inside_a_record_is_named() {
        let w = sample();
        let l = lines(&w.out);
        let cut = l[7].start + 20;
        let f = failure(&w.out[..cut], &w.public());
        assert_eq!((f.line, f.problem), (Some(8), Problem::Incomplete));
    }

    #[test]
    fn a_cut_after_a_checkpoint_is_not_detectable_and_reported_as_unsigned() {
        let w = sample();
        let l = lines(&w.out);
        let r = verify(&w.out[..l[8].start], &w.public()).unwrap();
        assert_eq!((r.records, r.unsigned_tail), (8, 0));
    }

    #[test]
    fn a_wrong_key_or_no_checkpoint_authenticates_nothing() {
        let w = sample();
        let other = SigningKey::from_bytes(&[9; 32]).verifying_key();
        assert_eq!(failure(&w.out, &other).problem, Problem::Untrusted);
        let mut w = Writer::new(1);
        w.request("Status", "vault");
        assert_eq!(failure(&w.out, &w.public()).problem, Problem::Untrusted);
        assert_eq!(failure(b"", &w.public()).problem, Problem::Empty);
    }

    #[test]
    fn a_forged_log_under_another_key_does_not_verify_against_the_real_key() {
        let real = sample();
        let mut forged = Writer::new(7);
        forged.request("Status", "vault");
        forged.checkpoint();
        assert_eq!(
            failure(&forged.out, &real.public()).problem,
            Problem::Untrusted
        );
        // Nor may a forger append checkpoints of their own to the real log.
        let mut w = sample();
        let intruder = SigningKey::from_bytes(&[7; 32]);
        w.checkpoint_by(&intruder, None, "periodic");
        let f = failure(&w.out, &w.public());
        assert_eq!((f.line, f.problem), (Some(11), Problem::UnknownKey));
    }

    #[test]
    fn the_log_follows_a_rekey_from_either_key() {
        let mut w = sample();
        let old = w.key.clone();
        let new = SigningKey::from_bytes(&[2; 32]);
        // The hand-over, a periodic checkpoint while it is pending, then the new key.
        w.checkpoint_by(&old, Some(&new), "rekey");
        w.request("Status", "vault");
        w.checkpoint_by(&old, Some(&new), "periodic");
        w.checkpoint_by(&new, None, "rekeyed");
        w.request("GetSecret", "x");
        let r = verify(&w.out, &old.verifying_key()).unwrap();
        assert_eq!(r.keys.len(), 2);
        assert_eq!(
            r.last_checkpoint.public_key,
            encode_key(&new.verifying_key())
        );
        assert_eq!(r.unsigned_tail, 1);
        verify(&w.out, &new.verifying_key()).unwrap();
        // A called-off hand-over: the old key goes on, the new one may no longer sign.
        let mut w = sample();
        w.checkpoint_by(&old, Some(&new), "rekey");
        w.checkpoint_by(&old, None, "rekey aborted");
        w.checkpoint_by(&new, None, "periodic");
        assert_eq!(
            failure(&w.out, &old.verifying_key()).problem,
            Problem::UnknownKey
        );
    }

    #[test]
    fn damage_is_accepted_only_where_a_resume_record_accounts_for_it() {
        let mut w = sample();
        // A torn write: part of a record and no newline, then the daemon's newline and resume.
        let torn = br#"{"seq":10,"time":"2025-01-01T00:0"#;
        let before = w.prev;
        w.out.extend_from_slice(torn);
        w.out.push(b'\n');
        w.push(Body::Resume(Resume {
            damaged_bytes: torn.len() as u64,
            damaged_sha256: hex(&line_hash(torn)),
            reason: "torn".into(),
        }));
        // The resume record chains onto the last good record.
        let l = lines_of(&w.out);
        assert_eq!(parse(&l[11]).unwrap().prev, hex(&before));
        w.checkpoint();
        let r = verify(&w.out, &w.public()).unwrap();
        assert_eq!(
            r.damage,
            [Damage {
                line: 11,
                bytes: torn.len() as u64,
                noted_at_seq: 10
            }]
        );
        assert_eq!(r.records, 12);
        // The same resume record with other damage does not explain it.
        let mut l = lines_of(&w.out);
        l[10] = b"{\"seq\":10,\"time\":\"2025-01-01T00:1".to_vec();
        let f = failure(&join(&l), &w.public());
        assert_eq!(f.line, Some(11));
        assert!(matches!(f.problem, Problem::Unreadable(_)), "{f}");
        // Nor may a resume record claim damage that is not there.
        let mut l = lines_of(&w.out);
        l.remove(10);
        let f = failure(&join(&l), &w.public());
        assert_eq!((f.line, f.problem), (Some(11), Problem::BadResume));
    }

    #[test]
    fn keys_read_in_every_form_and_times_format() {
        let key = SigningKey::from_bytes(&[3; 32]).verifying_key();
        assert_eq!(decode_key(&pem(&key)).unwrap(), key);
        assert_eq!(decode_key(&encode_key(&key)).unwrap(), key);
        assert_eq!(decode_key(&B64.encode(key.as_bytes())).unwrap(), key);
        assert_eq!(spki_der(&key).len(), 44);
        assert!(decode_key("not base64!").is_err());
        assert!(decode_key(&B64.encode([1u8; 31])).is_err());
        let t = UNIX_EPOCH + std::time::Duration::from_millis(1_700_000_000_123);
        assert_eq!(rfc3339_millis(t), "2023-11-14T22:13:20.123Z");
    }

    /// The anchor `w`'s key would sign for the record at `seq` (whose line must be a
    /// checkpoint in `w.out`).
    fn anchor_at(w: &Writer, key: &SigningKey, seq: u64) -> Anchor {
        let l = lines_of(&w.out);
        let head = line_hash(&l[usize::try_from(seq).unwrap()]);
        let time = "2025-01-01T00:00:01.000Z";
        let public = key.verifying_key();
        let sig = key.sign(&anchor_message(seq, &head, time, &public, None, None));
        Anchor {
            seq,
            head: hex(&head),
            time: time.into(),
            public_key: encode_key(&public),
            next_public_key: None,
            counter: None,
            signature: B64.encode(sig.to_bytes()),
            offset: None,
        }
    }

    fn against(log: &[u8], key: &VerifyingKey, anchor: &Anchor) -> Result<Report, Failure> {
        let checked = anchor.check().unwrap();
        let expect = Expect {
            anchor: Some(&checked),
            last_seq: None,
        };
        verify_against(log, key, expect)
    }

    #[test]
    fn an_anchor_catches_a_cut_and_a_rewrite_after_the_last_checkpoint() {
        let mut w = sample();
        w.checkpoint();
        let key = w.key.clone();
        // The last checkpoint, seq 10, anchored.
        let anchor = anchor_at(&w, &key, 10);
        let r = against(&w.out, &w.public(), &anchor).unwrap();
        assert_eq!(r.anchored_seq, Some(10));
        // Cut after the checkpoint before it (seq 7): the chain is fine, the anchor is not.
        let l = lines(&w.out);
        let cut = &w.out[..l[8].start];
        verify(cut, &w.public()).unwrap();
        let f = against(cut, &w.public(), &anchor).unwrap_err();
        assert_eq!(
            f.problem,
            Problem::Truncated {
                last_seq: 7,
                expected: 10
            }
        );
        let f = verify_against(
            cut,
            &w.public(),
            Expect {
                anchor: None,
                last_seq: Some(9),
            },
        )
        .unwrap_err();
        assert!(matches!(f.problem, Problem::Truncated { .. }), "{f}");
        // Rewritten from the checkpoint at seq 7 on: records edited, the later checkpoint
        // dropped, the chain recomputed, as long as before.
        let mut forged = Writer::new(1);
        forged.out = cut.to_vec();
        forged.seq = 8;
        forged.prev = line_hash(&lines_of(cut)[7]);
        for _ in 8..11 {
            forged.request("Status", "forged");
        }
        verify(&forged.out, &w.public()).unwrap();
        let f = against(&forged.out, &w.public(), &anchor).unwrap_err();
        assert_eq!((f.line, f.problem), (Some(11), Problem::AnchorMismatch));
        // An anchor by another key, or edited, proves nothing.
        let stranger = SigningKey::from_bytes(&[9; 32]);
        let theirs = anchor_at(&w, &stranger, 10);
        let f = against(&w.out, &w.public(), &theirs).unwrap_err();
        assert_eq!(f.problem, Problem::AnchorKey);
        let mut edited = anchor.clone();
        edited.seq = 7;
        assert_eq!(edited.check().unwrap_err(), Problem::BadAnchor);
    }

    #[test]
    fn a_rolled_over_set_verifies_whole_and_from_the_middle() {
        let mut w = sample();
        let cut = w.out.len();
        w.push(Body::Event(EventRecord {
            event: CONTINUED.into(),
            detail: "from audit.log.1".into(),
        }));
        w.request("GetSecret", "x");
        w.checkpoint();
        let r = verify(&w.out, &w.public()).unwrap();
        assert_eq!((r.first_seq, r.last_seq), (0, 12));
        // The second file alone: it starts where the first ended.
        let r = verify(&w.out[cut..], &w.public()).unwrap();
        assert_eq!((r.first_seq, r.records), (10, 3));
        // But not if an anchor names a record before it.
        let key = w.key.clone();
        let anchor = anchor_at(&w, &key, 7);
        let f = against(&w.out[cut..], &w.public(), &anchor).unwrap_err();
        assert_eq!(
            f.problem,
            Problem::AnchorBefore {
                anchored: 7,
                first: 10
            }
        );
        against(&w.out, &w.public(), &anchor).unwrap();
        // Only a `continued` record may start a file mid-chain.
        let l = lines(&w.out);
        let f = failure(&w.out[l[4].start..], &w.public());
        assert_eq!(f.problem, Problem::NotFirst);
    }

    #[test]
    fn declared_lost_records_verify_and_are_reported() {
        let mut w = sample();
        w.lost = Some(Lost {
            records: 3,
            first: "2025-01-01T00:00:01.000Z".into(),
            last: "2025-01-01T00:00:02.000Z".into(),
            reason: "No space left on device (os error 28)".into(),
        });
        w.request("Status", "vault");
        w.checkpoint();
        let r = verify(&w.out, &w.public()).unwrap();
        assert_eq!(r.lost.len(), 1);
        assert_eq!((r.lost[0].records, r.lost[0].line), (3, 11));
        assert_eq!(r.lost[0].declared_at_seq, 10);
        let last = lines_of(&w.out)[10].clone();
        let text = String::from_utf8(last.clone()).unwrap();
        assert!(text.contains(r#""lost":{"records":3,"#), "{text}");
        assert!(human(&parse(&last).unwrap()).contains("3 record(s) before this one not written"));
        // The declaration is covered by the chain: removing it breaks the log.
        let mut edited = lines_of(&w.out);
        let mut r = parse(&edited[10]).unwrap();
        r.lost = None;
        edited[10] = serde_json::to_vec(&r).unwrap();
        assert_eq!(
            failure(&join(&edited), &w.public()).problem,
            Problem::Altered
        );
        // A declaration of nothing is malformed.
        let mut w = sample();
        w.lost = Some(Lost {
            records: 0,
            first: String::new(),
            last: String::new(),
            reason: String::new(),
        });
        w.request("Status", "vault");
        w.checkpoint();
        assert_eq!(
            failure(&w.out, &w.public()).problem,
            Problem::Malformed("lost")
        );
    }

    #[test]
    fn records_are_one_line_of_json_with_the_fields_in_order() {
        let mut w = Writer::new(1);
        w.request("GetSecret", "db/pass\nword");
        let text = String::from_utf8(w.out.clone()).unwrap();
        assert_eq!(text.matches('\n').count(), 1, "{text}");
        assert!(text.starts_with(r#"{"seq":0,"time":"#), "{text}");
        assert!(
            text.contains(r#""kind":"request","caller":{"uid":0"#),
            "{text}"
        );
        assert!(
            text.trim_end()
                .ends_with(&format!(r#""prev":"{}"}}"#, hex(&GENESIS))),
            "{text}"
        );
        let back = parse(text.trim_end().as_bytes()).unwrap();
        assert!(matches!(back.body, Body::Request(ref r) if r.target == "db/pass\nword"));
        assert!(human(&back).contains("GetSecret"));
    }

    #[test]
    fn the_allowing_rule_is_kept_shown_and_left_out_when_there_is_none() {
        let mut w = Writer::new(1);
        w.request("GetSecret", "a");
        let without = String::from_utf8(w.out.clone()).unwrap();
        assert!(!without.contains("rule"), "{without}");
        let mut record = parse(without.trim_end().as_bytes()).unwrap();
        if let Body::Request(r) = &mut record.body {
            r.rule = Some(3);
        }
        let line = serde_json::to_vec(&record).unwrap();
        let back = parse(&line).unwrap();
        assert_eq!(back, record);
        assert!(human(&back).contains("policy rule 3"), "{}", human(&back));
    }

    /// `w`'s log from the line of `seq` on (the lines start at seq 0), and the anchor `w`'s key
    /// signs for that record, with its offset.
    fn from_seq(w: &Writer, seq: u64) -> (Vec<u8>, CheckedAnchor) {
        let key = w.key.clone();
        let mut anchor = anchor_at(w, &key, seq);
        let at = lines(&w.out)[usize::try_from(seq).unwrap()].start;
        anchor.offset = Some(at as u64);
        (w.out[at..].to_vec(), anchor.check().unwrap())
    }

    #[test]
    fn a_log_verifies_from_its_anchored_record_on_without_what_came_before() {
        let w = sample();
        // From the first checkpoint (seq 3): it and the six records after it.
        let (tail, anchor) = from_seq(&w, 3);
        assert_eq!(anchor.offset, Some(lines(&w.out)[3].start as u64));
        let r = verify_from(&tail, &anchor).unwrap();
        assert_eq!((r.first_seq, r.last_seq, r.records), (3, 9, 7));
        assert_eq!((r.checkpoints, r.unsigned_tail), (2, 2));
        assert_eq!(r.keys, [encode_key(&w.public())]);
        // From a record that is not a checkpoint (the daemon anchors a new log's head so).
        let (tail, anchor) = from_seq(&w, 5);
        let r = verify_from(&tail, &anchor).unwrap();
        assert_eq!(
            (r.first_seq, r.records, r.checkpoints, r.unsigned_tail),
            (5, 5, 1, 2)
        );
        // From the last record: the anchor alone signs it.
        let (tail, anchor) = from_seq(&w, 9);
        let r = verify_from(&tail, &anchor).unwrap();
        assert_eq!((r.records, r.checkpoints, r.unsigned_tail), (1, 0, 0));

        // Records before the anchored one are not read: edited (and longer), the whole log
        // fails where they were edited, the check from the anchor on passes, and the anchored
        // record is still found by reading the lines.
        let (_, anchor) = from_seq(&w, 7);
        let mut l = lines_of(&w.out);
        l[1] = String::from_utf8(l[1].clone())
            .unwrap()
            .replace("\"s1\"", "\"a-longer-name\"")
            .into_bytes();
        let edited = join(&l);
        let f = failure(&edited, &w.public());
        assert_eq!((f.line, f.problem), (Some(2), Problem::Altered));
        let at = find_anchored(&edited, &anchor).unwrap();
        assert_eq!(at, lines(&edited)[7].start);
        assert_ne!(Some(at as u64), anchor.offset, "the edit moved it");
        let r = verify_from(&edited[at..], &anchor).unwrap();
        assert_eq!((r.first_seq, r.records), (7, 3));
    }

    #[test]
    fn the_check_from_an_anchor_names_what_is_wrong_after_it() {
        let w = sample();
        let (tail, anchor) = from_seq(&w, 3);
        // Not starting at the anchored record: the wrong offset, or a record rewritten there.
        let l = lines(&w.out);
        let f = verify_from(&w.out[l[4].start..], &anchor).unwrap_err();
        assert_eq!((f.line, f.problem), (Some(1), Problem::AnchorMismatch));
        let mut edited = lines_of(&tail);
        edited[0] = String::from_utf8(edited[0].clone())
            .unwrap()
            .replace("periodic", "admin")
            .into_bytes();
        let f = verify_from(&join(&edited), &anchor).unwrap_err();
        assert_eq!((f.line, f.problem), (Some(1), Problem::AnchorMismatch));
        assert_eq!(
            verify_from(b"", &anchor).unwrap_err().problem,
            Problem::Empty
        );
        // An edit after it, as the whole log's check names it (lines counted from the anchor).
        let mut edited = lines_of(&tail);
        edited[2] = String::from_utf8(edited[2].clone())
            .unwrap()
            .replace("\"s4\"", "\"s9\"")
            .into_bytes();
        let f = verify_from(&join(&edited), &anchor).unwrap_err();
        assert_eq!(
            (f.line, f.seq, f.problem),
            (Some(3), Some(5), Problem::Altered)
        );
        // A record removed after it.
        let mut edited = lines_of(&tail);
        edited.remove(2);
        let f = verify_from(&join(&edited), &anchor).unwrap_err();
        assert_eq!(f.problem, Problem::Missing { expected: 5 }, "{f}");
        // A cut inside the last record.
        let f = verify_from(&tail[..tail.len() - 5], &anchor).unwrap_err();
        assert_eq!(f.problem, Problem::Incomplete);
        // A checkpoint by a key the anchor's never handed over to.
        let mut w2 = sample();
        w2.checkpoint_by(&SigningKey::from_bytes(&[7; 32]), None, "periodic");
        let (tail, anchor) = from_seq(&w2, 3);
        let f = verify_from(&tail, &anchor).unwrap_err();
        assert_eq!((f.line, f.problem), (Some(8), Problem::UnknownKey));
        // The anchored checkpoint's own signature is checked too.
        let mut l = lines_of(&w.out);
        let mut cp = parse(&l[3]).unwrap();
        let Body::Checkpoint(c) = &mut cp.body else {
            panic!()
        };
        let mut sig = B64.decode(&c.signature).unwrap();
        sig[0] ^= 1;
        c.signature = B64.encode(sig);
        l[3] = serde_json::to_vec(&cp).unwrap();
        let mut forged = Writer::new(1);
        forged.out = join(&l);
        let (tail, anchor) = from_seq(&forged, 3);
        let f = verify_from(&tail, &anchor).unwrap_err();
        assert_eq!((f.line, f.problem), (Some(1), Problem::BadSignature));
    }

    #[test]
    fn the_check_from_an_anchor_follows_damage_and_a_rekey_after_it() {
        let mut w = sample();
        let old = w.key.clone();
        let new = SigningKey::from_bytes(&[2; 32]);
        w.checkpoint_by(&old, Some(&new), "rekey");
        // Anchored at the hand-over: the new key's checkpoints are the log's from there on.
        let anchored = w.seq - 1;
        let torn = br#"{"seq":11,"time":"2025-01-01T00:0"#;
        let before = w.prev;
        w.out.extend_from_slice(torn);
        w.out.push(b'\n');
        w.push(Body::Resume(Resume {
            damaged_bytes: torn.len() as u64,
            damaged_sha256: hex(&line_hash(torn)),
            reason: "torn".into(),
        }));
        assert_eq!(
            parse(lines_of(&w.out).last().unwrap()).unwrap().prev,
            hex(&before)
        );
        w.checkpoint_by(&new, None, "rekeyed");
        w.request("GetSecret", "x");
        let key = w.key.clone();
        let mut anchor = {
            let l = lines_of(&w.out);
            let head = line_hash(&l[usize::try_from(anchored).unwrap()]);
            let time = "2025-01-01T00:00:01.000Z";
            let next = new.verifying_key();
            let sig = key.sign(&anchor_message(
                anchored,
                &head,
                time,
                &key.verifying_key(),
                Some(&next),
                None,
            ));
            Anchor {
                seq: anchored,
                head: hex(&head),
                time: time.into(),
                public_key: encode_key(&key.verifying_key()),
                next_public_key: Some(encode_key(&next)),
                counter: None,
                signature: B64.encode(sig.to_bytes()),
                offset: None,
            }
        };
        let at = find_anchored(&w.out, &anchor.check().unwrap()).unwrap();
        // The offset is a hint: not signed, so adding it keeps the signature good.
        anchor.offset = Some(at as u64);
        let checked = anchor.check().unwrap();
        let r = verify_from(&w.out[at..], &checked).unwrap();
        assert_eq!(
            r.keys,
            [
                encode_key(&old.verifying_key()),
                encode_key(&new.verifying_key())
            ]
        );
        assert_eq!(r.damage.len(), 1);
        assert_eq!((r.checkpoints, r.unsigned_tail), (2, 1));
    }

    #[test]
    fn the_anchored_record_is_found_or_the_cut_or_rewrite_named() {
        let mut w = sample();
        w.checkpoint();
        let (_, anchor) = from_seq(&w, 10);
        assert_eq!(
            find_anchored(&w.out, &anchor).unwrap(),
            lines(&w.out)[10].start
        );
        // Cut after the checkpoint at seq 7.
        let l = lines(&w.out);
        let cut = &w.out[..l[8].start];
        let f = find_anchored(cut, &anchor).unwrap_err();
        assert_eq!(
            (f.line, f.problem),
            (
                None,
                Problem::Truncated {
                    last_seq: 7,
                    expected: 10
                }
            )
        );
        // Rewritten from there on, as long as before.
        let mut forged = Writer::new(1);
        forged.out = cut.to_vec();
        forged.seq = 8;
        forged.prev = line_hash(&lines_of(cut)[7]);
        for _ in 8..11 {
            forged.request("Status", "forged");
        }
        let f = find_anchored(&forged.out, &anchor).unwrap_err();
        assert_eq!(
            (f.line, f.seq, f.problem),
            (Some(11), Some(10), Problem::AnchorMismatch)
        );
        assert_eq!(
            find_anchored(b"", &anchor).unwrap_err().problem,
            Problem::Empty
        );
        // The files that held it are gone.
        let (_, early) = from_seq(&w, 2);
        assert_eq!(
            find_anchored(&w.out[l[4].start..], &early)
                .unwrap_err()
                .problem,
            Problem::AnchorBefore {
                anchored: 2,
                first: 4
            }
        );
        // An anchor of before the field existed still reads, and one with it round-trips.
        let text = br#"{"seq":1,"head":"00","time":"t","public_key":"k","signature":"s"}"#;
        assert_eq!(Anchor::parse(text).unwrap().offset, None);
        let mut a = anchor_at(&w, &w.key.clone(), 10);
        a.offset = Some(1234);
        let json = serde_json::to_vec(&a).unwrap();
        assert_eq!(Anchor::parse(&json).unwrap(), a);
    }
}
