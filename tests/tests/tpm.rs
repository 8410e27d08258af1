//! The TPM backend against a real swtpm: sealing, PCR and PIN policy, tamper and context checks,
//! ECDSA P-256 signing verified by two independent implementations, restart, and a vanished TPM.
//! One swtpm per test (nextest runs each test in its own process).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use hsm_shim::tpm::{Tcti, TpmConfig, TpmDevice};
use hsm_shim::{
    Device, DeviceError, DeviceKind, KeyAlgorithm, KeyHandle, KeySpec, Pin, SealPolicy, SealedBlob,
    Sealer, SecretBytes, SignInput, Signer,
};
use keyward_tests::swtpm::{Swtpm, Wiretap};
use p256::ecdsa::signature::Verifier;
use p256::pkcs8::DecodePublicKey;
use sha2::Digest;

const CONTEXT: &[u8] = b"keyslot 0 of vault 1";

fn open(swtpm: &Swtpm) -> TpmDevice {
    TpmDevice::open(TpmConfig {
        tcti: swtpm.tcti().parse().unwrap(),
        pcrs: vec![7],
        pcr_signature: None,
    })
    .unwrap()
}

fn secret() -> SecretBytes {
    SecretBytes::new((0u8..32).map(|i| i.wrapping_mul(37)).collect())
}

/// `blob` unseals on `tpm` (with `pin`) to [`secret`].
fn assert_unseals(tpm: &mut TpmDevice, blob: &SealedBlob, pin: Option<&Pin>) {
    assert_eq!(
        tpm.unseal(blob, CONTEXT, pin).unwrap().expose(),
        secret().expose()
    );
}

fn p256_key(tpm: &mut TpmDevice) -> KeyHandle {
    tpm.generate(&KeySpec {
        label: "test".into(),
        algorithm: KeyAlgorithm::EcdsaP256,
        id: None,
    })
    .unwrap()
}

/// Check a DER ECDSA signature with the p256 crate and with the openssl CLI.
fn verify_both(tpm: &mut TpmDevice, key: &KeyHandle, message: &[u8], signature: &[u8]) {
    let spki = tpm.public_key(key).unwrap();
    let vk = p256::ecdsa::VerifyingKey::from_public_key_der(&spki.0).unwrap();
    let sig = p256::ecdsa::Signature::from_der(signature).unwrap();
    vk.verify(message, &sig).unwrap();
    keyward_tests::openssl::verify(&spki, KeyAlgorithm::EcdsaP256, message, signature).unwrap();
}

#[test]
fn seal_unseal_round_trip() {
    let swtpm = Swtpm::start();
    let mut tpm = open(&swtpm);
    let blob = tpm
        .seal(&secret(), CONTEXT, &SealPolicy::default())
        .unwrap();
    let SealedBlob::Tpm2 { pcrs, pin, .. } = &blob else {
        panic!("{blob:?}")
    };
    assert_eq!(pcrs, &[7]);
    assert!(!pin);
    let out = tpm.unseal(&blob, CONTEXT, None).unwrap();
    assert_eq!(out.expose(), secret().expose());
    // Unseal is repeatable: nothing is consumed.
    assert_unseals(&mut tpm, &blob, None);
}

#[test]
fn secret_size_is_bounded() {
    let swtpm = Swtpm::start();
    let mut tpm = open(&swtpm);
    let policy = SealPolicy::default();
    for n in [0, hsm_shim::MAX_SEALED_SECRET + 1] {
        let err = tpm
            .seal(&SecretBytes::new(vec![1; n]), CONTEXT, &policy)
            .unwrap_err();
        assert!(
            matches!(err, DeviceError::InvalidArgument(_)),
            "{n} bytes: {err:?}"
        );
    }
    let max = SecretBytes::new(vec![0xa5; hsm_shim::MAX_SEALED_SECRET]);
    let blob = tpm.seal(&max, CONTEXT, &policy).unwrap();
    assert_eq!(
        tpm.unseal(&blob, CONTEXT, None).unwrap().expose(),
        max.expose()
    );
}

#[test]
fn sealed_blob_survives_swtpm_restart() {
    let mut swtpm = Swtpm::start();
    let blob = {
        let mut tpm = open(&swtpm);
        tpm.seal(&secret(), CONTEXT, &SealPolicy::default())
            .unwrap()
    };
    swtpm.restart();
    let mut tpm = open(&swtpm);
    assert_unseals(&mut tpm, &blob, None);
}

#[test]
fn extending_pcr7_after_sealing_is_policy_mismatch() {
    let swtpm = Swtpm::start();
    let blob = open(&swtpm)
        .seal(&secret(), CONTEXT, &SealPolicy::default())
        .unwrap();
    // The device is dropped: swtpm serves one client at a time.
    swtpm.extend_pcr(7);
    let mut tpm = open(&swtpm);
    let err = tpm.unseal(&blob, CONTEXT, None).unwrap_err();
    assert!(matches!(err, DeviceError::PolicyMismatch), "{err:?}");
    // A fresh seal binds to the new value and works.
    let blob = tpm
        .seal(&secret(), CONTEXT, &SealPolicy::default())
        .unwrap();
    assert_unseals(&mut tpm, &blob, None);
}

#[test]
fn only_the_chosen_pcrs_matter() {
    let swtpm = Swtpm::start();
    let policy = SealPolicy {
        pcrs: Some(vec![16, 0]),
        pin: None,
        signed: None,
    };
    let blob = open(&swtpm).seal(&secret(), CONTEXT, &policy).unwrap();
    let SealedBlob::Tpm2 { pcrs, .. } = &blob else {
        panic!()
    };
    assert_eq!(pcrs, &[0, 16], "stored sorted");
    swtpm.extend_pcr(7);
    assert_unseals(&mut open(&swtpm), &blob, None);
    swtpm.extend_pcr(16);
    let err = open(&swtpm).unseal(&blob, CONTEXT, None).unwrap_err();
    assert!(matches!(err, DeviceError::PolicyMismatch), "{err:?}");

    let mut tpm = open(&swtpm);
    for bad in [vec![], vec![24], vec![3, 3]] {
        let policy = SealPolicy {
            pcrs: Some(bad.clone()),
            pin: None,
            signed: None,
        };
        let err = tpm.seal(&secret(), CONTEXT, &policy).unwrap_err();
        assert!(
            matches!(err, DeviceError::InvalidArgument(_)),
            "{bad:?}: {err:?}"
        );
    }
}

#[test]
fn pin_right_unseals_wrong_is_pin_incorrect_missing_is_rejected() {
    let swtpm = Swtpm::start();
    let mut tpm = open(&swtpm);
    let policy = SealPolicy {
        pcrs: None,
        pin: Some(Pin::new("4711-correct").unwrap()),
        signed: None,
    };
    let blob = tpm.seal(&secret(), CONTEXT, &policy).unwrap();
    let SealedBlob::Tpm2 { pin, .. } = &blob else {
        panic!()
    };
    assert!(pin);

    let right = Pin::new("4711-correct").unwrap();
    assert_unseals(&mut tpm, &blob, Some(&right));

    let err = tpm.unseal(&blob, CONTEXT, None).unwrap_err();
    assert!(
        matches!(&err, DeviceError::InvalidArgument(m) if m.contains("needs a PIN")),
        "{err:?}"
    );

    let wrong = Pin::new("0000").unwrap();
    let first = match tpm.unseal(&blob, CONTEXT, Some(&wrong)).unwrap_err() {
        DeviceError::PinIncorrect { retries_left } => retries_left,
        other => panic!("wrong PIN gave {other:?}"),
    };
    eprintln!("after one wrong PIN: retries_left = {first:?}");
    let first = first.expect("the TPM reports its dictionary-attack counter");
    // The PIN-protected object counts towards dictionary-attack lockout (no `noDA`).
    let second = match tpm.unseal(&blob, CONTEXT, Some(&wrong)).unwrap_err() {
        DeviceError::PinIncorrect { retries_left } => retries_left.unwrap(),
        DeviceError::PinLocked => 0,
        other => panic!("wrong PIN gave {other:?}"),
    };
    assert_eq!(second, first - 1, "each wrong PIN burns one try");

    let long = Pin::new("x".repeat(33)).unwrap();
    let err = tpm.seal(
        &secret(),
        CONTEXT,
        &SealPolicy {
            pcrs: None,
            pin: Some(long),
            signed: None,
        },
    );
    assert!(
        matches!(err, Err(DeviceError::InvalidArgument(_))),
        "{err:?}"
    );
}

#[test]
fn wrong_pins_until_lockout_give_pin_locked() {
    let swtpm = Swtpm::start();
    let mut tpm = open(&swtpm);
    let policy = SealPolicy {
        pcrs: None,
        pin: Some(Pin::new("right").unwrap()),
        signed: None,
    };
    let blob = tpm.seal(&secret(), CONTEXT, &policy).unwrap();
    let wrong = Pin::new("wrong").unwrap();
    let mut seen = Vec::new();
    loop {
        match tpm.unseal(&blob, CONTEXT, Some(&wrong)).unwrap_err() {
            DeviceError::PinIncorrect { retries_left } => seen.push(retries_left.unwrap()),
            DeviceError::PinLocked => break,
            other => panic!("{other:?} after {seen:?}"),
        }
        assert!(seen.len() < 100, "no lockout after {seen:?}");
    }
    eprintln!("retries_left sequence before lockout: {seen:?}");
    assert_eq!(seen.last(), Some(&0));
    // Locked out, even the right PIN is refused without being tried.
    let right = Pin::new("right").unwrap();
    let err = tpm.unseal(&blob, CONTEXT, Some(&right)).unwrap_err();
    assert!(matches!(err, DeviceError::PinLocked), "{err:?}");
    // A PIN-less object has noDA: lockout does not lock it.
    let free = tpm
        .seal(&secret(), CONTEXT, &SealPolicy::default())
        .unwrap();
    assert_unseals(&mut tpm, &free, None);
}

#[test]
fn other_context_is_invalid_blob() {
    let swtpm = Swtpm::start();
    let mut tpm = open(&swtpm);
    let blob = tpm
        .seal(&secret(), CONTEXT, &SealPolicy::default())
        .unwrap();
    let err = tpm
        .unseal(&blob, b"keyslot 1 of vault 1", None)
        .unwrap_err();
    assert!(matches!(err, DeviceError::InvalidBlob(_)), "{err:?}");
}

#[test]
fn tampered_blobs_are_invalid_blob() {
    let swtpm = Swtpm::start();
    let mut tpm = open(&swtpm);
    let blob = tpm
        .seal(&secret(), CONTEXT, &SealPolicy::default())
        .unwrap();
    let SealedBlob::Tpm2 {
        public,
        private,
        pcrs,
        pin,
        ..
    } = blob.clone()
    else {
        panic!()
    };

    let mut cases = Vec::new();
    // A flipped bit in the encrypted sensitive area (TPM_RC_INTEGRITY at load).
    let mut p = private.clone();
    let last = p.len() - 1;
    p[last] ^= 1;
    cases.push(("private last byte", public.clone(), p));
    // A flipped bit in the integrity HMAC itself.
    let mut p = private.clone();
    p[4] ^= 0x80;
    cases.push(("private HMAC", public.clone(), p));
    // Truncated and oversized private parts.
    cases.push((
        "private truncated",
        public.clone(),
        private[..private.len() / 2].to_vec(),
    ));
    cases.push(("private oversized", public.clone(), vec![0; 4096]));
    // A changed public area (its name no longer matches the private part's binding).
    let mut q = public.clone();
    let last = q.len() - 1;
    q[last] ^= 1;
    cases.push(("public last byte", q, private.clone()));
    cases.push(("public garbage", vec![0xff; 7], private.clone()));

    for (what, public, private) in cases {
        let bad = SealedBlob::Tpm2 {
            public,
            private,
            pcrs: pcrs.clone(),
            pin,
            signed: None,
        };
        let err = tpm.unseal(&bad, CONTEXT, None).unwrap_err();
        assert!(
            matches!(err, DeviceError::InvalidBlob(_)),
            "{what}: {err:?}"
        );
    }
    // Nothing leaked: the genuine blob still unseals (no transient slots left occupied).
    assert_unseals(&mut tpm, &blob, None);

    let foreign = SealedBlob::Pkcs11AesGcm {
        key_id: vec![1],
        iv: vec![0; 12],
        ciphertext: vec![0; 48],
    };
    assert!(matches!(
        tpm.unseal(&foreign, CONTEXT, None),
        Err(DeviceError::InvalidBlob(_))
    ));
}

#[test]
fn p256_sign_verifies_with_p256_and_openssl() {
    let swtpm = Swtpm::start();
    let mut tpm = open(&swtpm);
    let key = p256_key(&mut tpm);
    assert_eq!(key.algorithm(), KeyAlgorithm::EcdsaP256);
    let description = keyward_tests::openssl::describe_public_key(&tpm.public_key(&key).unwrap());
    assert!(description.unwrap().contains("P-256"));
    for message in [&b"hello keyward"[..], b"", &[0u8; 10_000]] {
        let sig = tpm.sign(&key, SignInput::Message(message)).unwrap();
        verify_both(&mut tpm, &key, message, &sig);
    }
}

#[test]
fn prehashed_digest_sign_verifies() {
    let swtpm = Swtpm::start();
    let mut tpm = open(&swtpm);
    let key = p256_key(&mut tpm);
    let message = b"signed by digest";
    let digest: [u8; 32] = sha2::Sha256::digest(message).into();
    let sig = tpm.sign(&key, SignInput::Sha256Digest(&digest)).unwrap();
    verify_both(&mut tpm, &key, message, &sig);
}

#[test]
fn alternating_keys_all_sign_correctly() {
    // More keys than swtpm has transient slots: the one-key cache must evict, never leak.
    let swtpm = Swtpm::start();
    let mut tpm = open(&swtpm);
    let keys: Vec<KeyHandle> = (0..4).map(|_| p256_key(&mut tpm)).collect();
    for round in 0..3 {
        for (i, key) in keys.iter().enumerate() {
            let message = format!("round {round} key {i}");
            let sig = tpm
                .sign(key, SignInput::Message(message.as_bytes()))
                .unwrap();
            verify_both(&mut tpm, key, message.as_bytes(), &sig);
        }
    }
    // Destroying the cached key just unloads it; its blobs still work.
    tpm.destroy(&keys[3]).unwrap();
    tpm.destroy(&keys[3]).unwrap();
    let sig = tpm
        .sign(&keys[3], SignInput::Message(b"after destroy"))
        .unwrap();
    verify_both(&mut tpm, &keys[3], b"after destroy", &sig);
    // Sealing still finds a free slot with a signing key cached.
    let blob = tpm
        .seal(&secret(), CONTEXT, &SealPolicy::default())
        .unwrap();
    assert_unseals(&mut tpm, &blob, None);
}

#[test]
fn public_key_stable_across_reopen_and_restart() {
    let mut swtpm = Swtpm::start();
    let (key, spki) = {
        let mut tpm = open(&swtpm);
        let key = p256_key(&mut tpm);
        let spki = tpm.public_key(&key).unwrap();
        (key, spki)
    };
    assert_eq!(open(&swtpm).public_key(&key).unwrap(), spki);
    swtpm.restart();
    let mut tpm = open(&swtpm);
    assert_eq!(tpm.public_key(&key).unwrap(), spki);
    let sig = tpm
        .sign(&key, SignInput::Message(b"after restart"))
        .unwrap();
    verify_both(&mut tpm, &key, b"after restart", &sig);
}

#[test]
fn key_from_another_tpm_is_rejected() {
    let (one, two) = (Swtpm::start(), Swtpm::start());
    let key = p256_key(&mut open(&one));
    let mut other = open(&two);
    let err = other.sign(&key, SignInput::Message(b"x")).unwrap_err();
    assert!(matches!(err, DeviceError::InvalidBlob(_)), "{err:?}");
    let blob = open(&one)
        .seal(&secret(), CONTEXT, &SealPolicy::default())
        .unwrap();
    let err = other.unseal(&blob, CONTEXT, None).unwrap_err();
    assert!(matches!(err, DeviceError::InvalidBlob(_)), "{err:?}");
}

#[test]
fn ed25519_generate_is_unsupported() {
    let swtpm = Swtpm::start();
    let mut tpm = open(&swtpm);
    assert_eq!(
        tpm.info().algorithms,
        [
            KeyAlgorithm::EcdsaP256,
            KeyAlgorithm::RsaPss3072,
            KeyAlgorithm::RsaPkcs1_3072,
            KeyAlgorithm::RsaPss2048
        ]
    );
    let err = tpm
        .generate(&KeySpec {
            label: "x".into(),
            algorithm: KeyAlgorithm::Ed25519,
            id: None,
        })
        .unwrap_err();
    match err {
        // It says what it does make.
        DeviceError::Unsupported(m) => {
            assert!(m.contains("ed25519") && m.contains("rsa-pss-2048"), "{m}")
        }
        other => panic!("{other:?}"),
    }
    let pkcs11 = KeyHandle::Pkcs11 {
        algorithm: KeyAlgorithm::EcdsaP256,
        id: vec![1],
    };
    assert!(matches!(
        tpm.sign(&pkcs11, SignInput::Message(b"x")),
        Err(DeviceError::NotFound(_))
    ));
}

#[test]
fn protection_reads_non_extractable() {
    let swtpm = Swtpm::start();
    let mut tpm = open(&swtpm);
    let key = p256_key(&mut tpm);
    let p = tpm.protection(&key).unwrap();
    assert!(!p.extractable);
    assert!(p.sensitive);
    assert!(p.generated_on_device);
}

#[test]
fn info_names_the_tpm() {
    let swtpm = Swtpm::start();
    let mut tpm = open(&swtpm);
    let info = tpm.info().clone();
    eprintln!("{info:?}");
    assert_eq!(info.kind, DeviceKind::Tpm2);
    assert_eq!(info.manufacturer, "IBM", "swtpm reports IBM");
    assert!(!info.model.is_empty());
    assert_eq!(info.label, swtpm.tcti());
    tpm.ping().unwrap();
}

#[test]
fn swtpm_path_tcti_is_a_config_error() {
    let err = "swtpm:path=/x".parse::<Tcti>().unwrap_err();
    match err {
        DeviceError::Config(m) => assert!(m.contains("localhost:2321"), "{m}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn nothing_listening_is_device_gone() {
    let swtpm = Swtpm::start();
    let tcti: Tcti = swtpm.tcti().parse().unwrap();
    drop(swtpm);
    let err = TpmDevice::open(TpmConfig {
        tcti,
        pcrs: vec![7],
        pcr_signature: None,
    })
    .unwrap_err();
    assert!(matches!(err, DeviceError::DeviceGone(_)), "{err:?}");
}

#[test]
fn killed_swtpm_gives_device_gone() {
    let mut swtpm = Swtpm::start();
    let mut tpm = open(&swtpm);
    let key = p256_key(&mut tpm);
    tpm.sign(&key, SignInput::Message(b"before")).unwrap();
    let blob = tpm
        .seal(&secret(), CONTEXT, &SealPolicy::default())
        .unwrap();
    tpm.ping().unwrap();
    swtpm.stop();
    let err = tpm.ping().unwrap_err();
    assert!(matches!(err, DeviceError::DeviceGone(_)), "ping: {err:?}");
    let err = tpm.sign(&key, SignInput::Message(b"after")).unwrap_err();
    assert!(matches!(err, DeviceError::DeviceGone(_)), "sign: {err:?}");
    let err = tpm.unseal(&blob, CONTEXT, None).unwrap_err();
    assert!(matches!(err, DeviceError::DeviceGone(_)), "unseal: {err:?}");
    // Reopening after the TPM is back is what the daemon's actor does.
    drop(tpm);
    swtpm.restart();
    let mut tpm = open(&swtpm);
    tpm.ping().unwrap();
    assert_unseals(&mut tpm, &blob, None);
}

/// What an interposer on the TPM bus sees: the sealed secret and the PIN go in and the secret
/// comes out only inside SRK-salted, AES-CFB-encrypted parameters.
#[test]
fn secrets_never_cross_the_wire_in_clear() {
    let swtpm = Swtpm::start();
    let tap = Wiretap::start(&swtpm);
    let mut tpm = TpmDevice::open(TpmConfig {
        tcti: tap.tcti().parse().unwrap(),
        pcrs: vec![7],
        pcr_signature: None,
    })
    .unwrap();
    let marker = b"KEYWARD-VMK-MARKER-0123456789abc";
    let secret = SecretBytes::new(marker.to_vec());
    let pin_text = "PIN-MARKER-271828";
    let policy = SealPolicy {
        pcrs: None,
        pin: Some(Pin::new(pin_text).unwrap()),
        signed: None,
    };
    let blob = tpm.seal(&secret, CONTEXT, &policy).unwrap();
    let pin = Pin::new(pin_text).unwrap();
    assert_eq!(
        tpm.unseal(&blob, CONTEXT, Some(&pin)).unwrap().expose(),
        marker
    );
    let free = tpm.seal(&secret, CONTEXT, &SealPolicy::default()).unwrap();
    assert_eq!(tpm.unseal(&free, CONTEXT, None).unwrap().expose(), marker);
    drop(tpm);

    let wire = tap.captured();
    let contains = |needle: &[u8]| wire.windows(needle.len()).any(|w| w == needle);
    // The tap works: the sealed object's public area (never encrypted) went by.
    let SealedBlob::Tpm2 { public, .. } = &blob else {
        panic!()
    };
    assert!(
        contains(public),
        "the wiretap saw no TPM traffic ({} bytes)",
        wire.len()
    );
    assert!(
        !contains(&marker[..16]),
        "the sealed secret crossed the wire in clear"
    );
    assert!(
        !contains(&marker[16..]),
        "the sealed secret crossed the wire in clear"
    );
    assert!(
        !contains(pin_text.as_bytes()),
        "the PIN crossed the wire in clear"
    );
}

#[test]
fn tpm_reset_under_an_open_device_gives_device_gone() {
    // swtpm's TCTI reconnects per command, so after a restart the old context talks to a TPM
    // that was reset and no longer holds our SRK: that too must say "reopen me".
    let mut swtpm = Swtpm::start();
    let mut tpm = open(&swtpm);
    let key = p256_key(&mut tpm);
    tpm.sign(&key, SignInput::Message(b"x")).unwrap();
    let blob = tpm
        .seal(&secret(), CONTEXT, &SealPolicy::default())
        .unwrap();
    swtpm.restart();
    let err = tpm.ping().unwrap_err();
    assert!(matches!(err, DeviceError::DeviceGone(_)), "ping: {err:?}");
    let err = tpm.sign(&key, SignInput::Message(b"x")).unwrap_err();
    assert!(matches!(err, DeviceError::DeviceGone(_)), "sign: {err:?}");
    let err = tpm.unseal(&blob, CONTEXT, None).unwrap_err();
    assert!(matches!(err, DeviceError::DeviceGone(_)), "unseal: {err:?}");
    drop(tpm);
    let mut tpm = open(&swtpm);
    tpm.ping().unwrap();
    assert_unseals(&mut tpm, &blob, None);
}

#[test]
fn a_lost_key_handle_leaves_nothing_in_the_tpm_to_sweep() {
    let swtpm = Swtpm::start();
    let mut tpm = open(&swtpm);
    let spec = KeySpec {
        label: "lost".into(),
        algorithm: KeyAlgorithm::EcdsaP256,
        id: Some(vec![1; 16]),
    };
    let key = tpm.generate(&spec).unwrap();
    assert_eq!(tpm.destroy_generated(&spec).unwrap(), 0);
    // The key lives in its blobs only: still usable by whoever holds them.
    tpm.sign(&key, SignInput::Message(b"still here")).unwrap();
}
