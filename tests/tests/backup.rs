//! Backup and restore: `keyward backup FILE` on one machine (a real swtpm and keywardd),
//! `keywardd --restore FILE` into the empty state directory of another (a different swtpm),
//! which opens with the recovery shares, then binds to its own TPM with `keyward enroll tpm2`
//! and unseals unattended from then on. A restore onto anything but an empty state directory,
//! and of a damaged file, is refused and writes nothing.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use keyward::audit::line_hash;
use keyward::backup::{decode_header, MAGIC};
use keyward::text::hex;
use keyward_tests::keywardd::{bin, run_cli, Keywardd, Output, Setup};
use keyward_tests::softhsm::SoftHsm;
use keyward_tests::swtpm::Swtpm;
use serde_json::Value;

const SECRET: &[u8] = b"correct horse battery staple, a value to look for";

/// `keyward restore FILE --config C`, which runs `keywardd --restore` in its place.
fn restore(config: &Path, file: &Path) -> Output {
    run_cli(
        Command::new(bin("keyward"))
            .arg("restore")
            .arg(file)
            .arg("--config")
            .arg(config),
        b"",
    )
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

/// A vault on its own swtpm with a tpm2 slot and 2-of-3 recovery shares, two secrets in it;
/// its shares.
fn source(tpm: &Swtpm) -> (Keywardd, Vec<String>) {
    let d = Setup::new().tpm("tpm", tpm).start();
    let out = d.json(&["init", "--tpm2", "tpm", "--recovery", "2/3"]);
    let shares: Vec<String> = out["recovery_shares"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(shares.len(), 3, "{out}");
    for (name, value) in [("db/password", SECRET), ("api/token", b"t0ken".as_slice())] {
        let put = d.run(&["secret", "put", name], value);
        assert_eq!(put.code, 0, "{}", put.stderr);
    }
    (d, shares)
}

fn backup(d: &Keywardd, file: &Path) -> Value {
    d.json(&["backup", file.to_str().unwrap()])
}

/// The hash of the audit record with `seq` in `log`.
fn record_hash(log: &Path, seq: u64) -> String {
    let text = std::fs::read_to_string(log).unwrap();
    let line = text
        .lines()
        .find(|l| serde_json::from_str::<Value>(l).is_ok_and(|r| r["seq"] == seq))
        .unwrap_or_else(|| panic!("no record {seq} in {}", log.display()));
    hex(&line_hash(line.as_bytes()))
}

#[test]
fn a_backup_restores_on_another_tpm_with_the_shares_then_binds_to_it() {
    let tpm_a = Swtpm::start();
    let (a, shares) = source(&tpm_a);
    let file = a.dir().join("vault.backup");
    let made = backup(&a, &file);

    // The file: 0600, the format's magic, the audit head of the source, and no plaintext.
    assert_eq!(mode(&file), 0o600);
    let bytes = std::fs::read(&file).unwrap();
    assert!(bytes.starts_with(MAGIC));
    assert_eq!(made["size"], bytes.len() as u64, "{made}");
    let (manifest, _) = decode_header(&bytes).unwrap();
    assert!(
        !bytes.windows(SECRET.len()).any(|w| w == SECRET),
        "a secret's plaintext is in the backup"
    );
    let head = manifest.audit_head.clone().expect("the audit head");
    assert_eq!(
        head.hash,
        record_hash(&a.dir().join("state/audit.log"), head.seq),
        "the manifest's audit head is not the source log's record"
    );
    // The daemon's snapshot file was never left under a name in the state directory.
    let names: Vec<String> = std::fs::read_dir(a.dir().join("state"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !names.iter().any(|n| n.starts_with(".backup-")),
        "{names:?}"
    );
    // Taking it was audited, as an admin call.
    assert!(a
        .audit_requests()
        .iter()
        .any(|r| r["op"] == "Backup" && r["result"] == "ok"));

    // Another machine: its own TPM, a state directory that does not exist yet.
    let tpm_b = Swtpm::start();
    let mut b = Setup::new().tpm("tpm", &tpm_b).prepare();
    let state = b.dir().join("state");
    assert!(!state.exists());
    let out = restore(b.config_path(), &file);
    assert_eq!(out.code, 0, "restore failed: {}", out.stderr);
    assert_eq!(mode(&state), 0o700);
    assert_eq!(mode(&state.join("keyward.db")), 0o600);
    // The new audit log says where it came from.
    let log = std::fs::read_to_string(state.join("audit.log")).unwrap();
    let restored = log
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|r| r["event"] == "restored")
        .unwrap_or_else(|| panic!("no restored event in:\n{log}"));
    let detail = restored["detail"].as_str().unwrap();
    assert!(
        detail.contains(&format!("seq {} hash {}", head.seq, head.hash)),
        "{detail}"
    );

    // The tpm2 slot was sealed by the other TPM: the daemon stays up, sealed, and says why.
    b.start();
    let status = b.json(&["status"]);
    assert_eq!(status["sealed"], true, "{status}");
    let reason = status["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("keyslot") && reason.contains("made by another TPM"),
        "no clear reason: {status}"
    );
    let old_slot = status["keyslots"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["kind"] == "tpm2")
        .expect("the old tpm2 slot")["id"]
        .as_u64()
        .unwrap();

    // The recovery shares open it.
    let out = b.run(
        &["unseal"],
        format!("{}\n{}\n", shares[0], shares[2]).as_bytes(),
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    let got = b.run(&["secret", "get", "db/password"], b"");
    assert_eq!(got.code, 0, "{}", got.stderr);
    assert_eq!(got.stdout_bytes, SECRET);

    // Bind it to this TPM, drop the stale slot; from now on it opens unattended.
    let out = b.run(&["enroll", "tpm2", "--device", "tpm"], b"");
    assert_eq!(out.code, 0, "{}", out.stderr);
    let out = b.run(&["keyslot", "remove", &old_slot.to_string()], b"");
    assert_eq!(out.code, 0, "{}", out.stderr);
    b.restart();
    let status = b.json(&["status"]);
    assert_eq!(status["sealed"], false, "{status}");
    let got = b.run(&["secret", "get", "api/token"], b"");
    assert_eq!(got.code, 0, "{}", got.stderr);
    assert_eq!(got.stdout_bytes, b"t0ken");
}

#[test]
fn a_backup_restored_beside_the_same_token_opens_unattended() {
    // The token moves with the vault (a USB token, or the same HSM reached from a new host).
    let token = SoftHsm::new("keyward-backup");
    let mut a = Setup::new().token("hsm", &token).start();
    let out = a.json(&["init", "--pkcs11", "hsm"]);
    assert!(out["keyslots"].is_array(), "{out}");
    assert_eq!(a.run(&["secret", "put", "db/password"], SECRET).code, 0);
    let file = a.dir().join("vault.backup");
    backup(&a, &file);
    a.stop();

    let mut b = Setup::new().token("hsm", &token).prepare();
    let out = restore(b.config_path(), &file);
    assert_eq!(out.code, 0, "restore failed: {}", out.stderr);
    b.start();
    let status = b.json(&["status"]);
    assert_eq!(status["sealed"], false, "{status}");
    let got = b.run(&["secret", "get", "db/password"], b"");
    assert_eq!(got.code, 0, "{}", got.stderr);
    assert_eq!(got.stdout_bytes, SECRET);
}

/// Everything under `dir`, with contents, for before/after comparisons.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut all = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        let content = if p.is_file() {
            std::fs::read(&p).unwrap()
        } else {
            Vec::new()
        };
        all.push((p, content));
    }
    all.sort();
    all
}

fn leftovers(parent: &Path) -> Vec<String> {
    std::fs::read_dir(parent)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".keyward-restore-"))
        .collect()
}

#[test]
fn a_restore_onto_a_non_empty_state_dir_or_of_a_damaged_file_is_refused() {
    let tpm = Swtpm::start();
    let (mut a, _) = source(&tpm);
    let file = a.dir().join("vault.backup");
    // A sealed vault backs up as well: nothing in the copy needs the master key.
    assert_eq!(a.run(&["seal"], b"").code, 0);
    backup(&a, &file);

    // Onto the live vault's own state directory: refused, nothing changed.
    a.stop();
    let state = a.dir().join("state");
    let before = snapshot(&state);
    let out = restore(a.config_path(), &file);
    assert_ne!(out.code, 0);
    assert!(out.stderr.contains("not empty"), "{}", out.stderr);
    assert_eq!(snapshot(&state), before, "the state directory changed");
    assert!(leftovers(a.dir()).is_empty());

    // A directory holding only a hidden file is not empty either.
    let b = Setup::new().tpm("tpm", &tpm).prepare();
    let state = b.dir().join("state");
    std::fs::create_dir(&state).unwrap();
    std::fs::write(state.join(".keep"), b"").unwrap();
    let out = restore(b.config_path(), &file);
    assert_ne!(out.code, 0);
    assert!(out.stderr.contains(".keep"), "{}", out.stderr);
    std::fs::remove_file(state.join(".keep")).unwrap();

    // A damaged file into the empty directory: refused, the directory stays empty.
    let mut bytes = std::fs::read(&file).unwrap();
    let last = bytes.len() - 100;
    bytes[last] ^= 0x40;
    let damaged = b.dir().join("damaged.backup");
    std::fs::write(&damaged, &bytes).unwrap();
    let out = restore(b.config_path(), &damaged);
    assert_ne!(out.code, 0);
    assert!(out.stderr.contains("checksum"), "{}", out.stderr);
    assert_eq!(std::fs::read_dir(&state).unwrap().count(), 0);
    assert!(leftovers(b.dir()).is_empty());

    // A cut-short file: refused the same way.
    std::fs::write(&damaged, &bytes[..bytes.len() / 2]).unwrap();
    let out = restore(b.config_path(), &damaged);
    assert_ne!(out.code, 0);
    assert!(out.stderr.contains("truncated"), "{}", out.stderr);
    assert_eq!(std::fs::read_dir(&state).unwrap().count(), 0);

    // The intact file into the empty directory (it exists: systemd or tmpfiles made it).
    let out = restore(b.config_path(), &file);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(state.join("keyward.db").is_file());
}
