//! THE API: one transport-agnostic service. Every transport (Varlink, D-Bus, the credential
//! socket) hands it a [`Caller`] and a [`Request`]; it checks the policy, runs the request on the
//! vault, logs the outcome (never a value) and returns a typed reply or error.

use std::sync::{Arc, RwLock};

use keyward::api::{self, ApiError, Reply, Request};

use crate::identity::Caller;
use crate::policy::{credential_secret, decide, Action, Decision, Policy, Resource};
use crate::transport::Handler;
use crate::vault::Vault;

/// The service layer.
pub struct Service {
    vault: Vault,
    policy: RwLock<Arc<Policy>>,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("vault", &self.vault)
            .finish_non_exhaustive()
    }
}

/// What a request touches, for the policy.
fn needs(request: &Request) -> Option<(Action, Resource<'_>)> {
    Some(match request {
        // Anyone who can reach the socket may ask whether the vault is sealed.
        Request::Status => return None,
        Request::Init(_)
        | Request::Enroll(_)
        | Request::ListKeyslots
        | Request::RemoveKeyslot(_)
        | Request::Rekey(_)
        | Request::Rotate
        | Request::Seal
        | Request::Unseal(_) => (Action::Admin, Resource::Vault),
        Request::PutSecret(p) => (Action::Write, Resource::Secret(&p.name)),
        Request::DeleteSecret(p) => (Action::Write, Resource::Secret(&p.name)),
        Request::GetSecret(p) => (Action::Read, Resource::Secret(&p.name)),
        Request::SecretVersions(p) => (Action::Read, Resource::Secret(&p.name)),
        // Filtered name by name below.
        Request::ListSecrets(_) | Request::ListKeys => return None,
        Request::CreateKey(p) => (Action::Keys, Resource::Key(&p.name)),
        Request::DeleteKey(p) => (Action::Keys, Resource::Key(&p.name)),
        Request::PublicKey(p) => (Action::Sign, Resource::Key(&p.name)),
        Request::Sign(p) => (Action::Sign, Resource::Key(&p.name)),
    })
}

fn resource_name(resource: &Resource<'_>) -> String {
    match resource {
        Resource::Secret(n) => format!("secret {n}"),
        Resource::Key(n) => format!("key {n}"),
        Resource::Vault => "vault".into(),
    }
}

impl Service {
    /// A service over `vault` with `policy`.
    pub fn new(vault: Vault, policy: Policy) -> Self {
        Self {
            vault,
            policy: RwLock::new(Arc::new(policy)),
        }
    }

    /// The vault (for start-up work like the unattended unseal).
    pub fn vault(&self) -> &Vault {
        &self.vault
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
        self.policy
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    fn allowed(policy: &Policy, caller: &Caller, action: Action, resource: Resource<'_>) -> bool {
        matches!(
            decide(policy, caller, action, resource),
            Decision::Allow { .. }
        )
    }

    async fn run(&self, caller: &Caller, request: Request) -> Result<Reply, ApiError> {
        let policy = self.policy();
        if let Some((action, resource)) = needs(&request) {
            if !Self::allowed(&policy, caller, action, resource) {
                return Err(ApiError::PermissionDenied {
                    action: action.as_str().to_owned(),
                    resource: resource_name(&resource),
                });
            }
        }
        let v = &self.vault;
        Ok(match request {
            Request::Status => Reply::Status(v.status().await?),
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
            Request::ListKeyslots => Reply::Keyslots(api::KeyslotsReply {
                keyslots: v.list_keyslots().await?,
            }),
            Request::RemoveKeyslot(p) => {
                v.remove_keyslot(p.id, p.force.unwrap_or(false)).await?;
                Reply::Empty(api::Empty {})
            }
            Request::Rekey(p) => Reply::Rekey(api::RekeyReply {
                recovery_shares: v.rekey(p.pin).await?,
            }),
            Request::Rotate => Reply::Rotate(api::RotateReply {
                term: v.rotate().await?,
            }),
            Request::Seal => {
                v.seal(&caller.to_string()).await?;
                Reply::Empty(api::Empty {})
            }
            Request::Unseal(p) => {
                let (sealed, shares_needed) = v.unseal(p).await?;
                Reply::Unseal(api::UnsealReply {
                    sealed,
                    shares_needed,
                })
            }
            Request::PutSecret(p) => Reply::Version(api::VersionReply {
                version: v.put_secret(p.name, p.value).await?,
            }),
            Request::GetSecret(p) => {
                let (value, version) = v.get_secret(p.name, p.version).await?;
                Reply::GetSecret(api::GetSecretReply { value, version })
            }
            Request::ListSecrets(p) => {
                let names = v.list_secrets(p.prefix).await?;
                let names = names
                    .into_iter()
                    .filter(|n| Self::allowed(&policy, caller, Action::Read, Resource::Secret(n)))
                    .collect();
                Reply::Names(api::NamesReply { names })
            }
            Request::SecretVersions(p) => Reply::Versions(api::VersionsReply {
                versions: v.secret_versions(p.name).await?,
            }),
            Request::DeleteSecret(p) => {
                v.delete_secret(p.name).await?;
                Reply::Empty(api::Empty {})
            }
            Request::CreateKey(p) => Reply::PublicKey(api::PublicKeyReply {
                public_key: api::Bytes(v.create_key(p.name, p.device, p.algorithm).await?),
            }),
            Request::ListKeys => {
                let keys = v
                    .list_keys()
                    .await?
                    .into_iter()
                    .filter(|k| {
                        Self::allowed(&policy, caller, Action::Keys, Resource::Key(&k.name))
                            || Self::allowed(&policy, caller, Action::Sign, Resource::Key(&k.name))
                    })
                    .collect();
                Reply::Keys(api::KeysReply { keys })
            }
            Request::PublicKey(p) => Reply::PublicKey(api::PublicKeyReply {
                public_key: api::Bytes(v.public_key(p.name).await?),
            }),
            Request::Sign(p) => Reply::Sign(api::SignReply {
                signature: api::Bytes(
                    v.sign(p.name, p.data.0, p.prehashed.unwrap_or(false))
                        .await?,
                ),
            }),
            Request::DeleteKey(p) => {
                v.delete_key(p.name).await?;
                Reply::Empty(api::Empty {})
            }
        })
    }
}

/// The target a request names, for logs (names only, never values).
fn target(request: &Request) -> String {
    match request {
        Request::PutSecret(p) => p.name.clone(),
        Request::GetSecret(p) => p.name.clone(),
        Request::SecretVersions(p)
        | Request::DeleteSecret(p)
        | Request::PublicKey(p)
        | Request::DeleteKey(p) => p.name.clone(),
        Request::CreateKey(p) => p.name.clone(),
        Request::Sign(p) => p.name.clone(),
        Request::RemoveKeyslot(p) => format!("keyslot {}", p.id),
        Request::ListSecrets(p) => p.prefix.clone().unwrap_or_default(),
        _ => String::new(),
    }
}

impl Handler for Service {
    async fn handle(&self, caller: Caller, request: Request) -> Result<Reply, ApiError> {
        let method = request.method();
        let target = target(&request);
        let result = self.run(&caller, request).await;
        match &result {
            Ok(_) => tracing::debug!(caller = %caller, method, target = %target, "ok"),
            Err(e) => {
                tracing::info!(caller = %caller, method, target = %target, error = %e.name(), "refused")
            }
        }
        result
    }

    async fn credential(
        &self,
        caller: Caller,
        id: String,
        wait: std::time::Duration,
    ) -> Result<api::SecretValue, ApiError> {
        let unit = caller.unit.clone().unwrap_or_default();
        let denied = || ApiError::PermissionDenied {
            action: "credential".into(),
            resource: format!("{unit}/{id}"),
        };
        // The map is the grant: a unit gets exactly the secrets mapped to its credential ids.
        let secret = credential_secret(&self.policy(), &unit, &id)
            .map(str::to_owned)
            .ok_or_else(denied)?;
        if !self.vault.wait_unsealed(wait).await {
            return Err(ApiError::Sealed {
                reason: format!("still sealed after waiting {wait:?}"),
            });
        }
        let result = self
            .vault
            .get_secret(secret.clone(), None)
            .await
            .map(|(value, _)| value);
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
