//! What the vault tells the audit log ([`AuditKeys`]): the vault opened (check the log
//! against its anchor, checkpoint), closed (last checkpoint, key dropped), a rekey's hand-over
//! to the next key and its end.
//!
//! The vault calls these holding its state lock, from async code on a runtime worker. Each
//! writes and syncs a checkpoint (and may write the anchor, reach the TPM counter, or set a
//! log aside), so the work is queued to a thread of its own ([`HookThread`]) when the hook
//! is called, and the vault awaits its completion: the worker keeps serving while the disk
//! works, and the vault still goes on only once the checkpoint is durable. One thread, one
//! queue: the hooks run in the order the vault's lock gave them, even if a caller stops
//! waiting. Because the vault waits for this thread under its lock, a thread that stops
//! answering stops every seal, unseal and rekey: the watchdog asks it to answer
//! ([`AuditLog::probe_hooks`]).
//!
//! Must not: call into the vault (it calls here under its own lock), or do their disk work on
//! the calling thread.

use std::future::Future;
use std::sync::{mpsc, Weak};

use super::*;
use crate::vault::audit_key::Done;

/// A hook's work, run on the hook thread with the log.
type Job = Box<dyn FnOnce(&AuditLog) + Send>;

/// The thread the hooks' disk work runs on, and its queue.
pub(super) struct HookThread {
    queue: mpsc::Sender<Job>,
}

impl HookThread {
    /// Start the thread for `log`. It ends when the log is dropped (its queue with it).
    pub(super) fn start(log: Weak<AuditLog>) -> io::Result<Self> {
        let (queue, jobs) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("audit-hooks".into())
            .spawn(move || {
                while let Ok(job) = jobs.recv() {
                    let Some(log) = log.upgrade() else { return };
                    job(&log);
                }
            })?;
        Ok(Self { queue })
    }
}

impl AuditLog {
    /// Queue `hook` on the hook thread now, and return its result when it has run.
    fn off_worker<T: Send + 'static>(
        &self,
        hook: impl FnOnce(&AuditLog) -> T + Send + 'static,
    ) -> impl Future<Output = Result<T, AuditError>> + Send + 'static {
        let (done, result) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move |log| {
            // The caller may have stopped waiting: the work is done all the same.
            let _ = done.send(hook(log));
        });
        let queued = match self.hooks.get() {
            Some(hooks) => hooks.queue.send(job).is_ok(),
            None => false,
        };
        async move {
            if !queued {
                return Err(AuditError::HooksStopped);
            }
            // Dropped unanswered: the job panicked.
            result.await.map_err(|_| AuditError::HooksStopped)
        }
    }
}

impl AuditLog {
    /// Whether the hook thread answers: a job that does nothing is queued behind the hooks
    /// already queued, and the future resolves once it has run. Nothing is written. It waits
    /// as long as the thread is busy: await it with a bound.
    ///
    /// # Errors
    /// [`AuditError::HooksStopped`]: the thread has ended.
    pub fn probe_hooks(&self) -> impl Future<Output = Result<(), AuditError>> + Send + 'static {
        self.off_worker(|_| ())
    }
}

/// `done`, with a failure to run the hook at all logged (it is the hook's to log the rest).
fn logged(done: impl Future<Output = Result<(), AuditError>> + Send + 'static) -> Done<()> {
    Box::pin(async move {
        if let Err(e) = done.await {
            tracing::error!("audit log: {e}");
        }
    })
}

impl AuditKeys for AuditLog {
    fn opened(&self, key: SigningKey, by: &str) -> Done<()> {
        let by = by.to_owned();
        logged(self.off_worker(move |log| log.key_opened(key, &by)))
    }

    fn closed(&self, why: &str) -> Done<()> {
        let why = why.to_owned();
        logged(self.off_worker(move |log| log.key_closed(&why)))
    }

    fn rekeying(&self, next: &VerifyingKey) -> Done<Result<(), AuditError>> {
        let next = *next;
        let done = self.off_worker(move |log| log.key_rekeying(&next));
        Box::pin(async move { done.await.and_then(|handed| handed) })
    }

    fn rekeyed(&self, key: Option<SigningKey>) -> Done<()> {
        logged(self.off_worker(move |log| log.key_rekeyed(key)))
    }
}

/// The hooks' work, on the hook thread (or a test's).
impl AuditLog {
    /// [`AuditKeys::opened`], here.
    pub(super) fn key_opened(&self, key: SigningKey, by: &str) {
        let public = key.verifying_key();
        let mut w = lock(&self.writer);
        if w.key.as_ref().map(SigningKey::verifying_key) == Some(public) {
            return;
        }
        if w.key.is_none() {
            // The key is here: check what was written while it was not, before signing it.
            let checked = self.check_anchor(&w, &public);
            w.found = None;
            let checked = match checked {
                Ok(anchor) => self.check_counter(&mut w, anchor.as_ref()),
                Err(finding) => {
                    // Anchors of the new log go on from the counter as it is.
                    let _ = self.check_counter(&mut w, None);
                    Err(finding)
                }
            };
            if let Err(finding) = checked {
                tracing::error!("audit log: {finding}: not continuing it");
                match self.start_new_log(&mut w, &finding) {
                    Ok(aside) => {
                        *lock(&self.finding) = Some(format!(
                            "{finding}; a new log was started, the old one is in {}",
                            aside.display()
                        ));
                    }
                    Err(e) => {
                        // Never sign over it: no checkpoints until someone looks.
                        tracing::error!("audit log: {e}; checkpoints are off");
                        *lock(&self.finding) = Some(format!(
                            "{finding}; no new log could be started ({e}): checkpoints are off"
                        ));
                        return;
                    }
                }
            }
        }
        if let Err(e) = self.anchor_head(&mut w, &key) {
            // Without it, a crash before the next anchor would look like a removed one.
            tracing::error!("audit log: {e}");
        }
        w.key = Some(key);
        w.next = None;
        if let Err(e) = self.checkpoint_synced(w, &format!("unsealed: {by}"), |_| {}) {
            tracing::error!("audit log: checkpoint at unseal: {e}");
        }
        if let Err(e) = self.store_public_key(&public) {
            tracing::error!("audit log: {e}");
        }
    }

    /// [`AuditKeys::closed`], here.
    pub(super) fn key_closed(&self, why: &str) {
        let w = lock(&self.writer);
        if w.key.is_none() {
            return;
        }
        // The key goes (zeroized) right after the last checkpoint it signs.
        let forget = |w: &mut Writer| {
            w.key = None;
            w.next = None;
        };
        if let Err(e) = self.checkpoint_synced(w, why, forget) {
            tracing::error!("audit log: checkpoint at seal: {e}");
        }
    }

    /// [`AuditKeys::rekeying`], here.
    pub(super) fn key_rekeying(&self, next: &VerifyingKey) -> Result<(), AuditError> {
        let mut w = lock(&self.writer);
        w.next = Some(*next);
        let handed = self.checkpoint_synced(w, "rekey: handing over to the next key", |_| {});
        if handed.is_err() {
            // The rekey is refused: no later checkpoint may keep naming this key.
            lock(&self.writer).next = None;
        }
        handed
    }

    /// [`AuditKeys::rekeyed`], here.
    pub(super) fn key_rekeyed(&self, key: Option<SigningKey>) {
        let mut w = lock(&self.writer);
        w.next = None;
        let public = key.as_ref().map(SigningKey::verifying_key);
        let reason = match key {
            Some(k) => {
                w.key = Some(k);
                "rekeyed: the new key signs from here"
            }
            None => "rekey failed: the hand-over is called off",
        };
        if let Err(e) = self.checkpoint_synced(w, reason, |_| {}) {
            tracing::error!("audit log: checkpoint after rekey: {e}");
        }
        if let Some(public) = public {
            if let Err(e) = self.store_public_key(&public) {
                tracing::error!("audit log: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::test_support::*;
    use ed25519_dalek::SigningKey;
    use std::time::Duration;

    #[test]
    fn a_rekey_hands_over_and_verifies_from_either_key() {
        let dir = tempfile::tempdir().unwrap();
        let old = SigningKey::from_bytes(&[8; 32]);
        let new = SigningKey::from_bytes(&[9; 32]);
        let log = AuditLog::open(dir.path(), AuditOptions::default()).unwrap();
        log.key_opened(old.clone(), "test");
        log.key_rekeying(&new.verifying_key()).unwrap();
        log.request(entry("Status", "vault"), Durability::Written, None)
            .unwrap();
        log.key_rekeyed(Some(new.clone()));
        log.request(entry("GetSecret", "x"), Durability::Written, None)
            .unwrap();
        log.key_closed("sealed by test");
        assert_eq!(
            log.public_key(),
            Some(format::encode_key(&new.verifying_key()))
        );
        log.shutdown();
        let r = verify(dir.path(), &old.verifying_key());
        assert_eq!(r.keys.len(), 2);
        verify(dir.path(), &new.verifying_key());
    }

    /// The probe answers through the hook thread, so a hook stuck there holds it; it writes
    /// nothing.
    #[tokio::test]
    async fn the_hook_probe_answers_only_when_the_hook_thread_is_free() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(dir.path(), AuditOptions::default()).unwrap();
        let len = || std::fs::metadata(log.path()).unwrap().len();
        let before = len();
        log.probe_hooks().await.unwrap();

        let (release, held) = std::sync::mpsc::channel::<()>();
        let stuck = log.off_worker(move |_| {
            let _ = held.recv();
        });
        let mut probe = std::pin::pin!(log.probe_hooks());
        let waited = tokio::time::timeout(Duration::from_millis(200), &mut probe).await;
        assert!(waited.is_err(), "answered while a hook held the thread");
        release.send(()).unwrap();
        stuck.await.unwrap();
        probe.await.unwrap();
        assert_eq!(len(), before, "a probe wrote a record");
        log.shutdown();
    }

    /// The vault awaits these hooks on a runtime worker while it holds its lock: their
    /// `fdatasync` must not run there. A current-thread runtime has one worker. The test holds
    /// the log's sync lock, as a slow `fdatasync` would hold up the hand-over's sync; a task
    /// spawned on that runtime while the hook is in flight must still run. Were the sync on
    /// the worker, the probe could not run until the disk let go.
    #[test]
    fn a_hook_waits_for_the_disk_off_the_runtime_worker() {
        let dir = tempfile::tempdir().unwrap();
        let old = SigningKey::from_bytes(&[8; 32]);
        let new = SigningKey::from_bytes(&[9; 32]);
        let log = AuditLog::open(dir.path(), AuditOptions::default()).unwrap();
        log.key_opened(old.clone(), "test");
        let (ran, probe) = std::sync::mpsc::channel();
        let slow_disk = lock(&log.sync_lock);
        let runtime = {
            let keys: Arc<dyn AuditKeys> = log.clone();
            let next = new.verifying_key();
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    let handing = keys.rekeying(&next);
                    let probe = tokio::spawn(async move { ran.send(()).unwrap() });
                    let handed = handing.await;
                    probe.await.unwrap();
                    handed
                })
            })
        };
        let progressed = probe.recv_timeout(Duration::from_secs(10));
        drop(slow_disk);
        let handed = runtime.join().unwrap();
        assert!(
            progressed.is_ok(),
            "the runtime's worker was blocked while the hook waited for the disk"
        );
        handed.unwrap();
        // And the hand-over is on disk: the log verifies from the old key to the new.
        log.key_rekeyed(Some(new.clone()));
        log.shutdown();
        assert_eq!(verify(dir.path(), &old.verifying_key()).keys.len(), 2);
    }
}
