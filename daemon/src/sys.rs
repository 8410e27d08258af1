//! The process-level protections and the systemd plumbing: the only module allowed `unsafe`
//! (turning inherited socket-activation descriptors into listeners), each use saying why.
//!
//! - core dumps off (`RLIMIT_CORE=0`) and the process non-dumpable (`PR_SET_DUMPABLE=0`, which
//!   also keeps other same-uid processes from ptrace-attaching or reading `/proc/PID/mem`);
//! - umask 077, so nothing the daemon creates is readable by others;
//! - `sd_notify`: `READY=1`, `STATUS=`, `STOPPING=1` (no-ops without `NOTIFY_SOCKET`).
#![allow(unsafe_code)]

use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use nix::sys::resource::{setrlimit, Resource};
use nix::sys::stat::{umask, Mode};

/// Harden the process. Call first thing in `main`, before any secret exists.
///
/// # Errors
/// A protection that could not be applied: the daemon must not run without it.
pub fn harden() -> Result<(), String> {
    umask(Mode::from_bits_truncate(0o077));
    setrlimit(Resource::RLIMIT_CORE, 0, 0).map_err(|e| format!("RLIMIT_CORE=0: {e}"))?;
    nix::sys::prctl::set_dumpable(false).map_err(|e| format!("PR_SET_DUMPABLE=0: {e}"))?;
    Ok(())
}

/// Make sure `dir` exists, belongs to us and is closed to group and others.
///
/// # Errors
/// The directory can't be created, or is open to others (its contents would be exposed).
pub fn private_dir(dir: &Path) -> Result<(), String> {
    if !dir.exists() {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| format!("cannot chmod {}: {e}", dir.display()))?;
    }
    let meta = std::fs::metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    if !meta.is_dir() {
        return Err(format!("{} is not a directory", dir.display()));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "state directory {} has mode {mode:04o}: it must be closed to group and others \
             (chmod 700)",
            dir.display()
        ));
    }
    Ok(())
}

/// Tell systemd something (`READY=1`, `STATUS=…`); a no-op when not run by systemd.
pub fn notify(states: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::warn!(error = %e, "sd_notify failed");
    }
}

/// The listening Unix sockets systemd passed (socket activation), by their
/// `FileDescriptorName=` (`api`, `credentials`). Empty when not socket-activated.
///
/// # Errors
/// `LISTEN_FDS` is set but a descriptor is unusable.
pub fn activated_listeners(
) -> std::io::Result<std::collections::HashMap<String, std::os::unix::net::UnixListener>> {
    let mut out = std::collections::HashMap::new();
    for (fd, name) in sd_notify::listen_fds_with_names(true)? {
        let listener = listener_from_fd(fd)?;
        if out.insert(name.clone(), listener).is_some() {
            tracing::warn!(name = %name, "two activated sockets share a name; using the last");
        }
    }
    Ok(out)
}

fn listener_from_fd(fd: RawFd) -> std::io::Result<std::os::unix::net::UnixListener> {
    // SAFETY: `sd_notify::listen_fds` checked LISTEN_PID is us and yields each inherited
    // descriptor (3..3+LISTEN_FDS) exactly once; nothing else in the process owns it, so this
    // takes sole ownership.
    let listener = unsafe { std::os::unix::net::UnixListener::from_raw_fd(fd) };
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Whether this process is non-dumpable (for tests and `Status`).
pub fn is_dumpable() -> bool {
    nix::sys::prctl::get_dumpable().unwrap_or(true)
}
