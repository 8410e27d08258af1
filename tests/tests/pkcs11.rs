//! PKCS#11 backend against a real SoftHSM token: what the conformance suite can't say generically.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use ed25519_dalek::pkcs8::DecodePublicKey as _;
use ed25519_dalek::Verifier as _;
use hsm_shim::pkcs11::{Pkcs11Config, Pkcs11Device, SealMode, SOFTHSM_MODULE};
use hsm_shim::{
    DeviceError, KeyAlgorithm, KeySpec, Pin, SealPolicy, SealedBlob, Sealer, SecretBytes,
    SignInput, Signer,
};
use keyward_tests::softhsm::SoftHsm;

fn token() -> SoftHsm {
    let t = SoftHsm::new("keyward-test");
    t.use_in_this_process();
    t
}

fn key(dev: &mut Pkcs11Device, algorithm: KeyAlgorithm) -> hsm_shim::KeyHandle {
    dev.generate(&KeySpec {
        label: format!("test-{algorithm}"),
        algorithm,
        id: None,
    })
    .unwrap()
}

#[test]
fn ed25519_signature_verifies_with_dalek() {
    let t = token();
    let mut dev = Pkcs11Device::open(t.config()).unwrap();
    let k = key(&mut dev, KeyAlgorithm::Ed25519);
    let spki = dev.public_key(&k).unwrap();
    let vk = ed25519_dalek::VerifyingKey::from_public_key_der(&spki.0).unwrap();
    let sig = dev.sign(&k, SignInput::Message(b"hello")).unwrap();
    let sig = ed25519_dalek::Signature::from_slice(&sig).unwrap();
    vk.verify(b"hello", &sig).unwrap();
    assert!(vk.verify(b"hellO", &sig).is_err());
}

#[test]
fn p256_signature_verifies_with_p256_crate() {
    use p256::ecdsa::signature::hazmat::PrehashVerifier as _;
    use p256::pkcs8::DecodePublicKey as _;
    let t = token();
    let mut dev = Pkcs11Device::open(t.config()).unwrap();
    let k = key(&mut dev, KeyAlgorithm::EcdsaP256);
    let spki = dev.public_key(&k).unwrap();
    let vk = p256::ecdsa::VerifyingKey::from_public_key_der(&spki.0).unwrap();
    let der = dev.sign(&k, SignInput::Message(b"hello")).unwrap();
    let sig = p256::ecdsa::Signature::from_der(&der).unwrap();
    p256::ecdsa::signature::Verifier::verify(&vk, b"hello", &sig).unwrap();
    let digest: [u8; 32] = <sha2::Sha256 as sha2::Digest>::digest(b"hello").into();
    let der = dev.sign(&k, SignInput::Sha256Digest(&digest)).unwrap();
    let sig = p256::ecdsa::Signature::from_der(&der).unwrap();
    vk.verify_prehash(&digest, &sig).unwrap();
}

#[test]
fn wrong_pin_is_pin_incorrect_and_right_pin_still_works() {
    let t = token();
    let wrong = Pkcs11Config::new(
        SOFTHSM_MODULE,
        t.uri(),
        Some(Pin::new("not-the-pin").unwrap()),
    );
    let err = Pkcs11Device::open(wrong).unwrap_err();
    assert!(matches!(err, DeviceError::PinIncorrect { .. }), "{err:?}");
    assert!(!err.to_string().contains("not-the-pin"), "{err}");
    Pkcs11Device::open(t.config()).unwrap();
}

#[test]
fn rsa_oaep_mode_seals_for_tokens_without_aes() {
    let t = token();
    let mut config = t.config();
    config.seal_mode = SealMode::RsaOaep;
    let mut dev = Pkcs11Device::open(config).unwrap();
    let secret = SecretBytes::new(vec![0x42; 32]);
    let blob = dev.seal(&secret, b"ctx", &SealPolicy::default()).unwrap();
    assert!(matches!(blob, SealedBlob::Pkcs11RsaOaep { .. }), "{blob:?}");
    assert_eq!(
        dev.unseal(&blob, b"ctx", None).unwrap().expose(),
        secret.expose()
    );
    let err = dev.unseal(&blob, b"other", None).unwrap_err();
    assert!(matches!(err, DeviceError::InvalidBlob(_)), "{err:?}");
    // The same token, in AES mode, still opens the RSA blob: each blob names its key.
    drop(dev);
    let mut dev = Pkcs11Device::open(t.config()).unwrap();
    assert_eq!(
        dev.unseal(&blob, b"ctx", None).unwrap().expose(),
        secret.expose()
    );
}

#[test]
fn seal_key_is_reused_and_never_readable() {
    let t = token();
    let mut dev = Pkcs11Device::open(t.config()).unwrap();
    let secret = SecretBytes::new(vec![7; 32]);
    let a = dev.seal(&secret, b"c", &SealPolicy::default()).unwrap();
    let b = dev.seal(&secret, b"c", &SealPolicy::default()).unwrap();
    let (
        SealedBlob::Pkcs11AesGcm {
            key_id: ka,
            iv: iva,
            ..
        },
        SealedBlob::Pkcs11AesGcm {
            key_id: kb,
            iv: ivb,
            ..
        },
    ) = (&a, &b)
    else {
        panic!("SoftHSM has AES: expected GCM blobs, got {a:?}");
    };
    assert_eq!(ka, kb, "one sealing key per token");
    assert_ne!(iva, ivb, "a fresh IV per seal");
    // Read the sealing key's flags back with a tool we did not write (OpenSC's pkcs11-tool).
    let listing = std::process::Command::new("pkcs11-tool")
        .env("SOFTHSM2_CONF", t.conf())
        .args([
            "--module",
            SOFTHSM_MODULE,
            "--token-label",
            t.label(),
            "--login",
            "--pin",
        ])
        .arg(t.pin().expose())
        .args(["--list-objects", "--type", "secrkey"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&listing.stdout);
    assert!(
        listing.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&listing.stderr)
    );
    assert!(text.contains("keyward-seal"), "{text}");
    assert!(text.contains("sensitive"), "{text}");
    assert!(text.contains("never extractable"), "{text}");
    assert!(
        !text
            .replace("never extractable", "")
            .contains("extractable"),
        "the sealing key must not be extractable: {text}"
    );
}

#[test]
fn destroyed_key_is_gone() {
    let t = token();
    let mut dev = Pkcs11Device::open(t.config()).unwrap();
    let k = key(&mut dev, KeyAlgorithm::EcdsaP256);
    dev.sign(&k, SignInput::Message(b"x")).unwrap();
    dev.destroy(&k).unwrap();
    let err = dev.sign(&k, SignInput::Message(b"x")).unwrap_err();
    assert!(matches!(err, DeviceError::NotFound(_)), "{err:?}");
    let err = dev.public_key(&k).unwrap_err();
    assert!(matches!(err, DeviceError::NotFound(_)), "{err:?}");
    dev.destroy(&k).unwrap();
}

#[test]
fn uri_that_matches_no_token_says_what_is_there() {
    let t = token();
    let config = Pkcs11Config::new(
        SOFTHSM_MODULE,
        "pkcs11:token=nope".parse().unwrap(),
        Some(t.pin()),
    );
    let err = Pkcs11Device::open(config).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, DeviceError::Config(_)), "{err:?}");
    assert!(text.contains("keyward-test"), "{text}");

    let config = Pkcs11Config::new(
        SOFTHSM_MODULE,
        "pkcs11:object=x".parse().unwrap(),
        Some(t.pin()),
    );
    let err = Pkcs11Device::open(config).unwrap_err();
    assert!(matches!(err, DeviceError::Config(_)), "{err:?}");
}

#[test]
fn softhsm_without_explicit_config_is_refused() {
    let t = token();
    // Undo use_in_this_process: SoftHSM must not fall back to /etc/softhsm/softhsm2.conf.
    std::env::remove_var("SOFTHSM2_CONF");
    let err = Pkcs11Device::open(t.config()).unwrap_err();
    assert!(matches!(err, DeviceError::Config(_)), "{err:?}");
    assert!(err.to_string().contains("SOFTHSM2_CONF"), "{err}");
}

#[test]
fn per_secret_pins_and_pcrs_are_unsupported() {
    let t = token();
    let mut dev = Pkcs11Device::open(t.config()).unwrap();
    let secret = SecretBytes::new(vec![1; 32]);
    let pcr = SealPolicy {
        pcrs: Some(vec![7]),
        pin: None,
        signed: None,
    };
    assert!(matches!(
        dev.seal(&secret, b"c", &pcr),
        Err(DeviceError::Unsupported(_))
    ));
    let pin = SealPolicy {
        pcrs: None,
        pin: Some(Pin::new("1234").unwrap()),
        signed: None,
    };
    assert!(matches!(
        dev.seal(&secret, b"c", &pin),
        Err(DeviceError::Unsupported(_))
    ));
}

#[test]
fn a_generated_key_is_found_by_label_and_id_and_nothing_else_is() {
    let t = token();
    let mut dev = Pkcs11Device::open(t.config()).unwrap();
    let spec = |id: &[u8]| KeySpec {
        label: "shared-label".into(),
        algorithm: KeyAlgorithm::EcdsaP256,
        id: Some(id.to_vec()),
    };
    let ours = dev.generate(&spec(&[0xaa; 16])).unwrap();
    assert_eq!(
        ours,
        hsm_shim::KeyHandle::Pkcs11 {
            algorithm: KeyAlgorithm::EcdsaP256,
            id: vec![0xaa; 16]
        }
    );
    // The same label under another id, and the same id under another label: not ours.
    let same_label = dev.generate(&spec(&[0xbb; 16])).unwrap();
    let same_id = dev
        .generate(&KeySpec {
            label: "another-label".into(),
            ..spec(&[0xaa; 16])
        })
        .unwrap();

    assert_eq!(dev.destroy_generated(&spec(&[0xaa; 16])).unwrap(), 2);
    assert_eq!(dev.destroy_generated(&spec(&[0xaa; 16])).unwrap(), 0);
    dev.public_key(&same_label).unwrap();
    // The other-label pair shares the id: it is what a lookup by id now finds.
    dev.public_key(&same_id).unwrap();
    let err = dev
        .destroy_generated(&KeySpec {
            id: None,
            ..spec(&[])
        })
        .unwrap_err();
    assert!(matches!(err, DeviceError::InvalidArgument(_)), "{err:?}");
}
