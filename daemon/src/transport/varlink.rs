//! The Varlink transport (varlink.org): NUL-terminated JSON messages on a Unix stream socket,
//! answered by the one [`Handler`].
//!
//! It owns, on top of the shared accept loop ([`socket::accept_loop`], which reads each
//! connection's identity from the kernel), the bounds on what a client controls (frame size, connections per uid
//! and in all, idle time), `org.varlink.service` introspection, and the drain at shutdown. It
//! turns frames into [`Request`]s and results into frames, nothing more: it never touches the
//! store, the vault or a device, and it never logs, prints or keeps a copy of request or reply
//! contents (they hold secret values and PINs). Every buffer that held a frame is zeroized
//! before it is freed, and grown only by copying into a new zeroizing buffer, never by a
//! reallocation that would leave a copy behind.
//!
//! Streaming (`more`, varlink.org's Method Call): a method the table marks `streams`
//! (`WatchSecrets`) needs `more: true` and is refused with `org.varlink.service.ExpectedMore`
//! without it; its replies carry `"continues": true` until the last one. Any other method
//! called with `more` is answered once, without `continues`, as the protocol lets a server do.
//! While a stream runs the connection is busy, as the protocol says: it is not closed for
//! being idle (the daemon is the one that talks), a client that wants no more closes it, and
//! a client that sends anything meanwhile has its connection closed. A stream's replies wait
//! in one bounded queue shared by all watchers (the service's change announcements): a
//! watcher that does not keep up makes no writer and no other client wait; it is sent the
//! final error `WatchOverflow` (how many changes it missed), which ends its call, and its
//! connection serves calls again. A reply it does not take within the idle timeout closes its
//! connection, as for any reply. A watch holds its connection's slot like any connection, so
//! the per-uid share and root's reserve bound watchers as they bound everyone.

use std::io::Write as _;

use std::sync::Arc;
use std::time::Duration;

use keyward_proto::api::{self, ApiError, Request};
use keyward_proto::wire::{FrameBuf, Next};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tokio::time::{timeout_at, Instant};
use tracing::{debug, info, warn};
use zeroize::Zeroizing;

use super::socket::{self, shutdown_requested};
use super::{Handler, Watch, Watched};
use crate::identity::{Caller, Peer, Via};

/// The interface every Varlink service implements, answered by this transport itself.
pub const SERVICE_INTERFACE: &str = "org.varlink.service";

/// The description of `org.varlink.service`, as varlink.org defines it.
pub const SERVICE_DESCRIPTION: &str = r#"# The Varlink Service Interface is provided by every varlink service. It
# describes the service and the interfaces it implements.
interface org.varlink.service

# Get a list of all the interfaces a service provides and information
# about the implementation.
method GetInfo() -> (
  vendor: string,
  product: string,
  version: string,
  url: string,
  interfaces: []string
)

# Get the description of an interface that is implemented by this service.
method GetInterfaceDescription(interface: string) -> (description: string)

# The requested interface was not found.
error InterfaceNotFound (interface: string)

# The requested method was not found
error MethodNotFound (method: string)

# The interface defines the requested method, but the service does not
# implement it.
error MethodNotImplemented (method: string)

# One of the passed parameters is invalid.
error InvalidParameter (parameter: string)

# Client is denied access
error PermissionDenied ()

# Method is expected to be called with 'more' set to true, but wasn't
error ExpectedMore ()
"#;

/// Bounds on what one client, and all of them together, can make the transport hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VarlinkLimits {
    /// Largest request, in bytes, NUL excluded (normally [`api::MAX_FRAME_LEN`]). Replies are
    /// held to the same bound.
    pub max_frame: usize,
    /// Connections served at once, all users together.
    pub max_connections: usize,
    /// Connections one uid may hold at once.
    pub max_connections_per_uid: usize,
    /// Of `max_connections`, how many only uid 0 may use.
    pub root_reserve: usize,
    /// A connection that sends no complete request for this long is closed; so is one that
    /// does not take its reply within this time.
    pub idle_timeout: Duration,
}

/// Why a connection was turned away.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Full {
    /// Every slot is taken.
    All,
    /// Every slot but root's reserve is taken, and the caller is not root.
    Shared,
    /// The caller's uid holds its share.
    Uid,
}

/// The connection slots, counted per uid. A [`Slot`] holds one until it is dropped.
#[derive(Debug)]
struct Slots {
    limits: VarlinkLimits,
    held: std::sync::Mutex<Held>,
}

#[derive(Debug, Default)]
struct Held {
    total: usize,
    per_uid: std::collections::HashMap<u32, usize>,
}

impl Slots {
    fn new(limits: VarlinkLimits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            held: std::sync::Mutex::new(Held::default()),
        })
    }

    fn held(&self) -> std::sync::MutexGuard<'_, Held> {
        // The counts stay consistent under every panic (plain integer updates): go on.
        self.held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A slot for a connection of `uid`, or why there is none.
    fn take(self: &Arc<Self>, uid: u32) -> Result<Slot, Full> {
        let l = &self.limits;
        let mut held = self.held();
        let mine = held.per_uid.get(&uid).copied().unwrap_or(0);
        if held.total >= l.max_connections.max(1) {
            return Err(Full::All);
        }
        if uid != 0 && held.total >= l.max_connections.saturating_sub(l.root_reserve).max(1) {
            return Err(Full::Shared);
        }
        if mine >= l.max_connections_per_uid.max(1) {
            return Err(Full::Uid);
        }
        held.total += 1;
        held.per_uid.insert(uid, mine + 1);
        Ok(Slot {
            slots: Arc::clone(self),
            uid,
        })
    }
}

/// One connection's place among [`Slots`]; given back on drop.
#[derive(Debug)]
struct Slot {
    slots: Arc<Slots>,
    uid: u32,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut held = self.slots.held();
        held.total = held.total.saturating_sub(1);
        if let std::collections::hash_map::Entry::Occupied(mut e) = held.per_uid.entry(self.uid) {
            *e.get_mut() -= 1;
            if *e.get() == 0 {
                e.remove();
            }
        }
    }
}

/// Serve Varlink on `listener` until `shutdown` becomes true (or its sender is dropped).
///
/// Then stop accepting, close idle connections, let each busy connection finish the request
/// it is running and send its reply, and return once all of them are done.
///
/// Every connection is accepted at once and counted against its uid (from `SO_PEERCRED`): one
/// beyond `max_connections` in all, beyond `max_connections_per_uid` for its uid, or (not
/// root) into the last `root_reserve` slots, is answered with `Busy` and closed right away.
/// Nobody waits in the listen backlog, and no user can fill the slots root needs.
pub async fn serve<H: Handler>(
    listener: UnixListener,
    handler: Arc<H>,
    limits: VarlinkLimits,
    shutdown: watch::Receiver<bool>,
) {
    let slots = Slots::new(limits);
    let mut refusals = Refusals::default();
    let stop = shutdown.clone();
    socket::accept_loop("varlink", listener, shutdown, |stream, peer| {
        match slots.take(peer.uid) {
            Ok(slot) => Some(connection(
                stream,
                peer,
                Arc::clone(&handler),
                limits,
                stop.clone(),
                slot,
            )),
            Err(full) => {
                refusals.note(peer.uid, full);
                // A fresh socket's send buffer is empty: the short frame goes out in one
                // non-blocking write (straight to the socket, not through the runtime, which
                // may not know it writable yet), and the accept loop never waits on a client.
                if let Ok(stream) = stream.into_std() {
                    let _ = (&stream).write(&encode_error(&ApiError::Busy));
                }
                None
            }
        }
    })
    .await;
}

/// Says that connections are being turned away, at most once a second (a flood of them must
/// not become a flood of log lines).
#[derive(Debug, Default)]
struct Refusals {
    last: Option<Instant>,
    since: u64,
}

impl Refusals {
    fn note(&mut self, uid: u32, full: Full) {
        self.since += 1;
        let now = Instant::now();
        if self.last.is_some_and(|t| now < t + Duration::from_secs(1)) {
            return;
        }
        let why = match full {
            Full::All => "all connection slots are taken",
            Full::Shared => "the slots left are root's reserve",
            Full::Uid => "this uid holds max_connections_per_uid connections",
        };
        info!(
            uid,
            refused = self.since,
            "varlink: connection answered Busy and closed: {why}"
        );
        self.last = Some(now);
        self.since = 0;
    }
}

/// Why a connection ended (for the debug log).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Closed {
    Eof,
    Idle,
    Shutdown,
    TooLarge,
    Io,
    /// The client sent a message while a stream of replies to it was running.
    SentDuringStream,
}

/// One client connection: its requests in order, one at a time.
async fn connection<H: Handler>(
    mut stream: UnixStream,
    peer: Peer,
    handler: Arc<H>,
    limits: VarlinkLimits,
    mut shutdown: watch::Receiver<bool>,
    slot: Slot,
) {
    let caller = peer.caller(Via::Varlink);
    drop(peer);
    debug!(caller = %caller, "varlink: connection accepted");
    let closed = run_connection(&mut stream, &caller, &*handler, limits, &mut shutdown).await;
    // The slot is free before the client can see the close (a client that reconnects on EOF
    // finds it free), and both before the line says so.
    drop(slot);
    drop(stream);
    debug!(caller = %caller, reason = ?closed, "varlink: connection closed");
}

async fn run_connection<H: Handler>(
    stream: &mut UnixStream,
    caller: &Caller,
    handler: &H,
    limits: VarlinkLimits,
    shutdown: &mut watch::Receiver<bool>,
) -> Closed {
    let mut frames = FrameBuf::new(limits.max_frame);
    let mut deadline = Instant::now() + limits.idle_timeout;
    loop {
        // Answer every complete request already buffered, in order.
        loop {
            let call = match frames.next_frame() {
                Next::Incomplete => break,
                Next::TooLarge => {
                    info!(caller = %caller, limit = limits.max_frame,
                        "varlink: request larger than the frame limit; connection closed");
                    let e = ApiError::TooLarge {
                        parameter: "request".into(),
                        limit: limits.max_frame as u64,
                    };
                    let reply = encode_error(&e);
                    // The stream is out of step: the reply is a courtesy, then close.
                    let _ = timeout_at(
                        Instant::now() + limits.idle_timeout,
                        stream.write_all(&reply),
                    )
                    .await;
                    return Closed::TooLarge;
                }
                Next::Frame(range) => parse_frame(frames.frame(range), caller),
            };
            let reply = match call {
                Call::Handler {
                    request,
                    oneway,
                    more,
                } if request.streams() => {
                    if !more || oneway {
                        // A stream nobody reads is not started.
                        (!oneway).then(|| encode_error(&ApiError::ExpectedMore))
                    } else {
                        match handler.watch(caller.clone(), request).await {
                            Err(e) => Some(encode_error(&e)),
                            Ok((first, watch)) => {
                                let first = encode_reply(&first, true, limits.max_frame);
                                match stream_replies(stream, first, watch, caller, limits, shutdown)
                                    .await
                                {
                                    Ok(last) => Some(last),
                                    Err(closed) => return closed,
                                }
                            }
                        }
                    }
                }
                Call::Handler {
                    request, oneway, ..
                } => {
                    let method = request.method();
                    let result = handler.handle(caller.clone(), request).await;
                    if let Err(e) = &result {
                        debug!(caller = %caller, method, error = %e.name(), "varlink: error reply");
                    }
                    (!oneway).then(|| encode_result(&result, limits.max_frame))
                }
                Call::Answer { result, oneway } => {
                    (!oneway).then(|| encode_result(&result, limits.max_frame))
                }
            };
            if let Some(reply) = reply {
                match timeout_at(
                    Instant::now() + limits.idle_timeout,
                    stream.write_all(&reply),
                )
                .await
                {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => return Closed::Io,
                    Err(_) => {
                        info!(caller = %caller, "varlink: client does not take its reply; connection closed");
                        return Closed::Idle;
                    }
                }
            }
            deadline = Instant::now() + limits.idle_timeout;
            if *shutdown.borrow() {
                return Closed::Shutdown;
            }
        }
        let space = frames.space();
        let read = tokio::select! {
            biased;
            () = shutdown_requested(shutdown) => return Closed::Shutdown,
            read = timeout_at(deadline, stream.read(space)) => read,
        };
        match read {
            Ok(Ok(0)) => return Closed::Eof,
            Ok(Ok(n)) => frames.filled(n),
            Ok(Err(_)) => return Closed::Io,
            Err(_) => return Closed::Idle,
        }
    }
}

/// Send `first`, then every change `watch` yields, each with `continues`, until the stream
/// ends: `Ok` with the final reply to send (the watcher fell behind: `WatchOverflow`), or
/// `Err` when the connection is to be closed (the client left or sent something, a reply
/// was not taken within the idle timeout, shutdown).
async fn stream_replies(
    stream: &mut UnixStream,
    first: Zeroizing<Vec<u8>>,
    mut changes: Watch,
    caller: &Caller,
    limits: VarlinkLimits,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<Zeroizing<Vec<u8>>, Closed> {
    let mut reply = first;
    loop {
        match timeout_at(
            Instant::now() + limits.idle_timeout,
            stream.write_all(&reply),
        )
        .await
        {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err(Closed::Io),
            Err(_) => {
                info!(caller = %caller, "varlink: watcher does not take its replies; connection closed");
                return Err(Closed::Idle);
            }
        }
        // The client only listens now: a byte from it is the end (EOF) or out of turn.
        let mut byte = [0u8; 1];
        let next = tokio::select! {
            biased;
            () = shutdown_requested(shutdown) => return Err(Closed::Shutdown),
            read = stream.read(&mut byte) => {
                return Err(match read {
                    Ok(0) => Closed::Eof,
                    Ok(_) => {
                        info!(caller = %caller, "varlink: message sent while a stream runs; connection closed");
                        Closed::SentDuringStream
                    }
                    Err(_) => Closed::Io,
                });
            }
            next = changes.next() => next,
        };
        reply = match next {
            Watched::Change(change) => encode_reply(&change, true, limits.max_frame),
            Watched::Missed(missed) => {
                info!(caller = %caller, missed, "varlink: watcher fell behind; its watch is ended");
                return Ok(encode_error(&ApiError::WatchOverflow { missed }));
            }
            Watched::Closed => return Err(Closed::Shutdown),
        };
    }
}

/// What one frame asks for: the result of [`parse_frame`].
#[derive(Debug)]
pub enum Call {
    /// A call of `org.keyward.Custodian`, for the handler.
    Handler {
        /// The parsed call, parameters checked against their types.
        request: Request,
        /// The client wants no reply.
        oneway: bool,
        /// The client takes a series of replies (`more`): needed by a streaming method,
        /// ignored by any other (answered once).
        more: bool,
    },
    /// Answered by the transport: introspection, or a protocol error.
    Answer {
        /// The reply's parameters, or the error to send.
        result: Result<serde_json::Value, ApiError>,
        /// The client wants no reply.
        oneway: bool,
    },
}

/// The message envelope. Every field stays raw JSON text here so that (a) the parameters,
/// which may hold secrets, are not copied into an intermediate tree, and (b) a field of the
/// wrong type can be named in the error without quoting its value.
#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(borrow, default)]
    method: Option<&'a RawValue>,
    #[serde(borrow, default)]
    parameters: Option<&'a RawValue>,
    #[serde(borrow, default)]
    oneway: Option<&'a RawValue>,
    #[serde(borrow, default)]
    more: Option<&'a RawValue>,
    #[serde(borrow, default)]
    upgrade: Option<&'a RawValue>,
}

fn invalid(parameter: &str) -> ApiError {
    ApiError::InvalidParameter {
        parameter: parameter.into(),
    }
}

fn flag(raw: Option<&RawValue>, name: &str) -> Result<bool, ApiError> {
    match raw {
        None => Ok(false),
        Some(raw) => serde_json::from_str::<Option<bool>>(raw.get())
            .map(Option::unwrap_or_default)
            .map_err(|_| invalid(name)),
    }
}

/// Decode one request frame (the bytes before its NUL) from `caller`: the envelope, its flags,
/// the method and its parameters. Every input gets a [`Call`], never a panic; a frame that is
/// not a valid call becomes the protocol error the client is sent. `caller` is only named in
/// the log. Public so that the fuzz targets drive exactly what a connection runs.
pub fn parse_frame(frame: &[u8], caller: &Caller) -> Call {
    let answer = |result, oneway| Call::Answer { result, oneway };
    // Never log serde's message: it may quote a value.
    let envelope = match std::str::from_utf8(frame)
        .ok()
        .and_then(|text| serde_json::from_str::<Envelope<'_>>(text).ok())
    {
        Some(envelope) => envelope,
        None => {
            info!(caller = %caller, "varlink: malformed message");
            return answer(Err(invalid("method")), false);
        }
    };
    let oneway = match flag(envelope.oneway, "oneway") {
        Ok(oneway) => oneway,
        Err(e) => return answer(Err(e), false),
    };
    let method = match envelope
        .method
        .and_then(|raw| serde_json::from_str::<String>(raw.get()).ok())
    {
        Some(method) => method,
        None => {
            info!(caller = %caller, "varlink: message without a method");
            return answer(Err(invalid("method")), oneway);
        }
    };
    let more = match flag(envelope.more, "more") {
        Ok(more) => more,
        Err(e) => return answer(Err(e), oneway),
    };
    match flag(envelope.upgrade, "upgrade") {
        Ok(false) => {}
        Ok(true) | Err(_) => {
            info!(caller = %caller, method, flag = "upgrade", "varlink: unsupported flag");
            return answer(Err(invalid("upgrade")), oneway);
        }
    }
    let Some((interface, member)) = method.rsplit_once('.') else {
        info!(caller = %caller, "varlink: method name without an interface");
        return answer(Err(invalid("method")), oneway);
    };
    let params = envelope.parameters.map(RawValue::get);
    match interface {
        api::INTERFACE => match Request::parse(member, params) {
            Ok(request) => Call::Handler {
                request,
                oneway,
                more,
            },
            Err(e) => {
                info!(caller = %caller, method, error = %e.name(), "varlink: request refused");
                answer(Err(e), oneway)
            }
        },
        SERVICE_INTERFACE => answer(service_call(member, params), oneway),
        _ => {
            info!(caller = %caller, interface, "varlink: unknown interface");
            answer(
                Err(ApiError::InterfaceNotFound {
                    interface: interface.to_owned(),
                }),
                oneway,
            )
        }
    }
}

/// `org.varlink.service`, answered here.
fn service_call(member: &str, params: Option<&str>) -> Result<serde_json::Value, ApiError> {
    #[derive(Deserialize)]
    struct DescriptionParams {
        interface: String,
    }
    match member {
        "GetInfo" => Ok(serde_json::json!({
            "vendor": "Keyward",
            "product": "keywardd",
            "version": env!("CARGO_PKG_VERSION"),
            "url": "urn:keyward",
            "interfaces": [SERVICE_INTERFACE, api::INTERFACE],
        })),
        "GetInterfaceDescription" => {
            let p: DescriptionParams =
                serde_json::from_str(params.unwrap_or("{}")).map_err(|_| invalid("interface"))?;
            let description = match p.interface.as_str() {
                api::INTERFACE => api::INTERFACE_DESCRIPTION,
                SERVICE_INTERFACE => SERVICE_DESCRIPTION,
                _ => {
                    return Err(ApiError::InterfaceNotFound {
                        interface: p.interface,
                    })
                }
            };
            Ok(serde_json::json!({ "description": description }))
        }
        _ => Err(ApiError::MethodNotFound {
            method: format!("{SERVICE_INTERFACE}.{member}"),
        }),
    }
}

#[derive(Serialize)]
struct OkMessage<'a, T: Serialize> {
    parameters: &'a T,
    /// More replies to this call follow.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    continues: bool,
}

#[derive(Serialize)]
struct ErrorMessage<'a> {
    error: &'a str,
    parameters: &'a serde_json::Value,
}

/// `msg` as a NUL-terminated frame in a zeroizing buffer that never reallocated, or `None` if
/// it is longer than `max` (or can't be serialized).
fn encode_bounded<T: Serialize>(msg: &T, max: usize) -> Option<Zeroizing<Vec<u8>>> {
    keyward_proto::wire::encode_frame(msg, max).ok().flatten()
}

fn encode_error(e: &ApiError) -> Zeroizing<Vec<u8>> {
    let name = e.name();
    let parameters = e.parameters();
    let msg = ErrorMessage {
        error: &name,
        parameters: &parameters,
    };
    // Error messages are small; no bound is needed for them.
    encode_bounded(&msg, usize::MAX).unwrap_or_else(|| {
        let mut out = Zeroizing::new(
            br#"{"error":"org.keyward.Custodian.Internal","parameters":{"reason":"unencodable error"}}"#
                .to_vec(),
        );
        out.push(0);
        out
    })
}

/// The reply frame for `result`: `{"parameters":…}` or `{"error":…,"parameters":…}`, JSON plus
/// its NUL, in a zeroizing buffer. A reply longer than `max` bytes becomes a `TooLarge` error.
pub fn encode_result<T: Serialize>(result: &Result<T, ApiError>, max: usize) -> Zeroizing<Vec<u8>> {
    match result {
        Ok(reply) => encode_reply(reply, false, max),
        Err(e) => encode_error(e),
    }
}

/// The frame of one successful reply, with `"continues": true` if more replies to the call
/// follow. A reply longer than `max` bytes becomes a `TooLarge` error (which ends the call).
fn encode_reply<T: Serialize>(reply: &T, continues: bool, max: usize) -> Zeroizing<Vec<u8>> {
    let message = OkMessage {
        parameters: reply,
        continues,
    };
    encode_bounded(&message, max).unwrap_or_else(|| {
        warn!(limit = max, "varlink: reply larger than the frame limit");
        encode_error(&ApiError::TooLarge {
            parameter: "reply".into(),
            limit: max as u64,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use tokio::sync::{mpsc, Notify};

    use keyward_proto::api::{Done, NamesReply, Reply, VersionReply};
    use serde_json::{json, Value};

    /// Guards every wait so a broken server fails a test instead of hanging it.
    const GUARD: Duration = Duration::from_secs(20);

    /// A stand-in for the service: echoes, fails, or blocks on request.
    #[derive(Default)]
    struct Stub {
        calls: Mutex<Vec<String>>,
        started: Mutex<Option<mpsc::UnboundedSender<()>>>,
        release: Notify,
        /// Where watches listen, once a test set it; until then a watch is refused.
        changes: Mutex<Option<tokio::sync::broadcast::Sender<(String, u64)>>>,
    }

    impl Handler for Stub {
        async fn handle(&self, caller: Caller, request: Request) -> Result<Reply, ApiError> {
            assert_eq!(caller.via, Via::Varlink);
            self.calls.lock().unwrap().push(request.method().to_owned());
            match request {
                Request::ListSecrets(p) => Ok(Reply::ListSecrets(NamesReply {
                    names: vec![p.prefix.unwrap_or_default()],
                })),
                Request::PutSecret(p) => Ok(Reply::PutSecret(VersionReply {
                    version: p.value.expose().len() as u64,
                })),
                Request::GetSecret(p) => Err(ApiError::NotFound {
                    kind: "secret".into(),
                    name: p.name.to_string(),
                }),
                Request::Seal(_) => {
                    let started = self.started.lock().unwrap().clone();
                    if let Some(started) = started {
                        let _ = started.send(());
                    }
                    self.release.notified().await;
                    Ok(Reply::Seal(Done {}))
                }
                // Every other reply here is `{}`.
                _ => Ok(Reply::DeleteKey(Done {})),
            }
        }

        async fn watch(
            &self,
            caller: Caller,
            request: Request,
        ) -> Result<(Reply, Watch), ApiError> {
            let Some(changes) = self
                .changes
                .lock()
                .unwrap()
                .as_ref()
                .map(|tx| tx.subscribe())
            else {
                return Err(ApiError::MethodNotFound {
                    method: request.method().into(),
                });
            };
            self.calls.lock().unwrap().push(request.method().to_owned());
            assert_eq!(caller.via, Via::Varlink);
            let first = Reply::WatchSecrets(keyward_proto::api::SecretChange {
                change: keyward_proto::api::ChangeKind::Watching,
                name: None,
                version: None,
            });
            Ok((
                first,
                Watch::new(changes, |name| !name.starts_with("hidden/")),
            ))
        }
    }

    struct Server {
        _dir: tempfile::TempDir,
        path: std::path::PathBuf,
        stub: Arc<Stub>,
        stop: watch::Sender<bool>,
        task: tokio::task::JoinHandle<()>,
    }

    fn limits() -> VarlinkLimits {
        VarlinkLimits {
            max_frame: 4096,
            max_connections: 8,
            max_connections_per_uid: 8,
            root_reserve: 2,
            idle_timeout: Duration::from_secs(60),
        }
    }

    fn start(limits: VarlinkLimits) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/api.sock");
        let listener = socket::bind(&path, "0600".parse().unwrap()).unwrap();
        let stub = Arc::new(Stub::default());
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(serve(listener, Arc::clone(&stub), limits, stopped));
        Server {
            _dir: dir,
            path,
            stub,
            stop,
            task,
        }
    }

    /// A raw client.
    struct Conn {
        stream: UnixStream,
        pending: Vec<u8>,
    }

    impl Conn {
        async fn open(server: &Server) -> Self {
            Self {
                stream: UnixStream::connect(&server.path).await.unwrap(),
                pending: Vec::new(),
            }
        }

        async fn send(&mut self, text: &str) {
            self.stream.write_all(text.as_bytes()).await.unwrap();
            self.stream.write_all(b"\0").await.unwrap();
        }

        /// The next message, or None once the server closed the connection.
        async fn recv(&mut self) -> Option<Value> {
            tokio::time::timeout(GUARD, self.recv_unguarded())
                .await
                .expect("the server answers or closes")
        }

        async fn recv_unguarded(&mut self) -> Option<Value> {
            loop {
                if let Some(i) = self.pending.iter().position(|&b| b == 0) {
                    let frame: Vec<u8> = self.pending.drain(..=i).collect();
                    return Some(serde_json::from_slice(&frame[..i]).unwrap());
                }
                let mut chunk = [0u8; 4096];
                match self.stream.read(&mut chunk).await {
                    Ok(0) => return None,
                    Ok(n) => self.pending.extend_from_slice(&chunk[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return None,
                    Err(e) => panic!("read: {e}"),
                }
            }
        }

        async fn call(&mut self, text: &str) -> Value {
            self.send(text).await;
            self.recv().await.expect("a reply")
        }
    }

    fn custodian(method: &str, parameters: Value) -> String {
        json!({ "method": format!("org.keyward.Custodian.{method}"), "parameters": parameters })
            .to_string()
    }

    async fn finish(server: Server) {
        server.stop.send(true).unwrap();
        tokio::time::timeout(GUARD, server.task)
            .await
            .expect("serve returns after shutdown")
            .unwrap();
    }

    #[tokio::test]
    async fn a_call_round_trips_and_errors_carry_their_parameters() {
        let server = start(limits());
        let mut c = Conn::open(&server).await;
        let r = c
            .call(&custodian(
                "PutSecret",
                json!({ "name": "a", "value": "aGVsbG8=" }),
            ))
            .await;
        assert_eq!(r, json!({ "parameters": { "version": 5 } }));
        let r = c
            .call(&custodian("GetSecret", json!({ "name": "db" })))
            .await;
        assert_eq!(
            r,
            json!({ "error": "org.keyward.Custodian.NotFound",
                    "parameters": { "kind": "secret", "name": "db" } })
        );
        let r = c.call(r#"{"method":"org.keyward.Custodian.Rotate"}"#).await;
        assert_eq!(r, json!({ "parameters": {} }));
        // Unknown method, unknown interface, a parameter that doesn't fit.
        let r = c.call(&custodian("Frobnicate", json!({}))).await;
        assert_eq!(r["error"], "org.varlink.service.MethodNotFound");
        assert_eq!(
            r["parameters"]["method"],
            "org.keyward.Custodian.Frobnicate"
        );
        let r = c.call(r#"{"method":"com.example.Nope.Call"}"#).await;
        assert_eq!(
            r,
            json!({ "error": "org.varlink.service.InterfaceNotFound",
                    "parameters": { "interface": "com.example.Nope" } })
        );
        let r = c
            .call(&custodian("PutSecret", json!({ "name": "a" })))
            .await;
        assert_eq!(r["parameters"]["parameter"], "value");
        // `upgrade` is not supported; a method that does not stream, called with `more`, is
        // answered once, without `continues` (varlink.org: the server's `more` is optional);
        // one that streams needs `more`.
        let r = c
            .call(r#"{"method":"org.keyward.Custodian.Status","more":true}"#)
            .await;
        assert_eq!(r, json!({ "parameters": {} }));
        let r = c
            .call(r#"{"method":"org.keyward.Custodian.Status","more":"yes"}"#)
            .await;
        assert_eq!(r["parameters"]["parameter"], "more");
        let r = c
            .call(r#"{"method":"org.keyward.Custodian.WatchSecrets"}"#)
            .await;
        assert_eq!(
            r,
            json!({ "error": "org.varlink.service.ExpectedMore", "parameters": {} })
        );
        // The stand-in starts no watch: the call is refused, once.
        let r = c
            .call(r#"{"method":"org.keyward.Custodian.WatchSecrets","more":true}"#)
            .await;
        assert_eq!(r["error"], "org.varlink.service.MethodNotFound");
        assert!(r.get("continues").is_none());
        let r = c
            .call(r#"{"method":"org.keyward.Custodian.Status","upgrade":true}"#)
            .await;
        assert_eq!(r["parameters"]["parameter"], "upgrade");
        let r = c
            .call(r#"{"method":"org.keyward.Custodian.Status","more":false,"oneway":false}"#)
            .await;
        assert_eq!(r, json!({ "parameters": {} }));
        assert_eq!(
            *server.stub.calls.lock().unwrap(),
            ["PutSecret", "GetSecret", "Rotate", "Status", "Status"]
        );
        finish(server).await;
    }

    #[tokio::test]
    async fn introspection() {
        // The interface description alone is over 4 KiB.
        let server = start(VarlinkLimits {
            max_frame: 64 * 1024,
            ..limits()
        });
        let mut c = Conn::open(&server).await;
        let r = c.call(r#"{"method":"org.varlink.service.GetInfo"}"#).await;
        assert_eq!(r["parameters"]["vendor"], "Keyward");
        assert_eq!(r["parameters"]["product"], "keywardd");
        assert_eq!(r["parameters"]["version"], env!("CARGO_PKG_VERSION"));
        assert_eq!(
            r["parameters"]["interfaces"],
            json!(["org.varlink.service", "org.keyward.Custodian"])
        );
        let describe = |interface: &str| {
            json!({ "method": "org.varlink.service.GetInterfaceDescription",
                    "parameters": { "interface": interface } })
            .to_string()
        };
        let r = c.call(&describe("org.keyward.Custodian")).await;
        assert_eq!(r["parameters"]["description"], api::INTERFACE_DESCRIPTION);
        let r = c.call(&describe("org.varlink.service")).await;
        let text = r["parameters"]["description"].as_str().unwrap();
        assert!(text.contains("interface org.varlink.service\n"));
        assert!(text.contains("method GetInterfaceDescription(interface: string)"));
        let r = c.call(&describe("org.example.None")).await;
        assert_eq!(
            r,
            json!({ "error": "org.varlink.service.InterfaceNotFound",
                    "parameters": { "interface": "org.example.None" } })
        );
        let r = c
            .call(r#"{"method":"org.varlink.service.GetInterfaceDescription"}"#)
            .await;
        assert_eq!(r["parameters"]["parameter"], "interface");
        let r = c.call(r#"{"method":"org.varlink.service.Nope"}"#).await;
        assert_eq!(r["error"], "org.varlink.service.MethodNotFound");
        assert!(server.stub.calls.lock().unwrap().is_empty());
        finish(server).await;
    }

    #[tokio::test]
    async fn malformed_messages_get_invalid_parameter_and_the_connection_keeps_working() {
        let server = start(limits());
        let mut c = Conn::open(&server).await;
        for bad in [
            "{not json",
            "[1,2]",
            "",
            r#"{"parameters":{}}"#,
            r#"{"method":7}"#,
            r#"{"method":"NoInterface"}"#,
        ] {
            let r = c.call(bad).await;
            assert_eq!(
                r,
                json!({ "error": "org.varlink.service.InvalidParameter",
                        "parameters": { "parameter": "method" } }),
                "{bad:?}"
            );
        }
        let r = c
            .call(r#"{"method":"org.keyward.Custodian.Status","oneway":"yes"}"#)
            .await;
        assert_eq!(r["parameters"]["parameter"], "oneway");
        // Not UTF-8.
        c.stream.write_all(b"\xff\xfe\0").await.unwrap();
        assert_eq!(
            c.recv().await.unwrap()["error"],
            "org.varlink.service.InvalidParameter"
        );
        let r = c
            .call(&custodian("ListSecrets", json!({ "prefix": "still" })))
            .await;
        assert_eq!(r["parameters"]["names"], json!(["still"]));
        finish(server).await;
    }

    #[tokio::test]
    async fn an_oversized_frame_gets_too_large_and_the_connection_closes() {
        let server = start(limits());
        let mut c = Conn::open(&server).await;
        let mut other = Conn::open(&server).await;
        // One byte over the limit, no NUL: refused without waiting for the rest.
        c.stream.write_all(&vec![b'x'; 4097]).await.unwrap();
        let r = c.recv().await.unwrap();
        assert_eq!(
            r,
            json!({ "error": "org.keyward.Custodian.TooLarge",
                    "parameters": { "parameter": "request", "limit": 4096 } })
        );
        assert!(c.recv().await.is_none(), "closed after TooLarge");
        // Exactly at the limit is fine.
        let mut exact = custodian("ListSecrets", json!({ "prefix": "p" })).into_bytes();
        exact.resize(4096, b' ');
        let exact = String::from_utf8(exact).unwrap();
        let r = other.call(&exact).await;
        assert_eq!(r["parameters"]["names"], json!(["p"]));
        finish(server).await;
    }

    #[tokio::test]
    async fn an_idle_connection_is_closed() {
        let server = start(VarlinkLimits {
            idle_timeout: Duration::from_millis(100),
            ..limits()
        });
        let mut quiet = Conn::open(&server).await;
        let mut partial = Conn::open(&server).await;
        partial
            .stream
            .write_all(br#"{"method":"org.keyward"#)
            .await
            .unwrap();
        assert!(quiet.recv().await.is_none());
        assert!(partial.recv().await.is_none());
        finish(server).await;
    }

    #[tokio::test]
    async fn pipelined_requests_are_answered_in_order() {
        let server = start(limits());
        let mut c = Conn::open(&server).await;
        let mut batch = String::new();
        for i in 0..20 {
            batch.push_str(&custodian(
                "ListSecrets",
                json!({ "prefix": i.to_string() }),
            ));
            batch.push('\0');
        }
        c.stream.write_all(batch.as_bytes()).await.unwrap();
        for i in 0..20 {
            let r = c.recv().await.unwrap();
            assert_eq!(r["parameters"]["names"], json!([i.to_string()]));
        }
        finish(server).await;
    }

    #[tokio::test]
    async fn oneway_calls_run_without_a_reply() {
        let server = start(limits());
        let mut c = Conn::open(&server).await;
        c.send(
            &json!({ "method": "org.keyward.Custodian.ListSecrets",
                     "parameters": { "prefix": "quiet" }, "oneway": true })
            .to_string(),
        )
        .await;
        // A oneway call that fails is not answered either.
        c.send(r#"{"method":"org.keyward.Custodian.Nope","oneway":true}"#)
            .await;
        let r = c
            .call(&custodian("ListSecrets", json!({ "prefix": "loud" })))
            .await;
        assert_eq!(r["parameters"]["names"], json!(["loud"]));
        assert_eq!(
            *server.stub.calls.lock().unwrap(),
            ["ListSecrets", "ListSecrets"]
        );
        finish(server).await;
    }

    #[tokio::test]
    async fn connections_beyond_a_cap_get_busy_at_once_and_are_closed() {
        let server = start(VarlinkLimits {
            max_connections_per_uid: 2,
            ..limits()
        });
        let mut held = Vec::new();
        for i in 0..2 {
            let mut c = Conn::open(&server).await;
            let r = c
                .call(&custodian(
                    "ListSecrets",
                    json!({ "prefix": i.to_string() }),
                ))
                .await;
            assert_eq!(r["parameters"]["names"], json!([i.to_string()]));
            held.push(c);
        }
        // This uid holds its share: the next connection is answered at once, then closed,
        // whether or not it sent anything.
        for send_first in [false, true] {
            let started = Instant::now();
            let mut extra = Conn::open(&server).await;
            if send_first {
                let _ = extra
                    .stream
                    .write_all(custodian("Status", json!({})).as_bytes())
                    .await;
            }
            let r = tokio::time::timeout(Duration::from_secs(1), extra.recv_unguarded())
                .await
                .expect("Busy comes at once");
            assert_eq!(
                r,
                Some(json!({ "error": "org.keyward.Custodian.Busy", "parameters": {} }))
            );
            assert!(extra.recv().await.is_none(), "closed after Busy");
            assert!(started.elapsed() < Duration::from_secs(1));
        }
        // One leaves: the next is served.
        drop(held.pop());
        let mut next = loop {
            let mut c = Conn::open(&server).await;
            c.send(&custodian("ListSecrets", json!({ "prefix": "n" })))
                .await;
            match c.recv().await {
                Some(r) if r["error"] == "org.keyward.Custodian.Busy" => continue,
                Some(r) => {
                    assert_eq!(r["parameters"]["names"], json!(["n"]));
                    break c;
                }
                None => panic!("closed without a reply"),
            }
        };
        let r = next
            .call(&custodian("ListSecrets", json!({ "prefix": "m" })))
            .await;
        assert_eq!(r["parameters"]["names"], json!(["m"]));
        assert_eq!(
            server.stub.calls.lock().unwrap().len(),
            4,
            "Busy never reaches the service"
        );
        finish(server).await;
    }

    #[test]
    fn slots_per_uid_in_all_and_roots_reserve() {
        let slots = Slots::new(VarlinkLimits {
            max_connections: 6,
            max_connections_per_uid: 2,
            root_reserve: 2,
            ..limits()
        });
        let count = |slots: &Arc<Slots>| slots.held().total;
        let a1 = slots.take(1000).unwrap();
        let a2 = slots.take(1000).unwrap();
        assert_eq!(slots.take(1000).unwrap_err(), Full::Uid);
        let _b1 = slots.take(1001).unwrap();
        let _b2 = slots.take(1001).unwrap();
        // Four of six taken: the last two are root's.
        assert_eq!(slots.take(1002).unwrap_err(), Full::Shared);
        let r1 = slots.take(0).unwrap();
        let _r2 = slots.take(0).unwrap();
        assert_eq!(slots.take(0).unwrap_err(), Full::All);
        assert_eq!(count(&slots), 6);
        // Given back on drop, per uid; what a user gives back is for root while the rest of
        // the shared slots are taken.
        drop(a1);
        drop(r1);
        assert_eq!(count(&slots), 4);
        assert_eq!(slots.take(1002).unwrap_err(), Full::Shared);
        let _r3 = slots.take(0).unwrap();
        assert_eq!(
            slots.take(0).unwrap_err(),
            Full::Uid,
            "root too has a per-uid cap"
        );
        assert_eq!(count(&slots), 5);
        assert_eq!(slots.held().per_uid.get(&1000), Some(&1));
        drop(a2);
        assert_eq!(
            slots.held().per_uid.get(&1000),
            None,
            "no entry left for an idle uid"
        );
        // Root is held to the per-uid cap too (a runaway root client can't take all).
        let slots = Slots::new(VarlinkLimits {
            max_connections: 6,
            max_connections_per_uid: 1,
            root_reserve: 2,
            ..limits()
        });
        let _r = slots.take(0).unwrap();
        assert_eq!(slots.take(0).unwrap_err(), Full::Uid);
    }

    #[tokio::test]
    async fn shutdown_drains_the_request_in_flight_then_serve_returns() {
        let server = start(limits());
        let (started_tx, mut started) = mpsc::unbounded_channel();
        *server.stub.started.lock().unwrap() = Some(started_tx);
        let mut idle = Conn::open(&server).await;
        idle.call(&custodian("Status", json!({}))).await;
        let mut busy = Conn::open(&server).await;
        busy.send(r#"{"method":"org.keyward.Custodian.Seal"}"#)
            .await;
        tokio::time::timeout(GUARD, started.recv())
            .await
            .unwrap()
            .unwrap();

        server.stop.send(true).unwrap();
        assert!(idle.recv().await.is_none(), "idle connections are closed");
        assert!(
            !server.task.is_finished(),
            "serve waits for the request in flight"
        );
        server.stub.release.notify_one();
        assert_eq!(busy.recv().await.unwrap(), json!({ "parameters": {} }));
        assert!(busy.recv().await.is_none());
        tokio::time::timeout(GUARD, server.task)
            .await
            .unwrap()
            .unwrap();
        assert!(
            UnixStream::connect(&server.path).await.is_err(),
            "no longer accepting"
        );
    }

    /// A stream: `continues` on every reply, nothing the watch hides, the final
    /// `WatchOverflow` once the watcher fell behind (the queue holds 4 here; the test sends 10
    /// before the server runs again), after which the connection serves calls; a message sent
    /// while a stream runs closes the connection; shutdown ends every stream.
    #[tokio::test]
    async fn streams_carry_continues_end_with_overflow_and_end_at_shutdown() {
        let server = start(limits());
        let (tx, _) = tokio::sync::broadcast::channel(4);
        *server.stub.changes.lock().unwrap() = Some(tx.clone());
        let watch = r#"{"method":"org.keyward.Custodian.WatchSecrets","more":true}"#;
        let mut a = Conn::open(&server).await;
        assert_eq!(
            a.call(watch).await,
            json!({ "parameters": { "change": "watching" }, "continues": true })
        );
        tx.send(("hidden/x".into(), 1)).unwrap();
        tx.send(("db".into(), 2)).unwrap();
        tx.send(("db".into(), 0)).unwrap();
        assert_eq!(
            a.recv().await.unwrap(),
            json!({ "parameters": { "change": "put", "name": "db", "version": 2 },
                    "continues": true })
        );
        assert_eq!(
            a.recv().await.unwrap(),
            json!({ "parameters": { "change": "delete", "name": "db" }, "continues": true })
        );
        for i in 0..10 {
            tx.send((format!("n{i}"), 1)).unwrap();
        }
        assert_eq!(
            a.recv().await.unwrap(),
            json!({ "error": "org.keyward.Custodian.WatchOverflow",
                    "parameters": { "missed": 6 } })
        );
        let r = a
            .call(&custodian("ListSecrets", json!({ "prefix": "p" })))
            .await;
        assert_eq!(r, json!({ "parameters": { "names": ["p"] } }));

        let mut b = Conn::open(&server).await;
        assert_eq!(b.call(watch).await["continues"], true);
        b.send(&custodian("Status", json!({}))).await;
        assert!(
            b.recv().await.is_none(),
            "closed: a stream's client only listens"
        );

        let mut c = Conn::open(&server).await;
        assert_eq!(c.call(watch).await["continues"], true);
        server.stop.send(true).unwrap();
        assert!(c.recv().await.is_none(), "streams end at shutdown");
        assert!(a.recv().await.is_none());
        tokio::time::timeout(GUARD, server.task)
            .await
            .expect("serve returns with streams running")
            .unwrap();
        assert_eq!(
            *server.stub.calls.lock().unwrap(),
            [
                "WatchSecrets",
                "ListSecrets",
                "WatchSecrets",
                "WatchSecrets"
            ]
        );
    }
}

/// Generated streams: frames encoded by the client's encoder come out of [`FrameBuf`] whole and
/// in order however the stream is cut into reads, decode to the calls that were sent, and any
/// bytes at all split exactly as a NUL-split says, within the memory bound, without a panic.
#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::collection::vec;
    use proptest::prelude::*;

    fn caller() -> Caller {
        Caller {
            who: keyward_policy::Identity {
                uid: 1000,
                gid: 1000,
                ..Default::default()
            },
            pid: None,
            via: Via::Varlink,
        }
    }

    /// Feed `stream` to a [`FrameBuf`] in reads of the given sizes (cycled; 0 means 1); collect
    /// the frames until it says `TooLarge`, and check the memory bound after every read.
    fn split(
        stream: &[u8],
        reads: &[usize],
        max_frame: usize,
    ) -> Result<(Vec<Vec<u8>>, bool), TestCaseError> {
        let mut frames = FrameBuf::new(max_frame);
        let mut out = Vec::new();
        let mut at = 0;
        let mut turn = 0;
        loop {
            loop {
                match frames.next_frame() {
                    Next::Frame(range) => out.push(frames.frame(range).to_vec()),
                    Next::TooLarge => return Ok((out, true)),
                    Next::Incomplete => break,
                }
            }
            if at == stream.len() {
                return Ok((out, false));
            }
            let space = frames.space();
            prop_assert!(!space.is_empty());
            let want = reads[turn % reads.len()].max(1);
            turn += 1;
            let n = want.min(space.len()).min(stream.len() - at);
            space[..n].copy_from_slice(&stream[at..at + n]);
            frames.filled(n);
            at += n;
            prop_assert!(frames.capacity() <= max_frame + 1, "{}", frames.capacity());
        }
    }

    /// The reference: split at NUL; the first piece longer than `max_frame` (complete or
    /// not) ends it.
    fn reference(stream: &[u8], max_frame: usize) -> (Vec<Vec<u8>>, bool) {
        let mut out = Vec::new();
        let mut pieces = stream.split(|&b| b == 0).peekable();
        while let Some(piece) = pieces.next() {
            if piece.len() > max_frame {
                return (out, true);
            }
            if pieces.peek().is_some() {
                out.push(piece.to_vec());
            }
        }
        (out, false)
    }

    proptest! {
        #[test]
        fn any_bytes_split_like_the_reference(
            stream in vec(prop_oneof![4 => any::<u8>(), 1 => Just(0u8)], 0..600),
            reads in vec(0usize..40, 1..8),
            max_frame in 0usize..64,
        ) {
            prop_assert_eq!(split(&stream, &reads, max_frame)?, reference(&stream, max_frame));
        }

        #[test]
        fn encoded_calls_decode_to_what_was_sent(
            calls in vec(("[a-z]{1,6}(/[a-z]{1,5}){0,2}", vec(any::<u8>(), 0..64), any::<bool>()), 1..8),
            reads in vec(1usize..200, 1..8),
        ) {
            let mut stream = Vec::new();
            for (name, value, oneway) in &calls {
                let message = serde_json::json!({
                    "method": "org.keyward.Custodian.PutSecret",
                    "parameters": api::PutSecretParams {
                        name: api::SecretName::try_from(name.as_str())
                            .map_err(|e| TestCaseError::fail(e.to_string()))?,
                        value: api::SecretValue::new(value.clone()),
                    },
                    "oneway": oneway,
                });
                let frame = keyward_proto::wire::encode_frame(&message, 4096)
                    .map_err(|e| TestCaseError::fail(e.to_string()))?
                    .ok_or_else(|| TestCaseError::fail("over the bound"))?;
                stream.extend_from_slice(&frame);
            }
            let (frames, too_large) = split(&stream, &reads, 4096)?;
            prop_assert!(!too_large);
            prop_assert_eq!(frames.len(), calls.len());
            for (frame, (name, value, oneway)) in frames.iter().zip(&calls) {
                match parse_frame(frame, &caller()) {
                    Call::Handler { request: Request::PutSecret(p), oneway: o, .. } => {
                        prop_assert_eq!(p.name.as_str(), name.as_str());
                        prop_assert_eq!(p.value.expose(), &value[..]);
                        prop_assert_eq!(o, *oneway);
                    }
                    other => prop_assert!(false, "{:?}", other),
                }
            }
        }

        /// Whatever a frame holds, the transport's own answer is one valid reply frame.
        #[test]
        fn any_frame_gets_a_call_or_a_well_formed_answer(
            frame in prop_oneof![
                vec(any::<u8>(), 0..200),
                "\\{(\"(method|parameters|oneway|more|upgrade|x)\":(\"[a-zA-Z.]{0,30}\"|true|false|null|7|\\{\\}|\\[\\]),?){0,5}\\}"
                    .prop_map(String::into_bytes),
            ],
        ) {
            if let Call::Answer { result, .. } = parse_frame(&frame, &caller()) {
                let reply = encode_result(&result, 4096);
                prop_assert_eq!(reply.iter().position(|&b| b == 0), Some(reply.len() - 1));
                let back: serde_json::Value = serde_json::from_slice(&reply[..reply.len() - 1])
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert!(back.get("parameters").is_some_and(serde_json::Value::is_object));
            }
        }
    }
}
