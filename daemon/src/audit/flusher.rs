//! Durability: the group `fdatasync` every synced record waits on, and the background thread
//! that syncs what reads wrote within [`super::SYNC_INTERVAL`], publishes anchors and writes
//! the periodic checkpoint of a quiet log.
//!
//! Must not: run on a runtime worker (it blocks on the disk), or clear the degraded state
//! except after a sync that succeeded.

use super::*;

impl AuditLog {
    /// Make every record up to number `through` durable (one `fdatasync` serves every caller
    /// waiting at the time: group commit).
    pub(super) fn sync_through(&self, through: u64) -> Result<(), AuditError> {
        let _one = lock(&self.sync_lock);
        if self.synced.load(Ordering::Acquire) >= through && !self.degraded.load(Ordering::Acquire)
        {
            return Ok(());
        }
        let upto = self.written.load(Ordering::Acquire);
        // Read after `upto`: a record counted there went to this file or one synced before.
        match self.live().sync_data() {
            Ok(()) => {
                self.synced.store(upto, Ordering::Release);
                self.outbox.synced(upto);
                self.degraded.store(false, Ordering::Release);
                Ok(())
            }
            Err(e) => {
                self.degraded_full.store(no_space(&e), Ordering::Release);
                self.degraded.store(true, Ordering::Release);
                Err(AuditError::Sync(e))
            }
        }
    }

    pub(super) fn wake_flusher(&self) {
        *lock(&self.wake) = true;
        self.wake_cv.notify_one();
    }

    /// The background flusher: syncs what reads wrote, and writes the periodic checkpoint
    /// when the log has been quiet for [`CHECKPOINT_INTERVAL`].
    pub(super) fn flush_loop(&self) {
        loop {
            {
                let woken = lock(&self.wake);
                let (mut woken, _) = self
                    .wake_cv
                    .wait_timeout_while(woken, SYNC_INTERVAL, |w| {
                        !*w && !self.stop.load(Ordering::Acquire)
                    })
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                *woken = false;
            }
            if self.stop.load(Ordering::Acquire) {
                return;
            }
            let written = self.written.load(Ordering::Acquire);
            if written > self.synced.load(Ordering::Acquire)
                || self.degraded.load(Ordering::Acquire)
            {
                if let Err(e) = self.sync_through(written) {
                    tracing::error!("audit log: {e}; requests fail until a sync succeeds");
                }
            }
            self.publish_anchor();
            let mut w = lock(&self.writer);
            if w.key.is_some()
                && w.since_checkpoint > 0
                && w.last_checkpoint.elapsed() >= CHECKPOINT_INTERVAL
            {
                if let Err(e) = self.checkpoint(&mut w, "periodic") {
                    tracing::error!("audit log: periodic checkpoint: {e}");
                }
            }
        }
    }
}
