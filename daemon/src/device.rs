//! Device actors: one OS thread per configured device owns its backend (a cryptoki session or an
//! ESAPI context, which must never be shared between threads); async callers talk to it through a
//! bounded queue and get their answer on a oneshot channel, waiting at most a configured time.
//!
//! **Signing beside the actor.** A device that signs in parallel (a PKCS#11 token: each session
//! is served on its own) hands the actor a shared signer when it opens
//! ([`hsm_shim::Signer::shared_signer`]): a pool of sessions. [`DeviceHandle::sign`] signs on
//! the calling thread, on a session of that pool, instead of queueing to the actor: no thread
//! hand-off per signature, and as many signatures at once as the machine has cores, where the
//! actor's one session made them wait in line. The price: a token that hangs inside `C_Sign`
//! holds the runtime worker that called it (the actor's queue only held its own thread). An
//! elliptic-curve signature runs right on the worker; an RSA one, milliseconds long, through
//! [`crate::blocking::here`], so the worker's other tasks move on. If every worker hangs in a
//! token, the runtime stops answering and the service manager's watchdog (see `health`)
//! restarts the daemon. The actor still owns the device's life: it makes
//! the pool when the device opens and drops it when the device goes; a signer that finds the
//! device gone tells the actor (and waits until the actor has taken the device down), and the
//! actor reopens it as for any call.
//!
//! A TPM is one serial device (a second context on it would only wait for the first; swtpm
//! serves one connection at a time): it has no shared signer, and its signatures go through
//! the actor's queue, on purpose. Its context could be shared under a lock (ESAPI allows any
//! thread, one at a time), but then a TPM that stops answering would hold the caller's worker
//! with no way to give up; through the queue the caller hears `Unavailable` at the device
//! timeout while the actor's thread alone waits (the `faults` test of a hung TPM holds a Sign
//! and proves it). The price is two thread hand-offs per signature, ~50 µs: a tenth of
//! swtpm's signature, a thousandth of a hardware TPM's (tens of milliseconds).
//!
//! This module owns opening a device, noticing that it vanished ([`DeviceError::DeviceGone`]),
//! reopening it with exponential backoff, and refusing to ever retry a PIN that failed. It must
//! not know what the operations mean (that is the vault's) and must never log, print or keep a
//! PIN: the PIN file is read at each open attempt and a PIN given to [`DeviceHandle::login`] is
//! dropped (zeroized) after that one attempt.
//!
//! Why a `std::sync::mpsc::sync_channel` for the job queue rather than a tokio channel: the actor
//! thread must wait for work *and* for the time of its next reopen attempt, without sleeping
//! (the queue keeps being served, with fast `Unavailable` answers, while the device is down).
//! std's `Receiver::recv_timeout` does exactly that; tokio's `blocking_recv` cannot time out.
//! `SyncSender::try_send` gives the bounded queue and `Busy` when it is full; replies travel on
//! tokio oneshot channels, whose `send` is synchronous, and status on a tokio `watch`.

use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hsm_shim::pkcs11::{Pkcs11Config, Pkcs11Device, SealMode};
use hsm_shim::tpm::{TpmConfig, TpmDevice};
use hsm_shim::uri::Pkcs11Uri;
use hsm_shim::{
    Backend, DeviceError, DeviceInfo, DeviceKind, KeyAlgorithm, KeyHandle, Pin, SharedSigner,
    SignData,
};
use tokio::sync::{oneshot, watch, Semaphore};

/// Opens a device. Called on the actor's thread: at start and on each reopen with `None` (the
/// opener finds the PIN itself, e.g. by reading the PIN file), and with `Some(pin)` once per
/// [`DeviceHandle::login`].
pub type Opener =
    Box<dyn FnMut(Option<Pin>) -> hsm_shim::Result<Box<dyn Backend>> + Send + 'static>;

/// How an actor queues, waits and retries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ActorOptions {
    /// Calls queued before callers get [`CallError::Busy`] (at least 1).
    pub queue: usize,
    /// How long a caller waits for its answer, queueing included.
    pub timeout: Duration,
    /// First delay between reopen attempts.
    pub backoff_min: Duration,
    /// Longest delay between reopen attempts (the delay doubles up to this).
    pub backoff_max: Duration,
}

impl Default for ActorOptions {
    fn default() -> Self {
        Self {
            queue: 64,
            timeout: Duration::from_secs(30),
            backoff_min: Duration::from_millis(250),
            backoff_max: Duration::from_secs(30),
        }
    }
}

/// Why a device call did not return the device's answer.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The device is not open (it is absent, failed to open, or its PIN failed), the caller's
    /// wait timed out, or the device thread stopped. `reason` says which, for admins.
    #[error("device {device} unavailable: {reason}")]
    Unavailable {
        /// The device's configured name.
        device: String,
        /// Why, e.g. the last open error.
        reason: String,
    },
    /// The device's queue is full.
    #[error("device {device} is busy: its queue is full")]
    Busy {
        /// The device's configured name.
        device: String,
    },
    /// The device ran the operation and it failed.
    #[error(transparent)]
    Device(#[from] DeviceError),
}

/// A device's state, for `Status`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceState {
    /// True while the device is open.
    pub available: bool,
    /// What the device says it is when open; why it is down otherwise.
    pub detail: String,
    /// What the device can generate, as it said when it opened; empty while it is down.
    pub algorithms: Vec<KeyAlgorithm>,
}

/// What the actor publishes; [`DeviceState`] plus what tests and [`DeviceHandle::ready`] need.
#[derive(Clone, Debug)]
struct Snapshot {
    state: DeviceState,
    /// The first open attempt has finished.
    attempted: bool,
    /// A reopen attempt is scheduled (false while open, or while waiting for a PIN).
    retrying: bool,
    /// Open attempts so far.
    attempts: u64,
    /// Successful opens so far: a change means the device came back (or was first reached).
    opens: u64,
}

/// What a job tells the actor after it ran.
enum Outcome {
    Done,
    /// The operation said the device is gone: drop it and reopen, then `answer` the caller (so
    /// that a caller who got `DeviceGone` already sees the device down in `status`).
    Gone {
        why: String,
        answer: Box<dyn FnOnce() + Send>,
    },
}

/// A caller's operation, wrapped so that the actor needs no knowledge of its result type: it
/// gets the backend (or, while the device is down, the reason) and answers the caller itself.
type Work = Box<dyn FnOnce(Result<&mut dyn Backend, &str>) -> Outcome + Send>;

enum Job {
    Call(Work),
    Login {
        pin: Pin,
        reply: oneshot::Sender<Result<(), CallError>>,
    },
    /// A shared signer of the device's `opens`-th opening found the device gone.
    Gone {
        opens: u64,
        why: String,
        reply: oneshot::Sender<Result<(), CallError>>,
    },
}

/// The device's shared signer while it is open, with the [`Snapshot::opens`] count of the
/// opening that made it: written by the actor, read by every [`DeviceHandle::sign`].
#[derive(Default)]
struct SharedSlot(std::sync::RwLock<Option<(u64, Arc<dyn SharedSigner>)>>);

impl SharedSlot {
    fn get(&self) -> Option<(u64, Arc<dyn SharedSigner>)> {
        self.0
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    fn set(&self, shared: Option<(u64, Arc<dyn SharedSigner>)>) {
        *self
            .0
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = shared;
    }
}

struct Inner {
    name: String,
    kind: DeviceKind,
    jobs: SyncSender<Job>,
    state: watch::Receiver<Snapshot>,
    timeout: Duration,
    shared: Arc<SharedSlot>,
    /// Signatures on the shared signer at once: as many as the machine has cores, twice over
    /// (one may wait on the device while another computes); more wait here, not on threads.
    signing: Semaphore,
}

/// A device's actor. Cheap to clone; the thread stops (and closes the device) when the last
/// clone is dropped.
#[derive(Clone)]
pub struct DeviceHandle {
    inner: Arc<Inner>,
}

impl fmt::Debug for DeviceHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.inner.state.borrow().clone();
        f.debug_struct("DeviceHandle")
            .field("name", &self.inner.name)
            .field("kind", &self.inner.kind)
            .field("state", &s.state)
            .field("retrying", &s.retrying)
            .field("open_attempts", &s.attempts)
            .finish()
    }
}

impl DeviceHandle {
    /// Resolves once the actor thread has ended: every handle was dropped, the last job ran and
    /// the device was closed (its sessions logged out and closed, the library finalised).
    ///
    /// The daemon waits for this before the process exits: a device library still closing a
    /// session on the actor thread while the C runtime runs its exit handlers (SoftHSM's static
    /// destructors) can crash the process on its way out.
    pub fn closed(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut state = self.inner.state.clone();
        // The actor owns the only sender: it is dropped when the thread returns.
        async move { while state.changed().await.is_ok() {} }
    }

    /// Start the actor thread for device `name`; it opens the device with `opener` right away
    /// (in the thread). Never fails: if the thread can't start, the handle reports the device
    /// unavailable with that reason.
    pub fn spawn(
        name: String,
        kind: DeviceKind,
        opener: Opener,
        options: ActorOptions,
    ) -> DeviceHandle {
        let (jobs_tx, jobs_rx) = std::sync::mpsc::sync_channel(options.queue.max(1));
        let (state_tx, state_rx) = watch::channel(Snapshot {
            state: DeviceState {
                available: false,
                detail: "opening".into(),
                algorithms: Vec::new(),
            },
            attempted: false,
            retrying: false,
            attempts: 0,
            opens: 0,
        });
        let shared = Arc::new(SharedSlot::default());
        let actor = Actor {
            shared: Arc::clone(&shared),
            name: name.clone(),
            kind,
            opener,
            backend: None,
            down_reason: "opening".into(),
            jobs: jobs_rx,
            state: state_tx,
            backoff_min: options.backoff_min,
            backoff_max: options.backoff_max.max(options.backoff_min),
            backoff: options.backoff_min,
            next_open: None,
            pin_failed: false,
            attempts: 0,
            opens: 0,
        };
        let spawned = std::thread::Builder::new()
            .name(format!("kw-dev-{name}"))
            .spawn(move || actor.run());
        let state = match spawned {
            Ok(_detached) => state_rx,
            Err(e) => {
                // The actor (and the job receiver) went down with the closure: calls will get
                // `Unavailable`; say why in the status.
                tracing::error!(device = %name, error = %e, "cannot start the device thread");
                watch::channel(Snapshot {
                    state: DeviceState {
                        available: false,
                        detail: format!("cannot start the device thread: {e}"),
                        algorithms: Vec::new(),
                    },
                    attempted: true,
                    retrying: false,
                    attempts: 0,
                    opens: 0,
                })
                .1
            }
        };
        DeviceHandle {
            inner: Arc::new(Inner {
                name,
                kind,
                jobs: jobs_tx,
                state,
                timeout: options.timeout,
                shared,
                signing: Semaphore::new(
                    std::thread::available_parallelism().map_or(4, |n| n.get().max(2) * 2),
                ),
            }),
        }
    }

    /// Run `f` on the device in its thread; waits at most `options.timeout` (queueing
    /// included) for the answer. A call whose caller stopped waiting before it reached the
    /// device is skipped; one that was already running completes and its answer is dropped.
    ///
    /// # Errors
    /// [`CallError::Busy`] when the queue is full, [`CallError::Unavailable`] when the device is
    /// down (with the reason), the wait timed out or the thread stopped, and
    /// [`CallError::Device`] with `f`'s own error. After `f` returns
    /// [`DeviceError::DeviceGone`] the actor drops the device and reopens it.
    pub async fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut dyn Backend) -> hsm_shim::Result<R> + Send + 'static,
    ) -> Result<R, CallError> {
        let (reply, answer) = oneshot::channel();
        let device = self.inner.name.clone();
        let work: Work = Box::new(move |backend| {
            if reply.is_closed() {
                return Outcome::Done; // the caller gave up: don't touch the device for nobody
            }
            match backend {
                Err(reason) => {
                    let _ = reply.send(Err(CallError::Unavailable {
                        device,
                        reason: reason.to_owned(),
                    }));
                    Outcome::Done
                }
                Ok(backend) => match f(backend).map_err(|e| vanished_or(e, || backend.ping())) {
                    Err(DeviceError::DeviceGone(why)) => Outcome::Gone {
                        why: why.clone(),
                        answer: Box::new(move || {
                            let _ =
                                reply.send(Err(CallError::Device(DeviceError::DeviceGone(why))));
                        }),
                    },
                    result => {
                        let _ = reply.send(result.map_err(CallError::Device));
                        Outcome::Done
                    }
                },
            }
        });
        self.submit(Job::Call(work))?;
        self.wait(answer).await
    }

    /// Sign with the device key `handle`: on the calling thread with the device's shared
    /// signer when it has one (see the module doc), else on the device's thread as
    /// [`DeviceHandle::call`] does.
    ///
    /// # Errors
    /// As [`DeviceHandle::call`]. On the shared signer there is no queue to be full: callers
    /// beyond the signer's parallelism wait (at most `options.timeout`) for their turn.
    pub async fn sign(&self, handle: Arc<KeyHandle>, data: SignData) -> Result<Vec<u8>, CallError> {
        let Some((opens, signer)) = self.inner.shared.get() else {
            return self.call(move |d| d.sign(&handle, data.input())).await;
        };
        let _turn =
            match tokio::time::timeout(self.inner.timeout, self.inner.signing.acquire()).await {
                Ok(Ok(turn)) => turn,
                Ok(Err(_closed)) => {
                    return Err(CallError::Unavailable {
                        device: self.inner.name.clone(),
                        reason: "the device's signer is closed".into(),
                    })
                }
                Err(_elapsed) => {
                    return Err(CallError::Unavailable {
                        device: self.inner.name.clone(),
                        reason: format!(
                            "timed out after {:?} waiting for a turn to sign",
                            self.inner.timeout
                        ),
                    })
                }
            };
        let sign = || {
            catch_unwind(AssertUnwindSafe(|| {
                signer
                    .sign(&handle, data.input())
                    .map_err(|e| vanished_or(e, || signer.ping()))
            }))
            .unwrap_or_else(|_panic| {
                Err(DeviceError::DeviceGone(
                    "a device operation failed unexpectedly (panicked)".into(),
                ))
            })
        };
        // An elliptic-curve signature takes tens of microseconds: it runs right on this worker,
        // as a store read does, since telling the runtime that the worker blocks costs more
        // (a thread woken to take over the worker's queue) than the signature itself. An RSA
        // signature takes milliseconds, so the worker hands its queue over first.
        let signed = match handle.algorithm() {
            KeyAlgorithm::EcdsaP256 | KeyAlgorithm::Ed25519 => sign(),
            KeyAlgorithm::RsaPss2048 | KeyAlgorithm::RsaPss3072 | KeyAlgorithm::RsaPkcs1_3072 => {
                crate::blocking::here(sign)
            }
        };
        match signed {
            Err(DeviceError::DeviceGone(why)) => {
                self.lost(opens, why.clone()).await;
                Err(CallError::Device(DeviceError::DeviceGone(why)))
            }
            result => result.map_err(CallError::Device),
        }
    }

    /// A shared signer of the `opens`-th opening found the device gone: stop using it, and
    /// have the actor take the device down and reopen it, waiting until it has (so that a
    /// caller who heard `DeviceGone` already sees the device down in `status`).
    async fn lost(&self, opens: u64, why: String) {
        if self
            .inner
            .shared
            .get()
            .is_some_and(|(current, _)| current == opens)
        {
            self.inner.shared.set(None);
        }
        let (reply, answer) = oneshot::channel();
        if self.submit(Job::Gone { opens, why, reply }).is_ok() {
            let _ = self.wait(answer).await;
        }
    }

    /// Try to open the device again right now with this PIN: once, never retried
    /// automatically (e.g. from `keyward unseal --pin`). When the device is already open this
    /// succeeds without using the PIN. The PIN is dropped (zeroized) after the attempt.
    ///
    /// # Errors
    /// [`CallError::Device`] with the open error ([`DeviceError::PinIncorrect`],
    /// [`DeviceError::PinLocked`], ...), [`CallError::Busy`] or [`CallError::Unavailable`] as for
    /// [`DeviceHandle::call`].
    pub async fn login(&self, pin: Pin) -> Result<(), CallError> {
        let (reply, answer) = oneshot::channel();
        self.submit(Job::Login { pin, reply })?;
        self.wait(answer).await
    }

    /// The device's configured name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// `tpm2` or `pkcs11`.
    pub fn kind(&self) -> DeviceKind {
        self.inner.kind
    }

    /// How many times the device has been opened so far (by the start-up attempt, a reopen or a
    /// login): a caller that saw the device unavailable compares it later to learn whether the
    /// device came back since, rather than whether it merely looks available.
    pub fn opens(&self) -> u64 {
        self.inner.state.borrow().opens
    }

    /// Non-blocking snapshot for `Status`: available + detail (device info, or why it's down).
    pub fn status(&self) -> DeviceState {
        self.inner.state.borrow().state.clone()
    }

    /// Wait until the first open attempt finished (used at start-up before unattended unseal).
    pub async fn ready(&self) {
        let mut state = self.inner.state.clone();
        // An error means the thread is gone, so there is nothing left to wait for.
        let _ = state.wait_for(|s| s.attempted).await;
    }

    fn submit(&self, job: Job) -> Result<(), CallError> {
        self.inner.jobs.try_send(job).map_err(|e| match e {
            TrySendError::Full(_) => CallError::Busy {
                device: self.inner.name.clone(),
            },
            TrySendError::Disconnected(_) => CallError::Unavailable {
                device: self.inner.name.clone(),
                reason: self.stopped_reason(),
            },
        })
    }

    async fn wait<R>(
        &self,
        answer: oneshot::Receiver<Result<R, CallError>>,
    ) -> Result<R, CallError> {
        match tokio::time::timeout(self.inner.timeout, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_dropped)) => Err(CallError::Unavailable {
                device: self.inner.name.clone(),
                reason: "the device thread dropped the request (an operation failed \
                         unexpectedly; the device is being reopened)"
                    .into(),
            }),
            Err(_elapsed) => Err(CallError::Unavailable {
                device: self.inner.name.clone(),
                reason: format!(
                    "timed out after {:?} waiting for the device",
                    self.inner.timeout
                ),
            }),
        }
    }

    fn stopped_reason(&self) -> String {
        let s = self.status();
        if s.available {
            "the device thread has stopped".into()
        } else {
            format!("the device thread has stopped: {}", s.detail)
        }
    }
}

/// The state that lives on the device's thread.
struct Actor {
    /// Where the device's shared signer is published while it is open.
    shared: Arc<SharedSlot>,
    name: String,
    kind: DeviceKind,
    opener: Opener,
    backend: Option<Box<dyn Backend>>,
    /// Why the device is down (what calls get while `backend` is `None`).
    down_reason: String,
    jobs: Receiver<Job>,
    state: watch::Sender<Snapshot>,
    backoff_min: Duration,
    backoff_max: Duration,
    /// The delay before the next reopen attempt after this one fails.
    backoff: Duration,
    /// When to try to reopen (only while down, and never after a PIN failure).
    next_open: Option<Instant>,
    /// The unattended PIN (the PIN file) failed once: never open on our own again, only on
    /// [`DeviceHandle::login`]. Retrying it would burn the token's retries or TPM lockout.
    pin_failed: bool,
    attempts: u64,
    opens: u64,
}

const PIN_HINT: &str = "not retried automatically: give the PIN with `keyward unseal --pin`";

impl Actor {
    fn run(mut self) {
        let _ = self.open(None);
        loop {
            let job = match self.next_open.filter(|_| self.backend.is_none()) {
                Some(at) => {
                    let now = Instant::now();
                    if now >= at {
                        let _ = self.open(None);
                        continue;
                    }
                    // Serve the queue (fast `Unavailable`s) until the next attempt is due.
                    match self.jobs.recv_timeout(at - now) {
                        Ok(job) => job,
                        Err(RecvTimeoutError::Timeout) => continue,
                        Err(RecvTimeoutError::Disconnected) => break,
                    }
                }
                None => match self.jobs.recv() {
                    Ok(job) => job,
                    Err(_) => break,
                },
            };
            self.handle(job);
        }
        tracing::debug!(device = %self.name, "device thread stopping: no handles left");
        // Close the device here, on its own thread, before the thread ends: the stop waits for
        // this ([`DeviceHandle::closed`]).
        self.shared.set(None);
        if self.backend.take().is_some() {
            tracing::info!(device = %self.name, "device closed");
        }
    }

    fn handle(&mut self, job: Job) {
        match job {
            Job::Call(work) => {
                let ran = match self.backend.as_mut() {
                    Some(backend) => catch_unwind(AssertUnwindSafe(|| work(Ok(backend.as_mut())))),
                    None => {
                        let reason = self.down_reason.as_str();
                        catch_unwind(AssertUnwindSafe(|| work(Err(reason))))
                    }
                };
                match ran {
                    Ok(Outcome::Done) => {}
                    Ok(Outcome::Gone { why, answer }) => {
                        self.gone(why);
                        answer();
                    }
                    Err(_panic) => {
                        tracing::error!(
                            device = %self.name,
                            "a device operation panicked; dropping the session and reopening"
                        );
                        if self.backend.is_some() {
                            self.gone("a device operation failed unexpectedly (panicked)".into());
                        }
                    }
                }
            }
            Job::Login { pin, reply } => {
                if reply.is_closed() {
                    return; // nobody is waiting: don't spend a PIN try for nobody
                }
                let result = if self.backend.is_some() {
                    tracing::info!(device = %self.name, "login: the device is already open; PIN not used");
                    Ok(())
                } else {
                    tracing::info!(device = %self.name, "login: opening the device with the given PIN");
                    self.open(Some(pin)).map_err(CallError::Device)
                };
                let _ = reply.send(result);
            }
            Job::Gone { opens, why, reply } => {
                if self.opens == opens && self.backend.is_some() {
                    self.gone(why);
                }
                let _ = reply.send(Ok(()));
            }
        }
    }

    /// One open attempt; publishes the new state and schedules the next attempt if any.
    fn open(&mut self, pin: Option<Pin>) -> Result<(), DeviceError> {
        let with_pin = pin.is_some();
        self.attempts += 1;
        let opener = &mut self.opener;
        let opened = catch_unwind(AssertUnwindSafe(|| opener(pin))).unwrap_or_else(|_panic| {
            Err(DeviceError::Backend {
                op: "open",
                detail: "the device opener panicked".into(),
            })
        });
        match opened {
            Ok(mut backend) => {
                let detail = describe(backend.info());
                let shared = backend.shared_signer();
                self.backend = Some(backend);
                self.opens += 1;
                self.shared.set(shared.map(|signer| (self.opens, signer)));
                self.backoff = self.backoff_min;
                self.next_open = None;
                self.down_reason.clear();
                // Logged once the state is published, so that whoever reads the line (an
                // operator, a test) finds the device available in the status too.
                let line = detail.clone();
                self.publish(true, detail);
                tracing::info!(device = %self.name, kind = %self.kind, detail = %line, "device open");
                Ok(())
            }
            Err(e) => {
                let pin_error =
                    matches!(e, DeviceError::PinIncorrect { .. } | DeviceError::PinLocked);
                if pin_error && !with_pin {
                    self.pin_failed = true;
                }
                let mut reason = reason_of(&e);
                let retry_in = if pin_error || self.pin_failed {
                    reason = format!("{reason}; {PIN_HINT}");
                    self.next_open = None;
                    None
                } else {
                    let delay = self.backoff;
                    // A delay too long to represent is "never".
                    self.next_open = Instant::now().checked_add(delay);
                    self.backoff = self.backoff.saturating_mul(2).min(self.backoff_max);
                    Some(delay)
                };
                self.set_down(reason, retry_in);
                Err(e)
            }
        }
    }

    /// The device vanished under a call: drop it and reopen right away, then with backoff.
    fn gone(&mut self, reason: String) {
        self.shared.set(None); // the pool's sessions close once no signer holds it
        self.backend = None; // closes the session / context
        self.backoff = self.backoff_min;
        if self.pin_failed {
            self.next_open = None;
            self.set_down(format!("{reason}; {PIN_HINT}"), None);
        } else {
            self.next_open = Some(Instant::now());
            self.set_down(reason, Some(Duration::ZERO));
        }
    }

    fn set_down(&mut self, reason: String, retry_in: Option<Duration>) {
        let changed = {
            let now = &self.state.borrow().state;
            now.available || now.detail != reason
        };
        if changed {
            match retry_in {
                Some(delay) => tracing::warn!(
                    device = %self.name, kind = %self.kind, %reason, retry_in = ?delay,
                    "device unavailable"
                ),
                None => tracing::warn!(
                    device = %self.name, kind = %self.kind, %reason,
                    "device unavailable; waiting for a PIN"
                ),
            }
        } else {
            tracing::debug!(device = %self.name, %reason, retry_in = ?retry_in, "device still unavailable");
        }
        self.down_reason.clone_from(&reason);
        self.publish(false, reason);
    }

    fn publish(&self, available: bool, detail: String) {
        self.state.send_replace(Snapshot {
            state: DeviceState {
                available,
                detail,
                algorithms: match &self.backend {
                    Some(backend) if available => backend.info().algorithms.clone(),
                    _ => Vec::new(),
                },
            },
            attempted: true,
            retrying: self.next_open.is_some(),
            attempts: self.attempts,
            opens: self.opens,
        });
    }
}

/// After a failed operation: was it the device going away? Devices don't always say so: a
/// SoftHSM token whose directory vanished answers `CKR_OBJECT_HANDLE_INVALID` for the keys it
/// had (read as "not found") and `CKR_GENERAL_ERROR` for the rest, while the session looks
/// healthy. Only the errors that could hide a vanished device are probed, with one `ping`; a
/// failed probe turns the error into [`DeviceError::DeviceGone`], so the caller hears that the
/// device is unavailable (not that its key is missing) and the actor reopens it.
fn vanished_or(e: DeviceError, ping: impl FnOnce() -> hsm_shim::Result<()>) -> DeviceError {
    if !matches!(
        e,
        DeviceError::NotFound(_) | DeviceError::InvalidBlob(_) | DeviceError::Backend { .. }
    ) {
        return e;
    }
    match ping() {
        Ok(()) => e,
        // Locked is what the admin must hear, and reopening would not unlock it.
        Err(DeviceError::PinLocked) => DeviceError::PinLocked,
        Err(probe) => DeviceError::DeviceGone(format!(
            "the device stopped answering ({}); the operation failed with: {e}",
            reason_of(&probe)
        )),
    }
}

/// Why an open failed, for status and `Unavailable`; a vanished device's own words say it all.
fn reason_of(e: &DeviceError) -> String {
    match e {
        DeviceError::DeviceGone(why) => why.clone(),
        other => other.to_string(),
    }
}

fn describe(info: &DeviceInfo) -> String {
    format!(
        "{} {}, serial {}, {}",
        info.manufacturer, info.model, info.serial, info.label
    )
}

/// A configured device, checked: what its opener needs.
#[derive(Clone, Debug)]
pub enum DeviceSpec {
    /// A TPM 2.0.
    Tpm2(TpmConfig),
    /// A PKCS#11 token.
    Pkcs11(Box<Pkcs11Spec>),
}

/// A PKCS#11 token as configured: everything of a [`Pkcs11Config`] but the PIN, which is read
/// from `pin_file` at each open (or given once to [`DeviceHandle::login`]), never kept.
#[derive(Clone, Debug)]
pub struct Pkcs11Spec {
    /// The module (shared library).
    pub module: PathBuf,
    /// A URI that names the token.
    pub token: Pkcs11Uri,
    /// File holding the user PIN (a systemd credential). Never the PIN itself.
    pub pin_file: Option<PathBuf>,
    /// `CKA_LABEL` of the sealing key.
    pub seal_key_label: String,
}

impl DeviceSpec {
    /// Which kind of device it is.
    pub fn kind(&self) -> DeviceKind {
        match self {
            Self::Tpm2(_) => DeviceKind::Tpm2,
            Self::Pkcs11(_) => DeviceKind::Pkcs11,
        }
    }
}

/// The real opener for a configured device.
///
/// TPM: [`TpmDevice::open`] (a TPM has no login; a PIN passed in is ignored, PINs of TPM
/// keyslots are given to unseal). PKCS#11: [`Pkcs11Device::open`] on the configured token, with
/// the PIN given to [`DeviceHandle::login`] or else read from `pin_file` at every attempt (never
/// cached). A PKCS#11 device with neither is a configuration error, not a session without login
/// that would fail on every operation.
pub fn opener(name: &str, spec: &DeviceSpec) -> Opener {
    match spec {
        DeviceSpec::Tpm2(config) => {
            let config = config.clone();
            Box::new(move |_pin| {
                let device: Box<dyn Backend> = Box::new(TpmDevice::open(config.clone())?);
                Ok(device)
            })
        }
        DeviceSpec::Pkcs11(spec) => {
            let name = name.to_owned();
            let spec = spec.clone();
            Box::new(move |pin_override| {
                let pin = match (pin_override, &spec.pin_file) {
                    (Some(pin), _) => pin,
                    (None, Some(path)) => Pin::from_file(path)?,
                    (None, None) => {
                        return Err(DeviceError::Config(format!(
                            "no PIN for device {name}: set devices.{name}.pin_file or give \
                             the PIN with `keyward unseal --pin`"
                        )))
                    }
                };
                let device: Box<dyn Backend> = Box::new(Pkcs11Device::open(Pkcs11Config {
                    module: spec.module.clone(),
                    token: spec.token.clone(),
                    pin: Some(pin),
                    seal_key_label: spec.seal_key_label.clone(),
                    seal_mode: SealMode::Auto,
                })?);
                Ok(device)
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hsm_shim::{
        DeviceKind, KeyAlgorithm, KeyHandle, KeyProtection, KeySpec, PublicKeyDer, SealPolicy,
        SealedBlob, SecretBytes, SignInput,
    };
    use std::collections::VecDeque;
    use std::future::Future;
    use std::sync::Mutex;
    use std::task::{Context, Poll, Waker};

    /// A scripted stand-in for a token: enough to drive the actor's logic.
    struct Fake {
        info: DeviceInfo,
        /// Set: the device stopped answering (its `ping` fails).
        dead: Arc<std::sync::atomic::AtomicBool>,
        /// Hands out a shared signer, as a token does.
        shared: bool,
    }

    /// A fake's shared signer: signs with the name of the thread it ran on, fails once the
    /// device is dead.
    struct FakeShared {
        dead: Arc<std::sync::atomic::AtomicBool>,
        serial: String,
    }

    impl SharedSigner for FakeShared {
        fn sign(&self, _: &KeyHandle, _: SignInput<'_>) -> hsm_shim::Result<Vec<u8>> {
            if self.dead.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(DeviceError::Backend {
                    op: "C_Sign",
                    detail: "CKR_GENERAL_ERROR".into(),
                });
            }
            let thread = std::thread::current().name().unwrap_or("").to_owned();
            Ok(format!("{thread} {}", self.serial).into_bytes())
        }
        fn ping(&self) -> hsm_shim::Result<()> {
            if self.dead.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(DeviceError::Backend {
                    op: "C_GetTokenInfo",
                    detail: "no answer".into(),
                });
            }
            Ok(())
        }
    }

    impl hsm_shim::Device for Fake {
        fn info(&self) -> &DeviceInfo {
            &self.info
        }
        fn ping(&mut self) -> hsm_shim::Result<()> {
            if self.dead.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(DeviceError::Backend {
                    op: "ping",
                    detail: "no answer".into(),
                });
            }
            Ok(())
        }
    }

    impl hsm_shim::Sealer for Fake {
        fn seal(
            &mut self,
            _: &SecretBytes,
            _: &[u8],
            _: &SealPolicy,
        ) -> hsm_shim::Result<SealedBlob> {
            Err(DeviceError::Unsupported("fake".into()))
        }
        fn unseal(
            &mut self,
            _: &SealedBlob,
            _: &[u8],
            _: Option<&Pin>,
        ) -> hsm_shim::Result<SecretBytes> {
            Err(DeviceError::Unsupported("fake".into()))
        }
    }

    impl hsm_shim::Signer for Fake {
        fn generate(&mut self, _: &KeySpec) -> hsm_shim::Result<KeyHandle> {
            Err(DeviceError::Unsupported("fake".into()))
        }
        fn public_key(&mut self, _: &KeyHandle) -> hsm_shim::Result<PublicKeyDer> {
            Err(DeviceError::NotFound("fake key".into()))
        }
        fn sign(&mut self, _: &KeyHandle, input: SignInput<'_>) -> hsm_shim::Result<Vec<u8>> {
            match input {
                SignInput::Message(m) => Ok(m.iter().rev().copied().collect()),
                SignInput::Sha256Digest(_) | SignInput::Sha512Digest(_) => {
                    Err(DeviceError::Unsupported("digest".into()))
                }
            }
        }
        fn protection(&mut self, _: &KeyHandle) -> hsm_shim::Result<KeyProtection> {
            Err(DeviceError::NotFound("fake key".into()))
        }
        fn destroy(&mut self, _: &KeyHandle) -> hsm_shim::Result<()> {
            Ok(())
        }
        fn destroy_generated(&mut self, _: &KeySpec) -> hsm_shim::Result<usize> {
            Ok(0)
        }
        fn shared_signer(&mut self) -> Option<Arc<dyn SharedSigner>> {
            self.shared.then(|| {
                Arc::new(FakeShared {
                    dead: Arc::clone(&self.dead),
                    serial: self.info.serial.clone(),
                }) as Arc<dyn SharedSigner>
            })
        }
    }

    /// What the opener will return, in order (then `Ok` forever), and what it was called with.
    #[derive(Default)]
    struct ScriptState {
        results: VecDeque<hsm_shim::Result<()>>,
        /// The PINs the opener was called with (test only: the real code never exposes one).
        pins: Vec<Option<String>>,
        /// Shared with every device opened: set to make them stop answering.
        dead: Arc<std::sync::atomic::AtomicBool>,
        /// The devices opened hand out shared signers.
        shared: bool,
    }

    #[derive(Clone, Default)]
    struct Script(Arc<Mutex<ScriptState>>);

    impl Script {
        fn new(results: impl IntoIterator<Item = hsm_shim::Result<()>>) -> Self {
            Self(Arc::new(Mutex::new(ScriptState {
                results: results.into_iter().collect(),
                pins: Vec::new(),
                dead: Arc::default(),
                shared: false,
            })))
        }
        fn with_shared_signers(self) -> Self {
            self.0.lock().unwrap().shared = true;
            self
        }
        fn push(&self, r: hsm_shim::Result<()>) {
            self.0.lock().unwrap().results.push_back(r);
        }
        fn calls(&self) -> Vec<Option<String>> {
            self.0.lock().unwrap().pins.clone()
        }
        fn opener(&self) -> Opener {
            let script = self.clone();
            Box::new(move |pin| {
                let mut s = script.0.lock().unwrap();
                s.pins.push(pin.map(|p| p.expose().to_owned()));
                let n = s.pins.len();
                s.results.pop_front().unwrap_or(Ok(()))?;
                Ok(Box::new(Fake {
                    info: DeviceInfo {
                        kind: DeviceKind::Pkcs11,
                        manufacturer: "fake".into(),
                        model: "scripted".into(),
                        serial: format!("open-{n}"),
                        label: "test".into(),
                        algorithms: vec![KeyAlgorithm::EcdsaP256],
                    },
                    dead: Arc::clone(&s.dead),
                    shared: s.shared,
                }))
            })
        }
    }

    fn options(queue: usize, timeout: Duration, backoff_min: Duration) -> ActorOptions {
        ActorOptions {
            queue,
            timeout,
            backoff_min,
            backoff_max: backoff_min * 4,
        }
    }

    const LONG: Duration = Duration::from_secs(3600);
    const DEADLINE: Duration = Duration::from_secs(10);

    /// Wait (with a deadline) until the actor publishes a state satisfying `pred`.
    async fn wait_until(
        h: &DeviceHandle,
        what: &str,
        pred: impl Fn(&Snapshot) -> bool,
    ) -> Snapshot {
        let mut rx = h.inner.state.clone();
        let s = tokio::time::timeout(DEADLINE, rx.wait_for(|s| pred(s)))
            .await
            .unwrap_or_else(|_| {
                panic!("timed out waiting for {what}: {:?}", h.inner.state.borrow())
            })
            .expect("actor alive");
        s.clone()
    }

    fn snapshot(h: &DeviceHandle) -> Snapshot {
        h.inner.state.borrow().clone()
    }

    fn key() -> KeyHandle {
        KeyHandle::Pkcs11 {
            algorithm: KeyAlgorithm::Ed25519,
            id: vec![1],
        }
    }

    /// Hold the device thread inside a call until the returned sender sends (or is dropped);
    /// returns once the call is running, with the task that made it.
    async fn hold(
        h: &DeviceHandle,
    ) -> (
        std::sync::mpsc::Sender<()>,
        tokio::task::JoinHandle<Result<(), CallError>>,
    ) {
        let (gate_tx, gate_rx) = std::sync::mpsc::channel::<()>();
        let (started_tx, mut started_rx) = tokio::sync::mpsc::unbounded_channel();
        let running = tokio::spawn({
            let h = h.clone();
            async move {
                h.call(move |_| {
                    let _ = started_tx.send(());
                    let _ = gate_rx.recv();
                    Ok(())
                })
                .await
            }
        });
        started_rx.recv().await.unwrap();
        (gate_tx, running)
    }

    /// Poll a future once (so a `call` enqueues its job) without waiting for it.
    fn poll_once<F: Future + Unpin>(f: &mut F) -> Poll<F::Output> {
        std::pin::Pin::new(f).poll(&mut Context::from_waker(Waker::noop()))
    }

    #[tokio::test]
    async fn a_call_runs_on_the_device_thread() {
        let script = Script::default();
        let h = DeviceHandle::spawn(
            "hsm".into(),
            DeviceKind::Pkcs11,
            script.opener(),
            options(4, LONG, LONG),
        );
        h.ready().await;
        assert_eq!(h.name(), "hsm");
        assert_eq!(h.kind(), DeviceKind::Pkcs11);
        let s = h.status();
        assert!(s.available, "{s:?}");
        assert_eq!(s.detail, "fake scripted, serial open-1, test");

        let sig = h
            .call(|b| b.sign(&key(), SignInput::Message(b"abc")))
            .await
            .unwrap();
        assert_eq!(sig, b"cba");
        let thread = h
            .call(|_| Ok(std::thread::current().name().map(str::to_owned)))
            .await
            .unwrap();
        assert_eq!(thread.as_deref(), Some("kw-dev-hsm"));

        // A device error is the caller's; the device stays open.
        let e = h.call(|b| b.public_key(&key())).await.unwrap_err();
        assert!(
            matches!(e, CallError::Device(DeviceError::NotFound(_))),
            "{e:?}"
        );
        assert!(h.status().available);
        assert_eq!(script.calls(), [None]);
        assert!(format!("{h:?}").contains("hsm"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn signing_runs_beside_a_busy_device_thread_and_a_lost_device_reopens_with_a_new_signer()
    {
        let script = Script::default().with_shared_signers();
        let h = DeviceHandle::spawn(
            "hsm".into(),
            DeviceKind::Pkcs11,
            script.opener(),
            options(4, LONG, Duration::from_millis(10)),
        );
        h.ready().await;
        let (gate_tx, running) = hold(&h).await;
        // A signature does not wait for it: it runs on this task's thread, not the device's.
        let sig = h
            .sign(Arc::new(key()), SignData::Message(b"abc".to_vec()))
            .await
            .unwrap();
        let sig = String::from_utf8(sig).unwrap();
        assert!(!sig.starts_with("kw-dev-"), "{sig}");
        assert!(sig.ends_with(" open-1"), "{sig}");
        gate_tx.send(()).unwrap();
        running.await.unwrap().unwrap();

        // The device stops answering: the signer's error becomes DeviceGone, and by the time
        // the caller hears it the device is down in the status.
        script
            .0
            .lock()
            .unwrap()
            .dead
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let e = h
            .sign(Arc::new(key()), SignData::Message(b"abc".to_vec()))
            .await
            .unwrap_err();
        assert!(
            matches!(&e, CallError::Device(DeviceError::DeviceGone(why)) if why.contains("CKR_GENERAL_ERROR")),
            "{e:?}"
        );
        assert!(!h.status().available || h.opens() > 1, "{:?}", h.status());
        // It comes back with a new shared signer, made by the new opening.
        script
            .0
            .lock()
            .unwrap()
            .dead
            .store(false, std::sync::atomic::Ordering::SeqCst);
        wait_until(&h, "the reopen", |s| s.opens >= 2 && s.state.available).await;
        let sig = h
            .sign(Arc::new(key()), SignData::Message(b"abc".to_vec()))
            .await
            .unwrap();
        let sig = String::from_utf8(sig).unwrap();
        assert!(sig.ends_with(&format!(" open-{}", h.opens())), "{sig}");
    }

    #[tokio::test]
    async fn a_device_without_a_shared_signer_signs_on_its_thread() {
        let h = DeviceHandle::spawn(
            "tpm".into(),
            DeviceKind::Tpm2,
            Script::default().opener(),
            options(4, LONG, LONG),
        );
        h.ready().await;
        let sig = h
            .sign(Arc::new(key()), SignData::Message(b"abc".to_vec()))
            .await
            .unwrap();
        assert_eq!(sig, b"cba");
    }

    #[tokio::test]
    async fn a_full_queue_is_busy() {
        let h = DeviceHandle::spawn(
            "tpm".into(),
            DeviceKind::Tpm2,
            Script::default().opener(),
            options(1, LONG, LONG),
        );
        h.ready().await;
        // The actor is inside the first call; the queue is empty.
        let (gate_tx, running) = hold(&h).await;
        let mut queued = Box::pin(h.call(|_| Ok(2)));
        assert!(poll_once(&mut queued).is_pending()); // fills the one queue slot
        let e = h.call(|_| Ok(3)).await.unwrap_err();
        assert!(
            matches!(&e, CallError::Busy { device } if device == "tpm"),
            "{e:?}"
        );
        assert_eq!(e.to_string(), "device tpm is busy: its queue is full");

        gate_tx.send(()).unwrap();
        running.await.unwrap().unwrap();
        assert_eq!(queued.await.unwrap(), 2);
        assert_eq!(h.call(|_| Ok(4)).await.unwrap(), 4);
    }

    #[tokio::test]
    async fn a_slow_device_times_out_and_stale_calls_are_skipped() {
        let h = DeviceHandle::spawn(
            "tpm".into(),
            DeviceKind::Tpm2,
            Script::default().opener(),
            options(4, Duration::from_millis(50), LONG),
        );
        h.ready().await;
        let (gate_tx, gate_rx) = std::sync::mpsc::channel::<()>();
        let e = h
            .call(move |_| {
                let _ = gate_rx.recv();
                Ok(())
            })
            .await
            .unwrap_err();
        assert!(
            matches!(&e, CallError::Unavailable { reason, .. } if reason == "timed out after 50ms waiting for the device"),
            "{e}"
        );
        // Queued behind the stuck call, this one times out too, and must then never run.
        let ran = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = ran.clone();
        let e = h
            .call(move |_| {
                flag.store(true, std::sync::atomic::Ordering::SeqCst);
                Ok(())
            })
            .await
            .unwrap_err();
        assert!(e.to_string().contains("timed out"), "{e}");

        gate_tx.send(()).unwrap();
        // FIFO: once this answers, the stale call has been dequeued (and skipped).
        let h2 = h.clone();
        let ok = tokio::time::timeout(DEADLINE, async move {
            loop {
                match h2.call(|_| Ok(7)).await {
                    Ok(v) => break v,
                    Err(CallError::Unavailable { .. }) => continue, // still draining
                    Err(e) => panic!("{e}"),
                }
            }
        })
        .await
        .unwrap();
        assert_eq!(ok, 7);
        assert!(!ran.load(std::sync::atomic::Ordering::SeqCst));
        assert!(h.status().available);
    }

    #[tokio::test]
    async fn a_vanished_device_is_reopened_with_backoff() {
        let script = Script::new([
            Ok(()),
            Err(DeviceError::DeviceGone("replugging".into())),
            Err(DeviceError::Config("no token labelled keyward".into())),
        ]);
        let h = DeviceHandle::spawn(
            "hsm".into(),
            DeviceKind::Pkcs11,
            script.opener(),
            options(4, LONG, Duration::from_millis(5)),
        );
        h.ready().await;
        let e = h
            .call(|_| -> hsm_shim::Result<()> { Err(DeviceError::DeviceGone("unplugged".into())) })
            .await
            .unwrap_err();
        assert!(
            matches!(e, CallError::Device(DeviceError::DeviceGone(_))),
            "{e:?}"
        );

        let s = wait_until(&h, "the fourth open", |s| {
            s.attempts >= 4 && s.state.available
        })
        .await;
        assert!(!s.retrying);
        assert_eq!(script.calls(), [None, None, None, None]);
        let serial = h.call(|b| Ok(b.info().serial.clone())).await.unwrap();
        assert_eq!(serial, "open-4");
        assert!(h.status().available);
    }

    #[tokio::test]
    async fn while_down_calls_fail_fast_with_the_reason() {
        let why = "cannot reach the TPM at swtpm:host=127.0.0.1,port=1: connection refused";
        let script = Script::new([Err(DeviceError::DeviceGone(why.into()))]);
        // Hour-long waits: an answer at all proves it came without waiting for the device.
        let h = DeviceHandle::spawn(
            "tpm".into(),
            DeviceKind::Tpm2,
            script.opener(),
            options(4, LONG, LONG),
        );
        h.ready().await;
        let s = snapshot(&h);
        assert!(!s.state.available);
        assert!(s.retrying, "a vanished device is retried");
        assert_eq!(s.state.detail, why);
        for _ in 0..3 {
            let e = h.call(|_| Ok(())).await.unwrap_err();
            match e {
                CallError::Unavailable { device, reason } => {
                    assert_eq!(device, "tpm");
                    assert!(reason.contains("connection refused"), "{reason}");
                }
                other => panic!("{other:?}"),
            }
        }
        // login opens right now, not at the next backoff step.
        h.login(Pin::new("0000").unwrap()).await.unwrap();
        assert!(h.status().available);
        assert!(!snapshot(&h).retrying);
        assert_eq!(script.calls(), [None, Some("0000".into())]);
    }

    #[tokio::test]
    async fn a_failed_pin_is_never_retried() {
        let script = Script::new([Err(DeviceError::PinIncorrect {
            retries_left: Some(2),
        })]);
        let h = DeviceHandle::spawn(
            "hsm".into(),
            DeviceKind::Pkcs11,
            script.opener(),
            options(4, LONG, Duration::from_millis(1)),
        );
        h.ready().await;
        let s = snapshot(&h);
        assert!(!s.state.available && !s.retrying, "{s:?}");
        assert!(
            s.state.detail.contains("PIN incorrect (2 tries left"),
            "{s:?}"
        );
        assert!(s.state.detail.contains("keyward unseal --pin"), "{s:?}");
        let e = h.call(|_| Ok(())).await.unwrap_err();
        assert!(e.to_string().contains("PIN incorrect"), "{e}");
        // With a 1 ms backoff, a retry would come at once; none must.
        let mut rx = h.inner.state.clone();
        let retried =
            tokio::time::timeout(Duration::from_millis(200), rx.wait_for(|s| s.attempts > 1)).await;
        assert!(retried.is_err(), "the actor retried a failed PIN");
        assert_eq!(script.calls(), [None]);

        // A wrong PIN through login: tried once, reported, not retried.
        script.push(Err(DeviceError::PinIncorrect {
            retries_left: Some(1),
        }));
        let e = h.login(Pin::new("1111-marker").unwrap()).await.unwrap_err();
        assert!(
            matches!(
                e,
                CallError::Device(DeviceError::PinIncorrect {
                    retries_left: Some(1)
                })
            ),
            "{e:?}"
        );
        assert_eq!(script.calls(), [None, Some("1111-marker".into())]);
        assert!(!snapshot(&h).retrying);

        // The right PIN opens it.
        h.login(Pin::new("2222-marker").unwrap()).await.unwrap();
        assert!(h.status().available);
        assert_eq!(script.calls().len(), 3);
        assert_eq!(script.calls()[2].as_deref(), Some("2222-marker"));

        // Already open: the PIN is not used.
        h.login(Pin::new("3333-marker").unwrap()).await.unwrap();
        assert_eq!(script.calls().len(), 3);

        // Gone after a PIN failure: no automatic reopen (that would retry the PIN file).
        let _ = h
            .call(|_| -> hsm_shim::Result<()> { Err(DeviceError::DeviceGone("unplugged".into())) })
            .await;
        let s = snapshot(&h);
        assert!(!s.state.available && !s.retrying, "{s:?}");
        assert!(
            s.state.detail.contains("unplugged") && s.state.detail.contains("--pin"),
            "{s:?}"
        );
        assert_eq!(script.calls().len(), 3);
        h.login(Pin::new("2222-marker").unwrap()).await.unwrap();
        assert!(h.status().available);

        let shown = format!("{h:?} {:?} {e}", h.status());
        assert!(!shown.contains("marker"), "{shown}");
    }

    #[tokio::test]
    async fn a_failure_on_a_device_that_stopped_answering_is_gone_and_reopened() {
        let script = Script::default();
        let dead = Arc::clone(&script.0.lock().unwrap().dead);
        let h = DeviceHandle::spawn(
            "hsm".into(),
            DeviceKind::Pkcs11,
            script.opener(),
            options(4, LONG, Duration::from_millis(5)),
        );
        h.ready().await;
        assert_eq!(h.opens(), 1);
        // Answering: "not found" is the key's, and the device stays open.
        let e = h.call(|b| b.public_key(&key())).await.unwrap_err();
        assert!(
            matches!(e, CallError::Device(DeviceError::NotFound(_))),
            "{e:?}"
        );
        // Not answering: the same failure is the device's, which is reopened.
        dead.store(true, std::sync::atomic::Ordering::SeqCst);
        let e = h.call(|b| b.public_key(&key())).await.unwrap_err();
        match &e {
            CallError::Device(DeviceError::DeviceGone(why)) => {
                assert!(
                    why.contains("stopped answering") && why.contains("fake key"),
                    "{why}"
                )
            }
            other => panic!("{other:?}"),
        }
        // Errors that can't hide a vanished device are not probed.
        let e = h
            .call(|_| -> hsm_shim::Result<()> { Err(DeviceError::PolicyMismatch) })
            .await;
        assert!(
            matches!(
                e,
                Err(CallError::Device(DeviceError::PolicyMismatch))
                    | Err(CallError::Unavailable { .. })
            ),
            "{e:?}"
        );
        dead.store(false, std::sync::atomic::Ordering::SeqCst);
        wait_until(&h, "the reopen", |s| s.opens >= 2 && s.state.available).await;
        assert_eq!(h.opens(), 2);
        assert_eq!(h.call(|_| Ok(5)).await.unwrap(), 5);
    }

    #[tokio::test]
    async fn a_panicking_operation_reopens_the_device() {
        let script = Script::default();
        let h = DeviceHandle::spawn(
            "hsm".into(),
            DeviceKind::Pkcs11,
            script.opener(),
            options(4, LONG, Duration::from_millis(5)),
        );
        h.ready().await;
        let e = h
            .call(|_| -> hsm_shim::Result<()> { panic!("bug in an operation") })
            .await
            .unwrap_err();
        assert!(matches!(e, CallError::Unavailable { .. }), "{e:?}");
        wait_until(&h, "the reopen", |s| s.attempts >= 2 && s.state.available).await;
        assert_eq!(h.call(|_| Ok(5)).await.unwrap(), 5);
    }

    #[tokio::test]
    async fn pkcs11_without_any_pin_is_a_config_error() {
        let spec = |pin_file: Option<PathBuf>| {
            DeviceSpec::Pkcs11(Box::new(Pkcs11Spec {
                module: "/nonexistent/libnone.so".into(),
                token: "pkcs11:token=kw".parse().unwrap(),
                pin_file,
                seal_key_label: "keyward-seal".into(),
            }))
        };
        let mut open = opener("hsm", &spec(None));
        let e = open(None).err().unwrap();
        assert!(e.to_string().contains("devices.hsm.pin_file"), "{e}");

        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("pin");
        let mut open = opener("hsm", &spec(Some(missing.clone())));
        let e = open(None).err().unwrap();
        assert!(e.to_string().contains("cannot read PIN file"), "{e}");
        // The file is read at each attempt: once it exists, the opener gets past the PIN.
        std::fs::write(&missing, "1234\n").unwrap();
        // A PIN file must be private (0600): `Pin::from_file` refuses others.
        std::fs::set_permissions(
            &missing,
            <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o600),
        )
        .unwrap();
        let e = open(None).err().unwrap();
        assert!(!e.to_string().contains("PIN"), "{e}");
    }
}
