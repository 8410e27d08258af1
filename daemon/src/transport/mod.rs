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

use keyward_proto::api::{ApiError, ChangeKind, Reply, Request, SecretChange, SecretValue};
use tokio::sync::broadcast;

use crate::identity::Caller;

/// A watch of secret changes that the service started for one caller ([`Handler::watch`]):
/// the changes it may see, one at a time.
///
/// Its queue is the service's one bounded broadcast of changes: a watcher that falls behind
/// makes nobody wait (a change is sent without waiting for any listener); it misses the
/// oldest changes, and [`Watch::next`] says how many, after which the watch is over.
pub struct Watch {
    changes: broadcast::Receiver<(String, u64)>,
    /// Whether the caller may see a change of this secret, asked at the time of each change
    /// (a policy reloaded since the watch started applies).
    visible: Box<dyn Fn(&str) -> bool + Send + Sync>,
}

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watch").finish_non_exhaustive()
    }
}

/// What a [`Watch`] has next.
#[derive(Debug, PartialEq, Eq)]
pub enum Watched {
    /// A change the caller may see.
    Change(SecretChange),
    /// The watcher fell behind: this many changes were dropped for it.
    Missed(u64),
    /// No more changes will come (the service is going away).
    Closed,
}

impl Watch {
    /// A watch over `changes` (`(name, version)`, version 0: deleted) that shows a change
    /// only when `visible` says so.
    pub fn new(
        changes: broadcast::Receiver<(String, u64)>,
        visible: impl Fn(&str) -> bool + Send + Sync + 'static,
    ) -> Self {
        Self {
            changes,
            visible: Box::new(visible),
        }
    }

    /// The next change the caller may see (waits for one).
    pub async fn next(&mut self) -> Watched {
        loop {
            match self.changes.recv().await {
                Ok((name, version)) => {
                    if !(self.visible)(&name) {
                        continue;
                    }
                    let (change, version) = match version {
                        0 => (ChangeKind::Delete, None),
                        v => (ChangeKind::Put, Some(v)),
                    };
                    return Watched::Change(SecretChange {
                        change,
                        name: Some(name),
                        version,
                    });
                }
                Err(broadcast::error::RecvError::Lagged(missed)) => return Watched::Missed(missed),
                Err(broadcast::error::RecvError::Closed) => return Watched::Closed,
            }
        }
    }
}

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

    /// Start a watch of secret changes for `caller`: `request` is the streaming call
    /// ([`Request::streams`]), checked and audited like any call; its first reply (the
    /// `watching` one) comes with the [`Watch`] that yields the rest. The default watches
    /// nothing (for handlers that announce no changes).
    fn watch(
        &self,
        caller: Caller,
        request: Request,
    ) -> impl Future<Output = Result<(Reply, Watch), ApiError>> + Send {
        let _ = caller;
        let method = format!("{}.{}", keyward_proto::api::INTERFACE, request.method());
        async move { Err(ApiError::MethodNotFound { method }) }
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
