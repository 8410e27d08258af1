//! The Unix sockets keywardd listens on itself (the Varlink API socket, systemd's credential
//! socket): binding one safely, and the one accept loop both run.
//!
//! The loop owns what every socket transport needs and must get right once: stop accepting on
//! shutdown, back off (not spin, not flood the log) when `accept` fails, read the peer's
//! identity from the kernel before anything else ([`Peer::of_socket`]; no identity, no
//! connection), keep the connection tasks in one set, log any that panicked, and drain them
//! before returning. What a connection may do, and whether it is admitted at all, is the
//! transport's decision, made in the `admit` callback; this module never reads a byte from a
//! client.

use std::future::Future;
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use crate::config::SocketMode;
use crate::identity::Peer;

/// How long to pause after a failed `accept` (out of descriptors or memory, typically).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Bind a stream socket at `path` with permissions `mode`, creating its directory (0750) if
/// missing.
///
/// A stale socket file (nobody listening) is replaced; a live one is not.
///
/// # Errors
/// The directory can't be created; `path` exists and is not a socket (it is never removed);
/// another process is listening on `path` (`AddrInUse`); binding or `chmod` fails; or there is
/// no Tokio runtime.
pub fn bind(path: &Path, mode: SocketMode) -> io::Result<UnixListener> {
    if let Some(parent) = path.parent() {
        if !parent.as_os_str().is_empty() && !parent.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o750)
                .create(parent)?;
        }
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!(
                        "{}: another process is listening on this socket",
                        path.display()
                    ),
                ));
            }
            std::fs::remove_file(path)?;
        }
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "{} exists and is not a socket: refusing to replace it",
                    path.display()
                ),
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    if tokio::runtime::Handle::try_current().is_err() {
        return Err(io::Error::other(
            "a socket must be bound inside a Tokio runtime",
        ));
    }
    let listener = std::os::unix::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode.bits()))?;
    listener.set_nonblocking(true)?;
    UnixListener::from_std(listener)
}

/// Accept connections on `listener` until `shutdown` becomes true (or its sender is dropped),
/// then stop accepting, wait for the connection tasks to finish, and return.
///
/// Each connection is handed, with its kernel-verified [`Peer`], to `admit`, which returns the
/// task that serves it, or `None` when it has already answered or dropped it. `admit` runs on
/// the accept loop: it must not wait on the client. `transport` names the socket in the log.
pub async fn accept_loop<A, F>(
    transport: &'static str,
    listener: UnixListener,
    mut shutdown: watch::Receiver<bool>,
    mut admit: A,
) where
    A: FnMut(UnixStream, Peer) -> Option<F>,
    F: Future<Output = ()> + Send + 'static,
{
    let mut connections = JoinSet::new();
    loop {
        while let Some(done) = connections.try_join_next() {
            log_join(transport, done);
        }
        let stream = tokio::select! {
            biased;
            () = shutdown_requested(&mut shutdown) => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    warn!(transport, error = %e, "accept failed");
                    tokio::select! {
                        () = shutdown_requested(&mut shutdown) => break,
                        () = tokio::time::sleep(ACCEPT_BACKOFF) => continue,
                    }
                }
            },
        };
        // Identity from the kernel, once per connection; without it the connection is closed.
        let peer = match Peer::of_socket(&stream) {
            Ok(peer) => peer,
            Err(e) => {
                info!(transport, error = %e, "no peer credentials; connection closed");
                continue;
            }
        };
        if let Some(task) = admit(stream, peer) {
            connections.spawn(task);
        }
    }
    drop(listener);
    debug!(
        transport,
        connections = connections.len(),
        "no longer accepting; draining"
    );
    while let Some(done) = connections.join_next().await {
        log_join(transport, done);
    }
    debug!(transport, "drained");
}

/// A connection task that panicked is a bug worth a line; one that was cancelled is not.
fn log_join(transport: &'static str, done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done {
        warn!(transport, error = %e, "a connection task failed");
    }
}

/// Resolves once a shutdown is requested. A dropped sender counts as one: nobody is left who
/// could ask for it.
pub async fn shutdown_requested(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bind_prepares_the_directory_and_replaces_only_a_stale_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/keyward/api.sock");
        let (rw_group, owner_only): (SocketMode, SocketMode) =
            ("0660".parse().unwrap(), "0600".parse().unwrap());
        let listener = bind(&path, rw_group).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(&path), 0o660);
        assert_eq!(mode(path.parent().unwrap()) & 0o027, 0, "no world access");
        // In use: refused.
        let e = bind(&path, owner_only).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse);
        // Stale: replaced.
        drop(listener);
        let _listener = bind(&path, owner_only).unwrap();
        assert_eq!(mode(&path), 0o600);
        // Not a socket: left alone.
        let file = dir.path().join("file");
        std::fs::write(&file, b"keep").unwrap();
        assert_eq!(
            bind(&file, owner_only).unwrap_err().kind(),
            io::ErrorKind::AlreadyExists
        );
        assert_eq!(std::fs::read(&file).unwrap(), b"keep");
    }
}
