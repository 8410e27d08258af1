//! Trying the unattended unseal again when a device it needed comes back.
//!
//! At start the vault tries its device keyslots once ([`Vault::unseal_unattended`]). A slot
//! whose device was merely unavailable then (a TPM not up yet, a token unplugged, a device that
//! died in the middle of the unseal) is worth another try once the device's actor has reopened
//! it, without restarting the daemon. This module remembers which devices that was and runs the
//! unattended unseal again the first time the vault is asked for anything after one of them is
//! back. It never retries a PIN (the unattended unseal uses none), never retries a slot that
//! failed for another reason (changed PCRs stay changed), and never undoes an admin's `Seal`.

use std::sync::Mutex;

use super::Vault;

/// What to retry, if anything.
#[derive(Debug, Default)]
pub(super) struct Retry {
    /// Devices whose PIN-less keyslots failed in the last unattended unseal only because the
    /// device was unavailable, each with its open count from before that attempt; empty when
    /// nothing is to be retried. A device is back once it has been opened again since: merely
    /// looking available is not enough (a hung device stays "open" and would be retried, and
    /// waited for, on every request).
    waiting_for: Mutex<Vec<(String, u64)>>,
    /// One retry at a time; callers that arrive meanwhile wait for its outcome.
    running: tokio::sync::Mutex<()>,
}

impl Retry {
    fn waiting(&self) -> std::sync::MutexGuard<'_, Vec<(String, u64)>> {
        self.waiting_for
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Retry when one of `devices` (name, open count before the failed attempt) is back.
    pub(super) fn arm(&self, devices: Vec<(String, u64)>) {
        *self.waiting() = devices;
    }

    /// Nothing to retry: the vault is open, or an admin sealed it.
    pub(super) fn disarm(&self) {
        self.waiting().clear();
    }
}

impl Vault {
    /// Run the unattended unseal again if a device it waited for is available now. Cheap when
    /// there is nothing to retry (one uncontended lock); called before serving a request.
    pub(super) async fn retry_unattended_if_due(&self) {
        if self.returned_device().is_none() {
            return;
        }
        let _one = self.retry.running.lock().await;
        // Another caller may have retried while this one waited.
        let Some(device) = self.returned_device() else {
            return;
        };
        self.retry.disarm();
        tracing::info!(device = %device, "a device the unattended unseal needed is back: trying again");
        self.unseal_unattended().await;
    }

    fn returned_device(&self) -> Option<String> {
        self.retry
            .waiting()
            .iter()
            .find(|(name, opens)| {
                self.devices
                    .get(name)
                    .is_some_and(|d| d.opens() > *opens && d.status().available)
            })
            .map(|(name, _)| name.clone())
    }
}
