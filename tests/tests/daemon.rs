//! keywardd end to end: the real daemon binary on a real SoftHSM token and a real swtpm, driven
//! through the real `keyward` CLI.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use keyward::api::{ApiError, SecretString, UnsealParams};
use keyward::{audit, Client, ClientError};
use keyward_tests::keywardd::{Keywardd, Setup};
use keyward_tests::softhsm::SoftHsm;
use keyward_tests::swtpm::Swtpm;
use std::time::Duration;

struct World {
    tpm: Swtpm,
    token: SoftHsm,
    daemon: Keywardd,
}

/// A daemon with a TPM (`tpm`) and a token (`hsm`), unattended unseal trying the TPM first.
fn world() -> World {
    let tpm = Swtpm::start();
    let token = SoftHsm::new("keyward-daemon");
    let daemon = Setup::new()
        .tpm("tpm", &tpm)
        .token("hsm", &token)
        .unseal_order(&["tpm", "hsm"])
        .start();
    World { tpm, token, daemon }
}

/// `keyward init` with a TPM slot, a token slot and 2-of-3 recovery shares; returns the shares.
fn init(d: &Keywardd) -> Vec<String> {
    let out = d.json(&[
        "init",
        "--tpm2",
        "tpm",
        "--pkcs11",
        "hsm",
        "--recovery",
        "2/3",
    ]);
    assert_eq!(out["keyslots"].as_array().unwrap().len(), 3, "{out}");
    let shares: Vec<String> = out["recovery_shares"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(shares.len(), 3);
    shares
}

fn put(d: &Keywardd, name: &str, value: &[u8]) -> u64 {
    let out = d.run(&["--json", "secret", "put", name], value);
    assert_eq!(out.code, 0, "put {name}: {}", out.stderr);
    serde_json::from_str::<serde_json::Value>(&out.stdout).unwrap()["version"]
        .as_u64()
        .unwrap()
}

fn get(d: &Keywardd, name: &str) -> Vec<u8> {
    let out = d.run(&["secret", "get", name], b"");
    assert_eq!(out.code, 0, "get {name}: {}", out.stderr);
    out.stdout_bytes
}

fn status(d: &Keywardd) -> serde_json::Value {
    d.json(&["status"])
}

#[test]
fn init_put_restart_unseals_from_the_tpm_and_serves() {
    let mut w = world();
    let s = status(&w.daemon);
    assert_eq!(s["initialized"], false);
    init(&w.daemon);
    assert_eq!(put(&w.daemon, "db/password", b"correct horse"), 1);
    assert_eq!(put(&w.daemon, "db/password", b"battery staple"), 2);
    w.daemon.restart();
    let s = status(&w.daemon);
    assert_eq!(s["sealed"], false, "{s}");
    assert!(s["unsealed_by"].as_str().unwrap().contains("tpm2"), "{s}");
    assert_eq!(get(&w.daemon, "db/password"), b"battery staple");
    let out = w
        .daemon
        .run(&["secret", "get", "db/password", "--version", "1"], b"");
    assert_eq!(out.stdout_bytes, b"correct horse");
    assert!(
        w.daemon
            .statuses()
            .iter()
            .any(|s| s.starts_with("unsealed by")),
        "{:?}",
        w.daemon.statuses()
    );
}

#[test]
fn token_slot_unseals_when_the_pcrs_changed() {
    let mut w = world();
    init(&w.daemon);
    put(&w.daemon, "api/token", b"t0k3n");
    w.daemon.stop();
    w.tpm.extend_pcr(7);
    w.daemon.start();
    let s = status(&w.daemon);
    assert_eq!(s["sealed"], false, "{s}");
    assert!(s["unsealed_by"].as_str().unwrap().contains("pkcs11"), "{s}");
    assert_eq!(get(&w.daemon, "api/token"), b"t0k3n");
    assert!(
        w.daemon.log().contains("PCR"),
        "the TPM slot's failure is logged"
    );
}

#[test]
fn recovery_shares_unseal_when_both_devices_are_gone_and_fewer_do_not() {
    let mut w = world();
    let shares = init(&w.daemon);
    put(&w.daemon, "k", b"v");
    w.daemon.stop();
    w.tpm.stop();
    std::fs::rename(w.token.token_dir(), w.token.dir().join("tokens-away")).unwrap();
    w.daemon.start();
    let s = status(&w.daemon);
    assert_eq!(s["sealed"], true, "{s}");
    assert!(s["reason"].as_str().unwrap().contains("keyslot"), "{s}");
    let out = w.daemon.run(&["secret", "get", "k"], b"");
    assert_eq!(out.code, 4, "sealed is exit code 4: {}", out.stderr);
    assert!(out.stderr.contains("sealed"), "{}", out.stderr);

    // k-1 shares: still sealed.
    let out = w
        .daemon
        .run(&["unseal"], format!("{}\n", shares[2]).as_bytes());
    assert_ne!(
        out.code, 0,
        "one share of two must not unseal: {}",
        out.stdout
    );
    assert_eq!(status(&w.daemon)["sealed"], true);
    // The k-th share opens it.
    let out = w
        .daemon
        .run(&["unseal"], format!("{}\n", shares[0]).as_bytes());
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(status(&w.daemon)["sealed"], false);
    assert_eq!(get(&w.daemon, "k"), b"v");
}

/// `share` with one data character changed: a typo its checksum catches.
fn one_typo(share: &str) -> String {
    let mut typo = share.as_bytes().to_vec();
    let i = typo.len() - 7;
    typo[i] = if typo[i] == b'A' { b'B' } else { b'A' };
    String::from_utf8(typo).unwrap()
}

/// How many requests of `op` the audit log holds outcomes for.
fn audited(d: &Keywardd, op: &str) -> usize {
    let log = std::fs::read(d.dir().join("state").join(audit::LOG_FILE)).unwrap();
    audit::lines(&log)
        .iter()
        .filter_map(|l| audit::parse(l.bytes).ok())
        .filter(|r| {
            matches!(&r.body, audit::Body::Request(q) if q.op == op && q.result != audit::STARTED)
        })
        .count()
}

/// A mistyped share never leaves the CLI: `unseal` and `confirm-recovery` name the typo with
/// the reason keywardd itself gives, exit with the usage code, and send nothing (no request on
/// the audit log). Sent straight to the API, the same share is refused for that reason and is
/// on record, so the log would have shown a share the CLI had sent.
#[test]
fn a_mistyped_share_is_refused_by_the_cli_before_it_is_sent() {
    let w = world();
    let shares = init(&w.daemon);
    w.daemon.run(&["seal"], b"");
    let typo = one_typo(&shares[0]);
    let unseals = audited(&w.daemon, "Unseal");

    let out = w
        .daemon
        .run(&["unseal"], format!("{typo}\n{}\n", shares[1]).as_bytes());
    assert_eq!(out.code, 2, "a typo is bad input: {}", out.stderr);
    assert!(
        out.stderr
            .contains("recovery share 1 not sent: share has a typo: its checksum does not match"),
        "{}",
        out.stderr
    );
    assert!(
        !out.stderr.contains(&typo[20..40]),
        "a share is never echoed"
    );
    assert_eq!(audited(&w.daemon, "Unseal"), unseals, "nothing was sent");
    assert_eq!(status(&w.daemon)["sealed"], true);

    // keywardd's own verdict on it: the reason the CLI gave.
    let mut c = Client::connect(w.daemon.socket()).unwrap();
    let refused = c
        .unseal(UnsealParams {
            recovery_share: Some(SecretString::new(typo.as_str())),
            pin: None,
        })
        .unwrap_err();
    let ClientError::Api(ApiError::InvalidArgument { parameter, reason }) = refused else {
        panic!("{refused:?}");
    };
    assert_eq!(parameter, "recovery_share");
    assert_eq!(reason, "share has a typo: its checksum does not match");
    assert_eq!(
        audited(&w.daemon, "Unseal"),
        unseals + 1,
        "a sent share is on record"
    );

    // Unsealed, a rekey's confirmation checks its shares the same way, before sending any.
    let two = format!("{}\n{}\n", shares[0], shares[1]);
    assert_eq!(w.daemon.run(&["unseal"], two.as_bytes()).code, 0);
    let file = w.daemon.dir().join("confirm");
    std::fs::write(&file, format!("{}\n{typo}\n", shares[1])).unwrap();
    let confirms = audited(&w.daemon, "ConfirmRecovery");
    let out = w
        .daemon
        .run(&["confirm-recovery", file.to_str().unwrap()], b"");
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(
        out.stderr
            .contains("recovery share 2 not sent: share has a typo: its checksum does not match"),
        "{}",
        out.stderr
    );
    assert_eq!(
        audited(&w.daemon, "ConfirmRecovery"),
        confirms,
        "nothing was sent"
    );
}

#[test]
fn seal_drops_the_key_and_unseal_restores_it() {
    let w = world();
    let shares = init(&w.daemon);
    put(&w.daemon, "a", b"1");
    assert_eq!(w.daemon.run(&["seal"], b"").code, 0);
    assert_eq!(w.daemon.run(&["secret", "get", "a"], b"").code, 4);
    let input = format!("{}\n{}\n", shares[0], shares[1]);
    assert_eq!(w.daemon.run(&["unseal"], input.as_bytes()).code, 0);
    assert_eq!(get(&w.daemon, "a"), b"1");
}

#[test]
fn rekey_keeps_every_secret_and_replaces_recovery_shares() {
    let mut w = world();
    let old = init(&w.daemon);
    for i in 0..200 {
        put(
            &w.daemon,
            &format!("bulk/{i}"),
            format!("value-{i}").as_bytes(),
        );
    }
    let out = w.daemon.json(&["rekey"]);
    let new: Vec<String> = out["recovery_shares"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(new.len(), 3, "{out}");
    assert!(out["pending_until"].is_string(), "{out}");
    let confirm = format!("{}\n{}\n", new[2], new[0]);
    let out = w
        .daemon
        .run(&["--json", "confirm-recovery"], confirm.as_bytes());
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stdout.contains("\"rekeyed\": true"), "{}", out.stdout);
    assert_eq!(get(&w.daemon, "bulk/7"), b"value-7");
    // The device slots were re-sealed: the restart unseals unattended.
    w.daemon.restart();
    assert_eq!(status(&w.daemon)["sealed"], false);
    for i in (0..200).step_by(37) {
        assert_eq!(
            get(&w.daemon, &format!("bulk/{i}")),
            format!("value-{i}").as_bytes()
        );
    }
    // Old shares no longer open the vault; new ones do.
    w.daemon.run(&["seal"], b"");
    let out = w
        .daemon
        .run(&["unseal"], format!("{}\n{}\n", old[0], old[1]).as_bytes());
    assert_ne!(out.code, 0, "old shares must not unseal after a rekey");
    let out = w
        .daemon
        .run(&["unseal"], format!("{}\n{}\n", new[0], new[1]).as_bytes());
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(get(&w.daemon, "bulk/0"), b"value-0");
}

#[test]
fn rotate_starts_a_term_and_old_versions_stay_readable() {
    let w = world();
    init(&w.daemon);
    put(&w.daemon, "r", b"old");
    let out = w.daemon.json(&["rotate"]);
    assert_eq!(out["term"], 2, "{out}");
    put(&w.daemon, "r", b"new");
    let versions = w.daemon.json(&["secret", "versions", "r"]);
    let terms: Vec<u64> = versions["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["term"].as_u64().unwrap())
        .collect();
    assert_eq!(terms, [1, 2], "{versions}");
    assert_eq!(
        w.daemon
            .run(&["secret", "get", "r", "--version", "1"], b"")
            .stdout_bytes,
        b"old"
    );
    assert_eq!(get(&w.daemon, "r"), b"new");
}

#[test]
fn keys_are_made_in_the_devices_and_signatures_verify_with_openssl() {
    let w = world();
    init(&w.daemon);
    for (name, device, algorithm) in [
        ("hsm-ed", "hsm", "ed25519"),
        ("hsm-p256", "hsm", "ecdsa-p256"),
        ("hsm-rsa", "hsm", "rsa-pss-3072"),
        ("hsm-rsa1", "hsm", "rsa-pkcs1-3072"),
        ("tpm-p256", "tpm", "ecdsa-p256"),
    ] {
        let out = w.daemon.run(
            &[
                "key",
                "create",
                name,
                "--device",
                device,
                "--algorithm",
                algorithm,
            ],
            b"",
        );
        assert_eq!(out.code, 0, "{name}: {}", out.stderr);
        assert!(out.stdout.contains("BEGIN PUBLIC KEY"), "{}", out.stdout);
        let der = w
            .daemon
            .run(&["key", "public", name, "--der"], b"")
            .stdout_bytes;
        let message = format!("sign me with {name}");
        let out = w.daemon.run(&["key", "sign", name], message.as_bytes());
        assert_eq!(out.code, 0, "{name}: {}", out.stderr);
        let alg = algorithm.parse().unwrap();
        let public = hsm_shim::PublicKeyDer(der);
        keyward_tests::openssl::verify(&public, alg, message.as_bytes(), &out.stdout_bytes)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(keyward_tests::openssl::verify(&public, alg, b"other", &out.stdout_bytes).is_err());
    }
    let keys = w.daemon.json(&["key", "list"]);
    assert_eq!(keys["keys"].as_array().unwrap().len(), 5, "{keys}");
    // Prehashed: the digest's length is checked.
    let out = w
        .daemon
        .run(&["key", "sign", "hsm-p256", "--prehashed"], &[0u8; 31]);
    assert_ne!(out.code, 0);
    assert!(out.stderr.contains("32"), "{}", out.stderr);
    // SHA-512 (SSH's rsa-sha2-512): RSA PKCS#1 v1.5 keys only, over the message or its digest.
    let der = w
        .daemon
        .run(&["key", "public", "hsm-rsa1", "--der"], b"")
        .stdout_bytes;
    let public = hsm_shim::PublicKeyDer(der);
    let sha512 = keyward::api::SignHash::Sha512;
    let out = w.daemon.run(
        &["key", "sign", "hsm-rsa1", "--hash", "sha512"],
        b"long hash",
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    let rsa1 = hsm_shim::KeyAlgorithm::RsaPkcs1_3072;
    keyward_tests::openssl::verify_over(&public, rsa1, sha512, b"long hash", &out.stdout_bytes)
        .unwrap();
    let digest = <sha2::Sha512 as sha2::Digest>::digest(b"long hash");
    let out = w.daemon.run(
        &["key", "sign", "hsm-rsa1", "--hash", "sha512", "--prehashed"],
        &digest,
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    keyward_tests::openssl::verify_over(&public, rsa1, sha512, b"long hash", &out.stdout_bytes)
        .unwrap();
    let out = w
        .daemon
        .run(&["key", "sign", "hsm-p256", "--hash", "sha512"], b"x");
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(out.stderr.contains("invalid hash"), "{}", out.stderr);
    // Delete destroys it.
    assert_eq!(w.daemon.run(&["key", "delete", "hsm-ed"], b"").code, 0);
    let gone = w.daemon.run(&["key", "sign", "hsm-ed"], b"x");
    assert_eq!(gone.code, 1, "{}", gone.stderr);
    assert!(gone.stderr.contains("not found"), "{}", gone.stderr);
    // A new key under the old name signs as itself, not as the one deleted.
    w.daemon.json(&[
        "key",
        "create",
        "hsm-ed",
        "--device",
        "hsm",
        "--algorithm",
        "ed25519",
    ]);
    let der = w
        .daemon
        .run(&["key", "public", "hsm-ed", "--der"], b"")
        .stdout_bytes;
    let out = w.daemon.run(&["key", "sign", "hsm-ed"], b"again");
    assert_eq!(out.code, 0, "{}", out.stderr);
    keyward_tests::openssl::verify(
        &hsm_shim::PublicKeyDer(der),
        "ed25519".parse().unwrap(),
        b"again",
        &out.stdout_bytes,
    )
    .unwrap();
}

#[test]
fn the_last_keyslot_is_not_removed_without_force() {
    let w = world();
    w.daemon.json(&["init", "--pkcs11", "hsm"]);
    let out = w.daemon.run(&["keyslot", "remove", "1"], b"");
    assert_ne!(out.code, 0);
    assert!(out.stderr.contains("last"), "{}", out.stderr);
    w.daemon.json(&["enroll", "tpm2", "--device", "tpm"]);
    assert_eq!(w.daemon.run(&["keyslot", "remove", "1"], b"").code, 0);
    let slots = w.daemon.json(&["keyslot", "list"]);
    let kinds: Vec<&str> = slots["keyslots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["tpm2"]);
}

#[test]
fn a_second_init_is_refused() {
    let w = world();
    init(&w.daemon);
    let out = w.daemon.run(&["init", "--pkcs11", "hsm"], b"");
    assert_ne!(out.code, 0);
    assert!(out.stderr.contains("already"), "{}", out.stderr);
}

#[test]
fn a_softhsm_device_without_its_config_is_refused_naming_the_setting() {
    let token = SoftHsm::new("keyward-noconf");
    let d = Setup::new().prepare();
    let config = format!(
        "{}\n[devices.hsm]\nkind = \"pkcs11\"\nmodule = \"{}\"\ntoken = \"pkcs11:token={}\"\n",
        std::fs::read_to_string(d.config_path()).unwrap(),
        hsm_shim::pkcs11::SOFTHSM_MODULE,
        token.label(),
    );
    std::fs::write(d.config_path(), config).unwrap();
    let out = std::process::Command::new(keyward_tests::keywardd::bin("keywardd"))
        .arg("--config")
        .arg(d.config_path())
        .env("SOFTHSM2_CONF", token.conf())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("softhsm_conf"), "{stderr}");
    assert!(stderr.contains("[devices.hsm]"), "{stderr}");
    assert!(
        stderr.contains("from the environment is ignored"),
        "{stderr}"
    );
}

/// A stop lets go of the devices and waits for their threads to close them before the process
/// exits: a device library must not be mid-close while the C runtime runs its exit handlers.
#[test]
fn a_stop_closes_every_device_before_the_process_exits() {
    let mut w = world();
    init(&w.daemon);
    put(&w.daemon, "db/password", b"x");
    let mark = w.daemon.log_mark();
    w.daemon.stop();
    let log = w.daemon.log();
    let after: Vec<&str> = log.get(mark..).unwrap_or_default().lines().collect();
    let stopped = after
        .iter()
        .position(|l| l.contains("stopped"))
        .unwrap_or_else(|| panic!("no \"stopped\" line; log since the stop:\n{after:#?}"));
    for device in ["tpm", "hsm"] {
        let closed = after
            .iter()
            .position(|l| l.contains("device closed") && l.contains(device))
            .unwrap_or_else(|| panic!("{device} never closed; log since the stop:\n{after:#?}"));
        assert!(
            closed < stopped,
            "{device} closed after the stop ended:\n{after:#?}"
        );
    }
}

#[test]
fn the_cli_refuses_a_bad_name_or_algorithm_before_it_connects() {
    // No daemon at the socket: had the CLI sent anything, it would fail to connect instead.
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("absent.sock");
    let run = |args: &[&str]| {
        let mut cmd = std::process::Command::new(keyward_tests::keywardd::bin("keyward"));
        cmd.arg("--socket").arg(&socket).args(args);
        keyward_tests::keywardd::run_cli(&mut cmd, b"value")
    };
    let out = run(&["secret", "put", "db/../etc"]);
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(
        out.stderr.contains("'.' and '..' are not names"),
        "{}",
        out.stderr
    );
    let out = run(&["key", "sign", "a key"]);
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(out.stderr.contains("' ' is not allowed"), "{}", out.stderr);
    let out = run(&[
        "key",
        "create",
        "k",
        "--device",
        "hsm",
        "--algorithm",
        "dsa",
    ]);
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(
        out.stderr.contains("ed25519") && out.stderr.contains("rsa-pss-3072"),
        "{}",
        out.stderr
    );
    // A good name gets as far as the socket.
    let out = run(&["secret", "put", "db/password"]);
    assert_ne!(out.code, 2, "{}", out.stderr);
}

/// Signatures on a token run on sessions of their own, beside the device's thread: while the
/// token generates an RSA key (a second or so of the device's thread), signatures with another
/// key of the same token keep coming. Through the device's queue they would wait for the
/// generation, and at most one or two would land before its request ends.
#[test]
fn token_signatures_do_not_wait_behind_a_key_generation_on_the_same_token() {
    let w = world();
    init(&w.daemon);
    let out = w.daemon.run(
        &[
            "key",
            "create",
            "fast",
            "--device",
            "hsm",
            "--algorithm",
            "ecdsa-p256",
        ],
        b"",
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    let mut best = 0;
    // An RSA generation may be quick by luck; a few tries give one long enough to sign in.
    for attempt in 0..6 {
        let name = format!("slow-{attempt}");
        let mark = w.daemon.log_mark();
        let mut generating = w
            .daemon
            .cli()
            .args([
                "key",
                "create",
                &name,
                "--device",
                "hsm",
                "--algorithm",
                "rsa-pss-3072",
            ])
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // From this line on the generation is on the device's queue.
        w.daemon
            .wait_log("the create intent", mark, Duration::from_secs(30), |l| {
                l.contains("create intent recorded") && l.contains(&name)
            });
        let mut signed_meanwhile = 0;
        while generating.try_wait().unwrap().is_none() {
            let out = w
                .daemon
                .run(&["key", "sign", "fast"], b"while it generates");
            assert_eq!(out.code, 0, "{}", out.stderr);
            signed_meanwhile += 1;
        }
        assert!(generating.wait().unwrap().success());
        best = best.max(signed_meanwhile);
        if best >= 3 {
            break;
        }
    }
    assert!(
        best >= 3,
        "at most {best} signatures landed while a key was being generated on the token"
    );
}

/// A change reaches every reader the moment it is acknowledged, whoever commits it and
/// whatever the readers hold. Four connections read one name as fast as they can while a fifth
/// puts 200 versions of it: after each acknowledged put, a read on any connection sees that
/// version or a later one, and no reader ever sees a version go back. A delete is seen at once
/// too.
#[test]
fn every_read_after_an_acknowledged_change_sees_it_under_concurrent_readers() {
    let w = world();
    init(&w.daemon);
    let socket = w.daemon.socket().to_owned();
    let mut writer = Client::connect(&socket).unwrap();
    writer.put_secret("hot", b"0").unwrap();
    let acked = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(1));
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let readers: Vec<_> = (0..4)
        .map(|_| {
            let (socket, acked, done) = (socket.clone(), acked.clone(), done.clone());
            std::thread::spawn(move || {
                let mut c = Client::connect(&socket).unwrap();
                let (mut last, mut reads) = (0, 0u64);
                while !done.load(std::sync::atomic::Ordering::Acquire) {
                    // The floor is read before the request: that put was acknowledged before.
                    let floor = acked.load(std::sync::atomic::Ordering::Acquire);
                    let reply = c.get_secret("hot", None).unwrap();
                    assert!(
                        reply.version >= floor,
                        "{} < acknowledged {floor}",
                        reply.version
                    );
                    assert!(
                        reply.version >= last,
                        "went back from {last} to {}",
                        reply.version
                    );
                    assert_eq!(
                        reply.value.expose(),
                        (reply.version - 1).to_string().as_bytes()
                    );
                    last = reply.version;
                    reads += 1;
                }
                reads
            })
        })
        .collect();
    for v in 1..200u64 {
        let version = writer.put_secret("hot", v.to_string().as_bytes()).unwrap();
        assert_eq!(version, v + 1);
        acked.store(version, std::sync::atomic::Ordering::Release);
        let seen = writer.get_secret("hot", None).unwrap();
        assert_eq!(seen.version, version);
    }
    done.store(true, std::sync::atomic::Ordering::Release);
    for r in readers {
        assert!(r.join().unwrap() > 0);
    }
    let mut c = Client::connect(&socket).unwrap();
    c.get_secret("hot", None).unwrap();
    writer.delete_secret("hot").unwrap();
    assert!(
        matches!(
            c.get_secret("hot", None),
            Err(ClientError::Api(ApiError::NotFound { .. }))
        ),
        "a deleted secret was still served"
    );
}
