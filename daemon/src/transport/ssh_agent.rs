//! The ssh-agent socket (RFC 9987): `ssh`, `ssh-add`, `ssh-keygen -Y sign` and git sign with
//! device keys through `SSH_AUTH_SOCK`, under the same policy and audit as every other caller.
//!
//! It owns the agent's framing and bounds (a message over [`ssh::MAX_MESSAGE`] gets `FAILURE`
//! and the connection is closed: the stream is out of step; a connection slot per client, an
//! idle time) and the translation of the two messages it serves into the service's own
//! requests: `REQUEST_IDENTITIES` is `ListKeys` then `PublicKey` for each key SSH can use, so
//! a caller sees exactly the keys the policy lets it sign with; `SIGN_REQUEST` is `Sign`, so
//! each signature is checked and audited like any other. Every other message, and every
//! refusal, is answered `FAILURE` on a connection that stays open.
//!
//! It must not: reach the vault, the store or a device other than through the [`Handler`];
//! log the data it is asked to sign; or offer a key SSH can't verify (RSA-PSS).

use std::sync::Arc;
use std::time::Duration;

use keyward_proto::api::{self, ApiError, KeyName, Reply, Request};
use keyward_proto::kinds::KeyAlgorithm;
use keyward_proto::ssh::{self, AgentRequest, Identity, SignRequest};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{watch, Semaphore};
use tokio::time::timeout;
use tracing::{debug, info, warn};

use super::socket::{self, shutdown_requested};
use super::Handler;
use crate::identity::{Caller, Via};

/// Bounds for the ssh-agent socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SshAgentLimits {
    /// Connections served at once; one more is closed at once.
    pub max_connections: usize,
    /// A connection that sends no complete message for this long is closed (ssh opens one
    /// per session and keeps it while it authenticates); so is one that does not take its
    /// reply in this time.
    pub idle_timeout: Duration,
}

/// Serve the ssh-agent socket until `shutdown` turns true; the message in hand on each
/// connection is answered before it closes.
pub async fn serve<H: Handler>(
    listener: UnixListener,
    handler: Arc<H>,
    limits: SshAgentLimits,
    shutdown: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let stop = shutdown.clone();
    socket::accept_loop("ssh-agent", listener, shutdown, |stream, peer| {
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            // ssh goes on without an agent; nobody waits in the backlog for a slot.
            info!(
                uid = peer.uid,
                "ssh-agent: every connection slot is taken; closed"
            );
            return None;
        };
        let handler = handler.clone();
        let mut stop = stop.clone();
        Some(async move {
            let mut agent = Agent {
                caller: peer.caller(Via::SshAgent),
                handler,
                keys: Vec::new(),
            };
            drop(peer);
            let closed = agent.run(stream, limits, &mut stop).await;
            drop(slot);
            debug!(caller = %agent.caller, reason = closed, "ssh-agent: connection closed");
        })
    })
    .await;
}

/// A key as this connection listed it: its name and algorithm for `Sign`, its public key
/// blob to recognise it in a `SIGN_REQUEST`.
#[derive(Clone, Debug)]
struct AgentKey {
    name: KeyName,
    algorithm: KeyAlgorithm,
    identity: Identity,
    blob: Vec<u8>,
}

/// One connection: its caller, and the keys it was last shown.
struct Agent<H> {
    caller: Caller,
    handler: Arc<H>,
    keys: Vec<AgentKey>,
}

impl<H: Handler> Agent<H> {
    /// Messages in order, one at a time, until EOF, idle time, an oversized message or
    /// shutdown; returns why it ended.
    async fn run(
        &mut self,
        mut stream: UnixStream,
        limits: SshAgentLimits,
        shutdown: &mut watch::Receiver<bool>,
    ) -> &'static str {
        loop {
            let mut header = [0u8; 4];
            let read = tokio::select! {
                biased;
                () = shutdown_requested(shutdown) => return "shutdown",
                read = timeout(limits.idle_timeout, stream.read_exact(&mut header)) => read,
            };
            match read {
                Ok(Ok(_)) => {}
                Ok(Err(_)) => return "eof",
                Err(_) => return "idle",
            }
            let Some(len) = ssh::message_len(header) else {
                info!(caller = %self.caller, limit = ssh::MAX_MESSAGE,
                    "ssh-agent: message over the size limit; FAILURE and closed");
                // The stream is out of step: the answer is a courtesy, then close.
                let _ = timeout(limits.idle_timeout, stream.write_all(&ssh::failure())).await;
                return "too large";
            };
            let mut message = vec![0u8; len];
            match timeout(limits.idle_timeout, stream.read_exact(&mut message)).await {
                Ok(Ok(_)) => {}
                Ok(Err(_)) => return "eof",
                Err(_) => return "idle",
            }
            let reply = self.answer(&message).await;
            match timeout(limits.idle_timeout, stream.write_all(&reply)).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return "eof",
                Err(_) => return "idle",
            }
            if *shutdown.borrow() {
                return "shutdown";
            }
        }
    }

    /// The framed reply to one message.
    async fn answer(&mut self, message: &[u8]) -> Vec<u8> {
        let reply = match ssh::parse_request(message) {
            Ok(AgentRequest::Identities) => self.identities().await,
            Ok(AgentRequest::Sign(request)) => self.sign(request).await,
            Ok(AgentRequest::Unsupported(kind)) => {
                debug!(caller = %self.caller, kind, "ssh-agent: message type not served");
                return ssh::failure();
            }
            Err(e) => {
                info!(caller = %self.caller, error = %e, "ssh-agent: malformed message");
                return ssh::failure();
            }
        };
        reply.unwrap_or_else(|why| {
            info!(caller = %self.caller, "ssh-agent: FAILURE: {why}");
            ssh::failure()
        })
    }

    async fn identities(&mut self) -> Result<Vec<u8>, String> {
        self.refresh().await?;
        let identities: Vec<Identity> = self.keys.iter().map(|k| k.identity.clone()).collect();
        ssh::identities_answer(&identities).map_err(|e| e.to_string())
    }

    async fn sign(&mut self, request: SignRequest) -> Result<Vec<u8>, String> {
        // A client may sign with a key it knows without listing first on this connection.
        if !self.keys.iter().any(|k| k.blob == request.key_blob) {
            self.refresh().await?;
        }
        let key = self
            .keys
            .iter()
            .find(|k| k.blob == request.key_blob)
            .cloned()
            .ok_or("sign request for a key this caller may not use (or none of ours)")?;
        let hash = ssh::sign_hash(key.algorithm, request.flags)
            .map_err(|e| format!("key {}: {e}", key.name.as_str()))?;
        let reply = self
            .call(Request::Sign(api::SignParams {
                name: key.name.clone(),
                data: api::Bytes(request.data),
                prehashed: None,
                hash,
            }))
            .await
            .map_err(|e| format!("Sign {}: {e}", key.name.as_str()))?;
        let Reply::Sign(reply) = reply else {
            return Err("Sign answered with another reply".into());
        };
        let signature = ssh::signature(key.algorithm, hash, &reply.signature.0)
            .map_err(|e| format!("key {}: {e}", key.name.as_str()))?;
        ssh::sign_response(&signature).map_err(|e| e.to_string())
    }

    /// The keys this caller may sign with, as SSH keys: `ListKeys`, then `PublicKey` of each
    /// that SSH can use (which the policy refuses unless the caller may sign with it).
    async fn refresh(&mut self) -> Result<(), String> {
        let Reply::ListKeys(list) = self
            .call(Request::ListKeys(api::Empty {}))
            .await
            .map_err(|e| format!("ListKeys: {e}"))?
        else {
            return Err("ListKeys answered with another reply".into());
        };
        let mut keys = Vec::new();
        for info in list.keys {
            if !ssh::usable(info.algorithm) {
                continue;
            }
            let Ok(name) = KeyName::try_from(info.name) else {
                continue;
            };
            let public = match self
                .call(Request::PublicKey(api::KeyNameParams {
                    name: name.clone(),
                }))
                .await
            {
                Ok(Reply::PublicKey(public)) => public.public_key.0,
                // Listed for managing, not for signing: not offered.
                Ok(_) | Err(ApiError::PermissionDenied { .. }) => continue,
                Err(e) => {
                    debug!(key = name.as_str(), error = %e, "ssh-agent: key not offered");
                    continue;
                }
            };
            let key = match ssh::public_key(info.algorithm, &public) {
                Ok(key) => key,
                Err(e) => {
                    warn!(key = name.as_str(), error = %e, "ssh-agent: key not offered");
                    continue;
                }
            };
            let Ok(blob) = ssh::key_blob(&key) else {
                continue;
            };
            keys.push(AgentKey {
                identity: Identity {
                    key,
                    comment: name.as_str().to_owned(),
                },
                name,
                algorithm: info.algorithm,
                blob,
            });
        }
        self.keys = keys;
        Ok(())
    }

    async fn call(&self, request: Request) -> Result<Reply, ApiError> {
        self.handler.handle(self.caller.clone(), request).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Guards every wait so a broken server fails a test instead of hanging it.
    const GUARD: Duration = Duration::from_secs(20);

    /// A service with no keys.
    struct Empty;

    impl Handler for Empty {
        async fn handle(&self, caller: Caller, request: Request) -> Result<Reply, ApiError> {
            assert_eq!(caller.via, Via::SshAgent);
            match request {
                Request::ListKeys(_) => Ok(Reply::ListKeys(api::KeysReply { keys: Vec::new() })),
                _ => Err(ApiError::Busy),
            }
        }
    }

    async fn exchange(stream: &mut UnixStream, body: &[u8]) -> Option<Vec<u8>> {
        stream.write_all(&ssh::framed(body)).await.ok()?;
        let read = async {
            let mut header = [0u8; 4];
            stream.read_exact(&mut header).await.ok()?;
            let mut reply = vec![0u8; u32::from_be_bytes(header) as usize];
            stream.read_exact(&mut reply).await.ok()?;
            Some(reply)
        };
        tokio::time::timeout(GUARD, read).await.unwrap()
    }

    async fn closed(stream: &mut UnixStream) -> bool {
        let mut byte = [0u8; 1];
        matches!(
            tokio::time::timeout(GUARD, stream.read(&mut byte))
                .await
                .unwrap(),
            Ok(0) | Err(_)
        )
    }

    /// The agent on a fresh socket with `limits`; stop it with the sender.
    fn start(
        limits: SshAgentLimits,
    ) -> (
        tempfile::TempDir,
        std::path::PathBuf,
        watch::Sender<bool>,
        tokio::task::JoinHandle<()>,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ssh-agent.sock");
        let listener = socket::bind(&path, "0600".parse().unwrap()).unwrap();
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(serve(listener, Arc::new(Empty), limits, stopped));
        (dir, path, stop, task)
    }

    #[tokio::test]
    async fn a_connection_beyond_the_bound_is_closed_at_once() {
        // Idle time far beyond the guard: a close within the guard is the bound's doing.
        let (_dir, path, stop, task) = start(SshAgentLimits {
            max_connections: 1,
            idle_timeout: Duration::from_secs(600),
        });
        let mut first = UnixStream::connect(&path).await.unwrap();
        assert_eq!(
            exchange(&mut first, &[ssh::REQUEST_IDENTITIES])
                .await
                .unwrap(),
            [ssh::IDENTITIES_ANSWER, 0, 0, 0, 0]
        );
        let mut second = UnixStream::connect(&path).await.unwrap();
        assert!(closed(&mut second).await, "over the bound: closed");
        // The first is still served.
        assert_eq!(
            exchange(&mut first, &[ssh::SIGN_REQUEST]).await.unwrap(),
            [ssh::FAILURE],
            "a malformed request: FAILURE, and the connection stays"
        );
        assert_eq!(
            exchange(&mut first, &[ssh::REQUEST_IDENTITIES])
                .await
                .unwrap()[0],
            ssh::IDENTITIES_ANSWER
        );
        stop.send(true).unwrap();
        tokio::time::timeout(GUARD, task).await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn an_idle_connection_is_closed() {
        let (_dir, path, stop, task) = start(SshAgentLimits {
            max_connections: 4,
            idle_timeout: Duration::from_millis(200),
        });
        let mut idle = UnixStream::connect(&path).await.unwrap();
        assert!(closed(&mut idle).await, "idle: closed");
        stop.send(true).unwrap();
        tokio::time::timeout(GUARD, task).await.unwrap().unwrap();
    }
}
