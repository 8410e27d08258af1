//! The audit outbox: the records of secret changes (`PutSecret`, `DeleteSecret`), committed in
//! the store's transaction with the change they record, then appended to `audit.log`.
//!
//! A change and its record are one SQLite commit (one `fsync`): both are on disk, or neither.
//! Before the change the log is asked whether it takes records ([`AuditLog::stage`]: not
//! degraded, any damage at its end declared), so a change is not made while the log is down.
//! After the commit [`AuditLog::export`] appends every committed row not yet in the file, in
//! id order, each line carrying its row's id (`outbox`), before the caller is answered; the
//! background sync makes the lines durable, and a row is deleted once its line is (by
//! [`AuditLog::clean_outbox`], every [`CLEAN_INTERVAL`] while rows wait, and at stop). At start,
//! before anything is served, [`AuditLog::export_outbox_at_start`] finds which rows the log
//! already holds (by the ids in its lines from the rows' `after_seq` on) and appends the rest:
//! after a crash between a commit and its line, the line comes at the next start, exactly once.
//!
//! Must not: append a row out of id order, skip one, or delete one before its line is durable.

use std::collections::VecDeque;

use rusqlite::Transaction;

use super::*;
use crate::store::tables::{self, OutboxRow};
use crate::store::{Store, StoreError};

/// How often rows whose lines are durable are deleted while any wait.
pub const CLEAN_INTERVAL: Duration = Duration::from_secs(1);

/// Where the outbox's rows stand, as this run knows it.
#[derive(Debug, Default)]
pub(super) struct Outbox {
    /// The highest id whose line is in the file. Held while appending, so rows go in one at a
    /// time, in order.
    exported: Mutex<u64>,
    /// Lines appended and not yet known durable: (record number, row id), in order.
    unsynced: Mutex<VecDeque<(u64, u64)>>,
    /// The highest id whose line is durable.
    durable: AtomicU64,
    /// The highest id deleted from the outbox (rows up to it are gone).
    cleaned: AtomicU64,
}

/// A secret change's record, made before the change; [`Staged::commit`] puts it in the
/// change's transaction.
#[derive(Debug)]
pub struct Staged {
    after_seq: u64,
    time: String,
    entry: Entry,
}

impl Staged {
    /// Insert the record, with `detail` (the version written), into the outbox inside `tx`;
    /// returns the row, for [`AuditLog::export`] once `tx` is committed.
    ///
    /// # Errors
    /// A SQLite failure (the change it belongs to fails with it).
    pub fn commit(
        self,
        tx: &Transaction<'_>,
        detail: Option<String>,
    ) -> Result<OutboxRow, StoreError> {
        let mut entry = self.entry;
        if detail.is_some() {
            entry.detail = detail;
        }
        let record = serde_json::to_string(&entry.into_body())
            .map_err(|e| StoreError::Corrupt(format!("cannot encode an audit record: {e}")))?;
        let id = tables::insert_outbox(tx, self.after_seq, &self.time, &record)?;
        Ok(OutboxRow {
            id,
            after_seq: self.after_seq,
            time: self.time,
            record,
        })
    }
}

impl Outbox {
    /// Lines up to record number `through` are durable.
    pub(super) fn synced(&self, through: u64) {
        let mut unsynced = lock(&self.unsynced);
        while let Some(&(number, id)) = unsynced.front() {
            if number > through {
                break;
            }
            self.durable.fetch_max(id, Ordering::AcqRel);
            unsynced.pop_front();
        }
    }
}

impl AuditLog {
    /// Make the record of a secret change, to be committed with it: only if the log takes
    /// records now (no failed sync; damage at its end, if any, declared first), so that no
    /// change is made while the log is down.
    ///
    /// # Errors
    /// [`AuditError::Degraded`] after a failed sync; the resume record could not be written.
    pub fn stage(&self, entry: Entry) -> Result<Staged, AuditError> {
        if self.degraded.load(Ordering::Acquire) {
            return Err(AuditError::Degraded {
                storage_full: self.degraded_full.load(Ordering::Acquire),
            });
        }
        let mut w = lock(&self.writer);
        if w.damaged.is_some() {
            self.resume(&mut w)?;
        }
        Ok(Staged {
            after_seq: w.seq,
            time: now(),
            entry,
        })
    }

    /// Append every committed outbox row up to `row` that the file does not hold yet, in id
    /// order (rows committed since, by other callers, come along). Returns once `row` is in
    /// the file (`write(2)` returned; durable within [`SYNC_INTERVAL`]). When `row` is the
    /// next one the file takes, it is written as the caller hands it over: no read of the
    /// store.
    ///
    /// # Errors
    /// The rows can't be read, or a line can't be written (it is appended by a later call, or
    /// at the next start: the row stays until its line is durable).
    pub fn export(&self, store: &Store, row: OutboxRow) -> Result<(), AuditError> {
        let mut exported = lock(&self.outbox.exported);
        if *exported >= row.id {
            return Ok(());
        }
        let from = *exported;
        // Ids come from SQLite's rowid, one more for each row committed: if this is the next
        // one, no other committed row comes before it.
        if row.id == from + 1 {
            return self.append_rows(&mut exported, vec![row]);
        }
        let rows = store
            .read_now(|c| tables::outbox_after(c, from))
            .map_err(AuditError::Outbox)?;
        self.append_rows(&mut exported, rows)
    }

    /// Write `rows` (in id order) and advance `exported` past each one written.
    fn append_rows(&self, exported: &mut u64, rows: Vec<OutboxRow>) -> Result<(), AuditError> {
        if rows.is_empty() {
            return Ok(());
        }
        let mut w = lock(&self.writer);
        for row in rows {
            let mut body: Body = serde_json::from_str(&row.record).map_err(|e| {
                AuditError::Write(io::Error::other(format!(
                    "audit outbox row {} does not decode: {e}",
                    row.id
                )))
            })?;
            if let Body::Request(r) = &mut body {
                r.outbox = Some(row.id);
            }
            if w.damaged.is_some() {
                self.resume(&mut w)?;
            }
            self.write_line(&mut w, row.time, body)?;
            let number = self.written.fetch_add(1, Ordering::AcqRel) + 1;
            lock(&self.outbox.unsynced).push_back((number, row.id));
            *exported = row.id;
            if w.since_checkpoint >= CHECKPOINT_EVERY {
                // A periodic checkpoint that fails costs the record nothing: it is written.
                let _ = self.checkpoint(&mut w, "periodic");
            }
        }
        Ok(())
    }

    /// Delete the outbox rows whose lines are durable, if there are any not deleted yet.
    ///
    /// # Errors
    /// The store's.
    pub async fn clean_outbox(&self, store: &Store) -> Result<(), StoreError> {
        let durable = self.outbox.durable.load(Ordering::Acquire);
        if durable <= self.outbox.cleaned.load(Ordering::Acquire) {
            return Ok(());
        }
        store
            .write(move |tx| tables::delete_outbox_through(tx, durable))
            .await?;
        self.outbox.cleaned.fetch_max(durable, Ordering::AcqRel);
        Ok(())
    }

    /// Delete rows whose lines are durable every [`CLEAN_INTERVAL`], until the log stops. A
    /// delete joins the group commit of the writes of the moment; on a quiet store it costs
    /// one commit per interval, and only while rows wait.
    pub fn spawn_outbox_cleaner(self: &Arc<Self>, store: Store) -> tokio::task::JoinHandle<()> {
        let log = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(CLEAN_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(log) = log.upgrade() else { return };
                if log.stop.load(Ordering::Acquire) {
                    return;
                }
                if let Err(e) = log.clean_outbox(&store).await {
                    tracing::warn!("audit outbox: cannot delete the rows already in the log: {e}");
                }
            }
        })
    }

    /// [`AuditLog::export_outbox_at_start`] on a blocking thread, from the start-up: a failure
    /// to write is logged (the rows stay, and the next export goes on from there; requests
    /// fail closed meanwhile as the log says), one to read is returned.
    ///
    /// # Errors
    /// [`AuditError::Outbox`] or [`AuditError::Files`]: the daemon must not start appending
    /// records without knowing which ones the log holds.
    pub async fn open_outbox(self: &Arc<Self>, store: &Store) -> Result<(), AuditError> {
        let (log, rows) = (Arc::clone(self), store.clone());
        let exported = tokio::task::spawn_blocking(move || log.export_outbox_at_start(&rows))
            .await
            .map_err(|e| AuditError::Write(io::Error::other(e.to_string())))?;
        match exported {
            Ok(_) => Ok(()),
            Err(e @ (AuditError::Outbox(_) | AuditError::Files(_))) => Err(e),
            Err(e) => {
                tracing::error!("audit log: cannot append the outbox's records at start: {e}");
                Ok(())
            }
        }
    }

    /// At start, before anything is served: append the outbox rows the log does not hold (a
    /// crash came between their commit and their line), in order, make the log durable, and
    /// note every row as durable for [`AuditLog::clean_outbox`]. Returns how many were
    /// appended. Blocks on the disk: call it on a blocking thread.
    ///
    /// # Errors
    /// [`AuditError::Outbox`] or [`AuditError::Files`]: the rows or the log's files can't be
    /// read (nothing was appended: which rows the log holds is not known, so none may be); a
    /// line can't be written or synced (the next export goes on from there).
    pub fn export_outbox_at_start(&self, store: &Store) -> Result<usize, AuditError> {
        let rows = store
            .read_now(|c| tables::outbox_after(c, 0))
            .map_err(AuditError::Outbox)?;
        let Some(last) = rows.last().map(|r| r.id) else {
            return Ok(0);
        };
        let floor = rows.iter().map(|r| r.after_seq).min().unwrap_or(0);
        let held = self.outbox_ids_from(floor)?;
        let mut exported = lock(&self.outbox.exported);
        // Rows go in in order, one after the other: the file holds every row up to the
        // highest id it holds, and none after. From here on a failure leaves `exported` right
        // for the next export to go on from.
        *exported = held.unwrap_or(0);
        let missing: Vec<OutboxRow> = rows.into_iter().filter(|r| r.id > *exported).collect();
        let appended = missing.len();
        self.append_rows(&mut exported, missing)?;
        drop(exported);
        // The lines read back may be in the page cache only (the process was killed, the
        // machine was not): durable now, with the ones just written, before their rows go.
        let through = self.written.load(Ordering::Acquire);
        self.live().sync_data().map_err(AuditError::Sync)?;
        self.outbox.synced(through);
        self.outbox.durable.fetch_max(last, Ordering::AcqRel);
        if appended > 0 {
            tracing::warn!(
                records = appended,
                "audit log: appended the records of changes committed before the last stop"
            );
        }
        Ok(appended)
    }

    /// The highest outbox id on a record of the log at or after `seq`, as found at start.
    fn outbox_ids_from(&self, seq: u64) -> Result<Option<u64>, AuditError> {
        let w = lock(&self.writer);
        if seq >= w.seq {
            return Ok(None);
        }
        let bytes = self.read_from(&w, seq).map_err(AuditError::Files)?;
        drop(w);
        Ok(format::lines(&bytes)
            .iter()
            .filter(|l| l.complete)
            .filter_map(|l| format::parse(l.bytes).ok())
            .filter(|r| r.seq >= seq)
            .filter_map(|r| match r.body {
                Body::Request(RequestRecord { outbox, .. }) => outbox,
                _ => None,
            })
            .max())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::test_support::*;

    fn put_record(
        log: &AuditLog,
        store: &Store,
        rt: &tokio::runtime::Runtime,
        n: u32,
    ) -> OutboxRow {
        let staged = log.stage(entry("PutSecret", &format!("s{n}"))).unwrap();
        rt.block_on(store.write(move |tx| staged.commit(tx, Some(format!("version {n}")))))
            .unwrap()
    }

    fn outbox_records(dir: &Path) -> Vec<(u64, String)> {
        format::lines(&whole_set(dir))
            .iter()
            .filter_map(|l| format::parse(l.bytes).ok())
            .filter_map(|r| match r.body {
                Body::Request(q) => q.outbox.map(|id| (id, q.target)),
                _ => None,
            })
            .collect()
    }

    fn rows(store: &Store) -> usize {
        store
            .read_now(|c| tables::outbox_after(c, 0))
            .unwrap()
            .len()
    }

    /// A change committed with its record, and the process gone before the line was written
    /// (the log and the store dropped without a stop, as a kill leaves them): the next open
    /// appends it, once, in order after the ones that were exported, and the chain verifies.
    #[test]
    fn a_row_committed_before_a_crash_is_exported_exactly_once_at_the_next_open() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("keyward.db");
        let key = ed25519_dalek::SigningKey::from_bytes(&[5; 32]);
        {
            let store = Store::open(&db).unwrap();
            let log = AuditLog::open(dir.path(), AuditOptions::default()).unwrap();
            log.key_opened(key.clone(), "test");
            let first = put_record(&log, &store, &rt, 1);
            log.export(&store, first).unwrap();
            // Committed, never exported: the crash lands here.
            put_record(&log, &store, &rt, 2);
            put_record(&log, &store, &rt, 3);
            // No shutdown: the flusher thread is left behind like a killed process's.
            log.stop.store(true, Ordering::Release);
            log.wake_flusher();
        }
        assert_eq!(
            outbox_records(dir.path()),
            [(1, "s1".to_owned())],
            "only the first was exported before the crash"
        );

        // Killed again right after the start's export, before its rows were deleted: the
        // start after that finds them all in the file and appends nothing.
        for expected in [2, 0] {
            let store = Store::open(&db).unwrap();
            assert_eq!(
                rows(&store),
                3,
                "no row is deleted before the restart's export"
            );
            let log = AuditLog::open(dir.path(), AuditOptions::default()).unwrap();
            log.key_opened(key.clone(), "test");
            assert_eq!(log.export_outbox_at_start(&store).unwrap(), expected);
            log.stop.store(true, Ordering::Release);
            log.wake_flusher();
        }
        let store = Store::open(&db).unwrap();
        let log = AuditLog::open(dir.path(), AuditOptions::default()).unwrap();
        log.key_opened(key.clone(), "test");
        assert_eq!(log.export_outbox_at_start(&store).unwrap(), 0);
        rt.block_on(log.clean_outbox(&store)).unwrap();
        assert_eq!(rows(&store), 0, "rows whose lines are durable are deleted");
        // A change after the restart gets the next id, appended in order.
        let next = put_record(&log, &store, &rt, 4);
        log.export(&store, next).unwrap();
        log.shutdown();
        assert_eq!(
            outbox_records(dir.path()),
            [
                (1, "s1".to_owned()),
                (2, "s2".to_owned()),
                (3, "s3".to_owned()),
                (4, "s4".to_owned())
            ]
        );
        let report = format::verify(&whole_set(dir.path()), &key.verifying_key()).unwrap();
        assert_eq!(report.unsigned_tail, 0);
    }

    /// Concurrent committers: whoever exports takes every committed row, in id order, so the
    /// file's order is the commit order even when a later caller gets there first.
    #[test]
    fn a_later_caller_exports_the_earlier_rows_first() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("keyward.db")).unwrap();
        let log = AuditLog::open(dir.path(), AuditOptions::default()).unwrap();
        let a = put_record(&log, &store, &rt, 1);
        let b = put_record(&log, &store, &rt, 2);
        let (a_id, b_id) = (a.id, b.id);
        log.export(&store, b).unwrap();
        log.export(&store, a).unwrap();
        log.shutdown();
        assert_eq!(
            outbox_records(dir.path()),
            [(a_id, "s1".to_owned()), (b_id, "s2".to_owned())]
        );
        // Durable after the stop's sync: deletable.
        rt.block_on(log.clean_outbox(&store)).unwrap();
        assert_eq!(rows(&store), 0);
    }

    /// A log that can't take records refuses the change before it is made.
    #[test]
    fn a_degraded_log_refuses_to_stage() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(dir.path(), AuditOptions::default()).unwrap();
        log.degraded.store(true, Ordering::Release);
        assert!(matches!(
            log.stage(entry("PutSecret", "s")),
            Err(AuditError::Degraded { .. })
        ));
        log.degraded.store(false, Ordering::Release);
        log.shutdown();
    }
}
