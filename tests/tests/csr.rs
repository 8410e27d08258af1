//! `keyward key csr`: PKCS#10 requests for device keys, signed inside the device through the
//! daemon's `Sign`, checked with the `openssl` command line against the real keywardd on a real
//! SoftHSM token and a real swtpm.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::Command;

use keyward_tests::keywardd::{bin, run_cli, Keywardd, Output, Setup, ROOT_ADMIN_POLICY};
use keyward_tests::softhsm::SoftHsm;
use keyward_tests::swtpm::Swtpm;
use serde_json::Value;

/// The uid of `nobody`, whom the policy lets manage the `csr-*` keys but not sign with them.
const NOBODY: u32 = 65534;

struct World {
    _tpm: Swtpm,
    _token: SoftHsm,
    daemon: Keywardd,
}

/// A daemon with a TPM (`tpm`) and a token (`hsm`) on a socket anyone may reach, initialised,
/// with the keys `csr-ed` (Ed25519, token), `csr-tpm` (ECDSA P-256, TPM) and `csr-rsa`
/// (RSA-PSS, token).
fn world() -> World {
    let tpm = Swtpm::start();
    let token = SoftHsm::new("keyward-csr");
    let daemon = Setup::new()
        .tpm("tpm", &tpm)
        .token("hsm", &token)
        .public_socket()
        .policy(&format!(
            "{ROOT_ADMIN_POLICY}\n[[rule]]\nwho = {{ uid = {NOBODY} }}\nallow = [\"keys\"]\nkeys = [\"csr-*\"]\n"
        ))
        .start();
    daemon.json(&["init", "--pkcs11", "hsm"]);
    for (name, device, algorithm) in [
        ("csr-ed", "hsm", "ed25519"),
        ("csr-tpm", "tpm", "ecdsa-p256"),
        ("csr-rsa", "hsm", "rsa-pss-3072"),
        ("csr-rsa1", "hsm", "rsa-pkcs1-3072"),
    ] {
        daemon.json(&[
            "key",
            "create",
            name,
            "--device",
            device,
            "--algorithm",
            algorithm,
        ]);
    }
    World {
        _tpm: tpm,
        _token: token,
        daemon,
    }
}

/// `openssl ARGS` on the request in `csr`; panics with openssl's words when it fails.
fn openssl(csr: &Path, args: &[&str]) -> Vec<u8> {
    let out = Command::new("openssl")
        .args(["req", "-in"])
        .arg(csr)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl req {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    [out.stdout, out.stderr].concat()
}

/// The DER of a PEM public key, as `openssl pkey` reads it.
fn public_der(dir: &Path, pem: &[u8]) -> Vec<u8> {
    let file = dir.join("public.pem");
    std::fs::write(&file, pem).unwrap();
    let out = Command::new("openssl")
        .args(["pkey", "-pubin", "-outform", "DER", "-in"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    out.stdout
}

/// The successful `Sign` records for `key` on the audit log.
fn signatures(d: &Keywardd, key: &str) -> usize {
    d.audit_requests()
        .iter()
        .filter(|r| r["op"] == "Sign" && r["target"] == key && r["result"] == "ok")
        .count()
}

/// `keyward ARGS` as `nobody`.
fn as_nobody(d: &Keywardd, args: &[&str]) -> Output {
    let mut cmd = keyward_tests::as_uid(NOBODY, bin("keyward"));
    cmd.arg("--socket").arg(d.socket()).args(args);
    run_cli(&mut cmd, b"")
}

/// For a token Ed25519 key and a TPM ECDSA P-256 key, the request verifies with OpenSSL,
/// names the subject and the DNS names asked for, carries the key's own public key, and its
/// signature is on the audit log as a `Sign` by the key (the device signed it).
#[test]
fn requests_for_token_and_tpm_keys_verify_with_openssl() {
    let w = world();
    let d = &w.daemon;
    let dir = tempfile::tempdir().unwrap();
    for name in ["csr-ed", "csr-tpm", "csr-rsa1"] {
        let subject = format!("CN={name}.example,O=Example\\, Inc.");
        let dns = format!("{name}.example");
        let signed_before = signatures(d, name);
        let out = d.run(
            &[
                "key",
                "csr",
                name,
                "--subject",
                &subject,
                "--dns",
                &dns,
                "--dns",
                "alt.example",
            ],
            b"",
        );
        assert_eq!(out.code, 0, "{name}: {}", out.stderr);
        assert!(
            out.stdout
                .starts_with("-----BEGIN CERTIFICATE REQUEST-----\n"),
            "{}",
            out.stdout
        );
        let csr = dir.path().join(format!("{name}.pem"));
        std::fs::write(&csr, &out.stdout_bytes).unwrap();

        let verified = String::from_utf8(openssl(&csr, &["-verify", "-noout"])).unwrap();
        assert!(verified.contains("verify OK"), "{name}: {verified}");
        let shown = String::from_utf8(openssl(
            &csr,
            &["-noout", "-subject", "-nameopt", "RFC2253"],
        ))
        .unwrap();
        assert_eq!(shown.trim(), format!("subject={subject}"), "{name}");
        let text = String::from_utf8(openssl(&csr, &["-noout", "-text"])).unwrap();
        assert!(
            text.contains(&format!("DNS:{dns}, DNS:alt.example")),
            "{name}: {text}"
        );

        let in_csr = public_der(dir.path(), &openssl(&csr, &["-noout", "-pubkey"]));
        let public = d.run(&["key", "public", name, "--der"], b"");
        assert_eq!(public.code, 0, "{}", public.stderr);
        assert_eq!(
            in_csr, public.stdout_bytes,
            "{name}: not the key's public key"
        );

        assert_eq!(
            signatures(d, name),
            signed_before + 1,
            "{name}: no Sign on record"
        );
    }

    // --json: the same request in a document.
    let doc = d.json(&["key", "csr", "csr-ed", "--subject", "CN=json.example"]);
    assert_eq!(doc["name"], "csr-ed", "{doc}");
    assert_eq!(doc["subject"], "CN=json.example", "{doc}");
    let csr = dir.path().join("json.pem");
    std::fs::write(&csr, doc["csr"].as_str().unwrap()).unwrap();
    openssl(&csr, &["-verify", "-noout"]);
}

/// A caller whom the policy does not let sign with the key gets the daemon's
/// `PermissionDenied` and no request; nothing is signed for it.
#[test]
fn a_caller_denied_sign_gets_permission_denied_and_no_request() {
    let w = world();
    let d = &w.daemon;
    // nobody sees the key (it may manage it) but may not use it.
    let keys = as_nobody(d, &["--json", "key", "list"]);
    assert!(keys.stdout.contains("csr-ed"), "{keys:?}");
    let out = as_nobody(d, &["key", "csr", "csr-ed", "--subject", "CN=x"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.to_lowercase().contains("permission denied"),
        "{}",
        out.stderr
    );
    assert!(out.stdout.is_empty(), "{}", out.stdout);
    let out = as_nobody(d, &["--json", "key", "csr", "csr-ed", "--subject", "CN=x"]);
    let doc: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(
        doc["error"]["name"], "org.keyward.Custodian.PermissionDenied",
        "{doc}"
    );
    assert_eq!(signatures(d, "csr-ed"), 0);
}

/// A subject that is not an RFC 4514 name, or an RSA-PSS key, is a usage error (exit 2) that
/// says why, and nothing is signed.
#[test]
fn a_bad_subject_or_an_rsa_key_is_a_usage_error_and_nothing_is_signed() {
    let w = world();
    let d = &w.daemon;
    for (subject, says) in [
        ("CN=host, O=Example", "\" O=Example\""),
        ("host.example", "has no '='"),
        ("XX=1", "\"XX=1\""),
    ] {
        let out = d.run(&["key", "csr", "csr-ed", "--subject", subject], b"");
        assert_eq!(out.code, 2, "{subject}: {out:?}");
        assert!(out.stderr.contains(says), "{subject}: {}", out.stderr);
        assert!(out.stdout.is_empty(), "{}", out.stdout);
    }
    let out = d.run(
        &["key", "csr", "csr-tpm", "--subject", "CN=x", "--dns", "a b"],
        b"",
    );
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.stderr.contains("not a DNS name"), "{}", out.stderr);

    let out = d.run(&["key", "csr", "csr-rsa", "--subject", "CN=x"], b"");
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.stderr.contains("RSA-PSS"), "{}", out.stderr);
    for key in ["csr-ed", "csr-tpm", "csr-rsa"] {
        assert_eq!(signatures(d, key), 0, "{key} signed");
    }
}
