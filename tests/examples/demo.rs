//! The README demo: `keywardd` on a private SoftHSM token and a private swtpm, driven by the
//! `keyward` CLI exactly as an admin would: init with a TPM slot, a token slot and recovery
//! shares; store and fetch a secret; sign inside the token and verify with openssl; restart and
//! watch the daemon unseal itself from the TPM.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use keyward_tests::keywardd::{Keywardd, Setup, ROOT_ADMIN_POLICY};
use keyward_tests::softhsm::SoftHsm;
use keyward_tests::swtpm::Swtpm;

/// Run `keyward ARGS` (with `stdin`), echo the command and its output, and return stdout.
fn step(d: &Keywardd, args: &[&str], stdin: &[u8]) -> Vec<u8> {
    let shown_stdin = if stdin.is_empty() {
        String::new()
    } else {
        format!("printf %s {:?} | ", String::from_utf8_lossy(stdin))
    };
    println!("\n$ {shown_stdin}keyward {}", args.join(" "));
    let out = d.run(args, stdin);
    let text = String::from_utf8_lossy(&out.stdout_bytes);
    for line in text.lines() {
        println!("  {line}");
    }
    if out.code != 0 {
        panic!("keyward {args:?} failed ({}): {}", out.code, out.stderr);
    }
    out.stdout_bytes
}

fn main() {
    println!("Keyward demo: keywardd on a private SoftHSM token and a private swtpm (temp dirs)");
    let tpm = Swtpm::start();
    let token = SoftHsm::new("keyward-demo");
    // The policy maps postgresql.service's credential `db-pass` to the secret db/password.
    let policy = format!(
        "{ROOT_ADMIN_POLICY}\n[[credential]]\nunit = \"postgresql.service\"\nid = \"db-pass\"\nsecret = \"db/password\"\n"
    );
    let mut daemon = Setup::new()
        .tpm("tpm", &tpm)
        .token("hsm", &token)
        .unseal_order(&["tpm", "hsm"])
        .policy(&policy)
        .credentials(30)
        .start();
    println!(
        "keywardd is up (READY=1): API socket {}",
        daemon.socket().display()
    );

    step(&daemon, &["status"], b"");
    step(
        &daemon,
        &[
            "init",
            "--tpm2",
            "tpm",
            "--pkcs11",
            "hsm",
            "--recovery",
            "2/3",
        ],
        b"",
    );
    step(
        &daemon,
        &["secret", "put", "db/password"],
        b"correct horse battery staple",
    );
    let value = step(&daemon, &["secret", "get", "db/password"], b"");
    assert_eq!(value, b"correct horse battery staple");

    step(
        &daemon,
        &[
            "key",
            "create",
            "release",
            "--device",
            "hsm",
            "--algorithm",
            "ed25519",
        ],
        b"",
    );
    let message = b"release v1.0.0";
    let signature = daemon
        .run(&["key", "sign", "release"], message)
        .stdout_bytes;
    println!("\n$ printf %s 'release v1.0.0' | keyward key sign release > sig   # {} bytes, made inside the token", signature.len());
    let der = daemon
        .run(&["key", "public", "release", "--der"], b"")
        .stdout_bytes;
    keyward_tests::openssl::verify(
        &hsm_shim::PublicKeyDer(der),
        hsm_shim::KeyAlgorithm::Ed25519,
        message,
        &signature,
    )
    .expect("openssl verifies");
    println!("$ openssl pkeyutl -verify -pubin -inkey release.pem -rawin -in msg -sigfile sig\n  Signature Verified Successfully");

    println!("\n# restart: no human, the daemon unseals itself from the TPM");
    daemon.restart();
    step(&daemon, &["status"], b"");
    let value = step(&daemon, &["secret", "get", "db/password"], b"");
    assert_eq!(value, b"correct horse battery staple");

    // What systemd does for `LoadCredential=db-pass:/run/keyward/credentials.sock` in
    // postgresql.service: bind \0<hex>/unit/postgresql.service/db-pass, connect, read to EOF.
    let delivered = keyward_tests::credentials::fetch(
        &daemon.credentials_socket(),
        "postgresql.service",
        "db-pass",
    )
    .expect("credential socket");
    println!(
        "\n# systemd starts postgresql.service with LoadCredential=db-pass:{}\n  $CREDENTIALS_DIRECTORY/db-pass <- {:?}",
        daemon.credentials_socket().display(),
        String::from_utf8_lossy(&delivered)
    );
    assert_eq!(delivered, b"correct horse battery staple");
    println!("\nDone: the secret survived a restart, fetched after an unattended TPM unseal, and was delivered to a unit by the credential socket.");
}
