//! Keyslots: making one (seal the VMK, then prove the slot opens before it is stored), opening
//! the vault through one (unattended at start, or with a PIN or recovery shares from an admin),
//! and the admin verbs over them: enroll, remove, rekey, rotate.
//!
//! A tpm2 slot's signed PCR policy (key and PCRs) lives only in its sealed blob; the API view
//! and a rekey read it from there.

use hsm_shim::{DeviceError, DeviceKind, Pin, SealPolicy, SealedBlob, SecretBytes, SignedPcrs};
use keyward_proto::api::{self, KeyslotKind, SecretString, SlotSpec};
use keyward_proto::recovery_share;

use super::crypto::Key32;
use super::keyring::Keyring;
use super::recovery::{self, RecoverySlotData};
use super::{pending, seal_context, State, Vault};
use crate::device::CallError;
use crate::error::{corrupt, invalid, Error, Param, Thing};
use crate::store::{self, tables::KeyslotRow, tables::NewKeyslot};

/// The API view of a stored keyslot.
pub(super) fn to_api(row: &KeyslotRow) -> api::Keyslot {
    let signed = signed_of(row);
    api::Keyslot {
        id: row.id,
        kind: row.kind,
        device: row.device.clone(),
        pcrs: row.pcrs.clone(),
        pin: row.pin,
        threshold: row.threshold,
        shares: row.shares,
        created: row.created.clone(),
        unconfirmed_until: row.unconfirmed_until.map(super::pending::rfc3339),
        signed_pcrs: signed.as_ref().map(|s| s.pcrs.clone()),
        pcr_public_key: signed.and_then(|s| {
            hsm_shim::tpm::fingerprint(&s.public_key)
                .ok()
                .map(|fp| keyward_proto::text::hex(&fp))
        }),
    }
}

/// The signed PCR policy a tpm2 keyslot's blob is bound to, if any. The blob is the only
/// record of it (the keyslot table has no column for it), so it is read from there.
fn signed_of(row: &KeyslotRow) -> Option<SignedPcrs> {
    if row.kind != KeyslotKind::Tpm2 {
        return None;
    }
    match serde_json::from_slice(&row.blob).ok()? {
        SealedBlob::Tpm2 { signed, .. } => signed,
        _ => None,
    }
}

/// The signed PCR policy a spec asks for.
fn signed_policy(spec: &SlotSpec) -> Result<Option<SignedPcrs>, Error> {
    match (&spec.pcr_public_key, &spec.signed_pcrs) {
        (None, None) => Ok(None),
        (None, Some(_)) => Err(invalid(
            Param::Slot,
            "signed PCRs need the public key that signs their policies",
        )),
        (Some(pem), pcrs) => hsm_shim::tpm::signed_pcrs(pem, pcrs.as_deref())
            .map(Some)
            .map_err(|e| invalid(Param::Slot, e.to_string())),
    }
}

fn pin_of(s: Option<&SecretString>) -> Result<Option<Pin>, Error> {
    s.map(|p| Pin::new(p.expose()).map_err(|e| invalid(Param::Pin, e.to_string())))
        .transpose()
}

impl Vault {
    /// Seal `vmk` by the method `spec` names and prove the result opens again; nothing is
    /// stored here. Returns the row to store and any recovery shares.
    pub(super) async fn make_slot(
        &self,
        vault_id: &[u8; 16],
        vmk: &Key32,
        spec: &SlotSpec,
    ) -> Result<(NewKeyslot, Vec<SecretString>), Error> {
        match spec.kind.device() {
            Some(kind) => {
                let name = spec
                    .device
                    .as_deref()
                    .ok_or_else(|| invalid(Param::Device, "a device slot names its device"))?;
                let device = self.device(name)?;
                if device.kind() != kind {
                    return Err(invalid(
                        Param::Device,
                        format!("{name:?} is a {} device, not {}", device.kind(), spec.kind),
                    ));
                }
                let signed = signed_policy(spec)?;
                if kind == DeviceKind::Pkcs11
                    && (spec.pcrs.is_some() || spec.pin.is_some() || signed.is_some())
                {
                    return Err(invalid(Param::Slot, "a pkcs11 slot has no PCRs or PIN of its own: the token's login PIN guards it"));
                }
                if spec.threshold.is_some() || spec.shares.is_some() {
                    return Err(invalid(
                        Param::Slot,
                        "threshold and shares are for recovery slots",
                    ));
                }
                let policy = SealPolicy {
                    pcrs: spec.pcrs.clone(),
                    pin: pin_of(spec.pin.as_ref())?,
                    signed,
                };
                let test_pin = pin_of(spec.pin.as_ref())?;
                let blob = self.device_seal(name, vault_id, vmk, policy).await?;
                let (back, _) = self
                    .device_unseal(name, vault_id, &blob, test_pin)
                    .await
                    .map_err(|e| match e {
                        // The admin's to fix (a signature file for the current values), and
                        // the reason says how: keep it rather than a bare PolicyMismatch.
                        Error::Device {
                            cause: CallError::Device(DeviceError::PolicyUnsigned(why)),
                            ..
                        } => invalid(
                            Param::Slot,
                            format!("the new keyslot does not open now: {why}"),
                        ),
                        e => e,
                    })?;
                if back.expose() != vmk.expose() {
                    return Err(Error::SelfTest {
                        reason: format!("device {name:?} returned another key in the test unseal"),
                    });
                }
                let (pcrs, pin) = match &blob {
                    SealedBlob::Tpm2 { pcrs, pin, .. } => (Some(pcrs.clone()), *pin),
                    _ => (None, false),
                };
                let blob = serde_json::to_vec(&blob).map_err(|_| corrupt("sealed blob"))?;
                Ok((
                    NewKeyslot {
                        kind: spec.kind,
                        device: Some(name.to_owned()),
                        pcrs,
                        pin,
                        threshold: None,
                        shares: None,
                        blob,
                        unconfirmed_until: None,
                    },
                    Vec::new(),
                ))
            }
            None => {
                if spec.device.is_some()
                    || spec.pcrs.is_some()
                    || spec.pin.is_some()
                    || spec.pcr_public_key.is_some()
                    || spec.signed_pcrs.is_some()
                {
                    return Err(invalid(
                        Param::Slot,
                        "a recovery slot takes only threshold and shares",
                    ));
                }
                let (k, n) = match (spec.threshold, spec.shares) {
                    (Some(k), Some(n)) => (k, n),
                    _ => {
                        return Err(invalid(
                            Param::Slot,
                            "a recovery slot needs threshold and shares (e.g. 2 of 3)",
                        ))
                    }
                };
                let (data, texts) = recovery::enroll(vmk, vault_id, k, n)
                    .map_err(|e| invalid(Param::Slot, e.to_string()))?;
                // The test unseal: the first k shares, parsed back from their text, must open it.
                let parsed = texts
                    .iter()
                    .take(usize::from(k))
                    .map(|t| recovery_share::parse(t))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| Error::SelfTest {
                        reason: format!("recovery share self-test: {e}"),
                    })?;
                let back = recovery::unwrap_vmk(&data, vault_id, &parsed).map_err(|e| {
                    Error::SelfTest {
                        reason: format!("recovery self-test: {e}"),
                    }
                })?;
                if back.expose() != vmk.expose() {
                    return Err(Error::SelfTest {
                        reason: "recovery self-test opened another key".into(),
                    });
                }
                let blob = data.to_blob().map_err(|_| corrupt("recovery slot"))?;
                let shares = texts
                    .into_iter()
                    .map(|t| SecretString::new(t.as_str()))
                    .collect();
                Ok((
                    NewKeyslot {
                        kind: KeyslotKind::Recovery,
                        device: None,
                        pcrs: None,
                        pin: false,
                        threshold: Some(k),
                        shares: Some(n),
                        blob,
                        // Set by the caller: a rekey's material has no row of its own.
                        unconfirmed_until: None,
                    },
                    shares,
                ))
            }
        }
    }

    async fn device_seal(
        &self,
        name: &str,
        vault_id: &[u8; 16],
        vmk: &Key32,
        policy: SealPolicy,
    ) -> Result<SealedBlob, Error> {
        let secret = SecretBytes::new(vmk.expose().to_vec());
        let context = seal_context(vault_id);
        self.device(name)?
            .call(move |d| d.seal(&secret, &context, &policy))
            .await
            .map_err(|e| Error::device(name, e))
    }

    async fn device_unseal(
        &self,
        name: &str,
        vault_id: &[u8; 16],
        blob: &SealedBlob,
        pin: Option<Pin>,
    ) -> Result<(Key32, Option<String>), Error> {
        let blob = blob.clone();
        let context = seal_context(vault_id);
        let (secret, note) = self
            .device(name)?
            .call(move |d| d.unseal_noting(&blob, &context, pin.as_ref()))
            .await
            .map_err(|e| Error::device(name, e))?;
        let key = Key32::from_bytes(secret.expose()).map_err(|_| Error::Internal {
            reason: format!("device {name:?} unsealed a key of the wrong size"),
        })?;
        Ok((key, note))
    }

    /// Unseal through one device keyslot; also returns what let it open beyond the blob (the
    /// signed PCR policy that matched), for the status.
    async fn unseal_slot(
        &self,
        vault_id: &[u8; 16],
        row: &KeyslotRow,
        pin: Option<Pin>,
    ) -> Result<(Key32, Option<String>), Error> {
        let device = row
            .device
            .as_deref()
            .ok_or_else(|| corrupt("keyslot device"))?;
        let blob: SealedBlob =
            serde_json::from_slice(&row.blob).map_err(|_| corrupt("sealed blob"))?;
        self.device_unseal(device, vault_id, &blob, pin).await
    }

    /// Every keyslot, whatever the vault's state (for `Status`).
    pub(super) async fn list_keyslots_any_state(&self) -> Result<Vec<api::Keyslot>, Error> {
        Ok(self.keyslot_rows().await?.iter().map(to_api).collect())
    }

    /// The keyslots that count now (lapsed unconfirmed recovery slots are left out).
    pub(super) async fn keyslot_rows(&self) -> Result<Vec<KeyslotRow>, Error> {
        let rows = self.store.read(store::tables::list_keyslots).await?;
        Ok(pending::live(rows, pending::unix_now()))
    }

    /// `ListKeyslots` (needs the vault open, like every admin verb but `Status`).
    ///
    /// # Errors
    /// `Sealed`, `NotInitialized`, store failures.
    pub async fn list_keyslots(&self) -> Result<Vec<api::Keyslot>, Error> {
        self.with_open(|_| ()).await?;
        self.list_keyslots_any_state().await
    }

    /// The unattended unseal at start: device keyslots without a PIN, devices in the
    /// configured order (the caller waits for the devices' first open first). Never asks for
    /// or retries a PIN. Leaves the vault sealed with the
    /// reasons when nothing opens it.
    pub async fn unseal_unattended(&self) {
        let rows = match self.keyslot_rows().await {
            Ok(rows) => rows,
            Err(e) => return self.stay_sealed(format!("cannot read keyslots: {e}")).await,
        };
        {
            let state = self.state.read().await;
            if !matches!(*state, State::Sealed { .. }) {
                return;
            }
        }
        let vault_id = match self.vault_id().await {
            Ok(id) => id,
            Err(e) => return self.stay_sealed(e.to_string()).await,
        };
        let mut why = Vec::new();
        let mut away = Vec::new();
        for device in &self.unseal_order {
            let Some(handle) = self.devices.get(device) else {
                continue;
            };
            handle.ready().await;
            let opens = handle.opens();
            for row in rows
                .iter()
                .filter(|r| r.device.as_deref() == Some(device.as_str()))
            {
                if row.pin {
                    why.push(format!("keyslot {} ({device}) needs a PIN", row.id));
                    continue;
                }
                match self.unseal_slot(&vault_id, row, None).await {
                    Ok((vmk, note)) => {
                        let by = format!(
                            "keyslot {} ({} on {device}{})",
                            row.id,
                            row.kind,
                            note.map(|n| format!(", {n}")).unwrap_or_default()
                        );
                        match self.open_with(vmk, by).await {
                            Ok(()) => return,
                            Err(e) => why.push(format!("keyslot {}: {e}", row.id)),
                        }
                    }
                    Err(e) => {
                        tracing::warn!(keyslot = row.id, device = %device, error = %e, "unattended unseal failed");
                        if e.is_retryable() && !away.iter().any(|(d, _)| d == device) {
                            away.push((device.clone(), opens));
                        }
                        why.push(format!("keyslot {} ({device}): {e}", row.id));
                    }
                }
            }
        }
        if rows.iter().any(|r| r.kind == KeyslotKind::Recovery) {
            why.push("recovery shares can unseal: `keyward unseal`".into());
        }
        let reason = if why.is_empty() {
            "no keyslot can unseal unattended".to_owned()
        } else {
            format!("no keyslot could unseal: {}", why.join("; "))
        };
        self.stay_sealed(reason).await;
        if !away.is_empty() {
            self.retry.arm(away);
        }
    }

    /// `Unseal` with one recovery share or a PIN. Returns `(sealed, shares_needed)`.
    ///
    /// # Errors
    /// `NotInitialized`; a malformed share; a PIN the device refuses.
    pub async fn unseal(&self, params: api::UnsealParams) -> Result<(bool, Option<u8>), Error> {
        {
            let state = self.state.read().await;
            match *state {
                State::Uninitialized => return Err(Error::NotInitialized),
                State::Unsealed(_) => return Ok((false, None)),
                State::Sealed { .. } => {}
            }
        }
        let vault_id = self.vault_id().await?;
        let rows = self.keyslot_rows().await?;
        match (params.recovery_share, params.pin) {
            (Some(share), None) => self.unseal_with_share(&vault_id, &rows, share).await,
            (None, Some(pin)) => self
                .unseal_with_pin(&vault_id, &rows, pin)
                .await
                .map(|()| (false, None)),
            _ => Err(invalid(
                Param::Parameters,
                "give exactly one of recovery_share and pin",
            )),
        }
    }

    async fn unseal_with_share(
        &self,
        vault_id: &[u8; 16],
        rows: &[KeyslotRow],
        share: SecretString,
    ) -> Result<(bool, Option<u8>), Error> {
        let parsed = recovery_share::parse(share.expose())
            .map_err(|e| invalid(Param::RecoveryShare, e.to_string()))?;
        let slot = rows
            .iter()
            .filter(|r| r.kind == KeyslotKind::Recovery)
            .find_map(|r| {
                let data = RecoverySlotData::from_blob(&r.blob).ok()?;
                (data.set.set_id == parsed.set_id).then_some((r.id, r.unconfirmed_until, data))
            });
        let Some((slot_id, unconfirmed, data)) = slot else {
            return Err(invalid(
                Param::RecoveryShare,
                "this share belongs to no recovery keyslot of this vault",
            ));
        };
        let set_id = parsed.set_id;
        let ready = {
            let mut state = self.state.write().await;
            let State::Sealed { shares, .. } = &mut *state else {
                return Ok((false, None));
            };
            let pending = shares.entry(set_id).or_default();
            if !pending.iter().any(|p| p.index == parsed.index) {
                pending.push(parsed);
            }
            if pending.len() < usize::from(data.set.threshold) {
                let needed = data.set.threshold - pending.len() as u8;
                self.changed(&state).await;
                return Ok((true, Some(needed)));
            }
            shares.remove(&set_id).unwrap_or_default()
        };
        let vmk = recovery::unwrap_vmk(&data, vault_id, &ready).map_err(|e| {
            invalid(
                Param::RecoveryShare,
                format!("the shares do not open keyslot {slot_id}: {e}"),
            )
        })?;
        self.open_with(vmk, format!("keyslot {slot_id} (recovery)"))
            .await?;
        if unconfirmed.is_some() {
            // Whoever opened the vault with these shares holds them: that is the proof.
            self.store
                .write(move |tx| store::tables::confirm_keyslot(tx, slot_id))
                .await?;
            tracing::info!(keyslot = slot_id, "recovery shares confirmed by an unseal");
        }
        Ok((false, None))
    }

    async fn unseal_with_pin(
        &self,
        vault_id: &[u8; 16],
        rows: &[KeyslotRow],
        pin: SecretString,
    ) -> Result<(), Error> {
        // TPM slots bound to a PIN first; a wrong PIN ends the attempt (each try burns the
        // TPM's lockout counter).
        if let Some(row) = rows.iter().find(|r| r.kind == KeyslotKind::Tpm2 && r.pin) {
            let (vmk, note) = self.unseal_slot(vault_id, row, pin_of(Some(&pin))?).await?;
            let device = row.device.clone().unwrap_or_default();
            let note = note.map(|n| format!(", {n}")).unwrap_or_default();
            return self
                .open_with(
                    vmk,
                    format!("keyslot {} (tpm2 on {device}, PIN{note})", row.id),
                )
                .await;
        }
        // Then tokens that could not log in on their own: log in with this PIN once.
        for (name, handle) in &self.devices {
            if handle.kind() != DeviceKind::Pkcs11 || handle.status().available {
                continue;
            }
            let Some(row) = rows
                .iter()
                .find(|r| r.device.as_deref() == Some(name.as_str()))
            else {
                continue;
            };
            let p = pin_of(Some(&pin))?.ok_or_else(|| invalid(Param::Pin, "empty"))?;
            handle.login(p).await.map_err(|e| Error::device(name, e))?;
            let (vmk, _) = self.unseal_slot(vault_id, row, None).await?;
            return self
                .open_with(vmk, format!("keyslot {} (pkcs11 on {name})", row.id))
                .await;
        }
        Err(invalid(
            Param::Pin,
            "no keyslot of this vault takes a PIN now",
        ))
    }

    /// A duplicate of the open vault's id and VMK, for work that must not hold the lock.
    async fn open_copy(&self) -> Result<([u8; 16], Key32), Error> {
        self.with_open(|o| {
            Ok::<_, Error>((
                o.vault_id,
                Key32::from_bytes(o.vmk.expose()).map_err(|_| corrupt("vmk"))?,
            ))
        })
        .await?
    }

    /// `Enroll`: a new keyslot, stored only after its test unseal.
    ///
    /// # Errors
    /// `Sealed`, a bad spec, a device failure.
    pub async fn enroll(&self, spec: SlotSpec) -> Result<(api::Keyslot, Vec<SecretString>), Error> {
        let (vault_id, vmk) = self.open_copy().await?;
        self.no_rekey_pending().await?;
        self.drop_lapsed().await?;
        let (mut slot, shares) = self.make_slot(&vault_id, &vmk, &spec).await?;
        if !shares.is_empty() {
            slot.unconfirmed_until = Some(self.confirm_deadline());
        }
        let row = self
            .store
            .write(move |tx| store::tables::insert_keyslot(tx, &slot))
            .await?;
        tracing::info!(keyslot = row.id, kind = %row.kind, "keyslot enrolled");
        Ok((to_api(&row), shares))
    }

    /// `RemoveKeyslot`: refuses to remove the last way into the vault without `force`. An
    /// unconfirmed recovery keyslot is not a way in: nobody is known to hold its shares.
    ///
    /// # Errors
    /// `Sealed`, `NotFound`, `LastKeyslot`, `RekeyPending`.
    pub async fn remove_keyslot(&self, id: u32, force: bool) -> Result<(), Error> {
        self.with_open(|_| ()).await?;
        self.no_rekey_pending().await?;
        self.drop_lapsed().await?;
        self.store
            .try_write(move |tx| {
                let rows = store::tables::list_keyslots(tx)?;
                if !rows.iter().any(|r| r.id == id) {
                    return Err(Error::NotFound {
                        what: Thing::Keyslot,
                        name: id.to_string(),
                    });
                }
                let ways_left = rows
                    .iter()
                    .filter(|r| r.id != id && r.unconfirmed_until.is_none())
                    .count();
                if ways_left == 0 && !force {
                    return Err(Error::LastKeyslot { id });
                }
                store::tables::delete_keyslot(tx, id)?;
                Ok(())
            })
            .await?;
        tracing::warn!(keyslot = id, force, "keyslot removed");
        Ok(())
    }

    /// `Rotate`: a new data-key term; new secret versions use it, old ones stay readable.
    ///
    /// # Errors
    /// `Sealed`, store failures.
    pub async fn rotate(&self) -> Result<u32, Error> {
        let mut state = self.state.write().await;
        let open = state.open_mut()?;
        // Rotate a copy, store it, then swap: a failed write leaves memory and disk as they were.
        let sealed = open
            .keyring
            .seal(&open.vmk, &open.vault_id)
            .map_err(Error::Encrypt)?;
        let mut next = Keyring::open(&open.vmk, &open.vault_id, &sealed).map_err(Error::Decrypt)?;
        let term = next.rotate().map_err(Error::Encrypt)?;
        let blob = next
            .seal(&open.vmk, &open.vault_id)
            .map_err(Error::Encrypt)?;
        self.store
            .write(move |tx| store::tables::update_keyring(tx, &blob, term))
            .await?;
        open.keyring = next;
        tracing::info!(term, "data-key term rotated");
        Ok(term)
    }

    /// `Rekey`: a new VMK. Every keyslot is sealed again (device slots by their device,
    /// recovery slots with new shares, returned once), each new slot proven first. Without
    /// recovery slots, one transaction installs it all at once. With them, the rekey is only
    /// prepared: the current key and the old shares stay in force until the new shares are
    /// confirmed ([`Vault::confirm_recovery`]), so a reply that never arrives loses nothing.
    /// A rekey started while one is pending replaces it. O(keyslots), independent of the
    /// secrets.
    ///
    /// Returns the new shares and, when the rekey is pending, until when (unix seconds).
    ///
    /// # Errors
    /// `Sealed`; a PIN-bound slot and no `pin`; a device failure (nothing changes then).
    pub async fn rekey(
        &self,
        pin: Option<SecretString>,
    ) -> Result<(Vec<SecretString>, Option<u64>), Error> {
        self.drop_lapsed().await?;
        // The write lock for the whole rekey: no reader may see a half-swapped VMK.
        let mut state = self.state.write().await;
        let open = state.open_mut()?;
        let rows = self.keyslot_rows().await?;
        if let Some(row) = rows.iter().find(|r| r.pin) {
            if pin.is_none() {
                return Err(invalid(
                    Param::Pin,
                    format!(
                        "keyslot {} is bound to a PIN: give it to re-seal the slot",
                        row.id
                    ),
                ));
            }
        }
        let vault_id = open.vault_id;
        let vmk = Key32::random();
        let mut blobs = Vec::with_capacity(rows.len());
        let mut shares = Vec::new();
        for row in &rows {
            let signed = signed_of(row);
            let spec = SlotSpec {
                kind: row.kind,
                device: row.device.clone(),
                pcrs: row.pcrs.clone(),
                pin: if row.pin {
                    pin.as_ref().map(|p| SecretString::new(p.expose()))
                } else {
                    None
                },
                threshold: row.threshold,
                shares: row.shares,
                pcr_public_key: signed
                    .as_ref()
                    .map(|s| keyward_proto::text::public_key_pem(&s.public_key)),
                signed_pcrs: signed.map(|s| s.pcrs),
            };
            let (slot, mut s) = self.make_slot(&vault_id, &vmk, &spec).await?;
            blobs.push((row.id, slot.blob));
            shares.append(&mut s);
        }
        if shares.is_empty() {
            self.commit_rekey(open, vmk, blobs, Vec::new()).await?;
            return Ok((shares, None));
        }
        let next = blobs
            .into_iter()
            .map(|(id, blob)| pending::NextSlot { id, blob })
            .collect();
        let until = self.prepare_rekey(next).await?;
        Ok((shares, Some(until)))
    }
}
