//! Signed PCR policies end to end, against systemd's own tool: `systemd-measure sign` (systemd
//! 252) signs the PCR 11 values of a unified kernel image with a vendor's RSA key, tpm2-tools
//! extends swtpm's PCR 11 the way systemd-stub does at boot, and the real keywardd unseals
//! unattended through the signature; survives an update (new values, a new signature, no
//! re-enrollment); and stays sealed, saying why, when the values are not signed, the signature
//! file is missing, or the signatures are another key's. Recovery shares still open it, and a
//! rekey keeps the slot's signed policy. At the device layer, the signed part combines with
//! the literal PCRs and a PIN.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use hsm_shim::tpm::{TpmConfig, TpmDevice};
use hsm_shim::{DeviceError, Pin, SealPolicy, SealedBlob, Sealer as _, SecretBytes};
use keyward_tests::keywardd::{Keywardd, Setup};
use keyward_tests::swtpm::Swtpm;
use keyward_tests::uki::{keypair, Uki, PHASES};

/// The secret the vault holds through every boot.
const SECRET: &[u8] = b"db-password-0451";

/// The sha256 entry of a signature for the running system (the last of its four boot phases,
/// `enter-initrd:leave-initrd:sysinit:ready`): (`pol`, `pkfp`).
fn entry(signature: &serde_json::Value) -> (String, String) {
    let entries = signature["sha256"].as_array().unwrap();
    assert_eq!(
        entries.len(),
        PHASES.len(),
        "one entry per boot phase: {signature}"
    );
    let e = entries.last().unwrap();
    assert_eq!(e["pcrs"], serde_json::json!([11]), "{signature}");
    (
        e["pol"].as_str().unwrap().to_owned(),
        e["pkfp"].as_str().unwrap().to_owned(),
    )
}

fn status(d: &Keywardd) -> serde_json::Value {
    d.json(&["status"])
}

fn secret(d: &Keywardd) -> Vec<u8> {
    let out = d.run(&["secret", "get", "app/db"], b"");
    assert_eq!(out.code, 0, "get: {}", out.stderr);
    out.stdout_bytes
}

/// The vault is open, by the signed policy `pol` (its first 12 hex digits are in the status).
fn assert_unsealed_by(d: &Keywardd, pol: &str) {
    let s = status(d);
    assert_eq!(s["sealed"], false, "{s}");
    let by = s["unsealed_by"].as_str().unwrap();
    assert!(by.contains("tpm2 on tpm"), "{by}");
    assert!(
        by.contains(&format!("PCR 11 policy {}", &pol[..12])),
        "the status names the signed policy that matched: {by}"
    );
    assert!(
        d.statuses()
            .iter()
            .any(|l| l.starts_with("unsealed by") && l.contains(&pol[..12])),
        "STATUS= names it too: {:?}",
        d.statuses()
    );
    assert_eq!(secret(d), SECRET);
}

/// The vault stayed sealed, and the status and STATUS= say `why`.
fn assert_sealed_because(d: &Keywardd, why: &str) {
    let s = status(d);
    assert_eq!(s["sealed"], true, "{s}");
    let reason = s["reason"].as_str().unwrap();
    assert!(reason.contains(why), "reason {reason:?} lacks {why:?}");
    assert!(
        d.statuses().iter().any(|l| l.contains(why)),
        "STATUS= lacks {why:?}: {:?}",
        d.statuses()
    );
}

#[test]
fn signed_pcr11_policy_unseals_survives_an_update_and_refuses_unsigned_values() {
    let dir = tempfile::tempdir().unwrap();
    let mut swtpm = Swtpm::start();
    let vendor = keypair(dir.path(), "vendor");
    let shipped = Uki::new(dir.path(), "6.1.0-1");
    let update = Uki::new(dir.path(), "6.1.0-2");
    let unsigned = Uki::new(dir.path(), "6.1.0-custom");
    let (pol_1, pkfp) = entry(&shipped.sign(&swtpm, &vendor, &dir.path().join("1.json")));
    let (pol_2, _) = entry(&update.sign(&swtpm, &vendor, &dir.path().join("2.json")));
    assert_ne!(pol_1, pol_2);

    // Where systemd-stub would put the running image's signature.
    let signature = dir.path().join("tpm2-pcr-signature.json");
    std::fs::copy(dir.path().join("1.json"), &signature).unwrap();
    shipped.boot(&mut swtpm);
    let mut d = Setup::new()
        .tpm_with(
            "tpm",
            &swtpm,
            &format!("pcr_signature = {:?}", signature.display().to_string()),
        )
        .start();
    let out = d.json(&[
        "init",
        "--tpm2",
        "tpm",
        "--pcr-public-key",
        vendor.1.to_str().unwrap(),
        "--recovery",
        "2/3",
    ]);
    let shares: Vec<String> = out["recovery_shares"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_owned())
        .collect();
    let slot = &out["keyslots"][0];
    assert_eq!(slot["kind"], "tpm2", "{out}");
    assert_eq!(slot["signed_pcrs"], serde_json::json!([11]), "{out}");
    assert_eq!(
        slot["pcrs"],
        serde_json::json!([7]),
        "the literal PCRs stay"
    );
    assert_eq!(
        slot["pcr_public_key"], pkfp,
        "the slot shows the key by systemd's own fingerprint"
    );
    let out = d.run(&["secret", "put", "app/db"], SECRET);
    assert_eq!(out.code, 0, "{}", out.stderr);

    // A reboot into the same image: unattended, by the signature.
    d.stop();
    shipped.boot(&mut swtpm);
    d.start();
    assert_unsealed_by(&d, &pol_1);

    // The update: new PCR 11 values and the new image's signature, no re-enrollment.
    d.stop();
    update.boot(&mut swtpm);
    std::fs::copy(dir.path().join("2.json"), &signature).unwrap();
    d.start();
    assert_unsealed_by(&d, &pol_2);

    // An image nobody signed: sealed, saying so; recovery shares open it.
    d.stop();
    unsigned.boot(&mut swtpm);
    d.start();
    assert_sealed_because(&d, "no entry for the current PCR 11 values");
    let out = d.run(
        &["unseal"],
        format!("{}\n{}\n", shares[0], shares[2]).as_bytes(),
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(secret(&d), SECRET);
}

#[test]
fn a_missing_signature_file_or_another_keys_signature_keeps_it_sealed_and_says_which() {
    let dir = tempfile::tempdir().unwrap();
    let mut swtpm = Swtpm::start();
    let vendor = keypair(dir.path(), "vendor");
    let stranger = keypair(dir.path(), "stranger");
    let uki = Uki::new(dir.path(), "6.1.0-1");
    uki.sign(&swtpm, &vendor, &dir.path().join("vendor.json"));
    uki.sign(&swtpm, &stranger, &dir.path().join("stranger.json"));
    let signature = dir.path().join("tpm2-pcr-signature.json");
    std::fs::copy(dir.path().join("vendor.json"), &signature).unwrap();
    uki.boot(&mut swtpm);
    let mut d = Setup::new()
        .tpm_with(
            "tpm",
            &swtpm,
            &format!("pcr_signature = {:?}", signature.display().to_string()),
        )
        .start();
    d.json(&["init", "--recovery", "1/1"]);

    // A key whose signatures are not there for the current values: the enrollment's test
    // unseal fails, and says why.
    let enroll = |key: &std::path::Path| {
        d.run(
            &[
                "enroll",
                "tpm2",
                "--device",
                "tpm",
                "--pcr-public-key",
                key.to_str().unwrap(),
            ],
            b"",
        )
    };
    let out = enroll(&stranger.1);
    assert_ne!(out.code, 0, "{}", out.stdout);
    assert!(
        out.stderr.contains("the new keyslot does not open now")
            && out.stderr.contains("signed by another key"),
        "{}",
        out.stderr
    );
    let out = enroll(&vendor.1);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let out = d.run(&["secret", "put", "app/db"], SECRET);
    assert_eq!(out.code, 0, "{}", out.stderr);

    d.stop();
    std::fs::remove_file(&signature).unwrap();
    uki.boot(&mut swtpm);
    d.start();
    assert_sealed_because(
        &d,
        &format!("no PCR signature file (looked for {})", signature.display()),
    );

    d.stop();
    std::fs::copy(dir.path().join("stranger.json"), &signature).unwrap();
    d.start();
    assert_sealed_because(&d, "signed by another key");

    // The vendor's signature back in place: it opens again, nothing re-enrolled.
    d.stop();
    std::fs::copy(dir.path().join("vendor.json"), &signature).unwrap();
    d.start();
    let s = status(&d);
    assert_eq!(s["sealed"], false, "{s}");
    assert!(
        s["unsealed_by"]
            .as_str()
            .unwrap()
            .contains("signed PCR policy"),
        "{s}"
    );
    assert_eq!(secret(&d), SECRET);

    // A rekey re-seals the slot with its signed policy (not just its literal PCR 7, which
    // would open too, and silently lose the binding to the vendor's key).
    let out = d.json(&["rekey"]);
    let share = out["recovery_shares"][0].as_str().unwrap().to_owned();
    let out = d.run(
        &["--json", "confirm-recovery"],
        format!("{share}\n").as_bytes(),
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stdout.contains("\"rekeyed\": true"), "{}", out.stdout);
    let slots = d.json(&["keyslot", "list"]);
    let tpm = slots["keyslots"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kind"] == "tpm2")
        .unwrap_or_else(|| panic!("{slots}"));
    assert_eq!(tpm["signed_pcrs"], serde_json::json!([11]), "{slots}");
    d.stop();
    std::fs::copy(dir.path().join("stranger.json"), &signature).unwrap();
    d.start();
    assert_sealed_because(&d, "signed by another key");
    d.stop();
    std::fs::copy(dir.path().join("vendor.json"), &signature).unwrap();
    d.start();
    assert_eq!(secret(&d), SECRET);
}

/// The device layer alone: the signed part of a policy runs first and the literal PCRs and the
/// PIN still hold after it: the right signature with a changed PCR 7 or a wrong PIN does not
/// open the object; a PCR can't be literal and signed at once.
#[test]
fn a_signed_policy_combines_with_literal_pcrs_and_a_pin() {
    let dir = tempfile::tempdir().unwrap();
    let mut swtpm = Swtpm::start();
    let vendor = keypair(dir.path(), "vendor");
    let uki = Uki::new(dir.path(), "6.1.0-1");
    let signature = dir.path().join("tpm2-pcr-signature.json");
    let (pol, _) = entry(&uki.sign(&swtpm, &vendor, &signature));
    uki.boot(&mut swtpm);
    let open = |swtpm: &Swtpm| {
        TpmDevice::open(TpmConfig {
            pcr_signature: Some(signature.clone()),
            ..TpmConfig::new(swtpm.tcti().parse().unwrap())
        })
        .unwrap()
    };
    let pem = std::fs::read_to_string(&vendor.1).unwrap();
    let pin = Pin::new("4711").unwrap();
    let secret = SecretBytes::new(SECRET.to_vec());
    let policy = SealPolicy {
        pcrs: None,
        pin: Some(Pin::new("4711").unwrap()),
        signed: Some(hsm_shim::tpm::signed_pcrs(&pem, None).unwrap()),
    };
    let mut tpm = open(&swtpm);
    let blob = tpm.seal(&secret, b"ctx", &policy).unwrap();
    let SealedBlob::Tpm2 { pcrs, signed, .. } = &blob else {
        panic!("{blob:?}")
    };
    assert_eq!(pcrs, &[7], "the device's literal PCRs stay");
    assert_eq!(signed.as_ref().unwrap().pcrs, [11]);

    let (back, note) = tpm.unseal_noting(&blob, b"ctx", Some(&pin)).unwrap();
    assert_eq!(back.expose(), SECRET);
    let note = note.unwrap();
    assert!(note.contains(&pol[..12]), "{note}");
    let wrong = tpm
        .unseal(&blob, b"ctx", Some(&Pin::new("0000").unwrap()))
        .unwrap_err();
    assert!(
        matches!(wrong, DeviceError::PinIncorrect { .. }),
        "{wrong:?}"
    );

    let both = SealPolicy {
        pcrs: Some(vec![7, 11]),
        pin: None,
        signed: Some(hsm_shim::tpm::signed_pcrs(&pem, None).unwrap()),
    };
    let err = tpm.seal(&secret, b"ctx", &both).unwrap_err();
    assert!(
        matches!(&err, DeviceError::InvalidArgument(why) if why.contains("both a literal and a signed")),
        "{err:?}"
    );
    drop(tpm);

    // PCR 11 still as signed, PCR 7 changed: the literal part refuses.
    swtpm.extend_pcr(7);
    let err = open(&swtpm).unseal(&blob, b"ctx", Some(&pin)).unwrap_err();
    assert!(matches!(err, DeviceError::PolicyMismatch), "{err:?}");
}
