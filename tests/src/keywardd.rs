//! A real `keywardd` process on real devices, in a temp dir of its own: config, state
//! directory, API socket, policy, and a `NOTIFY_SOCKET` the fixture listens on, so that start-up
//! waits on `READY=1` and never on time (and, when asked, what the daemon says after it:
//! [`Keywardd::wait_notify`]). The daemon writes its log (stderr) straight into a file, so that
//! what a call logged is there when the call returns; a test that waits for a line
//! ([`Keywardd::wait_log`]) is woken by inotify each time the file grows, never on a timer.
//!
//! The binaries are the workspace's own (`keywardd`, `keyward`), found next to the test binary's
//! directory: `scripts/test` builds them first.

use std::fmt::Write as _;
use std::io::Read as _;
use std::os::fd::AsFd as _;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};

use crate::softhsm::SoftHsm;
use crate::swtpm::{Gate, Swtpm};

/// How long start-up may take before the fixture gives up (a debug build on a loaded 2-core
/// machine, devices included).
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Path of a workspace binary built next to the running test, example or tool.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test> and target/<profile>/examples/<example> -> target/<profile>;
    // a workspace binary (the benchmark) already lives in target/<profile>.
    let parent = exe.parent().expect("target dir");
    let dir = if parent.ends_with("deps") || parent.ends_with("examples") {
        parent.parent().expect("target dir")
    } else {
        parent
    };
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} not built: run `cargo build --workspace --bins` first (scripts/test does)",
        path.display()
    );
    path
}

/// The policy most tests use: root may do everything.
pub const ROOT_ADMIN_POLICY: &str = r#"
[[rule]]
who = { uid = 0 }
allow = ["admin", "read", "write", "sign", "keys"]
secrets = ["*"]
keys = ["*"]
"#;

/// What to start a daemon with.
#[derive(Debug, Default)]
pub struct Setup {
    devices: String,
    unseal_order: Option<Vec<String>>,
    policy: Option<String>,
    public_socket: bool,
    credentials_wait: Option<u64>,
    ssh_agent: bool,
    transit: bool,
    log_filter: Option<String>,
    limits: Option<String>,
    keep_notify: bool,
    watchdog_usec: Option<u64>,
}

impl Setup {
    /// A daemon with no devices yet and the root-admin policy.
    pub fn new() -> Self {
        Self {
            policy: Some(ROOT_ADMIN_POLICY.into()),
            ..Self::default()
        }
    }

    /// Add the TPM `swtpm` as device `name`.
    pub fn tpm(self, name: &str, swtpm: &Swtpm) -> Self {
        self.tpm_at(name, &swtpm.tcti())
    }

    /// Add the TPM `swtpm` as device `name` with more keys of its table (`pcr_signature =
    /// "…"` lines).
    pub fn tpm_with(self, name: &str, swtpm: &Swtpm, keys: &str) -> Self {
        let mut s = self.tpm_at(name, &swtpm.tcti());
        let _ = writeln!(s.devices, "{keys}");
        s
    }

    /// Add the TPM behind `gate` as device `name`: its commands can be held on their way in.
    pub fn gated_tpm(self, name: &str, gate: &Gate) -> Self {
        self.tpm_at(name, &gate.tcti())
    }

    fn tpm_at(mut self, name: &str, tcti: &str) -> Self {
        let _ = write!(
            self.devices,
            "\n[devices.{name}]\nkind = \"tpm2\"\ntcti = \"{tcti}\"\n"
        );
        self
    }

    /// Add the SoftHSM token as device `name` (PIN from its PIN file).
    pub fn token(mut self, name: &str, token: &SoftHsm) -> Self {
        let _ = write!(
            self.devices,
            "\n[devices.{name}]\nkind = \"pkcs11\"\nmodule = \"{}\"\ntoken = \"pkcs11:token={}\"\npin_file = \"{}\"\nsofthsm_conf = \"{}\"\n",
            hsm_shim::pkcs11::SOFTHSM_MODULE,
            token.label(),
            token.pin_file().display(),
            token.conf().display()
        );
        self
    }

    /// Serve D-Bus on the bus at `address` (a [`crate::dbus::PrivateBus`]): a `[dbus]` table,
    /// appended after the device tables.
    pub fn dbus_address(self, address: &str) -> Self {
        self.dbus_table(address, "")
    }

    /// [`Setup::dbus_address`] with more keys of the `[dbus]` table (`max_calls_in_flight = 1`
    /// lines).
    pub fn dbus_table(mut self, address: &str, keys: &str) -> Self {
        let _ = write!(self.devices, "\n[dbus]\naddress = {address:?}\n{keys}\n");
        self
    }

    /// Append `toml` (whole tables, like `[recovery]\nconfirm_within_secs = 2`) to the config.
    pub fn config(mut self, toml: &str) -> Self {
        let _ = write!(self.devices, "\n{toml}\n");
        self
    }

    /// The order of the unattended unseal.
    pub fn unseal_order(mut self, order: &[&str]) -> Self {
        self.unseal_order = Some(order.iter().map(|s| (*s).to_owned()).collect());
        self
    }

    /// Use this policy text instead of the root-admin one.
    pub fn policy(mut self, text: &str) -> Self {
        self.policy = Some(text.into());
        self
    }

    /// Serve the credential socket (`Keywardd::credentials_socket`), holding requests up to
    /// `wait_unsealed_secs` for the vault to open.
    pub fn credentials(mut self, wait_unsealed_secs: u64) -> Self {
        self.credentials_wait = Some(wait_unsealed_secs);
        self
    }

    /// Serve the ssh-agent socket ([`Keywardd::ssh_agent_socket`]), beside the API socket and
    /// as reachable as it.
    pub fn ssh_agent(mut self) -> Self {
        self.ssh_agent = true;
        self
    }

    /// Serve the OpenBao-compatible transit socket (`Keywardd::transit_socket`, mount
    /// `transit`).
    pub fn transit(mut self) -> Self {
        self.transit = true;
        self
    }

    /// Put the API socket where any user can reach it (mode 0666 in a 0755 directory), for tests
    /// that call as another uid and must meet the policy, not file permissions.
    pub fn public_socket(mut self) -> Self {
        self.public_socket = true;
        self
    }

    /// The body of the config's `[limits]` table (`max_connections = 8` lines).
    pub fn limits(mut self, table: &str) -> Self {
        self.limits = Some(table.into());
        self
    }

    /// The daemon's `KEYWARD_LOG` filter (default `debug`, which tests read back from the log).
    /// Measurements use `warn`, so that log writes don't count as request cost.
    pub fn log_filter(mut self, filter: &str) -> Self {
        self.log_filter = Some(filter.into());
        self
    }

    /// Keep listening on the notify socket after `READY=1`, for [`Keywardd::wait_notify`].
    /// (Off by default: nobody would read the datagrams, and a full queue blocks the sender.)
    pub fn keep_notify(mut self) -> Self {
        self.keep_notify = true;
        self
    }

    /// Run under a systemd watchdog of `usec` microseconds: `WATCHDOG_USEC`, and
    /// `WATCHDOG_PID` set to the daemon's own pid as systemd does (through an `exec` from a
    /// shell, which keeps the pid). Implies [`Setup::keep_notify`].
    pub fn watchdog(mut self, usec: u64) -> Self {
        self.watchdog_usec = Some(usec);
        self.keep_notify = true;
        self
    }

    /// Start the daemon and wait for `READY=1`.
    pub fn start(self) -> Keywardd {
        let mut d = self.prepare();
        d.start();
        d
    }

    /// Write the config, policy and directories but start nothing: for tests that run
    /// `keywardd` their own way (under `systemd-socket-activate`, say) with
    /// [`Keywardd::config_path`]. [`Keywardd::start`] starts it the usual way.
    pub fn prepare(self) -> Keywardd {
        let dir = tempfile::Builder::new()
            .prefix("keywardd-")
            .tempdir()
            .expect("tempdir");
        let root = dir.path().to_path_buf();
        let run_dir = if self.public_socket {
            std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).expect("chmod");
            let d = root.join("public");
            std::fs::create_dir(&d).expect("mkdir");
            std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).expect("chmod");
            d
        } else {
            root.join("run")
        };
        let socket = run_dir.join("api.sock");
        let policy_path = root.join("policy.toml");
        let mut config = format!(
            "state_dir = \"{}\"\n[api]\nsocket = \"{}\"\nmode = \"{}\"\n",
            root.join("state").display(),
            socket.display(),
            if self.public_socket { "0666" } else { "0600" },
        );
        if let Some(wait) = self.credentials_wait {
            let _ = write!(
                config,
                "[credentials]\nsocket = \"{}\"\nmode = \"{}\"\nwait_unsealed_secs = {wait}\n",
                run_dir.join("credentials.sock").display(),
                if self.public_socket { "0666" } else { "0600" },
            );
        }
        if self.ssh_agent {
            let _ = write!(
                config,
                "[ssh_agent]\nsocket = \"{}\"\nmode = \"{}\"\n",
                run_dir.join("ssh-agent.sock").display(),
                if self.public_socket { "0666" } else { "0600" },
            );
        }
        if self.transit {
            let _ = write!(
                config,
                "[transit]\nsocket = \"{}\"\nmode = \"{}\"\n",
                run_dir.join("transit.sock").display(),
                if self.public_socket { "0666" } else { "0600" },
            );
        }
        if let Some(policy) = &self.policy {
            std::fs::write(&policy_path, policy).expect("policy");
            std::fs::set_permissions(&policy_path, std::fs::Permissions::from_mode(0o600))
                .expect("chmod");
            config.insert_str(0, &format!("policy = \"{}\"\n", policy_path.display()));
        }
        if let Some(order) = &self.unseal_order {
            config.insert_str(0, &format!("unseal_order = {order:?}\n"));
        }
        config.push_str(&self.devices);
        if let Some(limits) = &self.limits {
            let _ = write!(config, "\n[limits]\n{limits}\n");
        }
        let config_path = root.join("keywardd.toml");
        std::fs::write(&config_path, &config).expect("config");
        Keywardd {
            dir,
            config_path,
            socket,
            policy_path,
            child: None,
            statuses: Vec::new(),
            log_filter: self.log_filter.unwrap_or_else(|| "debug".into()),
            keep_notify: self.keep_notify,
            watchdog_usec: self.watchdog_usec,
            notify: None,
        }
    }
}

/// Wait until the file at `path` holds, past byte `from`, a line that `pred` accepts (given
/// without colour codes, see [`plain`]), and return that line. Each write to the file wakes
/// the wait (inotify); nothing is re-read on a timer. The file must exist when the wait starts.
///
/// # Panics
/// When no such line comes within `within`, naming `what` and showing what was written meanwhile.
pub fn wait_file_line(
    path: &Path,
    what: &str,
    from: usize,
    within: Duration,
    pred: &mut dyn FnMut(&str) -> bool,
) -> String {
    let deadline = Instant::now() + within;
    let inotify = Inotify::init(InitFlags::IN_CLOEXEC).expect("inotify");
    // Watched before the first read, so that no write in between goes unnoticed.
    inotify
        .add_watch(path, AddWatchFlags::IN_MODIFY)
        .unwrap_or_else(|e| panic!("watch {}: {e}", path.display()));
    let mut checked = from;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        // Only whole lines, each looked at once.
        let new = text.get(checked..).unwrap_or_default();
        let whole = new.rfind('\n').map_or(0, |i| i + 1);
        if let Some(line) = new[..whole].lines().map(plain).find(|l| pred(l)) {
            return line;
        }
        checked += whole;
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "no line for {what} in {} within {within:?}; written since the mark:\n{}",
            path.display(),
            text.get(from..).unwrap_or_default()
        );
        let mut fds = [PollFd::new(inotify.as_fd(), PollFlags::POLLIN)];
        let timeout = PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX);
        if poll(&mut fds, timeout).is_ok_and(|n| n > 0) {
            // Drain the events: the file is read again from `checked` either way.
            let _ = inotify.read_events();
        }
    }
}

/// `text` without its terminal colour codes (CSI sequences: `ESC [ parameters final-byte`), so
/// that a test matches `device=tpm` whether or not the log was coloured.
pub fn plain(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(ch) = chars.next() {
        if ch == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(ch);
        }
    }
    out
}

/// Whether a (plain) log line carries the field `name=value`.
pub fn has_field(line: &str, name: &str, value: &str) -> bool {
    let field = format!("{name}={value}");
    line.split_whitespace().any(|w| w == field)
}

/// A running (or stopped) `keywardd`.
#[derive(Debug)]
pub struct Keywardd {
    dir: tempfile::TempDir,
    config_path: PathBuf,
    socket: PathBuf,
    policy_path: PathBuf,
    child: Option<Child>,
    statuses: Vec<String>,
    log_filter: String,
    keep_notify: bool,
    watchdog_usec: Option<u64>,
    /// The notify socket, kept after `READY=1` with [`Setup::keep_notify`].
    notify: Option<UnixDatagram>,
}

impl Keywardd {
    /// The API socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The config file (`keywardd --config` takes it).
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The credential socket (with [`Setup::credentials`]).
    pub fn credentials_socket(&self) -> PathBuf {
        self.socket.with_file_name("credentials.sock")
    }

    /// The ssh-agent socket (with [`Setup::ssh_agent`]): `SSH_AUTH_SOCK`.
    pub fn ssh_agent_socket(&self) -> PathBuf {
        self.socket.with_file_name("ssh-agent.sock")
    }

    /// The transit socket (with [`Setup::transit`]).
    pub fn transit_socket(&self) -> PathBuf {
        self.socket.with_file_name("transit.sock")
    }

    /// The temp dir holding everything.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The daemon's log (its stderr), all runs appended.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("keywardd.log")).unwrap_or_default()
    }

    /// How much the daemon has logged so far (all runs): a mark for [`Keywardd::wait_log`].
    pub fn log_mark(&self) -> usize {
        self.log().len()
    }

    /// The daemon's log without terminal colour codes.
    pub fn plain_log(&self) -> String {
        plain(&self.log())
    }

    /// Wait (at most `within`) until the daemon logs, after byte `from` of its log
    /// ([`Keywardd::log_mark`]; 0 for the whole log), a line that `pred` accepts (given
    /// without colour codes, see [`plain`]), and return that line. Each new line wakes the wait; nothing is re-read on a timer.
    ///
    /// # Panics
    /// When no such line comes in time, naming `what` and showing what was logged meanwhile.
    pub fn wait_log(
        &self,
        what: &str,
        from: usize,
        within: Duration,
        mut pred: impl FnMut(&str) -> bool,
    ) -> String {
        wait_file_line(
            &self.dir.path().join("keywardd.log"),
            what,
            from,
            within,
            &mut pred,
        )
    }

    /// The policy file (rewrite it and [`Keywardd::reload`] to change the policy).
    pub fn policy_path(&self) -> &Path {
        &self.policy_path
    }

    /// Every `STATUS=` the daemon sent, oldest first, across runs.
    pub fn statuses(&self) -> &[String] {
        &self.statuses
    }

    /// The daemon's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Start (again) on the same state and wait for `READY=1`.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "already running");
        let notify_path = self.dir.path().join("notify.sock");
        let _ = std::fs::remove_file(&notify_path);
        let notify = UnixDatagram::bind(&notify_path).expect("bind notify socket");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("keywardd.log"))
            .expect("log");
        let mut command = match self.watchdog_usec {
            Some(usec) => {
                let mut c = Command::new("sh");
                c.arg("-c")
                    .arg(r#"export WATCHDOG_PID=$$; exec "$0" "$@""#)
                    .arg(bin("keywardd"))
                    .env("WATCHDOG_USEC", usec.to_string());
                c
            }
            None => Command::new(bin("keywardd")),
        };
        let child = command
            .arg("--config")
            .arg(&self.config_path)
            .env("NOTIFY_SOCKET", &notify_path)
            .env("KEYWARD_LOG", &self.log_filter)
            .env_remove("SOFTHSM2_CONF")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn keywardd");
        self.child = Some(child);
        self.wait_ready(&notify);
        if self.keep_notify {
            self.notify = Some(notify);
        }
    }

    /// The lines of the next datagram the daemon sends to its notify socket (`STATUS=` lines
    /// are kept in [`Keywardd::statuses`] too), or `None` when none comes `within`. Needs
    /// [`Setup::keep_notify`].
    pub fn next_notify(&mut self, within: Duration) -> Option<Vec<String>> {
        let notify = self
            .notify
            .as_ref()
            .expect("not listening after READY=1: use Setup::keep_notify");
        let mut buf = vec![0u8; 4096];
        notify
            .set_read_timeout(Some(within.max(Duration::from_millis(1))))
            .expect("timeout");
        match notify.recv(&mut buf) {
            Ok(n) => {
                let lines: Vec<String> = String::from_utf8_lossy(&buf[..n])
                    .lines()
                    .map(str::to_owned)
                    .collect();
                for line in &lines {
                    if let Some(s) = line.strip_prefix("STATUS=") {
                        self.statuses.push(s.to_owned());
                    }
                }
                Some(lines)
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                None
            }
            Err(e) => panic!("notify socket: {e}"),
        }
    }

    /// Wait (at most `within`) for a notify line that `pred` accepts, and return it. Panics
    /// with `what`, the log and the lines seen when none comes.
    pub fn wait_notify(
        &mut self,
        what: &str,
        within: Duration,
        mut pred: impl FnMut(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + within;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                panic!(
                    "no {what} within {within:?}; seen: {seen:?}; log:\n{}",
                    self.log()
                );
            }
            for line in self.next_notify(left).unwrap_or_default() {
                if pred(&line) {
                    return line;
                }
                seen.push(line);
            }
        }
    }

    /// Wait (at most `within`) until device `name`'s actor logs, after log mark `from`, that
    /// it opened the device: from then on the device's calls reach it and the status shows
    /// it available (the actor logs after publishing).
    pub fn wait_device_open(&self, name: &str, from: usize, within: Duration) {
        self.wait_log(&format!("device {name} to be opened"), from, within, |l| {
            l.contains("device open") && has_field(l, "device", name)
        });
    }

    fn wait_ready(&mut self, notify: &UnixDatagram) {
        let deadline = Instant::now() + START_TIMEOUT;
        let mut buf = vec![0u8; 4096];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "keywardd not ready after {START_TIMEOUT:?}; log:\n{}",
                self.log()
            );
            // Wake at least every 200 ms to notice a daemon that died without a word.
            notify
                .set_read_timeout(Some(left.min(Duration::from_millis(200))))
                .expect("timeout");
            match notify.recv(&mut buf) {
                Ok(n) => {
                    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                    let mut ready = false;
                    for line in msg.lines() {
                        if let Some(s) = line.strip_prefix("STATUS=") {
                            self.statuses.push(s.to_owned());
                        }
                        ready |= line == "READY=1";
                    }
                    if ready {
                        return;
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    if let Some(status) = self
                        .child
                        .as_mut()
                        .and_then(|c| c.try_wait().ok().flatten())
                    {
                        panic!(
                            "keywardd exited with {status} before READY=1; log:\n{}",
                            self.log()
                        );
                    }
                }
                Err(e) => panic!("notify socket: {e}"),
            }
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
            let status = child.wait().expect("wait");
            assert!(
                status.success(),
                "keywardd exited with {status} on SIGTERM; log:\n{}",
                self.log()
            );
        }
    }

    /// SIGKILL, no goodbye.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stop and start again on the same state.
    pub fn restart(&mut self) {
        self.stop();
        self.start();
    }

    /// SIGHUP (policy reload).
    pub fn reload(&self) {
        let status = Command::new("kill")
            .arg("-HUP")
            .arg(self.pid().to_string())
            .status()
            .expect("kill");
        assert!(status.success());
    }

    /// The request records of the audit log, as JSON, oldest first.
    pub fn audit_requests(&self) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(self.dir().join("state/audit.log"))
            .unwrap_or_else(|e| panic!("read the audit log: {e}"));
        text.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|r| r["kind"] == "request")
            .collect()
    }

    /// A `keyward` command aimed at this daemon.
    pub fn cli(&self) -> Command {
        let mut c = Command::new(bin("keyward"));
        c.arg("--socket").arg(&self.socket);
        c
    }

    /// Run `keyward ARGS` with `stdin`, returning (exit code, stdout, stderr).
    pub fn run(&self, args: &[&str], stdin: &[u8]) -> Output {
        run_cli(self.cli().args(args), stdin)
    }

    /// Run `keyward --json ARGS`, expecting success, and parse its output.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut full = vec!["--json"];
        full.extend_from_slice(args);
        let out = self.run(&full, b"");
        assert_eq!(out.code, 0, "keyward {args:?} failed: {}", out.stderr);
        serde_json::from_str(&out.stdout)
            .unwrap_or_else(|e| panic!("keyward {args:?}: {e}: {}", out.stdout))
    }
}

impl Drop for Keywardd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// What a CLI run printed.
#[derive(Debug)]
pub struct Output {
    /// Exit code (-1 if killed by a signal).
    pub code: i32,
    /// Standard output (lossy UTF-8).
    pub stdout: String,
    /// Raw standard output.
    pub stdout_bytes: Vec<u8>,
    /// Standard error.
    pub stderr: String,
}

/// Run a prepared command with `stdin` fed in.
pub fn run_cli(cmd: &mut Command, stdin: &[u8]) -> Output {
    use std::io::Write as _;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let mut input = child.stdin.take().expect("stdin");
    let data = stdin.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(&data);
    });
    let mut stdout = Vec::new();
    let mut stderr = String::new();
    child
        .stdout
        .take()
        .expect("stdout")
        .read_to_end(&mut stdout)
        .expect("read stdout");
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr)
        .expect("read stderr");
    let status = child.wait().expect("wait");
    let _ = writer.join();
    Output {
        code: status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stdout_bytes: stdout,
        stderr,
    }
}
