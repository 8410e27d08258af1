//! The token's shared signer: a pool of sessions on which callers sign in parallel, each on its
//! own thread, beside the device's own session.
//!
//! Why: a token serves its sessions independently, so signing on one session after another
//! (the device thread) caps a two-core machine at one core's rate and adds a thread hand-off to
//! every signature. The pool's sessions are read-only and never log in: PKCS#11 keeps the login
//! per application and token, so they are in the user state of the device's own session, and
//! they lose it when that session goes. A session is used by one thread at a time (taken out
//! of the pool for the call), as cryptoki's `Session` (`Send`, not `Sync`) requires.
//!
//! Must not: log in, keep a PIN, or outlive the device that made it in use (the daemon drops
//! it with the device; a call on a pool whose device is gone fails and the caller reopens).

use std::fmt;
use std::sync::{Arc, Mutex};

use cryptoki::context::Pkcs11;
use cryptoki::session::Session;
use cryptoki::slot::Slot;

use super::sign::sign_on;
use super::{map_error, Handles};
use crate::{DeviceError, KeyHandle, Result, SharedSigner, SignInput};

/// A session of the pool and the handles it found.
struct Pooled {
    session: Session,
    handles: Handles,
}

/// Sessions kept open between calls; more may be open while many callers sign at once.
pub(super) struct SessionPool {
    ctx: Pkcs11,
    slot: Slot,
    idle: Mutex<Vec<Pooled>>,
    /// How many idle sessions to keep.
    keep: usize,
    /// Counts the pool among the module's users, like the device (see `restart_module`).
    _user: Arc<()>,
}

impl fmt::Debug for SessionPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionPool")
            .field("slot", &self.slot)
            .field("keep", &self.keep)
            .finish_non_exhaustive()
    }
}

impl SessionPool {
    pub(super) fn new(ctx: Pkcs11, slot: Slot, keep: usize, user: Arc<()>) -> Self {
        Self {
            ctx,
            slot,
            idle: Mutex::new(Vec::new()),
            keep,
            _user: user,
        }
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, Vec<Pooled>> {
        self.idle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn take(&self) -> Result<Pooled> {
        if let Some(pooled) = self.idle().pop() {
            return Ok(pooled);
        }
        let session = self
            .ctx
            .open_ro_session(self.slot)
            .map_err(|e| map_error("C_OpenSession", e))?;
        Ok(Pooled {
            session,
            handles: Handles::default(),
        })
    }
}

impl SharedSigner for SessionPool {
    fn sign(&self, handle: &KeyHandle, input: SignInput<'_>) -> Result<Vec<u8>> {
        let mut pooled = self.take()?;
        let signed = sign_on(&pooled.session, &mut pooled.handles, handle, input);
        // A session that failed is closed rather than kept: whatever went wrong stays with it.
        if signed.is_ok() {
            let mut idle = self.idle();
            if idle.len() < self.keep {
                idle.push(pooled);
            }
        }
        signed
    }

    fn ping(&self) -> Result<()> {
        let t = self
            .ctx
            .get_token_info(self.slot)
            .map_err(|e| map_error("C_GetTokenInfo", e))?;
        if t.user_pin_locked() {
            return Err(DeviceError::PinLocked);
        }
        Ok(())
    }
}
