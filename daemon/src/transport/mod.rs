//! Transports: each turns (kernel-verified identity, bytes) into a call of the one service
//! layer, through [`Handler`], and the result back into bytes. No transport touches the store,
//! the vault or a device.

pub mod credentials;
pub mod dbus;
pub mod socket;
pub mod ssh_agent;
pub mod transit;
pub mod varlink;

use std::future::Future;

use keyward_proto::api::{ApiError, Reply, Request, SecretValue};

use crate::identity::Caller;

/// What a transport calls. The daemon's [`crate::service::Service`] implements it; tests of a
/// transport may use a small stand-in.
pub trait Handler: Send + Sync + 'static {
    /// Run one request for `caller`.
    fn handle(
        &self,
        caller: Caller,
        request: Request,
    ) -> impl Future<Output = Result<Reply, ApiError>> + Send;

    /// Changes of secrets as they happen, `(name, version)` (version 0: deleted), for the
    /// transports that announce them. The default announces nothing.
    fn changes(&self) -> Option<tokio::sync::broadcast::Receiver<(String, u64)>> {
        None
    }

    /// The value of systemd credential `id` for `caller` (whose `unit` the transport has
    /// established), as the policy's credential map says. May wait, bounded by `wait`, for the
    /// vault to be unsealed: units start while the daemon is still unsealing at boot.
    /// The default grants nothing (for handlers that serve no credentials).
    fn credential(
        &self,
        caller: Caller,
        id: String,
        wait: std::time::Duration,
    ) -> impl Future<Output = Result<SecretValue, ApiError>> + Send {
        let _ = wait;
        async move {
            Err(ApiError::PermissionDenied {
                action: "credential".into(),
                resource: format!("{}/{id}", caller.who.unit.unwrap_or_default()),
            })
        }
    }
}
