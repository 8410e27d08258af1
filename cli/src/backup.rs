//! `keyward backup FILE`: fetch a backup file from keywardd (`Backup`, then `BackupChunk` until
//! its end) and write it to FILE, mode 0600, atomically: into a temporary file beside FILE,
//! checked against the daemon's SHA-256 and the manifest's own checksum, synced, then renamed
//! over FILE. An interrupted or damaged transfer never leaves a FILE behind.
//!
//! It only copies bytes the daemon made: the snapshot is taken on the daemon's side (the
//! daemon owns the database; see keywardd's `backup` module). Restoring is keywardd's job too
//! (`keywardd --restore FILE`), offline.

use std::fs::File;
use std::io::Write as _;
use std::path::Path;

use keyward::api::{methods, BackupChunkParams, Empty};
use keyward::backup::{decode_header, Checker, Manifest};
use keyward::text::hex;
use keyward::Client;
use serde_json::json;
use sha2::{Digest as _, Sha256};

use super::commands::Out;
use super::CliError;

fn local(what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> CliError {
    move |e| CliError::Local(format!("{what}: {e}"))
}

pub(crate) fn backup(c: &mut Client, out: &Out, file: &Path) -> Result<(), CliError> {
    let dir = match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    // Made before the daemon is asked, so a FILE that can't be written costs no snapshot.
    let mut temp = tempfile::Builder::new()
        .prefix(".keyward-backup-")
        .tempfile_in(dir)
        .map_err(local(format!("cannot create a file in {}", dir.display())))?;
    let made = c.request::<methods::Backup>(&Empty {})?;
    let mut whole = Sha256::new();
    // The manifest's own checksum (the one `keywardd --restore` checks) is checked as the
    // pieces arrive: the first piece holds the whole header.
    let mut read: Option<(Manifest, Checker)> = None;
    let mut offset = 0u64;
    while offset < made.size {
        let chunk = c.request::<methods::BackupChunk>(&BackupChunkParams {
            id: made.id.clone(),
            offset,
        })?;
        let data = &chunk.data.0;
        if data.is_empty() {
            return Err(CliError::Local(format!(
                "keywardd sent an empty piece at offset {offset} of {}",
                made.size
            )));
        }
        whole.update(data);
        match &mut read {
            Some((_, checker)) => checker.update(data),
            None => {
                let (manifest, start) =
                    decode_header(data).map_err(|e| CliError::Local(e.to_string()))?;
                let mut checker = Checker::new(&manifest);
                checker.update(&data[start..]);
                read = Some((manifest, checker));
            }
        }
        temp.write_all(data)
            .map_err(local(format!("cannot write {}", temp.path().display())))?;
        offset += data.len() as u64;
    }
    if offset != made.size || hex(&whole.finalize()) != made.sha256 {
        return Err(CliError::Local(
            "the backup received does not match keywardd's checksum: nothing written".into(),
        ));
    }
    let Some((manifest, checker)) = read else {
        return Err(CliError::Local("keywardd sent an empty backup".into()));
    };
    checker
        .finish()
        .map_err(|e| CliError::Local(format!("{e}: nothing written")))?;
    temp.as_file()
        .sync_all()
        .map_err(local(format!("cannot sync {}", temp.path().display())))?;
    temp.persist(file)
        .map_err(|e| local(format!("cannot write {}", file.display()))(e.error))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(local(format!("cannot sync {}", dir.display())))?;
    out.emit(
        &json!({
            "file": file,
            "size": made.size,
            "sha256": made.sha256,
            "manifest": manifest,
        }),
        || {
            format!(
                "backup written to {} ({} bytes, sha256 {})\ntaken {} by keywardd {}, schema {}; audit log head {}\n\
                 it holds sealed blobs and ciphertext only: it opens with the recovery shares or the same token\n",
                file.display(),
                made.size,
                made.sha256,
                manifest.created,
                manifest.keyward_version,
                manifest.schema_version,
                manifest
                    .audit_head
                    .as_ref()
                    .map_or("none".into(), |h| format!("seq {} hash {}", h.seq, h.hash)),
            )
        },
    )
}
