//! systemd's `LoadCredential=ID:/run/keyward/credentials.sock`: when systemd starts a unit, it
//! connects from an abstract address `\0<random hex>/unit/<unit name>/<credential id>`, shuts
//! down its write side and reads to EOF. We answer with the secret the policy maps to
//! (unit, id), or close without a byte: systemd has no "not found" reply.
//!
//! Any process can bind an abstract address, so the unit name is trusted only when the peer is
//! uid 0 (PID 1 runs as root). A request that arrives while the vault is still being unsealed at
//! boot waits for it, bounded. Every refusal is logged with its reason; values never are.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt as _;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{watch, Semaphore};

use super::{socket, Handler};
use crate::identity::{Peer, Via};

/// Bounds for the credential socket.
#[derive(Clone, Copy, Debug)]
pub struct CredentialLimits {
    /// How long a request may wait for the vault to be unsealed.
    pub wait_unsealed: Duration,
    /// Requests served at once (a boot starts hundreds of units together; more wait in the
    /// backlog).
    pub max_connections: usize,
    /// How long writing the value may take.
    pub write_timeout: Duration,
}

/// What systemd's peer address says: the unit and the credential id it asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CredentialRequest {
    /// The unit being started (`postgresql.service`).
    pub unit: String,
    /// The credential id from `LoadCredential=ID:…`.
    pub id: String,
}

/// Parse an abstract peer address (without its leading NUL): `<hex>/unit/<unit>/<id>`.
/// Anything else is not systemd and gets nothing.
pub fn parse_peer(name: &[u8]) -> Option<CredentialRequest> {
    let text = std::str::from_utf8(name).ok()?;
    let mut parts = text.splitn(4, '/');
    let (nonce, kind, unit, id) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let nonce_ok =
        !nonce.is_empty() && nonce.len() <= 64 && nonce.bytes().all(|b| b.is_ascii_hexdigit());
    let unit_ok = crate::identity::is_unit_name(unit);
    // A credential id is a file name in $CREDENTIALS_DIRECTORY.
    let id_ok = !id.is_empty()
        && id.len() <= 255
        && id != "."
        && id != ".."
        && !id.bytes().any(|b| b == b'/' || b.is_ascii_control());
    (nonce_ok && kind == "unit" && unit_ok && id_ok).then(|| CredentialRequest {
        unit: unit.into(),
        id: id.into(),
    })
}

/// Serve the credential socket until `shutdown` turns true, then finish the requests in hand.
///
/// Only root's connections are served (PID 1's); anyone else's is closed at once, before it
/// holds a slot. Root's wait for one of `max_connections` slots: a boot starts hundreds of units
/// together, and systemd has no retry for a credential that was refused.
pub async fn serve<H: Handler>(
    listener: UnixListener,
    handler: Arc<H>,
    limits: CredentialLimits,
    shutdown: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    socket::accept_loop("credentials", listener, shutdown, |stream, peer| {
        if peer.uid != 0 {
            // Anyone can bind `\0…/unit/postgresql.service/db-pass`; only PID 1 is believed.
            tracing::warn!(
                uid = peer.uid,
                pid = ?peer.pid,
                "credential request from a non-root peer: refused"
            );
            return None;
        }
        let handler = handler.clone();
        let slots = slots.clone();
        Some(async move {
            let Ok(_slot) = slots.acquire_owned().await else {
                return;
            };
            serve_one(stream, peer, handler.as_ref(), limits).await;
        })
    })
    .await;
}

async fn serve_one<H: Handler>(
    mut stream: UnixStream,
    peer: Peer,
    handler: &H,
    limits: CredentialLimits,
) {
    let addr = stream.peer_addr().ok();
    let name = addr
        .as_ref()
        .and_then(|a| a.as_abstract_name())
        .map(<[u8]>::to_vec);
    let request = name.as_deref().and_then(parse_peer);
    let Some(request) = request else {
        tracing::warn!(
            pid = ?peer.pid,
            "credential request from an address that is not systemd's: refused"
        );
        return;
    };
    // The unit is the one systemd named in its address (its own cgroup is PID 1's), believed
    // because the peer is root; the rest of the identity is read like any caller's.
    let mut caller = peer.caller(Via::Credentials);
    caller.who.unit = Some(request.unit.clone());
    match handler
        .credential(caller, request.id.clone(), limits.wait_unsealed)
        .await
    {
        Ok(value) => {
            let write = async {
                stream.write_all(value.expose()).await?;
                stream.shutdown().await
            };
            match tokio::time::timeout(limits.write_timeout, write).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(unit = %request.unit, id = %request.id, error = %e, "credential write failed")
                }
                Err(_) => {
                    tracing::warn!(unit = %request.unit, id = %request.id, "credential write timed out")
                }
            }
        }
        Err(e) => {
            tracing::warn!(unit = %request.unit, id = %request.id, error = %e, "credential refused: closing without data");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn systemd_addresses_parse() {
        let r = parse_peer(b"8e2f1c0a9b7d6e5f/unit/postgresql.service/db-pass").unwrap();
        assert_eq!(
            r,
            CredentialRequest {
                unit: "postgresql.service".into(),
                id: "db-pass".into()
            }
        );
        let r = parse_peer(b"ab/unit/getty@tty1.service/x.y").unwrap();
        assert_eq!(r.unit, "getty@tty1.service");
        for bad in [
            &b""[..],
            b"/unit/a.service/id",
            b"xyz/unit/a.service/id",
            b"ab/user/a.service/id",
            b"ab/unit/a.service/",
            b"ab/unit/a.service/a/b",
            b"ab/unit/noservice/id",
            b"ab/unit/a.service/..",
            b"ab/unit/a b.service/id",
            b"ab/unit/a.service/id\n",
            b"ab/unit/a.service",
            b"\xff/unit/a.service/id",
        ] {
            assert_eq!(parse_peer(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }
}

/// Generated addresses: every address systemd can produce parses to its unit and id, and no
/// input panics or yields a credential id that could leave `$CREDENTIALS_DIRECTORY`.
#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    /// A unit name as systemd writes them: a name (with an optional `@instance`) and a type.
    fn unit() -> impl Strategy<Value = String> {
        (
            "[a-zA-Z0-9:_.\\-]{1,60}",
            proptest::option::of("[a-zA-Z0-9:_.\\-]{1,40}"),
            proptest::sample::select(vec!["service", "socket", "mount", "timer", "scope"]),
        )
            .prop_map(|(name, instance, kind)| match instance {
                Some(instance) => format!("{name}@{instance}.{kind}"),
                None => format!("{name}.{kind}"),
            })
    }

    /// A credential id: a file name (any printable character but `/`).
    fn id() -> impl Strategy<Value = String> {
        "[^/\\p{Cc}]{1,60}".prop_filter("not . or ..", |id| id != "." && id != "..")
    }

    fn nonce() -> impl Strategy<Value = String> {
        "[0-9a-f]{1,64}"
    }

    proptest! {
        #[test]
        fn format_then_parse_is_the_identity(nonce in nonce(), unit in unit(), id in id()) {
            let address = format!("{nonce}/unit/{unit}/{id}");
            prop_assert_eq!(
                parse_peer(address.as_bytes()),
                Some(CredentialRequest { unit, id })
            );
        }

        #[test]
        fn arbitrary_bytes_never_panic(name in proptest::collection::vec(any::<u8>(), 0..300)) {
            check_accepted(&name)?;
        }

        /// Near misses of the real shape: each part mangled on its own.
        #[test]
        fn near_misses_never_panic_and_what_parses_is_safe(
            nonce in "[0-9a-fA-Fxz]{0,66}",
            kind in "unit|uni|units|user|",
            unit in "[a-z.@\\ /\n-]{0,12}",
            id in "[a-z./\x00\n-]{0,6}",
        ) {
            check_accepted(format!("{nonce}/{kind}/{unit}/{id}").as_bytes())?;
        }
    }

    /// What an accepted address must satisfy: it says which unit and id, and the id is a
    /// plain file name.
    fn check_accepted(name: &[u8]) -> Result<(), TestCaseError> {
        if let Some(r) = parse_peer(name) {
            let text = std::str::from_utf8(name).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let tail = format!("/unit/{}/{}", r.unit, r.id);
            prop_assert!(text.ends_with(&tail));
            prop_assert!(!r.id.is_empty() && r.id != "." && r.id != "..");
            prop_assert!(!r.id.contains('/') && !r.id.chars().any(|c| c.is_ascii_control()));
            prop_assert!(r.unit.contains('.') && !r.unit.contains('/'));
        }
        Ok(())
    }
}
