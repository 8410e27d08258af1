//! `keyward doctor` against real setups, each with one of the mistakes admins make seeded in:
//! a world-readable PIN file, a state directory others can read, a SoftHSM config that isn't
//! there, a token URI that matches no token or two, an unreachable TPM, a missing D-Bus
//! policy, a low RLIMIT_MEMLOCK, a clock behind the audit log, a stale socket. Each is
//! reported as `fail` with a fix, and the exit code says so; a sound setup passes. Real
//! SoftHSM tokens, swtpm and keywardd; the CLI runs `keywardd --doctor`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::Command;

use keyward_tests::keywardd::{bin, run_cli, Keywardd, Setup};
use keyward_tests::softhsm::SoftHsm;
use keyward_tests::swtpm::Swtpm;
use serde_json::Value;

/// `keyward doctor --json` on the daemon's config (through `prefix`, e.g. `prlimit`): the exit
/// code and the findings by check name.
fn doctor_with(prefix: &[&str], d: &Keywardd) -> (i32, Vec<Value>) {
    let mut cmd = match prefix.split_first() {
        Some((program, args)) => {
            let mut c = Command::new(program);
            c.args(args).arg(bin("keyward"));
            c
        }
        None => Command::new(bin("keyward")),
    };
    cmd.args(["--json", "doctor", "--config"])
        .arg(d.config_path());
    let out = run_cli(&mut cmd, b"");
    let doc: Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}\n{}", out.stdout, out.stderr));
    assert_eq!(doc["ok"], out.code == 0, "{doc:#}");
    (out.code, doc["checks"].as_array().unwrap().clone())
}

fn doctor(d: &Keywardd) -> (i32, Vec<Value>) {
    doctor_with(&[], d)
}

fn check<'a>(findings: &'a [Value], name: &str) -> &'a Value {
    findings
        .iter()
        .find(|f| f["check"] == name)
        .unwrap_or_else(|| panic!("no {name} check in {findings:#?}"))
}

/// The check failed, with a fix, and its detail mentions `says`.
fn assert_fails(findings: &[Value], name: &str, says: &str) {
    let f = check(findings, name);
    assert_eq!(f["level"], "fail", "{f:#}");
    assert!(f["fix"].is_string(), "no fix: {f:#}");
    assert!(
        f["detail"].as_str().unwrap().contains(says),
        "{name} does not say {says:?}: {f:#}"
    );
}

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Replace `from` by `to` in the daemon's config file.
fn edit_config(d: &Keywardd, from: &str, to: &str) {
    let text = std::fs::read_to_string(d.config_path()).unwrap();
    assert!(text.contains(from), "{from:?} not in:\n{text}");
    std::fs::write(d.config_path(), text.replace(from, to)).unwrap();
}

fn private_state(d: &Keywardd) -> std::path::PathBuf {
    let state = d.dir().join("state");
    std::fs::create_dir(&state).unwrap();
    chmod(&state, 0o700);
    state
}

#[test]
fn a_sound_setup_passes() {
    let tpm = Swtpm::start();
    let token = SoftHsm::new("keyward-doctor");
    let d = Setup::new().tpm("tpm", &tpm).token("hsm", &token).prepare();
    private_state(&d);
    let (code, findings) = doctor(&d);
    assert_eq!(code, 0, "{findings:#?}");
    assert!(
        findings.iter().all(|f| f["level"] != "fail"),
        "{findings:#?}"
    );
    let tpm_check = check(&findings, "device.tpm");
    assert_eq!(tpm_check["level"], "ok", "{tpm_check:#}");
    assert!(
        tpm_check["detail"].as_str().unwrap().contains("sha256"),
        "{tpm_check:#}"
    );
    assert_eq!(check(&findings, "device.hsm")["level"], "ok");
    assert_eq!(check(&findings, "pin_file.hsm")["level"], "ok");
    assert_eq!(check(&findings, "softhsm_conf")["level"], "ok");
    assert_eq!(check(&findings, "state_dir")["level"], "ok");
}

#[test]
fn modes_an_unreachable_tpm_the_dbus_policy_and_the_clock_are_reported() {
    let mut tpm = Swtpm::start();
    let token = SoftHsm::new("keyward-doctor");
    let d = Setup::new()
        .tpm("tpm", &tpm)
        .token("hsm", &token)
        .config("[dbus]\nbus = \"system\"")
        .prepare();
    // A TPM that is gone.
    tpm.stop();
    // A PIN file every user can read.
    chmod(&token.pin_file(), 0o644);
    // A state directory others can look into, and an audit log from the future.
    let state = d.dir().join("state");
    std::fs::create_dir(&state).unwrap();
    chmod(&state, 0o755);
    std::fs::write(
        state.join("audit.log"),
        "{\"seq\":0,\"time\":\"2999-01-01T00:00:00.000Z\",\"kind\":\"event\"}\n",
    )
    .unwrap();
    chmod(&state.join("audit.log"), 0o600);

    let (code, findings) = doctor(&d);
    assert_eq!(code, 1, "{findings:#?}");
    assert_fails(&findings, "pin_file.hsm", "every user");
    assert_fails(&findings, "state_dir", "0755");
    assert_fails(&findings, "device.tpm", "cannot reach the TPM");
    assert_fails(&findings, "clock", "2999-01-01");
    // The daemon joins the system bus: the verdict follows whether this machine has the
    // policy installed.
    let installed = [
        "/etc/dbus-1/system.d/org.keyward.Custodian1.conf",
        "/usr/share/dbus-1/system.d/org.keyward.Custodian1.conf",
    ]
    .iter()
    .any(|p| Path::new(p).is_file());
    let dbus = check(&findings, "dbus_policy");
    assert_eq!(
        dbus["level"],
        if installed { "ok" } else { "fail" },
        "{dbus:#}"
    );
    // The rest is sound.
    assert_eq!(check(&findings, "device.hsm")["level"], "ok");
}

#[test]
fn a_softhsm_config_that_is_not_there_fails() {
    let token = SoftHsm::new("keyward-doctor");
    let d = Setup::new().token("hsm", &token).prepare();
    private_state(&d);
    let conf = token.conf().display().to_string();
    edit_config(&d, &conf, "/nonexistent/softhsm2.conf");
    let (code, findings) = doctor(&d);
    assert_eq!(code, 1);
    assert_fails(&findings, "softhsm_conf", "/nonexistent/softhsm2.conf");
    // The token is not looked for through a config that isn't there.
    assert_eq!(check(&findings, "device.hsm")["level"], "fail");
}

#[test]
fn a_token_uri_matching_no_token_or_two_fails() {
    let token = SoftHsm::new("keyward-doctor");
    let d = Setup::new().token("hsm", &token).prepare();
    private_state(&d);
    let uri = format!("pkcs11:token={}", token.label());
    edit_config(&d, &uri, "pkcs11:token=no-such-token");
    let (code, findings) = doctor(&d);
    assert_eq!(code, 1);
    assert_fails(&findings, "device.hsm", "no token matches");

    // A second token with the same label in the same SoftHSM.
    edit_config(&d, "pkcs11:token=no-such-token", &uri);
    let out = run_cli(
        Command::new("softhsm2-util")
            .env("SOFTHSM2_CONF", token.conf())
            .args(["--init-token", "--free", "--label", token.label()])
            .args(["--so-pin", "12345678", "--pin", "87654321"]),
        b"",
    );
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    let (code, findings) = doctor(&d);
    assert_eq!(code, 1);
    assert_fails(&findings, "device.hsm", "2 tokens match");
}

#[test]
fn a_low_memlock_limit_fails() {
    let token = SoftHsm::new("keyward-doctor");
    let d = Setup::new().token("hsm", &token).prepare();
    private_state(&d);
    let (code, findings) = doctor_with(&["prlimit", "--memlock=16384:16384"], &d);
    assert_eq!(code, 1);
    assert_fails(&findings, "rlimit_memlock", "16 KiB");
    let (_, findings) = doctor_with(&["prlimit", "--memlock=1048576:1048576"], &d);
    assert_eq!(check(&findings, "rlimit_memlock")["level"], "warn");
}

#[test]
fn a_running_daemons_socket_says_who_can_connect_and_a_stale_one_fails() {
    let token = SoftHsm::new("keyward-doctor");
    let mut d = Setup::new().token("hsm", &token).start();
    let (code, findings) = doctor(&d);
    assert_eq!(code, 0, "{findings:#?}");
    let api = check(&findings, "socket.api");
    assert_eq!(api["level"], "ok", "{api:#}");
    assert!(
        api["detail"]
            .as_str()
            .unwrap()
            .contains("mode 0600: user root can connect"),
        "{api:#}"
    );
    // The limit is read from the daemon behind the socket.
    let memlock = check(&findings, "rlimit_memlock");
    assert!(
        memlock["detail"]
            .as_str()
            .unwrap()
            .contains(&format!("pid {}", d.pid())),
        "{memlock:#}"
    );

    // Killed, it leaves its socket behind: nothing answers there.
    d.kill();
    let (code, findings) = doctor(&d);
    assert_eq!(code, 1);
    assert_fails(&findings, "socket.api", "stale");
}

#[test]
fn a_tpm_without_the_sha256_bank_fails_and_names_its_banks() {
    let mut tpm = Swtpm::start();
    // Like a TPM shipped with only its sha1 bank allocated: the allocation takes effect at
    // the next start of the TPM.
    let out = run_cli(
        Command::new("tpm2_pcrallocate")
            .args(["-T", &tpm.tcti()])
            .arg("sha1:all+sha256:none+sha384:none+sha512:none"),
        b"",
    );
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    tpm.restart();
    let d = Setup::new().tpm("tpm", &tpm).prepare();
    private_state(&d);
    let (code, findings) = doctor(&d);
    assert_eq!(code, 1, "{findings:#?}");
    assert_fails(&findings, "device.tpm", "the sha256 bank lacks PCRs [7]");
    let detail = check(&findings, "device.tpm")["detail"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(detail.contains("sha1 (24 PCRs)"), "{detail}");
}
