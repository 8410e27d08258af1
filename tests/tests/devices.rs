//! Devices through the daemon: a PIN-bound TPM keyslot that the unattended unseal must leave
//! alone, a TPM that vanishes and comes back under a running `keywardd`, and socket activation.
//! The real daemon, a real swtpm and SoftHSM, the real CLI.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use hsm_shim::{KeyAlgorithm, PublicKeyDer};
use keyward_tests::keywardd::{bin, run_cli, Keywardd, Output, Setup};
use keyward_tests::softhsm::SoftHsm;
use keyward_tests::swtpm::Swtpm;
use serde_json::Value;

/// How long a device may take to come back, or a daemon to start under activation. The
/// daemon's reopen backoff grows to 30 s; a TPM back within seconds is retried within seconds.
const DEADLINE: Duration = Duration::from_secs(90);

/// The error name and parameters of a `--json` failure.
fn json_error(out: &Output) -> (String, Value) {
    let doc: Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {:?} / {}", out.stdout, out.stderr));
    (
        doc["error"]["name"].as_str().unwrap_or_default().to_owned(),
        doc["error"]["parameters"].clone(),
    )
}

fn write_pin(dir: &Path, name: &str, pin: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, format!("{pin}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

fn get(d: &Keywardd, name: &str) -> Vec<u8> {
    let out = d.run(&["secret", "get", name], b"");
    assert_eq!(out.code, 0, "get {name}: {}", out.stderr);
    out.stdout_bytes
}

fn put(d: &Keywardd, name: &str, value: &[u8]) {
    let out = d.run(&["secret", "put", name], value);
    assert_eq!(out.code, 0, "put {name}: {}", out.stderr);
}

fn create_key(d: &Keywardd, name: &str, device: &str) -> PublicKeyDer {
    let out = d.run(
        &[
            "key",
            "create",
            name,
            "--device",
            device,
            "--algorithm",
            "ecdsa-p256",
        ],
        b"",
    );
    assert_eq!(out.code, 0, "create {name}: {}", out.stderr);
    let der = d.run(&["key", "public", name, "--der"], b"");
    assert_eq!(der.code, 0, "public {name}: {}", der.stderr);
    PublicKeyDer(der.stdout_bytes)
}

fn assert_signs(d: &Keywardd, name: &str, public: &PublicKeyDer, message: &[u8]) {
    let out = d.run(&["key", "sign", name], message);
    assert_eq!(out.code, 0, "sign with {name}: {}", out.stderr);
    keyward_tests::openssl::verify(public, KeyAlgorithm::EcdsaP256, message, &out.stdout_bytes)
        .unwrap_or_else(|e| panic!("{name}: {e}"));
}

fn device_available(d: &Keywardd, name: &str) -> bool {
    let status = d.json(&["status"]);
    status["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|dev| dev["name"] == name)
        .unwrap_or_else(|| panic!("no device {name} in {status}"))["available"]
        .as_bool()
        .unwrap()
}

#[test]
fn a_pin_bound_tpm_slot_waits_for_the_pin_and_a_wrong_pin_is_refused() {
    let tpm = Swtpm::start();
    let token = SoftHsm::new("keyward-devices-pin");
    // Only the TPM is tried unattended: the token slot would open the vault on its own.
    let mut d = Setup::new()
        .tpm("tpm", &tpm)
        .token("hsm", &token)
        .unseal_order(&["tpm"])
        .start();
    d.json(&["init", "--pkcs11", "hsm"]);
    put(&d, "app/secret", b"behind a PIN");
    let pins = tempfile::tempdir().unwrap();
    let right = write_pin(pins.path(), "right", "2468-right");
    let wrong = write_pin(pins.path(), "wrong", "1357-wrong");
    let slot = d.json(&[
        "enroll",
        "tpm2",
        "--device",
        "tpm",
        "--pin-file",
        right.to_str().unwrap(),
    ]);
    assert_eq!(slot["keyslot"]["pin"], true, "{slot}");
    assert_eq!(slot["keyslot"]["kind"], "tpm2", "{slot}");

    d.restart();
    let status = d.json(&["status"]);
    assert_eq!(
        status["sealed"], true,
        "a PIN slot must not unseal unattended: {status}"
    );
    let reason = status["reason"].as_str().unwrap();
    assert!(reason.contains("PIN"), "the reason names the PIN: {reason}");
    assert!(
        d.statuses().last().unwrap().contains("PIN"),
        "{:?}",
        d.statuses()
    );
    let out = d.run(&["secret", "get", "app/secret"], b"");
    assert_eq!(out.code, 4, "sealed: {}", out.stderr);

    // A wrong PIN: refused as such, tried once, and the vault stays sealed.
    let out = d.run(
        &["--json", "unseal", "--pin-file", wrong.to_str().unwrap()],
        b"",
    );
    assert_ne!(out.code, 0, "a wrong PIN must not unseal: {}", out.stdout);
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(out.stderr.contains("PIN incorrect"), "{}", out.stderr);
    let (name, parameters) = json_error(&out);
    assert_eq!(name, "org.keyward.Custodian.PinIncorrect", "{}", out.stdout);
    if let Some(left) = parameters["retries_left"].as_u64() {
        assert!(
            left >= 1,
            "one wrong PIN must not lock the TPM: {parameters}"
        );
        assert!(
            out.stderr.contains(&format!("{left} tries left")),
            "{}",
            out.stderr
        );
    }
    assert!(!out.stderr.contains("1357") && !out.stdout.contains("1357"));
    assert!(!d.log().contains("1357-wrong") && !d.log().contains("2468-right"));
    let status = d.json(&["status"]);
    assert_eq!(status["sealed"], true, "{status}");

    // The right PIN opens it.
    let out = d.run(&["unseal", "--pin-file", right.to_str().unwrap()], b"");
    assert_eq!(out.code, 0, "{}", out.stderr);
    let status = d.json(&["status"]);
    assert_eq!(status["sealed"], false, "{status}");
    let by = status["unsealed_by"].as_str().unwrap();
    assert!(by.contains("tpm2") && by.contains("PIN"), "{by}");
    assert_eq!(get(&d, "app/secret"), b"behind a PIN");
}

#[test]
fn a_vanished_tpm_fails_its_own_calls_and_comes_back_without_a_restart() {
    let mut tpm = Swtpm::start();
    let token = SoftHsm::new("keyward-devices-gone");
    let d = Setup::new().tpm("tpm", &tpm).token("hsm", &token).start();
    d.json(&["init", "--pkcs11", "hsm"]);
    put(&d, "app/secret", b"still here");
    let tpm_key = create_key(&d, "tpm-k", "tpm");
    let hsm_key = create_key(&d, "hsm-k", "hsm");
    assert_signs(&d, "tpm-k", &tpm_key, b"before");
    let pid = d.pid();

    tpm.stop();
    // The first call finds the connection dead, later ones find the device down: each is a
    // DeviceUnavailable naming the device, never a hang or a crash.
    for attempt in 0..3 {
        let out = d.run(&["--json", "key", "sign", "tpm-k"], b"while gone");
        assert_eq!(out.code, 1, "attempt {attempt}: {}", out.stderr);
        let (name, parameters) = json_error(&out);
        assert_eq!(
            name, "org.keyward.Custodian.DeviceUnavailable",
            "attempt {attempt}: {}",
            out.stdout
        );
        assert_eq!(parameters["device"], "tpm", "{parameters}");
        assert!(out.stderr.contains("unavailable"), "{}", out.stderr);
    }
    assert!(!device_available(&d, "tpm"));
    assert!(device_available(&d, "hsm"));
    // The daemon keeps serving everything that does not need the TPM.
    assert_eq!(get(&d, "app/secret"), b"still here");
    assert_signs(&d, "hsm-k", &hsm_key, b"the token still signs");
    put(&d, "app/new", b"written while the TPM is gone");
    assert_eq!(get(&d, "app/new"), b"written while the TPM is gone");

    // Back on the same state and ports: the daemon reopens it on its own.
    let mark = d.log_mark();
    tpm.restart();
    d.wait_device_open("tpm", mark, DEADLINE);
    let message = b"after the TPM came back";
    let out = d.run(&["key", "sign", "tpm-k"], message);
    assert_eq!(
        out.code, 0,
        "tpm-k signs once the TPM is reopened: {}",
        out.stderr
    );
    let signature = out.stdout_bytes;
    keyward_tests::openssl::verify(&tpm_key, KeyAlgorithm::EcdsaP256, message, &signature).unwrap();
    assert_signs(&d, "tpm-k", &tpm_key, b"and again, raw");
    assert!(device_available(&d, "tpm"));
    assert_eq!(d.pid(), pid, "the same keywardd throughout");
    assert_eq!(d.json(&["status"])["sealed"], false);
}

fn have(program: &str) -> bool {
    Command::new("which")
        .arg(program)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// A child killed and reaped if the test ends early (a panic must not leave a daemon behind).
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// `keyward` on an explicit socket.
fn cli_on(socket: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new(bin("keyward"));
    cmd.arg("--socket").arg(socket).args(args);
    run_cli(&mut cmd, b"")
}

#[test]
fn socket_activation_serves_on_the_inherited_socket() {
    if !have("systemd-socket-activate") {
        eprintln!("SKIPPED: systemd-socket-activate is not installed (package systemd)");
        return;
    }
    let token = SoftHsm::new("keyward-devices-activated");
    let d = Setup::new().token("hsm", &token).prepare();
    // Not the config's socket: what answers here can only be the inherited descriptor.
    let activated = d.dir().join("activated.sock");
    let notify_path = d.dir().join("activation-notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    let mut child = Reaped(
        Command::new("systemd-socket-activate")
            .arg("-l")
            .arg(&activated)
            // As the shipped keywardd.socket names it (FileDescriptorName=api).
            .arg("--fdname=api")
            .arg("-E")
            .arg(format!("NOTIFY_SOCKET={}", notify_path.display()))
            .args(["-E", "KEYWARD_LOG=debug"])
            .arg(bin("keywardd"))
            .arg("--config")
            .arg(d.config_path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let pid = child.0.id();
    // Its stderr (and then keywardd's, after the exec) line by line, to wait on "Listening".
    let (lines_tx, lines) = mpsc::channel::<String>();
    let stderr = child.0.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            let _ = lines_tx.send(line);
        }
    });
    let mut log = Vec::new();
    let deadline = Instant::now() + DEADLINE;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => {
                let listening = line.contains("Listening on");
                log.push(line);
                if listening {
                    break;
                }
            }
            Err(e) => {
                panic!("systemd-socket-activate never listened ({e}): {log:?}");
            }
        }
    }

    // The first connection starts keywardd on the inherited socket; the call waits in the
    // backlog until it serves.
    let out = cli_on(&activated, &["--json", "status"]);
    assert_eq!(out.code, 0, "status: {}\n{log:?}", out.stderr);
    let status: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(status["initialized"], false, "{status}");
    let out = cli_on(&activated, &["--json", "init", "--pkcs11", "hsm"]);
    assert_eq!(out.code, 0, "init: {}", out.stderr);
    let mut cmd = Command::new(bin("keyward"));
    cmd.arg("--socket")
        .arg(&activated)
        .args(["secret", "put", "activated/one"]);
    assert_eq!(run_cli(&mut cmd, b"via LISTEN_FDS").code, 0);
    let out = cli_on(&activated, &["secret", "get", "activated/one"]);
    assert_eq!(out.stdout_bytes, b"via LISTEN_FDS", "{}", out.stderr);
    assert!(
        !d.socket().exists(),
        "under activation keywardd must not bind its configured socket too"
    );

    // It told the notify socket it is ready, after the exec (same pid).
    notify
        .set_read_timeout(Some(deadline.saturating_duration_since(Instant::now())))
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let mut ready = false;
    while !ready {
        let n = notify
            .recv(&mut buf)
            .expect("READY=1 from the activated keywardd");
        ready = String::from_utf8_lossy(&buf[..n])
            .lines()
            .any(|l| l == "READY=1");
    }

    // SIGTERM: a clean exit.
    let status = Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(status.success());
    let exit = child.0.wait().unwrap();
    let _ = reader.join();
    let rest: Vec<String> = lines.try_iter().collect();
    log.extend(rest);
    assert!(exit.success(), "keywardd exited with {exit}: {log:#?}");
    assert!(
        log.iter().any(|l| l.contains("Execing")),
        "systemd-socket-activate ran keywardd: {log:#?}"
    );
}
