//! systemd's `LoadCredential=` socket against the real daemon, with a client that behaves
//! exactly like PID 1 (abstract address `\0<hex>/unit/<unit>/<id>`, connect, SHUT_WR, read to
//! EOF).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

use keyward_tests::credentials::fetch;
use keyward_tests::keywardd::{Keywardd, Setup, ROOT_ADMIN_POLICY};
use keyward_tests::softhsm::SoftHsm;

const UNITS: usize = 10;

fn policy() -> String {
    let mut p = ROOT_ADMIN_POLICY.to_owned();
    p.push_str("\n[[credential]]\nunit = \"postgresql.service\"\nid = \"db-pass\"\nsecret = \"db/password\"\n");
    for i in 0..UNITS {
        p.push_str(&format!("\n[[credential]]\nunit = \"app-{i}.service\"\nid = \"token\"\nsecret = \"boot/app-{i}\"\n"));
    }
    p
}

fn daemon(token: &SoftHsm, wait: u64) -> Keywardd {
    let d = Setup::new()
        .token("hsm", token)
        .policy(&policy())
        .credentials(wait)
        .public_socket()
        .start();
    let out = d.run(&["init", "--pkcs11", "hsm", "--recovery", "1/1"], b"");
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(
        d.run(&["secret", "put", "db/password"], b"s3cr3t\n").code,
        0
    );
    for i in 0..UNITS {
        assert_eq!(
            d.run(
                &["secret", "put", &format!("boot/app-{i}")],
                format!("value-{i}").as_bytes()
            )
            .code,
            0
        );
    }
    d
}

#[test]
fn a_mapped_unit_gets_its_secret() {
    let t = SoftHsm::new("cred");
    let d = daemon(&t, 5);
    let value = fetch(&d.credentials_socket(), "postgresql.service", "db-pass").unwrap();
    assert_eq!(value, b"s3cr3t\n", "raw bytes, exactly as stored");
    assert!(d.log().contains("credential delivered"), "{}", d.log());
}

#[test]
fn unknown_units_and_ids_get_nothing_and_are_logged() {
    let t = SoftHsm::new("cred");
    let d = daemon(&t, 5);
    assert_eq!(
        fetch(&d.credentials_socket(), "postgresql.service", "other").unwrap(),
        b""
    );
    assert_eq!(
        fetch(&d.credentials_socket(), "mysql.service", "db-pass").unwrap(),
        b""
    );
    assert!(d.log().contains("credential refused"), "{}", d.log());
}

#[test]
fn a_non_root_peer_binding_systemds_address_gets_nothing() {
    let t = SoftHsm::new("cred");
    let d = daemon(&t, 5);
    // The same address systemd would use, bound by uid 65534.
    let script = r#"
import os, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(b"\0" + os.urandom(8).hex().encode() + b"/unit/postgresql.service/db-pass")
s.connect(sys.argv[1])
s.shutdown(socket.SHUT_WR)
data = b""
while True:
    chunk = s.recv(65536)
    if not chunk:
        break
    data += chunk
print(len(data))
"#;
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--",
            "/usr/bin/python3",
            "-c",
            script,
        ])
        .arg(d.credentials_socket())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "0",
        "nobody must get no bytes"
    );
    assert!(
        d.log().contains("non-root peer"),
        "the refusal is logged: {}",
        d.log()
    );
    // And root still gets it.
    assert_eq!(
        fetch(&d.credentials_socket(), "postgresql.service", "db-pass").unwrap(),
        b"s3cr3t\n"
    );
}

#[test]
fn a_boot_storm_of_500_units_is_served() {
    let t = SoftHsm::new("cred");
    let d = daemon(&t, 5);
    let socket = d.credentials_socket();
    let workers: Vec<_> = (0..500)
        .map(|n| {
            let socket = socket.clone();
            std::thread::spawn(move || {
                let i = n % UNITS;
                let value = fetch(&socket, &format!("app-{i}.service"), "token").unwrap();
                (i, value)
            })
        })
        .collect();
    for w in workers {
        let (i, value) = w.join().unwrap();
        assert_eq!(value, format!("value-{i}").as_bytes());
    }
}

#[test]
fn requests_wait_for_the_unseal_and_give_up_when_bounded() {
    let t = SoftHsm::new("cred");
    let d = daemon(&t, 1);
    assert_eq!(d.run(&["seal"], b"").code, 0);
    // Sealed and nobody unseals: after the bounded wait, nothing.
    assert_eq!(
        fetch(&d.credentials_socket(), "postgresql.service", "db-pass").unwrap(),
        b""
    );
    assert!(d.log().contains("still sealed"), "{}", d.log());
}

#[test]
fn a_request_made_while_sealed_is_answered_once_unsealed() {
    let t = SoftHsm::new("cred");
    let mut d = Setup::new()
        .token("hsm", &t)
        .policy(&policy())
        .credentials(60)
        .start();
    let out = d.json(&["init", "--pkcs11", "hsm", "--recovery", "1/1"]);
    let share = out["recovery_shares"][0].as_str().unwrap().to_owned();
    assert_eq!(d.run(&["secret", "put", "db/password"], b"pw").code, 0);
    // Next start: the token's PIN file is gone, so the vault stays sealed until a share.
    d.stop();
    std::fs::rename(t.pin_file(), t.dir().join("pin-away")).unwrap();
    d.start();
    assert_eq!(d.json(&["status"])["sealed"], true);
    let socket = d.credentials_socket();
    let waiting =
        std::thread::spawn(move || fetch(&socket, "postgresql.service", "db-pass").unwrap());
    let out = d.run(&["unseal"], format!("{share}\n").as_bytes());
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(waiting.join().unwrap(), b"pw");
}
