//! What the daemon tells systemd about its own health after `READY=1`: the one `STATUS=` line
//! ([`StatusLine`]), the watchdog pings ([`watchdog`]) and the device watcher
//! ([`watch_devices`]).
//!
//! [`StatusLine`] owns the line's composition: the vault's state, then any device that went
//! away or came back, then a failing health check, then what the audit log's anchor check
//! found. Every part of the daemon that changes the line goes through it, so a change to one
//! part never drops another.
//!
//! [`watchdog`] sends `WATCHDOG=1` at half the interval systemd asked for, and only while the
//! store and the audit log still answer — the log's writer and flusher, and the thread its
//! vault hooks run on, which the vault waits for under its lock at every seal, unseal and
//! rekey; when one does not, it stops pinging (so systemd restarts the daemon), says why once
//! in the log and on `STATUS=`. Its probes can block (a locked database, a stuck audit write,
//! a hook waiting for a hung TPM counter), so they run on a blocking thread of the store's
//! (never on the caller's), on a blocking thread and on the hook thread itself, each bounded,
//! and never more than one of each at a time.
//!
//! Must not: write audit records (a probe is not a request, and one per ping would flood the
//! log), restart or reopen anything itself (the device actors reopen their devices; systemd
//! restarts the daemon), or put a secret on the status line (device details and store and audit
//! errors name files, devices and codes, never values).

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sd_notify::NotifyState;
use tokio::sync::watch;
use tokio::time::{interval_at, Instant, MissedTickBehavior};

use crate::audit::AuditLog;
use crate::device::DeviceHandle;
use crate::store::Store;
use crate::sys;

/// The daemon's one `STATUS=` line, put together from its parts and sent on every change.
pub struct StatusLine {
    audit: Arc<AuditLog>,
    parts: Mutex<Parts>,
}

#[derive(Default)]
struct Parts {
    /// The vault's own line (`unsealed by tpm`, `sealed: …`).
    vault: String,
    /// Devices whose availability changed since start, by name: why one is down, or that it
    /// came back.
    devices: BTreeMap<String, String>,
    /// Why the health check fails, while it does.
    health: Option<String>,
}

impl std::fmt::Debug for StatusLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatusLine")
            .field("line", &self.line())
            .finish_non_exhaustive()
    }
}

impl StatusLine {
    /// An empty line; `audit` is asked at every change what its anchor check found.
    pub fn new(audit: Arc<AuditLog>) -> Arc<Self> {
        Arc::new(Self {
            audit,
            parts: Mutex::new(Parts::default()),
        })
    }

    /// The vault's state changed: send the new line.
    pub fn vault(&self, line: &str) {
        self.change(|p| p.vault = line.to_owned(), &[]);
    }

    /// The first line, with `READY=1`. Returns it (for the log).
    pub fn ready(&self, vault: &str) -> String {
        self.change(|p| p.vault = vault.to_owned(), &[NotifyState::Ready])
    }

    /// The line as it stands.
    pub fn line(&self) -> String {
        self.compose(&self.lock())
    }

    fn device(&self, name: &str, note: String) {
        self.change(
            |p| {
                p.devices.insert(name.to_owned(), note);
            },
            &[],
        );
    }

    fn health(&self, failing: Option<String>) {
        self.change(|p| p.health = failing, &[]);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Parts> {
        self.parts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Change a part and send the whole line (with `extra` states). Sent under the lock, so
    /// that of two changes at once the later line is also the one systemd keeps.
    fn change(&self, edit: impl FnOnce(&mut Parts), extra: &[NotifyState<'_>]) -> String {
        let mut parts = self.lock();
        edit(&mut parts);
        let line = self.compose(&parts);
        let mut states = extra.to_vec();
        states.push(NotifyState::Status(&line));
        sys::notify(&states);
        line
    }

    fn compose(&self, parts: &Parts) -> String {
        let mut line = parts.vault.clone();
        for note in parts.devices.values().chain(&parts.health) {
            if !line.is_empty() {
                line.push_str("; ");
            }
            line.push_str(note);
        }
        if let Some(f) = self.audit.finding() {
            line.push_str("; AUDIT LOG DID NOT MATCH ITS ANCHOR: ");
            line.push_str(&f);
        }
        // One datagram line per state: a newline would start a bogus one.
        line.replace('\n', " ")
    }
}

/// A probe whose answer is awaited with a bound. One that did not answer in time is kept and
/// awaited again at the next check instead of starting another, so a stuck store or audit log
/// collects one waiting probe, not one per check.
struct Probe {
    what: &'static str,
    running: Option<Answer>,
}

/// A probe's answer to come: `Err` says what is wrong.
type Answer = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;

impl Probe {
    fn new(what: &'static str) -> Self {
        Self {
            what,
            running: None,
        }
    }

    async fn check<F>(&mut self, within: Duration, start: impl FnOnce() -> F) -> Result<(), String>
    where
        F: Future<Output = Result<(), String>> + Send + 'static,
    {
        let running = self.running.get_or_insert_with(|| Box::pin(start()));
        match tokio::time::timeout(within, running).await {
            Ok(answer) => {
                self.running = None;
                answer.map_err(|e| format!("{}: {e}", self.what))
            }
            Err(_) => Err(format!("{} did not answer within {within:?}", self.what)),
        }
    }
}

/// Ping systemd's watchdog every `interval / 2` while the store, the audit log and its hook
/// thread answer (each within `interval / 4`), until `stop` turns true. `interval` is
/// `WATCHDOG_USEC`.
pub async fn watchdog(
    interval: Duration,
    store: Store,
    audit: Arc<AuditLog>,
    status: Arc<StatusLine>,
    mut stop: watch::Receiver<bool>,
) {
    let within = interval / 4;
    let mut tick = tokio::time::interval(interval / 2);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut store_probe = Probe::new("the store");
    let mut audit_probe = Probe::new("the audit log");
    let mut hooks_probe = Probe::new("the audit log's hook thread");
    let mut failing: Option<String> = None;
    tracing::info!(?interval, "systemd watchdog on");
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let (s, a, h) = tokio::join!(
            store_probe.check(within, || {
                let store = store.clone();
                async move { store.probe().await.map_err(|e| e.to_string()) }
            }),
            audit_probe.check(within, || {
                let audit = Arc::clone(&audit);
                async move {
                    match tokio::task::spawn_blocking(move || audit.probe()).await {
                        Ok(answer) => answer.map_err(|e| e.to_string()),
                        Err(e) => Err(e.to_string()),
                    }
                }
            }),
            hooks_probe.check(within, || {
                let answered = audit.probe_hooks();
                async move { answered.await.map_err(|e| e.to_string()) }
            }),
        );
        match s.and(a).and(h) {
            Ok(()) => {
                sys::notify(&[NotifyState::Watchdog]);
                if failing.take().is_some() {
                    tracing::info!("health check passes again; watchdog pings resume");
                    status.health(None);
                }
            }
            Err(why) => {
                // Once per cause, not once per check.
                if failing.as_ref() != Some(&why) {
                    tracing::error!(
                        "health check failed, not pinging the watchdog (systemd restarts \
                         the daemon if this lasts): {why}"
                    );
                    status.health(Some(format!("health check failed: {why}")));
                    failing = Some(why);
                }
            }
        }
    }
}

/// Ping every device through its actor every `every`, until `stop` turns true; when a device
/// goes away or comes back, say so once in the log and on `STATUS=`. A failed ping makes the
/// actor drop the device and reopen it (with backoff); this only reports.
pub async fn watch_devices(
    devices: BTreeMap<String, DeviceHandle>,
    every: Duration,
    status: Arc<StatusLine>,
    mut stop: watch::Receiver<bool>,
) {
    let mut up: BTreeMap<String, bool> = devices
        .iter()
        .map(|(name, d)| (name.clone(), d.status().available))
        .collect();
    let mut tick = interval_at(Instant::now() + every, every);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        // All at once: a hung device costs its own call timeout, not the others' reports.
        let mut pings = tokio::task::JoinSet::new();
        for device in devices.values() {
            let device = device.clone();
            pings.spawn(async move {
                // The answer shows in the actor's state; an error here is that state.
                let _ = device.call(|backend| backend.ping()).await;
                device
            });
        }
        while let Some(pinged) = pings.join_next().await {
            let Ok(device) = pinged else { continue };
            let now = device.status();
            let Some(was) = up.get_mut(device.name()) else {
                continue;
            };
            if *was == now.available {
                continue;
            }
            *was = now.available;
            let name = device.name();
            if now.available {
                tracing::info!(device = name, detail = %now.detail, "device available again");
                status.device(name, format!("device {name} available again"));
            } else {
                tracing::warn!(device = name, reason = %now.detail, "device became unavailable");
                status.device(name, format!("device {name} unavailable: {}", now.detail));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn a_probe_that_does_not_answer_is_awaited_again_not_started_again() {
        let started = Arc::new(AtomicUsize::new(0));
        let (answer_tx, answer_rx) = tokio::sync::oneshot::channel::<Result<(), String>>();
        let mut answer_rx = Some(answer_rx);
        let mut probe = Probe::new("the thing");
        let within = Duration::from_millis(10);
        let mut start = || {
            started.fetch_add(1, Ordering::SeqCst);
            let rx = answer_rx.take().expect("started once");
            async move { rx.await.unwrap_or_else(|_| Err("dropped".into())) }
        };
        for _ in 0..3 {
            let e = probe.check(within, &mut start).await.unwrap_err();
            assert_eq!(e, "the thing did not answer within 10ms");
        }
        assert_eq!(started.load(Ordering::SeqCst), 1);
        answer_tx.send(Err("locked".into())).unwrap();
        let e = probe.check(within, &mut start).await.unwrap_err();
        assert_eq!(e, "the thing: locked");
        // Answered: the next check starts a new probe.
        let ok = probe.check(within, || async { Ok(()) }).await;
        assert_eq!(ok, Ok(()));
        assert_eq!(started.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn the_line_keeps_every_part_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let audit = AuditLog::open(dir.path(), crate::audit::AuditOptions::default()).unwrap();
        let status = StatusLine::new(audit);
        status.vault("unsealed by tpm");
        status.health(Some("health check failed: the store did not answer".into()));
        status.device("tpm", "device tpm unavailable: gone\nfor now".into());
        status.device("hsm", "device hsm available again".into());
        assert_eq!(
            status.line(),
            "unsealed by tpm; device hsm available again; device tpm unavailable: gone for now; \
             health check failed: the store did not answer"
        );
        status.health(None);
        status.vault("sealed: by request");
        assert_eq!(
            status.line(),
            "sealed: by request; device hsm available again; device tpm unavailable: gone for now"
        );
    }
}
