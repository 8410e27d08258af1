//! New recovery shares are only in force once a person proved to hold them: a rekey whose reply
//! is lost leaves the old shares working, confirming the new ones switches, and unconfirmed
//! shares lapse. The real daemon on a real swtpm and SoftHSM token, driven through a raw
//! Varlink connection (for the lost reply) and the real `keyward` CLI.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Write as _;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use keyward_tests::keywardd::{Keywardd, Setup};
use keyward_tests::softhsm::SoftHsm;
use keyward_tests::swtpm::Swtpm;
use serde_json::Value;

struct World {
    _tpm: Swtpm,
    _token: SoftHsm,
    daemon: Keywardd,
}

fn world(extra: &str) -> World {
    let tpm = Swtpm::start();
    let token = SoftHsm::new("keyward-recovery");
    let daemon = Setup::new()
        .tpm("tpm", &tpm)
        .token("hsm", &token)
        .unseal_order(&["tpm", "hsm"])
        .config(extra)
        .start();
    World {
        _tpm: tpm,
        _token: token,
        daemon,
    }
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|s| s.as_str().unwrap().to_owned())
        .collect()
}

/// `keyward init` with a TPM slot and 2-of-3 recovery shares; returns the shares.
fn init(d: &Keywardd) -> Vec<String> {
    let out = d.json(&["init", "--tpm2", "tpm", "--recovery", "2/3"]);
    let shares = strings(&out["recovery_shares"]);
    assert_eq!(shares.len(), 3, "{out}");
    shares
}

/// Seal, then unseal with the first two of `shares`; the CLI's exit code.
fn seal_and_unseal_with(d: &Keywardd, shares: &[String]) -> (i32, String) {
    assert_eq!(d.run(&["seal"], b"").code, 0);
    let out = d.run(
        &["unseal"],
        format!("{}\n{}\n", shares[0], shares[1]).as_bytes(),
    );
    (out.code, out.stderr)
}

/// The audit log's records of `op` that carry an outcome (not the `started` ones).
fn outcomes(d: &Keywardd, op: &str) -> Vec<String> {
    let log = std::fs::read_to_string(d.dir().join("state/audit.log")).unwrap_or_default();
    log.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|r| r["op"] == op && r["result"] != "started")
        .map(|r| r["result"].as_str().unwrap_or_default().to_owned())
        .collect()
}

#[test]
fn a_rekey_whose_reply_is_lost_leaves_the_old_shares_working() {
    let w = world("");
    let old = init(&w.daemon);
    // Confirm the init's shares, so that the only thing pending below is the rekey.
    let out = w.daemon.run(
        &["confirm-recovery"],
        format!("{}\n{}\n", old[0], old[2]).as_bytes(),
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    let put = w.daemon.run(&["secret", "put", "kept"], b"value");
    assert_eq!(put.code, 0, "{}", put.stderr);

    // The admin's connection drops before the reply is read. The daemon finishes the call
    // (audited) before it closes the connection.
    let mark = w.daemon.log_mark();
    {
        let mut raw = UnixStream::connect(w.daemon.socket()).unwrap();
        raw.write_all(b"{\"method\":\"org.keyward.Custodian.Rekey\",\"parameters\":{}}\0")
            .unwrap();
    }
    // Earlier connections' close lines may land after the mark too: the rekey's connection
    // closes once its reply failed, after the outcome was recorded, so its line is the first
    // close line at which the outcome is on record.
    w.daemon.wait_log(
        "the rekey's connection to close",
        mark,
        Duration::from_secs(20),
        |l| l.contains("varlink: connection closed") && !outcomes(&w.daemon, "Rekey").is_empty(),
    );
    assert_eq!(outcomes(&w.daemon, "Rekey"), ["ok"]);
    let status = w.daemon.json(&["status"]);
    assert!(status["rekey_pending_until"].is_string(), "{status}");

    // Nobody saw the new shares: the old ones must still open the vault.
    let (code, stderr) = seal_and_unseal_with(&w.daemon, &old);
    assert_eq!(code, 0, "the old shares no longer unseal: {stderr}");
    assert_eq!(
        w.daemon.run(&["secret", "get", "kept"], b"").stdout_bytes,
        b"value"
    );
    // Keyslots can't change under a pending rekey.
    let out = w.daemon.run(&["keyslot", "remove", "1"], b"");
    assert_ne!(out.code, 0);
    assert!(out.stderr.contains("rekey"), "{}", out.stderr);

    // Starting over gives new shares; until they are confirmed, the old ones still work.
    let out = w.daemon.json(&["rekey"]);
    let new = strings(&out["recovery_shares"]);
    assert!(out["pending_until"].is_string(), "{out}");
    let (code, stderr) = seal_and_unseal_with(&w.daemon, &old);
    assert_eq!(code, 0, "old shares before the confirmation: {stderr}");
    let (code, _) = seal_and_unseal_with(&w.daemon, &new);
    assert_ne!(
        code, 0,
        "new shares are not in force before the confirmation"
    );
    let out = w
        .daemon
        .run(&["unseal"], format!("{}\n{}\n", old[1], old[2]).as_bytes());
    assert_eq!(out.code, 0, "{}", out.stderr);

    // Too few new shares confirm nothing.
    let out = w
        .daemon
        .run(&["confirm-recovery"], format!("{}\n", new[1]).as_bytes());
    assert_ne!(out.code, 0);
    assert!(out.stderr.contains("needs 2 shares"), "{}", out.stderr);
    assert!(!out.stderr.contains(&new[1]), "a share is never echoed");
    // Old shares can't stand in for the new ones.
    let out = w.daemon.run(
        &["confirm-recovery"],
        format!("{}\n{}\n", old[0], old[1]).as_bytes(),
    );
    assert_ne!(out.code, 0, "the pending rekey's sets must all be given");

    // Confirmed: the new key is in force, the old shares are refused, the new ones open,
    // and the device slot opens it unattended.
    let out = w.daemon.run(
        &["--json", "rekey", "--confirm-from", "-"],
        format!("{}\n{}\n", new[2], new[1]).as_bytes(),
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    let reply: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(reply["rekeyed"], true, "{reply}");
    assert!(w.daemon.json(&["status"])["rekey_pending_until"].is_null());
    let (code, _) = seal_and_unseal_with(&w.daemon, &old);
    assert_ne!(
        code, 0,
        "old shares must not unseal once the rekey is confirmed"
    );
    let (code, stderr) = seal_and_unseal_with(&w.daemon, &new);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(
        w.daemon.run(&["secret", "get", "kept"], b"").stdout_bytes,
        b"value"
    );
    // Confirming again (a lost confirmation reply, retried) checks out and changes nothing.
    let out = w.daemon.run(
        &["--json", "confirm-recovery"],
        format!("{}\n{}\n", new[0], new[1]).as_bytes(),
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    let reply: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(reply["rekeyed"], false, "{reply}");
}

#[test]
fn the_device_slots_follow_a_confirmed_rekey_across_a_restart() {
    let mut w = world("");
    let old = init(&w.daemon);
    let out = w.daemon.json(&["rekey"]);
    let new = strings(&out["recovery_shares"]);
    // A restart while pending: the old key opens unattended, the rekey is still pending.
    w.daemon.restart();
    let status = w.daemon.json(&["status"]);
    assert_eq!(status["sealed"], false, "{status}");
    assert!(status["rekey_pending_until"].is_string(), "{status}");
    let out = w.daemon.run(
        &["confirm-recovery"],
        format!("{}\n{}\n", new[0], new[1]).as_bytes(),
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    w.daemon.restart();
    let status = w.daemon.json(&["status"]);
    assert_eq!(
        status["sealed"], false,
        "the TPM slot opens the new key: {status}"
    );
    let (code, _) = seal_and_unseal_with(&w.daemon, &old);
    assert_ne!(code, 0);
}

#[test]
fn unconfirmed_shares_lapse_and_never_count_as_a_way_in() {
    let w = world("[recovery]\nconfirm_within_secs = 3");
    let init_shares = init(&w.daemon);
    let keyslots = w.daemon.json(&["keyslot", "list"]);
    let recovery = keyslots["keyslots"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kind"] == "recovery")
        .cloned()
        .unwrap();
    assert!(recovery["unconfirmed_until"].is_string(), "{recovery}");
    // The TPM slot is the only confirmed way in: removing it needs --force.
    let out = w.daemon.run(&["keyslot", "remove", "1"], b"");
    assert_ne!(out.code, 0, "{}", out.stdout);
    assert!(
        out.stderr.contains("last way into the vault"),
        "{}",
        out.stderr
    );

    // An unseal with the shares is proof of possession.
    let (code, stderr) = seal_and_unseal_with(&w.daemon, &init_shares);
    assert_eq!(code, 0, "{stderr}");
    let keyslots = w.daemon.json(&["keyslot", "list"]);
    assert!(
        keyslots["keyslots"]
            .as_array()
            .unwrap()
            .iter()
            .all(|k| k["unconfirmed_until"].is_null()),
        "{keyslots}"
    );

    // A second recovery slot that nobody confirms is gone once its time is up, and so is a
    // rekey nobody confirms; the confirmed shares keep working throughout.
    let out = w
        .daemon
        .json(&["enroll", "recovery", "--threshold", "1", "--shares", "1"]);
    let lost = strings(&out["recovery_shares"]);
    let out = w.daemon.json(&["rekey"]);
    assert!(out["pending_until"].is_string(), "{out}");
    // Both lapse when the wall clock passes their deadline (whole seconds, set by the daemon
    // no later than now, plus the 3 s window): the clock is the event here.
    keyward_tests::wait_for_clock(keyward_tests::unix_now() + 3);
    let s = w.daemon.json(&["status"]);
    assert!(s["rekey_pending_until"].is_null(), "{s}");
    assert_eq!(s["keyslots"].as_array().map_or(0, Vec::len), 2, "{s}");
    assert_eq!(w.daemon.run(&["seal"], b"").code, 0);
    let out = w
        .daemon
        .run(&["unseal"], format!("{}\n", lost[0]).as_bytes());
    assert_ne!(out.code, 0, "a lapsed slot's share must not unseal");
    let out = w.daemon.run(
        &["unseal"],
        format!("{}\n{}\n", init_shares[2], init_shares[1]).as_bytes(),
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
}
