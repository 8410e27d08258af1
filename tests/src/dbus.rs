//! A private D-Bus message bus: a real `dbus-daemon` in a temp dir of its own, configured like
//! the system bus (EXTERNAL authentication, default-deny method calls) with Keyward's shipped
//! bus policy (`systemd/dbus-1/system.d/org.keyward.Custodian1.conf`) included, so tests meet
//! the policy that ships. On top of it root may own `org.keyward.Custodian1` (tests run the
//! daemon as root, not as `keyward`).
//!
//! Any user may connect (the socket is world-connectable in a world-traversable directory), so
//! tests can call as another uid and meet keywardd's own policy. Readiness is the address line
//! `dbus-daemon --print-address` writes once it listens; the process is killed on drop.

use std::io::{BufRead as _, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// The shipped bus policy.
pub fn shipped_policy() -> PathBuf {
    crate::workspace_root().join("systemd/dbus-1/system.d/org.keyward.Custodian1.conf")
}

/// A running `dbus-daemon` on a Unix socket of its own.
#[derive(Debug)]
pub struct PrivateBus {
    dir: tempfile::TempDir,
    address: String,
    child: Child,
}

impl PrivateBus {
    /// Start the bus and wait until it listens: the shipped policy, plus root may own
    /// `org.keyward.Custodian1`.
    pub fn start() -> Self {
        Self::launch(true)
    }

    /// Start the bus with the shipped policy alone: only user `keyward` may own the name.
    pub fn start_shipped_policy_only() -> Self {
        Self::launch(false)
    }

    fn launch(root_may_own: bool) -> Self {
        assert!(
            crate::have_program("dbus-daemon"),
            "dbus-daemon is not installed (package dbus)"
        );
        let dir = tempfile::Builder::new()
            .prefix("keyward-bus-")
            .tempdir()
            .expect("tempdir");
        // Other users reach the socket through this directory.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        let socket = dir.path().join("bus");
        let policy = shipped_policy();
        assert!(policy.is_file(), "{} is missing", policy.display());
        let config = format!(
            r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <!-- Like the system bus: anyone may connect; nobody owns names or calls methods unless a
         rule allows it; replies, signals and the bus driver's own interfaces are open. -->
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Properties"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Peer"/>
  </policy>
  <include>{policy}</include>
{root}</busconfig>
"#,
            socket = socket.display(),
            policy = policy.display(),
            root = if root_may_own {
                "  <!-- Tests run keywardd as root, not as keyward. -->\n  <policy user=\"root\">\n    <allow own=\"org.keyward.Custodian1\"/>\n  </policy>\n"
            } else {
                ""
            },
        );
        let config_path = dir.path().join("bus.conf");
        std::fs::write(&config_path, config).expect("bus config");
        let mut child = Command::new("dbus-daemon")
            .arg(format!("--config-file={}", config_path.display()))
            .args(["--print-address", "--nofork", "--nopidfile"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(dir.path().join("dbus-daemon.log")).expect("log file"))
            .spawn()
            .expect("spawn dbus-daemon");
        // The address line comes once the socket listens; EOF means it died.
        let mut line = String::new();
        let stdout = child.stdout.take().expect("stdout");
        let n = BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read dbus-daemon's address");
        let log =
            || std::fs::read_to_string(dir.path().join("dbus-daemon.log")).unwrap_or_default();
        if n == 0 {
            let _ = child.kill();
            let _ = child.wait();
            panic!("dbus-daemon exited before listening; log:\n{}", log());
        }
        let address = line.trim().to_owned();
        assert!(
            address.starts_with("unix:path="),
            "unexpected address {address:?}; log:\n{}",
            log()
        );
        // dbus-daemon creates the socket under our umask; connecting needs write permission.
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666))
            .expect("chmod socket");
        Self {
            dir,
            address,
            child,
        }
    }

    /// The bus address (`unix:path=…,guid=…`), for `busctl --address=` and keywardd's config.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// The temp dir holding the socket, config and log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// What dbus-daemon logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("dbus-daemon.log")).unwrap_or_default()
    }

    /// A `busctl` command aimed at this bus.
    pub fn busctl(&self) -> Command {
        let mut c = Command::new("busctl");
        c.arg(format!("--address={}", self.address));
        c
    }

    /// Whether `name` has an owner on this bus now.
    pub fn has_owner(&self, name: &str) -> bool {
        let out = crate::run(self.busctl().args([
            "call",
            "org.freedesktop.DBus",
            "/org/freedesktop/DBus",
            "org.freedesktop.DBus",
            "NameHasOwner",
            "s",
            name,
        ]));
        out.trim() == "b true"
    }
}

impl Drop for PrivateBus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
