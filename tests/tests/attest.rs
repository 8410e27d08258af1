//! Key attestation (`keyward key attest`, `keyward key verify-attestation`) and the TPM's
//! RSA-PSS keys, against the real keywardd on a real swtpm and a real SoftHSM token: a fresh
//! TPM attestation verifies (and its signature with OpenSSL too); a tampered document, a wrong
//! nonce and a key the TPM did not make itself (TPM2_LoadExternal of a software key, certified
//! by the same attestation key) are rejected; a PKCS#11 attestation verifies with the audit key
//! and fails when edited; `keyward status` says what each device creates.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::Command;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use keyward::api::Bytes;
use keyward::attestation::{self, Attestation, AttestationError, Format};
use keyward_tests::keywardd::{Keywardd, Setup};
use keyward_tests::softhsm::SoftHsm;
use keyward_tests::swtpm::Swtpm;
use serde_json::Value;
use tss_esapi::structures::Public as Tss;

const NONCE: &str = "6b657977617264206e6f6e6365";

struct World {
    _tpm: Swtpm,
    _token: SoftHsm,
    daemon: Keywardd,
    dir: tempfile::TempDir,
}

/// A daemon with a TPM (`tpm`) and a token (`hsm`), initialised.
fn world() -> World {
    let tpm = Swtpm::start();
    let token = SoftHsm::new("keyward-attest");
    let daemon = Setup::new().tpm("tpm", &tpm).token("hsm", &token).start();
    daemon.json(&["init", "--pkcs11", "hsm"]);
    World {
        _tpm: tpm,
        _token: token,
        daemon,
        dir: tempfile::tempdir().unwrap(),
    }
}

fn create(d: &Keywardd, name: &str, device: &str, algorithm: &str) {
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

/// `keyward key attest NAME --nonce NONCE -o DIR/NAME.json`; the document.
fn attest(w: &World, name: &str) -> (std::path::PathBuf, Attestation) {
    let path = w.dir.path().join(format!("{name}.json"));
    let out = w.daemon.json(&[
        "key",
        "attest",
        name,
        "--nonce",
        NONCE,
        "--output",
        path.to_str().unwrap(),
    ]);
    assert_eq!(out["key"], name, "{out}");
    let doc = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    (path, doc)
}

/// `keyward --json key verify-attestation FILE ARGS`: exit code and JSON.
fn verify(d: &Keywardd, file: &Path, args: &[&str]) -> (i32, Value) {
    let mut full = vec![
        "--json",
        "key",
        "verify-attestation",
        file.to_str().unwrap(),
    ];
    full.extend_from_slice(args);
    let out = d.run(&full, b"");
    let json = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {} {}", out.stdout, out.stderr));
    (out.code, json)
}

fn write_doc(dir: &Path, name: &str, doc: &Attestation) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, serde_json::to_vec(doc).unwrap()).unwrap();
    path
}

fn pem_file(dir: &Path, name: &str, der: &[u8]) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, keyward::text::public_key_pem(der)).unwrap();
    path
}

/// OpenSSL, not our verifier, checks the AK's ECDSA signature over the TPMS_ATTEST bytes.
fn openssl_verifies(dir: &Path, doc: &Attestation) {
    let key = pem_file(dir, "ak.pem", &doc.signer_public_key.0);
    let (msg, sig) = (dir.join("attest.bin"), dir.join("attest.sig"));
    std::fs::write(&msg, &doc.attest.as_ref().unwrap().0).unwrap();
    std::fs::write(&sig, &doc.signature.0).unwrap();
    let out = Command::new("openssl")
        .args(["dgst", "-sha256", "-verify"])
        .arg(&key)
        .arg("-signature")
        .arg(&sig)
        .arg(&msg)
        .output()
        .unwrap();
    assert!(out.status.success(), "openssl: {out:?}");
}

/// A fresh TPM attestation of a TPM key verifies with its nonce, the key's own public key and
/// the pinned attestation key (the same AK on every call: it is re-created, not stored), and
/// OpenSSL agrees that the AK signed it; a tampered blob, another nonce, another signer and
/// another key's public key are each rejected with exit 1 and the reason.
#[test]
fn a_tpm_attestation_verifies_and_tampering_or_a_wrong_nonce_is_rejected() {
    let w = world();
    let d = &w.daemon;
    create(d, "tpm-ec", "tpm", "ecdsa-p256");
    let (path, doc) = attest(&w, "tpm-ec");
    assert_eq!(doc.format, Format::Tpm2Certify);
    assert_eq!(B64.encode(&doc.nonce.0), B64.encode(hex(NONCE)));
    openssl_verifies(w.dir.path(), &doc);

    let public = d.json(&["key", "public", "tpm-ec"])["public_key"]
        .as_str()
        .unwrap()
        .to_owned();
    let signer = B64.encode(&doc.signer_public_key.0);
    let (code, v) = verify(
        d,
        &path,
        &[
            "--nonce",
            NONCE,
            "--public-key",
            &public,
            "--signer",
            &signer,
        ],
    );
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["verified"]["hardware"], true, "{v}");
    assert_eq!(v["verified"]["signer_pinned"], true, "{v}");
    assert_eq!(v["verified"]["nonce_checked"], true, "{v}");

    // The AK is the same one next time: a verifier can pin it.
    let (_, again) = attest(&w, "tpm-ec");
    assert_eq!(again.signer_public_key, doc.signer_public_key);
    assert_ne!(again.attest, doc.attest, "the TPM clock moves on");

    // Tampered: one bit of the signed TPMS_ATTEST.
    let mut bad = doc.clone();
    if let Some(a) = &mut bad.attest {
        let n = a.0.len();
        a.0[n - 40] ^= 0x01;
    }
    let tampered = write_doc(w.dir.path(), "tampered.json", &bad);
    let (code, v) = verify(d, &tampered, &["--nonce", NONCE]);
    assert_eq!(code, 1, "{v}");
    assert_eq!(v["error"]["name"], "keyward.AttestationInvalid", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("signature does not verify"),
        "{v}"
    );

    // Wrong nonce.
    let (code, v) = verify(d, &path, &["--nonce", "00112233"]);
    assert_eq!(code, 1, "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("nonce"),
        "{v}"
    );
    // The nonce field edited to the verifier's: the signed bytes still carry the old one.
    let mut bad = doc.clone();
    bad.nonce = Bytes(hex("00112233"));
    let edited = write_doc(w.dir.path(), "edited-nonce.json", &bad);
    let (code, v) = verify(d, &edited, &["--nonce", "00112233"]);
    assert_eq!(code, 1, "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("nonce"),
        "{v}"
    );

    // Another signer pinned; another key's public key expected.
    let audit_key = d.json(&["status"])["audit_public_key"]
        .as_str()
        .unwrap()
        .to_owned();
    let (code, v) = verify(d, &path, &["--signer", &audit_key]);
    assert_eq!(code, 1, "{v}");
    create(d, "tpm-other", "tpm", "ecdsa-p256");
    let other = d.json(&["key", "public", "tpm-other"])["public_key"]
        .as_str()
        .unwrap()
        .to_owned();
    let (code, v) = verify(d, &path, &["--public-key", &other]);
    assert_eq!(code, 1, "{v}");

    // The human form says plainly what was and wasn't checked.
    let out = d.run(&["key", "verify-attestation", path.to_str().unwrap()], b"");
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stdout.contains("NOT PINNED"), "{}", out.stdout);
    assert!(out.stdout.contains("NOT CHECKED"), "{}", out.stdout);
    // Attest is a use of the key: on the audit log as such.
    assert!(d
        .audit_requests()
        .iter()
        .any(|r| r["op"] == "AttestKey" && r["target"] == "tpm-ec" && r["result"] == "ok"));
}

/// A TPM that holds its endorsement key certificate in NV (as one from a maker does): the
/// attestation carries it, OpenSSL reads it as an X.509 certificate, `attest -o` prints it,
/// and the document still verifies.
#[test]
fn the_ek_certificate_comes_with_the_attestation_where_the_tpm_has_one() {
    let tpm = Swtpm::start_with_ek_certificate();
    let token = SoftHsm::new("keyward-attest-ek");
    let daemon = Setup::new().tpm("tpm", &tpm).token("hsm", &token).start();
    daemon.json(&["init", "--pkcs11", "hsm"]);
    let w = World {
        _tpm: tpm,
        _token: token,
        daemon,
        dir: tempfile::tempdir().unwrap(),
    };
    create(&w.daemon, "tpm-ec", "tpm", "ecdsa-p256");
    let (path, doc) = attest(&w, "tpm-ec");
    assert_eq!(doc.ek_certificates.len(), 1, "{doc:?}");
    let cert = w.dir.path().join("ek.der");
    std::fs::write(&cert, &doc.ek_certificates[0].0).unwrap();
    let out = Command::new("openssl")
        .args(["x509", "-inform", "DER", "-noout", "-text", "-in"])
        .arg(&cert)
        .output()
        .unwrap();
    assert!(out.status.success(), "openssl x509: {out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("rsaEncryption"),
        "{out:?}"
    );
    assert_eq!(verify(&w.daemon, &path, &["--nonce", NONCE]).0, 0);
    let out = w.daemon.run(
        &[
            "key",
            "attest",
            "tpm-ec",
            "-o",
            w.dir.path().join("again.json").to_str().unwrap(),
        ],
        b"",
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stdout
            .contains("EK certificate:\n-----BEGIN CERTIFICATE-----"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("-----BEGIN PUBLIC KEY-----"),
        "{}",
        out.stdout
    );
}

/// Attesting is a use of the key: a caller with only `keys` on it (create, delete) is refused
/// with `PermissionDenied`, and the refusal is on the audit log; one with `sign` gets the
/// document. A nonce longer than 64 bytes is refused before the device is asked.
#[test]
fn attesting_needs_the_sign_right_and_a_bounded_nonce() {
    const NOBODY: u32 = 65534;
    let tpm = Swtpm::start();
    let token = SoftHsm::new("keyward-attest-policy");
    let d = Setup::new()
        .tpm("tpm", &tpm)
        .token("hsm", &token)
        .public_socket()
        .policy(&format!(
            "{}\n[[rule]]\nwho = {{ uid = {NOBODY} }}\nallow = [\"keys\"]\nkeys = [\"managed\"]\n\
             [[rule]]\nwho = {{ uid = {NOBODY} }}\nallow = [\"sign\"]\nkeys = [\"used\"]\n",
            keyward_tests::keywardd::ROOT_ADMIN_POLICY
        ))
        .start();
    d.json(&["init", "--pkcs11", "hsm"]);
    create(&d, "managed", "tpm", "ecdsa-p256");
    create(&d, "used", "tpm", "ecdsa-p256");
    let as_nobody = |name: &str| {
        let mut cmd = keyward_tests::as_uid(NOBODY, keyward_tests::keywardd::bin("keyward"));
        cmd.arg("--socket")
            .arg(d.socket())
            .args(["--json", "key", "attest", name]);
        keyward_tests::keywardd::run_cli(&mut cmd, b"")
    };
    let out = as_nobody("managed");
    assert_eq!(out.code, 1, "{}{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("PermissionDenied"), "{}", out.stdout);
    assert!(d.audit_requests().iter().any(|r| r["op"] == "AttestKey"
        && r["target"] == "managed"
        && r["result"] == "PermissionDenied"));
    let out = as_nobody("used");
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    let doc: Attestation = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(doc.nonce.0.len(), 32, "a random nonce when none is given");

    let long = "ab".repeat(65);
    let out = d.run(&["key", "attest", "used", "--nonce", &long], b"");
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(out.stderr.contains("1 to 64 bytes"), "{}", out.stderr);
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// A key the TPM did not generate — a software P-256 key put into the TPM with
/// TPM2_LoadExternal — certified by the very attestation key Keyward uses: the TPM signs that
/// it holds it, but its public area says fixedTPM, fixedParent and sensitiveDataOrigin are
/// clear, and the verifier (library and CLI) refuses it.
#[test]
fn a_key_loaded_into_the_tpm_from_outside_is_rejected() {
    use tss_esapi::attributes::ObjectAttributesBuilder;
    use tss_esapi::interface_types::algorithm::{HashingAlgorithm, PublicAlgorithm};
    use tss_esapi::interface_types::ecc::EccCurve;
    use tss_esapi::interface_types::resource_handles::Hierarchy;
    use tss_esapi::interface_types::session_handles::AuthSession;
    use tss_esapi::structures::{
        Auth, Data, Digest, EccParameter, EccPoint, EccScheme, HashScheme, PublicBuilder,
        PublicEccParametersBuilder, Sensitive, Signature, SignatureScheme,
    };
    use tss_esapi::tcti_ldr::TctiNameConf;
    use tss_esapi::traits::Marshall;

    let swtpm = Swtpm::start();
    let mut ctx = tss_esapi::Context::new(swtpm.tcti().parse::<TctiNameConf>().unwrap()).unwrap();

    // The software key, and its public area as LoadExternal needs it (an object with a
    // private part from outside can't claim fixedTPM, fixedParent or sensitiveDataOrigin).
    let software = p256::SecretKey::from_slice(&[0x42; 32]).unwrap();
    let point =
        p256::elliptic_curve::sec1::ToEncodedPoint::to_encoded_point(&software.public_key(), false);
    let attributes = ObjectAttributesBuilder::new()
        .with_user_with_auth(true)
        .with_sign_encrypt(true)
        .build()
        .unwrap();
    let public = PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Ecc)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attributes)
        .with_ecc_parameters(
            PublicEccParametersBuilder::new_unrestricted_signing_key(
                EccScheme::EcDsa(HashScheme::new(HashingAlgorithm::Sha256)),
                EccCurve::NistP256,
            )
            .build()
            .unwrap(),
        )
        .with_ecc_unique_identifier(EccPoint::new(
            EccParameter::try_from(point.x().unwrap().to_vec()).unwrap(),
            EccParameter::try_from(point.y().unwrap().to_vec()).unwrap(),
        ))
        .build()
        .unwrap();
    let sensitive = Sensitive::Ecc {
        auth_value: Auth::default(),
        seed_value: Digest::default(),
        sensitive: EccParameter::try_from(software.to_bytes().to_vec()).unwrap(),
    };
    let key = ctx
        .execute_without_session(|c| c.load_external(sensitive, public.clone(), Hierarchy::Null))
        .unwrap();

    // Keyward's attestation key, from Keyward's template, certifies it.
    let ak = ctx
        .execute_with_session(Some(AuthSession::Password), |c| {
            c.create_primary(
                Hierarchy::Endorsement,
                hsm_shim::tpm::template::attestation_key().unwrap(),
                None,
                None,
                None,
                None,
            )
        })
        .unwrap();
    let nonce = hex(NONCE);
    let (attest, signature) = ctx
        .execute_with_sessions(
            (
                Some(AuthSession::Password),
                Some(AuthSession::Password),
                None,
            ),
            |c| {
                c.certify(
                    key.into(),
                    ak.key_handle,
                    Data::try_from(nonce.clone()).unwrap(),
                    SignatureScheme::EcDsa {
                        hash_scheme: HashScheme::new(HashingAlgorithm::Sha256),
                    },
                )
            },
        )
        .unwrap();
    let Signature::EcDsa(sig) = signature else {
        panic!("{signature:?}")
    };
    let pad = |v: &[u8]| {
        let mut out = [0u8; 32];
        out[32 - v.len()..].copy_from_slice(v);
        out
    };
    let sig = p256::ecdsa::Signature::from_scalars(
        pad(sig.signature_r().value()),
        pad(sig.signature_s().value()),
    )
    .unwrap();
    let spki = |k: p256::PublicKey| {
        p256::pkcs8::EncodePublicKey::to_public_key_der(&k)
            .unwrap()
            .as_bytes()
            .to_vec()
    };
    let Tss::Ecc { unique, .. } = &ak.out_public else {
        panic!("the AK is not ECC")
    };
    let mut ak_point = vec![0x04];
    ak_point.extend_from_slice(&pad(unique.x().value()));
    ak_point.extend_from_slice(&pad(unique.y().value()));
    let doc = Attestation {
        format: Format::Tpm2Certify,
        key: "imported".into(),
        device: "tpm".into(),
        algorithm: keyward::api::KeyAlgorithm::EcdsaP256,
        public_key: Bytes(spki(software.public_key())),
        nonce: Bytes(nonce.clone()),
        signer_public_key: Bytes(spki(p256::PublicKey::from_sec1_bytes(&ak_point).unwrap())),
        signature: Bytes(sig.to_der().as_bytes().to_vec()),
        attest: Some(Bytes(attest.marshall().unwrap())),
        key_public_area: Some(Bytes(public.marshall().unwrap())),
        signer_public_area: Some(Bytes(ak.out_public.marshall().unwrap())),
        ek_certificates: vec![],
        attributes: None,
        note: attestation::TPM_NOTE.into(),
    };
    // The TPM did sign it (OpenSSL agrees), and the name is the key's: only the attributes
    // give it away.
    let dir = tempfile::tempdir().unwrap();
    openssl_verifies(dir.path(), &doc);
    assert_eq!(
        attestation::verify(&doc, Some(&nonce), None, None),
        Err(AttestationError::NotDeviceBound(
            "fixedTPM, fixedParent, sensitiveDataOrigin clear in the key's public area".into()
        ))
    );

    // And the CLI, offline (no daemon: the socket does not exist).
    let file = write_doc(dir.path(), "imported.json", &doc);
    let out = keyward_tests::keywardd::run_cli(
        Command::new(keyward_tests::keywardd::bin("keyward"))
            .args([
                "--socket",
                "/nonexistent",
                "--json",
                "key",
                "verify-attestation",
            ])
            .arg(&file)
            .args(["--nonce", NONCE]),
        b"",
    );
    assert_eq!(out.code, 1, "{}{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("sensitiveDataOrigin"), "{}", out.stdout);
}

/// A PKCS#11 key's attestation carries the token's attributes, verifies with the audit key
/// `keyward status` shows, says plainly that it is no hardware attestation, and fails when an
/// attribute or the key's name is edited, or when another signer is pinned.
#[test]
fn a_pkcs11_attestation_verifies_with_the_audit_key_and_fails_when_edited() {
    let w = world();
    let d = &w.daemon;
    create(d, "hsm-ed", "hsm", "ed25519");
    let (path, doc) = attest(&w, "hsm-ed");
    assert_eq!(doc.format, Format::Pkcs11Attributes);
    let a = doc.attributes.unwrap();
    assert!(a.local && a.never_extractable && a.always_sensitive && a.sensitive && !a.extractable);
    assert!(
        doc.note.contains("not a hardware attestation"),
        "{}",
        doc.note
    );
    let audit_key = d.json(&["status"])["audit_public_key"]
        .as_str()
        .unwrap()
        .to_owned();
    let (code, v) = verify(d, &path, &["--nonce", NONCE, "--signer", &audit_key]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["verified"]["hardware"], false, "{v}");

    let mut bad = doc.clone();
    bad.attributes = Some(attestation::Pkcs11Attributes { local: false, ..a });
    let edited = write_doc(w.dir.path(), "edited.json", &bad);
    let (code, v) = verify(d, &edited, &["--signer", &audit_key]);
    assert_eq!(code, 1, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("signature does not verify"),
        "{v}"
    );
    let mut bad = doc.clone();
    bad.key = "hsm-other".into();
    let renamed = write_doc(w.dir.path(), "renamed.json", &bad);
    assert_eq!(verify(d, &renamed, &[]).0, 1);

    // A TPM attestation's signer is not the audit key.
    create(d, "tpm-ec", "tpm", "ecdsa-p256");
    let (_, tpm_doc) = attest(&w, "tpm-ec");
    let tpm_signer = B64.encode(&tpm_doc.signer_public_key.0);
    assert_eq!(verify(d, &path, &["--signer", &tpm_signer]).0, 1);
}

/// `keyward status` says what each device creates, probed from the device: the TPM makes
/// ECDSA P-256 and RSA-PSS (swtpm has RSA 2048 and 3072) but not Ed25519; the token all
/// four. A TPM RSA-PSS key signs what OpenSSL verifies, and attests like the others; Ed25519
/// on the TPM is refused with what it does make.
#[test]
fn status_lists_what_each_device_creates_and_tpm_rsa_pss_keys_sign_and_attest() {
    let w = world();
    let d = &w.daemon;
    let status = d.json(&["status"]);
    let algorithms = |name: &str| -> Vec<String> {
        status["devices"]
            .as_array()
            .unwrap()
            .iter()
            .find(|dev| dev["name"] == name)
            .unwrap()["algorithms"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(
        algorithms("tpm"),
        [
            "ecdsa-p256",
            "rsa-pss-3072",
            "rsa-pkcs1-3072",
            "rsa-pss-2048"
        ],
        "{status}"
    );
    assert_eq!(
        algorithms("hsm"),
        [
            "ed25519",
            "ecdsa-p256",
            "rsa-pss-3072",
            "rsa-pkcs1-3072",
            "rsa-pss-2048"
        ],
        "{status}"
    );
    let text = d.run(&["status"], b"").stdout;
    assert!(
        text.contains("ecdsa-p256,rsa-pss-3072,rsa-pkcs1-3072,rsa-pss-2048"),
        "{text}"
    );

    create(d, "tpm-rsa", "tpm", "rsa-pss-2048");
    let public = d.json(&["key", "public", "tpm-rsa"])["public_key"]
        .as_str()
        .unwrap()
        .to_owned();
    let public = hsm_shim::PublicKeyDer(B64.decode(public).unwrap());
    let message = b"signed by an RSA-PSS key inside the TPM";
    let file = w.dir.path().join("message");
    std::fs::write(&file, message).unwrap();
    let signature = d.json(&["key", "sign", "tpm-rsa", "--file", file.to_str().unwrap()])
        ["signature"]
        .as_str()
        .unwrap()
        .to_owned();
    let signature = B64.decode(signature).unwrap();
    assert_eq!(signature.len(), 256);
    keyward_tests::openssl::verify(
        &public,
        hsm_shim::KeyAlgorithm::RsaPss2048,
        message,
        &signature,
    )
    .unwrap();
    let (path, doc) = attest(&w, "tpm-rsa");
    assert_eq!(doc.algorithm, keyward::api::KeyAlgorithm::RsaPss2048);
    let (code, v) = verify(d, &path, &["--nonce", NONCE]);
    assert_eq!(code, 0, "{v}");

    let out = d.run(
        &[
            "key",
            "create",
            "tpm-ed",
            "--device",
            "tpm",
            "--algorithm",
            "ed25519",
        ],
        b"",
    );
    assert_ne!(out.code, 0);
    assert!(
        out.stderr.contains("ed25519") && out.stderr.contains("ecdsa-p256"),
        "{}",
        out.stderr
    );
}
