//! The vault: the master key (VMK) and its state, the keyslots that seal it, the keyring of
//! data keys it protects, and the secrets and device keys it serves.
//!
//! The VMK exists in clear only here, inside [`State::Unsealed`], in zeroizing memory; sealing
//! drops it. Keyslots hold the VMK sealed by one method each (`slots.rs`); any one of them
//! unseals. The VMK never encrypts secrets directly: it encrypts the [`keyring::Keyring`] of data
//! keys by term, so a rekey (new VMK) re-seals one keyring and the slots, whatever the number of
//! secrets.
//!
//! Every state change is one store transaction, committed before the caller hears success.

pub mod audit_key;
pub mod crypto;
pub mod keyring;
pub mod recovery;

mod attest;
mod keys;
mod pending;
mod retry;
mod secrets;
mod slots;
pub mod transit;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use chacha20poly1305::aead::rand_core::RngCore as _;
use keyward_proto::api::{self, SecretString, SlotSpec};
use keyward_proto::recovery_share::Share;
use tokio::sync::RwLock;

use crate::device::DeviceHandle;
use crate::error::{invalid, Error, Param};
use crate::store::{self, Store};
use crypto::Key32;
use keyring::Keyring;

pub use pending::rfc3339;

/// Where the vault stands.
enum State {
    /// No vault yet: `Init` creates one.
    Uninitialized,
    /// The VMK is not in memory. `reason` says why (for `Status` and `STATUS=`); recovery
    /// shares given so far wait in `shares`, by recovery set.
    Sealed {
        reason: String,
        shares: HashMap<[u8; 4], Vec<Share>>,
    },
    /// The VMK and the keyring are in memory.
    Unsealed(Box<Open>),
}

/// An unsealed vault.
struct Open {
    vault_id: [u8; 16],
    vmk: Key32,
    keyring: Keyring,
    /// Which keyslot opened it, for `Status`.
    by: String,
}

/// The vault and everything it needs to serve.
pub struct Vault {
    store: Store,
    devices: BTreeMap<String, DeviceHandle>,
    unseal_order: Vec<String>,
    state: RwLock<State>,
    /// Called with a one-line status whenever the vault is sealed or unsealed (`STATUS=`).
    on_change: Arc<dyn Fn(&str) + Send + Sync>,
    /// True while the vault is open: lets requests that arrive during boot wait for the
    /// unattended unseal instead of failing.
    open_tx: tokio::sync::watch::Sender<bool>,
    /// The audit log, told when the VMK (and so its signing key) comes, goes or changes.
    audit: std::sync::OnceLock<Arc<dyn audit_key::AuditKeys>>,
    /// Signing keys by name, so a signature costs no store read.
    keys: keys::KeyCache,
    /// Key names with a `CreateKey` or `DeleteKey` in progress.
    key_ops: keys::KeyOps,
    /// Devices whose return should trigger another unattended unseal.
    retry: retry::Retry,
    /// How long new recovery shares wait for their confirmation ([`pending`]).
    confirm_within: std::time::Duration,
}

impl std::fmt::Debug for Vault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vault")
            .field("devices", &self.devices.keys())
            .finish_non_exhaustive()
    }
}

/// The context every device-sealed VMK blob is bound to: this vault's id.
fn seal_context(vault_id: &[u8; 16]) -> Vec<u8> {
    let mut c = b"keyward vmk v1\0".to_vec();
    c.extend_from_slice(vault_id);
    c
}

impl Vault {
    /// The store the vault keeps its state in (for a backup's snapshot: everything in it is
    /// sealed or ciphertext already).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// A vault over `store`, sealed if the store holds one, else uninitialised.
    ///
    /// # Errors
    /// The store can't be read.
    pub async fn load(
        store: Store,
        devices: BTreeMap<String, DeviceHandle>,
        unseal_order: Vec<String>,
        confirm_within: std::time::Duration,
        on_change: Arc<dyn Fn(&str) + Send + Sync>,
    ) -> Result<Self, Error> {
        let meta = store.read(store::tables::get_meta).await?;
        let state = match meta {
            Some(_) => State::Sealed {
                reason: "not unsealed yet".into(),
                shares: HashMap::new(),
            },
            None => State::Uninitialized,
        };
        let (open_tx, _) = tokio::sync::watch::channel(false);
        Ok(Self {
            store,
            devices,
            unseal_order,
            state: RwLock::new(state),
            on_change,
            open_tx,
            audit: std::sync::OnceLock::new(),
            keys: keys::KeyCache::default(),
            key_ops: keys::KeyOps::default(),
            retry: retry::Retry::default(),
            confirm_within,
        })
    }

    /// Tell `audit` about the audit signing key from now on (once, before the first unseal).
    pub fn set_audit(&self, audit: Arc<dyn audit_key::AuditKeys>) {
        let _ = self.audit.set(audit);
    }

    /// The configured devices.
    pub fn devices(&self) -> &BTreeMap<String, DeviceHandle> {
        &self.devices
    }

    fn device(&self, name: &str) -> Result<&DeviceHandle, Error> {
        self.devices.get(name).ok_or_else(|| Error::UnknownDevice {
            name: name.to_owned(),
            configured: self.devices.keys().cloned().collect(),
        })
    }

    async fn changed(&self, state: &State) {
        self.open_tx
            .send_replace(matches!(state, State::Unsealed(_)));
        let line = status_line(state);
        if let Some(audit) = self.audit.get() {
            let told = match state {
                State::Unsealed(open) => {
                    audit.opened(audit_key::derive(&open.vmk, &open.vault_id), &line)
                }
                _ => audit.closed(&line),
            };
            told.await;
        }
        (self.on_change)(&line);
    }

    /// Wait up to `limit` for the vault to be open; true if it is.
    pub async fn wait_unsealed(&self, limit: std::time::Duration) -> bool {
        self.retry_unattended_if_due().await;
        let mut rx = self.open_tx.subscribe();
        let opened = tokio::time::timeout(limit, rx.wait_for(|open| *open)).await;
        matches!(opened, Ok(Ok(_)))
    }

    /// `Status`.
    ///
    /// # Errors
    /// The store can't be read.
    pub async fn status(&self) -> Result<api::StatusReply, Error> {
        self.retry_unattended_if_due().await;
        let keyslots = self.list_keyslots_any_state().await?;
        let rekey_pending_until = self.rekey_pending_until().await?;
        let devices = self
            .devices
            .iter()
            .map(|(name, d)| {
                let s = d.status();
                api::DeviceStatus {
                    name: name.clone(),
                    kind: d.kind(),
                    available: s.available,
                    detail: s.detail,
                    algorithms: s.algorithms,
                }
            })
            .collect();
        let state = self.state.read().await;
        let mut reply = api::StatusReply {
            initialized: !matches!(*state, State::Uninitialized),
            sealed: !matches!(*state, State::Unsealed(_)),
            unsealed_by: None,
            reason: None,
            keyslots,
            devices,
            shares_pending: None,
            term: None,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            // The service adds it: the audit log knows its key, the vault does not.
            audit_public_key: None,
            rekey_pending_until,
            audit_finding: None,
            storage: None,
        };
        match &*state {
            State::Uninitialized => reply.reason = Some("no vault yet: run `keyward init`".into()),
            State::Sealed { reason, shares } => {
                reply.reason = Some(reason.clone());
                reply.shares_pending = shares
                    .values()
                    .filter_map(|s| s.first().map(|f| f.threshold.saturating_sub(s.len() as u8)))
                    .min();
            }
            State::Unsealed(open) => {
                reply.unsealed_by = Some(open.by.clone());
                reply.term = Some(open.keyring.current_term());
            }
        }
        Ok(reply)
    }

    /// `Init`: a new VMK, vault id and keyring, and the first keyslots, each test-unsealed
    /// before anything is stored. Returns the keyslots and any recovery shares (shown once).
    ///
    /// # Errors
    /// [`Error::AlreadyInitialized`], a bad slot spec, a device failure.
    pub async fn init(
        &self,
        specs: Vec<SlotSpec>,
    ) -> Result<(Vec<api::Keyslot>, Vec<SecretString>), Error> {
        if specs.is_empty() {
            return Err(invalid(Param::Slots, "a vault needs at least one keyslot"));
        }
        // Hold the write lock throughout: two concurrent inits must not both succeed.
        let mut state = self.state.write().await;
        if !matches!(*state, State::Uninitialized) {
            return Err(Error::AlreadyInitialized);
        }
        let mut vault_id = [0u8; 16];
        chacha20poly1305::aead::OsRng.fill_bytes(&mut vault_id);
        let vmk = Key32::random();
        let keyring = Keyring::new();
        let mut made = Vec::new();
        let mut shares = Vec::new();
        for spec in &specs {
            let (mut slot, mut s) = self.make_slot(&vault_id, &vmk, spec).await?;
            if !s.is_empty() {
                slot.unconfirmed_until = Some(self.confirm_deadline());
            }
            made.push(slot);
            shares.append(&mut s);
        }
        let sealed_keyring = keyring.seal(&vmk, &vault_id).map_err(Error::Encrypt)?;
        let term = keyring.current_term();
        let rows: Vec<store::tables::KeyslotRow> = self
            .store
            .write(move |tx| {
                store::tables::insert_meta(
                    tx,
                    &store::tables::Meta {
                        vault_id,
                        created: store::tables::now_rfc3339(),
                        keyring: sealed_keyring,
                        keyring_term: term,
                    },
                )?;
                made.iter()
                    .map(|slot| store::tables::insert_keyslot(tx, slot))
                    .collect()
            })
            .await?;
        *state = State::Unsealed(Box::new(Open {
            vault_id,
            vmk,
            keyring,
            by: "init".into(),
        }));
        self.changed(&state).await;
        tracing::info!(keyslots = specs.len(), "vault initialised");
        Ok((rows.iter().map(slots::to_api).collect(), shares))
    }

    /// `Seal`: forget the VMK and the keyring (zeroized on drop).
    ///
    /// # Errors
    /// [`Error::NotInitialized`].
    pub async fn seal(&self, by: &str) -> Result<(), Error> {
        let mut state = self.state.write().await;
        match *state {
            State::Uninitialized => return Err(Error::NotInitialized),
            State::Sealed { .. } => return Ok(()),
            State::Unsealed(_) => {}
        }
        *state = State::Sealed {
            reason: format!("sealed by {by}"),
            shares: HashMap::new(),
        };
        self.retry.disarm();
        self.changed(&state).await;
        tracing::info!(by, "vault sealed");
        Ok(())
    }

    /// Run `f` with the open vault, or answer `Sealed` / `NotInitialized`.
    async fn with_open<T>(&self, f: impl FnOnce(&Open) -> T) -> Result<T, Error> {
        self.retry_unattended_if_due().await;
        let state = self.state.read().await;
        match &*state {
            State::Unsealed(open) => Ok(f(open)),
            other => Err(other.closed()),
        }
    }

    /// Install an unsealed VMK after checking it against the stored keyring (the AEAD tag of
    /// the keyring is the check value: a wrong VMK can't open it).
    async fn open_with(&self, vmk: Key32, by: String) -> Result<(), Error> {
        let meta = self
            .store
            .read(store::tables::get_meta)
            .await?
            .ok_or(Error::NotInitialized)?;
        let keyring = Keyring::open(&vmk, &meta.vault_id, &meta.keyring)
            .map_err(|_| Error::WrongKey { by: by.clone() })?;
        let mut state = self.state.write().await;
        *state = State::Unsealed(Box::new(Open {
            vault_id: meta.vault_id,
            vmk,
            keyring,
            by: by.clone(),
        }));
        self.retry.disarm();
        self.changed(&state).await;
        tracing::info!(by = %by, "vault unsealed");
        Ok(())
    }

    async fn vault_id(&self) -> Result<[u8; 16], Error> {
        Ok(self
            .store
            .read(store::tables::get_meta)
            .await?
            .ok_or(Error::NotInitialized)?
            .vault_id)
    }

    /// Mark the vault sealed with `reason` (unattended unseal found no way in).
    async fn stay_sealed(&self, reason: String) {
        let mut state = self.state.write().await;
        if let State::Sealed { reason: r, .. } = &mut *state {
            *r = reason;
        }
        self.changed(&state).await;
    }
}

impl State {
    /// The open vault, or the error that says why there is none.
    fn open_mut(&mut self) -> Result<&mut Open, Error> {
        match self {
            State::Unsealed(open) => Ok(open),
            other => Err(other.closed()),
        }
    }

    /// The error for a vault that is not open.
    fn closed(&self) -> Error {
        match self {
            State::Sealed { reason, .. } => Error::Sealed {
                reason: reason.clone(),
            },
            State::Uninitialized => Error::NotInitialized,
            State::Unsealed(_) => Error::Internal {
                reason: "the vault is open".into(),
            },
        }
    }
}

/// One line for `STATUS=` and logs.
fn status_line(state: &State) -> String {
    match state {
        State::Uninitialized => "no vault: run `keyward init`".into(),
        State::Sealed { reason, .. } => format!("sealed: {reason}"),
        State::Unsealed(open) => format!("unsealed by {}", open.by),
    }
}
