//! The Varlink API as any client sees it: raw frames on the socket, a generic client we did not
//! write (Python's `varlink`), and bad input of every kind.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::Duration;

use keyward_tests::keywardd::{Keywardd, Setup};
use keyward_tests::softhsm::SoftHsm;
use serde_json::{json, Value};

fn daemon() -> (SoftHsm, Keywardd) {
    let token = SoftHsm::new("keyward-varlink");
    let d = Setup::new().token("hsm", &token).start();
    let out = d.run(&["init", "--pkcs11", "hsm"], b"");
    assert_eq!(out.code, 0, "{}", out.stderr);
    (token, d)
}

/// A raw Varlink connection.
struct Raw(UnixStream);

impl Raw {
    fn connect(d: &Keywardd) -> Self {
        let s = UnixStream::connect(d.socket()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        Raw(s)
    }

    fn send(&mut self, bytes: &[u8]) {
        self.0.write_all(bytes).unwrap();
        self.0.write_all(b"\0").unwrap();
    }

    /// The next reply, or None at EOF.
    fn recv(&mut self) -> Option<Value> {
        let mut buf = Vec::new();
        let mut byte = [0u8; 1];
        loop {
            match self.0.read(&mut byte) {
                Ok(0) => return None,
                Ok(_) if byte[0] == 0 => return Some(serde_json::from_slice(&buf).unwrap()),
                Ok(_) => buf.push(byte[0]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return None,
                Err(e) => panic!("read: {e}"),
            }
        }
    }

    fn call(&mut self, method: &str, parameters: Value) -> Value {
        let msg = json!({ "method": format!("org.keyward.Custodian.{method}"), "parameters": parameters });
        self.send(msg.to_string().as_bytes());
        self.recv().expect("a reply")
    }
}

fn error_name(reply: &Value) -> &str {
    reply["error"].as_str().unwrap_or("")
}

#[test]
fn put_and_get_over_raw_varlink() {
    let (_t, d) = daemon();
    let mut c = Raw::connect(&d);
    let r = c.call(
        "PutSecret",
        json!({ "name": "raw/one", "value": "aGVsbG8=" }),
    );
    assert_eq!(r["parameters"]["version"], 1, "{r}");
    let r = c.call("GetSecret", json!({ "name": "raw/one" }));
    assert_eq!(r["parameters"]["value"], "aGVsbG8=", "{r}");
    let r = c.call("GetSecret", json!({ "name": "raw/none" }));
    assert_eq!(error_name(&r), "org.keyward.Custodian.NotFound", "{r}");
    assert_eq!(r["parameters"]["name"], "raw/none");
}

#[test]
fn python_varlink_client_introspects_and_calls() {
    let (_t, d) = daemon();
    let mut c = Raw::connect(&d);
    c.call(
        "PutSecret",
        json!({ "name": "py/secret", "value": "cHl0aG9u" }),
    );
    let script = r#"
import sys, varlink
address = "unix:" + sys.argv[1]
with varlink.Client(address=address) as client:
    info = client.get_interfaces()
    assert "org.keyward.Custodian" in info, info
    with client.open("org.keyward.Custodian", namespaced=True) as c:
        reply = c.GetSecret("py/secret")
        print("value=" + reply.value)
        try:
            c.GetSecret("py/missing")
            print("no error")
        except varlink.VarlinkError as e:
            print("error=" + e.error())
"#;
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(d.socket())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "python varlink failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("value=cHl0aG9u"), "{stdout}");
    assert!(
        stdout.contains("error=org.keyward.Custodian.NotFound"),
        "{stdout}"
    );
}

#[test]
fn introspection_serves_the_interface_description() {
    let (_t, d) = daemon();
    let mut c = Raw::connect(&d);
    c.send(br#"{"method":"org.varlink.service.GetInfo"}"#);
    let info = c.recv().unwrap();
    let interfaces = info["parameters"]["interfaces"].as_array().unwrap();
    assert!(
        interfaces.iter().any(|i| i == "org.keyward.Custodian"),
        "{info}"
    );
    c.send(br#"{"method":"org.varlink.service.GetInterfaceDescription","parameters":{"interface":"org.keyward.Custodian"}}"#);
    let desc = c.recv().unwrap();
    let text = desc["parameters"]["description"].as_str().unwrap();
    assert!(text.contains("interface org.keyward.Custodian"));
    assert!(text.contains("method GetSecret(name: string, version: ?int)"));
}

#[test]
fn bad_input_gets_typed_errors_and_the_daemon_keeps_serving() {
    let (_t, d) = daemon();
    let mut c = Raw::connect(&d);
    // Malformed JSON: an error, and the same connection still works.
    c.send(b"{not json");
    let r = c.recv().unwrap();
    assert_eq!(
        error_name(&r),
        "org.varlink.service.InvalidParameter",
        "{r}"
    );
    assert_eq!(
        c.call("ListSecrets", json!({}))["parameters"]["names"],
        json!([])
    );
    // Unknown method, unknown interface.
    assert_eq!(
        error_name(&c.call("Frobnicate", json!({}))),
        "org.varlink.service.MethodNotFound"
    );
    c.send(br#"{"method":"com.example.Nope.Call","parameters":{}}"#);
    assert_eq!(
        error_name(&c.recv().unwrap()),
        "org.varlink.service.InterfaceNotFound"
    );
    // Missing and unknown fields, wrong types, bad base64.
    let r = c.call("PutSecret", json!({ "name": "x" }));
    assert_eq!(
        (error_name(&r), &r["parameters"]["parameter"]),
        ("org.varlink.service.InvalidParameter", &json!("value"))
    );
    let r = c.call("GetSecret", json!({ "name": "x", "colour": "blue" }));
    assert_eq!(error_name(&r), "org.varlink.service.InvalidParameter");
    let r = c.call("GetSecret", json!({ "name": 7 }));
    assert_eq!(error_name(&r), "org.varlink.service.InvalidParameter");
    let r = c.call("PutSecret", json!({ "name": "x", "value": "%%%" }));
    assert_eq!(error_name(&r), "org.varlink.service.InvalidParameter");
    // Invalid names and algorithms: refused while the call is parsed, with the parameter and
    // the reason, before policy or audit see them.
    for name in ["", "../etc/passwd", "a//b", "with space"] {
        let r = c.call("PutSecret", json!({ "name": name, "value": "eA==" }));
        assert_eq!(
            error_name(&r),
            "org.keyward.Custodian.InvalidArgument",
            "{name:?}: {r}"
        );
        assert_eq!(r["parameters"]["parameter"], "name", "{r}");
    }
    let r = c.call("GetSecret", json!({ "name": "with space" }));
    assert_eq!(
        r["parameters"]["reason"],
        "' ' is not allowed: use A-Z a-z 0-9 . _ - @ + = and '/' between segments",
        "{r}"
    );
    let r = c.call(
        "CreateKey",
        json!({ "name": "k", "device": "hsm", "algorithm": "dsa" }),
    );
    assert_eq!(
        (error_name(&r), &r["parameters"]["parameter"]),
        ("org.keyward.Custodian.InvalidArgument", &json!("algorithm")),
        "{r}"
    );
    let audit = std::fs::read_to_string(d.dir().join("state/audit.log")).unwrap();
    for refused in ["passwd", "with space", "a//b", "\"k\""] {
        assert!(
            !audit.contains(refused),
            "{refused} reached the audit log:\n{audit}"
        );
    }
    // A secret over 1 MiB.
    let big = "A".repeat((1024 * 1024 + 3) / 3 * 4 + 8);
    let r = c.call("PutSecret", json!({ "name": "big", "value": big }));
    assert!(
        [
            "org.keyward.Custodian.TooLarge",
            "org.varlink.service.InvalidParameter"
        ]
        .contains(&error_name(&r)),
        "{}",
        error_name(&r)
    );
    // Still serving on this connection and on a new one.
    assert_eq!(
        c.call("PutSecret", json!({ "name": "ok", "value": "eA==" }))["parameters"]["version"],
        1
    );
    assert_eq!(
        Raw::connect(&d).call("GetSecret", json!({ "name": "ok" }))["parameters"]["value"],
        "eA=="
    );
}

#[test]
fn an_oversized_frame_is_refused_and_its_connection_closed() {
    let (_t, d) = daemon();
    let mut c = Raw::connect(&d);
    let mut other = Raw::connect(&d);
    // 3 MiB without a NUL: the daemon must not buffer it all.
    let chunk = vec![b' '; 64 * 1024];
    let mut sent = 0;
    while sent < 3 * 1024 * 1024 {
        if c.0.write_all(&chunk).is_err() {
            break;
        }
        sent += chunk.len();
    }
    let _ = c.0.write_all(b"\0");
    // Unix sockets keep what the daemon wrote readable after it closed: the reply must be there.
    let r = c.recv().expect("a TooLarge reply before the close");
    assert_eq!(error_name(&r), "org.keyward.Custodian.TooLarge", "{r}");
    assert!(
        c.recv().is_none(),
        "the connection is closed after TooLarge"
    );
    assert_eq!(
        other.call("ListSecrets", json!({}))["parameters"]["names"],
        json!([])
    );
}

/// A daemon like [`daemon`], with a short idle timeout and few connection slots, so that the
/// cut-off of clients that never finish a frame can be watched.
fn daemon_with_limits(idle_timeout_secs: u64, max_connections: usize) -> (SoftHsm, Keywardd) {
    let token = SoftHsm::new("keyward-varlink");
    let mut d = Setup::new().token("hsm", &token).prepare();
    let mut config = std::fs::read_to_string(d.config_path()).unwrap();
    config.push_str(&format!(
        "\n[limits]\nidle_timeout_secs = {idle_timeout_secs}\nmax_connections = {max_connections}\n\
         max_connections_per_uid = {max_connections}\nroot_reserve = 1\n"
    ));
    std::fs::write(d.config_path(), config).unwrap();
    d.start();
    let out = d.run(&["init", "--pkcs11", "hsm"], b"");
    assert_eq!(out.code, 0, "{}", out.stderr);
    (token, d)
}

/// How a slow-loris client ended.
#[derive(Debug)]
struct Trickled {
    /// From connect to the daemon closing the connection; `None` if it never did.
    closed_after: Option<Duration>,
    /// Bytes written after the first one, each a pace apart.
    trickled: usize,
}

/// Connect and start a request, then send one more byte every `pace` and never finish it,
/// until the daemon closes the connection (or `give_up` passes). The pace comes from waiting
/// for that close with a timeout: each time the wait runs out, another byte goes.
fn slow_loris(
    socket: &std::path::Path,
    connected: &std::sync::mpsc::Sender<()>,
    pace: Duration,
    give_up: Duration,
) -> Trickled {
    let start = std::time::Instant::now();
    let mut s = UnixStream::connect(socket).unwrap();
    connected.send(()).unwrap();
    s.set_read_timeout(Some(pace)).unwrap();
    s.write_all(br#"{"method":"org.keyward.Custodian.Status","parameters":{"#)
        .unwrap();
    let mut trickled = 0;
    let mut buf = [0u8; 256];
    while start.elapsed() < give_up {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => panic!("a reply to a request that was never finished"),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                if s.write_all(b" ").is_err() {
                    break;
                }
                trickled += 1;
            }
            Err(_) => break,
        }
    }
    let elapsed = start.elapsed();
    Trickled {
        closed_after: (elapsed < give_up).then_some(elapsed),
        trickled,
    }
}

#[test]
fn slow_loris_clients_are_cut_off_by_the_frame_deadline_and_others_are_served() {
    let idle = Duration::from_secs(2);
    let (_t, d) = daemon_with_limits(idle.as_secs(), 8);
    let pace = Duration::from_millis(200);
    let give_up = Duration::from_secs(30);
    // Start `n` slow clients; return once all of them are connected (accepted, or queued in
    // the listen backlog ahead of anyone who connects later).
    let spawn_lorises = |n: usize| {
        let (connected, all_in) = std::sync::mpsc::channel();
        let lorises = (0..n)
            .map(|_| {
                let socket = d.socket().to_path_buf();
                let connected = connected.clone();
                std::thread::spawn(move || slow_loris(&socket, &connected, pace, give_up))
            })
            .collect::<Vec<_>>();
        for _ in 0..n {
            all_in.recv_timeout(give_up).unwrap();
        }
        lorises
    };
    let check = |lorises: Vec<std::thread::JoinHandle<Trickled>>| {
        for loris in lorises {
            let t = loris.join().unwrap();
            let after = t.closed_after.expect("a trickling client is cut off");
            // Bytes kept coming all along: the deadline is for the whole frame, not per byte.
            assert!(t.trickled >= 4, "{t:?}");
            assert!(after >= idle - Duration::from_millis(100), "{t:?}");
            assert!(after < idle + Duration::from_secs(5), "{t:?}");
        }
    };

    // Six of eight slots held by clients that never finish a frame: others are served at once.
    let lorises = spawn_lorises(6);
    let started = std::time::Instant::now();
    let mut c = Raw::connect(&d);
    for _ in 0..3 {
        assert_eq!(
            c.call("ListSecrets", json!({}))["parameters"]["names"],
            json!([])
        );
    }
    let served_in = started.elapsed();
    assert!(served_in < idle, "served in {served_in:?}");
    drop(c);
    check(lorises);

    // All eight slots held: a ninth client is told `Busy` at once, not left waiting...
    let lorises = spawn_lorises(8);
    let started = std::time::Instant::now();
    let mut late = Raw::connect(&d);
    // The daemon may answer and close before the call is written; the answer is what counts.
    let _ = late
        .0
        .write_all(b"{\"method\":\"org.keyward.Custodian.ListSecrets\"}\0");
    let r = late.recv().expect("an answer");
    let answered = started.elapsed();
    assert_eq!(error_name(&r), "org.keyward.Custodian.Busy", "{r}");
    assert!(late.recv().is_none(), "closed after Busy");
    assert!(answered < idle, "answered after {answered:?}");
    // ...and served once the deadline frees the slots.
    check(lorises);
    let mut after = Raw::connect(&d);
    assert_eq!(
        after.call("ListSecrets", json!({}))["parameters"]["names"],
        json!([])
    );
    eprintln!(
        "served beside 6 slow clients in {served_in:?}; with all slots held, Busy after {answered:?}"
    );
}

/// The daemon's peak resident memory (`VmHWM`), in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/PID/status")
}

#[test]
fn clients_streaming_100_mib_without_a_nul_are_cut_off_with_bounded_memory() {
    let (_t, d) = daemon();
    let mut c = Raw::connect(&d);
    assert_eq!(
        c.call("ListSecrets", json!({}))["parameters"]["names"],
        json!([])
    );
    let before = peak_rss_kib(d.pid());
    const CLIENTS: usize = 4;
    const STREAM: usize = 100 * 1024 * 1024;
    let streams: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let socket = d.socket().to_path_buf();
            std::thread::spawn(move || {
                let mut s = UnixStream::connect(&socket).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                let chunk = vec![b'x'; 64 * 1024];
                let mut sent = 0;
                while sent < STREAM {
                    match s.write(&chunk) {
                        Ok(n) => sent += n,
                        Err(_) => break,
                    }
                }
                let mut reply = Raw(s);
                (sent, reply.recv(), reply.recv())
            })
        })
        .collect();
    let frame_bound = keyward::api::MAX_FRAME_LEN;
    for stream in streams {
        let (sent, reply, after) = stream.join().unwrap();
        // The kernel's socket buffers take a little more than the daemon reads.
        assert!(sent < frame_bound + 8 * 1024 * 1024, "{sent} bytes went in");
        let reply = reply.expect("a TooLarge reply before the close");
        assert_eq!(
            error_name(&reply),
            "org.keyward.Custodian.TooLarge",
            "{reply}"
        );
        assert!(after.is_none(), "closed after TooLarge");
        eprintln!("a client got {sent} bytes in before the daemon cut it off");
    }
    let after = peak_rss_kib(d.pid());
    eprintln!("daemon peak RSS: {before} KiB before, {after} KiB after {CLIENTS} clients");
    // Each connection holds at most one frame bound (2 MiB) of buffer; 100 MiB each would show.
    assert!(
        after.saturating_sub(before) < (CLIENTS * frame_bound / 1024 * 3 + 16 * 1024) as u64,
        "peak RSS grew from {before} to {after} KiB"
    );
    assert_eq!(
        c.call("ListSecrets", json!({}))["parameters"]["names"],
        json!([])
    );
}
