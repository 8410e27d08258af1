//! A blocking Varlink client of `keywardd` (`org.keyward.Custodian` over a Unix socket).
//!
//! It owns the client side of the wire: NUL-framed JSON messages, the bound on how large a
//! reply it accepts, and the mapping of Varlink errors back to [`ApiError`]. One [`Client`] is
//! one connection at a time; calls on it are sequential. The daemon closes a connection that
//! sits idle (seconds, not minutes); the next call then connects again, before it sends
//! anything, so no call is ever sent twice. Request and reply buffers (which carry secret
//! values, PINs and recovery shares) are zeroizing, allocated at their final size or grown by
//! copying (never by a reallocation that leaves a copy behind), and no error message quotes a
//! value from either.

use std::io::{self, Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use zeroize::Zeroizing;

use keyward_proto::api::{
    self, methods, ApiError, Bytes, ConfirmRecoveryParams, ConfirmRecoveryReply, CreateKeyParams,
    Empty, EnrollParams, EnrollReply, GetSecretParams, GetSecretReply, InitParams, InitReply,
    KeyAlgorithm, KeyInfo, KeyNameParams, Keyslot, ListSecretsParams, Method, PutSecretParams,
    RekeyParams, RekeyReply, RemoveKeyslotParams, SecretNameParams, SecretString, SecretValue,
    SecretVersion, SignHash, SignParams, SlotSpec, StatusReply, UnsealParams, UnsealReply,
};
use keyward_proto::wire::{FrameBuf, Next};

/// Where `keywardd` listens unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/keyward/api.sock";

/// The environment variable that overrides [`DEFAULT_SOCKET`].
pub const SOCKET_ENV: &str = "KEYWARD_SOCKET";

/// Room for the envelope around the largest message the daemon sends.
const REPLY_SLACK: usize = 64 * 1024;

/// Largest reply accepted, NUL excluded.
pub const MAX_REPLY_LEN: usize = api::MAX_FRAME_LEN + REPLY_SLACK;

/// The socket path from `KEYWARD_SOCKET`, or [`DEFAULT_SOCKET`].
pub fn default_socket() -> PathBuf {
    std::env::var_os(SOCKET_ENV)
        .filter(|p| !p.is_empty())
        .map_or_else(|| PathBuf::from(DEFAULT_SOCKET), PathBuf::from)
}

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be reached.
    #[error("cannot connect to {}: {source}: {}", path.display(), connect_hint(source))]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// What `connect` said.
        source: io::Error,
    },
    /// The connection failed or was closed during a call.
    #[error("lost the connection to keywardd: {0}")]
    Io(#[source] io::Error),
    /// The daemon sent something that is not a valid reply.
    #[error("keywardd sent a reply this client does not understand: {0}")]
    Protocol(String),
    /// The daemon refused the call.
    #[error(transparent)]
    Api(#[from] ApiError),
}

fn connect_hint(e: &io::Error) -> &'static str {
    match e.kind() {
        io::ErrorKind::NotFound => {
            "is keywardd running, and is the socket path right (--socket, KEYWARD_SOCKET)?"
        }
        io::ErrorKind::ConnectionRefused => {
            "nothing listens on it: is keywardd running (systemctl status keywardd)?"
        }
        io::ErrorKind::PermissionDenied => {
            "this user may not use the socket: ask for access to it (its group) or use sudo"
        }
        _ => "is keywardd running, and is the socket path right (--socket, KEYWARD_SOCKET)?",
    }
}

/// One connection to `keywardd`.
#[derive(Debug)]
pub struct Client {
    stream: UnixStream,
    /// Where to connect again when the daemon closed an idle connection.
    path: PathBuf,
    /// The timeout given to [`Client::set_timeout`], for a new connection.
    timeout: Option<Duration>,
    /// Bytes received after the last reply's NUL (none, from a well-behaved daemon).
    /// Received bytes not yet handed out as a reply (zeroizing, bounded).
    frames: FrameBuf,
}

#[derive(Serialize)]
struct CallMessage<'a, P: Serialize> {
    method: &'a str,
    parameters: &'a P,
    /// The call takes a series of replies (a streaming method).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    more: bool,
}

/// A reply. `parameters` stays raw JSON text so secret values go straight into their
/// zeroizing types, with no intermediate tree.
#[derive(Deserialize)]
struct ReplyMessage<'a> {
    #[serde(borrow, default)]
    parameters: Option<&'a RawValue>,
    #[serde(default)]
    error: Option<String>,
    /// More replies to the call follow (a streaming call).
    #[serde(default)]
    continues: bool,
}

impl Client {
    /// Connect to the daemon's socket.
    ///
    /// # Errors
    /// [`ClientError::Connect`], with a hint, when the socket can't be reached.
    pub fn connect(path: &Path) -> Result<Self, ClientError> {
        let stream = UnixStream::connect(path).map_err(|source| ClientError::Connect {
            path: path.to_owned(),
            source,
        })?;
        Ok(Self {
            stream,
            path: path.to_owned(),
            timeout: None,
            frames: FrameBuf::new(MAX_REPLY_LEN),
        })
    }

    /// Whether the daemon closed this connection while it was idle: end-of-stream (or a reset)
    /// is waiting, and no reply bytes are. Looked at without blocking and without consuming.
    fn closed_while_idle(&self) -> bool {
        use nix::errno::Errno;
        use nix::sys::socket::{recv, MsgFlags};
        use std::os::fd::AsRawFd as _;
        if self.frames.holds_partial() {
            return false;
        }
        let mut byte = [0u8; 1];
        matches!(
            recv(
                self.stream.as_raw_fd(),
                &mut byte,
                MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
            ),
            Ok(0) | Err(Errno::ECONNRESET)
        )
    }

    /// A new connection in place of one the daemon closed.
    fn reconnect(&mut self) -> Result<(), ClientError> {
        let mut fresh = Self::connect(&self.path)?;
        fresh.set_timeout(self.timeout)?;
        *self = fresh;
        Ok(())
    }

    /// Connect to `KEYWARD_SOCKET`, or [`DEFAULT_SOCKET`].
    ///
    /// # Errors
    /// As [`Client::connect`].
    pub fn connect_default() -> Result<Self, ClientError> {
        Self::connect(&default_socket())
    }

    /// Give up on a call after this long without progress (`None`: wait for ever, the
    /// default).
    ///
    /// # Errors
    /// [`ClientError::Io`] if the socket refuses the option.
    pub fn set_timeout(&mut self, timeout: Option<Duration>) -> Result<(), ClientError> {
        self.timeout = timeout;
        self.stream
            .set_read_timeout(timeout)
            .and_then(|()| self.stream.set_write_timeout(timeout))
            .map_err(ClientError::Io)
    }

    /// Call `method` (its full name, `org.keyward.Custodian.GetSecret`) and decode the reply's
    /// parameters as `R`.
    ///
    /// # Errors
    /// [`ClientError::Api`] when the daemon answers with an error; [`ClientError::Io`] or
    /// [`ClientError::Protocol`] when the exchange itself fails.
    pub fn call<P: Serialize, R: DeserializeOwned>(
        &mut self,
        method: &str,
        params: &P,
    ) -> Result<R, ClientError> {
        if let Err(e) = self.send(method, params, false) {
            // The daemon may have answered and closed before it read the call (`Busy`, when
            // all the connections this user may have are taken): then its answer, still in
            // the receive buffer, says more than the broken pipe does.
            if matches!(e, ClientError::Io(_)) {
                if let Ok(frame) = self.receive() {
                    return decode_reply(&frame, method);
                }
            }
            return Err(e);
        }
        let frame = self.receive()?;
        decode_reply(&frame, method)
    }

    /// Call `method` (its full name) and return the reply's parameters as JSON, for methods
    /// this crate has no type for. The returned tree is not zeroized: use the typed methods
    /// for anything that returns a secret.
    ///
    /// # Errors
    /// As [`Client::call`].
    pub fn call_raw(
        &mut self,
        method: &str,
        params: &impl Serialize,
    ) -> Result<serde_json::Value, ClientError> {
        self.call(method, params)
    }

    /// Call any method of `org.keyward.Custodian` by its type in the method table
    /// (`client.request::<methods::SecretVersions>(&params)`): the typed methods below are
    /// this, with friendlier arguments.
    ///
    /// # Errors
    /// As [`Client::call`].
    pub fn request<M: Method>(&mut self, params: &M::Params) -> Result<M::Reply, ClientError> {
        self.call(&format!("{}.{}", api::INTERFACE, M::NAME), params)
    }

    /// Call a streaming method of the table (`M::STREAMS`, such as `WatchSecrets`) with
    /// `more`: its replies come one by one from the [`Replies`] iterator, until the daemon
    /// ends the call. The connection carries nothing else meanwhile; drop the [`Replies`] and the
    /// [`Client`] to stop (the daemon sees the connection close). Set a timeout of `None`
    /// ([`Client::set_timeout`]) to wait for replies however long they take.
    ///
    /// # Errors
    /// As [`Client::call`], for the sending of the call; each reply may fail as well.
    pub fn stream<M: Method>(&mut self, params: &M::Params) -> Result<Replies<'_, M>, ClientError> {
        let method = format!("{}.{}", api::INTERFACE, M::NAME);
        if let Err(e) = self.send(&method, params, true) {
            // As in `call`: an answer already sent (`Busy`) says more than the broken pipe.
            if matches!(e, ClientError::Io(_)) {
                if let Ok(frame) = self.receive() {
                    return Err(decode_message::<serde::de::IgnoredAny>(&frame, &method)
                        .err()
                        .unwrap_or(e));
                }
            }
            return Err(e);
        }
        Ok(Replies {
            client: self,
            method,
            done: false,
            _method: std::marker::PhantomData,
        })
    }

    fn send<P: Serialize>(
        &mut self,
        method: &str,
        params: &P,
        more: bool,
    ) -> Result<(), ClientError> {
        if self.closed_while_idle() {
            self.reconnect()?;
        }
        let message = CallMessage {
            method,
            parameters: params,
            more,
        };
        let frame = keyward_proto::wire::encode_frame(&message, api::MAX_FRAME_LEN)
            .map_err(|e| {
                ClientError::Protocol(format!(
                    "cannot encode a call of {method}: {}",
                    e.classify_str()
                ))
            })?
            .ok_or_else(|| {
                ClientError::Api(ApiError::TooLarge {
                    parameter: "request".into(),
                    limit: api::MAX_FRAME_LEN as u64,
                })
            })?;
        self.stream.write_all(&frame).map_err(ClientError::Io)
    }

    /// The next NUL-terminated message, NUL excluded.
    fn receive(&mut self) -> Result<Zeroizing<Vec<u8>>, ClientError> {
        loop {
            match self.frames.next_frame() {
                Next::Frame(range) => {
                    return Ok(self.frames.take(range));
                }
                Next::TooLarge => {
                    // Out of step for good: drop what was buffered (the connection is useless).
                    self.frames = FrameBuf::new(MAX_REPLY_LEN);
                    return Err(ClientError::Protocol(format!(
                        "a reply longer than {MAX_REPLY_LEN} bytes"
                    )));
                }
                Next::Incomplete => {}
            }
            let partial = self.frames.holds_partial();
            let space = self.frames.space();
            let n = loop {
                match self.stream.read(space) {
                    Ok(n) => break n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(ClientError::Io(e)),
                }
            };
            if n == 0 {
                return Err(if partial {
                    ClientError::Protocol("the connection closed in the middle of a reply".into())
                } else {
                    ClientError::Io(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "keywardd closed the connection",
                    ))
                });
            }
            self.frames.filled(n);
        }
    }

    /// `Status()`: the vault's state, its keyslots and devices.
    ///
    /// # Errors
    /// As [`Client::call`].
    pub fn status(&mut self) -> Result<StatusReply, ClientError> {
        self.request::<methods::Status>(&Empty {})
    }

    /// `Init(slots)`: create the vault with these keyslots. Recovery shares come back once.
    ///
    /// # Errors
    /// As [`Client::call`].
    pub fn init(&mut self, slots: Vec<SlotSpec>) -> Result<InitReply, ClientError> {
        self.request::<methods::Init>(&InitParams { slots })
    }

    /// `Enroll(slot)`: add a keyslot.
    ///
    /// # Errors
    /// As [`Client::call`].
    pub fn enroll(&mut self, slot: SlotSpec) -> Result<EnrollReply, ClientError> {
        self.request::<methods::Enroll>(&EnrollParams { slot })
    }

    /// `ListKeyslots()`.
    ///
    /// # Errors
    /// As [`Client::call`].
    pub fn list_keyslots(&mut self) -> Result<Vec<Keyslot>, ClientError> {
        self.request::<methods::ListKeyslots>(&Empty {})
            .map(|r| r.keyslots)
    }

    /// `RemoveKeyslot(id, force)`.
    ///
    /// # Errors
    /// As [`Client::call`]; [`ApiError::LastKeyslot`] without `force` for the last way in.
    pub fn remove_keyslot(&mut self, id: u32, force: bool) -> Result<(), ClientError> {
        let params = RemoveKeyslotParams {
            id,
            force: force.then_some(true),
        };
        self.request::<methods::RemoveKeyslot>(&params).map(drop)
    }

    /// `Rekey(pin)`: a new master key. Recovery slots get new shares, returned once.
    ///
    /// # Errors
    /// As [`Client::call`].
    pub fn rekey(&mut self, pin: Option<SecretString>) -> Result<RekeyReply, ClientError> {
        self.request::<methods::Rekey>(&RekeyParams { pin })
    }

    /// `ConfirmRecovery(recovery_shares)`: prove the new shares reached a person; a pending
    /// rekey takes effect.
    ///
    /// # Errors
    /// As [`Client::call`].
    pub fn confirm_recovery(
        &mut self,
        recovery_shares: Vec<SecretString>,
    ) -> Result<ConfirmRecoveryReply, ClientError> {
        self.request::<methods::ConfirmRecovery>(&ConfirmRecoveryParams { recovery_shares })
    }

    /// `Rotate()`: a new data-key term; returns it.
    ///
    /// # Errors
    /// As [`Client::call`].
    pub fn rotate(&mut self) -> Result<u32, ClientError> {
        self.request::<methods::Rotate>(&Empty {}).map(|r| r.term)
    }

    /// `Seal()`: the daemon forgets the master key.
    ///
    /// # Errors
    /// As [`Client::call`].
    pub fn seal(&mut self) -> Result<(), ClientError> {
        self.request::<methods::Seal>(&Empty {}).map(drop)
    }

    /// `Unseal(recovery_share, pin)`: one share, or a PIN.
    ///
    /// # Errors
    /// As [`Client::call`].
    pub fn unseal(&mut self, params: UnsealParams) -> Result<UnsealReply, ClientError> {
        self.request::<methods::Unseal>(&params)
    }

    /// `PutSecret(name, value)`: returns the new version.
    ///
    /// # Errors
    /// As [`Client::call`].
    pub fn put_secret(&mut self, name: &str, value: &[u8]) -> Result<u64, ClientError> {
        let params = PutSecretParams {
            name: checked(name)?,
            value: SecretValue::new(value.to_vec()),
        };
        self.request::<methods::PutSecret>(&params)
            .map(|r| r.version)
    }

    /// `GetSecret(name, version)`: the latest version, or the one asked for.
    ///
    /// # Errors
    /// As [`Client::call`].
    pub fn get_secret(
        &mut self,
        name: &str,
        version: Option<u64>,
    ) -> Result<GetSecretReply, ClientError> {
        let params = GetSecretParams {
            name: checked(name)?,
            version,
        };
        self.request::<methods::GetSecret>(&params)
    }

    /// `ListSecrets(prefix)`.
    ///
    /// # Errors
    /// As [`Client::call`].
    pub fn list_secrets(&mut self, prefix: Option<&str>) -> Result<Vec<String>, ClientError> {
        let params = ListSecretsParams {
            prefix: prefix.map(str::to_owned),
        };
        self.request::<methods::ListSecrets>(&params)
            .map(|r| r.names)
    }

    /// `SecretVersions(name)`.
    ///
    /// # Errors
    /// As [`Client::call`].
    pub fn secret_versions(&mut self, name: &str) -> Result<Vec<SecretVersion>, ClientError> {
        let params = SecretNameParams {
            name: checked(name)?,
        };
        self.request::<methods::SecretVersions>(&params)
            .map(|r| r.versions)
    }

    /// `DeleteSecret(name)`.
    ///
    /// # Errors
    /// As [`Client::call`].
    pub fn delete_secret(&mut self, name: &str) -> Result<(), ClientError> {
        let params = SecretNameParams {
            name: checked(name)?,
        };
        self.request::<methods::DeleteSecret>(&params).map(drop)
    }

    /// `CreateKey(name, device, algorithm)`: returns the public key (DER SPKI).
    ///
    /// # Errors
    /// As [`Client::call`].
    pub fn create_key(
        &mut self,
        name: &str,
        device: &str,
        algorithm: KeyAlgorithm,
    ) -> Result<Vec<u8>, ClientError> {
        let params = CreateKeyParams {
            name: checked(name)?,
            device: device.to_owned(),
            algorithm,
        };
        self.request::<methods::CreateKey>(&params)
            .map(|r| r.public_key.0)
    }

    /// `ListKeys()`.
    ///
    /// # Errors
    /// As [`Client::call`].
    pub fn list_keys(&mut self) -> Result<Vec<KeyInfo>, ClientError> {
        self.request::<methods::ListKeys>(&Empty {}).map(|r| r.keys)
    }

    /// `PublicKey(name)`: DER SubjectPublicKeyInfo.
    ///
    /// # Errors
    /// As [`Client::call`].
    pub fn public_key(&mut self, name: &str) -> Result<Vec<u8>, ClientError> {
        let params = KeyNameParams {
            name: checked(name)?,
        };
        self.request::<methods::PublicKey>(&params)
            .map(|r| r.public_key.0)
    }

    /// `Sign(name, data, prehashed)`: the signature (Ed25519 raw, ECDSA DER, RSA raw), over
    /// SHA-256. With `prehashed`, `data` is a SHA-256 digest.
    ///
    /// # Errors
    /// As [`Client::call`].
    pub fn sign(
        &mut self,
        name: &str,
        data: &[u8],
        prehashed: bool,
    ) -> Result<Vec<u8>, ClientError> {
        self.sign_with(name, data, prehashed, None)
    }

    /// `Sign(name, data, prehashed, hash)`: as [`Client::sign`], over `hash` (SHA-512 is for
    /// rsa-pkcs1 keys); with `prehashed`, `data` is a digest of that hash.
    ///
    /// # Errors
    /// As [`Client::call`].
    pub fn sign_with(
        &mut self,
        name: &str,
        data: &[u8],
        prehashed: bool,
        hash: Option<SignHash>,
    ) -> Result<Vec<u8>, ClientError> {
        let params = SignParams {
            name: checked(name)?,
            data: Bytes(data.to_vec()),
            prehashed: prehashed.then_some(true),
            hash,
        };
        self.request::<methods::Sign>(&params)
            .map(|r| r.signature.0)
    }

    /// `DeleteKey(name)`: destroys the key in its device.
    ///
    /// # Errors
    /// As [`Client::call`].
    pub fn delete_key(&mut self, name: &str) -> Result<(), ClientError> {
        let params = KeyNameParams {
            name: checked(name)?,
        };
        self.request::<methods::DeleteKey>(&params).map(drop)
    }
}

/// A name checked here, before anything is sent: a bad one is the same `InvalidArgument` the
/// daemon would answer, without the round trip.
fn checked<N: for<'a> TryFrom<&'a str, Error = keyward_proto::Invalid>>(
    name: &str,
) -> Result<N, ClientError> {
    N::try_from(name).map_err(|e| ClientError::Api(e.into()))
}

trait ClassifyStr {
    fn classify_str(&self) -> &'static str;
}

impl ClassifyStr for serde_json::Error {
    fn classify_str(&self) -> &'static str {
        match self.classify() {
            serde_json::error::Category::Io => "I/O error",
            serde_json::error::Category::Syntax => "malformed JSON",
            serde_json::error::Category::Data => "unexpected content",
            serde_json::error::Category::Eof => "truncated JSON",
        }
    }
}

/// Describe a decoding error without quoting the input (it may hold a secret): the category,
/// the position, and a field name when serde names one.
fn describe(method: &str, e: &serde_json::Error) -> String {
    let message = e.to_string();
    let field = ["missing field `", "unknown field `"]
        .iter()
        .find_map(|marker| {
            let rest = message.split(marker).nth(1)?;
            let name = rest.split('`').next()?;
            Some(format!(" ({}field `{name}`)", &marker[..marker.len() - 7]))
        })
        .unwrap_or_default();
    format!(
        "reply to {method}: {}{field} at line {} column {}",
        e.classify_str(),
        e.line(),
        e.column()
    )
}

/// Decode one reply frame: the error it carries, or its parameters as `R`.
/// The replies of a streaming call ([`Client::stream`]).
#[derive(Debug)]
pub struct Replies<'a, M: Method> {
    client: &'a mut Client,
    method: String,
    /// The last reply (one without `continues`, or an error) has been handed out.
    done: bool,
    _method: std::marker::PhantomData<M>,
}

/// Each reply (waiting for it), until the call has ended. An error ends the call:
/// [`ClientError::Api`] when the daemon ends it with an error (`WatchOverflow`, for a watcher
/// that fell behind), [`ClientError::Io`] when the connection is lost (the daemon stopped),
/// [`ClientError::Protocol`] for a reply this client does not understand.
impl<M: Method> Iterator for Replies<'_, M> {
    type Item = Result<M::Reply, ClientError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let decoded = self
            .client
            .receive()
            .and_then(|frame| decode_message::<M::Reply>(&frame, &self.method));
        Some(match decoded {
            Ok((reply, continues)) => {
                self.done = !continues;
                Ok(reply)
            }
            Err(e) => {
                self.done = true;
                Err(e)
            }
        })
    }
}

fn decode_reply<R: DeserializeOwned>(frame: &[u8], method: &str) -> Result<R, ClientError> {
    decode_message(frame, method).map(|(reply, _)| reply)
}

/// A reply's parameters as `R`, and whether more replies to the call follow.
fn decode_message<R: DeserializeOwned>(
    frame: &[u8],
    method: &str,
) -> Result<(R, bool), ClientError> {
    let text = std::str::from_utf8(frame)
        .map_err(|_| ClientError::Protocol(format!("reply to {method}: not UTF-8")))?;
    let reply: ReplyMessage<'_> =
        serde_json::from_str(text).map_err(|e| ClientError::Protocol(describe(method, &e)))?;
    if let Some(name) = reply.error {
        let parameters = reply
            .parameters
            .and_then(|raw| serde_json::from_str(raw.get()).ok())
            .unwrap_or_else(|| serde_json::json!({}));
        return Err(ClientError::Api(ApiError::from_wire(&name, &parameters)));
    }
    let raw = reply.parameters.map_or("{}", RawValue::get);
    serde_json::from_str(raw)
        .map(|r| (r, reply.continues))
        .map_err(|e| ClientError::Protocol(describe(method, &e)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::de::IgnoredAny;
    use std::os::unix::net::UnixListener;

    /// A fake daemon on one connection: answers each request with the next canned reply.
    fn fake(
        replies: Vec<Vec<u8>>,
    ) -> (
        tempfile::TempDir,
        PathBuf,
        std::thread::JoinHandle<Vec<String>>,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut requests = Vec::new();
            for reply in replies {
                let mut req = Vec::new();
                let mut byte = [0u8; 1];
                loop {
                    if s.read(&mut byte).unwrap() == 0 {
                        return requests;
                    }
                    if byte[0] == 0 {
                        break;
                    }
                    req.push(byte[0]);
                }
                requests.push(String::from_utf8(req).unwrap());
                s.write_all(&reply).unwrap();
            }
            requests
        });
        (dir, path, server)
    }

    #[test]
    fn typed_calls_frame_requests_and_decode_replies() {
        let (_dir, path, server) = fake(vec![
            b"{\"parameters\":{\"version\":3}}\0".to_vec(),
            b"{\"parameters\":{\"value\":\"aGVsbG8=\",\"version\":3}}\0".to_vec(),
            b"{\"error\":\"org.keyward.Custodian.Sealed\",\"parameters\":{\"reason\":\"no slot\"}}\0"
                .to_vec(),
            b"{\"parameters\":{}}\0".to_vec(),
        ]);
        let mut c = Client::connect(&path).unwrap();
        assert_eq!(c.put_secret("db", b"hello").unwrap(), 3);
        let got = c.get_secret("db", Some(3)).unwrap();
        assert_eq!(got.value.expose(), b"hello");
        match c.list_secrets(None) {
            Err(ClientError::Api(ApiError::Sealed { reason })) => assert_eq!(reason, "no slot"),
            other => panic!("{other:?}"),
        }
        c.delete_key("k").unwrap();
        let requests = server.join().unwrap();
        assert_eq!(
            requests,
            [
                r#"{"method":"org.keyward.Custodian.PutSecret","parameters":{"name":"db","value":"aGVsbG8="}}"#,
                r#"{"method":"org.keyward.Custodian.GetSecret","parameters":{"name":"db","version":3}}"#,
                r#"{"method":"org.keyward.Custodian.ListSecrets","parameters":{}}"#,
                r#"{"method":"org.keyward.Custodian.DeleteKey","parameters":{"name":"k"}}"#,
            ]
        );
    }

    #[test]
    fn bad_replies_are_protocol_errors_that_quote_nothing() {
        let (_dir, path, _server) = fake(vec![
            b"{\"parameters\":{\"value\":\"c2VjcmV0\",\"version\":\"x\"}}\0".to_vec(),
            b"not json\0".to_vec(),
        ]);
        let mut c = Client::connect(&path).unwrap();
        let e = c.get_secret("db", None).unwrap_err();
        assert!(matches!(e, ClientError::Protocol(_)), "{e:?}");
        assert!(!e.to_string().contains("c2VjcmV0"), "{e}");
        assert!(matches!(c.status(), Err(ClientError::Protocol(_))));
    }

    #[test]
    fn a_closed_connection_is_an_io_error_and_a_missing_socket_a_connect_error() {
        let (_dir, path, _server) = fake(vec![]);
        let mut c = Client::connect(&path).unwrap();
        assert!(matches!(c.status(), Err(ClientError::Io(_))));
        let e = Client::connect(Path::new("/nonexistent/keyward.sock")).unwrap_err();
        assert!(matches!(e, ClientError::Connect { .. }));
        assert!(e.to_string().contains("is keywardd running"), "{e}");
    }

    #[test]
    fn a_connection_the_daemon_closed_while_idle_is_made_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let (idle_closed, closed) = std::sync::mpsc::channel();
        let server = std::thread::spawn(move || {
            // The first connection is closed unused, as an idle one is.
            drop(listener.accept().unwrap());
            idle_closed.send(()).unwrap();
            let (mut s, _) = listener.accept().unwrap();
            let mut request = Vec::new();
            let mut byte = [0u8; 1];
            while s.read(&mut byte).unwrap() == 1 && byte[0] != 0 {
                request.push(byte[0]);
            }
            s.write_all(b"{\"parameters\":{\"version\":7}}\0").unwrap();
            String::from_utf8(request).unwrap()
        });
        let mut c = Client::connect(&path).unwrap();
        c.set_timeout(Some(Duration::from_secs(20))).unwrap();
        closed.recv().unwrap();
        assert_eq!(c.put_secret("db", b"x").unwrap(), 7);
        assert!(
            server.join().unwrap().contains("PutSecret"),
            "sent once, on the new one"
        );
        assert_eq!(c.timeout, Some(Duration::from_secs(20)));
    }

    #[test]
    fn an_answer_before_the_call_is_read_is_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            s.write_all(b"{\"error\":\"org.keyward.Custodian.Busy\",\"parameters\":{}}\0")
                .unwrap();
        });
        let mut c = Client::connect(&path).unwrap();
        // Answered and closed before the call is even written: the write fails, the answer
        // is still there to read.
        server.join().unwrap();
        match c.status() {
            Err(ClientError::Api(ApiError::Busy)) => {}
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_endless_reply_is_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let chunk = vec![b' '; 64 * 1024];
            // Until the client hangs up.
            while s.write_all(&chunk).is_ok() {}
        });
        let mut c = Client::connect(&path).unwrap();
        match c.status() {
            Err(ClientError::Protocol(m)) => assert!(m.contains("longer than"), "{m}"),
            other => panic!("{other:?}"),
        }
        assert!(!c.frames.holds_partial());
        drop(c);
        server.join().unwrap();
    }

    #[test]
    fn errors_decode_to_their_api_variants() {
        let e = decode_reply::<IgnoredAny>(
            br#"{"error":"org.varlink.service.InvalidParameter","parameters":{"parameter":"name"}}"#,
            "m",
        )
        .unwrap_err();
        assert!(matches!(
            e,
            ClientError::Api(ApiError::InvalidParameter { parameter }) if parameter == "name"
        ));
        let e = decode_reply::<IgnoredAny>(br#"{"error":"com.example.Odd"}"#, "m").unwrap_err();
        assert!(matches!(e, ClientError::Api(ApiError::Other { .. })));
        assert!(decode_reply::<IgnoredAny>(br#"{"parameters":{}}"#, "m").is_ok());
        assert!(decode_reply::<IgnoredAny>(b"{}", "m").is_ok());
    }
}
