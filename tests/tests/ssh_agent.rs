//! The ssh-agent socket with the real OpenSSH and git clients: `ssh-add -L` sees exactly the
//! keys the policy lets the caller sign with (another uid sees fewer), `ssh` logs in to a real
//! `sshd` with a token Ed25519 key and a TPM ECDSA P-256 key, git signs a commit with a token
//! key and verifies it, and bad input (unknown, malformed and oversized messages, a key the
//! policy denies) gets `FAILURE` while the agent keeps serving. Every signature is on the audit
//! record, and the signed data never is.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use keyward::api::KeyAlgorithm;
use keyward::ssh::SignRequest;
use keyward_tests::keywardd::{Keywardd, Setup};
use keyward_tests::softhsm::SoftHsm;
use keyward_tests::sshd::Sshd;
use keyward_tests::swtpm::Swtpm;

/// The uid and gid of `nobody`.
const NOBODY: u32 = 65534;

/// Root manages every key but signs only with `tok-*`, `tpm-*` and `nobody-*` (so `hidden`
/// is listed for managing and must not reach SSH); nobody signs with `nobody-*`.
const POLICY: &str = r#"
[[rule]]
who = { uid = 0 }
allow = ["admin", "read", "write", "keys"]
secrets = ["*"]
keys = ["*"]

[[rule]]
who = { uid = 0 }
allow = ["sign"]
keys = ["tok-*", "tpm-*", "nobody-*", "pss-*"]

[[rule]]
who = { uid = 65534 }
allow = ["sign"]
keys = ["nobody-*"]
"#;

/// A daemon with the ssh-agent socket on a public socket, a token `hsm` (and a TPM `tpm` when
/// given), initialised, with the keys `(name, device, algorithm)` created.
fn daemon(tpm: Option<&Swtpm>, keys: &[(&str, &str, &str)]) -> (SoftHsm, Keywardd) {
    let token = SoftHsm::new("keyward-ssh");
    let mut setup = Setup::new()
        .token("hsm", &token)
        .public_socket()
        .ssh_agent()
        .policy(POLICY)
        .unseal_order(&["hsm"]);
    if let Some(tpm) = tpm {
        setup = setup.tpm("tpm", tpm);
    }
    let d = setup.start();
    d.json(&["init", "--pkcs11", "hsm"]);
    for (name, device, algorithm) in keys {
        d.json(&[
            "key",
            "create",
            name,
            "--device",
            device,
            "--algorithm",
            algorithm,
        ]);
    }
    (token, d)
}

/// `keyward key public NAME --ssh`.
fn ssh_line(d: &Keywardd, name: &str) -> String {
    let out = d.run(&["key", "public", name, "--ssh"], b"");
    assert_eq!(out.code, 0, "key public {name} --ssh: {}", out.stderr);
    out.stdout
}

/// `ssh-add -L` against the agent, as root or as `uid`: (exit code, stdout).
fn ssh_add_list(d: &Keywardd, uid: Option<u32>) -> (i32, String) {
    let mut c = match uid {
        Some(uid) => keyward_tests::as_uid(uid, "ssh-add"),
        None => Command::new("ssh-add"),
    };
    let out = c
        .arg("-L")
        .env("SSH_AUTH_SOCK", d.ssh_agent_socket())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn sorted_lines(text: &str) -> Vec<String> {
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    lines.sort();
    lines
}

/// The successful `Sign` records that came through the ssh-agent socket, by key.
fn agent_signatures(d: &Keywardd, key: &str) -> usize {
    d.audit_requests()
        .iter()
        .filter(|r| {
            r["op"] == "Sign"
                && r["caller"]["via"] == "ssh-agent"
                && r["target"] == key
                && r["result"] == "ok"
        })
        .count()
}

/// Write `line` to a file in `dir` and return its path (ssh's `IdentityFile`).
fn public_file(dir: &Path, name: &str, line: &str) -> std::path::PathBuf {
    let path = dir.join(format!("{name}.pub"));
    std::fs::write(&path, line).unwrap();
    path
}

#[test]
fn ssh_add_lists_exactly_the_keys_the_caller_may_sign_with() {
    let (_token, d) = daemon(
        None,
        &[
            ("tok-ed", "hsm", "ed25519"),
            ("nobody-ec", "hsm", "ecdsa-p256"),
            // Root may manage it but not sign with it: not offered.
            ("hidden", "hsm", "ed25519"),
            // SSH has no RSA-PSS: never offered.
            ("pss-key", "hsm", "rsa-pss-3072"),
        ],
    );
    let want_root = sorted_lines(&(ssh_line(&d, "tok-ed") + &ssh_line(&d, "nobody-ec")));
    assert!(
        want_root[0].starts_with("ecdsa-sha2-nistp256 AAAA"),
        "{want_root:?}"
    );
    assert!(want_root[0].ends_with(" nobody-ec"), "comment = key name");
    assert!(want_root[1].starts_with("ssh-ed25519 AAAA") && want_root[1].ends_with(" tok-ed"));

    let (code, root) = ssh_add_list(&d, None);
    assert_eq!(code, 0, "ssh-add -L as root: {root}");
    assert_eq!(
        sorted_lines(&root),
        want_root,
        "root sees the keys it may sign with"
    );

    let (code, nobody) = ssh_add_list(&d, Some(NOBODY));
    assert_eq!(code, 0, "ssh-add -L as nobody: {nobody}");
    assert_eq!(
        sorted_lines(&nobody),
        sorted_lines(&ssh_line(&d, "nobody-ec")),
        "nobody sees fewer"
    );
    // The PSS key has no OpenSSH form either.
    let out = d.run(&["key", "public", "pss-key", "--ssh"], b"");
    assert_eq!(out.code, 2, "a usage error: {}", out.stdout);
    assert!(out.stderr.contains("RSA-PSS"), "{}", out.stderr);
}

#[test]
fn ssh_logs_in_to_a_real_sshd_with_token_ed25519_and_rsa_keys_and_a_tpm_ecdsa_key() {
    let tpm = Swtpm::start();
    let (_token, d) = daemon(
        Some(&tpm),
        &[
            ("tok-ed", "hsm", "ed25519"),
            ("tok-rsa", "hsm", "rsa-pkcs1-3072"),
            ("tpm-ec", "tpm", "ecdsa-p256"),
        ],
    );
    let (ed, rsa, ec) = (
        ssh_line(&d, "tok-ed"),
        ssh_line(&d, "tok-rsa"),
        ssh_line(&d, "tpm-ec"),
    );
    assert!(rsa.starts_with("ssh-rsa "), "{rsa}");
    let sshd = Sshd::start(&format!("{ed}{rsa}{ec}"));
    let keys = tempfile::tempdir().unwrap();
    for (name, line, fingerprint_type) in [
        ("tok-ed", &ed, "ED25519"),
        ("tok-rsa", &rsa, "RSA"),
        ("tpm-ec", &ec, "ECDSA"),
    ] {
        let identity = public_file(keys.path(), name, line);
        let out = sshd
            .ssh(
                &d.ssh_agent_socket(),
                &identity,
                "echo logged-in-as-$(id -u)",
            )
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ssh with {name} failed: {}\nsshd log:\n{}\ndaemon log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            sshd.log(),
            d.log()
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout), "logged-in-as-0\n");
        let accepted = "Accepted publickey for root from 127.0.0.1";
        assert!(
            sshd.log()
                .lines()
                .any(|l| l.contains(accepted) && l.contains(fingerprint_type)),
            "sshd accepted the {fingerprint_type} key: {}",
            sshd.log()
        );
        assert!(agent_signatures(&d, name) >= 1, "the signature is audited");
    }
    // OpenSSH asks for rsa-sha2-512 first; the agent signs over SHA-512, never SHA-1.
    let rsa_hashes: Vec<String> = d
        .audit_requests()
        .iter()
        .filter(|r| r["op"] == "Sign" && r["target"] == "tok-rsa" && r["result"] == "ok")
        .map(|r| r["detail"].to_string())
        .collect();
    assert!(
        rsa_hashes.iter().any(|h| h.contains("sha512")),
        "{rsa_hashes:?}"
    );
}

#[test]
fn git_signs_a_commit_with_a_token_key_and_verifies_it() {
    let (_token, d) = daemon(None, &[("tok-git", "hsm", "ed25519")]);
    let line = ssh_line(&d, "tok-git");
    let key = line.trim_end();
    let work = tempfile::tempdir().unwrap();
    let repo = work.path().join("repo");
    let allowed = work.path().join("allowed_signers");
    std::fs::write(
        &allowed,
        format!("dev@example.invalid namespaces=\"git\" {key}\n"),
    )
    .unwrap();
    let git = |args: &[&str]| {
        let mut c = Command::new("git");
        c.arg("-C")
            .arg(&repo)
            .args(["-c", "gpg.format=ssh", "-c", "user.name=Dev"])
            .args(["-c", "user.email=dev@example.invalid"])
            .arg("-c")
            .arg(format!("user.signingkey=key::{key}"))
            .arg("-c")
            .arg(format!("gpg.ssh.allowedSignersFile={}", allowed.display()))
            .args(args)
            .env("SSH_AUTH_SOCK", d.ssh_agent_socket())
            .env("HOME", work.path())
            .env("GIT_CONFIG_NOSYSTEM", "1");
        c
    };
    keyward_tests::run(Command::new("git").arg("init").arg("-q").arg(&repo));
    std::fs::write(repo.join("file"), "signed content\n").unwrap();
    keyward_tests::run(&mut git(&["add", "file"]));
    keyward_tests::run(&mut git(&[
        "commit",
        "-q",
        "-S",
        "-m",
        "signed by the device",
    ]));
    let verified = git(&["verify-commit", "-v", "HEAD"]).output().unwrap();
    let said = String::from_utf8_lossy(&verified.stderr);
    assert!(verified.status.success(), "verify-commit: {said}");
    assert!(
        said.contains("Good \"git\" signature for dev@example.invalid"),
        "{said}"
    );
    assert_eq!(agent_signatures(&d, "tok-git"), 1, "one signature, audited");

    // The same signature fails against another key: the check is real.
    let other = work.path().join("other_signers");
    let stranger = work.path().join("stranger");
    keyward_tests::run(
        Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(&stranger),
    );
    let stranger = std::fs::read_to_string(stranger.with_extension("pub")).unwrap();
    std::fs::write(
        &other,
        format!("dev@example.invalid namespaces=\"git\" {stranger}"),
    )
    .unwrap();
    let refused = git(&[
        "-c",
        &format!("gpg.ssh.allowedSignersFile={}", other.display()),
    ])
    .args(["verify-commit", "HEAD"])
    .output()
    .unwrap();
    assert!(!refused.status.success(), "a wrong key must not verify");
}

/// One framed agent message and its framed reply's body (`None`: the agent closed).
fn exchange(stream: &mut UnixStream, body: &[u8]) -> Option<Vec<u8>> {
    stream.write_all(&keyward::ssh::framed(body)).ok()?;
    read_reply(stream)
}

fn read_reply(stream: &mut UnixStream) -> Option<Vec<u8>> {
    let mut header = [0u8; 4];
    stream.read_exact(&mut header).ok()?;
    let mut reply = vec![0u8; u32::from_be_bytes(header) as usize];
    stream.read_exact(&mut reply).ok()?;
    Some(reply)
}

fn connect(d: &Keywardd) -> UnixStream {
    let stream = UnixStream::connect(d.ssh_agent_socket()).unwrap();
    // A guard against a hang, not a synchronisation: every read here expects a reply.
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    stream
}

fn sign_request(blob: &[u8], data: &[u8]) -> Vec<u8> {
    SignRequest {
        key_blob: blob.to_vec(),
        data: data.to_vec(),
        flags: 0,
    }
    .encode()
    .unwrap()
}

/// The public key blob of an OpenSSH line.
fn blob_of(line: &str) -> Vec<u8> {
    B64.decode(line.split(' ').nth(1).unwrap()).unwrap()
}

const FAILURE: &[u8] = &[5];

#[test]
fn refusals_and_bad_messages_get_failure_and_the_agent_keeps_serving() {
    let (_token, d) = daemon(None, &[("tok-ed", "hsm", "ed25519")]);
    let allowed = blob_of(&ssh_line(&d, "tok-ed"));
    // Root may manage `hidden` but not sign with it; its blob from the DER key create gave.
    let created = d.json(&[
        "key",
        "create",
        "hidden",
        "--device",
        "hsm",
        "--algorithm",
        "ecdsa-p256",
    ]);
    let der = B64.decode(created["public_key"].as_str().unwrap()).unwrap();
    let hidden_key = keyward::ssh::public_key(KeyAlgorithm::EcdsaP256, &der).unwrap();
    let hidden = keyward::ssh::key_blob(&hidden_key).unwrap();

    let mut s = connect(&d);
    let marker = b"agent-data-that-must-not-be-audited-8c1f0e";
    // Not listed, and a sign request for it fails; the connection stays.
    let listed = exchange(&mut s, &[11]).unwrap();
    assert_eq!(listed[0], 12, "identities answer");
    assert_eq!(&listed[1..5], &1u32.to_be_bytes(), "only tok-ed is offered");
    assert_eq!(
        exchange(&mut s, &sign_request(&hidden, marker)).unwrap(),
        FAILURE
    );
    // Unknown and unserved types, an empty message, a malformed and a truncated sign request,
    // trailing bytes: FAILURE each, on the same connection.
    for bad in [
        vec![99, 1, 2, 3],
        vec![17, 0xff, 0xff, 0xff, 0xff],
        vec![19],
        vec![],
        vec![13, 0xff, 0xff, 0xff, 0xff],
        sign_request(&allowed, marker)[..20].to_vec(),
        [sign_request(&allowed, marker), vec![0]].concat(),
        vec![11, 0],
    ] {
        assert_eq!(
            exchange(&mut s, &bad).as_deref(),
            Some(FAILURE),
            "{bad:02x?} gets FAILURE"
        );
    }
    // Still serving on that connection: a real signature.
    let signed = exchange(&mut s, &sign_request(&allowed, marker)).unwrap();
    assert_eq!(signed[0], 14, "sign response");

    // Oversized: FAILURE, then the agent closes this connection (the stream is out of step)...
    let mut big = connect(&d);
    big.write_all(&(256 * 1024 + 1u32).to_be_bytes()).unwrap();
    assert_eq!(read_reply(&mut big).as_deref(), Some(FAILURE));
    assert_eq!(big.read(&mut [0u8; 1]).unwrap(), 0, "closed");
    // ...and keeps serving everyone else.
    let mut next = connect(&d);
    assert_eq!(exchange(&mut next, &[11]).unwrap()[0], 12);
    assert_eq!(exchange(&mut s, &[11]).unwrap()[0], 12);

    // Audited: the signature (ok) and the refused look-ups of `hidden`; never the data.
    assert_eq!(agent_signatures(&d, "tok-ed"), 1);
    let records = d.audit_requests();
    assert!(records.iter().any(|r| r["op"] == "PublicKey"
        && r["target"] == "hidden"
        && r["caller"]["via"] == "ssh-agent"
        && r["result"] == "PermissionDenied"));
    let log = std::fs::read(d.dir().join("state/audit.log")).unwrap();
    for form in [
        marker.to_vec(),
        B64.encode(marker).into_bytes(),
        keyward::text::hex(marker).into_bytes(),
    ] {
        assert!(
            !log.windows(form.len()).any(|w| w == form.as_slice()),
            "the signed data is in the audit log"
        );
    }
}
