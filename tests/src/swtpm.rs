//! [`Swtpm`]: a real software TPM (swtpm) per test, on its own TCP port pair and state directory,
//! killed when dropped.
//!
//! Start-up waits on events, never on time: the control port is a listener this process binds
//! and hands to swtpm (`--ctrl type=tcp,fd=3`), and readiness is swtpm writing its pid file,
//! which it does once its command port listens (watched with inotify, not re-read). swtpm 0.7
//! takes only an accepted connection as `--server fd=`, not a listener, so the command port is
//! still bound by swtpm itself; a start whose port was taken meanwhile is retried on another.
//!
//! TCP only: tss-esapi 7.7 ignores `swtpm:path=` and would talk to localhost:2321. swtpm serves
//! one client at a time, so a test drops its `TpmDevice` before running tpm2-tools against the
//! same instance ([`Swtpm::extend_pcr`]).

use std::ffi::OsStr;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, TcpListener, TcpStream};
use std::os::fd::{AsFd as _, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use command_fds::{CommandFdExt as _, FdMapping};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};

use crate::{have_program, run};

/// How long swtpm may take to accept connections after it starts.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// How many fresh command ports to try when another process takes ours before swtpm binds it.
const PORT_ATTEMPTS: usize = 20;

/// The descriptor number swtpm finds its control listener at.
const CTRL_FD: i32 = 3;

/// One swtpm process (`swtpm socket --tpm2`), with its state in a temporary directory.
#[derive(Debug)]
pub struct Swtpm {
    state: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
}

/// Why a start attempt failed.
enum StartError {
    /// The ports were taken after we probed them: try another pair.
    PortsTaken,
    /// Anything else: swtpm's own words.
    Failed(String),
}

impl Swtpm {
    /// Start swtpm on a fresh state directory and a free port pair `P`, `P + 1` on 127.0.0.1,
    /// returning once the command port accepts connections.
    ///
    /// # Panics
    /// When swtpm is not installed or does not come up (with its log).
    pub fn start() -> Swtpm {
        Self::start_in(Self::state_dir_new())
    }

    /// As [`Swtpm::start`], on a state that `swtpm_setup` manufactured with an RSA 2048
    /// endorsement key and its certificate in NV (index 0x01c00002), signed by swtpm's local CA
    /// (`swtpm-localca`), as a TPM from a maker comes.
    ///
    /// # Panics
    /// When `swtpm_setup` fails (with its output).
    pub fn start_with_ek_certificate() -> Swtpm {
        let state = Self::state_dir_new();
        let out = Command::new("swtpm_setup")
            .args(["--tpm2", "--create-ek-cert", "--overwrite", "--tpmstate"])
            .arg(state.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "swtpm_setup: {out:?}");
        Self::start_in(state)
    }

    fn state_dir_new() -> tempfile::TempDir {
        assert!(
            have_program("swtpm"),
            "swtpm is not installed: apt-get install -y swtpm swtpm-tools tpm2-tools"
        );
        tempfile::Builder::new()
            .prefix("keyward-swtpm-")
            .tempdir()
            .unwrap()
    }

    fn start_in(state: tempfile::TempDir) -> Swtpm {
        for _ in 0..PORT_ATTEMPTS {
            let (cmd, ctrl) = bind_port_pair();
            let port = cmd.local_addr().unwrap().port();
            // swtpm binds the command port itself (see the module note).
            drop(cmd);
            match spawn(state.path(), port, ctrl) {
                Ok(child) => {
                    return Swtpm {
                        state,
                        port,
                        child: Some(child),
                    }
                }
                // Another process took the pair between our probe and swtpm's bind.
                Err(StartError::PortsTaken) => continue,
                Err(StartError::Failed(why)) => panic!("swtpm did not start: {why}"),
            }
        }
        panic!("swtpm did not start: {PORT_ATTEMPTS} port pairs were all taken");
    }

    /// The TCTI string for this instance.
    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    /// The command port (the control port is one above).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The state directory (NVRAM, the pid file, swtpm's log).
    pub fn state_dir(&self) -> &Path {
        self.state.path()
    }

    /// Kill swtpm (SIGKILL: like pulling the power; the NVRAM on disk stays) and reap it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stop and start again on the same state directory and ports, like a reboot: the TPM's
    /// persistent state (seeds, NV, dictionary-attack counters) survives; PCRs reset.
    ///
    /// # Panics
    /// When swtpm does not come back.
    pub fn restart(&mut self) {
        self.stop();
        let ctrl = TcpListener::bind((Ipv4Addr::LOCALHOST, self.port + 1))
            .unwrap_or_else(|e| panic!("swtpm's control port {} is taken: {e}", self.port + 1));
        match spawn(self.state.path(), self.port, ctrl) {
            Ok(child) => self.child = Some(child),
            Err(StartError::PortsTaken) => {
                panic!(
                    "swtpm could not rebind ports {}/{}",
                    self.port,
                    self.port + 1
                )
            }
            Err(StartError::Failed(why)) => panic!("swtpm did not restart: {why}"),
        }
    }

    /// Extend PCR `pcr` (sha256 bank) with a fixed digest, through tpm2-tools. The caller must
    /// have dropped its own connection first: swtpm serves one client at a time.
    ///
    /// # Panics
    /// When `tpm2_pcrextend` fails or is missing.
    pub fn extend_pcr(&self, pcr: u8) {
        assert!(
            have_program("tpm2_pcrextend"),
            "tpm2-tools is not installed: apt-get install -y tpm2-tools"
        );
        let digest = "5a".repeat(32);
        run(Command::new("tpm2_pcrextend")
            .arg(format!("{pcr}:sha256={digest}"))
            .env("TPM2TOOLS_TCTI", self.tcti()));
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A recording TCP relay in front of an swtpm's port pair: point a TCTI at [`Wiretap::tcti`] and
/// read back every byte that crossed, both directions, with [`Wiretap::captured`]. It is how a
/// test sees what an interposer on the TPM bus would see.
///
/// The relay threads live until the test process ends (nextest runs one process per test).
#[derive(Debug)]
pub struct Wiretap {
    port: u16,
    captured: Arc<Mutex<Vec<u8>>>,
}

impl Wiretap {
    /// Listen on a fresh port pair and relay it to `swtpm`'s.
    pub fn start(swtpm: &Swtpm) -> Wiretap {
        let captured = Arc::new(Mutex::new(Vec::new()));
        let (cmd, ctrl) = bind_port_pair();
        let port = cmd.local_addr().unwrap().port();
        for (listener, upstream) in [(cmd, swtpm.port()), (ctrl, swtpm.port() + 1)] {
            let captured = Arc::clone(&captured);
            std::thread::spawn(move || relay(listener, upstream, captured));
        }
        Wiretap { port, captured }
    }

    /// The TCTI string that goes through the tap.
    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    /// Everything relayed so far, both directions concatenated in arrival order.
    pub fn captured(&self) -> Vec<u8> {
        self.captured.lock().unwrap().clone()
    }
}

fn relay(listener: TcpListener, upstream: u16, captured: Arc<Mutex<Vec<u8>>>) {
    for client in listener.incoming() {
        let Ok(client) = client else { continue };
        let Ok(server) = TcpStream::connect((Ipv4Addr::LOCALHOST, upstream)) else {
            continue;
        };
        for (from, to) in [
            (client.try_clone().unwrap(), server.try_clone().unwrap()),
            (server, client),
        ] {
            let captured = Arc::clone(&captured);
            std::thread::spawn(move || pump(from, to, captured));
        }
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, captured: Arc<Mutex<Vec<u8>>>) {
    let mut buf = [0u8; 4096];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                captured.lock().unwrap().extend_from_slice(&buf[..n]);
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}

/// Listeners on 127.0.0.1 ports `P` and `P + 1` (the TCTI's command and control ports),
/// bound here and kept, so nobody can take them between choosing and using.
fn bind_port_pair() -> (TcpListener, TcpListener) {
    for _ in 0..100 {
        let first = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = first.local_addr().unwrap().port();
        if port == u16::MAX {
            continue;
        }
        if let Ok(second) = TcpListener::bind((Ipv4Addr::LOCALHOST, port + 1)) {
            return (first, second);
        }
    }
    panic!("no free pair of adjacent TCP ports on 127.0.0.1");
}

fn log_path(dir: &Path) -> PathBuf {
    dir.join("swtpm.log")
}

/// Run swtpm on `dir`, command port `port` and the control listener `ctrl` (on `port + 1`);
/// return it once it serves: when it has written its pid file, which it does after its
/// command port listens. Its stderr (where it says why it could not start) is read meanwhile,
/// so an early exit ends the wait at once.
fn spawn(dir: &Path, port: u16, ctrl: TcpListener) -> Result<Child, StartError> {
    let failed = |what: &str, e: &dyn std::fmt::Display| StartError::Failed(format!("{what}: {e}"));
    let pid_file = dir.join("pid");
    let _ = std::fs::remove_file(&pid_file);
    let inotify = Inotify::init(InitFlags::IN_CLOEXEC).map_err(|e| failed("inotify", &e))?;
    inotify
        .add_watch(
            dir,
            AddWatchFlags::IN_CLOSE_WRITE | AddWatchFlags::IN_MOVED_TO,
        )
        .map_err(|e| failed("inotify watch", &e))?;
    let log = File::create(log_path(dir)).map_err(|e| failed("cannot create the log", &e))?;
    let mut command = Command::new("swtpm");
    command
        .args(["socket", "--tpm2", "--tpmstate"])
        .arg(format!("dir={}", dir.display()))
        .arg("--server")
        .arg(format!("type=tcp,port={port},bindaddr=127.0.0.1"))
        .arg("--ctrl")
        .arg(format!("type=tcp,fd={CTRL_FD}"))
        .args(["--flags", "not-need-init,startup-clear", "--pid"])
        .arg(format!("file={}", pid_file.display()))
        .stdin(Stdio::null())
        .stdout(
            log.try_clone()
                .map_err(|e| failed("cannot open the log", &e))?,
        )
        .stderr(Stdio::piped())
        .fd_mappings(vec![FdMapping {
            parent_fd: OwnedFd::from(ctrl),
            child_fd: CTRL_FD,
        }])
        .map_err(|e| failed("fd mapping", &e))?;
    let mut child = command
        .spawn()
        .map_err(|e| failed("cannot run swtpm", &e))?;
    // The command holds our copy of the control listener: drop it, so that only swtpm has it
    // and a killed swtpm's port refuses connections as a dead TPM's would.
    drop(command);
    let mut stderr = child.stderr.take().expect("piped stderr");
    match wait_pid_file(
        &inotify,
        &mut stderr,
        pid_file.file_name().unwrap_or_default(),
    ) {
        Ok(()) => {
            // Whatever swtpm says later goes to its log.
            std::thread::spawn(move || copy_to(stderr, log));
            Ok(child)
        }
        Err(mut said) => {
            let _ = child.kill();
            let status = child.wait();
            said.push_str(&std::fs::read_to_string(log_path(dir)).unwrap_or_default());
            if said.contains("Address already in use") {
                return Err(StartError::PortsTaken);
            }
            Err(StartError::Failed(format!(
                "swtpm ({status:?}) did not write its pid file within {READY_TIMEOUT:?}: {said}"
            )))
        }
    }
}

/// Wait until `name` is written in the watched directory, or swtpm's `stderr` closes (it
/// exited), or [`READY_TIMEOUT`] passes. `Err` carries what swtpm wrote to stderr.
fn wait_pid_file(inotify: &Inotify, stderr: &mut ChildStderr, name: &OsStr) -> Result<(), String> {
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut said = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(String::from_utf8_lossy(&said).into_owned());
        }
        let mut fds = [
            PollFd::new(inotify.as_fd(), PollFlags::POLLIN),
            PollFd::new(stderr.as_fd(), PollFlags::POLLIN),
        ];
        let timeout = PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX);
        match poll(&mut fds, timeout) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(format!("poll: {e}")),
        }
        let ready = |fd: &PollFd| fd.revents().is_some_and(|r| !r.is_empty());
        let (written, spoke) = (ready(&fds[0]), ready(&fds[1]));
        if written {
            let events = inotify.read_events().map_err(|e| format!("inotify: {e}"))?;
            if events.iter().any(|e| e.name.as_deref() == Some(name)) {
                return Ok(());
            }
        }
        if spoke {
            let mut buf = [0u8; 4096];
            match stderr.read(&mut buf) {
                Ok(0) | Err(_) => return Err(String::from_utf8_lossy(&said).into_owned()),
                Ok(n) => said.extend_from_slice(&buf[..n]),
            }
        }
    }
}

/// Copy swtpm's stderr into its log until swtpm exits.
fn copy_to(mut stderr: ChildStderr, mut log: File) {
    let _ = std::io::copy(&mut stderr, &mut log);
}

/// TPM2_CC_Sign: the command code a [`Gate`] can hold.
pub const CC_SIGN: u32 = 0x0000_015D;

/// TPM2_CC_Unseal: the command code a [`Gate`] can hold.
pub const CC_UNSEAL: u32 = 0x0000_015E;

/// TPM2_CC_NV_Increment: the command code a [`Gate`] can hold.
pub const CC_NV_INCREMENT: u32 = 0x0000_0134;

/// A TCP relay in front of an swtpm that can stop one chosen TPM command on its way in: point
/// a TCTI at [`Gate::tcti`], [`Gate::hold`] a command code, wait until a client sent that
/// command ([`Gate::wait_held`]), then do something to the TPM (kill it, say) while the command
/// is provably in flight, and [`Gate::release`] it. It is how a test lands a fault *during* an
/// operation without guessing at timing.
///
/// Relayed connections outlive a dead upstream only until their next byte: when swtpm dies, the
/// relay closes the client side too, as a dead TPM's socket would. The relay threads live until
/// the test process ends (nextest runs one process per test).
#[derive(Debug)]
pub struct Gate {
    port: u16,
    shared: Arc<GateShared>,
}

#[derive(Debug, Default)]
struct GateShared {
    state: Mutex<GateState>,
    changed: std::sync::Condvar,
}

#[derive(Debug, Default)]
struct GateState {
    /// The command code to hold next, if armed.
    armed: Option<u32>,
    /// Commands held so far (a held command counts once it stopped).
    held: u64,
    /// Commands let through by [`Gate::release`] so far.
    released: u64,
}

impl Gate {
    /// Listen on a fresh port pair and relay it to `swtpm`'s.
    pub fn start(swtpm: &Swtpm) -> Gate {
        let shared = Arc::new(GateShared::default());
        let (cmd, ctrl) = bind_port_pair();
        let port = cmd.local_addr().unwrap().port();
        let upstream = swtpm.port();
        let gate = Arc::clone(&shared);
        std::thread::spawn(move || gate_relay(cmd, upstream, Some(gate)));
        std::thread::spawn(move || gate_relay(ctrl, upstream + 1, None));
        Gate { port, shared }
    }

    /// The TCTI string that goes through the gate.
    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    /// Hold the next command with this TPM command code (e.g. [`CC_SIGN`]) before it reaches
    /// the TPM.
    pub fn hold(&self, command_code: u32) {
        self.shared.state.lock().unwrap().armed = Some(command_code);
    }

    /// Wait until a held command is waiting at the gate; false when none came by `deadline`.
    pub fn wait_held(&self, deadline: Instant) -> bool {
        let mut state = self.shared.state.lock().unwrap();
        while state.held == state.released {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            state = self.shared.changed.wait_timeout(state, left).unwrap().0;
        }
        true
    }

    /// Let the held command go on (to whatever is listening upstream now).
    pub fn release(&self) {
        let mut state = self.shared.state.lock().unwrap();
        state.released = state.held;
        self.shared.changed.notify_all();
    }
}

fn gate_relay(listener: TcpListener, upstream: u16, gate: Option<Arc<GateShared>>) {
    for client in listener.incoming() {
        let Ok(client) = client else { continue };
        // Nothing upstream (the TPM is dead): close at once, as a dead TPM's port would refuse.
        let Ok(server) = TcpStream::connect((Ipv4Addr::LOCALHOST, upstream)) else {
            continue;
        };
        let (Ok(client_in), Ok(server_out)) = (client.try_clone(), server.try_clone()) else {
            continue;
        };
        let gate = gate.clone();
        std::thread::spawn(move || gated_pump(client_in, server_out, gate));
        std::thread::spawn(move || gated_pump(server, client, None));
    }
}

/// Copy `from` to `to`; with a gate, a chunk that starts a TPM command with the armed code
/// waits at the gate first. A TPM command starts with tag (2 bytes), size (4), code (4), and
/// the TCTI writes each command in one piece, so a chunk boundary is a command boundary.
fn gated_pump(mut from: TcpStream, mut to: TcpStream, gate: Option<Arc<GateShared>>) {
    let mut buf = [0u8; 4096];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some(gate) = &gate {
            let code = (n >= 10).then(|| u32::from_be_bytes([buf[6], buf[7], buf[8], buf[9]]));
            let mut state = gate.state.lock().unwrap();
            if code.is_some() && state.armed == code {
                state.armed = None;
                state.held += 1;
                let mine = state.held;
                gate.changed.notify_all();
                while state.released < mine {
                    state = gate.changed.wait(state).unwrap();
                }
            }
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}
