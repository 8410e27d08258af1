//! Test fixtures that run **real** devices: a SoftHSM token in its own temp dir
//! ([`softhsm::SoftHsm`]), an swtpm process on its own port pair ([`swtpm::Swtpm`]), a private
//! `dbus-daemon` ([`dbus::PrivateBus`]), a real OpenBao server ([`bao::Bao`]), an OpenSSH server
//! ([`sshd::Sshd`]), and helpers that check results with independent tools
//! ([`openssl`]), and unified kernel images signed by `systemd-measure` ([`uki`]). Nothing
//! here mocks a device.
//!
//! Fixtures panic on setup failure: a test that cannot build its world has nothing to assert.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod bao;
pub mod cgroup;
pub mod credentials;
pub mod dbus;
pub mod keywardd;
pub mod openssl;
pub mod softhsm;
pub mod sshd;
pub mod swtpm;
pub mod uki;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// True when `program` runs (`--version` or `-v` exits), so a fixture can say which package is
/// missing instead of failing with ENOENT.
pub fn have_program(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// `program` run as `uid` (and gid `uid`, no supplementary groups) through `setpriv`
/// (util-linux): for tests that call as an unprivileged user.
pub fn as_uid(uid: u32, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = Command::new("setpriv");
    c.arg(format!("--reuid={uid}"))
        .arg(format!("--regid={uid}"))
        .args(["--clear-groups", "--"])
        .arg(program);
    c
}

/// Run a command to completion, panicking with its output when it fails.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed with {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The workspace root (for `softhsm-config/` and friends).
pub fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or(Path::new("."))
}

/// Whole seconds since the epoch on the wall clock, as the daemon counts its deadlines.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Block until the wall clock reaches `unix_secs` (at most a minute ahead): for a contract
/// whose event *is* the clock, such as a confirmation window that lapses. Nothing else
/// announces such an event; the wait ends at the second the contract names, not after a guess.
///
/// # Panics
/// When `unix_secs` is more than a minute away (a test asking for that is wrong).
pub fn wait_for_clock(unix_secs: u64) {
    let target = UNIX_EPOCH + Duration::from_secs(unix_secs);
    let left = target.duration_since(SystemTime::now()).unwrap_or_default();
    assert!(
        left <= Duration::from_secs(60),
        "waiting {left:?} for the clock"
    );
    // Nobody sends: the receive ends at the deadline, re-checked against the wall clock.
    let (_never, rx) = std::sync::mpsc::channel::<()>();
    while let Ok(left) = target.duration_since(SystemTime::now()) {
        if left.is_zero() {
            break;
        }
        let _ = rx.recv_timeout(left);
    }
}
