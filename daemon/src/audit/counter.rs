//! The TPM NV counter anchors are bound to: reading it to check an anchor, and incrementing
//! it once an anchor is on disk.
//!
//! Must not: block a runtime worker unannounced (the calls wait for the device actor: on a
//! worker, through `block_in_place`), or stop the log when the TPM is away (the check waits
//! for the next start).

use super::*;

impl AuditLog {
    /// Bind the anchors to the NV counter at `index` on the TPM `device` (once, before the
    /// first unseal, from inside the runtime).
    ///
    /// # Errors
    /// Called outside a Tokio runtime.
    pub fn set_counter(&self, device: DeviceHandle, index: u32) -> Result<(), String> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|e| e.to_string())?;
        let _ = self.counter.set(TpmCounter {
            device,
            index,
            runtime,
        });
        Ok(())
    }

    /// The TPM counter, incremented first if `increment`; `None` when none is configured.
    /// Blocks the calling thread (at most the device timeout): the hooks and the flusher are
    /// not async, and this happens once per anchor.
    pub(super) fn tpm_counter(&self, increment: bool) -> Option<Result<hsm_shim::Counter, String>> {
        let c = self.counter.get()?;
        let (device, index) = (c.device.clone(), c.index);
        let call = async move { device.call(move |d| d.counter(index, increment)).await };
        let result = match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(|| h.block_on(call))
            }
            Ok(_) => {
                return Some(Err(
                    "the TPM counter can't be reached from a current-thread runtime".into(),
                ))
            }
            Err(_) => c.runtime.block_on(call),
        };
        Some(result.map_err(|e| e.to_string()))
    }

    /// Increment the TPM counter until it reaches `value` (the counter of an anchor now on
    /// disk). Several anchors may have been written since the last increment.
    pub(super) fn counter_up_to(&self, value: u64) {
        for _ in 0..64 {
            match self.tpm_counter(true) {
                None => return,
                Some(Ok(c)) if c.value >= value => return,
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    tracing::error!("audit log: cannot increment the TPM counter: {e}");
                    return;
                }
            }
        }
        tracing::error!("audit log: the TPM counter did not reach {value}");
    }

    /// Check the TPM counter against the anchor's and set the counter the next anchor carries.
    /// `Err` is the finding.
    pub(super) fn check_counter(
        &self,
        w: &mut Writer,
        anchor: Option<&CheckedAnchor>,
    ) -> Result<(), String> {
        let anchored = anchor.and_then(|a| a.counter);
        let Some(read) = self.tpm_counter(false) else {
            return Ok(());
        };
        let tpm = match read {
            Ok(c) => c,
            Err(e) => {
                // A TPM that is away must not stop the log; the check waits for the next start.
                tracing::error!("audit log: cannot read the TPM counter ({e}): the anchor is not checked against it");
                w.counter_next = anchored.map(|c| c + 1);
                return Ok(());
            }
        };
        w.counter_next = Some(anchored.unwrap_or(0).max(tpm.value) + 1);
        match (anchor, anchored) {
            (Some(_), Some(a)) if a < tpm.value => Err(format!(
                "{} is older than the TPM counter (anchor counter {a}, TPM counter {}): the log and its anchor were rolled back",
                format::ANCHOR_FILE,
                tpm.value
            )),
            (Some(_), None) if !tpm.created => Err(format!(
                "{} carries no TPM counter, but the TPM counter exists: an older anchor was put back",
                format::ANCHOR_FILE
            )),
            (_, Some(a)) => {
                // Written, but the daemon stopped before the increment.
                self.counter_up_to(a);
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

/// A TPM NV counter on a device actor, reached from code that is not async.
pub(super) struct TpmCounter {
    pub(super) device: DeviceHandle,
    pub(super) index: u32,
    /// For calls from threads outside the runtime (the flusher).
    pub(super) runtime: tokio::runtime::Handle,
}
