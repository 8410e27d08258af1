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
    // Invalid names.
    for name in ["", "../etc/passwd", "a//b", "with space"] {
        let r = c.call("PutSecret", json!({ "name": name, "value": "eA==" }));
        assert_eq!(
            error_name(&r),
            "org.keyward.Custodian.InvalidArgument",
            "{name:?}: {r}"
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
