//! Connection slots against the real daemon: unprivileged users (through `setpriv`) hold
//! connections open and idle on a socket anyone may reach, and root must still be served at
//! once by the real `keyward` CLI. A connection beyond a bound is answered `Busy` at once and
//! closed, never left waiting; the CLI tells "busy" (exit 5) from "unreachable" (exit 3).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use keyward::Client;
use keyward_tests::as_uid;
use keyward_tests::keywardd::{bin, Keywardd, Setup};
use keyward_tests::softhsm::SoftHsm;

const MAX_CONNECTIONS: usize = 12;
const PER_UID: usize = 4;
const ROOT_RESERVE: usize = 4;

/// What root's status may take while others hold connections.
const ROOT_BOUND: Duration = Duration::from_secs(1);

/// How long a run that should be quick is given before it is killed and the test fails (the
/// CLI itself would wait 120 s).
const GIVE_UP: Duration = Duration::from_secs(10);

/// A daemon with few slots, and an idle timeout long enough that held connections stay for
/// the whole test.
fn daemon() -> (SoftHsm, Keywardd) {
    daemon_with(&format!(
        "max_connections = {MAX_CONNECTIONS}\nmax_connections_per_uid = {PER_UID}\n\
         root_reserve = {ROOT_RESERVE}\nidle_timeout_secs = 60"
    ))
}

fn daemon_with(limits: &str) -> (SoftHsm, Keywardd) {
    let token = SoftHsm::new("keyward-connections");
    let d = Setup::new()
        .token("hsm", &token)
        .public_socket()
        .limits(limits)
        .start();
    let out = d.run(&["init", "--pkcs11", "hsm"], b"");
    assert_eq!(out.code, 0, "init: {}", out.stderr);
    (token, d)
}

/// Opens connections one after another; on each, one `Status` call: its answer (`ok`, the
/// error name, `closed`, `timeout`) and how long it took (ms) go to stdout, one line per
/// connection. Connections that were served stay open, idle, until stdin closes.
const HOG: &str = r#"
import json, socket, sys, time
path, n = sys.argv[1], int(sys.argv[2])
held = []
for i in range(n):
    start = time.monotonic()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(path)
    try:
        s.sendall(b'{"method":"org.keyward.Custodian.Status"}\0')
    except OSError:
        pass  # answered and closed before the call was read: the answer is still there
    buf, outcome = b"", None
    try:
        while b"\0" not in buf:
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    except socket.timeout:
        outcome = "timeout"
    except OSError:
        pass
    if outcome is None:
        if b"\0" in buf:
            reply = json.loads(buf.split(b"\0")[0])
            outcome = reply.get("error", "ok")
        else:
            outcome = "closed"
    if outcome in ("ok", "timeout"):
        held.append(s)
    else:
        s.close()
    print(outcome, int((time.monotonic() - start) * 1000), flush=True)
print("holding", len(held), flush=True)
sys.stdin.read()
"#;

/// A user holding connections: a `HOG` process running as `uid`.
struct Hog {
    child: Child,
    /// (answer, milliseconds) per connection tried.
    answers: Vec<(String, u64)>,
}

impl Hog {
    /// Run as `uid`, try `n` connections, return once it holds what it got.
    fn start(d: &Keywardd, uid: u32, n: usize) -> Self {
        // The system's Python: one from root's home (pyenv) is out of another user's reach.
        let mut child = as_uid(uid, "/usr/bin/python3")
            .args(["-c", HOG])
            .arg(d.socket())
            .arg(n.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 and setpriv");
        let mut answers = Vec::new();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        loop {
            let line = lines
                .next()
                .unwrap_or_else(|| panic!("the hog of uid {uid} died; log:\n{}", d.log()))
                .unwrap();
            let mut words = line.split_whitespace();
            match (words.next(), words.next()) {
                (Some("holding"), _) => break,
                (Some(answer), Some(ms)) => answers.push((answer.to_owned(), ms.parse().unwrap())),
                _ => panic!("hog: {line}"),
            }
        }
        eprintln!("uid {uid}: {answers:?}");
        Self { child, answers }
    }

    fn count(&self, answer: &str) -> usize {
        self.answers.iter().filter(|(a, _)| a == answer).count()
    }

    /// The slowest answer of this kind.
    fn slowest(&self, answer: &str) -> Duration {
        Duration::from_millis(
            self.answers
                .iter()
                .filter(|(a, _)| a == answer)
                .map(|(_, ms)| *ms)
                .max()
                .unwrap_or(0),
        )
    }
}

impl Drop for Hog {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `keyward status` (the real CLI) as root, or as `uid` through `setpriv`: (exit code, stderr,
/// how long it took). Killed and failed if it takes [`GIVE_UP`].
fn status_as(d: &Keywardd, uid: Option<u32>) -> (i32, String, Duration) {
    let mut cmd = match uid {
        None => Command::new(bin("keyward")),
        Some(uid) => as_uid(uid, bin("keyward")),
    };
    cmd.arg("--socket")
        .arg(d.socket())
        .arg("status")
        .env_remove("KEYWARD_SOCKET")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let started = Instant::now();
    let child = cmd.spawn().unwrap();
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(GIVE_UP) {
        Ok(out) => {
            let out = out.unwrap();
            (
                out.status.code().unwrap_or(-1),
                String::from_utf8_lossy(&out.stderr).into_owned(),
                started.elapsed(),
            )
        }
        Err(_) => {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            panic!(
                "`keyward status` as {} gave no answer in {GIVE_UP:?} (it would wait 120 s, then \
                 say the daemon is unreachable)",
                uid.map_or("root".to_owned(), |u| format!("uid {u}"))
            );
        }
    }
}

#[test]
fn one_user_holding_max_connections_locks_nobody_out() {
    let (_token, d) = daemon();
    // uid 65534 tries to take every slot.
    let hog = Hog::start(&d, 65534, MAX_CONNECTIONS);

    let (code, stderr, took) = status_as(&d, None);
    eprintln!(
        "root's status beside {} held connections: {took:?}",
        hog.count("ok")
    );
    assert_eq!(code, 0, "root's status: {stderr}");
    assert!(took < ROOT_BOUND, "root's status took {took:?}");

    assert_eq!(hog.count("ok"), PER_UID, "{:?}", hog.answers);
    assert_eq!(
        hog.count("org.keyward.Custodian.Busy"),
        MAX_CONNECTIONS - PER_UID,
        "{:?}",
        hog.answers
    );
    assert!(
        hog.slowest("org.keyward.Custodian.Busy") < ROOT_BOUND,
        "Busy must come at once: {:?}",
        hog.answers
    );

    // The hog's CLI: busy, not unreachable.
    let (code, stderr, took) = status_as(&d, Some(65534));
    assert_eq!(code, 5, "the hog's status: {stderr}");
    assert!(stderr.contains("busy"), "{stderr}");
    assert!(took < ROOT_BOUND, "Busy took {took:?}");

    // Once the hog lets go, its slots are freed and it is served again.
    let mark = d.log_mark();
    let held = hog.count("ok") + hog.count("timeout");
    drop(hog);
    let mut closed = 0;
    d.wait_log("the hog's connections to close", mark, GIVE_UP, |l| {
        closed += usize::from(l.contains("varlink: connection closed") && l.contains("uid=65534"));
        closed == held
    });
    let (code, stderr, _) = status_as(&d, Some(65534));
    assert_eq!(code, 0, "uid 65534 is served again: {stderr}");
}

#[test]
fn root_keeps_its_reserve_when_other_users_fill_the_rest() {
    let (_token, d) = daemon();
    // Two users take their share each: every slot but root's reserve.
    let hogs: Vec<Hog> = [65534, 65533]
        .into_iter()
        .map(|uid| Hog::start(&d, uid, PER_UID))
        .collect();
    for hog in &hogs {
        assert_eq!(hog.count("ok"), PER_UID, "{:?}", hog.answers);
    }
    assert_eq!(2 * PER_UID, MAX_CONNECTIONS - ROOT_RESERVE);
    // A third user holds nothing, yet the rest is root's.
    let third = Hog::start(&d, 65532, 1);
    assert_eq!(
        third.answers[0].0, "org.keyward.Custodian.Busy",
        "{:?}",
        third.answers
    );
    let (code, stderr, _) = status_as(&d, Some(65532));
    assert_eq!(code, 5, "{stderr}");
    // Root gets in, each time, at once.
    for _ in 0..3 {
        let (code, stderr, took) = status_as(&d, None);
        assert_eq!(code, 0, "root's status: {stderr}");
        assert!(took < ROOT_BOUND, "root's status took {took:?}");
    }
}

#[test]
fn an_idle_connection_is_closed_soon_and_the_client_connects_again() {
    let idle = Duration::from_secs(1);
    let (_token, d) = daemon_with(&format!("idle_timeout_secs = {}", idle.as_secs()));
    let mut c = Client::connect(d.socket()).unwrap();
    c.set_timeout(Some(GIVE_UP)).unwrap();
    assert!(c.status().unwrap().initialized);
    let started = Instant::now();
    d.wait_log("the daemon to close the idle connection", 0, GIVE_UP, |l| {
        l.contains("varlink: connection closed") && l.contains("Idle")
    });
    let closed_after = started.elapsed();
    eprintln!("idle connection closed after {closed_after:?}");
    assert!(
        closed_after < idle + Duration::from_secs(2),
        "{closed_after:?}"
    );
    // The same client goes on: it connects again before sending.
    assert!(c.status().unwrap().initialized);
    assert!(c.list_secrets(None).unwrap().is_empty());
}
