//! The audit log against the real daemon on a real SoftHSM token: every request on record with
//! the right caller, op, target and result and never a secret; `keyward audit verify` passing
//! on a copy and naming the first bad record on tampered copies; a rekey and a restart keeping
//! the chain; and on a full disk (a real tmpfs, mounted for the test): `StorageFull`, fail
//! closed, and `Status` answered with its lost records declared in the log.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Command;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use keyward::audit::{self, Body, Record, RequestRecord};
use keyward_tests::credentials::fetch;
use keyward_tests::keywardd::{bin, run_cli, Keywardd, Output, Setup, ROOT_ADMIN_POLICY};
use keyward_tests::softhsm::SoftHsm;
use serde_json::Value;
use sha2::{Digest as _, Sha256};

const NOBODY: u32 = 65534;
const SECRET_MARKER: &[u8] = b"MARKER-SECRET-VALUE-5d1c9e";
const PIN_MARKER: &str = "MARKER-PIN-8b2f41";

/// Root may do everything; nobody may read `pub/*`; one unit gets one credential.
fn policy() -> String {
    format!(
        "{ROOT_ADMIN_POLICY}
[[rule]]
who = {{ uid = {NOBODY} }}
allow = [\"read\"]
secrets = [\"pub/*\"]

[[credential]]
unit = \"app.service\"
id = \"db-pass\"
secret = \"db/password\"
"
    )
}

fn state(d: &Keywardd) -> PathBuf {
    d.dir().join("state")
}

fn log_path(d: &Keywardd) -> PathBuf {
    state(d).join(audit::LOG_FILE)
}

fn records_in(path: &Path) -> Vec<Record> {
    let bytes = std::fs::read(path).unwrap();
    audit::lines(&bytes)
        .iter()
        .filter_map(|l| audit::parse(l.bytes).ok())
        .collect()
}

fn requests(records: &[Record]) -> Vec<(u64, RequestRecord)> {
    records
        .iter()
        .filter_map(|r| match &r.body {
            Body::Request(q) => Some((r.seq, q.clone())),
            _ => None,
        })
        .collect()
}

/// The request records of `op` on `target`.
fn of(records: &[Record], op: &str, target: &str) -> Vec<(u64, RequestRecord)> {
    requests(records)
        .into_iter()
        .filter(|(_, r)| r.op == op && r.target == target)
        .collect()
}

fn ok(out: &Output, what: &str) {
    assert_eq!(out.code, 0, "{what}: {}", out.stderr);
}

/// `keyward ARGS` as nobody.
fn as_nobody(d: &Keywardd, args: &[&str]) -> Output {
    let mut cmd = Command::new("setpriv");
    cmd.args([
        format!("--reuid={NOBODY}"),
        format!("--regid={NOBODY}"),
        "--clear-groups".into(),
        "--".into(),
    ])
    .arg(bin("keyward"))
    .arg("--socket")
    .arg(d.socket())
    .args(args);
    run_cli(&mut cmd, b"")
}

/// `keyward --json audit verify PATH [--public-key KEY]`: (exit code, JSON document).
fn verify(d: &Keywardd, path: &Path, key: Option<&str>) -> (i32, Value) {
    let mut args = vec!["--json", "audit", "verify", path.to_str().unwrap()];
    if let Some(k) = key {
        args.extend(["--public-key", k]);
    }
    let out = d.run(&args, b"");
    let doc = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {} / {}", out.stdout, out.stderr));
    (out.code, doc)
}

/// Copy the log and its `audit.pub` into a fresh directory (verification works on copies).
fn copy_log(d: &Keywardd, into: &Path) -> PathBuf {
    std::fs::create_dir_all(into).unwrap();
    std::fs::copy(log_path(d), into.join(audit::LOG_FILE)).unwrap();
    std::fs::copy(
        state(d).join(audit::PUBLIC_KEY_FILE),
        into.join(audit::PUBLIC_KEY_FILE),
    )
    .unwrap();
    into.join(audit::LOG_FILE)
}

fn status_key(d: &Keywardd) -> String {
    d.json(&["status"])["audit_public_key"]
        .as_str()
        .expect("status shows the audit key")
        .to_owned()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn every_request_is_on_record_with_its_caller_and_never_a_secret() {
    let token = SoftHsm::new("audit");
    let d = Setup::new()
        .token("hsm", &token)
        .policy(&policy())
        .public_socket()
        .credentials(5)
        .start();
    ok(&d.run(&["status"], b""), "status");
    let init = d.json(&["init", "--pkcs11", "hsm", "--recovery", "2/3"]);
    let shares: Vec<String> = init["recovery_shares"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_owned())
        .collect();
    ok(
        &d.run(&["secret", "put", "db/password"], SECRET_MARKER),
        "put",
    );
    ok(&d.run(&["secret", "get", "db/password"], b""), "get");
    ok(&d.run(&["secret", "list", "--prefix", "db/"], b""), "list");
    ok(
        &d.run(&["secret", "versions", "db/password"], b""),
        "versions",
    );
    ok(
        &d.run(
            &[
                "key",
                "create",
                "sig",
                "--device",
                "hsm",
                "--algorithm",
                "ecdsa-p256",
            ],
            b"",
        ),
        "key create",
    );
    ok(&d.run(&["key", "public", "sig"], b""), "key public");
    let digest = Sha256::digest(b"MARKER-MESSAGE-TO-SIGN");
    ok(
        &d.run(&["key", "sign", "sig", "--prehashed"], &digest),
        "sign",
    );
    ok(&d.run(&["keyslot", "list"], b""), "keyslot list");
    ok(&d.run(&["rotate"], b""), "rotate");
    assert_eq!(d.run(&["secret", "get", "nope"], b"").code, 1);
    // Credentials: a delivery and a refusal.
    assert_eq!(
        fetch(&d.credentials_socket(), "app.service", "db-pass").unwrap(),
        SECRET_MARKER
    );
    assert!(fetch(&d.credentials_socket(), "other.service", "db-pass")
        .unwrap()
        .is_empty());
    // Refused by the policy, and allowed, as nobody.
    assert_eq!(as_nobody(&d, &["secret", "get", "db/password"]).code, 1);
    assert_eq!(as_nobody(&d, &["secret", "get", "pub/motd"]).code, 1);
    // A PIN that opens nothing, then seal and unseal with two shares.
    let pin_file = d.dir().join("pin");
    std::fs::write(&pin_file, PIN_MARKER).unwrap();
    ok(&d.run(&["seal"], b""), "seal");
    assert_eq!(d.run(&["secret", "get", "db/password"], b"").code, 4);
    assert_ne!(
        d.run(&["unseal", "--pin-file", pin_file.to_str().unwrap()], b"")
            .code,
        0
    );
    let two = format!("{}\n{}\n", shares[0], shares[2]);
    ok(&d.run(&["unseal"], two.as_bytes()), "unseal");
    ok(&d.run(&["secret", "delete", "db/password"], b""), "delete");

    let records = records_in(&log_path(&d));
    let one = |op: &str, target: &str, result: &str, uid: u32| {
        let found = of(&records, op, target);
        assert!(
            found
                .iter()
                .any(|(_, r)| r.result == result && r.caller.uid == uid),
            "no {op} {target} -> {result} by uid {uid} in {found:#?}"
        );
    };
    one("Status", "vault", "ok", 0);
    one("Init", "vault", "ok", 0);
    one("PutSecret", "db/password", "ok", 0);
    one("GetSecret", "db/password", "ok", 0);
    one("ListSecrets", "db/*", "ok", 0);
    one("SecretVersions", "db/password", "ok", 0);
    one("CreateKey", "sig", "ok", 0);
    one("PublicKey", "sig", "ok", 0);
    one("Sign", "sig", "ok", 0);
    one("ListKeyslots", "vault", "ok", 0);
    one("Rotate", "vault", "ok", 0);
    one("GetSecret", "nope", "NotFound", 0);
    one("GetSecret", "db/password", "PermissionDenied", NOBODY);
    one("GetSecret", "pub/motd", "NotFound", NOBODY);
    one("Seal", "vault", "ok", 0);
    one("GetSecret", "db/password", "Sealed", 0);
    one("Unseal", "vault", "InvalidArgument", 0);
    one("Unseal", "vault", "ok", 0);
    one("DeleteSecret", "db/password", "ok", 0);
    one("Credential", "db/password", "ok", 0);
    one("Credential", "other.service/db-pass", "PermissionDenied", 0);
    // Who, precisely: pid and transport; the unit systemd named for credentials.
    let (_, cred) = &of(&records, "Credential", "db/password")[0];
    assert_eq!(cred.caller.via, "credentials");
    assert_eq!(cred.caller.unit.as_deref(), Some("app.service"));
    let (_, get) = &of(&records, "GetSecret", "db/password")[0];
    assert_eq!(get.caller.via, "varlink");
    assert!(get.caller.pid.is_some());
    // A secret's change is on record once, committed with it: which version, and its number
    // in the outbox it came through.
    let puts = of(&records, "PutSecret", "db/password");
    assert_eq!(puts.len(), 1, "{puts:#?}");
    assert_eq!(puts[0].1.result, audit::OK);
    assert_eq!(puts[0].1.detail.as_deref(), Some("version 1"));
    assert!(puts[0].1.outbox.is_some(), "{puts:#?}");
    let deletes = of(&records, "DeleteSecret", "db/password");
    assert_eq!(deletes.len(), 1, "{deletes:#?}");
    assert!(deletes[0].1.outbox > puts[0].1.outbox, "{deletes:#?}");
    // Other mutations are on record before they run, and their outcome names that record.
    let creates = of(&records, "CreateKey", "sig");
    assert_eq!(creates.len(), 2, "{creates:#?}");
    assert_eq!(creates[0].1.result, audit::STARTED);
    assert_eq!(creates[1].1.intent, Some(creates[0].0));
    // Reads get one record each.
    assert_eq!(of(&records, "SecretVersions", "db/password").len(), 1);

    // Never a value, PIN, share or digest, in any form.
    let log = std::fs::read(log_path(&d)).unwrap();
    let mut markers: Vec<Vec<u8>> = vec![
        SECRET_MARKER.to_vec(),
        B64.encode(SECRET_MARKER).into_bytes(),
        PIN_MARKER.as_bytes().to_vec(),
        B64.encode(PIN_MARKER).into_bytes(),
        digest.to_vec(),
        audit::hex(&digest).into_bytes(),
        B64.encode(digest).into_bytes(),
    ];
    for share in &shares {
        markers.push(share.clone().into_bytes());
        // Every long word of a share, too.
        for word in share.split(|c: char| !c.is_ascii_alphanumeric()) {
            if word.len() >= 12 {
                markers.push(word.as_bytes().to_vec());
            }
        }
    }
    for m in &markers {
        assert!(
            !contains(&log, m),
            "the log holds {:?}",
            String::from_utf8_lossy(m)
        );
    }

    // Status shows the key that is beside the log; verify passes on a copy.
    let key = status_key(&d);
    let pem = std::fs::read_to_string(state(&d).join(audit::PUBLIC_KEY_FILE)).unwrap();
    assert_eq!(audit::encode_key(&audit::decode_key(&pem).unwrap()), key);
    let mode = std::fs::metadata(log_path(&d)).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o600
    );
    let copy = copy_log(&d, &d.dir().join("copy"));
    let (code, doc) = verify(&d, &copy, None);
    assert_eq!(code, 0, "{doc}");
    assert!(doc["records"].as_u64().unwrap() >= records.len() as u64);
    let (code, _) = verify(&d, &copy, Some(&key));
    assert_eq!(code, 0);
    // The human form says what is only chain-protected.
    let out = d.run(&["audit", "verify", copy.to_str().unwrap()], b"");
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stdout.contains("last signed checkpoint"),
        "{}",
        out.stdout
    );
    // tail shows the last records.
    let out = d.run(&["audit", "tail", "-n", "3", copy.to_str().unwrap()], b"");
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(out.stdout.lines().count(), 3, "{}", out.stdout);
    assert!(
        out.stdout.contains("DeleteSecret db/password"),
        "{}",
        out.stdout
    );
}

/// A log with two admin checkpoints and reads around them; the daemon stopped (so a final
/// checkpoint signs it all). Returns the daemon (stopped), the log's lines and the index of a
/// read in the middle.
fn signed_log(token: &SoftHsm) -> (Keywardd, Vec<Vec<u8>>, usize) {
    let mut d = Setup::new().token("hsm", token).start();
    ok(&d.run(&["init", "--pkcs11", "hsm"], b""), "init");
    for i in 0..5 {
        ok(&d.run(&["secret", "put", &format!("t/{i}")], b"v"), "put");
    }
    ok(&d.run(&["rotate"], b""), "rotate");
    for i in 0..5 {
        ok(&d.run(&["secret", "get", &format!("t/{i}")], b""), "get");
    }
    ok(&d.run(&["rotate"], b""), "rotate");
    ok(&d.run(&["secret", "get", "t/0"], b""), "get");
    d.stop();
    let bytes = std::fs::read(log_path(&d)).unwrap();
    let lines: Vec<Vec<u8>> = audit::lines(&bytes)
        .iter()
        .map(|l| l.bytes.to_vec())
        .collect();
    let middle = lines
        .iter()
        .position(|l| {
            let r = audit::parse(l).unwrap();
            matches!(&r.body, Body::Request(q) if q.op == "GetSecret" && q.target == "t/2")
        })
        .unwrap();
    (d, lines, middle)
}

fn write_lines(path: &Path, lines: &[Vec<u8>]) {
    let mut out = Vec::new();
    for l in lines {
        out.extend_from_slice(l);
        out.push(b'\n');
    }
    std::fs::write(path, out).unwrap();
}

/// Verify a tampered copy: must fail, naming line `line` (1-based) with a problem that says
/// `says`.
fn must_fail(d: &Keywardd, name: &str, lines: &[Vec<u8>], line: usize, says: &str) {
    let dir = d.dir().join(name);
    let path = copy_log(d, &dir);
    write_lines(&path, lines);
    let (code, doc) = verify(d, &path, None);
    assert_eq!(code, 1, "{name}: {doc}");
    let p = &doc["error"]["parameters"];
    assert_eq!(
        doc["error"]["name"], "keyward.AuditInvalid",
        "{name}: {doc}"
    );
    assert_eq!(p["line"], line, "{name}: {doc}");
    assert!(
        p["problem"].as_str().unwrap().contains(says),
        "{name}: {doc}"
    );
}

#[test]
fn verify_names_the_first_bad_record_of_a_tampered_copy() {
    let token = SoftHsm::new("audit");
    let (d, lines, m) = signed_log(&token);
    let checkpoints: Vec<usize> = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| matches!(audit::parse(l).unwrap().body, Body::Checkpoint(_)))
        .map(|(i, _)| i)
        .collect();
    assert!(
        checkpoints.iter().any(|&c| c > m + 2),
        "a checkpoint signs the middle"
    );
    // The untouched copy passes.
    let path = copy_log(&d, &d.dir().join("intact"));
    let (code, doc) = verify(&d, &path, None);
    assert_eq!(code, 0, "{doc}");
    assert_eq!(
        doc["unsigned_tail"], 0,
        "the stop checkpoint signs everything"
    );

    // Edit a field of a middle record.
    let mut edited = lines.clone();
    edited[m] = String::from_utf8(edited[m].clone())
        .unwrap()
        .replace("\"t/2\"", "\"t/9\"")
        .into_bytes();
    must_fail(&d, "edited", &edited, m + 1, "altered");

    // Delete a middle record.
    let mut deleted = lines.clone();
    deleted.remove(m);
    must_fail(&d, "deleted", &deleted, m + 1, "missing");

    // Insert a forged record, chained properly onto the one before it.
    let mut inserted = lines.clone();
    let mut forged = audit::parse(&lines[m]).unwrap();
    forged.seq += 1;
    forged.prev = audit::hex(&audit::line_hash(&lines[m]));
    if let Body::Request(r) = &mut forged.body {
        r.target = "forged".into();
    }
    inserted.insert(m + 1, serde_json::to_vec(&forged).unwrap());
    must_fail(&d, "inserted", &inserted, m + 2, "inserted");

    // Swap two records.
    let mut swapped = lines.clone();
    swapped.swap(m, m + 1);
    must_fail(&d, "swapped", &swapped, m + 1, "out of order");

    // Change a checkpoint's signature.
    let c = checkpoints[1];
    let mut resigned = lines.clone();
    let mut cp = audit::parse(&lines[c]).unwrap();
    if let Body::Checkpoint(k) = &mut cp.body {
        let mut sig = B64.decode(&k.signature).unwrap();
        sig[10] ^= 0x40;
        k.signature = B64.encode(sig);
    }
    resigned[c] = serde_json::to_vec(&cp).unwrap();
    must_fail(&d, "signature", &resigned, c + 1, "signature");

    // Cut the log inside a checkpoint.
    let dir = d.dir().join("truncated");
    let path = copy_log(&d, &dir);
    let mut cut: Vec<u8> = Vec::new();
    for l in &lines[..c] {
        cut.extend_from_slice(l);
        cut.push(b'\n');
    }
    cut.extend_from_slice(&lines[c][..lines[c].len() / 2]);
    std::fs::write(&path, cut).unwrap();
    let (code, doc) = verify(&d, &path, None);
    assert_eq!(code, 1, "{doc}");
    assert_eq!(doc["error"]["parameters"]["line"], c + 1, "{doc}");
    assert!(doc["error"]["parameters"]["problem"]
        .as_str()
        .unwrap()
        .contains("incomplete"));

    // A key that never signed this log authenticates nothing.
    let stranger = ed25519_dalek::SigningKey::from_bytes(&[42; 32]).verifying_key();
    let path = copy_log(&d, &d.dir().join("stranger"));
    let (code, doc) = verify(&d, &path, Some(&audit::encode_key(&stranger)));
    assert_eq!(code, 1, "{doc}");
}

#[test]
fn a_rekey_hands_the_log_to_the_new_key_and_both_verify() {
    let token = SoftHsm::new("audit");
    let mut d = Setup::new().token("hsm", &token).start();
    ok(
        &d.run(&["init", "--pkcs11", "hsm", "--recovery", "1/1"], b""),
        "init",
    );
    ok(&d.run(&["secret", "put", "a"], b"1"), "put");
    let first = status_key(&d);
    let rekey = d.json(&["rekey"]);
    let share = rekey["recovery_shares"][0].as_str().unwrap().to_owned();
    ok(&d.run(&["confirm-recovery"], share.as_bytes()), "confirm");
    let second = status_key(&d);
    assert_ne!(first, second, "a new VMK, a new audit key");
    let pem = std::fs::read_to_string(state(&d).join(audit::PUBLIC_KEY_FILE)).unwrap();
    assert_eq!(audit::encode_key(&audit::decode_key(&pem).unwrap()), second);
    ok(&d.run(&["secret", "get", "a"], b""), "get");
    d.stop();
    let path = copy_log(&d, &d.dir().join("copy"));
    for key in [&first, &second] {
        let (code, doc) = verify(&d, &path, Some(key));
        assert_eq!(code, 0, "{doc}");
        assert_eq!(doc["keys"], serde_json::json!([first, second]), "{doc}");
    }
    let (code, doc) = verify(&d, &path, None);
    assert_eq!(code, 0, "{doc}");
}

#[test]
fn a_restart_continues_the_chain_and_a_torn_last_line_is_kept_and_noted() {
    let token = SoftHsm::new("audit");
    let mut d = Setup::new().token("hsm", &token).start();
    ok(&d.run(&["init", "--pkcs11", "hsm"], b""), "init");
    ok(&d.run(&["secret", "put", "a"], b"1"), "put");
    d.restart();
    ok(&d.run(&["secret", "get", "a"], b""), "get after restart");
    d.stop();
    let path = copy_log(&d, &d.dir().join("restarted"));
    let (code, doc) = verify(&d, &path, None);
    assert_eq!(code, 0, "{doc}");
    let records = records_in(&log_path(&d));
    let starts = records
        .iter()
        .filter(|r| matches!(&r.body, Body::Event(e) if e.event == "start"))
        .count();
    assert_eq!(starts, 2);
    assert!(records.windows(2).all(|w| w[1].seq == w[0].seq + 1));

    // A crash in the middle of a write leaves a torn line: the daemon starts anyway, keeps
    // the bytes, and says so in the chain.
    let torn = br#"{"seq":99,"time":"2025-01-01T00:00:00.000Z","kind":"requ"#;
    let mut bytes = std::fs::read(log_path(&d)).unwrap();
    bytes.extend_from_slice(torn);
    std::fs::write(log_path(&d), &bytes).unwrap();
    d.start();
    ok(
        &d.run(&["secret", "get", "a"], b""),
        "get after the torn line",
    );
    d.stop();
    let after = std::fs::read(log_path(&d)).unwrap();
    assert!(after.starts_with(&bytes), "history is kept as it was");
    let path = copy_log(&d, &d.dir().join("torn"));
    let (code, doc) = verify(&d, &path, None);
    assert_eq!(code, 0, "{doc}");
    assert_eq!(doc["damage"][0]["bytes"], torn.len(), "{doc}");
    let out = d.run(&["audit", "verify", path.to_str().unwrap()], b"");
    assert!(out.stdout.contains("damaged bytes"), "{}", out.stdout);
}

#[test]
fn tail_follows_records_as_they_are_appended_and_a_policy_reload_is_one() {
    use std::io::BufRead as _;
    let token = SoftHsm::new("audit");
    let d = Setup::new().token("hsm", &token).start();
    let mut child = Command::new(bin("keyward"))
        .args(["audit", "tail", "-f", "-n", "1"])
        .arg(log_path(&d))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            if tx.send(line.unwrap_or_default()).is_err() {
                break;
            }
        }
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let next = || {
        rx.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
            .expect("a line from `audit tail -f` in time")
    };
    assert!(next().contains("daemon start"), "the last record first");
    assert_eq!(d.run(&["secret", "list"], b"").code, 4, "no vault yet");
    let line = next();
    assert!(line.contains("ListSecrets *  NotInitialized"), "{line}");
    // A policy reload is on record too.
    d.reload();
    let line = next();
    assert!(
        line.contains("daemon policy-reload: new policy in force"),
        "{line}"
    );
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn tail_follows_the_log_across_a_roll_over() {
    use std::io::BufRead as _;
    let token = SoftHsm::new("audit");
    let mut d = Setup::new().token("hsm", &token).prepare();
    let mut config = std::fs::read_to_string(d.config_path()).unwrap();
    config.push_str("\n[audit]\nmax_file_bytes = 4096\n");
    std::fs::write(d.config_path(), config).unwrap();
    d.start();
    let mut child = Command::new(bin("keyward"))
        .args(["audit", "tail", "-f", "-n", "1"])
        .arg(log_path(&d))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            if tx.send(line.unwrap_or_default()).is_err() {
                break;
            }
        }
    });
    assert!(rx
        .recv_timeout(std::time::Duration::from_secs(30))
        .unwrap()
        .contains("daemon start"));
    // Enough records to fill the first file, then one that can only be in the second.
    while !state(&d).join("audit.log.1").exists() {
        assert_eq!(d.run(&["secret", "list"], b"").code, 4, "no vault yet");
    }
    assert_eq!(d.run(&["secret", "get", "after/roll-over"], b"").code, 4);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut seen = Vec::new();
    while !seen
        .iter()
        .any(|l: &String| l.contains("GetSecret after/roll-over"))
    {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => seen.push(line),
            Err(_) => panic!("tail -f stopped at the roll-over; it printed {seen:#?}"),
        }
    }
    assert!(
        seen.iter()
            .any(|l| l.contains("daemon continued: from audit.log.1")),
        "{seen:#?}"
    );
    let _ = child.kill();
    let _ = child.wait();
}

/// A tmpfs mounted over a directory for as long as it lives.
struct Tmpfs(PathBuf);

impl Tmpfs {
    /// `None` (the test is skipped, and says why) when not root: mounting needs it. CI runs
    /// the tests as root.
    fn mount(at: &Path, size: &str) -> Option<Self> {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPED: this test mounts a tmpfs for the state directory and needs root");
            return None;
        }
        std::fs::create_dir_all(at).unwrap();
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(at)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "cannot mount a tmpfs: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Some(Self(at.to_owned()))
    }
}

/// Fill the file system of `dir` with a file until a write fails; the file is returned open
/// (delete it to give the space back).
fn fill(dir: &Path) -> (std::fs::File, PathBuf) {
    use std::io::Write as _;
    let filler = dir.join("filler");
    let mut f = std::fs::File::create(&filler).unwrap();
    let block = vec![0u8; 64 * 1024];
    while f.write_all(&block).is_ok() {}
    let _ = f.sync_all();
    (f, filler)
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_fails_requests_closed_and_they_work_again_when_space_returns() {
    let token = SoftHsm::new("audit");
    let mut d = Setup::new().token("hsm", &token).prepare();
    let Some(_tmpfs) = Tmpfs::mount(&state(&d), "8m") else {
        return;
    };
    d.start();
    ok(&d.run(&["init", "--pkcs11", "hsm"], b""), "init");
    ok(&d.run(&["secret", "put", "before"], b"1"), "put");

    let (f, filler) = fill(&state(&d));
    // The log's last page may still take a few records: reads go on until it is full.
    let mut refused = None;
    for _ in 0..200 {
        let out = d.run(&["--json", "secret", "get", "before"], b"");
        if out.code != 0 {
            refused = Some(out);
            break;
        }
    }
    let refused = refused.expect("a read must fail once the log can't grow");
    assert!(refused.stdout.contains("StorageFull"), "{}", refused.stdout);

    // A write is refused before it runs, and leaves nothing behind.
    let out = d.run(&["--json", "secret", "put", "during"], b"never stored");
    assert_eq!(out.code, 6, "{}", out.stderr);
    assert!(out.stdout.contains("StorageFull"), "{}", out.stdout);

    // Space returns: the daemon serves again, and the write was never made.
    drop(f);
    std::fs::remove_file(&filler).unwrap();
    let out = d.run(&["--json", "secret", "get", "during"], b"");
    assert_eq!(out.code, 1, "{}", out.stdout);
    assert!(out.stdout.contains("NotFound"), "{}", out.stdout);
    ok(&d.run(&["secret", "put", "after"], b"2"), "put after");
    ok(&d.run(&["secret", "get", "after"], b""), "get after");
    d.stop();
    // What was cut short is kept and explained; the chain verifies.
    let path = copy_log(&d, &d.dir().join("copy"));
    let (code, doc) = verify(&d, &path, None);
    assert_eq!(code, 0, "{doc}");
    let records = records_in(&log_path(&d));
    assert!(
        of(&records, "PutSecret", "during").is_empty() || {
            // Only a refused attempt may be on record, never a success.
            of(&records, "PutSecret", "during")
                .iter()
                .all(|(_, r)| r.result != audit::OK)
        }
    );
}

/// How many `Status` records a `status`'s `storage` says were not written, if it says so.
fn lost_in(storage: &str) -> Option<u64> {
    let (before, _) = storage.split_once(" Status record(s) not written")?;
    before.rsplit(' ').next()?.parse().ok()
}

#[test]
fn a_full_disk_is_storage_full_and_status_answers_with_its_lost_records_declared() {
    let token = SoftHsm::new("audit");
    let mut d = Setup::new().token("hsm", &token).prepare();
    let Some(_tmpfs) = Tmpfs::mount(&state(&d), "8m") else {
        return;
    };
    d.start();
    ok(&d.run(&["init", "--pkcs11", "hsm"], b""), "init");
    ok(&d.run(&["secret", "put", "before"], b"kept"), "put");
    let (f, filler) = fill(&state(&d));

    // A write on a full disk is the disk's fault, said as such: whichever file ran out of room
    // (the audit log or the database), never `Internal`.
    let out = d.run(&["--json", "secret", "put", "during"], b"not acknowledged");
    let doc: Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {} / {}", out.stdout, out.stderr));
    assert_eq!(
        doc["error"]["name"], "org.keyward.Custodian.StorageFull",
        "{doc}"
    );
    assert_eq!(out.code, 6, "{}", out.stderr);
    // And the CLI says what to do.
    let out = d.run(&["secret", "put", "during"], b"not acknowledged");
    assert_eq!(out.code, 6, "{}", out.stderr);
    assert!(
        out.stderr
            .contains("the file system of keywardd's state directory is full")
            && out.stderr.contains("free space there"),
        "{}",
        out.stderr
    );

    // Status answers and names the problem...
    let storage = |d: &Keywardd| {
        d.json(&["status"])["storage"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    let said = storage(&d);
    let full = format!("the state directory {} is full", state(&d).display());
    assert!(said.contains(&full), "{said}");
    // ...also once its own records can't be written (the log's last page took what it could):
    // those are counted, one by one.
    let mut lost = 0;
    for _ in 0..200 {
        if let Some(n) = lost_in(&storage(&d)) {
            lost = n;
            if n >= 3 {
                break;
            }
        }
    }
    assert!(lost >= 3, "Status must go on answering: {lost} lost");
    let text = d.run(&["status"], b"");
    ok(&text, "status");
    assert!(
        text.stdout.contains("STORAGE:") && text.stdout.contains(&full),
        "{}",
        text.stdout
    );
    let said = storage(&d);
    assert_eq!(lost_in(&said), Some(lost + 2), "{said}");
    lost += 2;

    // Secrets are not handed out off the record: a read fails closed, as StorageFull.
    let out = d.run(&["--json", "secret", "get", "before"], b"");
    assert_eq!(out.code, 6, "{} / {}", out.stdout, out.stderr);
    assert!(out.stdout.contains("StorageFull"), "{}", out.stdout);

    // Space returns: a write goes through, nothing acknowledged before was lost, and Status
    // has nothing more to say.
    drop(f);
    std::fs::remove_file(&filler).unwrap();
    ok(&d.run(&["secret", "put", "after"], b"new"), "put after");
    let out = d.run(&["secret", "get", "before"], b"");
    ok(&out, "get before");
    assert_eq!(out.stdout_bytes, b"kept");
    assert!(d.json(&["status"])["storage"].is_null());
    d.stop();

    // The log verifies, and declares the lost records: the gap is stated, not silent.
    let path = copy_log(&d, &d.dir().join("copy"));
    let (code, doc) = verify(&d, &path, None);
    assert_eq!(code, 0, "{doc}");
    let declared: u64 = doc["lost"]
        .as_array()
        .unwrap_or_else(|| panic!("verify reports declared losses: {doc}"))
        .iter()
        .map(|l| l["records"].as_u64().unwrap_or_default())
        .sum();
    assert_eq!(declared, lost, "{doc}");
    let out = d.run(&["audit", "verify", path.to_str().unwrap()], b"");
    ok(&out, "verify");
    assert!(
        out.stdout
            .contains(&format!("declares {lost} record(s) before it")),
        "{}",
        out.stdout
    );
}

/// `keyward --json audit verify ARGS...`: (exit code, JSON document).
fn verify_args(d: &Keywardd, args: &[&str]) -> (i32, Value) {
    let mut full = vec!["--json", "audit", "verify"];
    full.extend_from_slice(args);
    let out = d.run(&full, b"");
    let doc = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {} / {}", out.stdout, out.stderr));
    (out.code, doc)
}

/// What someone with write access to the state directory and no key can do to a log: edit
/// the records after the checkpoint at line `keep` (0-based), drop every later checkpoint,
/// renumber seq and recompute the chain. The result passes the chain and signature checks.
fn forge_after(lines: &[Vec<u8>], keep: usize) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut prev = [0u8; 32];
    let mut seq = 0;
    for (i, line) in lines.iter().enumerate() {
        let mut r = audit::parse(line).unwrap();
        if i > keep {
            if matches!(r.body, Body::Checkpoint(_)) {
                continue;
            }
            if let Body::Request(q) = &mut r.body {
                q.target = "forged".into();
            }
            r.seq = seq;
            r.prev = audit::hex(&prev);
        }
        let bytes = if i > keep {
            serde_json::to_vec(&r).unwrap()
        } else {
            line.clone()
        };
        prev = audit::line_hash(&bytes);
        seq = r.seq + 1;
        out.push(bytes);
    }
    out
}

/// The line index of the next-to-last checkpoint: everything after it is the forger's.
fn next_to_last_checkpoint(lines: &[Vec<u8>]) -> usize {
    let checkpoints: Vec<usize> = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| matches!(audit::parse(l).unwrap().body, Body::Checkpoint(_)))
        .map(|(i, _)| i)
        .collect();
    checkpoints[checkpoints.len() - 2]
}

/// The directory the daemon moved a log it would not continue into.
fn set_aside(d: &Keywardd) -> PathBuf {
    let dirs: Vec<PathBuf> = std::fs::read_dir(state(d))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.is_dir()
                && p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("audit-set-aside-")
        })
        .collect();
    assert_eq!(dirs.len(), 1, "one set-aside directory: {dirs:?}");
    dirs[0].clone()
}

/// The daemon, started on a log it must not continue: `Status`, `STATUS=` and the new log's
/// first record all say what it found.
fn assert_refused(d: &Keywardd, says: &str) -> String {
    let finding = d.json(&["status"])["audit_finding"]
        .as_str()
        .unwrap_or_else(|| panic!("status names no audit finding; log:\n{}", d.log()))
        .to_owned();
    assert!(finding.contains(says), "{finding}");
    assert!(
        d.statuses()
            .iter()
            .any(|s| s.contains("AUDIT LOG DID NOT MATCH ITS ANCHOR") && s.contains(says)),
        "{:?}",
        d.statuses()
    );
    let first = records_in(&log_path(d)).remove(0);
    assert_eq!(first.seq, 0);
    match &first.body {
        Body::Event(e) => {
            assert_eq!(e.event, "new-log");
            assert!(e.detail.contains(says), "{}", e.detail);
        }
        other => panic!("the new log starts with {other:?}"),
    }
    finding
}

#[test]
fn a_log_rewritten_after_a_checkpoint_is_refused_at_start_and_flagged_by_verify() {
    let token = SoftHsm::new("audit");
    let (mut d, lines, _) = signed_log(&token);
    let key = {
        let pem = std::fs::read_to_string(state(&d).join(audit::PUBLIC_KEY_FILE)).unwrap();
        audit::encode_key(&audit::decode_key(&pem).unwrap())
    };
    let last_seq = audit::parse(lines.last().unwrap()).unwrap().seq;
    // A copy of the anchor kept off the machine (the daemon moves its own with the old log).
    let kept = std::fs::read(state(&d).join("audit.anchor")).ok();

    // The forgery: everything after the next-to-last checkpoint rewritten, as long as before.
    let forged = forge_after(&lines, next_to_last_checkpoint(&lines));
    assert!(forged.len() < lines.len(), "checkpoints were dropped");
    write_lines(&log_path(&d), &forged);
    let forged_bytes = std::fs::read(log_path(&d)).unwrap();
    // The chain and the signatures alone can't tell: a copy without an anchor passes.
    let copy = copy_log(&d, &d.dir().join("forged-copy"));
    let (code, doc) = verify_args(&d, &["--public-key", &key, copy.to_str().unwrap()]);
    assert_eq!(code, 0, "{doc}");

    // The daemon, once unsealed, does not sign over it.
    d.start();
    let finding = assert_refused(&d, "does not match its anchor");
    assert!(finding.contains("truncated"), "{finding}");
    let aside = set_aside(&d);
    let moved = std::fs::read(aside.join(audit::LOG_FILE)).unwrap();
    assert!(
        moved.starts_with(&forged_bytes),
        "the forged log is kept as it was"
    );
    ok(
        &d.run(&["secret", "get", "t/0"], b""),
        "the daemon serves on",
    );
    d.stop();

    // verify with the anchor (kept elsewhere, or the one moved beside the log) flags it.
    let kept_path = d.dir().join("kept.anchor");
    std::fs::write(&kept_path, kept.expect("the daemon keeps an anchor")).unwrap();
    let moved_log = aside.join(audit::LOG_FILE);
    for args in [
        vec![
            "--anchor",
            kept_path.to_str().unwrap(),
            moved_log.to_str().unwrap(),
        ],
        vec![moved_log.to_str().unwrap()],
    ] {
        // (The moved file ends with this run's start record, at the anchored seq.)
        let (code, doc) = verify_args(&d, &args);
        assert_eq!(code, 1, "{doc}");
        let p = &doc["error"]["parameters"];
        let problem = p["problem"].as_str().unwrap();
        assert!(
            problem.contains(&format!(
                "truncated: the log ends at seq {}, but seq {last_seq} was written",
                last_seq - 1
            )) || (problem.contains("rewritten") && p["seq"] == last_seq),
            "{doc}"
        );
    }
    // So does the last seq seen (from the journal's checkpoint events, say).
    let seen = last_seq.to_string();
    let (code, doc) = verify_args(&d, &["--expect-seq", &seen, copy.to_str().unwrap()]);
    assert_eq!(code, 1, "{doc}");
    // A forger who pads the log out to the anchored seq is caught at that record.
    let mut padded = forged.clone();
    while audit::parse(padded.last().unwrap()).unwrap().seq < last_seq {
        let mut r = audit::parse(padded.last().unwrap()).unwrap();
        r.prev = audit::hex(&audit::line_hash(padded.last().unwrap()));
        r.seq += 1;
        padded.push(serde_json::to_vec(&r).unwrap());
    }
    write_lines(&copy, &padded);
    let (code, doc) = verify_args(
        &d,
        &[
            "--anchor",
            kept_path.to_str().unwrap(),
            copy.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 1, "{doc}");
    assert!(
        doc["error"]["parameters"]["problem"]
            .as_str()
            .unwrap()
            .contains("rewritten"),
        "{doc}"
    );
    // The new log verifies, with its own anchor.
    let (code, doc) = verify_args(&d, &[state(&d).to_str().unwrap()]);
    assert_eq!(code, 0, "{doc}");
    assert!(doc["anchored_seq"].is_u64(), "{doc}");
}

#[test]
fn a_log_cut_after_a_checkpoint_is_reported_truncated() {
    let token = SoftHsm::new("audit");
    let (mut d, lines, _) = signed_log(&token);
    let last_seq = audit::parse(lines.last().unwrap()).unwrap().seq;
    let cut = next_to_last_checkpoint(&lines) + 1;
    let cut_seq = audit::parse(&lines[cut - 1]).unwrap().seq;
    write_lines(&log_path(&d), &lines[..cut]);
    // Without an anchor the cut can't be seen; with one it is named, seq numbers and all.
    let copy = copy_log(&d, &d.dir().join("cut-copy"));
    let (code, doc) = verify_args(&d, &[copy.to_str().unwrap()]);
    assert_eq!(code, 0, "{doc}");
    let (code, doc) = verify_args(&d, &[log_path(&d).to_str().unwrap()]);
    assert_eq!(code, 1, "{doc}");
    let problem = doc["error"]["parameters"]["problem"].as_str().unwrap();
    assert!(
        problem.contains(&format!(
            "truncated: the log ends at seq {cut_seq}, but seq {last_seq} was written"
        )),
        "{doc}"
    );
    d.start();
    assert_refused(&d, "truncated");
}

#[test]
fn an_untouched_log_verifies_across_roll_overs_a_rekey_and_restarts() {
    let token = SoftHsm::new("audit");
    let mut d = Setup::new().token("hsm", &token).prepare();
    let mut config = std::fs::read_to_string(d.config_path()).unwrap();
    config.push_str("\n[audit]\nmax_file_bytes = 4096\n");
    std::fs::write(d.config_path(), config).unwrap();
    d.start();
    ok(
        &d.run(&["init", "--pkcs11", "hsm", "--recovery", "1/1"], b""),
        "init",
    );
    let first = status_key(&d);
    for i in 0..15 {
        ok(&d.run(&["secret", "put", &format!("r/{i}")], b"v"), "put");
    }
    let rekey = d.json(&["rekey"]);
    let share = rekey["recovery_shares"][0].as_str().unwrap().to_owned();
    ok(&d.run(&["confirm-recovery"], share.as_bytes()), "confirm");
    let second = status_key(&d);
    assert_ne!(first, second);
    for i in 0..15 {
        ok(&d.run(&["secret", "get", &format!("r/{i}")], b""), "get");
    }
    d.restart();
    ok(&d.run(&["secret", "get", "r/0"], b""), "get after restart");
    d.restart();
    assert!(
        d.json(&["status"])["audit_finding"].is_null(),
        "an untouched log passes its check"
    );
    assert!(d.statuses().iter().all(|s| !s.contains("ANCHOR")));
    d.stop();

    let set = audit::set_in(&state(&d)).unwrap();
    assert!(set.len() >= 4, "the log rolled over: {set:?}");
    for f in &set {
        assert!(std::fs::metadata(f).unwrap().len() < 4096 + 2048, "{f:?}");
    }
    // The whole set, by directory or file by file, from either key, against the anchor.
    let files: Vec<&str> = set.iter().map(|p| p.to_str().unwrap()).collect();
    for args in [vec![state(&d).to_str().unwrap()], files.clone()] {
        for key in [&first, &second] {
            let mut with_key = vec!["--public-key", key.as_str()];
            with_key.extend(args.iter().copied());
            let (code, doc) = verify_args(&d, &with_key);
            assert_eq!(code, 0, "{doc}");
            assert_eq!(doc["keys"], serde_json::json!([first, second]), "{doc}");
            assert_eq!(doc["first_seq"], 0, "{doc}");
            assert_eq!(doc["unsigned_tail"], 0, "{doc}");
            assert_eq!(doc["anchored_seq"], doc["last_seq"], "{doc}");
        }
    }
    // Every file after the first carries the chain on; the last files alone verify too.
    for f in &set[1..] {
        let first = records_in(f).remove(0);
        assert!(
            matches!(&first.body, Body::Event(e) if e.event == "continued"),
            "{f:?}: {first:?}"
        );
    }
    let (code, doc) = verify_args(&d, &files[files.len() - 2..]);
    assert_eq!(code, 0, "{doc}");
    assert!(doc["first_seq"].as_u64().unwrap() > 0, "{doc}");
    // A file missing from the middle of the set breaks the chain there.
    let mut gap = files.clone();
    gap.remove(1);
    let (code, doc) = verify_args(&d, &gap);
    assert_eq!(code, 1, "{doc}");
    assert_eq!(doc["error"]["parameters"]["path"], files[2], "{doc}");
    assert_eq!(doc["error"]["parameters"]["line"], 1, "{doc}");

    // The checkpoints' second copy: the daemon's log (the journal, under systemd).
    let anchor: Value =
        serde_json::from_slice(&std::fs::read(state(&d).join("audit.anchor")).unwrap()).unwrap();
    let witness = keyward_tests::keywardd::plain(&d.log())
        .lines()
        .rev()
        .find(|l| l.contains("keyward::audit::checkpoint"))
        .map(str::to_owned)
        .expect("checkpoints are copied to the daemon's log");
    assert!(
        witness.contains(&format!("seq={}", anchor["seq"])),
        "{witness} / {anchor}"
    );
    assert!(
        witness.contains(anchor["head"].as_str().unwrap()),
        "{witness} / {anchor}"
    );
}

/// Run a daemon on a token (and a swtpm, when `tpm_counter`), keep a copy of its log and
/// anchor, let it write and sign more, then put the copy back: a rollback of the log and its
/// anchor together. Returns the daemon, started again on the rolled-back pair.
fn rolled_back(token: &SoftHsm, swtpm: Option<&keyward_tests::swtpm::Swtpm>) -> Keywardd {
    let mut setup = Setup::new().token("hsm", token).unseal_order(&["hsm"]);
    if let Some(t) = swtpm {
        setup = setup.tpm("tpm", t);
    }
    let mut d = setup.prepare();
    if swtpm.is_some() {
        let mut config = std::fs::read_to_string(d.config_path()).unwrap();
        config.push_str("\n[audit]\ntpm_counter = \"tpm\"\n");
        std::fs::write(d.config_path(), config).unwrap();
    }
    d.start();
    ok(&d.run(&["init", "--pkcs11", "hsm"], b""), "init");
    ok(&d.run(&["secret", "put", "a"], b"1"), "put");
    d.stop();
    let files = [audit::LOG_FILE, "audit.anchor"];
    let saved: Vec<Vec<u8>> = files
        .iter()
        .map(|f| std::fs::read(state(&d).join(f)).unwrap())
        .collect();
    d.start();
    ok(&d.run(&["secret", "get", "a"], b""), "get");
    ok(&d.run(&["rotate"], b""), "rotate");
    d.stop();
    for (f, bytes) in files.iter().zip(&saved) {
        std::fs::write(state(&d).join(f), bytes).unwrap();
    }
    d.start();
    d
}

#[test]
fn a_log_and_anchor_rolled_back_together_are_caught_by_the_tpm_counter() {
    let token = SoftHsm::new("audit");
    let swtpm = keyward_tests::swtpm::Swtpm::start();
    let mut d = rolled_back(&token, Some(&swtpm));
    let finding = assert_refused(&d, "rolled back");
    assert!(finding.contains("older than the TPM counter"), "{finding}");
    // The new log's anchors carry the counter, and the next start finds them in order.
    d.restart();
    assert!(d.json(&["status"])["audit_finding"].is_null());
    let anchor: Value =
        serde_json::from_slice(&std::fs::read(state(&d).join("audit.anchor")).unwrap()).unwrap();
    assert!(anchor["counter"].is_u64(), "{anchor}");
}

#[test]
fn without_a_tpm_counter_a_rollback_of_log_and_anchor_together_is_not_seen() {
    // The limit the README states: the pair is consistent, and nothing else remembers.
    let token = SoftHsm::new("audit");
    let d = rolled_back(&token, None);
    assert!(d.json(&["status"])["audit_finding"].is_null());
}

/// Two rules allow nobody different secrets: each request record names the rule that allowed
/// the call (1-based, in file order), and none names a rule when the policy refused the call or
/// no rule decides it (`Status`); `keyward audit tail` shows it.
#[test]
fn a_request_record_names_the_policy_rule_that_allowed_it() {
    let token = SoftHsm::new("audit-rule");
    let policy = format!(
        "{ROOT_ADMIN_POLICY}
[[rule]]
who = {{ uid = {NOBODY} }}
allow = [\"read\"]
secrets = [\"a/*\"]

[[rule]]
who = {{ uid = {NOBODY} }}
allow = [\"read\"]
secrets = [\"b/*\"]
"
    );
    let root_rule = 1;
    let first = u32::try_from(ROOT_ADMIN_POLICY.matches("[[rule]]").count()).unwrap() + 1;
    let second = first + 1;
    let d = Setup::new()
        .token("hsm", &token)
        .policy(&policy)
        .public_socket()
        .start();
    ok(&d.run(&["init", "--pkcs11", "hsm"], b""), "init");
    ok(&d.run(&["secret", "put", "a/one"], b"1"), "put a/one");
    ok(&d.run(&["secret", "put", "b/two"], b"2"), "put b/two");
    ok(
        &as_nobody(&d, &["secret", "get", "b/two"]),
        "get b/two as nobody",
    );
    ok(
        &as_nobody(&d, &["secret", "get", "a/one"]),
        "get a/one as nobody",
    );
    assert_eq!(as_nobody(&d, &["secret", "get", "c/three"]).code, 1);
    ok(&d.run(&["status"], b""), "status");

    let records = records_in(&log_path(&d));
    let rules = |op: &str, target: &str, uid: u32| -> Vec<Option<u32>> {
        let found: Vec<_> = of(&records, op, target)
            .into_iter()
            .filter(|(_, r)| r.caller.uid == uid)
            .map(|(_, r)| r.rule)
            .collect();
        assert!(!found.is_empty(), "no {op} {target} by uid {uid}");
        found
    };
    assert_eq!(rules("GetSecret", "b/two", NOBODY), [Some(second)]);
    assert_eq!(rules("GetSecret", "a/one", NOBODY), [Some(first)]);
    // A secret's change, recorded with its commit, names the rule.
    assert_eq!(rules("PutSecret", "a/one", 0), [Some(root_rule)]);
    // Refused by the policy: no rule allowed it.
    assert_eq!(rules("GetSecret", "c/three", NOBODY), [None]);
    // No rule decides `Status`.
    assert!(rules("Status", "vault", 0).iter().all(Option::is_none));

    let out = d.run(
        &["audit", "tail", "-n", "50", log_path(&d).to_str().unwrap()],
        b"",
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    let line = out
        .stdout
        .lines()
        .find(|l| l.contains("GetSecret b/two"))
        .unwrap_or_else(|| panic!("{}", out.stdout));
    assert!(line.contains(&format!("policy rule {second}")), "{line}");
}

/// The check when the vault opens reads the log from the anchored checkpoint on: records
/// before it that were damaged do not stop the log (they are outside what the next checkpoint
/// signs), and `keyward audit verify` of the whole log still names the first bad one. A log
/// cut short or rewritten after the anchor is still set aside (the two tests above).
#[test]
fn a_log_damaged_before_its_anchored_checkpoint_still_starts_and_verify_names_the_record() {
    let token = SoftHsm::new("audit");
    let (mut d, lines, middle) = signed_log(&token);
    let anchor: Value =
        serde_json::from_slice(&std::fs::read(state(&d).join(audit::ANCHOR_FILE)).unwrap())
            .unwrap();
    let anchored = lines
        .iter()
        .position(|l| anchor["seq"] == audit::parse(l).unwrap().seq)
        .unwrap();
    assert!(
        middle < anchored,
        "the read in the middle is before the anchor"
    );
    // The read's target edited in place, one byte longer: the chain breaks there, and every
    // byte offset after it moves (the anchor's offset included).
    let mut edited = lines.clone();
    edited[middle] = String::from_utf8(edited[middle].clone())
        .unwrap()
        .replace("\"t/2\"", "\"t/22\"")
        .into_bytes();
    assert_ne!(edited[middle], lines[middle]);
    write_lines(&log_path(&d), &edited);

    d.start();
    let status = d.json(&["status"]);
    assert!(status["audit_finding"].is_null(), "{status}");
    assert_eq!(status["sealed"], false, "{status}");
    assert!(
        d.statuses().iter().all(|s| !s.contains("ANCHOR")),
        "{:?}",
        d.statuses()
    );
    ok(
        &d.run(&["secret", "get", "t/0"], b""),
        "the daemon serves on",
    );
    d.stop();
    let aside = std::fs::read_dir(state(&d))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().is_dir())
        .count();
    assert_eq!(aside, 0, "nothing was set aside");
    // The log went on where it was, and the whole-log check names the edited record.
    let now = records_in(&log_path(&d));
    assert!(now.len() > edited.len());
    assert_eq!(now[middle].seq, audit::parse(&lines[middle]).unwrap().seq);
    let (code, doc) = verify_args(&d, &[state(&d).to_str().unwrap()]);
    assert_eq!(code, 1, "{doc}");
    let p = &doc["error"]["parameters"];
    assert_eq!(p["line"], middle + 1, "{doc}");
    assert!(p["problem"].as_str().unwrap().contains("altered"), "{doc}");
}

/// The rows of the audit outbox: records committed with their changes whose lines are not yet
/// known durable in the log.
fn outbox_rows(d: &Keywardd) -> i64 {
    let db = rusqlite::Connection::open(state(d).join("keyward.db")).unwrap();
    db.query_row("SELECT count(*) FROM audit_outbox", [], |r| r.get(0))
        .unwrap()
}

/// The records of `PutSecret` of `name` that took effect.
fn puts_of(d: &Keywardd, name: &str) -> Vec<RequestRecord> {
    of(&records_in(&log_path(d)), "PutSecret", name)
        .into_iter()
        .map(|(_, r)| r)
        .filter(|r| r.result == audit::OK)
        .collect()
}

/// Put `name`, and kill the daemon the moment the put is acknowledged, before its outbox row
/// is deleted (that waits for the line to be durable, then for the cleaner); tries again with
/// another name in the rare case the cleaner got there first. Returns the name put and the
/// log's length just before it.
fn put_and_kill(d: &mut Keywardd, prefix: &str) -> (String, u64) {
    for attempt in 0..20 {
        let before = std::fs::metadata(log_path(d)).unwrap().len();
        let name = format!("{prefix}/{attempt}");
        ok(&d.run(&["secret", "put", &name], b"v"), "put");
        d.kill();
        if outbox_rows(d) > 0 {
            return (name, before);
        }
        d.start();
    }
    panic!("every put's outbox row was gone by the time the daemon was killed");
}

/// A put's record is committed in the put's own transaction (the audit outbox) and its line
/// reaches the file afterwards. A power cut can take that line (it was in the page cache only)
/// but not the row: the next start appends it from the outbox, once, in its place in the
/// chain. A kill leaves the line in the file and the row in the outbox: the next start sees
/// the line (it names the row) and appends nothing. The chain verifies throughout.
#[test]
fn a_put_whose_line_was_lost_is_appended_from_the_outbox_at_the_next_start_exactly_once() {
    let token = SoftHsm::new("audit-outbox");
    let mut d = Setup::new().token("hsm", &token).start();
    ok(&d.run(&["init", "--pkcs11", "hsm"], b""), "init");

    // The power cut: the log loses what was written since `before` (the put's line and the
    // reads around it, none durable yet); the store keeps the committed put and its row.
    let (lost, before) = put_and_kill(&mut d, "lost");
    assert_eq!(puts_of(&d, &lost).len(), 1, "the put's line was written");
    let log = std::fs::OpenOptions::new()
        .write(true)
        .open(log_path(&d))
        .unwrap();
    log.set_len(before).unwrap();
    drop(log);
    assert!(puts_of(&d, &lost).is_empty());
    d.start();
    let found = puts_of(&d, &lost);
    assert_eq!(found.len(), 1, "{found:#?}");
    assert_eq!(found[0].detail.as_deref(), Some("version 1"));
    assert!(found[0].outbox.is_some(), "{found:#?}");
    assert!(
        d.plain_log()
            .contains("appended the records of changes committed before the last stop"),
        "{}",
        d.plain_log()
    );
    let out = d.run(&["secret", "get", &lost], b"");
    ok(&out, "get the put whose line was lost");
    assert_eq!(out.stdout_bytes, b"v");

    // The kill: the line is in the file, the row in the outbox. Nothing is appended twice.
    let (kept, _) = put_and_kill(&mut d, "kept");
    d.start();
    assert_eq!(puts_of(&d, &kept).len(), 1);
    assert_eq!(puts_of(&d, &lost).len(), 1);
    // A clean stop leaves the outbox empty: every line is durable, and the next start reads
    // nothing back.
    d.stop();
    assert_eq!(outbox_rows(&d), 0);
    d.start();
    let ids: Vec<u64> = requests(&records_in(&log_path(&d)))
        .into_iter()
        .filter_map(|(_, r)| r.outbox)
        .collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    d.stop();
    let path = copy_log(&d, &d.dir().join("copy"));
    let (code, doc) = verify(&d, &path, None);
    assert_eq!(code, 0, "{doc}");
}
