//! The D-Bus interface as callers meet it: the real `keywardd` on a real SoftHSM token, serving
//! `org.keyward.Custodian1` on a private `dbus-daemon` that enforces the shipped bus policy,
//! called with `busctl` (and `dbus-send`, which prints error names) as root and as `nobody`
//! (uid 65534, through `setpriv`), so that the daemon's own policy is what stands between
//! `nobody` and the vault.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;
use std::time::{Duration, Instant};

use keyward_tests::dbus::PrivateBus;
use keyward_tests::keywardd::{bin, run_cli, Keywardd, Output, Setup, ROOT_ADMIN_POLICY};
use keyward_tests::softhsm::SoftHsm;
use keyward_tests::swtpm::{Gate, Swtpm, CC_SIGN};
use serde_json::Value;

const NAME: &str = "org.keyward.Custodian1";
const PATH: &str = "/org/keyward/Custodian1";
const IFACE: &str = "org.keyward.Custodian1";

/// The uid and gid of `nobody`.
const NOBODY: u32 = 65534;

/// A group no account has: only callers given it by `setpriv --groups` are in it.
const GROUP: u32 = 4242;

/// Root may do everything (the fixture's root-admin rule); nobody may read `shared/*`;
/// members of [`GROUP`] may read `group/*`.
fn policy() -> String {
    format!(
        r#"{ROOT_ADMIN_POLICY}
[[rule]]
who = {{ uid = {NOBODY} }}
allow = ["read"]
secrets = ["shared/*"]

[[rule]]
who = {{ gid = {GROUP} }}
allow = ["read"]
secrets = ["group/*"]
"#
    )
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Who {
    Root,
    Nobody,
    /// Nobody with [`GROUP`] as a supplementary group.
    NobodyInGroup,
}

struct World {
    _token: SoftHsm,
    bus: PrivateBus,
    daemon: Keywardd,
    shares: Vec<String>,
}

/// A daemon on a private bus, initialised by root (token slot + 2-of-3 recovery) with
/// `shared/a` = "alpha", `private/b` = "bravo", `group/g` = "golf" and the ECDSA P-256 key
/// `root-key`.
fn world() -> World {
    let token = SoftHsm::new("keyward-dbus");
    let bus = PrivateBus::start();
    let daemon = Setup::new()
        .token("hsm", &token)
        .dbus_address(bus.address())
        .policy(&policy())
        .start();
    // READY=1 comes after the name is owned: no waiting here.
    assert!(
        bus.has_owner(NAME),
        "{NAME} not owned at READY; log:\n{}",
        daemon.log()
    );
    let init = daemon.json(&["init", "--pkcs11", "hsm", "--recovery", "2/3"]);
    let shares = strings(&init["recovery_shares"]);
    for (name, value) in [
        ("shared/a", &b"alpha"[..]),
        ("private/b", b"bravo"),
        ("group/g", b"golf"),
    ] {
        let out = daemon.run(&["secret", "put", name], value);
        assert_eq!(out.code, 0, "put {name}: {}", out.stderr);
    }
    let out = daemon.run(
        &[
            "key",
            "create",
            "root-key",
            "--device",
            "hsm",
            "--algorithm",
            "ecdsa-p256",
        ],
        b"",
    );
    assert_eq!(out.code, 0, "create key: {}", out.stderr);
    World {
        _token: token,
        bus,
        daemon,
        shares,
    }
}

/// A JSON array of strings (recovery shares).
fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|s| s.as_str().unwrap().to_owned())
        .collect()
}

/// `cmd` as `who`: unchanged for root, under `setpriv` for nobody.
fn as_who(who: Who, program: &str) -> Command {
    match who {
        Who::Root => Command::new(program),
        Who::Nobody | Who::NobodyInGroup => {
            let groups = if who == Who::Nobody {
                "--clear-groups".to_owned()
            } else {
                format!("--groups={GROUP}")
            };
            let mut c = Command::new("setpriv");
            c.args([
                &format!("--reuid={NOBODY}"),
                &format!("--regid={NOBODY}"),
                &groups,
                "--",
                program,
            ]);
            c
        }
    }
}

/// `busctl --json=short call NAME PATH IFACE METHOD ARGS…` as `who`.
fn call(bus: &PrivateBus, who: Who, method: &str, args: &[&str]) -> Output {
    let mut c = as_who(who, "busctl");
    c.arg(format!("--address={}", bus.address()))
        .args(["--json=short", "call", NAME, PATH, IFACE, method])
        .args(args);
    run_cli(&mut c, b"")
}

/// A call that must succeed: its reply's `data` array.
fn ok(bus: &PrivateBus, who: Who, method: &str, args: &[&str]) -> Vec<Value> {
    let out = call(bus, who, method, args);
    assert_eq!(
        out.code, 0,
        "{method} {args:?} as {who:?} failed: {}",
        out.stderr
    );
    if out.stdout.trim().is_empty() {
        return Vec::new(); // busctl prints nothing for an empty reply
    }
    let reply: Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("{method}: {e}: {}", out.stdout));
    reply["data"].as_array().unwrap().clone()
}

/// A call that must fail with `org.keyward.Custodian1.Error.<reason>`, asked with
/// `dbus-send` (busctl prints only the message). Returns the message.
fn fails(bus: &PrivateBus, who: Who, method: &str, args: &[&str], reason: &str) -> String {
    let mut c = as_who(who, "dbus-send");
    c.arg(format!("--bus={}", bus.address()))
        .args(["--print-reply", &format!("--dest={NAME}"), PATH])
        .arg(format!("{IFACE}.{method}"))
        .args(args);
    let out = run_cli(&mut c, b"");
    assert_ne!(
        out.code, 0,
        "{method} {args:?} as {who:?} succeeded: {}",
        out.stdout
    );
    let want = format!("org.keyward.Custodian1.Error.{reason}");
    assert!(
        out.stderr.contains(&want),
        "{method} {args:?} as {who:?}: expected {want}, got: {}",
        out.stderr
    );
    out.stderr
}

/// An `ay` reply element as bytes.
fn bytes(v: &Value) -> Vec<u8> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|b| u8::try_from(b.as_u64().unwrap()).unwrap())
        .collect()
}

/// `bytes` as busctl's `ay` arguments: the count, then each byte.
fn ay(bytes: &[u8]) -> Vec<String> {
    std::iter::once(bytes.len().to_string())
        .chain(bytes.iter().map(u8::to_string))
        .collect()
}

/// The `a{sv}` of `Status`, as a map of plain values.
fn status(bus: &PrivateBus, who: Who) -> serde_json::Map<String, Value> {
    let data = ok(bus, who, "Status", &[]);
    data[0]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v["data"].clone()))
        .collect()
}

#[test]
fn root_reads_writes_signs_and_administers_over_dbus() {
    let w = world();
    let bus = &w.bus;
    let root = Who::Root;

    let s = status(bus, root);
    assert_eq!(s["initialized"], true, "{s:?}");
    assert_eq!(s["sealed"], false, "{s:?}");
    assert_eq!(s["keyslots"], 2, "{s:?}");
    assert!(s["term"].as_u64().unwrap() >= 1, "{s:?}");
    assert_eq!(s["reason"], "", "{s:?}");
    assert_eq!(s["rekey_pending_until"], "", "{s:?}");
    assert_eq!(s["audit_finding"], "", "{s:?}");
    assert!(!s["version"].as_str().unwrap().is_empty(), "{s:?}");
    assert!(s["devices"].as_array().is_some(), "{s:?}");

    // Secrets: version 0 is the latest; an explicit version picks that one.
    let r = ok(bus, root, "GetSecret", &["st", "shared/a", "0"]);
    assert_eq!(bytes(&r[0]), b"alpha");
    assert_eq!(r[1], 1);
    let mut args = vec!["say".to_owned(), "shared/a".to_owned()];
    args.extend(ay(b"alpha two\0\xff"));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    assert_eq!(ok(bus, root, "PutSecret", &args)[0], 2);
    let r = ok(bus, root, "GetSecret", &["st", "shared/a", "0"]);
    assert_eq!(bytes(&r[0]), b"alpha two\0\xff");
    assert_eq!(r[1], 2);
    assert_eq!(
        bytes(&ok(bus, root, "GetSecret", &["st", "shared/a", "1"])[0]),
        b"alpha"
    );
    // What D-Bus wrote, the CLI reads (one service, one store).
    let out = w.daemon.run(&["secret", "get", "shared/a"], b"");
    assert_eq!(out.stdout_bytes, b"alpha two\0\xff");
    let names = ok(bus, root, "ListSecrets", &["s", ""]);
    assert_eq!(
        names[0],
        serde_json::json!(["group/g", "private/b", "shared/a"])
    );
    let names = ok(bus, root, "ListSecrets", &["s", "shared/"]);
    assert_eq!(names[0], serde_json::json!(["shared/a"]));
    ok(bus, root, "DeleteSecret", &["s", "private/b"]);
    fails(
        bus,
        root,
        "GetSecret",
        &["string:private/b", "uint64:0"],
        "NotFound",
    );

    // Keys: sign over D-Bus, verify with OpenSSL against the CLI's public key.
    let der = w.daemon.run(&["key", "public", "root-key", "--der"], b"");
    assert_eq!(der.code, 0, "{}", der.stderr);
    assert_eq!(
        bytes(&ok(bus, root, "PublicKey", &["s", "root-key"])[0]),
        der.stdout_bytes
    );
    let message = b"signed over D-Bus";
    let mut args = vec!["sayb".to_owned(), "root-key".to_owned()];
    args.extend(ay(message));
    args.push("false".into());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let signature = bytes(&ok(bus, root, "Sign", &args)[0]);
    let public = hsm_shim::PublicKeyDer(der.stdout_bytes);
    keyward_tests::openssl::verify(
        &public,
        hsm_shim::KeyAlgorithm::EcdsaP256,
        message,
        &signature,
    )
    .unwrap();
    let created = ok(
        bus,
        root,
        "CreateKey",
        &["sss", "dbus-key", "hsm", "ed25519"],
    );
    let spki = bytes(&created[0]);
    assert!(!spki.is_empty());
    let keys = ok(bus, root, "ListKeys", &[]);
    let keys = keys[0].as_array().unwrap();
    let names: Vec<&str> = keys.iter().map(|k| k[0].as_str().unwrap()).collect();
    assert!(
        names.contains(&"root-key") && names.contains(&"dbus-key"),
        "{keys:?}"
    );
    assert!(
        keys.iter()
            .any(|k| k[0] == "dbus-key" && k[1] == "hsm" && k[2] == "ed25519"),
        "{keys:?}"
    );
    ok(bus, root, "DeleteKey", &["s", "dbus-key"]);
    fails(bus, root, "PublicKey", &["string:dbus-key"], "NotFound");
    fails(
        bus,
        root,
        "CreateKey",
        &["string:k", "string:hsm", "string:dsa"],
        "InvalidArgument",
    );

    // Administration: rotate, seal, unseal with recovery shares.
    let term = ok(bus, root, "Rotate", &[])[0].as_u64().unwrap();
    assert_eq!(status(bus, root)["term"], term);
    ok(bus, root, "Seal", &[]);
    let s = status(bus, root);
    assert_eq!(s["sealed"], true, "{s:?}");
    assert_eq!(s["term"], 0, "{s:?}");
    fails(
        bus,
        root,
        "GetSecret",
        &["string:shared/a", "uint64:0"],
        "Sealed",
    );
    fails(
        bus,
        root,
        "Unseal",
        &["string:", "string:"],
        "InvalidArgument",
    );
    let r = ok(bus, root, "Unseal", &["ss", &w.shares[0], ""]);
    assert_eq!(r, [Value::from(true), Value::from(1)]);
    let r = ok(bus, root, "Unseal", &["ss", &w.shares[2], ""]);
    assert_eq!(r, [Value::from(false), Value::from(0)]);
    let s = status(bus, root);
    assert_eq!(s["sealed"], false, "{s:?}");
    assert!(
        s["unsealed_by"].as_str().unwrap().contains("recovery"),
        "{s:?}"
    );
    assert_eq!(
        bytes(&ok(bus, root, "GetSecret", &["st", "shared/a", "0"])[0]),
        b"alpha two\0\xff"
    );
}

#[test]
fn nobody_meets_the_daemons_policy_not_the_bus() {
    let w = world();
    let bus = &w.bus;
    let nobody = Who::Nobody;

    // Status is for everyone.
    assert_eq!(status(bus, nobody)["sealed"], false);
    // Allowed by the policy.
    let r = ok(bus, nobody, "GetSecret", &["st", "shared/a", "0"]);
    assert_eq!(bytes(&r[0]), b"alpha");
    assert_eq!(
        ok(bus, nobody, "ListSecrets", &["s", ""])[0],
        serde_json::json!(["shared/a"]),
        "only what nobody may read is listed"
    );
    // A secret the policy lets nobody read but which doesn't exist: NotFound.
    fails(
        bus,
        nobody,
        "GetSecret",
        &["string:shared/zzz", "uint64:0"],
        "NotFound",
    );
    // Denied by the policy, before the store: PermissionDenied, whether it exists or not.
    let msg = fails(
        bus,
        nobody,
        "GetSecret",
        &["string:private/b", "uint64:0"],
        "PermissionDenied",
    );
    assert!(msg.contains("permission denied"), "{msg}");
    assert!(!msg.contains("bravo"), "no value in errors: {msg}");
    fails(
        bus,
        nobody,
        "GetSecret",
        &["string:private/none", "uint64:0"],
        "PermissionDenied",
    );
    fails(
        bus,
        nobody,
        "PutSecret",
        &["string:shared/a", "array:byte:1,2,3"],
        "PermissionDenied",
    );
    fails(
        bus,
        nobody,
        "Sign",
        &["string:root-key", "array:byte:1,2,3", "boolean:false"],
        "PermissionDenied",
    );
    fails(bus, nobody, "Seal", &[], "PermissionDenied");
    fails(bus, nobody, "Rotate", &[], "PermissionDenied");
    // Groups come from the bus too: a supplementary group the policy names opens `group/*`.
    fails(
        bus,
        nobody,
        "GetSecret",
        &["string:group/g", "uint64:0"],
        "PermissionDenied",
    );
    let r = ok(
        bus,
        Who::NobodyInGroup,
        "GetSecret",
        &["st", "group/g", "0"],
    );
    assert_eq!(bytes(&r[0]), b"golf");
    // The vault is still open and unchanged.
    assert_eq!(status(bus, Who::Root)["sealed"], false);
    let out = w.daemon.run(&["secret", "get", "shared/a"], b"");
    assert_eq!(out.stdout_bytes, b"alpha");
    // The daemon saw who called, from the bus: uid 65534, not root.
    let log = w.daemon.log();
    assert!(log.contains("uid=65534"), "{log}");
    assert!(
        !log.contains("bravo") && !log.contains("alpha"),
        "no values in the log"
    );
}

#[test]
fn introspection_lists_the_interface_and_its_methods() {
    let w = world();
    for who in [Who::Root, Who::Nobody] {
        let mut c = as_who(who, "busctl");
        c.arg(format!("--address={}", w.bus.address())).args([
            "introspect",
            "--no-pager",
            NAME,
            PATH,
        ]);
        let out = run_cli(&mut c, b"");
        assert_eq!(out.code, 0, "introspect as {who:?}: {}", out.stderr);
        let text = out.stdout;
        assert!(text.contains(IFACE), "{text}");
        for (method, signature, returns) in [
            ("Status", "-", "a{sv}"),
            ("GetSecret", "st", "ayt"),
            ("PutSecret", "say", "t"),
            ("ListSecrets", "s", "as"),
            ("DeleteSecret", "s", "-"),
            ("CreateKey", "sss", "ay"),
            ("ListKeys", "-", "a(ssss)"),
            ("PublicKey", "s", "ay"),
            ("Sign", "sayb", "ay"),
            ("DeleteKey", "s", "-"),
            ("Seal", "-", "-"),
            ("Unseal", "ss", "by"),
            ("Rotate", "-", "u"),
        ] {
            let line = text
                .lines()
                .find(|l| l.starts_with(&format!(".{method} ")))
                .unwrap_or_else(|| panic!("{method} missing:\n{text}"));
            let cols: Vec<&str> = line.split_whitespace().collect();
            assert_eq!(cols[1], "method", "{line}");
            assert_eq!(cols[2], signature, "{line}");
            assert_eq!(cols[3], returns, "{line}");
        }
    }
}

#[test]
fn the_name_is_released_at_stop_and_a_second_daemon_cannot_take_it() {
    let mut w = world();
    // A second daemon on the same bus: refused with a clear reason, exit code 1.
    let second = Setup::new().dbus_address(w.bus.address()).prepare();
    let out = run_daemon(&second);
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(
        out.stderr.contains("owned by another process"),
        "{}",
        out.stderr
    );
    // The first one still serves.
    assert_eq!(status(&w.bus, Who::Root)["sealed"], false);

    // SIGTERM: the name goes, the calls drain, the daemon exits cleanly.
    w.daemon.stop();
    assert!(!w.bus.has_owner(NAME));
    let log = w.daemon.log();
    for step in [
        "dbus: name released",
        "dbus: object withdrawn",
        "dbus: drained",
    ] {
        assert!(log.contains(step), "{step}: {log}");
    }

    // Restart on the same state: the name is back and the vault unseals from the token.
    w.daemon.start();
    assert!(w.bus.has_owner(NAME));
    let r = ok(&w.bus, Who::Root, "GetSecret", &["st", "shared/a", "0"]);
    assert_eq!(bytes(&r[0]), b"alpha");
}

#[test]
fn a_bus_that_does_not_let_us_own_the_name_fails_the_start() {
    // Only the shipped policy: the name belongs to user keyward, and tests run as root.
    let bus = PrivateBus::start_shipped_policy_only();
    let d = Setup::new().dbus_address(bus.address()).prepare();
    let out = run_daemon(&d);
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(
        out.stderr
            .contains("does not let this user own org.keyward.Custodian1"),
        "{}",
        out.stderr
    );
    assert!(!bus.has_owner(NAME));
}

/// `keywardd --config` of `d` run to its exit (bounded), not as a service.
fn run_daemon(d: &Keywardd) -> Output {
    run_cli(
        Command::new("timeout")
            .arg("60")
            .arg(bin("keywardd"))
            .arg("--config")
            .arg(d.config_path())
            .env_remove("NOTIFY_SOCKET"),
        b"",
    )
}

/// `[dbus] max_calls_in_flight` bounds the calls served at once, all callers together: with a
/// bound of 1 and a `Sign` waiting in the TPM (its command held on the way in), the next call
/// is refused with `Busy` at once, not queued; once the `Sign` is answered, calls are served.
#[test]
fn a_call_beyond_the_configured_bound_is_refused_busy() {
    let tpm = Swtpm::start();
    let gate = Gate::start(&tpm);
    let token = SoftHsm::new("keyward-dbus-bound");
    let bus = PrivateBus::start();
    let daemon = Setup::new()
        .gated_tpm("tpm", &gate)
        .token("hsm", &token)
        .unseal_order(&["hsm"])
        .dbus_table(bus.address(), "max_calls_in_flight = 1")
        .start();
    daemon.json(&["init", "--pkcs11", "hsm"]);
    let public = ok(
        &bus,
        Who::Root,
        "CreateKey",
        &["sss", "tpm-k", "tpm", "ecdsa-p256"],
    );
    assert!(!bytes(&public[0]).is_empty());

    gate.hold(CC_SIGN);
    let mut sign = vec!["sayb".to_owned(), "tpm-k".to_owned()];
    sign.extend(ay(b"held in the TPM"));
    sign.push("false".to_owned());
    let sign: Vec<&str> = sign.iter().map(String::as_str).collect();
    std::thread::scope(|s| {
        let signing = s.spawn(|| ok(&bus, Who::Root, "Sign", &sign));
        assert!(
            gate.wait_held(Instant::now() + Duration::from_secs(60)),
            "the Sign never reached the TPM"
        );
        let refused = Instant::now();
        fails(&bus, Who::Root, "Status", &[], "Busy");
        assert!(
            refused.elapsed() < Duration::from_secs(10),
            "Busy came late"
        );
        gate.release();
        let signature = signing.join().unwrap();
        assert!(!bytes(&signature[0]).is_empty());
    });
    assert_eq!(status(&bus, Who::Root)["sealed"], false);
}

/// A bound of 0 would refuse every call: the daemon does not start, and says which setting.
#[test]
fn a_zero_bound_on_calls_in_flight_fails_the_start() {
    let bus = PrivateBus::start();
    let d = Setup::new()
        .dbus_table(bus.address(), "max_calls_in_flight = 0")
        .prepare();
    let out = run_daemon(&d);
    assert_ne!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stderr
            .contains("dbus.max_calls_in_flight must be at least 1"),
        "{}",
        out.stderr
    );
    assert!(!bus.has_owner(NAME));
}

/// A JSON member (the methods without a typed D-Bus signature): the Varlink parameters as one
/// `s`, the Varlink reply as one `s`, parsed.
fn json_call(bus: &PrivateBus, who: Who, method: &str, params: &str) -> Value {
    let data = ok(bus, who, method, &["s", params]);
    let text = data[0]
        .as_str()
        .unwrap_or_else(|| panic!("{method}: {data:?}"));
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{method}: {e}: {text}"))
}

#[test]
fn every_method_of_the_table_is_on_the_bus_and_admin_verbs_take_json() {
    let w = world();
    let bus = &w.bus;
    let root = Who::Root;

    // Every method of the contract is a member; those without a typed signature take and
    // return JSON text.
    let mut c = Command::new("busctl");
    c.arg(format!("--address={}", bus.address())).args([
        "introspect",
        "--no-pager",
        NAME,
        PATH,
        IFACE,
    ]);
    let out = run_cli(&mut c, b"");
    assert_eq!(out.code, 0, "{}", out.stderr);
    // (A streaming method has the `SecretChanged` signal instead of a member.)
    for method in keyward::api::METHODS
        .iter()
        .filter(|m| !keyward::api::method_streams(m))
    {
        let line = out
            .stdout
            .lines()
            .find(|l| l.starts_with(&format!(".{method} ")))
            .unwrap_or_else(|| panic!("{method} missing:\n{}", out.stdout));
        assert!(line.split_whitespace().nth(1) == Some("method"), "{line}");
    }
    assert!(
        !out.stdout.contains(".WatchSecrets "),
        "a streaming method is no member:\n{}",
        out.stdout
    );
    for method in [
        "Init",
        "Enroll",
        "ListKeyslots",
        "RemoveKeyslot",
        "Rekey",
        "ConfirmRecovery",
        "SecretVersions",
    ] {
        let line = out
            .stdout
            .lines()
            .find(|l| l.starts_with(&format!(".{method} ")))
            .unwrap();
        let cols: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(&cols[1..4], ["method", "s", "s"], "{line}");
    }

    // Reads: the Varlink reply objects; "" stands for no parameters.
    let slots = json_call(bus, root, "ListKeyslots", "");
    let slots = slots["keyslots"].as_array().unwrap();
    let kinds: Vec<&str> = slots.iter().map(|s| s["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["pkcs11", "recovery"], "{slots:?}");
    assert_eq!(
        json_call(bus, root, "ListKeyslots", "{}")["keyslots"],
        json_call(bus, root, "ListKeyslots", "")["keyslots"]
    );
    let versions = json_call(bus, root, "SecretVersions", r#"{"name":"shared/a"}"#);
    let versions = versions["versions"].as_array().unwrap();
    assert_eq!(versions.len(), 1, "{versions:?}");
    assert_eq!(versions[0]["version"], 1);
    // Bad parameters are named, as over Varlink.
    let msg = fails(
        bus,
        root,
        "SecretVersions",
        &[r#"string:{"nam":"shared/a"}"#],
        "InvalidParameter",
    );
    assert!(msg.contains("nam"), "{msg}");
    fails(
        bus,
        root,
        "SecretVersions",
        &[r#"string:{"name":"shared/none"}"#],
        "NotFound",
    );

    // Rekey over D-Bus: new shares, pending until confirmed; confirming two of them (2-of-3)
    // over D-Bus puts the new key in force and the new shares unseal the vault.
    let rekey = json_call(bus, root, "Rekey", "");
    let shares = strings(&rekey["recovery_shares"]);
    assert_eq!(shares.len(), 3, "{rekey}");
    assert!(rekey["pending_until"].is_string(), "{rekey}");
    assert_ne!(status(bus, root)["rekey_pending_until"], "");
    let confirm = serde_json::json!({ "recovery_shares": &shares[..2] }).to_string();
    let confirmed = json_call(bus, root, "ConfirmRecovery", &confirm);
    assert_eq!(confirmed["rekeyed"], true, "{confirmed}");
    assert_eq!(status(bus, root)["rekey_pending_until"], "");
    ok(bus, root, "Seal", &[]);
    ok(bus, root, "Unseal", &["ss", &shares[1], ""]);
    let r = ok(bus, root, "Unseal", &["ss", &shares[2], ""]);
    assert_eq!(r, [Value::from(false), Value::from(0)]);
    assert_eq!(
        bytes(&ok(bus, root, "GetSecret", &["st", "shared/a", "0"])[0]),
        b"alpha"
    );

    // Nobody meets the daemon's policy on these too, and is told so by name.
    let nobody = Who::Nobody;
    fails(
        bus,
        nobody,
        "ListKeyslots",
        &["string:"],
        "PermissionDenied",
    );
    fails(bus, nobody, "Rekey", &["string:"], "PermissionDenied");
    fails(
        bus,
        nobody,
        "SecretVersions",
        &[r#"string:{"name":"private/b"}"#],
        "PermissionDenied",
    );
    // What nobody may read, nobody may list the versions of.
    let v = json_call(bus, nobody, "SecretVersions", r#"{"name":"shared/a"}"#);
    assert_eq!(v["versions"][0]["version"], 1, "{v}");
    // The vault is still open, the new key in force, no secret in the log.
    assert_eq!(status(bus, root)["sealed"], false);
    let log = w.daemon.log();
    for share in &shares {
        assert!(!log.contains(share.as_str()), "a share in the log");
    }
}
