//! Peers measured in the same run as Keyward (`--peers`, opt-in, never in CI), each on this
//! run's own devices and files: Parsec with its PKCS#11 provider on the baseline SoftHSM token,
//! `clevis decrypt` of a tpm2 JWE on the baseline swtpm, and `systemd-creds decrypt` of a
//! credential sealed with a private host key. Their rows are figures for information (no
//! target: the issue that asked for them sets none). A peer that is not installed, or fails,
//! is skipped with one line saying why; the rest of the run goes on.
//!
//! Parsec is driven through its own CLI, `parsec-tool`, one process per signature, and Keyward
//! likewise through `keyward key sign`: Parsec's Rust client (`parsec-client`) depends on
//! `bincode`, which this workspace bans (deny.toml), so the fair comparison is CLI against CLI.
//!
//! Must not: download or install anything (`scripts/bench --peers` installs the peers: Debian
//! packages with apt, parsec-service and parsec-tool with `cargo install` into target/peers/),
//! touch the machine's own Parsec, clevis or systemd state (`/run/parsec`,
//! `/var/lib/systemd/credential.secret`), or count a failed peer operation as done.

use std::io::Write as _;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context as _, Result};
use keyward::Client;
use keyward_tests::credentials;
use keyward_tests::keywardd::bin;

use crate::measure::{compare, median, run_clients, Compared, Sample};
use crate::report::{Goal, Report, Unit};
use crate::world::{clients_label, World, CREDENTIAL, CREDENTIAL_ID, SECRET, SIGN_DATA, UNIT};
use crate::Settings;

/// The parsec-service release `scripts/bench --peers` installs (and this phase expects).
pub const PARSEC_VERSION: &str = "1.5.0";

/// Parsec, clevis and systemd-creds, each against the Keyward path that does the same job.
pub fn peers(w: &mut World, s: &Settings, r: &mut Report) -> Result<()> {
    let peers: [(&str, crate::PhaseFn); 3] = [
        ("Parsec", parsec),
        ("clevis", clevis),
        ("systemd-creds", systemd_creds),
    ];
    for (name, f) in peers {
        if let Err(e) = f(w, s, r) {
            r.note(format!("peer {name}: skipped: {e:#}"));
        }
    }
    r.note(format!(
        "peers: a process start alone (fork + exec of /bin/true, waited for) runs {:.0}/s here: \
         the floor of every CLI-driven figure above",
        spawn_rate(s.plan.slice * s.plan.rounds as u32)?
    ));
    Ok(())
}

/// Where `scripts/bench --peers` installs Parsec: target/peers/parsec/bin, next to the
/// target/<profile> directory this binary runs from.
fn parsec_bin_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let target = exe
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| anyhow!("{} has no target directory", exe.display()))?;
    Ok(target.join("peers/parsec/bin"))
}

/// Sign ECDSA P-256 in SoftHSM at 1 and 8 clients, one CLI process per signature on both
/// sides: `parsec-tool sign` against a parsec-service (PKCS#11 provider, on the baseline
/// token) vs `keyward key sign` against the daemon.
fn parsec(w: &mut World, s: &Settings, r: &mut Report) -> Result<()> {
    let dir = parsec_bin_dir()?;
    let (service, tool) = (dir.join("parsec"), dir.join("parsec-tool"));
    for (what, path) in [("parsec-service", &service), ("parsec-tool", &tool)] {
        ensure!(
            path.is_file(),
            "{what} is not installed at {} (`scripts/bench --peers` installs parsec-service \
             {PARSEC_VERSION} and parsec-tool with cargo install)",
            path.display()
        );
    }
    let files = tempfile::Builder::new()
        .prefix("parsec-")
        .tempdir_in(w.scratch.path())?;
    let (slot, pin) = w.raw.slot_and_pin();
    let parsec = Parsec::start(&service, files.path(), slot, pin)?;
    let key = "bench-p256";
    parsec.tool(&tool, &["create-ecc-key", "--key-name", key])?;
    let data = std::str::from_utf8(SIGN_DATA)?;
    let parsec_sign = || -> Result<()> {
        let out = parsec.tool(&tool, &["sign", "--key-name", key, data])?;
        ensure!(
            !out.trim_ascii().is_empty(),
            "parsec-tool sign printed nothing"
        );
        Ok(())
    };
    let data_file = files.path().join("data");
    std::fs::write(&data_file, SIGN_DATA)?;
    let socket = w.kw.keywardd.socket().to_owned();
    let keyward = bin("keyward");
    let keyward_sign = || -> Result<()> {
        let mut cmd = Command::new(&keyward);
        cmd.arg("--socket")
            .arg(&socket)
            .args(["key", "sign", "p256-hsm", "--file"])
            .arg(&data_file);
        let signature = output(&mut cmd, &[])?;
        ensure!(!signature.is_empty(), "keyward key sign wrote no signature");
        Ok(())
    };
    for n in [1, 8] {
        let mut slots = vec![(); n];
        let mut kw_slots = vec![(); n];
        let c = compare(
            s.plan,
            |d| run_clients(&mut slots, d, |_: &mut ()| parsec_sign()),
            |d| run_clients(&mut kw_slots, d, |_: &mut ()| keyward_sign()),
        )?;
        peer_row(
            r,
            &format!(
                "Sign ECDSA P-256 in SoftHSM, {}, a CLI process per signature",
                clients_label(n)
            ),
            &format!("Parsec {PARSEC_VERSION} (PKCS#11 provider), parsec-tool sign"),
            "parsec-tool",
            c,
        );
    }
    Ok(())
}

/// A parsec-service of this run: its own socket, key mappings and config, the PKCS#11
/// provider on the baseline token. Stopped (SIGKILL) when dropped.
#[derive(Debug)]
struct Parsec {
    child: Child,
    endpoint: String,
}

impl Parsec {
    /// Write the config, start the service and wait for its `READY=1` (it notifies like a
    /// systemd service; a minute at most).
    fn start(service: &Path, dir: &Path, slot: u64, pin: &str) -> Result<Parsec> {
        let socket = dir.join("parsec.sock");
        let config = dir.join("config.toml");
        std::fs::write(
            &config,
            format!(
                "[core_settings]\nallow_root = true\nlog_level = \"error\"\nthread_pool_size = 8\n\
                 [listener]\nlistener_type = \"DomainSocket\"\ntimeout = 2000\n\
                 socket_path = {socket:?}\n\
                 [authenticator]\nauth_type = \"UnixPeerCredentials\"\n\
                 [[key_manager]]\nname = \"sqlite-manager\"\nmanager_type = \"SQLite\"\n\
                 sqlite_db_path = {db:?}\n\
                 [[provider]]\nprovider_type = \"Pkcs11\"\nkey_info_manager = \"sqlite-manager\"\n\
                 library_path = {module:?}\nslot_number = {slot}\nuser_pin = {pin:?}\n",
                socket = socket.display().to_string(),
                db = dir.join("kim.sqlite3").display().to_string(),
                module = hsm_shim::pkcs11::SOFTHSM_MODULE,
            ),
        )?;
        let notify_path = dir.join("notify.sock");
        let notify = UnixDatagram::bind(&notify_path)?;
        let log = std::fs::File::create(dir.join("parsec.log"))?;
        // SOFTHSM2_CONF (the baseline token's) is inherited from this process.
        let child = Command::new(service)
            .arg("--config")
            .arg(&config)
            .env("NOTIFY_SOCKET", &notify_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", service.display()))?;
        let mut parsec = Parsec {
            child,
            endpoint: format!("unix:{}", socket.display()),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut buf = [0u8; 512];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            ensure!(
                !left.is_zero(),
                "parsec-service sent no READY=1 within 60 s"
            );
            notify.set_read_timeout(Some(left.min(Duration::from_secs(1))))?;
            match notify.recv(&mut buf) {
                Ok(n) if buf[..n].split(|b| *b == b'\n').any(|l| l == b"READY=1") => {
                    return Ok(parsec)
                }
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => return Err(e.into()),
            }
            if let Some(status) = parsec.child.try_wait()? {
                let log = std::fs::read_to_string(dir.join("parsec.log")).unwrap_or_default();
                bail!(
                    "parsec-service exited ({status}) before READY=1: {}",
                    log.trim()
                );
            }
        }
    }

    /// Run `parsec-tool ARGS` against this service; its standard output.
    fn tool(&self, tool: &Path, args: &[&str]) -> Result<String> {
        let mut cmd = Command::new(tool);
        cmd.args(args)
            .env("PARSEC_SERVICE_ENDPOINT", &self.endpoint)
            .env("RUST_LOG", "error");
        Ok(String::from_utf8(output(&mut cmd, &[])?)?)
    }
}

impl Drop for Parsec {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `clevis decrypt` of a JWE sealed by clevis's tpm2 pin (PCR 7) on the baseline swtpm, vs
/// GetSecret of one secret, and vs the daemon's start to `READY=1` (which also unseals from a
/// TPM before it serves).
fn clevis(w: &mut World, s: &Settings, r: &mut Report) -> Result<()> {
    for tool in ["clevis", "clevis-decrypt-tpm2", "jose"] {
        ensure!(
            on_path(tool),
            "{tool} is not installed (`scripts/bench --peers` installs Debian's clevis and \
             clevis-tpm2)"
        );
    }
    // clevis's tpm2 pin runs tpm2-tools, which take the TPM from TPM2TOOLS_TCTI: the swtpm
    // the baselines use (Keyward's own swtpm is held by the daemon).
    let tcti = w.raw_tpm.tcti();
    let jwe = output(
        Command::new("clevis")
            .args(["encrypt", "tpm2", r#"{"pcr_bank":"sha256","pcr_ids":"7"}"#])
            .env("TPM2TOOLS_TCTI", &tcti),
        SECRET,
    )?;
    let decrypt = || -> Result<()> {
        let value = output(
            Command::new("clevis")
                .arg("decrypt")
                .env("TPM2TOOLS_TCTI", &tcti),
            &jwe,
        )?;
        ensure!(value == SECRET, "clevis decrypt returned another value");
        Ok(())
    };
    let mut slot = [()];
    let mut kw = w.kw.clients(1)?;
    let c = compare(
        s.plan,
        |d| run_clients(&mut slot, d, |_: &mut ()| decrypt()),
        |d| {
            run_clients(&mut kw, d, |c: &mut Client| {
                let reply = c.get_secret("bench/secret", None)?;
                ensure!(
                    reply.value.expose() == SECRET,
                    "GetSecret returned another value"
                );
                Ok(())
            })
        },
    )?;
    peer_row(
        r,
        "a TPM-sealed secret, 1 client: GetSecret over Varlink",
        "clevis decrypt of a tpm2 JWE (PCR 7)",
        "clevis decrypt",
        c,
    );
    drop(kw);
    let (mut clevis_times, mut start_times) = (Vec::new(), Vec::new());
    for _ in 0..s.restarts {
        let t = Instant::now();
        decrypt()?;
        clevis_times.push(t.elapsed());
        start_times.push(w.kw.timed_restart()?);
    }
    let pairs: Vec<f64> = clevis_times
        .iter()
        .zip(&start_times)
        .map(|(c, k)| k.as_secs_f64() / c.as_secs_f64())
        .collect();
    r.row(
        "keywardd start → READY=1 (unsealed from swtpm) vs one clevis decrypt",
        &format!("median of {}", s.restarts),
        "clevis decrypt of a tpm2 JWE (PCR 7)",
        Unit::Secs,
        (median(&clevis_times), median(&start_times)),
        &pairs,
        Goal::Info,
    );
    Ok(())
}

/// `systemd-creds decrypt` of a credential encrypted with a host key (`--with-key=host`, the
/// key in a file of this run through `SYSTEMD_CREDENTIAL_SECRET`) vs a fetch from Keyward's
/// credential socket, one client each.
fn systemd_creds(w: &mut World, s: &Settings, r: &mut Report) -> Result<()> {
    ensure!(
        on_path("systemd-creds"),
        "systemd-creds is not installed (Debian's systemd package)"
    );
    let files = tempfile::Builder::new()
        .prefix("creds-")
        .tempdir_in(w.scratch.path())?;
    let secret = files.path().join("credential.secret");
    let plain = files.path().join("plain");
    let sealed = files.path().join("token.cred");
    std::fs::write(&plain, CREDENTIAL)?;
    let name = format!("--name={CREDENTIAL_ID}");
    output(
        Command::new("systemd-creds")
            .args(["encrypt", "--with-key=host", &name])
            .arg(&plain)
            .arg(&sealed)
            .env("SYSTEMD_CREDENTIAL_SECRET", &secret),
        &[],
    )?;
    ensure!(
        secret.is_file(),
        "systemd-creds did not use the host key at SYSTEMD_CREDENTIAL_SECRET ({})",
        secret.display()
    );
    let decrypt = || -> Result<()> {
        let value = output(
            Command::new("systemd-creds")
                .args(["decrypt", &name])
                .arg(&sealed)
                .arg("-")
                .env("SYSTEMD_CREDENTIAL_SECRET", &secret),
            &[],
        )?;
        ensure!(
            value == CREDENTIAL,
            "systemd-creds decrypt returned another value"
        );
        Ok(())
    };
    let socket = w.kw.keywardd.credentials_socket();
    let fetch = || -> Result<()> {
        let value = credentials::fetch(&socket, UNIT, CREDENTIAL_ID)?;
        ensure!(
            value == CREDENTIAL,
            "a credential fetch got {} bytes",
            value.len()
        );
        Ok(())
    };
    let (mut a, mut b) = ([()], [()]);
    let c = compare(
        s.plan,
        |d| run_clients(&mut a, d, |_: &mut ()| decrypt()),
        |d| run_clients(&mut b, d, |_: &mut ()| fetch()),
    )?;
    peer_row(
        r,
        "a service credential, 1 client: a credential-socket fetch",
        "systemd-creds decrypt, host key",
        "systemd-creds decrypt",
        c,
    );
    Ok(())
}

/// A peer's throughput row (Keyward / peer, for information) and both sides' latencies.
fn peer_row(r: &mut Report, path: &str, peer: &str, side: &str, c: Compared) {
    let pairs = c.pairs;
    let (b, k) = (c.base.stats(), c.keyward.stats());
    r.row(
        path,
        "throughput",
        peer,
        Unit::PerSec,
        (b.rate, k.rate),
        &pairs,
        Goal::Info,
    );
    r.latency(path, side, b, k);
}

/// Run `cmd` with `input` on its standard input; its standard output, or an error with its
/// standard error when it fails.
fn output(cmd: &mut Command, input: &[u8]) -> Result<Vec<u8>> {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))?;
    // Small inputs (a JWE, a few bytes) fit in the pipe: written before anything is read.
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(input)?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{:?} failed ({}): {}",
            cmd.get_program(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out.stdout)
}

/// Whether `name` is an executable file in a `PATH` directory.
fn on_path(name: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(name).is_file()))
}

/// Processes started and waited for per second, one at a time, for `dur`.
fn spawn_rate(dur: Duration) -> Result<f64> {
    let mut slot = [()];
    let sample: Sample = run_clients(&mut slot, dur, |_: &mut ()| {
        let status = Command::new("/bin/true").status()?;
        ensure!(status.success(), "/bin/true failed");
        Ok(())
    })?;
    Ok(sample.rate())
}
