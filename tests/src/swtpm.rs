//! [`Swtpm`]: a real software TPM (swtpm) per test, on its own TCP port pair and state directory,
//! killed when dropped.
//!
//! TCP only: tss-esapi 7.7 ignores `swtpm:path=` and would talk to localhost:2321. swtpm serves
//! one client at a time, so a test drops its `TpmDevice` before running tpm2-tools against the
//! same instance ([`Swtpm::extend_pcr`]).

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::{have_program, run};

/// How long swtpm may take to accept connections after it starts.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// How many fresh port pairs to try when another process grabs ours between probe and bind.
const PORT_ATTEMPTS: usize = 20;

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
        assert!(
            have_program("swtpm"),
            "swtpm is not installed: apt-get install -y swtpm swtpm-tools tpm2-tools"
        );
        let state = tempfile::Builder::new()
            .prefix("keyward-swtpm-")
            .tempdir()
            .unwrap();
        for _ in 0..PORT_ATTEMPTS {
            let port = free_port_pair();
            match spawn(state.path(), port) {
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
        match spawn(self.state.path(), self.port) {
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
        for _ in 0..PORT_ATTEMPTS {
            let port = free_port_pair();
            let (Ok(cmd), Ok(ctrl)) = (
                TcpListener::bind((Ipv4Addr::LOCALHOST, port)),
                TcpListener::bind((Ipv4Addr::LOCALHOST, port + 1)),
            ) else {
                continue;
            };
            for (listener, upstream) in [(cmd, swtpm.port()), (ctrl, swtpm.port() + 1)] {
                let captured = Arc::clone(&captured);
                std::thread::spawn(move || relay(listener, upstream, captured));
            }
            return Wiretap { port, captured };
        }
        panic!("no free port pair for the wiretap");
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

/// A port `P` such that `P` and `P + 1` are both free on 127.0.0.1 right now.
fn free_port_pair() -> u16 {
    for _ in 0..100 {
        let first = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = first.local_addr().unwrap().port();
        if port == u16::MAX {
            continue;
        }
        if TcpListener::bind((Ipv4Addr::LOCALHOST, port + 1)).is_ok() {
            return port;
        }
    }
    panic!("no free pair of adjacent TCP ports on 127.0.0.1");
}

fn log_path(dir: &Path) -> PathBuf {
    dir.join("swtpm.log")
}

fn read_log(dir: &Path) -> String {
    std::fs::read_to_string(log_path(dir)).unwrap_or_default()
}

/// Run swtpm on `dir` and ports `port`, `port + 1`; return it once it accepts connections.
fn spawn(dir: &Path, port: u16) -> Result<Child, StartError> {
    let failed = |what: &str, e: std::io::Error| StartError::Failed(format!("{what}: {e}"));
    // Truncated per start, so a port clash of an earlier attempt isn't read as this one's.
    let log = File::create(log_path(dir)).map_err(|e| failed("cannot create the log", e))?;
    let log_err = log
        .try_clone()
        .map_err(|e| failed("cannot open the log", e))?;
    let child = Command::new("swtpm")
        .args(["socket", "--tpm2", "--tpmstate"])
        .arg(format!("dir={}", dir.display()))
        .arg("--server")
        .arg(format!("type=tcp,port={port},bindaddr=127.0.0.1"))
        .arg("--ctrl")
        .arg(format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1))
        .args(["--flags", "not-need-init,startup-clear", "--pid"])
        .arg(format!("file={}", dir.join("pid").display()))
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .spawn()
        .map_err(|e| failed("cannot run swtpm", e))?;
    wait_ready(child, dir, port)
}

/// Readiness is the command port accepting a connection (swtpm binds both ports before it
/// serves). Between attempts we back off on `park_timeout`, never a fixed sleep standing in for
/// readiness, and we stop waiting as soon as swtpm exits.
fn wait_ready(mut child: Child, dir: &Path, port: u16) -> Result<Child, StartError> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut backoff = Duration::from_millis(1);
    loop {
        if let Some(status) = child.try_wait().ok().flatten() {
            let log = read_log(dir);
            if log.contains("Address already in use") {
                return Err(StartError::PortsTaken);
            }
            return Err(StartError::Failed(format!(
                "swtpm exited with {status}: {log}"
            )));
        }
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(child);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(StartError::Failed(format!(
                "port {port} not accepting after {READY_TIMEOUT:?}: {}",
                read_log(dir)
            )));
        }
        // A refused connect returns at once; without a pause this loop would spin. This is a
        // backoff between readiness probes, not a wait that stands in for readiness.
        std::thread::park_timeout(backoff);
        backoff = (backoff * 2).min(Duration::from_millis(50));
    }
}

/// TPM2_CC_Sign: the command code a [`Gate`] can hold.
pub const CC_SIGN: u32 = 0x0000_015D;

/// TPM2_CC_Unseal: the command code a [`Gate`] can hold.
pub const CC_UNSEAL: u32 = 0x0000_015E;

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
        for _ in 0..PORT_ATTEMPTS {
            let port = free_port_pair();
            let (Ok(cmd), Ok(ctrl)) = (
                TcpListener::bind((Ipv4Addr::LOCALHOST, port)),
                TcpListener::bind((Ipv4Addr::LOCALHOST, port + 1)),
            ) else {
                continue;
            };
            let upstream = swtpm.port();
            let gate = Arc::clone(&shared);
            std::thread::spawn(move || gate_relay(cmd, upstream, Some(gate)));
            std::thread::spawn(move || gate_relay(ctrl, upstream + 1, None));
            return Gate { port, shared };
        }
        panic!("no free port pair for the gate");
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
