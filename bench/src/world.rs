//! The world a run measures in: the baselines' swtpm and SoftHSM token (loaded in this process),
//! and release `keywardd`s ([`Daemon`]), each on an swtpm and a token of its own with a vault,
//! signing keys and secrets, started through the integration-test fixtures.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, ensure, Context as _, Result};
use keyward::api::{KeyAlgorithm, KeyslotKind, SecretString, SlotSpec};
use keyward::Client;
use keyward_tests::keywardd::{Keywardd, Setup, ROOT_ADMIN_POLICY};
use keyward_tests::softhsm::SoftHsm;
use keyward_tests::swtpm::Swtpm;
use keyward_tests::uki;
use keywardd::identity::status_field;
use tokio::runtime::Runtime;

use crate::fill;
use crate::measure::rss;
use crate::raw::pkcs11::RawToken;

/// The echo server's rates (requests a second), measured by the GetSecret phase.
#[derive(Debug, Default, Clone, Copy)]
pub struct EchoRates {
    /// At one client: each request waits for the one before, so this is one round trip's time.
    pub one: Option<f64>,
    /// At 32 clients: every core is busy, so this is what one round trip costs in CPU.
    pub busy: Option<f64>,
}

/// The value GetSecret returns: 32 bytes, a typical password or token.
pub const SECRET: &[u8] = b"bench-secret-value-0123456789abc";
/// The value the credential socket serves.
pub const CREDENTIAL: &[u8] = b"credential-of-bench.service-0001";
/// What Sign signs.
pub const SIGN_DATA: &[u8] = b"a release manifest digest, say..";
/// The unit and credential id the fetchers ask for, as systemd would.
pub const UNIT: &str = "bench.service";
/// The credential id (`LoadCredential=token:…`).
pub const CREDENTIAL_ID: &str = "token";
/// The `[limits]` of the benchmark's daemons: room for the 256-client phase (all of them
/// root's, one uid, whose default share is 64 of 256 connections) and its 256 concurrent
/// signers (the default device queue is 64).
pub const LIMITS: &str =
    "max_connections = 320\nmax_connections_per_uid = 300\nroot_reserve = 16\ndevice_queue = 512";

/// Everything a run starts, kept alive until it ends.
pub struct World {
    pub rt: Runtime,
    pub scratch: tempfile::TempDir,
    /// The cryptoki baseline's token, loaded in this process.
    pub raw: RawToken,
    /// The TPM baselines' swtpm.
    pub raw_tpm: Swtpm,
    /// The daemon every phase measures (and the large vault of the scale phase).
    pub kw: Daemon,
    /// The echo server's rates at one client and at 32, once the GetSecret phase has
    /// measured them: the time of one Unix-socket round trip, and (with every core busy)
    /// its CPU, for [`crate::phases`]' ceilings.
    pub echo_rate: EchoRates,
    _raw_token: SoftHsm,
}

impl World {
    /// The baseline token loaded in this process, the baselines' swtpm, and the daemon.
    pub fn start() -> Result<World> {
        raise_fd_limit()?;
        let raw_token = SoftHsm::new("raw");
        // SoftHSM reads SOFTHSM2_CONF once, at C_Initialize: set it while this process is still
        // single-threaded, before anything loads the module. The daemons get their own tokens
        // through their configs.
        std::env::set_var("SOFTHSM2_CONF", raw_token.conf());
        let raw = RawToken::open(
            hsm_shim::pkcs11::SOFTHSM_MODULE,
            raw_token.label(),
            raw_token.pin().expose(),
        )?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("starting the runtime")?;
        let raw_tpm = Swtpm::start();
        let kw = Daemon::start("keyward")?;
        // For `perf record -p PID` and friends while a phase runs.
        eprintln!(
            "keywardd pid {} (its files in {})",
            kw.keywardd.pid(),
            kw.keywardd.dir().display()
        );
        Ok(World {
            rt,
            scratch: tempfile::Builder::new()
                .prefix("keyward-bench-")
                .tempdir()?,
            raw,
            raw_tpm,
            kw,
            echo_rate: EchoRates::default(),
            _raw_token: raw_token,
        })
    }
}

/// A `keywardd` on an swtpm and a SoftHSM token of its own, with a vault (TPM, token and
/// 1-of-1 recovery keyslots), three signing keys, two secrets and the credential socket.
pub struct Daemon {
    pub keywardd: Keywardd,
    /// The current share of the vault's recovery slot (a rekey replaces it).
    share: String,
    /// Secrets `fill/0..filled` are in the vault.
    filled: u64,
    /// Highest `VmHWM` seen.
    pub peak_rss: u64,
    // The daemon's devices; dropping them stops them.
    _tpm: Swtpm,
    _token: SoftHsm,
}

impl Daemon {
    /// Start the devices and the daemon, and set up the vault. `label` names the token.
    pub fn start(label: &str) -> Result<Daemon> {
        let tpm = Swtpm::start();
        let token = SoftHsm::new(label);
        let mut policy = ROOT_ADMIN_POLICY.to_owned();
        policy.push_str(
            "\n[[rule]]\nwho = { uid = 0 }\nallow = [\"encrypt\", \"decrypt\"]\ntransit = [\"*\"]\n",
        );
        policy.push_str(&format!(
            "\n[[credential]]\nunit = \"{UNIT}\"\nid = \"{CREDENTIAL_ID}\"\nsecret = \"bench/credential\"\n"
        ));
        let keywardd = Setup::new()
            .tpm("tpm", &tpm)
            .token("hsm", &token)
            .unseal_order(&["tpm"])
            .policy(&policy)
            .credentials(30)
            .ssh_agent()
            .limits(LIMITS)
            .log_filter("warn")
            .start();
        let mut c = Client::connect(keywardd.socket())?;
        let slot = |kind: KeyslotKind, device: Option<&str>| SlotSpec {
            device: device.map(str::to_owned),
            ..SlotSpec::new(kind)
        };
        let init = c.init(vec![
            slot(KeyslotKind::Tpm2, Some("tpm")),
            slot(KeyslotKind::Pkcs11, Some("hsm")),
            SlotSpec {
                threshold: Some(1),
                shares: Some(1),
                ..slot(KeyslotKind::Recovery, None)
            },
        ])?;
        let share = first_share(&init.recovery_shares)?;
        c.confirm_recovery(vec![SecretString::new(share.as_str())])?;
        c.create_key("p256-hsm", "hsm", KeyAlgorithm::EcdsaP256)?;
        c.create_key("ed25519-hsm", "hsm", KeyAlgorithm::Ed25519)?;
        c.create_key("p256-tpm", "tpm", KeyAlgorithm::EcdsaP256)?;
        c.put_secret("bench/secret", SECRET)?;
        c.put_secret("bench/credential", CREDENTIAL)?;
        c.request::<keyward::api::methods::CreateTransitKey>(&keyward::api::TransitKeyParams {
            name: "bench-transit".try_into()?,
        })?;
        Ok(Daemon {
            keywardd,
            share,
            filled: 0,
            peak_rss: 0,
            _tpm: tpm,
            _token: token,
        })
    }

    /// `n` connections to the API socket.
    pub fn clients(&self, n: usize) -> Result<Vec<Client>> {
        connect(self.keywardd.socket(), n)
    }

    /// Secrets `fill/0..` in the vault.
    pub fn filled(&self) -> u64 {
        self.filled
    }

    /// Add secrets up to `n` with [`fill::fill`] (through the API of the running daemon).
    /// Returns the fill's time, or `None` when there were `n` already.
    pub fn fill_to(&mut self, n: u64) -> Result<Option<Duration>> {
        if self.filled >= n {
            return Ok(None);
        }
        let took = fill::fill(self.keywardd.socket(), self.filled, n)?;
        self.filled = n;
        Ok(Some(took))
    }

    /// `Rekey` and the `ConfirmRecovery` that puts it in force, timed together; keeps the new
    /// recovery share.
    pub fn rekey(&mut self, c: &mut Client) -> Result<Duration> {
        let t = Instant::now();
        let reply = c.rekey(None)?;
        let share = first_share(&reply.recovery_shares)?;
        let confirmed = c.confirm_recovery(vec![SecretString::new(share.as_str())])?;
        let took = t.elapsed();
        ensure!(confirmed.rekeyed, "the confirmed rekey did not take effect");
        self.share = share;
        Ok(took)
    }

    /// Stop the daemon, start it again and time spawn → `READY=1`; check it came up unsealed.
    pub fn timed_restart(&mut self) -> Result<Duration> {
        self.track_rss()?;
        timed_restart(&mut self.keywardd)
    }

    /// The daemon's peak RSS so far in this process's life (`VmHWM`), remembered across
    /// restarts in [`Daemon::peak_rss`].
    pub fn track_rss(&mut self) -> Result<u64> {
        let (hwm, _) = rss(self.keywardd.pid())?;
        self.peak_rss = self.peak_rss.max(hwm);
        Ok(hwm)
    }
}

/// Stop `keywardd`, start it again and time spawn → `READY=1`; check it came up unsealed.
fn timed_restart(keywardd: &mut Keywardd) -> Result<Duration> {
    keywardd.stop();
    let t = Instant::now();
    keywardd.start();
    let took = t.elapsed();
    check_unsealed(keywardd)?;
    Ok(took)
}

/// One Status round trip (the vault must be open), then wait until the daemon catches
/// SIGTERM: keywardd sends `READY=1` a moment before it installs its handler, and a stop in
/// between would kill it instead of draining it (which the fixture reports as a failure).
fn check_unsealed(keywardd: &Keywardd) -> Result<()> {
    let status = Client::connect(keywardd.socket())?.status()?;
    ensure!(
        !status.sealed,
        "keywardd came up sealed: {:?}",
        status.reason
    );
    wait_catches_sigterm(keywardd.pid())
}

/// A `keywardd` on an swtpm of its own whose vault has a single tpm2 keyslot: bound to PCR 7
/// (the device default), and with `signed` also to PCR 11 policies signed by a vendor key
/// with `systemd-measure sign` (the image booted into the swtpm, its signature configured).
/// Two of them differ only in the slot's policy, for the start-up comparison.
pub struct SlotDaemon {
    keywardd: Keywardd,
    _tpm: Swtpm,
    _files: tempfile::TempDir,
}

impl SlotDaemon {
    /// Start the swtpm and the daemon, and make the vault.
    pub fn start(signed: bool) -> Result<SlotDaemon> {
        let files = tempfile::Builder::new()
            .prefix("keyward-bench-slot-")
            .tempdir()?;
        let mut tpm = Swtpm::start();
        let mut spec = SlotSpec {
            device: Some("tpm".into()),
            ..SlotSpec::new(KeyslotKind::Tpm2)
        };
        let setup = if signed {
            let key = uki::keypair(files.path(), "vendor");
            let image = uki::Uki::new(files.path(), "6.1.0-1");
            let signature = files.path().join("tpm2-pcr-signature.json");
            image.sign(&tpm, &key, &signature);
            image.boot(&mut tpm);
            spec.pcr_public_key = Some(std::fs::read_to_string(&key.1)?);
            Setup::new().tpm_with(
                "tpm",
                &tpm,
                &format!("pcr_signature = {:?}", signature.display().to_string()),
            )
        } else {
            Setup::new().tpm("tpm", &tpm)
        };
        let keywardd = setup.unseal_order(&["tpm"]).log_filter("warn").start();
        let init = Client::connect(keywardd.socket())?.init(vec![spec])?;
        ensure!(
            init.keyslots
                .first()
                .and_then(|k| k.signed_pcrs.as_ref())
                .is_some()
                == signed,
            "the keyslot's signed PCRs are not as asked"
        );
        Ok(SlotDaemon {
            keywardd,
            _tpm: tpm,
            _files: files,
        })
    }

    /// Stop the daemon, start it again and time spawn → `READY=1`; check it came up unsealed.
    pub fn timed_restart(&mut self) -> Result<Duration> {
        timed_restart(&mut self.keywardd)
    }
}

/// The one share of the 1-of-1 recovery slot.
fn first_share(shares: &[keyward::api::SecretString]) -> Result<String> {
    Ok(shares
        .first()
        .ok_or_else(|| anyhow!("no recovery share came back"))?
        .expose()
        .to_owned())
}

pub fn connect(path: &Path, n: usize) -> Result<Vec<Client>> {
    (0..n)
        .map(|_| Client::connect(path).map_err(Into::into))
        .collect()
}

pub fn clients_label(n: usize) -> String {
    format!("{n} client{}", if n == 1 { "" } else { "s" })
}

/// Wait (at most a few seconds) until process `pid` has a handler for SIGTERM: bit 15 of
/// `SigCgt` in `/proc/PID/status`. The handler is installed microseconds after readiness, so
/// the wait yields the CPU between probes rather than pausing for a set time.
fn wait_catches_sigterm(pid: u32) -> Result<()> {
    const SIGTERM_BIT: u64 = 1 << (15 - 1);
    let path = format!("/proc/{pid}/status");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        let caught = status_field(&text, "SigCgt")
            .and_then(|hex| u64::from_str_radix(hex, 16).ok())
            .ok_or_else(|| anyhow!("{path} has no SigCgt"))?;
        if caught & SIGTERM_BIT != 0 {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "keywardd (pid {pid}) does not handle SIGTERM 10 s after READY=1"
        );
        std::thread::yield_now();
    }
}

/// 500 fetchers each hold a socket and a file: more than the usual soft limit of 1024 fds.
fn raise_fd_limit() -> Result<()> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    Ok(())
}
