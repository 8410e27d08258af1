//! Test fixtures that run **real** devices: a SoftHSM token in its own temp dir
//! ([`softhsm::SoftHsm`]), an swtpm process on its own port pair ([`swtpm::Swtpm`]), a private
//! `dbus-daemon` ([`dbus::PrivateBus`]), and helpers that check results with independent tools
//! ([`openssl`]). Nothing here mocks a device.
//!
//! Fixtures panic on setup failure: a test that cannot build its world has nothing to assert.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod cgroup;
pub mod credentials;
pub mod dbus;
pub mod keywardd;
pub mod openssl;
pub mod softhsm;
pub mod swtpm;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

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

/// Re-run `probe` (each attempt a real request) until it returns `Some`, backing off between
/// attempts; panics after `deadline` with `what`.
pub fn wait_for<T>(what: &str, deadline: Duration, mut probe: impl FnMut() -> Option<T>) -> T {
    let until = Instant::now() + deadline;
    let mut backoff = Duration::from_millis(10);
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(Instant::now() < until, "timed out waiting for {what}");
        // A pause between probes so the loop does not spin; the probe decides, not the time.
        std::thread::park_timeout(backoff);
        backoff = (backoff * 2).min(Duration::from_millis(250));
    }
}
