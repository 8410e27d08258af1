//! What a running `keywardd` reports about its own health without being asked: systemd
//! watchdog pings that stop while the store cannot take a write or the audit log's hook thread
//! does not answer (and come back after), and a device watcher that puts a TPM going away and
//! coming back on `STATUS=`. The real daemon, real swtpm and SoftHSM, a real SQLite lock, a TPM
//! command held on its way in; every wait is on the notify socket.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Stdio;
use std::time::{Duration, Instant};

use keyward_tests::keywardd::{Keywardd, Setup};
use keyward_tests::softhsm::SoftHsm;
use keyward_tests::swtpm::{Gate, Swtpm, CC_NV_INCREMENT};

/// How long a notify line may take (a debug build on a loaded 2-core machine; a device's
/// reopen backoff after swtpm restarts).
const DEADLINE: Duration = Duration::from_secs(60);
/// The watchdog interval the tests ask for: pings every 200 ms.
const WATCHDOG_USEC: u64 = 400_000;

fn is_ping(line: &str) -> bool {
    line == "WATCHDOG=1"
}

/// Every notify line for `span`; panics if one is a watchdog ping.
fn assert_no_ping_for(d: &mut Keywardd, span: Duration, why: &str) {
    let until = std::time::Instant::now() + span;
    loop {
        let left = until.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return;
        }
        for line in d.next_notify(left).unwrap_or_default() {
            assert!(!is_ping(&line), "a watchdog ping while {why}");
        }
    }
}

#[test]
fn watchdog_pings_stop_while_the_store_is_locked_and_resume_once_it_is_free() {
    let mut d = Setup::new().watchdog(WATCHDOG_USEC).start();
    for n in 1..=2 {
        d.wait_notify(&format!("watchdog ping {n}"), DEADLINE, is_ping);
    }

    // Another process takes the database's write lock and keeps it: the store can't commit.
    let db = rusqlite::Connection::open(d.dir().join("state/keyward.db")).unwrap();
    db.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let line = d.wait_notify("STATUS= naming the store", DEADLINE, |l| {
        l.starts_with("STATUS=") && l.contains("health check failed")
    });
    assert!(line.contains("the store"), "{line}");
    eprintln!("while locked: {line}");
    // Three whole intervals: systemd would have restarted the daemon by now.
    assert_no_ping_for(
        &mut d,
        Duration::from_micros(3 * WATCHDOG_USEC),
        "the store is locked",
    );

    db.execute_batch("COMMIT").unwrap();
    d.wait_notify("a ping once the lock is gone", DEADLINE, is_ping);
    d.wait_notify("a ping after that", DEADLINE, is_ping);
    let cleared = d.statuses().last().cloned().unwrap_or_default();
    assert!(
        !cleared.contains("health check failed"),
        "STATUS= still names the failure: {cleared}"
    );

    // Said once, not once per check.
    let log = d.log();
    assert_eq!(
        log.matches("health check failed, not pinging").count(),
        1,
        "{log}"
    );
    assert!(log.contains("watchdog pings resume"), "{log}");
    d.stop();
}

/// The audit log's hook thread (where the vault's seal, unseal and rekey checkpoints are
/// written) is stuck: here on the TPM counter the audit anchors are bound to, whose increment
/// the TPM holds. The log itself still takes records, but a seal or unseal would wait for the
/// thread, so the watchdog must not vouch for the daemon.
#[test]
fn watchdog_pings_stop_while_the_audit_hook_thread_is_stuck_and_resume_once_it_answers() {
    let tpm = Swtpm::start();
    let gate = Gate::start(&tpm);
    let token = SoftHsm::new("health-hooks");
    let mut d = Setup::new()
        .gated_tpm("tpm", &gate)
        .token("hsm", &token)
        .unseal_order(&["hsm"])
        .config("[audit]\ntpm_counter = \"tpm\"")
        // Longer than the test: the hook thread stays stuck until the gate lets go.
        .limits("device_timeout_secs = 600")
        .watchdog(WATCHDOG_USEC)
        .start();
    d.json(&["init", "--pkcs11", "hsm"]);
    for n in 1..=2 {
        d.wait_notify(&format!("watchdog ping {n}"), DEADLINE, is_ping);
    }

    // The seal's checkpoint is anchored, and the anchor's counter increment is held.
    gate.hold(CC_NV_INCREMENT);
    let mut seal = d.cli().arg("seal").stdout(Stdio::null()).spawn().unwrap();
    assert!(
        gate.wait_held(Instant::now() + DEADLINE),
        "no counter increment"
    );
    let line = d.wait_notify("STATUS= naming the hook thread", DEADLINE, |l| {
        l.starts_with("STATUS=") && l.contains("health check failed")
    });
    assert!(line.contains("hook thread"), "{line}");
    eprintln!("while stuck: {line}");
    assert_no_ping_for(
        &mut d,
        Duration::from_micros(3 * WATCHDOG_USEC),
        "the hook thread is stuck",
    );

    gate.release();
    assert!(seal.wait().unwrap().success(), "the seal failed");
    d.wait_notify("a ping once the thread answers", DEADLINE, is_ping);
    d.wait_notify("a ping after that", DEADLINE, is_ping);
    let cleared = d.statuses().last().cloned().unwrap_or_default();
    assert!(
        !cleared.contains("health check failed"),
        "STATUS= still names the failure: {cleared}"
    );
    assert!(d.json(&["status"])["sealed"].as_bool().unwrap());
    d.stop();
}

#[test]
fn the_device_watcher_reports_a_tpm_that_goes_away_and_comes_back_without_a_request() {
    let mut tpm = Swtpm::start();
    let token = SoftHsm::new("health");
    let mut d = Setup::new()
        .tpm("tpm", &tpm)
        .token("hsm", &token)
        .limits("device_watch_secs = 1")
        .keep_notify()
        .start();
    let ready = d.statuses().last().cloned().unwrap_or_default();
    assert!(!ready.contains("unavailable"), "{ready}");

    tpm.stop();
    let down = d.wait_notify("STATUS= naming the TPM unavailable", DEADLINE, |l| {
        l.starts_with("STATUS=") && l.contains("device tpm unavailable")
    });
    assert!(
        !down.contains("device hsm"),
        "only the TPM went away: {down}"
    );
    eprintln!("after swtpm died: {down}");

    tpm.restart();
    let back = d.wait_notify("STATUS= naming the TPM available", DEADLINE, |l| {
        l.starts_with("STATUS=") && l.contains("device tpm available again")
    });
    assert!(!back.contains("unavailable"), "{back}");
    eprintln!("after swtpm came back: {back}");

    let log = d.log();
    assert_eq!(
        log.matches("device became unavailable").count(),
        1,
        "logged once: {log}"
    );
    assert_eq!(log.matches("device available again").count(), 1, "{log}");
    d.stop();
}
