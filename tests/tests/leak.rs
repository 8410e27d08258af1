//! Secrets stay secret: marker values, PINs, recovery shares and signed data go through every
//! path (put, get, credential socket, sign, wrong PIN, bad shares, malformed requests, rekey),
//! and then the daemon's log, its error replies, the CLI's error output and every file in the
//! state directory (store, write-ahead log, audit log) are searched for them in every encoding
//! the daemon could print (raw, base64, hex). And the running daemon itself: non-dumpable,
//! no core dumps, its keys in locked memory.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{Read as _, Write as _};
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use keyward_tests::credentials::fetch;
use keyward_tests::keywardd::{bin, Keywardd, Setup, ROOT_ADMIN_POLICY};
use keyward_tests::softhsm::SoftHsm;
use keyward_tests::swtpm::Swtpm;

const VALUE: &str = "kwleak-VALUE-5b1e0c7d9a";
const PIN: &str = "kwleak-PIN-41d7c2";
const WRONG_PIN: &str = "kwleak-WRONGPIN-9e02";
const SIGN_DATA: &str = "kwleak-SIGNDATA-3f66a1";
const BAD_VALUE: &str = "kwleak-BADVALUE-c0ffee";

/// Every way a byte string could show up in text the daemon writes.
fn forms(secret: &[u8]) -> Vec<(String, Vec<u8>)> {
    let b64 = base64::engine::general_purpose::STANDARD;
    // A value travels base64-encoded; a marker at its start encodes to a stable prefix.
    let whole = secret.len() / 3 * 3;
    let mut out = vec![
        ("raw".to_owned(), secret.to_vec()),
        (
            "base64".to_owned(),
            b64.encode(&secret[..whole]).into_bytes(),
        ),
        (
            "hex".to_owned(),
            secret
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
                .into_bytes(),
        ),
    ];
    if let Ok(text) = std::str::from_utf8(secret) {
        // A share printed in groups, or a value escaped into JSON, still has its long runs.
        let compact: String = text.chars().filter(|c| c.is_ascii_alphanumeric()).collect();
        out.push(("alphanumeric".to_owned(), compact.into_bytes()));
    }
    out
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// Everything written to disk under `dir`, by path.
fn files_under(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.is_file() {
                out.push((path.clone(), std::fs::read(&path).unwrap()));
            }
        }
    }
    out
}

fn write_private(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// One raw Varlink call; the reply's text.
fn raw_call(socket: &Path, frame: &str) -> String {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(frame.as_bytes()).unwrap();
    s.write_all(b"\0").unwrap();
    let mut reply = Vec::new();
    let mut byte = [0u8; 1];
    while s.read(&mut byte).unwrap() == 1 && byte[0] != 0 {
        reply.push(byte[0]);
    }
    String::from_utf8(reply).unwrap()
}

fn shares(out: &serde_json::Value) -> Vec<String> {
    out["recovery_shares"]
        .as_array()
        .expect("recovery shares")
        .iter()
        .map(|s| s.as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn no_secret_reaches_a_log_an_error_or_a_file_in_clear() {
    let tpm = Swtpm::start();
    let token = SoftHsm::new("leak");
    let mut policy = ROOT_ADMIN_POLICY.to_owned();
    policy.push_str(
        "\n[[credential]]\nunit = \"app.service\"\nid = \"token\"\nsecret = \"leak/value\"\n",
    );
    let mut d = Setup::new()
        .tpm("tpm", &tpm)
        .token("hsm", &token)
        .unseal_order(&["tpm"])
        .policy(&policy)
        .credentials(5)
        .start();
    let pin_file = d.dir().join("tpm-pin");
    write_private(&pin_file, PIN);
    let wrong_pin_file = d.dir().join("wrong-pin");
    write_private(&wrong_pin_file, WRONG_PIN);
    let pin_path = pin_file.to_str().unwrap();

    // Everything a caller was told when something failed: error messages must not echo input.
    let mut errors: Vec<(String, String)> = Vec::new();
    let mut all_shares: Vec<String> = Vec::new();

    let out = d.json(&[
        "init",
        "--tpm2",
        "tpm",
        "--pkcs11",
        "hsm",
        "--recovery",
        "2/3",
    ]);
    all_shares.extend(shares(&out));
    d.json(&["enroll", "tpm2", "--device", "tpm", "--pin-file", pin_path]);

    let put = d.run(&["secret", "put", "leak/value"], VALUE.as_bytes());
    assert_eq!(put.code, 0, "{}", put.stderr);
    let got = d.run(&["secret", "get", "leak/value"], b"");
    assert_eq!(got.stdout_bytes, VALUE.as_bytes(), "the value comes back");
    let delivered = fetch(&d.credentials_socket(), "app.service", "token").unwrap();
    assert_eq!(
        delivered,
        VALUE.as_bytes(),
        "and through the credential socket"
    );

    d.json(&[
        "key",
        "create",
        "signer",
        "--device",
        "hsm",
        "--algorithm",
        "ed25519",
    ]);
    let sign = d.run(&["key", "sign", "signer"], SIGN_DATA.as_bytes());
    assert_eq!(sign.code, 0, "{}", sign.stderr);

    // Failures with secrets in their input.
    let too_big = format!("{VALUE}{}", "x".repeat(2 << 20));
    let big = d.run(&["secret", "put", "leak/big"], too_big.as_bytes());
    assert_ne!(big.code, 0, "an oversized value is refused");
    errors.push(("oversized put".into(), big.stderr + &big.stdout));

    d.json(&["seal"]);
    let wrong = d.run(
        &[
            "--json",
            "unseal",
            "--pin-file",
            wrong_pin_file.to_str().unwrap(),
        ],
        b"",
    );
    assert_ne!(wrong.code, 0, "a wrong PIN does not unseal");
    errors.push(("wrong PIN".into(), wrong.stderr + &wrong.stdout));
    let bogus_share = format!("{VALUE}-not-a-share\n");
    let bogus = d.run(&["--json", "unseal"], bogus_share.as_bytes());
    assert_ne!(bogus.code, 0, "a bogus share does not unseal");
    errors.push(("bogus share".into(), bogus.stderr + &bogus.stdout));
    // The CLI refuses that share before sending it; sent straight to the sealed daemon, it is
    // refused there too.
    let frame = format!(
        r#"{{"method":"org.keyward.Custodian.Unseal","parameters":{{"recovery_share":"{VALUE}-not-a-share"}}}}"#
    );
    let reply = raw_call(d.socket(), &frame);
    assert!(reply.contains("InvalidArgument"), "{reply}");
    errors.push(("bogus share sent to the API".into(), reply));
    let opened = d.run(&["--json", "unseal", "--pin-file", pin_path], b"");
    assert_eq!(opened.code, 0, "the right PIN unseals: {}", opened.stderr);

    let rekeyed = d.json(&["rekey", "--pin-file", pin_path]);
    all_shares.extend(shares(&rekeyed));

    // Malformed requests that carry secret-looking input.
    for frame in [
        format!(
            r#"{{"method":"org.keyward.Custodian.PutSecret","parameters":{{"name":"leak/x","value":"{BAD_VALUE}!!"}}}}"#
        ),
        format!(
            r#"{{"method":"org.keyward.Custodian.PutSecret","parameters":{{"name":"leak/x","value":"AAAA","extra":"{BAD_VALUE}"}}}}"#
        ),
        format!(
            r#"{{"method":"org.keyward.Custodian.Unseal","parameters":{{"pin":"{WRONG_PIN}"}}}}"#
        ),
        format!(
            r#"{{"method":"org.keyward.Custodian.NoSuchMethod","parameters":{{"value":"{BAD_VALUE}"}}}}"#
        ),
        format!(
            r#"{{"method":"org.keyward.Custodian.Unseal","parameters":{{"recovery_share":"{BAD_VALUE}"}}}}"#
        ),
        format!(r#"{{"method": "org.keyward.Custodian.PutSecret", "parameters": "{BAD_VALUE}""#),
    ] {
        let reply = raw_call(d.socket(), &frame);
        // Unseal of an open vault is a no-op success; everything else is refused.
        assert!(
            reply.contains("\"error\"") || frame.contains("Unseal"),
            "refused: {reply}"
        );
        errors.push((format!("raw frame {frame}"), reply));
    }
    // The daemon is still whole after all that.
    let again = d.run(&["secret", "get", "leak/value"], b"");
    assert_eq!(again.stdout_bytes, VALUE.as_bytes());
    d.stop();

    let mut secrets: Vec<(String, Vec<u8>)> = vec![
        ("value".into(), VALUE.as_bytes().to_vec()),
        ("PIN".into(), PIN.as_bytes().to_vec()),
        ("wrong PIN".into(), WRONG_PIN.as_bytes().to_vec()),
        ("signed data".into(), SIGN_DATA.as_bytes().to_vec()),
        ("bad value".into(), BAD_VALUE.as_bytes().to_vec()),
    ];
    for (i, s) in all_shares.iter().enumerate() {
        secrets.push((format!("recovery share {i}"), s.as_bytes().to_vec()));
    }
    assert!(all_shares.len() >= 6, "shares from init and rekey");

    let mut places: Vec<(String, Vec<u8>)> = vec![("daemon log".into(), d.log().into_bytes())];
    for (label, text) in &errors {
        places.push((format!("error reply to {label}"), text.clone().into_bytes()));
    }
    let state = files_under(&d.dir().join("state"));
    assert!(
        state
            .iter()
            .any(|(p, _)| p.extension().is_none_or(|e| e != "pub")),
        "the state dir holds the store"
    );
    for (path, bytes) in state {
        places.push((path.display().to_string(), bytes));
    }
    assert!(
        places[0].1.len() > 1000,
        "the debug log was written: {} bytes",
        places[0].1.len()
    );

    let mut leaks = Vec::new();
    for (what, secret) in &secrets {
        for (form, needle) in forms(secret) {
            // Errors can't echo the bad value's own name back as "unknown parameter" either.
            for (place, haystack) in &places {
                if contains(haystack, &needle) {
                    leaks.push(format!("{what} ({form}) in {place}"));
                }
            }
        }
    }
    assert!(leaks.is_empty(), "secrets leaked:\n{}", leaks.join("\n"));
}

/// `keywardd` started as an unprivileged user (as in production), waited on to `READY=1`.
struct Unprivileged {
    child: Child,
    socket: PathBuf,
    _d: Keywardd,
}

impl Drop for Unprivileged {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const NOBODY: u32 = 65534;

fn chown_tree(dir: &Path, uid: u32) {
    std::os::unix::fs::chown(dir, Some(uid), Some(uid)).unwrap();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            chown_tree(&path, uid);
        } else {
            std::os::unix::fs::chown(&path, Some(uid), Some(uid)).unwrap();
        }
    }
}

fn start_unprivileged(tpm: &Swtpm) -> Unprivileged {
    let d = Setup::new()
        .tpm("tpm", tpm)
        .unseal_order(&["tpm"])
        .prepare();
    chown_tree(d.dir(), NOBODY);
    std::fs::set_permissions(d.dir(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let notify_path = d.dir().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    std::fs::set_permissions(&notify_path, std::fs::Permissions::from_mode(0o777)).unwrap();
    let log = std::fs::File::create(d.dir().join("keywardd.log")).unwrap();
    let child = Command::new(bin("keywardd"))
        .arg("--config")
        .arg(d.config_path())
        .env("NOTIFY_SOCKET", &notify_path)
        .uid(NOBODY)
        .gid(NOBODY)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut buf = [0u8; 4096];
    loop {
        assert!(Instant::now() < deadline, "no READY=1: {}", d.log());
        notify
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        if let Ok(n) = notify.recv(&mut buf) {
            if String::from_utf8_lossy(&buf[..n])
                .lines()
                .any(|l| l == "READY=1")
            {
                break;
            }
        }
    }
    Unprivileged {
        child,
        socket: d.socket().to_path_buf(),
        _d: d,
    }
}

use std::os::unix::process::CommandExt as _;

fn status_field(pid: u32, field: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(field).map(|v| v.trim().to_owned()))
        .unwrap_or_else(|| panic!("no {field} for {pid}"))
}

/// Whether `nobody` can read `/proc/PID/environ` (what a same-uid attacker would try).
fn nobody_reads_environ(pid: u32) -> bool {
    Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "cat"])
        .arg(format!("/proc/{pid}/environ"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success()
}

#[test]
fn the_daemon_is_non_dumpable_without_core_dumps_and_its_keys_are_locked() {
    let tpm = Swtpm::start();
    let u = start_unprivileged(&tpm);
    let pid = u.child.id();
    assert!(
        status_field(pid, "Uid:").starts_with("65534"),
        "runs as nobody"
    );

    // A plain process of the same user, for contrast: the files under /proc/PID belong to its
    // user, who can read its environment. A non-dumpable process's files (/proc/PID/status,
    // environ, mem, ...) belong to root; only the directory keeps the process's uid.
    let mut plain = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let plain_pid = plain.id();
    // Until `cat` runs, /proc/PID is setpriv's, mid-switch from root: wait for the exec, which
    // `cat` proves by echoing a line.
    plain.stdin.as_mut().unwrap().write_all(b"x\n").unwrap();
    let mut echo = [0u8; 2];
    plain
        .stdout
        .as_mut()
        .unwrap()
        .read_exact(&mut echo)
        .unwrap();
    assert_eq!(&echo, b"x\n", "setpriv never ran cat");
    let plain_owner = std::fs::metadata(format!("/proc/{plain_pid}"))
        .unwrap()
        .uid();
    let plain_readable = nobody_reads_environ(plain_pid);
    drop(plain.stdin.take());
    let _ = plain.wait();
    assert_eq!(plain_owner, NOBODY, "an ordinary process of nobody");
    assert!(plain_readable, "nobody reads its own process's environ");

    assert_eq!(
        std::fs::metadata(format!("/proc/{pid}/status"))
            .unwrap()
            .uid(),
        0,
        "PR_SET_DUMPABLE=0 hands /proc/PID/status to root"
    );
    assert!(
        !nobody_reads_environ(pid),
        "another process of the daemon's own user can't read its memory or environment"
    );
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap();
    assert_eq!(
        core.split_whitespace().skip(4).take(2).collect::<Vec<_>>(),
        ["0", "0"],
        "{core}"
    );

    // The VMK and the keyring exist once the vault does: they sit in locked pages.
    let locked_kib = |s: &str| -> u64 { s.trim_end_matches("kB").trim().parse().unwrap() };
    let before = locked_kib(&status_field(pid, "VmLck:"));
    let out = Command::new(bin("keyward"))
        .arg("--socket")
        .arg(&u.socket)
        .args(["init", "--tpm2", "tpm"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after = locked_kib(&status_field(pid, "VmLck:"));
    assert!(
        after > before,
        "key pages locked once the vault is open: VmLck {before} kB -> {after} kB"
    );
}
