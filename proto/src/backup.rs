//! The backup file that `keyward backup` writes and `keywardd --restore` reads: its header (a
//! magic line and a manifest) and how its checksum is checked. Pure: it encodes and decodes
//! bytes; the daemon makes the snapshot and writes the restored files, the CLI only copies.
//!
//! A backup file is, byte for byte:
//!
//! ```text
//! keyward-backup 1\n            magic line, with the format version
//! {"keyward_version":...}\n     the manifest: one line of JSON ([`Manifest`])
//! <database_len bytes>          a SQLite database: a consistent snapshot of keyward.db
//! ```
//!
//! The database holds only what the daemon stores: keyslots (the master key sealed by a TPM,
//! a token, or split into recovery shares), the keyring sealed under the master key, secrets
//! as ciphertext, device-key records (handles and public keys, never a private key) and
//! transit keys sealed under the master key. Nothing in it opens without a keyslot. It never
//! holds the master key, a PIN, a recovery share, the audit log or its anchor, the config or
//! the policy; the audit log's head at the time of the snapshot is recorded in the manifest,
//! so the restored host's new audit log can say where it came from.
//!
//! The manifest's `database_sha256` catches a damaged or truncated file before anything is
//! restored; it is a checksum, not a signature (whoever can write the file can recompute it).

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// The first line of every backup file, format version included.
pub const MAGIC: &[u8] = b"keyward-backup 1\n";

/// The longest manifest line a reader accepts (it is a few hundred bytes).
pub const MAX_MANIFEST_LEN: usize = 16 * 1024;

/// The audit log's head when the snapshot was taken: its last record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditHead {
    /// The last record's sequence number.
    pub seq: u64,
    /// The SHA-256 of the last record's line (lower-case hex), as the next record's `prev`.
    pub hash: String,
}

/// What a backup file says about itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// The keywardd that made it.
    pub keyward_version: String,
    /// The database's schema version (`PRAGMA user_version`).
    pub schema_version: i64,
    /// When the snapshot was taken (RFC 3339, UTC).
    pub created: String,
    /// The audit log's last record before the snapshot; `None` if the log had none.
    pub audit_head: Option<AuditHead>,
    /// The length of the database that follows the manifest line.
    pub database_len: u64,
    /// The SHA-256 of the database bytes (lower-case hex).
    pub database_sha256: String,
}

/// A file that is not a backup this build can read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BackupFormatError {
    /// It does not start with [`MAGIC`].
    #[error("not a Keyward backup (or a format version this keyward does not know)")]
    NotABackup,
    /// The manifest line is missing, too long, or not a manifest.
    #[error("the backup's manifest is damaged: {0}")]
    Manifest(String),
    /// The database is shorter or longer than the manifest says.
    #[error("the backup holds {found} bytes of database, its manifest says {expected}: truncated or damaged")]
    Length { expected: u64, found: u64 },
    /// The database's SHA-256 is not the manifest's.
    #[error("the backup's database does not match its checksum: damaged")]
    Checksum,
}

impl Manifest {
    /// The magic line and this manifest's line.
    pub fn header(&self) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        // A struct of strings and integers always serializes.
        out.extend_from_slice(&serde_json::to_vec(self).unwrap_or_default());
        out.push(b'\n');
        out
    }
}

/// Read the header at the start of `bytes` (which need hold no more than the header): the
/// manifest and the header's length (where the database starts).
///
/// # Errors
/// [`BackupFormatError::NotABackup`], [`BackupFormatError::Manifest`].
pub fn decode_header(bytes: &[u8]) -> Result<(Manifest, usize), BackupFormatError> {
    let rest = bytes
        .strip_prefix(MAGIC)
        .ok_or(BackupFormatError::NotABackup)?;
    let window = &rest[..rest.len().min(MAX_MANIFEST_LEN + 1)];
    let end = window.iter().position(|&b| b == b'\n').ok_or_else(|| {
        BackupFormatError::Manifest("no end of line within the first 16 KiB".into())
    })?;
    let manifest: Manifest = serde_json::from_slice(&window[..end])
        .map_err(|e| BackupFormatError::Manifest(e.to_string()))?;
    Ok((manifest, MAGIC.len() + end + 1))
}

/// Checks a database's bytes against a manifest as they stream past.
#[derive(Debug)]
pub struct Checker {
    expected_len: u64,
    expected_sha256: String,
    seen: u64,
    hash: Sha256,
}

impl Checker {
    /// A checker for the database `manifest` describes.
    pub fn new(manifest: &Manifest) -> Self {
        Self {
            expected_len: manifest.database_len,
            expected_sha256: manifest.database_sha256.clone(),
            seen: 0,
            hash: Sha256::new(),
        }
    }

    /// The next bytes of the database.
    pub fn update(&mut self, bytes: &[u8]) {
        self.seen += bytes.len() as u64;
        self.hash.update(bytes);
    }

    /// Whether what went past is the database the manifest describes.
    ///
    /// # Errors
    /// [`BackupFormatError::Length`], [`BackupFormatError::Checksum`].
    pub fn finish(self) -> Result<(), BackupFormatError> {
        if self.seen != self.expected_len {
            return Err(BackupFormatError::Length {
                expected: self.expected_len,
                found: self.seen,
            });
        }
        if crate::text::hex(&self.hash.finalize()) != self.expected_sha256 {
            return Err(BackupFormatError::Checksum);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> Manifest {
        Manifest {
            keyward_version: "0.1.0".into(),
            schema_version: 3,
            created: "2026-12-04T18:00:00.000Z".into(),
            audit_head: Some(AuditHead {
                seq: 41,
                hash: "ab".repeat(32),
            }),
            database_len: 0,
            database_sha256: String::new(),
        }
    }

    fn file_for(db: &[u8]) -> Vec<u8> {
        let mut m = manifest();
        m.database_len = db.len() as u64;
        m.database_sha256 = crate::text::hex(&Sha256::digest(db));
        let mut file = m.header();
        file.extend_from_slice(db);
        file
    }

    fn check(file: &[u8]) -> Result<Manifest, BackupFormatError> {
        let (m, start) = decode_header(file)?;
        let mut c = Checker::new(&m);
        for chunk in file[start..].chunks(3) {
            c.update(chunk);
        }
        c.finish().map(|()| m)
    }

    #[test]
    fn a_file_reads_back() {
        let db = b"SQLite format 3\0 and pages";
        let file = file_for(db);
        let m = check(&file).unwrap();
        assert_eq!(m.database_len, db.len() as u64);
        assert_eq!(m.audit_head, manifest().audit_head);
    }

    #[test]
    fn damage_is_found() {
        let db = b"SQLite format 3\0 and pages";
        let file = file_for(db);

        let mut flipped = file.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert_eq!(check(&flipped), Err(BackupFormatError::Checksum));

        let short = &file[..file.len() - 1];
        assert!(matches!(
            check(short),
            Err(BackupFormatError::Length { .. })
        ));

        assert_eq!(
            check(b"SQLite format 3\0"),
            Err(BackupFormatError::NotABackup)
        );
        let mut bad = MAGIC.to_vec();
        bad.extend_from_slice(b"{\"keyward_version\":1}\n");
        assert!(matches!(check(&bad), Err(BackupFormatError::Manifest(_))));
        let mut long = MAGIC.to_vec();
        long.extend(std::iter::repeat_n(b' ', MAX_MANIFEST_LEN + 10));
        assert!(matches!(check(&long), Err(BackupFormatError::Manifest(_))));
    }

    proptest::proptest! {
        /// A backup file is read from wherever the admin kept it: any bytes after the magic
        /// line are refused with an error or read, never a panic.
        #[test]
        fn any_bytes_after_the_magic_are_read_or_refused(tail in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let mut file = MAGIC.to_vec();
            file.extend_from_slice(&tail);
            if let Ok((m, start)) = decode_header(&file) {
                proptest::prop_assert!(start <= file.len());
                let mut c = Checker::new(&m);
                c.update(&file[start..]);
                let _ = c.finish();
            }
        }
    }
}
