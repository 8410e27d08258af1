//! Watching secrets change, end to end: the real keywardd on a real SoftHSM token, its Varlink
//! `WatchSecrets` stream read by raw connections, by the client library and by the real
//! `keyward watch` (as root, and as `nobody` through `setpriv`, so that the daemon's policy
//! decides what a watcher sees). `--restart-unit` is checked through a stand-in `systemctl`
//! found first on PATH that records its arguments: the command's boundary. Every wait is on a
//! reply or a line, guarded by a bound; none is on time.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use keyward::api::{methods, ApiError, WatchSecretsParams};
use keyward::{Client, ClientError};
use keyward_tests::as_uid;
use keyward_tests::keywardd::{bin, Keywardd, Setup, ROOT_ADMIN_POLICY};
use keyward_tests::softhsm::SoftHsm;
use serde_json::{json, Value};

/// The uid of `nobody`.
const NOBODY: u32 = 65534;

/// Guards every wait, so that a broken daemon fails a test instead of hanging it.
const GUARD: Duration = Duration::from_secs(30);

/// Root does everything; nobody may read `shared/*` and nothing else.
fn policy() -> String {
    format!(
        "{ROOT_ADMIN_POLICY}\n[[rule]]\nwho = {{ uid = {NOBODY} }}\nallow = [\"read\"]\nsecrets = [\"shared/*\"]\n"
    )
}

/// An initialised daemon on a token, its socket open to every uid (the policy decides).
fn daemon(limits: Option<&str>) -> (SoftHsm, Keywardd) {
    let token = SoftHsm::new("keyward-watch");
    let mut setup = Setup::new()
        .token("hsm", &token)
        .policy(&policy())
        .public_socket();
    if let Some(limits) = limits {
        setup = setup.limits(limits);
    }
    let d = setup.start();
    let out = d.run(&["init", "--pkcs11", "hsm"], b"");
    assert_eq!(out.code, 0, "init: {}", out.stderr);
    (token, d)
}

fn put(d: &Keywardd, name: &str, value: &[u8]) {
    let out = d.run(&["secret", "put", name], value);
    assert_eq!(out.code, 0, "put {name}: {}", out.stderr);
}

fn delete(d: &Keywardd, name: &str) {
    let out = d.run(&["secret", "delete", name], b"");
    assert_eq!(out.code, 0, "delete {name}: {}", out.stderr);
}

/// A raw Varlink connection: NUL-terminated JSON messages.
struct Raw {
    stream: UnixStream,
    pending: Vec<u8>,
}

impl Raw {
    fn open(d: &Keywardd) -> Self {
        let stream = UnixStream::connect(d.socket()).unwrap();
        stream.set_read_timeout(Some(GUARD)).unwrap();
        Self {
            stream,
            pending: Vec::new(),
        }
    }

    fn send(&mut self, message: &Value) {
        let mut frame = message.to_string().into_bytes();
        frame.push(0);
        self.stream.write_all(&frame).unwrap();
    }

    /// The next message, or `None` once the daemon closed the connection.
    fn recv(&mut self) -> Option<Value> {
        loop {
            if let Some(i) = self.pending.iter().position(|&b| b == 0) {
                let frame: Vec<u8> = self.pending.drain(..=i).collect();
                return Some(serde_json::from_slice(&frame[..i]).unwrap());
            }
            let mut chunk = [0u8; 65536];
            match self.stream.read(&mut chunk) {
                Ok(0) => return None,
                Ok(n) => self.pending.extend_from_slice(&chunk[..n]),
                Err(e) => panic!("no message within {GUARD:?}: {e}"),
            }
        }
    }

    fn call(&mut self, message: &Value) -> Value {
        self.send(message);
        self.recv().expect("a reply")
    }
}

fn custodian(method: &str) -> String {
    format!("org.keyward.Custodian.{method}")
}

/// Lines of a child's output, as they come, through a channel (read by a thread).
fn lines(stream: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn next_line(rx: &mpsc::Receiver<String>, what: &str) -> String {
    rx.recv_timeout(GUARD)
        .unwrap_or_else(|e| panic!("no {what} line within {GUARD:?}: {e}"))
}

/// `keyward --socket … ARGS` started (not waited for), stdout and stderr piped.
fn spawn(mut cmd: Command, d: &Keywardd, args: &[&str]) -> Child {
    cmd.arg("--socket")
        .arg(d.socket())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// A watcher as nobody (the real CLI, JSON lines) sees each put, the new version and the
/// delete of a secret it may read, in order, and nothing of one it may not read, changed in
/// between; its watch is audited once, as a read.
#[test]
fn a_watcher_sees_put_new_version_and_delete_in_order_and_only_what_it_may_read() {
    let (_token, d) = daemon(None);
    let mut child = spawn(as_uid(NOBODY, bin("keyward")), &d, &["--json", "watch"]);
    let out = lines(child.stdout.take().unwrap());
    let first: Value = serde_json::from_str(&next_line(&out, "first")).unwrap();
    assert_eq!(first, json!({ "change": "watching" }));

    put(&d, "private/x", b"1");
    put(&d, "shared/a", b"alpha");
    put(&d, "private/x", b"2");
    put(&d, "shared/a", b"alpha-2");
    delete(&d, "private/x");
    delete(&d, "shared/a");
    put(&d, "shared/end", b"last");

    let mut seen = Vec::new();
    loop {
        let line: Value = serde_json::from_str(&next_line(&out, "change")).unwrap();
        let end = line["name"] == "shared/end";
        seen.push(line);
        if end {
            break;
        }
    }
    assert_eq!(
        seen,
        [
            json!({ "change": "put", "name": "shared/a", "version": 1 }),
            json!({ "change": "put", "name": "shared/a", "version": 2 }),
            json!({ "change": "delete", "name": "shared/a" }),
            json!({ "change": "put", "name": "shared/end", "version": 1 }),
        ]
    );
    child.kill().unwrap();
    child.wait().unwrap();

    let watches: Vec<Value> = d
        .audit_requests()
        .into_iter()
        .filter(|r| r["op"] == "WatchSecrets")
        .collect();
    assert_eq!(watches.len(), 1, "{watches:?}");
    assert_eq!(watches[0]["caller"]["uid"], NOBODY);
    assert_eq!(watches[0]["target"], "*");
    assert_eq!(watches[0]["result"], "ok");
}

/// A stand-in `systemctl` that appends its arguments to a record file: its directory (keep it),
/// the record, and a `PATH` that finds it first.
fn fake_systemctl() -> (tempfile::TempDir, std::path::PathBuf, String) {
    let fake = tempfile::tempdir().unwrap();
    let record = fake.path().join("calls");
    let script = fake.path().join("systemctl");
    std::fs::write(
        &script,
        format!("#!/bin/sh\necho \"$@\" >> '{}'\n", record.display()),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let path = format!(
        "{}:{}",
        fake.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    (fake, record, path)
}

/// `keyward watch NAME PREFIX* --restart-unit …` prints one line per change of what it
/// watches and runs `systemctl try-restart UNIT…` after each (a stand-in `systemctl`, first on
/// PATH, records its arguments); a unit name systemd could not have is refused before anything
/// runs.
#[test]
fn keyward_watch_prints_each_change_and_restarts_the_units() {
    let (_token, d) = daemon(None);
    let (fake, record, path) = fake_systemctl();
    let mut cmd = Command::new(bin("keyward"));
    cmd.env("PATH", &path);
    let mut child = spawn(
        cmd,
        &d,
        &[
            "watch",
            "db",
            "app/*",
            "--restart-unit",
            "app.service",
            "--restart-unit",
            "web@1.service",
        ],
    );
    let out = lines(child.stdout.take().unwrap());
    let err = lines(child.stderr.take().unwrap());
    assert_eq!(next_line(&err, "ready"), "keyward: watching for changes");

    put(&d, "db", b"1");
    put(&d, "other", b"not watched");
    put(&d, "app/x", b"2");
    delete(&d, "db");
    assert_eq!(next_line(&out, "first"), "put db 1");
    assert_eq!(next_line(&out, "second"), "put app/x 1");
    assert_eq!(next_line(&out, "third"), "delete db");
    // The restart after a change runs before the next change is read: two are done.
    child.kill().unwrap();
    child.wait().unwrap();
    let calls = std::fs::read_to_string(&record).unwrap();
    let calls: Vec<&str> = calls.lines().collect();
    assert!((2..=3).contains(&calls.len()), "{calls:?}");
    for call in calls {
        assert_eq!(call, "try-restart app.service web@1.service");
    }

    // A name that is not a unit's: a usage error, and systemctl never runs. (A stand-in of its
    // own: one the killed watcher started may still be writing to the first one's record.)
    drop(fake);
    let (_fake, record, path) = fake_systemctl();
    let mut cmd = Command::new(bin("keyward"));
    cmd.env("PATH", &path);
    let bad = keyward_tests::keywardd::run_cli(
        cmd.arg("--socket")
            .arg(d.socket())
            .args(["watch", "--restart-unit", "app.service;reboot"]),
        b"",
    );
    assert_eq!(bad.code, 2, "{}", bad.stderr);
    assert!(
        bad.stderr.contains("is not a systemd unit name"),
        "{}",
        bad.stderr
    );
    assert!(!record.exists());
}

/// Varlink's `more`, as varlink.org says: a streaming method without it gets
/// `org.varlink.service.ExpectedMore`; any other method with it is answered once, without
/// `continues`; the stream's replies carry `continues`; a bad parameter ends the call at once.
/// The connection serves on after each.
#[test]
fn more_and_continues_are_answered_as_varlink_says() {
    let (_token, d) = daemon(None);
    put(&d, "m/one", b"1");
    let mut c = Raw::open(&d);
    let r = c.call(&json!({ "method": custodian("WatchSecrets") }));
    assert_eq!(
        r,
        json!({ "error": "org.varlink.service.ExpectedMore", "parameters": {} })
    );
    let r = c.call(&json!({ "method": custodian("WatchSecrets"), "more": false }));
    assert_eq!(r["error"], "org.varlink.service.ExpectedMore");
    let r = c.call(&json!({ "method": custodian("ListSecrets"),
                            "parameters": { "prefix": "m/" }, "more": true }));
    assert_eq!(r, json!({ "parameters": { "names": ["m/one"] } }));
    let r = c.call(&json!({ "method": custodian("WatchSecrets"),
                            "parameters": { "names": ["a*b*"] }, "more": true }));
    assert_eq!(r["error"], "org.keyward.Custodian.InvalidArgument", "{r}");
    assert_eq!(r["parameters"]["parameter"], "names");
    assert!(r.get("continues").is_none());
    let r = c.call(&json!({ "method": custodian("WatchSecrets"),
                            "parameters": { "names": ["m/*"] }, "more": true }));
    assert_eq!(
        r,
        json!({ "parameters": { "change": "watching" }, "continues": true })
    );
    put(&d, "m/two", b"2");
    assert_eq!(
        c.recv().unwrap(),
        json!({ "parameters": { "change": "put", "name": "m/two", "version": 1 },
                "continues": true })
    );
}

/// A watcher that takes none of its replies holds up no one: a thousand puts from another
/// client each finish within a bound (the daemon's idle timeout, far longer, is not what ends
/// the wait), and once the watcher reads it gets the changes its queue held, then the final
/// error `WatchOverflow` with how many it missed, and its connection serves calls again.
#[test]
fn a_watcher_that_never_reads_blocks_no_one_and_is_told_what_it_missed() {
    const PUTS: usize = 1000;
    const BOUND: Duration = Duration::from_secs(10);
    let (_token, d) = daemon(Some("idle_timeout_secs = 600"));
    let mut watcher = Raw::open(&d);
    let r = watcher.call(&json!({ "method": custodian("WatchSecrets"), "more": true }));
    assert_eq!(r["parameters"]["change"], "watching", "{r}");

    let mut writer = Client::connect(d.socket()).unwrap();
    writer.set_timeout(Some(BOUND)).unwrap();
    let long = "n".repeat(200);
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    for i in 0..PUTS {
        let t = Instant::now();
        writer
            .put_secret(&format!("flood/{long}/{i}"), b"v")
            .unwrap_or_else(|e| panic!("put {i} after {:?}: {e}", t.elapsed()));
        slowest = slowest.max(t.elapsed());
    }
    println!(
        "{PUTS} puts beside a watcher that reads nothing: {:?} in all, slowest {slowest:?}",
        started.elapsed()
    );
    assert!(slowest < BOUND);

    let mut changes = 0;
    let last = loop {
        let r = watcher.recv().expect("the watch ends with a reply");
        if r.get("continues") == Some(&Value::Bool(true)) {
            assert_eq!(r["parameters"]["change"], "put", "{r}");
            changes += 1;
        } else {
            break r;
        }
    };
    assert_eq!(
        last["error"], "org.keyward.Custodian.WatchOverflow",
        "{last}"
    );
    let missed = last["parameters"]["missed"].as_u64().unwrap();
    assert!(
        missed > 0 && changes + missed as usize <= PUTS,
        "{changes} + {missed}"
    );
    println!("the watcher got {changes} changes, then WatchOverflow (missed {missed})");
    // The call is over; the connection serves again.
    let r = watcher.call(&json!({ "method": custodian("ListSecrets"),
                                  "parameters": { "prefix": "none/" } }));
    assert_eq!(r, json!({ "parameters": { "names": [] } }));
}

/// The client library's stream: the replies one by one, the typed error at the end of a call
/// that failed, and a streaming method refused by the plain `request`.
#[test]
fn the_client_library_streams() {
    let (_token, d) = daemon(None);
    let mut plain = Client::connect(d.socket()).unwrap();
    let e = plain
        .request::<methods::WatchSecrets>(&WatchSecretsParams::default())
        .unwrap_err();
    assert!(
        matches!(e, ClientError::Api(ApiError::ExpectedMore)),
        "{e:?}"
    );

    let mut c = Client::connect(d.socket()).unwrap();
    c.set_timeout(Some(GUARD)).unwrap();
    let mut replies = c
        .stream::<methods::WatchSecrets>(&WatchSecretsParams {
            names: Some(vec!["lib".into()]),
        })
        .unwrap();
    let first = replies.next().unwrap().unwrap();
    assert_eq!(first.change, keyward::api::ChangeKind::Watching);
    put(&d, "lib", b"x");
    let change = replies.next().unwrap().unwrap();
    assert_eq!(
        (change.change, change.name.as_deref(), change.version),
        (keyward::api::ChangeKind::Put, Some("lib"), Some(1))
    );
}
