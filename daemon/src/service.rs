//! THE API: one transport-agnostic service. Every transport (Varlink, D-Bus, the credential
//! socket) hands it a [`Caller`] and a [`Request`]; it checks the policy, runs the request on the
//! vault, audits it (never a value) and returns a typed reply or error. What the policy checks
//! and how a call is audited come from the contract's method table (`Request::access`,
//! `Request::audit`, `Request::target`, `Request::detail`); the one match here is the handler.
//!
//! Every request is audited, refused ones included, and none is answered unless its record
//! was written: a secret's put or delete commits its record in the change's own transaction
//! (the audit outbox), and it is appended to the log before the reply; any other mutation
//! (a device key's create or delete, an admin verb) gets a durable `started` record before it
//! runs and an outcome record before the reply; a read gets one record, written before the
//! reply and synced by the audit log's flusher (see [`crate::audit`] for the window).
//!
//! The one exception is `Status`: read-only, nothing secret, and how an admin learns that the
//! state directory's file system is full. It is answered even when its record can't be
//! written; the audit log counts the loss and its next record declares it, and the reply's
//! `storage` says what is wrong.

use std::sync::{Arc, RwLock};

use keyward_proto::api::{self, Access, ApiError, Audit, Reply, Request, SecretName};
use keyward_proto::audit::{OK, STARTED};

use crate::audit::{AuditLog, Durability, Entry};
use crate::backup::Backups;
use crate::identity::Caller;
use crate::transport::{Handler, Watch};
use crate::upstream::{self, Upstream};
use crate::vault::Vault;
use keyward_policy::{credential_secret, decide, Action, Decision, Policy, Resource};

/// Free space below which `Status` calls the state directory's file system full: SQLite needs
/// room for its WAL frames, the audit log for its records.
const LOW_SPACE: u64 = 1 << 20;

/// Change announcements held for a listener that is behind; past that it misses the oldest.
const CHANGES_QUEUE: usize = 256;

/// The service layer.
pub struct Service {
    vault: Vault,
    /// Shared with the running watches, which ask it at each change.
    policy: Arc<RwLock<Arc<Policy>>>,
    audit: Arc<AuditLog>,
    /// The backup being handed out (`Backup`, `BackupChunk`).
    backups: Backups,
    /// The OpenBao upstream sync, when configured (set once, at start).
    upstream: std::sync::OnceLock<Arc<Upstream>>,
    /// Which secret changed, for whoever listens (the D-Bus `SecretChanged` signal).
    changes: tokio::sync::broadcast::Sender<(String, u64)>,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("vault", &self.vault)
            .finish_non_exhaustive()
    }
}

/// What a request touches, for the policy (the table's [`Access`] and the request's target);
/// `None` for a call anyone may make or a list filtered name by name.
fn needs<'a>(request: &Request, target: &'a str) -> Option<(Action, Resource<'a>)> {
    Some(match request.access() {
        // Anyone who can reach the socket may ask whether the vault is sealed; lists are
        // filtered name by name in the handler.
        Access::Open | Access::Filtered => return None,
        Access::Admin => (Action::Admin, Resource::Vault),
        Access::ReadSecret => (Action::Read, Resource::Secret(target)),
        Access::WriteSecret => (Action::Write, Resource::Secret(target)),
        Access::ManageKey => (Action::Keys, Resource::Key(target)),
        Access::UseKey => (Action::Sign, Resource::Key(target)),
        Access::Encrypt => (Action::Encrypt, Resource::Transit(transit_name(target))),
        Access::Decrypt => (Action::Decrypt, Resource::Transit(transit_name(target))),
    })
}

/// The transit key a `transit/<key>` target names (the policy's `transit` list holds key
/// names; the audit log's target says which kind of thing it is).
fn transit_name(target: &str) -> &str {
    target.strip_prefix("transit/").unwrap_or(target)
}

fn resource_name(resource: &Resource<'_>) -> String {
    match resource {
        Resource::Secret(n) => format!("secret {n}"),
        Resource::Key(n) => format!("key {n}"),
        Resource::Transit(n) => format!("transit/{n}"),
        Resource::Vault => "vault".into(),
    }
}

impl Service {
    /// A service over `vault` with `policy`, auditing to `audit`.
    pub fn new(vault: Vault, policy: Policy, audit: Arc<AuditLog>) -> Self {
        Self {
            vault,
            policy: Arc::new(RwLock::new(Arc::new(policy))),
            backups: Backups::new(audit.dir()),
            audit,
            upstream: std::sync::OnceLock::new(),
            changes: tokio::sync::broadcast::channel(CHANGES_QUEUE).0,
        }
    }

    /// The audit log.
    pub fn audit(&self) -> &Arc<AuditLog> {
        &self.audit
    }

    /// The vault (for start-up work like the unattended unseal).
    pub fn vault(&self) -> &Vault {
        &self.vault
    }

    /// Announce that secret `name` changed: its new `version`, or 0 when it was deleted.
    /// Nobody listening is fine.
    pub fn announce_change(&self, name: &str, version: u64) {
        let _ = self.changes.send((name.to_owned(), version));
    }

    /// Serve `UpstreamStatus` and `UpstreamSync` from `upstream` (once, at start).
    pub fn set_upstream(&self, upstream: Arc<Upstream>) {
        let _ = self.upstream.set(upstream);
    }

    /// Swap in a new policy (SIGHUP).
    pub fn set_policy(&self, policy: Policy) {
        let mut p = self
            .policy
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *p = Arc::new(policy);
    }

    fn policy(&self) -> Arc<Policy> {
        current(&self.policy)
    }

    fn allowed(policy: &Policy, caller: &Caller, action: Action, resource: Resource<'_>) -> bool {
        matches!(
            decide(policy, caller.who.subject(), action, resource),
            Decision::Allow { .. }
        )
    }

    /// The policy's verdict on `request` as a whole (lists are filtered name by name later):
    /// the number of the rule that allowed it, for the audit record (`None`: no rule decides).
    fn check(
        policy: &Policy,
        caller: &Caller,
        request: &Request,
        target: &str,
    ) -> Result<Option<u32>, ApiError> {
        let Some((action, resource)) = needs(request, target) else {
            return Ok(None);
        };
        match decide(policy, caller.who.subject(), action, resource) {
            // A policy file is far too small to hold 2^32 rules.
            Decision::Allow { rule } => Ok(Some(u32::try_from(rule).unwrap_or(u32::MAX))),
            Decision::Deny => Err(ApiError::PermissionDenied {
                action: action.as_str().to_owned(),
                resource: resource_name(&resource),
            }),
        }
    }

    async fn run(
        &self,
        policy: &Policy,
        caller: &Caller,
        request: Request,
    ) -> Result<Reply, ApiError> {
        let v = &self.vault;
        Ok(match request {
            Request::Status(_) => {
                let mut status = v.status().await?;
                status.audit_public_key = self.audit.public_key();
                status.audit_finding = self.audit.finding();
                Reply::Status(status)
            }
            Request::Init(p) => {
                let (keyslots, recovery_shares) = v.init(p.slots).await?;
                Reply::Init(api::InitReply {
                    keyslots,
                    recovery_shares,
                })
            }
            Request::Enroll(p) => {
                let (keyslot, recovery_shares) = v.enroll(p.slot).await?;
                Reply::Enroll(api::EnrollReply {
                    keyslot,
                    recovery_shares,
                })
            }
            Request::ListKeyslots(_) => Reply::ListKeyslots(api::KeyslotsReply {
                keyslots: v.list_keyslots().await?,
            }),
            Request::RemoveKeyslot(p) => {
                v.remove_keyslot(p.id, p.force.unwrap_or(false)).await?;
                Reply::RemoveKeyslot(api::Done {})
            }
            Request::Rekey(p) => {
                let (recovery_shares, pending) = v.rekey(p.pin).await?;
                Reply::Rekey(api::RekeyReply {
                    recovery_shares,
                    pending_until: pending.map(crate::vault::rfc3339),
                })
            }
            Request::ConfirmRecovery(p) => {
                let (keyslots, rekeyed) = v.confirm_recovery(p.recovery_shares).await?;
                Reply::ConfirmRecovery(api::ConfirmRecoveryReply { keyslots, rekeyed })
            }
            Request::Rotate(_) => Reply::Rotate(api::RotateReply {
                term: v.rotate().await?,
            }),
            Request::Seal(_) => {
                v.seal(&caller.to_string()).await?;
                Reply::Seal(api::Done {})
            }
            Request::Unseal(p) => {
                let (sealed, shares_needed) = v.unseal(p).await?;
                Reply::Unseal(api::UnsealReply {
                    sealed,
                    shares_needed,
                })
            }
            Request::GetSecret(p) => {
                let (value, version) = v.get_secret(p.name, p.version).await?;
                Reply::GetSecret(api::GetSecretReply { value, version })
            }
            Request::ListSecrets(p) => {
                let names = v.list_secrets(p.prefix).await?;
                let names = names
                    .into_iter()
                    .filter(|n| Self::allowed(policy, caller, Action::Read, Resource::Secret(n)))
                    .collect();
                Reply::ListSecrets(api::NamesReply { names })
            }
            Request::SecretVersions(p) => Reply::SecretVersions(api::VersionsReply {
                versions: v.secret_versions(p.name).await?,
            }),
            Request::CreateKey(p) => Reply::CreateKey(api::PublicKeyReply {
                public_key: api::Bytes(v.create_key(p.name, p.device, p.algorithm).await?),
            }),
            Request::ListKeys(_) => {
                let keys = v
                    .list_keys()
                    .await?
                    .into_iter()
                    .filter(|k| {
                        Self::allowed(policy, caller, Action::Keys, Resource::Key(&k.name))
                            || Self::allowed(policy, caller, Action::Sign, Resource::Key(&k.name))
                    })
                    .collect();
                Reply::ListKeys(api::KeysReply { keys })
            }
            Request::PublicKey(p) => Reply::PublicKey(api::PublicKeyReply {
                public_key: api::Bytes(v.public_key(p.name).await?),
            }),
            Request::Sign(p) => Reply::Sign(api::SignReply {
                signature: api::Bytes(
                    v.sign(p.name, p.data.0, p.prehashed.unwrap_or(false), p.hash)
                        .await?,
                ),
            }),
            Request::DeleteKey(p) => {
                v.delete_key(p.name).await?;
                Reply::DeleteKey(api::Done {})
            }
            Request::CreateTransitKey(p) => Reply::CreateTransitKey(api::VersionReply {
                version: v.create_transit_key(p.name).await?.into(),
            }),
            Request::RotateTransitKey(p) => Reply::RotateTransitKey(api::VersionReply {
                version: v.rotate_transit_key(p.name).await?.into(),
            }),
            Request::Encrypt(p) => {
                let associated = p.associated_data.as_ref().map(|a| a.0.as_slice());
                Reply::Encrypt(api::EncryptReply {
                    ciphertext: v.transit_encrypt(p.name, &p.plaintext, associated).await?,
                })
            }
            Request::Decrypt(p) => {
                let associated = p.associated_data.as_ref().map(|a| a.0.as_slice());
                Reply::Decrypt(api::DecryptReply {
                    plaintext: v.transit_decrypt(p.name, &p.ciphertext, associated).await?,
                })
            }
            Request::AttestKey(p) => Reply::AttestKey(api::AttestKeyReply {
                attestation: v.attest_key(p.name, p.nonce.map(|n| n.0)).await?,
            }),
            Request::Backup(_) => Reply::Backup(self.backups.make(v.store(), &self.audit).await?),
            Request::BackupChunk(p) => Reply::BackupChunk(api::BackupChunkReply {
                data: api::Bytes(self.backups.chunk(&p.id, p.offset).await?),
            }),
            // The watch's first reply; the changes come through `Handler::watch`.
            Request::WatchSecrets(p) => {
                Scope::new(p.names.as_deref())?;
                Reply::WatchSecrets(api::SecretChange {
                    change: api::ChangeKind::Watching,
                    name: None,
                    version: None,
                })
            }
            // Their records are committed with them: `change_on_record`.
            Request::PutSecret(_) | Request::DeleteSecret(_) => {
                return Err(ApiError::Internal {
                    reason: "a secret change must carry its audit record".into(),
                })
            }
            Request::UpstreamStatus(_) => Reply::UpstreamStatus(match self.upstream.get() {
                Some(u) => u.status(self).await?,
                None => upstream::not_configured(),
            }),
            Request::UpstreamSync(_) => Reply::UpstreamSync(match self.upstream.get() {
                Some(u) => {
                    u.sync_now().await;
                    u.status(self).await?
                }
                None => {
                    return Err(ApiError::InvalidArgument {
                        parameter: "upstream".into(),
                        reason: "no [upstream] is configured in keywardd.toml".into(),
                    })
                }
            }),
        })
    }
}

/// The policy in force (the lock only guards a pointer swap: a poisoned one still holds a
/// whole policy).
fn current(policy: &RwLock<Arc<Policy>>) -> Arc<Policy> {
    policy
        .read()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .clone()
}

/// Most names a `WatchSecrets` call may list.
const MAX_WATCHED_NAMES: usize = 256;

/// The names a watch is limited to: exact names, and prefixes (given as `prefix*`).
#[derive(Debug, Default)]
struct Scope {
    names: Vec<SecretName>,
    prefixes: Vec<String>,
}

impl Scope {
    /// The `names` parameter of `WatchSecrets`, checked.
    fn new(given: Option<&[String]>) -> Result<Self, ApiError> {
        let given = given.unwrap_or_default();
        let invalid = |reason: String| ApiError::InvalidArgument {
            parameter: "names".into(),
            reason,
        };
        if given.len() > MAX_WATCHED_NAMES {
            return Err(invalid(format!("more than {MAX_WATCHED_NAMES} names")));
        }
        let mut scope = Self::default();
        for n in given {
            match n.strip_suffix('*') {
                Some(prefix)
                    if !prefix.contains('*')
                        && prefix.len() < keyward_proto::names::MAX_SECRET_NAME =>
                {
                    scope.prefixes.push(prefix.to_owned());
                }
                Some(_) => {
                    return Err(invalid(
                        "a prefix is a name's start followed by one *, at the end".into(),
                    ))
                }
                None => scope
                    .names
                    .push(SecretName::try_from(n.as_str()).map_err(ApiError::from)?),
            }
        }
        Ok(scope)
    }

    /// A change of `name` is watched.
    fn covers(&self, name: &str) -> bool {
        (self.names.is_empty() && self.prefixes.is_empty())
            || self.names.iter().any(|n| n.as_str() == name)
            || self.prefixes.iter().any(|p| name.starts_with(p.as_str()))
    }
}

/// The result as the audit log writes it: `ok`, or the error's stable short wire name.
fn result_name(result: &Result<impl Sized, ApiError>) -> String {
    match result {
        Ok(_) => OK.to_owned(),
        Err(e) => e.short_name(),
    }
}

/// A secret's put or delete: the change whose audit record is committed with it.
enum SecretChange {
    Put(api::PutSecretParams),
    Delete(api::SecretNameParams),
}

impl SecretChange {
    fn method(&self) -> &'static str {
        match self {
            Self::Put(_) => "PutSecret",
            Self::Delete(_) => "DeleteSecret",
        }
    }
}

impl Service {
    /// Run a secret's put or delete with its audit record in the same transaction (the audit
    /// outbox), then append the record to the log before the reply. The log is asked first
    /// whether it takes records: if not, nothing is changed. A change that fails, before or in
    /// its transaction, changes nothing and gets its record the way a read does.
    ///
    /// Once committed the change is acknowledged even if its line can't be appended now: the
    /// record is durable with it, and the next export (or the next start) appends it.
    async fn change_on_record(
        &self,
        caller: &Caller,
        change: SecretChange,
        entry: impl Fn(String) -> Entry,
    ) -> Result<Reply, ApiError> {
        let staged = self.audit.stage(entry(OK.into())).map_err(|e| {
            tracing::error!("the audit log takes no records, refusing the change: {e}");
            ApiError::from(crate::error::Error::from(e))
        })?;
        let v = &self.vault;
        let method = change.method();
        let (result, name) = match change {
            SecretChange::Put(p) => {
                let name = p.name.to_string();
                let put = v.put_secret(p.name, p.value, staged).await;
                let result = put.map(|(version, id)| {
                    self.announce_change(&name, version);
                    (Reply::PutSecret(api::VersionReply { version }), id)
                });
                (result, name)
            }
            SecretChange::Delete(p) => {
                let name = p.name.to_string();
                let deleted = v.delete_secret_recorded(p.name, staged).await;
                let result = deleted.map(|id| {
                    self.announce_change(&name, 0);
                    (Reply::DeleteSecret(api::Done {}), id)
                });
                (result, name)
            }
        };
        match result {
            Ok((reply, row)) => {
                let exported = row.map_or(Ok(()), |row| self.audit.export(v.store(), row));
                if let Err(e) = exported {
                    tracing::error!(
                        "audit log: the record of a committed change is not in the file yet \
                         (it is in the outbox, and goes in with the next one): {e}"
                    );
                }
                tracing::debug!(caller = %caller, method, target = %name, "ok");
                Ok(reply)
            }
            Err(e) => {
                let e = ApiError::from(e);
                // Nothing changed: on record like a read.
                self.record(entry(e.short_name()), Durability::Written, None)
                    .await?;
                tracing::info!(caller = %caller, method, target = %name, error = %e.name(), "refused");
                Err(e)
            }
        }
    }

    /// Write one audit record; an audit failure becomes the request's error.
    async fn record(
        &self,
        entry: Entry,
        durability: Durability,
        checkpoint: Option<&'static str>,
    ) -> Result<u64, ApiError> {
        self.audit
            .request_async(entry, durability, checkpoint)
            .await
            .map_err(|e| {
                tracing::error!("audit record not written, failing the request: {e}");
                ApiError::from(crate::error::Error::from(e))
            })
    }
}

impl Service {
    /// What `Status` says about the state directory: its file system full (or nearly), and
    /// `Status` records not written (`not_written`: why this call's was not).
    fn storage(&self, not_written: Option<crate::audit::AuditError>) -> Option<String> {
        let dir = self.audit.dir();
        let mut said = Vec::new();
        match nix::sys::statvfs::statvfs(dir) {
            Ok(fs) => {
                let free = fs.blocks_available().saturating_mul(fs.fragment_size());
                let dir = dir.display();
                if free == 0 {
                    said.push(format!(
                        "the file system of the state directory {dir} is full (0 bytes free): changes and reads of secrets are refused (StorageFull) until space is freed there"
                    ));
                } else if free < LOW_SPACE {
                    said.push(format!(
                        "the file system of the state directory {dir} is nearly full ({free} bytes free): changes may be refused (StorageFull); free space there"
                    ));
                }
            }
            Err(e) => tracing::warn!("cannot read the free space of {}: {e}", dir.display()),
        }
        if let Some(e) = not_written {
            let lost = self.audit.lost();
            let (records, since) = lost.map_or((1, String::new()), |l| (l.records, l.first));
            said.push(format!(
                "the audit log can't be written ({e}): {records} Status record(s) not written since {since}, to be declared by the next record written"
            ));
        }
        (!said.is_empty()).then(|| said.join("; "))
    }
}

impl Handler for Service {
    async fn handle(&self, caller: Caller, request: Request) -> Result<Reply, ApiError> {
        let method = request.method();
        let target = request.target();
        let audit = request.audit();
        let detail = request.detail();
        let entry = |result: String| {
            let mut e = Entry::new(&caller, method, &target, &result);
            e.detail = detail.clone();
            e
        };
        let durability = match audit {
            Audit::Report | Audit::Read => Durability::Written,
            Audit::AdminRead | Audit::Change | Audit::AdminChange => Durability::Synced,
        };
        let policy = self.policy();
        let rule = match Self::check(&policy, &caller, &request, &target) {
            Ok(rule) => rule,
            Err(denied) => {
                // Nothing changed: the refusal is on disk within the window, like a read.
                let e = entry(result_name(&Err::<(), _>(denied.clone())));
                self.record(e, Durability::Written, None).await?;
                tracing::info!(caller = %caller, method, target = %target, error = %denied.name(), "refused");
                return Err(denied);
            }
        };
        let entry = |result: String| Entry {
            rule,
            ..entry(result)
        };
        let request = match request {
            Request::PutSecret(p) => {
                let change = SecretChange::Put(p);
                return self.change_on_record(&caller, change, entry).await;
            }
            Request::DeleteSecret(p) => {
                let change = SecretChange::Delete(p);
                return self.change_on_record(&caller, change, entry).await;
            }
            other => other,
        };
        // A mutation is on record before it runs: nothing the log can't show is done.
        let intent = if audit.mutates() {
            Some(self.record(entry(STARTED.into()), durability, None).await?)
        } else {
            None
        };
        let mut outcome_entry = entry(String::new());
        let result = self.run(&policy, &caller, request).await;
        outcome_entry.result = result_name(&result);
        outcome_entry.intent = intent;
        if audit == Audit::Report {
            let written = self.audit.request_or_declare_lost(outcome_entry);
            let mut result = result;
            if let Ok(Reply::Status(status)) = &mut result {
                status.storage = self.storage(written.err());
            }
            return result;
        }
        let checkpoint = (audit == Audit::AdminChange).then_some("admin");
        // A device key's create or delete: its `started` record is already durable, and the
        // store's commit shows what happened, so the outcome line may ride the next group sync
        // (one `fdatasync` saved per change). Admin verbs sync theirs, with a checkpoint.
        let outcome_durability = match audit {
            Audit::Change => Durability::Written,
            _ => durability,
        };
        // Not acknowledged unless on record (a reply carrying a value is dropped, zeroized).
        self.record(outcome_entry, outcome_durability, checkpoint)
            .await?;
        match &result {
            Ok(_) => tracing::debug!(caller = %caller, method, target = %target, "ok"),
            Err(e) => {
                tracing::info!(caller = %caller, method, target = %target, error = %e.name(), "refused")
            }
        }
        result
    }

    fn changes(&self) -> Option<tokio::sync::broadcast::Receiver<(String, u64)>> {
        Some(self.changes.subscribe())
    }

    async fn watch(&self, caller: Caller, request: Request) -> Result<(Reply, Watch), ApiError> {
        let scope = match &request {
            Request::WatchSecrets(p) => Scope::new(p.names.as_deref()).unwrap_or_default(),
            // Transports only start a watch for a streaming method.
            other => {
                return Err(ApiError::InvalidArgument {
                    parameter: "more".into(),
                    reason: format!("{} does not stream", other.method()),
                })
            }
        };
        // Listening before the call is answered: nothing after the first reply is missed.
        let changes = self.changes.subscribe();
        // Checked, run and audited (once, as a read) like any call; a bad `names` is refused
        // there, on record.
        let first = self.handle(caller.clone(), request).await?;
        let policy = Arc::clone(&self.policy);
        let visible = move |name: &str| {
            scope.covers(name)
                && Self::allowed(
                    &current(&policy),
                    &caller,
                    Action::Read,
                    Resource::Secret(name),
                )
        };
        Ok((first, Watch::new(changes, visible)))
    }

    async fn credential(
        &self,
        caller: Caller,
        id: String,
        wait: std::time::Duration,
    ) -> Result<api::SecretValue, ApiError> {
        let unit = caller.who.unit.clone().unwrap_or_default();
        // The map is the grant: a unit gets exactly the secrets mapped to its credential ids.
        let secret = credential_secret(&self.policy(), &unit, &id).cloned();
        let result = match &secret {
            None => Err(ApiError::PermissionDenied {
                action: "credential".into(),
                resource: format!("{unit}/{id}"),
            }),
            Some(secret) => {
                if self.vault.wait_unsealed(wait).await {
                    self.vault
                        .get_secret(secret.clone(), None)
                        .await
                        .map(|(value, _)| value)
                        .map_err(ApiError::from)
                } else {
                    Err(ApiError::Sealed {
                        reason: format!("still sealed after waiting {wait:?}"),
                    })
                }
            }
        };
        let target = secret
            .as_ref()
            .map_or_else(|| format!("{unit}/{id}"), SecretName::to_string);
        let mut entry = Entry::new(&caller, "Credential", &target, &result_name(&result));
        entry.detail = Some(format!("credential id {id}"));
        // Delivered only once on record; a refusal is on record too (systemd hears nothing).
        self.record(entry, Durability::Written, None).await?;
        let secret = secret.as_deref().unwrap_or_default();
        match &result {
            Ok(_) => {
                tracing::info!(caller = %caller, credential = %id, secret = %secret, "credential delivered")
            }
            Err(e) => {
                tracing::warn!(caller = %caller, credential = %id, secret = %secret, error = %e.name(), "credential not delivered")
            }
        }
        result
    }
}
