//! Device faults under a running `keywardd`: an swtpm killed in the middle of signs and of
//! unseals, a TPM that hangs, a SoftHSM token directory that disappears (while running and at
//! start), a wrong token PIN, and PCRs extended after enrollment. Each fault lands on the real
//! daemon, a real swtpm and a real SoftHSM token; a fault "during" an operation is placed there
//! by a [`Gate`] that holds the TPM command until the test has done its damage, never by timing.
//!
//! What every test asks: is the error precise, does the daemon keep serving what does not need
//! the faulty device, and does it recover when the device is back, without a restart?
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::Command;
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use hsm_shim::pkcs11::SOFTHSM_MODULE;
use hsm_shim::{KeyAlgorithm, PublicKeyDer};
use keyward::api::ApiError;
use keyward::varlink::{Client, ClientError};
use keyward_tests::keywardd::{has_field, Keywardd, Output, Setup};
use keyward_tests::softhsm::SoftHsm;
use keyward_tests::swtpm::{Gate, Swtpm, CC_SIGN, CC_UNSEAL};
use serde_json::Value;

/// The device timeout the daemons here run with (`[limits] device_timeout_secs`): short, so
/// that "no call outlives it" is quick to check.
const DEVICE_TIMEOUT: Duration = Duration::from_secs(3);

/// How long a device may take to come back: the daemon reopens with a backoff that starts at
/// 250 ms and doubles, so a device back within seconds is reopened within seconds.
const DEADLINE: Duration = Duration::from_secs(90);

/// Write the config of `setup`, route the TPM through `gate` if given, set the device timeout
/// to [`DEVICE_TIMEOUT`], and start the daemon.
fn start(setup: Setup, gate: Option<(&Swtpm, &Gate)>) -> Keywardd {
    start_with_timeout(setup, gate, DEVICE_TIMEOUT)
}

fn start_with_timeout(setup: Setup, gate: Option<(&Swtpm, &Gate)>, timeout: Duration) -> Keywardd {
    let mut d = setup.prepare();
    let path = d.config_path().to_owned();
    let mut config = std::fs::read_to_string(&path).unwrap();
    if let Some((tpm, gate)) = gate {
        let direct = format!("\"{}\"", tpm.tcti());
        assert!(config.contains(&direct), "{config}");
        config = config.replace(&direct, &format!("\"{}\"", gate.tcti()));
    }
    config.push_str(&format!(
        "\n[limits]\ndevice_timeout_secs = {}\n",
        timeout.as_secs()
    ));
    std::fs::write(&path, config).unwrap();
    d.start();
    d
}

fn client(d: &Keywardd) -> Client {
    let mut c = Client::connect(d.socket()).unwrap();
    // A call that hangs fails the test instead of hanging it.
    c.set_timeout(Some(DEADLINE)).unwrap();
    c
}

/// The `DeviceUnavailable` a call failed with, or a panic naming what it was instead.
fn unavailable<T: std::fmt::Debug>(what: &str, r: Result<T, ClientError>) -> (String, String) {
    match r {
        Err(ClientError::Api(ApiError::DeviceUnavailable { device, reason })) => (device, reason),
        other => panic!("{what}: expected DeviceUnavailable, got {other:?}"),
    }
}

fn device<'a>(status: &'a keyward::api::StatusReply, name: &str) -> &'a keyward::api::DeviceStatus {
    status
        .devices
        .iter()
        .find(|d| d.name == name)
        .unwrap_or_else(|| panic!("no device {name} in {status:?}"))
}

fn verify_p256(public: &[u8], message: &[u8], signature: &[u8]) {
    keyward_tests::openssl::verify(
        &PublicKeyDer(public.to_vec()),
        KeyAlgorithm::EcdsaP256,
        message,
        signature,
    )
    .unwrap();
}

fn get(c: &mut Client, name: &str) -> Vec<u8> {
    c.get_secret(name, None).unwrap().value.expose().to_vec()
}

/// The error name and parameters of a `--json` CLI failure.
fn json_error(out: &Output) -> (String, Value) {
    let doc: Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {:?} / {}", out.stdout, out.stderr));
    (
        doc["error"]["name"].as_str().unwrap_or_default().to_owned(),
        doc["error"]["parameters"].clone(),
    )
}

/// Write a PIN file the way PIN files must be: mode 0600.
fn private_file(path: &Path, text: &str) {
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .unwrap();
    std::io::Write::write_all(&mut f, text.as_bytes()).unwrap();
}

fn shares_of(init: &Value) -> Vec<String> {
    init["recovery_shares"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_owned())
        .collect()
}

/// Many signs in flight on the TPM when swtpm dies: each fails with `DeviceUnavailable` well
/// within the device timeout, nothing hangs, everything that does not need the TPM keeps
/// working, and once swtpm is back on the same state the same key signs again, same daemon.
#[test]
fn swtpm_killed_during_signs_fails_each_fast_and_signing_resumes_without_a_restart() {
    const SIGNERS: usize = 6;
    let mut tpm = Swtpm::start();
    let gate = Gate::start(&tpm);
    let token = SoftHsm::new("kw-faults-sign");
    let d = start(
        Setup::new().tpm("tpm", &tpm).token("hsm", &token),
        Some((&tpm, &gate)),
    );
    d.json(&["init", "--pkcs11", "hsm"]);
    let pid = d.pid();
    let mut c = client(&d);
    c.put_secret("app/db", b"served while the TPM is gone")
        .unwrap();
    let tpm_public = c
        .create_key("tpm-k", "tpm", KeyAlgorithm::EcdsaP256)
        .unwrap();
    let hsm_public = c
        .create_key("hsm-k", "hsm", KeyAlgorithm::EcdsaP256)
        .unwrap();

    // Signers on their own connections, each until its first failure.
    let signed = Arc::new((Mutex::new(0u64), Condvar::new()));
    let (done_tx, done) = mpsc::channel();
    for i in 0..SIGNERS {
        let socket = d.socket().to_owned();
        let signed = Arc::clone(&signed);
        let done_tx = done_tx.clone();
        let public = tpm_public.clone();
        std::thread::spawn(move || {
            let mut c = Client::connect(&socket).unwrap();
            c.set_timeout(Some(DEADLINE)).unwrap();
            let mut ok = 0u64;
            loop {
                let message = format!("signer {i} message {ok}");
                let started = Instant::now();
                match c.sign("tpm-k", message.as_bytes(), false) {
                    Ok(signature) => {
                        verify_p256(&public, message.as_bytes(), &signature);
                        ok += 1;
                        let (count, cv) = &*signed;
                        *count.lock().unwrap() += 1;
                        cv.notify_all();
                    }
                    Err(e) => {
                        let _ = done_tx.send((i, ok, e, started, Instant::now()));
                        return;
                    }
                }
            }
        });
    }
    drop(done_tx);

    // Under load (some signatures made), hold the next Sign at the gate: it is in flight.
    {
        let (count, cv) = &*signed;
        let deadline = Instant::now() + DEADLINE;
        let mut n = count.lock().unwrap();
        while *n < 20 {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "the signers made only {} signatures", *n);
            n = cv.wait_timeout(n, left).unwrap().0;
        }
    }
    gate.hold(CC_SIGN);
    assert!(
        gate.wait_held(Instant::now() + DEADLINE),
        "no Sign reached the gate"
    );
    // While the TPM is stuck, the daemon serves what does not need it.
    assert_eq!(get(&mut c, "app/db"), b"served while the TPM is gone");
    let signature = c.sign("hsm-k", b"token meanwhile", false).unwrap();
    verify_p256(&hsm_public, b"token meanwhile", &signature);

    tpm.stop();
    gate.release();
    let killed = Instant::now();

    let mut results = Vec::new();
    for _ in 0..SIGNERS {
        let r = done
            .recv_timeout(DEADLINE)
            .expect("a signer hung after the TPM died");
        results.push(r);
    }
    let mut total_ok = 0;
    for (i, ok, e, started, ended) in results {
        total_ok += ok;
        let (device, reason) = unavailable(&format!("signer {i}"), Err::<(), _>(e));
        assert_eq!(device, "tpm", "signer {i}: {reason}");
        assert!(!reason.is_empty());
        // Nothing waits out the device timeout: a dead TPM fails calls at once.
        let waited = ended.duration_since(started.max(killed));
        assert!(
            waited < DEVICE_TIMEOUT,
            "signer {i} waited {waited:?} after the kill ({reason})"
        );
        eprintln!("signer {i}: {ok} signatures, then after {waited:?}: {reason}");
    }
    assert!(total_ok >= 20);

    let status = c.status().unwrap();
    assert!(!device(&status, "tpm").available, "{status:?}");
    assert!(device(&status, "hsm").available, "{status:?}");
    assert!(!status.sealed);
    let (device_name, _) = unavailable("sign with the TPM gone", c.sign("tpm-k", b"x", false));
    assert_eq!(device_name, "tpm");
    assert_eq!(get(&mut c, "app/db"), b"served while the TPM is gone");
    c.put_secret("app/new", b"written while the TPM is gone")
        .unwrap();
    let signature = c.sign("hsm-k", b"token still signs", false).unwrap();
    verify_p256(&hsm_public, b"token still signs", &signature);

    // The same TPM state back on the same ports: the daemon reopens it by itself.
    let mark = d.log_mark();
    tpm.restart();
    d.wait_device_open("tpm", mark, DEADLINE);
    let message = b"the TPM is back";
    let signature = c
        .sign("tpm-k", message, false)
        .expect("tpm-k signs once the TPM is reopened");
    verify_p256(&tpm_public, message, &signature);
    assert!(device(&c.status().unwrap(), "tpm").available);
    assert_eq!(d.pid(), pid, "the same keywardd throughout");
}

/// A TPM that stops answering (the Sign is held, the TPM stays up): the call fails at the
/// device timeout, not later; calls queued behind it too; the daemon serves everything else
/// meanwhile; once the TPM answers again, signing works with no reopen and no restart.
#[test]
fn a_hung_tpm_fails_calls_at_the_device_timeout_and_the_daemon_keeps_serving() {
    let tpm = Swtpm::start();
    let gate = Gate::start(&tpm);
    let token = SoftHsm::new("kw-faults-hung");
    let d = start(
        Setup::new().tpm("tpm", &tpm).token("hsm", &token),
        Some((&tpm, &gate)),
    );
    d.json(&["init", "--pkcs11", "hsm"]);
    let mut c = client(&d);
    c.put_secret("app/db", b"not stuck").unwrap();
    let tpm_public = c
        .create_key("tpm-k", "tpm", KeyAlgorithm::EcdsaP256)
        .unwrap();

    gate.hold(CC_SIGN);
    let (tx, rx) = mpsc::channel();
    for i in 0..2 {
        let socket = d.socket().to_owned();
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut c = Client::connect(&socket).unwrap();
            c.set_timeout(Some(DEADLINE)).unwrap();
            let started = Instant::now();
            let r = c.sign("tpm-k", format!("hung {i}").as_bytes(), false);
            let _ = tx.send((r, started.elapsed()));
        });
    }
    assert!(gate.wait_held(Instant::now() + DEADLINE));
    // The TPM is stuck now; the daemon is not.
    let started = Instant::now();
    assert_eq!(get(&mut c, "app/db"), b"not stuck");
    assert!(!c.status().unwrap().sealed);
    assert!(started.elapsed() < DEVICE_TIMEOUT);

    for _ in 0..2 {
        let (r, took) = rx
            .recv_timeout(DEADLINE)
            .expect("a call outlived the device timeout");
        let (device, reason) = unavailable("sign on a hung TPM", r);
        assert_eq!(device, "tpm");
        assert!(reason.contains("timed out"), "{reason}");
        assert!(
            took >= DEVICE_TIMEOUT && took < DEVICE_TIMEOUT + Duration::from_secs(5),
            "failed after {took:?}, the device timeout is {DEVICE_TIMEOUT:?}"
        );
        eprintln!("hung sign failed after {took:?}: {reason}");
    }

    // The held Sign goes on; a call now queues behind it and is answered: no reopen needed.
    gate.release();
    let signature = c
        .sign("tpm-k", b"answering again", false)
        .expect("tpm-k signs once the TPM answers");
    verify_p256(&tpm_public, b"answering again", &signature);
    assert_eq!(get(&mut c, "app/db"), b"not stuck");
}

/// swtpm dies while the unattended unseal at start is in the TPM: the daemon still comes up,
/// sealed, says why (Status and `STATUS=`), answers `Sealed`, and opens the vault from the TPM
/// once it is back, without a restart.
#[test]
fn swtpm_killed_during_the_unattended_unseal_leaves_the_vault_sealed_until_the_tpm_is_back() {
    let mut tpm = Swtpm::start();
    let gate = Gate::start(&tpm);
    let mut d = start(Setup::new().tpm("tpm", &tpm), Some((&tpm, &gate)));
    d.json(&["init", "--tpm2", "tpm", "--recovery", "2/3"]);
    {
        let mut c = client(&d);
        c.put_secret("app/db", b"behind the TPM").unwrap();
    }
    d.stop();

    gate.hold(CC_UNSEAL);
    let starting = std::thread::spawn(move || {
        d.start();
        d
    });
    assert!(
        gate.wait_held(Instant::now() + DEADLINE),
        "the unattended unseal never reached the TPM"
    );
    tpm.stop();
    gate.release();
    let d = starting.join().expect("keywardd did not come up");
    let pid = d.pid();

    let mut c = client(&d);
    let status = c.status().unwrap();
    assert!(status.sealed, "{status:?}");
    let reason = status.reason.clone().unwrap_or_default();
    assert!(
        reason.contains("tpm") && reason.contains("unavailable"),
        "the reason names the device and what is wrong: {reason}"
    );
    let line = d.statuses().last().cloned().unwrap_or_default();
    assert!(
        line.starts_with("sealed") && line.contains("tpm"),
        "STATUS= says why: {line:?}"
    );
    match c.get_secret("app/db", None) {
        Err(ClientError::Api(ApiError::Sealed { reason })) => assert!(reason.contains("tpm")),
        other => panic!("a sealed vault answers Sealed: {other:?}"),
    }

    // Once the TPM is reopened, the next request runs the unattended unseal again first.
    let mark = d.log_mark();
    tpm.restart();
    d.wait_device_open("tpm", mark, DEADLINE);
    let status = c.status().unwrap();
    assert!(!status.sealed, "{status:?}");
    let by = status.unsealed_by.unwrap_or_default();
    assert!(by.contains("tpm2"), "{by}");
    assert_eq!(get(&mut c, "app/db"), b"behind the TPM");
    assert_eq!(d.pid(), pid, "the same keywardd throughout");
}

/// `keywardd` killed while its unseal is inside the TPM, again and again: each time the TPM is
/// left holding the dead daemon's SRK, sealed object and policy session (swtpm has three
/// slots of each and no resource manager to flush them). The next daemon must clean that up
/// and unseal from the TPM, however many times it happened.
#[test]
fn a_keywardd_killed_inside_the_tpm_leaves_nothing_that_blocks_the_next_one() {
    const TIMEOUT: Duration = Duration::from_secs(1);
    let tpm = Swtpm::start();
    let gate = Gate::start(&tpm);
    let mut d = start_with_timeout(Setup::new().tpm("tpm", &tpm), Some((&tpm, &gate)), TIMEOUT);
    d.json(&["init", "--tpm2", "tpm", "--recovery", "2/3"]);
    client(&d)
        .put_secret("app/db", b"after four kills")
        .unwrap();
    for kill in 0..4 {
        d.stop();
        // The unseal at start stops at the gate, its session and objects loaded; the call
        // times out, the daemon comes up sealed, and dies there.
        gate.hold(CC_UNSEAL);
        d.start();
        let status = client(&d).status().unwrap();
        // READY=1 comes after the unattended unseal, so the Unseal is at the gate by now, or
        // never got that far.
        assert!(
            gate.wait_held(Instant::now()),
            "kill {kill}: the unseal never reached the TPM: {status:?}"
        );
        assert!(status.sealed, "kill {kill}: {status:?}");
        assert!(
            status.reason.unwrap_or_default().contains("timed out"),
            "kill {kill}"
        );
        d.kill();
        gate.release();
    }
    d.start();
    let status = client(&d).status().unwrap();
    assert!(!status.sealed, "{status:?}\n{}", d.log());
    assert!(status.unsealed_by.unwrap_or_default().contains("tpm2"));
    assert_eq!(get(&mut client(&d), "app/db"), b"after four kills");
    assert!(
        d.plain_log()
            .contains("flushed TPM objects and sessions a previous owner left loaded"),
        "the leftovers were found and flushed"
    );
}

/// swtpm dies while an admin's `keyward unseal --pin-file` is in the TPM: the unseal fails as
/// `DeviceUnavailable` (not as a wrong PIN), the daemon stays up and sealed, and the same PIN
/// opens the vault once the TPM is back, without a restart.
#[test]
fn swtpm_killed_during_a_pin_unseal_is_device_unavailable_and_the_pin_works_once_it_is_back() {
    let mut tpm = Swtpm::start();
    let gate = Gate::start(&tpm);
    let mut d = start(Setup::new().tpm("tpm", &tpm), Some((&tpm, &gate)));
    d.json(&["init", "--recovery", "2/3"]);
    let pin = d.dir().join("tpm-pin");
    private_file(&pin, "8642-pin\n");
    d.json(&[
        "enroll",
        "tpm2",
        "--device",
        "tpm",
        "--pin-file",
        pin.to_str().unwrap(),
    ]);
    client(&d).put_secret("app/db", b"behind a PIN").unwrap();
    d.restart();
    let pid = d.pid();
    assert!(client(&d).status().unwrap().sealed);

    gate.hold(CC_UNSEAL);
    let mut cmd = d.cli();
    cmd.args(["--json", "unseal", "--pin-file"]).arg(&pin);
    let unsealing = std::thread::spawn(move || keyward_tests::keywardd::run_cli(&mut cmd, b""));
    assert!(gate.wait_held(Instant::now() + DEADLINE));
    tpm.stop();
    gate.release();
    let out = unsealing.join().unwrap();
    assert_eq!(out.code, 1, "{}", out.stderr);
    let (name, parameters) = json_error(&out);
    assert_eq!(
        name, "org.keyward.Custodian.DeviceUnavailable",
        "{}",
        out.stdout
    );
    assert_eq!(parameters["device"], "tpm", "{parameters}");
    assert!(!d.log().contains("8642-pin"), "the PIN is never logged");

    let mut c = client(&d);
    assert!(c.status().unwrap().sealed);
    let mark = d.log_mark();
    tpm.restart();
    d.wait_device_open("tpm", mark, DEADLINE);
    let out = d.run(
        &["--json", "unseal", "--pin-file", pin.to_str().unwrap()],
        b"",
    );
    assert_eq!(
        out.code, 0,
        "the PIN unseals once the TPM is back: {}",
        out.stdout
    );
    let status = c.status().unwrap();
    assert!(!status.sealed);
    assert!(status.unsealed_by.unwrap_or_default().contains("PIN"));
    assert_eq!(get(&mut c, "app/db"), b"behind a PIN");
    assert_eq!(d.pid(), pid);
}

/// The token's directory disappears under a running daemon: calls on the token fail with
/// `DeviceUnavailable` saying the token stopped answering (not "key not found"), the status
/// shows it down, secrets are still served, and once the directory is back the same key signs
/// again without a restart.
#[test]
fn a_removed_token_directory_is_device_unavailable_and_the_token_recovers_when_it_is_back() {
    let token = SoftHsm::new("kw-faults-dir");
    let d = start(Setup::new().token("hsm", &token), None);
    d.json(&["init", "--pkcs11", "hsm", "--recovery", "2/3"]);
    let pid = d.pid();
    let mut c = client(&d);
    c.put_secret("app/db", b"in the store, not the token")
        .unwrap();
    let public = c
        .create_key("hsm-k", "hsm", KeyAlgorithm::EcdsaP256)
        .unwrap();
    verify_p256(&public, b"m", &c.sign("hsm-k", b"m", false).unwrap());

    let away = token.dir().join("tokens-away");
    std::fs::rename(token.token_dir(), &away).unwrap();
    let (device_name, reason) = unavailable("sign without the token", c.sign("hsm-k", b"m", false));
    assert_eq!(device_name, "hsm");
    assert!(reason.contains("stopped answering"), "{reason}");
    eprintln!("sign with the token directory gone: {reason}");
    let (device_name, _) = unavailable(
        "create a key without the token",
        c.create_key("hsm-k2", "hsm", KeyAlgorithm::EcdsaP256),
    );
    assert_eq!(device_name, "hsm");
    let status = c.status().unwrap();
    let hsm = device(&status, "hsm");
    assert!(!hsm.available, "{status:?}");
    assert!(!hsm.detail.is_empty());
    eprintln!("hsm while its directory is gone: {}", hsm.detail);
    // The vault is open and its secrets are in the store: they are still served and written.
    assert!(!status.sealed);
    assert_eq!(get(&mut c, "app/db"), b"in the store, not the token");
    c.put_secret("app/new", b"written meanwhile").unwrap();

    let mark = d.log_mark();
    std::fs::rename(&away, token.token_dir()).unwrap();
    d.wait_device_open("hsm", mark, DEADLINE);
    let signature = c
        .sign("hsm-k", b"back", false)
        .expect("hsm-k signs once the token is reopened");
    verify_p256(&public, b"back", &signature);
    assert!(device(&c.status().unwrap(), "hsm").available);
    c.create_key("hsm-k2", "hsm", KeyAlgorithm::EcdsaP256)
        .unwrap();
    assert_eq!(get(&mut c, "app/new"), b"written meanwhile");
    assert_eq!(d.pid(), pid, "the same keywardd throughout");
}

/// The token's directory is missing when the daemon starts: it comes up sealed and says which
/// device and why; once the directory is back, the token slot opens the vault, no restart.
#[test]
fn a_token_directory_missing_at_start_leaves_the_vault_sealed_until_it_is_back() {
    let token = SoftHsm::new("kw-faults-start");
    let mut d = start(Setup::new().token("hsm", &token), None);
    d.json(&["init", "--pkcs11", "hsm", "--recovery", "2/3"]);
    client(&d)
        .put_secret("app/db", b"behind the token")
        .unwrap();
    d.stop();
    let away = token.dir().join("tokens-away");
    std::fs::rename(token.token_dir(), &away).unwrap();
    d.start();
    let pid = d.pid();
    let mut c = client(&d);
    let status = c.status().unwrap();
    assert!(status.sealed, "{status:?}");
    let reason = status.reason.clone().unwrap_or_default();
    assert!(reason.contains("hsm"), "{reason}");
    assert!(!device(&status, "hsm").available);
    eprintln!("sealed because: {reason}");
    let line = d.statuses().last().cloned().unwrap_or_default();
    assert!(line.starts_with("sealed") && line.contains("hsm"), "{line}");

    // Once the token is reopened, the next request runs the unattended unseal again first.
    let mark = d.log_mark();
    std::fs::rename(&away, token.token_dir()).unwrap();
    d.wait_device_open("hsm", mark, DEADLINE);
    let status = c.status().unwrap();
    assert!(!status.sealed, "{status:?}");
    assert!(status.unsealed_by.unwrap_or_default().contains("pkcs11"));
    assert_eq!(get(&mut c, "app/db"), b"behind the token");
    assert_eq!(d.pid(), pid);
}

/// Whether SoftHSM has flagged the token's user PIN "count low" (it sets the flag on a failed
/// `C_Login` and clears it on a good one: its only record of failed tries), read by OpenSC's
/// pkcs11-tool in a process of its own.
fn pin_count_low(token: &SoftHsm) -> bool {
    let out = Command::new("pkcs11-tool")
        .env("SOFTHSM2_CONF", token.conf())
        .args(["--module", SOFTHSM_MODULE, "--list-token-slots"])
        .output()
        .expect("pkcs11-tool (apt-get install opensc)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && text.contains("token flags"),
        "{text}"
    );
    text.contains("user PIN count low")
}

/// Open attempts of device `name` that failed, as logged by its actor.
fn failed_opens(d: &Keywardd, name: &str) -> usize {
    d.plain_log()
        .lines()
        .filter(|l| is_failed_open(l, name))
        .count()
}

/// Whether a plain log line is device `name`'s actor saying an open attempt failed.
fn is_failed_open(line: &str, name: &str) -> bool {
    has_field(line, "device", name)
        && (line.contains("device unavailable") || line.contains("device still unavailable"))
}

/// A wrong PIN in the token's PIN file: the daemon comes up sealed and says "PIN incorrect"
/// with what the token reports about retries (SoftHSM: no count, only its "count low" flag).
/// The PIN is tried once and never again on the daemon's own: with the right PIN written to
/// the file afterwards, a retry would succeed and clear the token's flag; neither happens while
/// the TPM's actor, with the same backoff, demonstrably retries its device three times and
/// reopens it. `keyward unseal --pin-file` is the way in; a wrong one is refused the same way.
#[test]
fn a_wrong_token_pin_is_reported_once_and_never_retried() {
    let mut tpm = Swtpm::start();
    let token = SoftHsm::new("kw-faults-pin");
    let mut d = start(Setup::new().token("hsm", &token).tpm("tpm", &tpm), None);
    d.json(&["init", "--pkcs11", "hsm", "--recovery", "2/3"]);
    client(&d)
        .put_secret("app/db", b"behind the token PIN")
        .unwrap();
    d.stop();

    let right = std::fs::read_to_string(token.pin_file()).unwrap();
    let pins = tempfile::tempdir().unwrap();
    let write_pin = |path: &Path, pin: &str| private_file(path, pin);
    let right_file = pins.path().join("right");
    write_pin(&right_file, &right);
    let wrong_file = pins.path().join("wrong");
    write_pin(&wrong_file, "000000-wrong\n");
    assert!(!pin_count_low(&token), "a fresh token has no failed tries");

    // Start with a wrong PIN in the file and the TPM away (its actor is the control below).
    write_pin(&token.pin_file(), "000000-wrong\n");
    tpm.stop();
    d.start();
    let pid = d.pid();
    let mut c = client(&d);
    let status = c.status().unwrap();
    assert!(status.sealed, "{status:?}");
    let reason = status.reason.clone().unwrap_or_default();
    assert!(reason.contains("PIN incorrect"), "{reason}");
    let hsm = device(&status, "hsm");
    assert!(!hsm.available);
    assert!(
        hsm.detail.contains("PIN incorrect") && hsm.detail.contains("not retried"),
        "{}",
        hsm.detail
    );
    assert!(
        d.statuses().last().unwrap().contains("PIN incorrect"),
        "{:?}",
        d.statuses()
    );
    assert!(pin_count_low(&token), "the token saw one failed login");
    assert_eq!(failed_opens(&d, "hsm"), 1, "{}", d.plain_log());

    // A retry would now succeed.
    write_pin(&token.pin_file(), &right);
    // The control: the TPM's actor retries on its backoff (250 ms, then doubling). Three failed
    // opens of the TPM mean its retry timer fired twice since the start, long enough for any
    // retry of the token to have happened; then the TPM comes back and is reopened.
    let mut seen = 0;
    d.wait_log("three failed opens of the TPM", 0, DEADLINE, |l| {
        seen += usize::from(is_failed_open(l, "tpm"));
        seen >= 3
    });
    let mark = d.log_mark();
    tpm.restart();
    d.wait_device_open("tpm", mark, DEADLINE);
    assert!(device(&c.status().unwrap(), "tpm").available);
    // The unattended unseal did not come back for the token either: still sealed.
    let status = c.status().unwrap();
    assert!(status.sealed, "{status:?}");
    assert!(!device(&status, "hsm").available);
    assert_eq!(failed_opens(&d, "hsm"), 1, "the token PIN was retried");
    assert!(
        pin_count_low(&token),
        "a retry with the right PIN would have cleared it"
    );

    // An admin's wrong PIN: refused as PinIncorrect, with the count only if the token has one.
    let out = d.run(
        &[
            "--json",
            "unseal",
            "--pin-file",
            wrong_file.to_str().unwrap(),
        ],
        b"",
    );
    assert_eq!(out.code, 1, "{}", out.stderr);
    let (name, parameters) = json_error(&out);
    assert_eq!(name, "org.keyward.Custodian.PinIncorrect", "{}", out.stdout);
    // SoftHSM keeps no retry count (PKCS#11 has only the low/final-try flags, and SoftHSM sets
    // only "count low"), so none is claimed.
    assert!(parameters.get("retries_left").is_none(), "{parameters}");
    assert!(out.stderr.contains("PIN incorrect"), "{}", out.stderr);
    assert!(c.status().unwrap().sealed);
    assert_eq!(failed_opens(&d, "hsm"), 2, "one wrong PIN, one try");

    // The right one opens the token and the vault; the token's flag clears.
    let out = d.run(&["unseal", "--pin-file", right_file.to_str().unwrap()], b"");
    assert_eq!(out.code, 0, "{}", out.stderr);
    let status = c.status().unwrap();
    assert!(!status.sealed);
    assert!(status
        .unsealed_by
        .clone()
        .unwrap_or_default()
        .contains("pkcs11"));
    assert!(device(&status, "hsm").available);
    assert!(!pin_count_low(&token));
    assert_eq!(get(&mut c, "app/db"), b"behind the token PIN");
    assert_eq!(d.pid(), pid);
    let log = d.log();
    assert!(!log.contains("000000-wrong") && !log.contains(right.trim()));
}

/// PCR 7 extended after the TPM slot was enrolled: the daemon comes up sealed, says the TPM
/// slot's PCR policy no longer matches (Status and `STATUS=`), is not fooled into retrying it,
/// and recovery shares open the vault; a TPM slot enrolled anew binds to the new values.
#[test]
fn a_pcr_extended_after_enroll_leaves_the_vault_sealed_with_the_reason_and_recovery_opens_it() {
    let tpm = Swtpm::start();
    let mut d = start(Setup::new().tpm("tpm", &tpm), None);
    let init = d.json(&["init", "--tpm2", "tpm", "--recovery", "2/3"]);
    let shares = shares_of(&init);
    client(&d).put_secret("app/db", b"measured boot").unwrap();
    d.stop();
    // swtpm serves one client at a time: the daemon is stopped while tpm2-tools extends.
    tpm.extend_pcr(7);
    d.start();
    let pid = d.pid();
    let mut c = client(&d);
    let status = c.status().unwrap();
    assert!(status.sealed, "{status:?}");
    let reason = status.reason.clone().unwrap_or_default();
    assert!(
        reason.contains("keyslot 1") && reason.contains("PCR"),
        "names the slot and the PCRs: {reason}"
    );
    assert!(device(&status, "tpm").available, "the TPM itself is fine");
    let line = d.statuses().last().cloned().unwrap_or_default();
    assert!(line.starts_with("sealed") && line.contains("PCR"), "{line}");
    // Asking again does not make the TPM slot work.
    assert!(c.status().unwrap().sealed);

    for (i, share) in shares.iter().take(2).enumerate() {
        let reply = c
            .unseal(keyward::api::UnsealParams {
                recovery_share: Some(keyward::api::SecretString::new(share.as_str())),
                pin: None,
            })
            .unwrap();
        assert_eq!(reply.sealed, i == 0);
    }
    assert_eq!(get(&mut c, "app/db"), b"measured boot");

    // The remedy: a new TPM slot bound to today's PCR values, the stale one removed.
    let slot = d.json(&["enroll", "tpm2", "--device", "tpm"]);
    assert_eq!(slot["keyslot"]["kind"], "tpm2", "{slot}");
    assert_eq!(d.run(&["keyslot", "remove", "1"], b"").code, 0);
    assert_eq!(d.pid(), pid);
    d.restart();
    let status = client(&d).status().unwrap();
    assert!(!status.sealed, "{status:?}");
    assert!(status.unsealed_by.unwrap_or_default().contains("tpm2"));
}
