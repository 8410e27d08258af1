//! Recovery shares that nobody has yet proved to hold, and the rekey that waits for them.
//!
//! Shares are shown once, in a reply; a reply can be lost (a dropped SSH session, a Ctrl-C, a
//! kill). So no change may leave the vault in a state where the only recovery shares that work
//! are ones no person has seen:
//! - a recovery keyslot made by `Init` or `Enroll` starts *unconfirmed*: it opens the vault
//!   (and opening it confirms it), but it does not count as a way in when another keyslot is
//!   removed, and it is dropped when its time runs out unless it is the vault's only keyslot;
//! - a `Rekey` of a vault with recovery slots only *prepares* the next master key: every
//!   keyslot's new material is stored beside the current one, and the current key and every
//!   old share stay in force until [`Vault::confirm_recovery`] gets enough of each new share
//!   set back. Then one transaction installs it. Unconfirmed, it lapses; another `Rekey`
//!   replaces it (the only way to see new shares again).
//!
//! While a rekey is pending, keyslots can't be enrolled or removed: its prepared material
//! covers exactly the keyslots that existed when it was made.
//!
//! Must not: keep a share, or the next master key in clear, anywhere but the call that
//! handles it; the store holds only material sealed by a device or by the new shares.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use keyward_proto::api::{self, KeyslotKind, SecretString};
use keyward_proto::recovery_share::{self, Share};
use serde::{Deserialize, Serialize};

use super::crypto::Key32;
use super::recovery::{self, RecoverySlotData};
use super::{Open, Vault};
use crate::error::{corrupt, invalid, Error, Param};
use crate::store::{self, tables::KeyslotRow, tables::PendingRekey};

/// Now, in unix seconds.
pub(super) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Unix seconds as RFC 3339 UTC (second precision), as the API shows times.
pub fn rfc3339(unix: u64) -> String {
    store::tables::rfc3339(UNIX_EPOCH + Duration::from_secs(unix))
}

fn bad(reason: impl Into<String>) -> Error {
    invalid(Param::RecoveryShares, reason)
}

/// One keyslot's material under the next master key.
#[derive(Serialize, Deserialize)]
pub(super) struct NextSlot {
    pub id: u32,
    pub blob: Vec<u8>,
}

/// What a pending rekey keeps (versioned, so the layout can change).
#[derive(Serialize, Deserialize)]
struct NextSlots {
    v: u8,
    slots: Vec<NextSlot>,
}

/// A pending rekey, decoded.
struct Prepared {
    expires: u64,
    slots: Vec<NextSlot>,
}

/// The recovery set a keyslot's material belongs to.
fn set_of(blob: &[u8]) -> Result<RecoverySlotData, Error> {
    RecoverySlotData::from_blob(blob).map_err(|_| corrupt("recovery slot"))
}

/// Open one recovery set with the shares given for it.
fn open_set(
    data: &RecoverySlotData,
    vault_id: &[u8; 16],
    given: &[Share],
    what: &str,
) -> Result<Key32, Error> {
    let k = usize::from(data.set.threshold);
    if given.len() < k {
        return Err(bad(format!(
            "{what} (set {}) needs {k} shares, {} given",
            data.set.id_text(),
            given.len()
        )));
    }
    recovery::unwrap_vmk(data, vault_id, given)
        .map_err(|e| bad(format!("the shares do not open {what}: {e}")))
}

impl Vault {
    /// Time until which new shares wait for their confirmation, from now.
    pub(super) fn confirm_deadline(&self) -> u64 {
        unix_now().saturating_add(self.confirm_within.as_secs())
    }

    /// The pending rekey, unless there is none or it lapsed.
    async fn prepared(&self) -> Result<Option<Prepared>, Error> {
        let Some(row) = self.store.read(store::tables::get_pending_rekey).await? else {
            return Ok(None);
        };
        if row.expires <= unix_now() {
            return Ok(None);
        }
        let next: NextSlots =
            serde_json::from_slice(&row.slots).map_err(|_| corrupt("pending rekey"))?;
        if next.v != 1 {
            return Err(corrupt("pending rekey"));
        }
        Ok(Some(Prepared {
            expires: row.expires,
            slots: next.slots,
        }))
    }

    /// When the pending rekey lapses, if one is pending (for `Status`).
    pub(super) async fn rekey_pending_until(&self) -> Result<Option<String>, Error> {
        Ok(self.prepared().await?.map(|p| rfc3339(p.expires)))
    }

    /// Refuse a keyslot change while a rekey is pending.
    pub(super) async fn no_rekey_pending(&self) -> Result<(), Error> {
        match self.prepared().await? {
            Some(p) => Err(Error::RekeyPending {
                until: rfc3339(p.expires),
            }),
            None => Ok(()),
        }
    }

    /// Drop what lapsed: unconfirmed recovery keyslots past their time (never the last
    /// keyslot) and a pending rekey past its time. Run before every keyslot change.
    pub(super) async fn drop_lapsed(&self) -> Result<(), Error> {
        let now = unix_now();
        let (slots, rekey) = self
            .store
            .write(move |tx| {
                let slots = store::tables::drop_expired_keyslots(tx, now)?;
                let rekey = match store::tables::get_pending_rekey(tx)? {
                    Some(p) if p.expires <= now => store::tables::delete_pending_rekey(tx)?,
                    _ => false,
                };
                Ok((slots, rekey))
            })
            .await?;
        for id in slots {
            tracing::warn!(
                keyslot = id,
                "recovery keyslot dropped: its shares were never confirmed"
            );
        }
        if rekey {
            tracing::warn!("pending rekey dropped: its new shares were never confirmed");
        }
        Ok(())
    }

    /// Keep a rekey's next master key and material until its new shares are confirmed.
    /// Returns when it lapses (unix seconds).
    pub(super) async fn prepare_rekey(&self, slots: Vec<NextSlot>) -> Result<u64, Error> {
        let expires = self.confirm_deadline();
        let encoded =
            serde_json::to_vec(&NextSlots { v: 1, slots }).map_err(|_| corrupt("pending rekey"))?;
        let pending = PendingRekey {
            expires,
            slots: encoded,
            created: store::tables::now_rfc3339(),
        };
        self.store
            .write(move |tx| store::tables::put_pending_rekey(tx, &pending))
            .await?;
        tracing::info!(
            until = %rfc3339(expires),
            "rekey prepared: it takes effect once its new recovery shares are confirmed"
        );
        Ok(expires)
    }

    /// `ConfirmRecovery`: the shares given prove that a person holds each set they belong
    /// to. Every set of a pending rekey must be among them; the rekey then takes effect in
    /// one transaction. Shares of an unconfirmed keyslot confirm it; shares of a confirmed
    /// one are checked and change nothing. Nothing changes unless every set given opens.
    ///
    /// # Errors
    /// `Sealed`; a malformed share, or shares that open nothing pending or current
    /// (`InvalidArgument`, never quoting a share); too few shares of a set.
    pub async fn confirm_recovery(
        &self,
        shares: Vec<SecretString>,
    ) -> Result<(Vec<api::Keyslot>, bool), Error> {
        let mut sets: HashMap<[u8; 4], Vec<Share>> = HashMap::new();
        for (i, share) in shares.iter().enumerate() {
            let parsed = recovery_share::parse(share.expose())
                .map_err(|e| bad(format!("share {}: {e}", i + 1)))?;
            let set = sets.entry(parsed.set_id).or_default();
            if !set.iter().any(|p| p.index == parsed.index) {
                set.push(parsed);
            }
        }
        if sets.is_empty() {
            return Err(bad("no share given"));
        }
        self.drop_lapsed().await?;
        let mut state = self.state.write().await;
        let open = state.open_mut()?;
        let rows = self.keyslot_rows().await?;
        let prepared = self.prepared().await?;
        // The pending rekey's sets: all of them, or nothing happens.
        let mut next_vmk: Option<Key32> = None;
        if let Some(p) = &prepared {
            let mut ids: Vec<u32> = p.slots.iter().map(|s| s.id).collect();
            ids.sort_unstable();
            if ids != rows.iter().map(|r| r.id).collect::<Vec<_>>() {
                return Err(Error::Internal {
                    reason: "the pending rekey does not cover the keyslots: start it over with \
                             `keyward rekey`"
                        .into(),
                });
            }
            for next in &p.slots {
                if !rows
                    .iter()
                    .any(|r| r.id == next.id && r.kind == KeyslotKind::Recovery)
                {
                    continue;
                }
                let data = set_of(&next.blob)?;
                let what = format!("the new shares of keyslot {}", next.id);
                let given = sets.remove(&data.set.set_id).unwrap_or_default();
                let vmk = open_set(&data, &open.vault_id, &given, &what)?;
                match &next_vmk {
                    Some(v) if v.expose() != vmk.expose() => {
                        return Err(corrupt("pending rekey (its sets disagree)"))
                    }
                    Some(_) => {}
                    None => next_vmk = Some(vmk),
                }
            }
        }
        // Every other set given must be one of the current recovery keyslots.
        let mut confirmed = Vec::new();
        for (set_id, given) in &sets {
            let slot = rows
                .iter()
                .filter(|r| r.kind == KeyslotKind::Recovery)
                .find_map(|r| {
                    let data = RecoverySlotData::from_blob(&r.blob).ok()?;
                    (data.set.set_id == *set_id).then_some((r, data))
                });
            let Some((row, data)) = slot else {
                return Err(bad(format!(
                    "shares of set {} belong to no recovery keyslot or pending rekey of this vault",
                    given.first().map(Share::set_id_text).unwrap_or_default()
                )));
            };
            let what = format!("keyslot {}", row.id);
            let vmk = open_set(&data, &open.vault_id, given, &what)?;
            if vmk.expose() != open.vmk.expose() {
                return Err(bad(format!("the shares do not open {what}")));
            }
            if row.unconfirmed_until.is_some() {
                confirmed.push(row.id);
            }
        }
        let rekeyed = match (next_vmk, prepared) {
            (Some(vmk), Some(p)) => {
                // The rekey's recovery slots are confirmed by this very call.
                let rest: Vec<u32> = rows
                    .iter()
                    .filter(|r| r.kind == KeyslotKind::Recovery && !confirmed.contains(&r.id))
                    .map(|r| r.id)
                    .collect();
                confirmed.extend(rest);
                let blobs = p.slots.into_iter().map(|s| (s.id, s.blob)).collect();
                self.commit_rekey(open, vmk, blobs, confirmed.clone())
                    .await?;
                true
            }
            _ => {
                let ids = confirmed.clone();
                self.store
                    .write(move |tx| {
                        for id in &ids {
                            store::tables::confirm_keyslot(tx, *id)?;
                        }
                        Ok(())
                    })
                    .await?;
                false
            }
        };
        let rows = self.keyslot_rows().await?;
        let keyslots = rows
            .iter()
            .filter(|r| confirmed.contains(&r.id))
            .map(super::slots::to_api)
            .collect();
        for id in &confirmed {
            tracing::info!(keyslot = id, "recovery shares confirmed");
        }
        Ok((keyslots, rekeyed))
    }

    /// Install `vmk` as the master key: the keyring sealed under it and every keyslot's new
    /// material in one transaction (with `confirm`ed recovery slots and the pending rekey
    /// cleared), the audit log handed to the new key on either side of it. On failure nothing
    /// changed, in memory or on disk.
    pub(super) async fn commit_rekey(
        &self,
        open: &mut Open,
        vmk: Key32,
        blobs: Vec<(u32, Vec<u8>)>,
        confirm: Vec<u32>,
    ) -> Result<(), Error> {
        let vault_id = open.vault_id;
        let keyring_blob = open.keyring.seal(&vmk, &vault_id).map_err(Error::Encrypt)?;
        let term = open.keyring.current_term();
        // The audit log names the next signing key durably before the new VMK is committed:
        // whichever way a crash falls, the log knows both keys.
        let audit = self.audit.get();
        if let Some(audit) = audit {
            audit
                .rekeying(&super::audit_key::derive(&vmk, &vault_id).verifying_key())
                .await?;
        }
        let count = blobs.len();
        let committed = self
            .store
            .write(move |tx| {
                store::tables::update_keyring(tx, &keyring_blob, term)?;
                for (id, blob) in &blobs {
                    store::tables::update_keyslot_blob(tx, *id, blob)?;
                }
                for id in &confirm {
                    store::tables::confirm_keyslot(tx, *id)?;
                }
                store::tables::delete_pending_rekey(tx)?;
                Ok(())
            })
            .await;
        if let Err(e) = committed {
            if let Some(audit) = audit {
                audit.rekeyed(None).await;
            }
            return Err(e.into());
        }
        if let Some(audit) = audit {
            audit
                .rekeyed(Some(super::audit_key::derive(&vmk, &vault_id)))
                .await;
        }
        open.vmk = vmk;
        tracing::info!(keyslots = count, "vault rekeyed");
        Ok(())
    }
}

/// The keyslots that still count, at `now`: lapsed unconfirmed recovery keyslots are gone
/// (as the next keyslot change will drop them), unless none would be left.
pub(super) fn live(rows: Vec<KeyslotRow>, now: u64) -> Vec<KeyslotRow> {
    let lapsed = store::tables::lapsed_keyslots(&rows, now);
    rows.into_iter()
        .filter(|r| !lapsed.contains(&r.id))
        .collect()
}
