//! The access policy as callers meet it: the real `keywardd` with a policy file, driven through
//! the real `keyward` CLI as root and as `nobody` (uid 65534, through `setpriv`), over a socket
//! anyone may connect to, so that only the policy stands between `nobody` and the vault.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use keyward_tests::keywardd::{bin, run_cli, Keywardd, Output, Setup, ROOT_ADMIN_POLICY};
use keyward_tests::softhsm::SoftHsm;
use serde_json::{json, Value};

/// The uid and gid of `nobody`.
const NOBODY: u32 = 65534;
/// A well-formed recovery share of a set no vault here has.
const UNKNOWN_SHARE: &[u8] =
    b"KW2-0A1B2C3D-2-1-000G-40R4-0M30-E209-185G-R38E-1W81-24GK-2GAH-C5RR-34D1-P70X-3RFG-WJ8N\n";

/// Root may do everything (the fixture's root-admin rule); nobody may read the secrets
/// matching `nobody_reads` (TOML strings) and sign with `nobody-*`.
fn policy_where_nobody_reads(nobody_reads: &str) -> String {
    format!(
        r#"{ROOT_ADMIN_POLICY}
[[rule]]
who = {{ uid = 65534 }}
allow = ["read"]
secrets = [{nobody_reads}]

[[rule]]
who = {{ uid = 65534 }}
allow = ["sign"]
keys = ["nobody-*"]
"#
    )
}

/// The policy of the table: nobody reads `shared/*`.
fn narrow_policy() -> String {
    policy_where_nobody_reads(r#""shared/*""#)
}

/// [`narrow_policy`] plus `read` on `private/*` for nobody.
fn wider_policy() -> String {
    policy_where_nobody_reads(r#""shared/*", "private/*""#)
}

/// Well-formed TOML that the policy loader must refuse (an action that does not exist).
const INVALID_POLICY: &str = r#"
[[rule]]
who = { uid = 65534 }
allow = ["read", "everything"]
secrets = ["*"]
"#;

/// How long a condition (a reload, a log line) may take to show.
const DEADLINE: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Who {
    Root,
    Nobody,
}

/// What a row expects.
#[derive(Debug)]
enum Expect {
    /// Exit 0.
    Ok,
    /// Exit 0 with exactly these bytes on stdout.
    Stdout(&'static [u8]),
    /// Exit 0; the JSON on stdout has this value at this pointer (the row passes `--json`).
    Json(&'static str, Value),
    /// Exit 0; `--json key list` names exactly these keys (in any order).
    Keys(&'static [&'static str]),
    /// Exit 0; stdout is a signature over the row's stdin that OpenSSL verifies with this key.
    Signed(&'static str),
    /// Exit 1, "permission denied" on stderr; with `--json`, `PermissionDenied`.
    Denied,
    /// Exit 1; with `--json`, this error (short name).
    Error(&'static str),
    /// Exit 4; with `--json`, `Sealed`.
    Sealed,
}

struct Row {
    who: Who,
    args: &'static [&'static str],
    stdin: &'static [u8],
    expect: Expect,
}

fn row(who: Who, args: &'static [&'static str], expect: Expect) -> Row {
    Row {
        who,
        args,
        stdin: b"",
        expect,
    }
}

fn row_in(who: Who, args: &'static [&'static str], stdin: &'static [u8], expect: Expect) -> Row {
    Row {
        who,
        args,
        stdin,
        expect,
    }
}

/// How to become nobody: `setpriv` (util-linux), else `runuser`.
fn as_nobody() -> Vec<String> {
    if keyward_tests::have_program("setpriv") {
        vec![
            "setpriv".into(),
            format!("--reuid={NOBODY}"),
            format!("--regid={NOBODY}"),
            "--clear-groups".into(),
            "--".into(),
        ]
    } else {
        assert!(
            keyward_tests::have_program("runuser"),
            "neither setpriv nor runuser is installed (util-linux)"
        );
        vec!["runuser".into(), "-u".into(), "nobody".into(), "--".into()]
    }
}

/// Run `keyward ARGS` as `who` against `d`.
fn run_as(d: &Keywardd, who: Who, args: &[&str], stdin: &[u8]) -> Output {
    match who {
        Who::Root => d.run(args, stdin),
        Who::Nobody => {
            let prefix = as_nobody();
            let mut cmd = Command::new(&prefix[0]);
            cmd.args(&prefix[1..])
                .arg(bin("keyward"))
                .arg("--socket")
                .arg(d.socket())
                .args(args)
                // Nothing of root's environment should steer the CLI.
                .env_remove("KEYWARD_SOCKET");
            run_cli(&mut cmd, stdin)
        }
    }
}

fn with_json<'a>(args: &[&'a str]) -> Vec<&'a str> {
    let mut full = vec!["--json"];
    full.extend_from_slice(args);
    full
}

/// The error name of a `--json` failure.
fn json_error(out: &Output) -> String {
    let doc: Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {:?} / {}", out.stdout, out.stderr));
    doc["error"]["name"].as_str().unwrap_or_default().to_owned()
}

fn failed(d: &Keywardd, what: &str, out: &Output, why: &str) -> ! {
    panic!(
        "{what}: {why}\nexit {}\nstdout: {}\nstderr: {}\ndaemon log:\n{}",
        out.code,
        out.stdout,
        out.stderr,
        d.log()
    )
}

/// Run one row and check it.
fn check(d: &Keywardd, r: &Row) {
    let what = format!("{:?} keyward {}", r.who, r.args.join(" "));
    let out = run_as(d, r.who, r.args, r.stdin);
    let fail = |why: &str| failed(d, &what, &out, why);
    let expect_error = |code: i32, name: &str| {
        if out.code != code {
            fail(&format!("expected exit code {code}"));
        }
        let again = run_as(d, r.who, &with_json(r.args), r.stdin);
        assert_eq!(again.code, code, "{what} --json: {}", again.stderr);
        let full = format!("org.keyward.Custodian.{name}");
        assert_eq!(json_error(&again), full, "{what} --json: {}", again.stdout);
    };
    match &r.expect {
        Expect::Ok => {
            if out.code != 0 {
                fail("expected success");
            }
        }
        Expect::Stdout(bytes) => {
            if out.code != 0 || out.stdout_bytes != *bytes {
                fail(&format!(
                    "expected success printing {:?}",
                    String::from_utf8_lossy(bytes)
                ));
            }
        }
        Expect::Json(pointer, value) => {
            if out.code != 0 {
                fail("expected success");
            }
            let doc: Value = serde_json::from_str(&out.stdout).unwrap();
            let got = doc.pointer(pointer).cloned().unwrap_or(Value::Null);
            assert_eq!(&got, value, "{what}: at {pointer} in {doc}");
        }
        Expect::Keys(names) => {
            if out.code != 0 {
                fail("expected success");
            }
            let doc: Value = serde_json::from_str(&out.stdout).unwrap();
            let mut got: Vec<&str> = doc["keys"]
                .as_array()
                .unwrap()
                .iter()
                .map(|k| k["name"].as_str().unwrap())
                .collect();
            got.sort_unstable();
            let mut want = names.to_vec();
            want.sort_unstable();
            assert_eq!(got, want, "{what}: {doc}");
        }
        Expect::Signed(key) => {
            if out.code != 0 {
                fail("expected a signature");
            }
            let der = d.run(&["key", "public", key, "--der"], b"");
            assert_eq!(der.code, 0, "public key of {key}: {}", der.stderr);
            let public = hsm_shim::PublicKeyDer(der.stdout_bytes);
            keyward_tests::openssl::verify(
                &public,
                hsm_shim::KeyAlgorithm::EcdsaP256,
                r.stdin,
                &out.stdout_bytes,
            )
            .unwrap_or_else(|e| fail(&e.to_string()));
        }
        Expect::Denied => {
            if !out.stderr.to_lowercase().contains("permission denied") {
                fail("expected a permission error on stderr");
            }
            expect_error(1, "PermissionDenied");
        }
        Expect::Error(name) => expect_error(1, name),
        Expect::Sealed => expect_error(4, "Sealed"),
    }
}

/// A daemon on a public socket with [`narrow_policy`], initialised by root with `shared/a`,
/// `private/b` and the keys `nobody-key` and `root-key` (ECDSA P-256 in the token).
fn daemon() -> (SoftHsm, Keywardd) {
    let token = SoftHsm::new("keyward-policy");
    let d = Setup::new()
        .token("hsm", &token)
        .public_socket()
        .policy(&narrow_policy())
        .start();
    d.json(&["init", "--pkcs11", "hsm"]);
    for (name, value) in [("shared/a", b"alpha"), ("private/b", b"bravo")] {
        let out = d.run(&["secret", "put", name], value);
        assert_eq!(out.code, 0, "put {name}: {}", out.stderr);
    }
    for name in ["nobody-key", "root-key"] {
        let out = d.run(
            &[
                "key",
                "create",
                name,
                "--device",
                "hsm",
                "--algorithm",
                "ecdsa-p256",
            ],
            b"",
        );
        assert_eq!(out.code, 0, "create {name}: {}", out.stderr);
    }
    (token, d)
}

/// The table, run in order: first with the vault unsealed, then (after root's `seal`) sealed.
fn table() -> Vec<Row> {
    use Expect::*;
    use Who::*;
    vec![
        // Nobody: reads shared/*, signs with nobody-*, and nothing else.
        row(Nobody, &["--json", "status"], Json("/sealed", json!(false))),
        row(Nobody, &["status"], Ok),
        row(Nobody, &["secret", "get", "shared/a"], Stdout(b"alpha")),
        row(
            Nobody,
            &["secret", "get", "shared/a", "--version", "1"],
            Stdout(b"alpha"),
        ),
        row(Nobody, &["secret", "versions", "shared/a"], Ok),
        row(Nobody, &["secret", "get", "private/b"], Denied),
        row(Nobody, &["secret", "versions", "private/b"], Denied),
        // Denied, not NotFound: the policy answers before the store, so names don't leak.
        row(Nobody, &["secret", "get", "private/nope"], Denied),
        row_in(Nobody, &["secret", "put", "shared/x"], b"x", Denied),
        row_in(Nobody, &["secret", "put", "private/b"], b"mine", Denied),
        row(Nobody, &["secret", "delete", "shared/a"], Denied),
        row(
            Nobody,
            &["--json", "secret", "list"],
            Json("/names", json!(["shared/a"])),
        ),
        row(
            Nobody,
            &["--json", "secret", "list", "--prefix", "private/"],
            Json("/names", json!([])),
        ),
        row_in(
            Nobody,
            &["key", "sign", "nobody-key"],
            b"signed by nobody",
            Signed("nobody-key"),
        ),
        row_in(Nobody, &["key", "sign", "root-key"], b"forged", Denied),
        row(Nobody, &["key", "public", "nobody-key"], Ok),
        row(Nobody, &["key", "public", "root-key"], Denied),
        row(Nobody, &["--json", "key", "list"], Keys(&["nobody-key"])),
        row(
            Nobody,
            &[
                "key",
                "create",
                "nobody-new",
                "--device",
                "hsm",
                "--algorithm",
                "ecdsa-p256",
            ],
            Denied,
        ),
        row(Nobody, &["key", "delete", "nobody-key"], Denied),
        row(Nobody, &["keyslot", "list"], Denied),
        row(Nobody, &["keyslot", "remove", "1", "--force"], Denied),
        row(Nobody, &["enroll", "pkcs11", "--device", "hsm"], Denied),
        row(Nobody, &["rotate"], Denied),
        row(Nobody, &["rekey"], Denied),
        row(Nobody, &["seal"], Denied),
        row(Nobody, &["init", "--pkcs11", "hsm"], Denied),
        // Root: everything, and nobody's refused writes left no trace.
        row(Root, &["secret", "get", "private/b"], Stdout(b"bravo")),
        row(Root, &["secret", "get", "shared/a"], Stdout(b"alpha")),
        row(Root, &["secret", "get", "shared/x"], Error("NotFound")),
        row(
            Root,
            &["--json", "secret", "list"],
            Json("/names", json!(["private/b", "shared/a"])),
        ),
        row(
            Root,
            &["--json", "key", "list"],
            Keys(&["nobody-key", "root-key"]),
        ),
        row_in(
            Root,
            &["key", "sign", "root-key"],
            b"signed by root",
            Signed("root-key"),
        ),
        row_in(
            Root,
            &["key", "sign", "nobody-key"],
            b"root may use it too",
            Signed("nobody-key"),
        ),
        row(Root, &["key", "public", "root-key"], Ok),
        row(Root, &["keyslot", "list"], Ok),
        row(Root, &["--json", "rotate"], Json("/term", json!(2))),
        row(Root, &["rekey"], Ok),
        row_in(
            Root,
            &["--json", "secret", "put", "private/b"],
            b"bravo 2",
            Json("/version", json!(2)),
        ),
        row(Root, &["secret", "get", "private/b"], Stdout(b"bravo 2")),
        row(
            Root,
            &["secret", "get", "private/b", "--version", "1"],
            Stdout(b"bravo"),
        ),
        row(Nobody, &["secret", "get", "shared/a"], Stdout(b"alpha")),
        row(Root, &["seal"], Ok),
        // Sealed: status for all; a permitted read meets the seal, a forbidden one the policy.
        row(Nobody, &["--json", "status"], Json("/sealed", json!(true))),
        row(Nobody, &["secret", "get", "shared/a"], Sealed),
        row(Nobody, &["secret", "get", "private/b"], Denied),
        // A share that reads (the CLI checks that before sending it), of no set here: the
        // policy answers before the share is looked at.
        row_in(Nobody, &["unseal"], UNKNOWN_SHARE, Denied),
        row(Root, &["secret", "get", "private/b"], Sealed),
        row(Root, &["--json", "status"], Json("/sealed", json!(true))),
    ]
}

#[test]
fn the_policy_table_holds_for_root_and_nobody() {
    let (_token, d) = daemon();
    for r in table() {
        check(&d, &r);
    }
    // Every refusal was logged with the caller; no value ever was.
    let log = d.log();
    assert!(log.contains("PermissionDenied"), "{log}");
    for value in ["alpha", "bravo"] {
        assert!(!log.contains(value), "a secret value reached the log");
    }
}

/// Replace the policy file the way an admin's editor would (a new file renamed over it),
/// mode 0600 and owned by root like the original.
fn write_policy(d: &Keywardd, text: &str) {
    let path = d.policy_path();
    let tmp = path.with_extension("toml.new");
    std::fs::write(&tmp, text).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Wait until the daemon logs, after log mark `from`, that it reloaded its policy.
fn wait_reloaded(d: &Keywardd, from: usize) {
    d.wait_log("the policy to be reloaded", from, DEADLINE, |l| {
        l.contains("policy reloaded")
    });
}

/// Wait until the daemon logs, after log mark `from`, that it rejected a reload.
fn wait_rejected(d: &Keywardd, from: usize) {
    d.wait_log("the reload to be rejected", from, DEADLINE, |l| {
        l.contains("reload") && l.contains("rejected")
    });
}

fn log_since(d: &Keywardd, start: usize) -> String {
    d.log().get(start..).unwrap_or_default().to_owned()
}

fn is_denied(out: &Output) -> bool {
    out.code == 1 && out.stderr.to_lowercase().contains("permission denied")
}

#[test]
fn sighup_reloads_the_policy_and_a_bad_file_keeps_the_old_one() {
    let (_token, d) = daemon();
    assert!(is_denied(&run_as(
        &d,
        Who::Nobody,
        &["secret", "get", "private/b"],
        b""
    )));

    // A wider policy: after SIGHUP nobody reads private/b.
    write_policy(&d, &wider_policy());
    let meta = std::fs::metadata(d.policy_path()).unwrap();
    assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
    assert_eq!(std::os::unix::fs::MetadataExt::uid(&meta), 0);
    let mark = d.log_mark();
    d.reload();
    wait_reloaded(&d, mark);
    let out = run_as(&d, Who::Nobody, &["secret", "get", "private/b"], b"");
    assert_eq!(
        out.code, 0,
        "nobody reads private/b after the reload: {}",
        out.stderr
    );
    assert_eq!(out.stdout_bytes, b"bravo");
    // The reload widened reads only.
    let out = run_as(&d, Who::Nobody, &["secret", "put", "private/b"], b"x");
    assert!(is_denied(&out), "{}", out.stderr);

    // An invalid file: rejected, logged, and the policy in force stays.
    write_policy(&d, INVALID_POLICY);
    let mark = d.log_mark();
    d.reload();
    wait_rejected(&d, mark);
    let log = log_since(&d, mark);
    assert!(
        log.contains("everything"),
        "the log says what is wrong: {log}"
    );
    assert!(!log.contains("policy reloaded"), "{log}");
    let out = run_as(&d, Who::Nobody, &["secret", "get", "private/b"], b"");
    assert_eq!(
        out.code, 0,
        "the old policy must still apply: {}",
        out.stderr
    );
    assert_eq!(out.stdout_bytes, b"bravo");
    let out = run_as(&d, Who::Nobody, &["secret", "get", "shared/a"], b"");
    assert_eq!(out.stdout_bytes, b"alpha", "{}", out.stderr);
    // Root is still admin.
    let out = d.run(&["keyslot", "list"], b"");
    assert_eq!(out.code, 0, "{}", out.stderr);
    let out = d.run(&["secret", "put", "root/after"], b"r");
    assert_eq!(out.code, 0, "{}", out.stderr);

    // A file others could write is refused the same way.
    write_policy(&d, &narrow_policy());
    std::fs::set_permissions(d.policy_path(), std::fs::Permissions::from_mode(0o666)).unwrap();
    let mark = d.log_mark();
    d.reload();
    wait_rejected(&d, mark);
    let out = run_as(&d, Who::Nobody, &["secret", "get", "private/b"], b"");
    assert_eq!(
        out.code, 0,
        "an insecure file must not replace the policy: {}",
        out.stderr
    );

    // Fixed: the narrow policy is back.
    std::fs::set_permissions(d.policy_path(), std::fs::Permissions::from_mode(0o600)).unwrap();
    let mark = d.log_mark();
    d.reload();
    wait_reloaded(&d, mark);
    let out = run_as(&d, Who::Nobody, &["secret", "get", "private/b"], b"");
    assert!(
        is_denied(&out),
        "the narrow policy applies again: {}",
        out.stderr
    );
}

/// `keyward policy check FILE ARGS --json`, offline (no socket is given or needed).
fn policy_check(file: &std::path::Path, args: &[&str]) -> (Output, Value) {
    let mut cmd = Command::new(bin("keyward"));
    cmd.args(["--json", "policy", "check"])
        .arg(file)
        .args(args)
        .env_remove("KEYWARD_SOCKET");
    let out = run_cli(&mut cmd, b"");
    let doc = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {:?} / {}", out.stdout, out.stderr));
    (out, doc)
}

#[test]
fn policy_check_explains_offline_what_the_daemon_decides() {
    let (_token, d) = daemon();
    let file = d.policy_path();

    // The file keywardd runs with loads, and its rules are listed in file order.
    let (out, doc) = policy_check(file, &[]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let rules = doc["rules"].as_array().unwrap();
    assert_eq!(rules.len(), 3, "{doc}");
    assert!(
        rules[1].as_str().unwrap().contains("uid 65534 may read"),
        "{doc}"
    );

    // For each request: what the daemon does, and what `policy check` says it will do.
    let nobody = NOBODY.to_string();
    let cases: [(&[&str], &[&str], Option<u64>); 4] = [
        (
            &["secret", "get", "shared/a"],
            &["--action", "read", "--secret", "shared/a"],
            Some(2),
        ),
        (
            &["secret", "get", "private/b"],
            &["--action", "read", "--secret", "private/b"],
            None,
        ),
        (
            &["key", "public", "nobody-key"],
            &["--action", "sign", "--key", "nobody-key"],
            Some(3),
        ),
        (
            &["key", "public", "root-key"],
            &["--action", "sign", "--key", "root-key"],
            None,
        ),
    ];
    for (request, query, rule) in cases {
        let live = run_as(&d, Who::Nobody, request, b"");
        let mut args = vec!["--uid", nobody.as_str()];
        args.extend_from_slice(query);
        let (out, doc) = policy_check(file, &args);
        match rule {
            Some(rule) => {
                assert_eq!(live.code, 0, "{request:?} as nobody: {}", live.stderr);
                assert_eq!(out.code, 0, "{query:?}: {}", out.stderr);
                assert_eq!(doc["decision"], "allow", "{doc}");
                assert_eq!(doc["rule"], rule, "{doc}");
                // Every rule before the deciding one is passed over with a reason.
                let passed: Vec<u64> = doc["passed_over"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|p| p["rule"].as_u64().unwrap())
                    .collect();
                assert_eq!(passed, (1..rule).collect::<Vec<_>>(), "{doc}");
            }
            None => {
                assert!(is_denied(&live), "{request:?} as nobody: {}", live.stderr);
                assert_eq!(out.code, 1, "{query:?}: {}", out.stderr);
                let e = &doc["error"];
                assert_eq!(e["name"], "keyward.PolicyDenied", "{doc}");
                let why: Vec<&str> = e["parameters"]["passed_over"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|p| p["why"].as_str().unwrap())
                    .collect();
                assert_eq!(why.len(), 3, "{doc}");
                assert!(why[0].contains("needs uid 0"), "{why:?}");
                assert!(why.iter().any(|w| w.contains("matches none")), "{why:?}");
            }
        }
    }

    // A unit rule: a caller outside the unit is told which unit the rule wants.
    let dir = tempfile::tempdir().unwrap();
    let unit_policy = dir.path().join("policy.toml");
    std::fs::write(
        &unit_policy,
        "[[rule]]\nwho = { unit = \"postgresql.service\" }\nallow = [\"read\"]\nsecrets = [\"db/*\"]\n",
    )
    .unwrap();
    std::fs::set_permissions(&unit_policy, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let read_db = [
        "--uid",
        "105",
        "--action",
        "read",
        "--secret",
        "db/password",
    ];
    let (out, doc) = policy_check(
        &unit_policy,
        &[&read_db[..], &["--unit", "postgresql.service"]].concat(),
    );
    assert_eq!((out.code, &doc["rule"]), (0, &json!(1)), "{doc}");
    let (out, doc) = policy_check(
        &unit_policy,
        &[&read_db[..], &["--unit", "cron.service"]].concat(),
    );
    assert_eq!(out.code, 1, "{doc}");
    let why = doc["error"]["parameters"]["passed_over"][0]["why"]
        .as_str()
        .unwrap();
    assert!(
        why.contains("\"postgresql.service\"") && why.contains("\"cron.service\""),
        "{why}"
    );

    // The files keywardd would refuse, refused with the same reason.
    std::fs::set_permissions(&unit_policy, std::fs::Permissions::from_mode(0o666)).unwrap();
    let (out, doc) = policy_check(&unit_policy, &[]);
    assert_eq!(out.code, 1);
    assert_eq!(doc["error"]["name"], "keyward.PolicyInvalid", "{doc}");
    assert!(out.stderr.contains("chmod go-w"), "{}", out.stderr);
    std::fs::write(&unit_policy, INVALID_POLICY).unwrap();
    std::fs::set_permissions(&unit_policy, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (out, _) = policy_check(&unit_policy, &[]);
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.contains("rule 1") && out.stderr.contains("\"everything\""),
        "{}",
        out.stderr
    );
}
