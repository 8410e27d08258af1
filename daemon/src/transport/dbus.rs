//! The D-Bus transport: interface `org.keyward.Custodian1` on object `/org/keyward/Custodian1`,
//! under the well-known name `org.keyward.Custodian1`, answered by the one [`Handler`].
//!
//! It owns the bus connection's life — connect, export the object, own the name (or say clearly
//! why it can't), release it and drain the calls in flight at shutdown — and the translation of
//! D-Bus arguments into [`Request`]s and of results into D-Bus replies and errors
//! (`org.keyward.Custodian1.Error.<Reason>`). The caller's identity comes from the bus
//! (`GetConnectionCredentials` of the message's sender), never from an argument; a caller the
//! bus can't vouch for is refused. Nothing else is decided here: policy, the vault and the
//! devices are the service's business, and this module never touches them.
//!
//! Every method of the contract's table (`keyward_proto::keyward_methods!`) is a member: the
//! everyday ones with typed signatures written out here, every other one generated as
//! `s` (its Varlink parameters as JSON) → `s` (its Varlink reply as JSON), so that a method
//! added to the table reaches D-Bus without an edit here.
//!
//! When a secret changes (a `PutSecret`, a `DeleteSecret`, the upstream sync), the object
//! sends the signal `SecretChanged(s name, t version)` (version 0: deleted), so an operator can
//! restart the units that use it; the signal carries the name, never a value. (It is the
//! D-Bus form of the streaming `WatchSecrets`, which therefore has no member here.)
//!
//! It never logs, prints or keeps a copy of argument or reply contents (secret values, PINs,
//! recovery shares). Secret values are moved into zeroizing buffers the moment they leave the
//! message, and returned values are serialized straight from the service's zeroizing buffer.
//! What it can't wipe: the message buffers themselves, which zbus owns (the received call and
//! the reply it serializes, including any reallocation while it writes one), and the copies in
//! the bus daemon and the client.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use keyward_proto::api::{
    self, ApiError, CreateKeyParams, Empty, GetSecretParams, KeyNameParams, ListSecretsParams,
    PutSecretParams, Reply, Request, SecretNameParams, SecretString, SecretValue, SignParams,
    UnsealParams,
};
use serde::{Serialize, Serializer};
use tokio::sync::{watch, Semaphore};
use tracing::{debug, info, warn};
use zbus::fdo::{self, RequestNameFlags, RequestNameReply};
use zbus::message::{Header, Message};
use zbus::names::{BusName, ErrorName, InterfaceName, OwnedErrorName};
use zbus::{Connection, Signature, Type, Variant};
use zeroize::Zeroizing;

use super::Handler;
use crate::identity::{Caller, Peer, Via};
use keyward_policy::Identity;

/// The well-known bus name the daemon owns.
pub const BUS_NAME: &str = "org.keyward.Custodian1";

/// The object that carries the interface.
pub const OBJECT_PATH: &str = "/org/keyward/Custodian1";

/// The interface.
pub const INTERFACE: &str = "org.keyward.Custodian1";

/// Every error this interface returns is named `<ERROR_PREFIX>.<Reason>`.
pub const ERROR_PREFIX: &str = "org.keyward.Custodian1.Error";

/// Bounds of the D-Bus service (`[dbus]` in the config).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DbusLimits {
    /// Calls served at once (at least 1). Further calls are refused with `Busy` instead of
    /// queueing without bound (the bus daemon's own limits bound each client; this bounds all
    /// of them together).
    pub max_calls_in_flight: usize,
    /// How long shutdown waits for calls in flight to be answered: a hung call must not hold
    /// the daemon's exit forever.
    pub drain_timeout: Duration,
}

/// Which bus the service joins.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Bus {
    /// The system bus.
    System,
    /// The caller's session bus.
    Session,
    /// An explicit address (`unix:path=…`), e.g. a private bus in tests.
    Address(String),
}

/// Why the D-Bus service could not start or stopped early.
#[derive(Debug, thiserror::Error)]
pub enum DbusError {
    /// The bus could not be reached, or refused us.
    #[error("cannot connect to the D-Bus {bus}: {source}")]
    Connect {
        /// Which bus (`system bus`, `session bus`, or the configured address).
        bus: String,
        /// What zbus said.
        source: zbus::Error,
    },
    /// Another connection owns the name: most likely another `keywardd`.
    #[error("the D-Bus name {BUS_NAME} on the {bus} is owned by another process (is another keywardd running?)")]
    NameTaken {
        /// Which bus.
        bus: String,
    },
    /// The bus's policy does not let this user own the name.
    #[error(
        "the {bus} does not let this user own {BUS_NAME}: install the bus policy \
             (org.keyward.Custodian1.conf) and run keywardd as the user it names ({detail})"
    )]
    NameNotPermitted {
        /// Which bus.
        bus: String,
        /// The bus daemon's message.
        detail: String,
    },
    /// Exporting the object or asking for the name failed otherwise.
    #[error("D-Bus service on the {bus}: {source}")]
    Bus {
        /// Which bus.
        bus: String,
        /// What zbus said.
        source: zbus::Error,
    },
    /// The bus went away while we were serving.
    #[error("lost the connection to the D-Bus {bus}")]
    Disconnected {
        /// Which bus.
        bus: String,
    },
}

/// A running D-Bus service: connected, object exported, name owned. [`DbusService::run`] serves
/// until shutdown.
#[derive(Debug)]
pub struct DbusService {
    conn: Connection,
    bus: String,
    drain_timeout: Duration,
    /// The handler's change announcements, sent on as `SecretChanged` signals.
    changes: Option<tokio::sync::broadcast::Receiver<(String, u64)>>,
}

/// Connect to the configured bus (`address` if set, else the system or session bus), export
/// [`INTERFACE`] at [`OBJECT_PATH`] (serving at most `limits.max_calls_in_flight` calls at
/// once), and own [`BUS_NAME`]. Once this returns, the name is owned
/// and calls are answered (the runtime serves them; [`DbusService::run`] only waits for the
/// shutdown). Call it before telling systemd `READY=1`, so that a client ordered after the
/// daemon finds the name.
///
/// # Errors
/// The bus can't be reached or refuses to authenticate us ([`DbusError::Connect`]); another
/// connection owns the name ([`DbusError::NameTaken`]); the bus policy doesn't let us own it
/// ([`DbusError::NameNotPermitted`]); anything else the bus refuses ([`DbusError::Bus`]).
pub async fn start<H: Handler>(
    bus: &Bus,
    limits: DbusLimits,
    handler: Arc<H>,
) -> Result<DbusService, DbusError> {
    let (builder, bus) = match bus {
        Bus::Address(address) => (
            zbus::connection::Builder::address(address.as_str()),
            format!("bus at {address}"),
        ),
        Bus::Session => (zbus::connection::Builder::session(), "session bus".into()),
        Bus::System => (zbus::connection::Builder::system(), "system bus".into()),
    };
    let conn = builder.build().await.map_err(|source| DbusError::Connect {
        bus: bus.clone(),
        source,
    })?;
    let changes = handler.changes();
    let custodian = Custodian {
        handler,
        calls: Semaphore::new(limits.max_calls_in_flight),
    };
    let bus_error = |source| DbusError::Bus {
        bus: bus.clone(),
        source,
    };
    // The object first, then the name: no call can arrive for an object not yet there.
    conn.object_server()
        .at(OBJECT_PATH, custodian)
        .await
        .map_err(bus_error)?;
    match conn
        .request_name_with_flags(BUS_NAME, RequestNameFlags::DO_NOT_QUEUE)
        .await
    {
        Ok(RequestNameReply::PrimaryOwner | RequestNameReply::AlreadyOwner) => {}
        Ok(RequestNameReply::Exists | RequestNameReply::InQueue) | Err(zbus::Error::NameTaken) => {
            return Err(DbusError::NameTaken { bus })
        }
        Err(zbus::Error::FDO(e)) => match *e {
            fdo::Error::AccessDenied(detail) => {
                return Err(DbusError::NameNotPermitted { bus, detail })
            }
            other => return Err(bus_error(zbus::Error::FDO(Box::new(other)))),
        },
        Err(source) => return Err(bus_error(source)),
    }
    info!(bus = %bus, name = BUS_NAME, path = OBJECT_PATH, "dbus: serving");
    Ok(DbusService {
        conn,
        bus,
        drain_timeout: limits.drain_timeout,
        changes,
    })
}

impl DbusService {
    /// The bus this service is on (for logs).
    pub fn bus(&self) -> &str {
        &self.bus
    }

    /// Serve until `shutdown` becomes true (or its sender is dropped); then release the name,
    /// withdraw the object, and wait (bounded) for the calls in flight to be answered.
    ///
    /// # Errors
    /// [`DbusError::Disconnected`] if the bus connection is lost before the shutdown (the
    /// service is gone then; the other transports go on).
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) -> Result<(), DbusError> {
        let mut changes = self.changes.take();
        loop {
            tokio::select! {
                // The guard `wait_for` returns is not `Send`: dropped inside the block.
                () = async { drop(shutdown.wait_for(|stop| *stop).await) } => break,
                () = self.conn.closed() => {
                    warn!(bus = %self.bus, "dbus: the bus closed the connection; D-Bus service stopped");
                    return Err(DbusError::Disconnected { bus: self.bus });
                }
                change = next_change(&mut changes) => self.announce(change).await,
            }
        }
        // New callers stop finding us by name...
        match self.conn.release_name(BUS_NAME).await {
            Ok(_) => debug!(name = BUS_NAME, "dbus: name released"),
            Err(e) => warn!(error = %e, "dbus: cannot release the name"),
        }
        // ...and callers that kept our unique name meet no object.
        match self
            .conn
            .object_server()
            .remove_named(
                OBJECT_PATH,
                InterfaceName::from_static_str_unchecked(INTERFACE),
            )
            .await
        {
            Ok(_) => debug!(path = OBJECT_PATH, "dbus: object withdrawn"),
            Err(e) => warn!(error = %e, "dbus: cannot withdraw the object"),
        }
        // Every call in flight holds a clone of the connection until its reply has been sent;
        // once ours is the last one, every call has been answered. Bounded: a hung call must
        // not hold the daemon's exit forever.
        let drain = self.drain_timeout;
        if tokio::time::timeout(drain, self.conn.graceful_shutdown())
            .await
            .is_err()
        {
            warn!("dbus: calls still in flight after {drain:?}; leaving them");
        } else {
            debug!("dbus: drained");
        }
        Ok(())
    }
}

/// The next change announcement, `None` when some were missed (the receiver lagged); pending
/// forever when there are none to hear.
async fn next_change(
    changes: &mut Option<tokio::sync::broadcast::Receiver<(String, u64)>>,
) -> Option<(String, u64)> {
    use tokio::sync::broadcast::error::RecvError;
    let Some(rx) = changes.as_mut() else {
        return std::future::pending().await;
    };
    match rx.recv().await {
        Ok(change) => Some(change),
        Err(RecvError::Lagged(missed)) => {
            warn!(missed, "dbus: change announcements missed");
            None
        }
        Err(RecvError::Closed) => {
            *changes = None;
            None
        }
    }
}

impl DbusService {
    /// `SecretChanged(name, version)` on the object, to anyone who listens (version 0: the
    /// secret was deleted). Names only: never a value.
    async fn announce(&self, change: Option<(String, u64)>) {
        let Some((name, version)) = change else {
            return;
        };
        if let Err(e) = self
            .conn
            .emit_signal(
                None::<BusName<'_>>,
                OBJECT_PATH,
                INTERFACE,
                "SecretChanged",
                &(name.as_str(), version),
            )
            .await
        {
            warn!(error = %e, "dbus: SecretChanged not sent");
        }
    }
}

/// The exported object. Generic over the handler so tests can serve a stand-in.
struct Custodian<H> {
    handler: Arc<H>,
    /// One permit per call being served.
    calls: Semaphore,
}

/// A secret value on its way out (`ay`): written into the reply message straight from the
/// service's zeroizing buffer, which is wiped when the reply has been sent.
struct SecretOut(Zeroizing<Vec<u8>>);

impl Serialize for SecretOut {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl Type for SecretOut {
    const SIGNATURE: &'static Signature = &Signature::static_array(&Signature::U8);
}

/// A reply as JSON text (`s`), for the members that carry the table's types as JSON: written
/// into the reply message straight from a zeroizing buffer (recovery shares travel in it).
struct JsonOut(Zeroizing<String>);

impl Serialize for JsonOut {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl Type for JsonOut {
    const SIGNATURE: &'static Signature = &Signature::Str;
}

/// A failed call, as D-Bus sees it: `org.keyward.Custodian1.Error.<Reason>` and the
/// [`ApiError`]'s text.
pub struct CallError {
    name: OwnedErrorName,
    message: String,
}

impl CallError {
    /// The D-Bus error for an API error.
    pub fn from_api(e: &ApiError) -> Self {
        Self {
            name: error_name(e),
            message: e.to_string(),
        }
    }

    /// The error name.
    pub fn name(&self) -> &str {
        self.name.as_str()
    }

    /// The human-readable message.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl std::fmt::Debug for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallError")
            .field("name", &self.name.as_str())
            .field("message", &self.message)
            .finish()
    }
}

impl zbus::DBusError for CallError {
    fn create_reply(&self, call: &Header<'_>) -> zbus::Result<Message> {
        Message::error(call, self.name.as_ref()).build(&(self.message.as_str(),))
    }

    fn name(&self) -> ErrorName<'_> {
        self.name.as_ref()
    }

    fn description(&self) -> Option<&str> {
        Some(&self.message)
    }
}

/// The short reason of an API error ([`ApiError::reason`]: `NotFound`), or `Internal` if that
/// isn't a valid D-Bus name element.
pub fn error_reason(e: &ApiError) -> String {
    let short = e.reason();
    let valid = short
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && short.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if valid {
        short
    } else {
        "Internal".to_owned()
    }
}

/// `org.keyward.Custodian1.Error.<Reason>` for an API error.
pub fn error_name(e: &ApiError) -> OwnedErrorName {
    OwnedErrorName::try_from(format!("{ERROR_PREFIX}.{}", error_reason(e))).unwrap_or_else(|_| {
        OwnedErrorName::from(ErrorName::from_static_str_unchecked(
            "org.keyward.Custodian1.Error.Internal",
        ))
    })
}

/// The service answered with a reply of the wrong kind: a bug, reported as `Internal`.
/// A typed member's argument as the contract's checked value (a name, an algorithm): a bad one
/// is refused here, before the service, policy or audit see the call, as Varlink refuses it
/// while parsing.
fn checked<T: TryFrom<String, Error = keyward_proto::Invalid>>(s: String) -> Result<T, CallError> {
    T::try_from(s).map_err(|e| CallError::from_api(&e.into()))
}

fn unexpected(method: &str) -> CallError {
    CallError::from_api(&ApiError::Internal {
        reason: format!("unexpected reply to {method}"),
    })
}

impl<H: Handler> Custodian<H> {
    /// Who sent this call, as the bus daemon saw it when the sender connected. Fails closed.
    async fn caller(&self, conn: &Connection, hdr: &Header<'_>) -> Result<Caller, ApiError> {
        let denied = |why: &str| {
            info!(reason = why, "dbus: caller not identified; call refused");
            ApiError::PermissionDenied {
                action: "call".into(),
                resource: "caller identity unavailable".into(),
            }
        };
        let sender = hdr.sender().ok_or_else(|| denied("no sender"))?;
        let proxy = fdo::DBusProxy::builder(conn)
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await
            .map_err(|_| denied("no bus proxy"))?;
        let creds = proxy
            .get_connection_credentials(BusName::from(sender.to_owned()))
            .await
            .map_err(|_| denied("GetConnectionCredentials failed"))?;
        let uid = creds
            .unix_user_id()
            .ok_or_else(|| denied("the bus gave no uid"))?;
        let pid = creds.process_id().and_then(|p| i32::try_from(p).ok());
        let bus_groups = creds.unix_group_ids().cloned();
        // The bus's pidfd pins the process that connected (dbus-broker, dbus-daemon 1.15.7+);
        // without it, one is opened by pid now.
        let peer = match creds.into_process_fd() {
            Some(fd) => Peer::with_pidfd(uid, u32::MAX, pid, fd.into()),
            None => Peer::by_pid(uid, u32::MAX, pid),
        };
        let process = peer.process();
        // D-Bus gives all of the sender's groups at connect time (dbus-daemon: primary and
        // supplementary, sorted) but doesn't say which is primary. The process's effective gid,
        // if it is one of them, names it for the logs; policy treats gid and groups alike anyway.
        // Without the bus's list, the process's effective gid; without either, a gid no rule
        // names.
        let proc_gid = process.as_ref().map(|p| p.gid);
        let gid = match &bus_groups {
            Some(groups) => proc_gid
                .filter(|g| groups.contains(g))
                .or_else(|| groups.first().copied()),
            None => proc_gid,
        }
        .unwrap_or(u32::MAX);
        let (proc_groups, unit) = process.map_or((Vec::new(), None), |p| (p.groups, p.unit));
        Ok(Caller {
            who: Identity {
                uid,
                gid,
                // What the bus saw when the sender connected beats /proc read now.
                groups: bus_groups.unwrap_or(proc_groups),
                unit,
            },
            pid: peer.pid,
            via: Via::Dbus,
        })
    }

    /// Take a call slot, identify the caller, run the request.
    async fn call(
        &self,
        conn: &Connection,
        hdr: &Header<'_>,
        request: Request,
    ) -> Result<Reply, CallError> {
        let _slot = self
            .calls
            .try_acquire()
            .map_err(|_| CallError::from_api(&ApiError::Busy))?;
        // The service logs and audits the outcome; nothing to add here.
        let caller = self
            .caller(conn, hdr)
            .await
            .map_err(|e| CallError::from_api(&e))?;
        self.handler
            .handle(caller, request)
            .await
            .map_err(|e| CallError::from_api(&e))
    }

    /// A JSON member: `params` is the method's Varlink parameters object (`""` for none), the
    /// reply its Varlink reply object. Secrets and PINs in `params` are read straight into
    /// zeroizing buffers by their types; the reply text is built in one.
    async fn json(
        &self,
        conn: &Connection,
        hdr: &Header<'_>,
        method: &str,
        params: &str,
    ) -> Result<JsonOut, CallError> {
        let request =
            Request::parse(method, non_empty(params)).map_err(|e| CallError::from_api(&e))?;
        let reply = self.call(conn, hdr, request).await?;
        let too_large = || ApiError::TooLarge {
            parameter: "reply".into(),
            limit: api::MAX_FRAME_LEN as u64,
        };
        let mut text = keyward_proto::wire::encode_frame(&reply, api::MAX_FRAME_LEN)
            .ok()
            .flatten()
            .ok_or_else(|| CallError::from_api(&too_large()))?;
        // Drop the frame's NUL; the bytes then move, uncopied (serde_json writes UTF-8).
        text.pop();
        let text = String::from_utf8(std::mem::take(&mut *text)).map_err(|e| {
            let mut bytes = e.into_bytes();
            zeroize::Zeroize::zeroize(&mut bytes);
            CallError::from_api(&ApiError::Internal {
                reason: "a reply that is not UTF-8".into(),
            })
        })?;
        Ok(JsonOut(Zeroizing::new(text)))
    }
}

/// `""` means "not given".
fn non_empty(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

/// Builds the exported interface from the method table: the typed members written out below
/// (their D-Bus signatures predate the table and stay as they are), and for every other method
/// a member of the same name that takes its parameters and returns its reply as the Varlink
/// JSON objects (`s` → `s`). A method added to the table is exported here without an edit.
macro_rules! custodian_interface {
    ($(
        $(#[$doc:meta])*
        $name:ident($params:ty) -> $reply:ty { $($rest:tt)* }
    )*) => {
        custodian_interface!(@json [] $($name)*);
    };
    // The methods with a typed member.
    (@json [$($done:ident)*] Status $($more:ident)*) => {
        custodian_interface!(@json [$($done)*] $($more)*);
    };
    (@json [$($done:ident)*] GetSecret $($more:ident)*) => {
        custodian_interface!(@json [$($done)*] $($more)*);
    };
    (@json [$($done:ident)*] PutSecret $($more:ident)*) => {
        custodian_interface!(@json [$($done)*] $($more)*);
    };
    (@json [$($done:ident)*] ListSecrets $($more:ident)*) => {
        custodian_interface!(@json [$($done)*] $($more)*);
    };
    (@json [$($done:ident)*] DeleteSecret $($more:ident)*) => {
        custodian_interface!(@json [$($done)*] $($more)*);
    };
    (@json [$($done:ident)*] CreateKey $($more:ident)*) => {
        custodian_interface!(@json [$($done)*] $($more)*);
    };
    (@json [$($done:ident)*] ListKeys $($more:ident)*) => {
        custodian_interface!(@json [$($done)*] $($more)*);
    };
    (@json [$($done:ident)*] PublicKey $($more:ident)*) => {
        custodian_interface!(@json [$($done)*] $($more)*);
    };
    (@json [$($done:ident)*] Sign $($more:ident)*) => {
        custodian_interface!(@json [$($done)*] $($more)*);
    };
    (@json [$($done:ident)*] DeleteKey $($more:ident)*) => {
        custodian_interface!(@json [$($done)*] $($more)*);
    };
    (@json [$($done:ident)*] Seal $($more:ident)*) => {
        custodian_interface!(@json [$($done)*] $($more)*);
    };
    (@json [$($done:ident)*] Unseal $($more:ident)*) => {
        custodian_interface!(@json [$($done)*] $($more)*);
    };
    (@json [$($done:ident)*] Rotate $($more:ident)*) => {
        custodian_interface!(@json [$($done)*] $($more)*);
    };
    // A streaming method has no member: D-Bus has the `SecretChanged` signal for it.
    (@json [$($done:ident)*] WatchSecrets $($more:ident)*) => {
        custodian_interface!(@json [$($done)*] $($more)*);
    };
    (@json [$($done:ident)*] $name:ident $($more:ident)*) => {
        custodian_interface!(@json [$($done)* $name] $($more)*);
    };
    (@json [$($json:ident)*]) => {
#[zbus::interface(name = "org.keyward.Custodian1")]
impl<H: Handler> Custodian<H> {
    /// State of the vault: initialized (b), sealed (b), unsealed_by (s, empty if sealed),
    /// reason (s, why it is sealed), version (s), term (u, 0 if sealed), keyslots (u, how many),
    /// shares_pending (y, recovery shares still needed, 0 if none), devices (a(ssbs): name,
    /// kind, available, detail).
    #[zbus(out_args("status"))]
    async fn status(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Header<'_>,
    ) -> Result<BTreeMap<&'static str, Variant<'static>>, CallError> {
        let reply = self.call(conn, &hdr, Request::Status(Empty {})).await?;
        let Reply::Status(s) = reply else {
            return Err(unexpected("Status"));
        };
        Ok(status_dict(s))
    }

    /// A secret's value and version; version 0 means the latest.
    #[zbus(out_args("value", "version"))]
    async fn get_secret(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Header<'_>,
        name: String,
        version: u64,
    ) -> Result<(SecretOut, u64), CallError> {
        let request = Request::GetSecret(GetSecretParams {
            name: checked(name)?,
            version: (version != 0).then_some(version),
        });
        let reply = self.call(conn, &hdr, request).await?;
        let Reply::GetSecret(r) = reply else {
            return Err(unexpected("GetSecret"));
        };
        Ok((SecretOut(r.value.into_inner()), r.version))
    }

    /// Store a new version of a secret; returns its version.
    #[zbus(out_args("version"))]
    async fn put_secret(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Header<'_>,
        name: String,
        value: &[u8],
    ) -> Result<u64, CallError> {
        // Refused before it is copied (the service would refuse it too).
        if value.len() > api::MAX_SECRET_LEN {
            return Err(CallError::from_api(&ApiError::TooLarge {
                parameter: "value".into(),
                limit: api::MAX_SECRET_LEN as u64,
            }));
        }
        // One allocation of the exact size, wiped on drop; the message buffer is zbus's.
        let mut secret = Zeroizing::new(Vec::with_capacity(value.len()));
        secret.extend_from_slice(value);
        let request = Request::PutSecret(PutSecretParams {
            name: checked(name)?,
            value: SecretValue::from(secret),
        });
        let reply = self.call(conn, &hdr, request).await?;
        let Reply::PutSecret(r) = reply else {
            return Err(unexpected("PutSecret"));
        };
        Ok(r.version)
    }

    /// Names of the secrets the caller may read; an empty prefix lists all.
    #[zbus(out_args("names"))]
    async fn list_secrets(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Header<'_>,
        prefix: String,
    ) -> Result<Vec<String>, CallError> {
        let request = Request::ListSecrets(ListSecretsParams {
            prefix: non_empty(&prefix).map(str::to_owned),
        });
        let reply = self.call(conn, &hdr, request).await?;
        let Reply::ListSecrets(r) = reply else {
            return Err(unexpected("ListSecrets"));
        };
        Ok(r.names)
    }

    /// Delete a secret, all versions.
    async fn delete_secret(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Header<'_>,
        name: String,
    ) -> Result<(), CallError> {
        let request = Request::DeleteSecret(SecretNameParams {
            name: checked(name)?,
        });
        self.call(conn, &hdr, request).await?;
        Ok(())
    }

    /// Generate a key pair inside a device (algorithm: ed25519, ecdsa-p256, rsa-pss-3072);
    /// returns the DER SubjectPublicKeyInfo.
    #[zbus(out_args("public_key"))]
    async fn create_key(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Header<'_>,
        name: String,
        device: String,
        algorithm: String,
    ) -> Result<Vec<u8>, CallError> {
        let request = Request::CreateKey(CreateKeyParams {
            name: checked(name)?,
            device,
            algorithm: checked(algorithm)?,
        });
        let reply = self.call(conn, &hdr, request).await?;
        let Reply::CreateKey(r) = reply else {
            return Err(unexpected("CreateKey"));
        };
        Ok(r.public_key.0)
    }

    /// The keys the caller may use or manage: (name, device, algorithm, created).
    #[zbus(out_args("keys"))]
    async fn list_keys(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Header<'_>,
    ) -> Result<Vec<(String, String, String, String)>, CallError> {
        let reply = self.call(conn, &hdr, Request::ListKeys(Empty {})).await?;
        let Reply::ListKeys(r) = reply else {
            return Err(unexpected("ListKeys"));
        };
        let keys = r
            .keys
            .into_iter()
            .map(|k| (k.name, k.device, k.algorithm.to_string(), k.created))
            .collect();
        Ok(keys)
    }

    /// A key's DER SubjectPublicKeyInfo.
    #[zbus(out_args("public_key"))]
    async fn public_key(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Header<'_>,
        name: String,
    ) -> Result<Vec<u8>, CallError> {
        let request = Request::PublicKey(KeyNameParams {
            name: checked(name)?,
        });
        let reply = self.call(conn, &hdr, request).await?;
        let Reply::PublicKey(r) = reply else {
            return Err(unexpected("PublicKey"));
        };
        Ok(r.public_key.0)
    }

    /// Sign data inside the device; with prehashed, data is a SHA-256 digest. Ed25519: raw 64
    /// bytes; ECDSA: DER; RSA (PSS, PKCS#1 v1.5): raw.
    #[zbus(out_args("signature"))]
    async fn sign(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Header<'_>,
        name: String,
        data: Vec<u8>,
        prehashed: bool,
    ) -> Result<Vec<u8>, CallError> {
        let request = Request::Sign(SignParams {
            name: checked(name)?,
            data: api::Bytes(data),
            prehashed: Some(prehashed),
            // SHA-256: the method's D-Bus signature stays as it was; SHA-512 (for SSH's
            // rsa-sha2-512) is on the Varlink socket and the ssh-agent.
            hash: None,
        });
        let reply = self.call(conn, &hdr, request).await?;
        let Reply::Sign(r) = reply else {
            return Err(unexpected("Sign"));
        };
        Ok(r.signature.0)
    }

    /// Destroy a key in its device.
    async fn delete_key(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Header<'_>,
        name: String,
    ) -> Result<(), CallError> {
        let request = Request::DeleteKey(KeyNameParams {
            name: checked(name)?,
        });
        self.call(conn, &hdr, request).await?;
        Ok(())
    }

    /// Forget the master key until the next unseal.
    async fn seal(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Header<'_>,
    ) -> Result<(), CallError> {
        self.call(conn, &hdr, Request::Seal(Empty {})).await?;
        Ok(())
    }

    /// Give one recovery share or a PIN ("" for none); returns whether the vault is still
    /// sealed and how many shares are still needed (0 if none).
    #[zbus(out_args("sealed", "shares_needed"))]
    async fn unseal(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Header<'_>,
        recovery_share: &str,
        pin: &str,
    ) -> Result<(bool, u8), CallError> {
        let request = Request::Unseal(UnsealParams {
            recovery_share: non_empty(recovery_share).map(SecretString::new),
            pin: non_empty(pin).map(SecretString::new),
        });
        let reply = self.call(conn, &hdr, request).await?;
        let Reply::Unseal(r) = reply else {
            return Err(unexpected("Unseal"));
        };
        Ok((r.sealed, r.shares_needed.unwrap_or(0)))
    }

    /// Start a new data-key term for new secret versions; returns it.
    #[zbus(out_args("term"))]
    async fn rotate(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Header<'_>,
    ) -> Result<u32, CallError> {
        let reply = self.call(conn, &hdr, Request::Rotate(Empty {})).await?;
        let Reply::Rotate(r) = reply else {
            return Err(unexpected("Rotate"));
        };
        Ok(r.term)
    }

    $(
        /// The method of the same name in `org.keyward.Custodian`: its parameters as a JSON
        /// object ("" for none), its reply as one.
        #[allow(non_snake_case)]
        #[zbus(out_args("reply"))]
        async fn $json(
            &self,
            #[zbus(connection)] conn: &Connection,
            #[zbus(header)] hdr: Header<'_>,
            params: &str,
        ) -> Result<JsonOut, CallError> {
            self.json(conn, &hdr, stringify!($json), params).await
        }
    )*
}
    };
}

keyward_proto::keyward_methods!(custodian_interface);

/// `Status` as `a{sv}`.
fn status_dict(s: api::StatusReply) -> BTreeMap<&'static str, Variant<'static>> {
    let devices: Vec<(String, String, bool, String)> = s
        .devices
        .into_iter()
        .map(|d| (d.name, d.kind.to_string(), d.available, d.detail))
        .collect();
    let mut m = BTreeMap::new();
    m.insert("initialized", Variant::from(s.initialized));
    m.insert("sealed", Variant::from(s.sealed));
    m.insert(
        "unsealed_by",
        Variant::from(s.unsealed_by.unwrap_or_default()),
    );
    m.insert("reason", Variant::from(s.reason.unwrap_or_default()));
    m.insert("version", Variant::from(s.version));
    m.insert("term", Variant::from(s.term.unwrap_or(0)));
    m.insert(
        "keyslots",
        Variant::from(u32::try_from(s.keyslots.len()).unwrap_or(u32::MAX)),
    );
    m.insert(
        "shares_pending",
        Variant::from(s.shares_pending.unwrap_or(0)),
    );
    m.insert("devices", Variant::from(devices));
    m.insert(
        "audit_public_key",
        Variant::from(s.audit_public_key.unwrap_or_default()),
    );
    // What an admin must act on; empty when there is nothing.
    m.insert(
        "rekey_pending_until",
        Variant::from(s.rekey_pending_until.unwrap_or_default()),
    );
    m.insert(
        "audit_finding",
        Variant::from(s.audit_finding.unwrap_or_default()),
    );
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_names_take_the_short_reason() {
        let cases = [
            (
                ApiError::NotFound {
                    kind: "secret".into(),
                    name: "a".into(),
                },
                "org.keyward.Custodian1.Error.NotFound",
            ),
            (
                ApiError::PermissionDenied {
                    action: "read".into(),
                    resource: "b".into(),
                },
                "org.keyward.Custodian1.Error.PermissionDenied",
            ),
            (ApiError::Busy, "org.keyward.Custodian1.Error.Busy"),
            (
                ApiError::InvalidParameter {
                    parameter: "x".into(),
                },
                "org.keyward.Custodian1.Error.InvalidParameter",
            ),
            (
                ApiError::Other {
                    name: "org.keyward.Custodian.Future".into(),
                    parameters: "{}".into(),
                },
                "org.keyward.Custodian1.Error.Future",
            ),
            (
                ApiError::Other {
                    name: "not-a-name".into(),
                    parameters: "{}".into(),
                },
                "org.keyward.Custodian1.Error.Internal",
            ),
        ];
        for (e, want) in cases {
            let c = CallError::from_api(&e);
            assert_eq!(c.name(), want);
            assert_eq!(c.message(), e.to_string());
        }
    }

    /// Answers nothing; only names the handler type.
    struct Nothing;

    impl Handler for Nothing {
        async fn handle(&self, _: Caller, _: Request) -> Result<Reply, ApiError> {
            Err(ApiError::Busy)
        }
    }

    #[test]
    fn the_exported_interface_has_the_contract_name() {
        use zbus::object_server::Interface;
        assert_eq!(
            <Custodian<Nothing> as Interface>::name().as_str(),
            INTERFACE
        );
    }
}
