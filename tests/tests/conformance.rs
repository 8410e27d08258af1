//! One conformance suite, run against every real backend: a SoftHSM token and an swtpm TPM.
//! Each test builds its own device from scratch (nextest runs each in its own process).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use hsm_shim::pkcs11::Pkcs11Device;
use hsm_shim::tpm::{TpmConfig, TpmDevice};
use hsm_shim::{
    Backend, DeviceError, KeyAlgorithm, KeySpec, SealPolicy, SealedBlob, SecretBytes, SignInput,
};
use keyward::api::SignHash;
use keyward_tests::openssl;
use keyward_tests::softhsm::SoftHsm;
use keyward_tests::swtpm::Swtpm;
use sha2::{Digest, Sha256, Sha512};

/// A real device that tests can open, close and open again.
trait Harness {
    fn open(&self) -> Box<dyn Backend>;
    /// Algorithms this backend must support; others may answer `Unsupported`.
    fn required(&self) -> &'static [KeyAlgorithm];
}

struct Token(SoftHsm);

impl Harness for Token {
    fn open(&self) -> Box<dyn Backend> {
        Box::new(Pkcs11Device::open(self.0.config()).unwrap())
    }
    fn required(&self) -> &'static [KeyAlgorithm] {
        &KeyAlgorithm::ALL
    }
}

struct Tpm(Swtpm);

impl Harness for Tpm {
    fn open(&self) -> Box<dyn Backend> {
        let config = TpmConfig::new(self.0.tcti().parse().unwrap());
        Box::new(TpmDevice::open(config).unwrap())
    }
    fn required(&self) -> &'static [KeyAlgorithm] {
        // swtpm (libtpms) has RSA 2048 and 3072 with RSASSA-PSS and RSASSA (PKCS#1 v1.5).
        &[
            KeyAlgorithm::EcdsaP256,
            KeyAlgorithm::RsaPss3072,
            KeyAlgorithm::RsaPss2048,
            KeyAlgorithm::RsaPkcs1_3072,
        ]
    }
}

fn softhsm() -> Token {
    let token = SoftHsm::new("conformance");
    token.use_in_this_process();
    Token(token)
}

fn swtpm() -> Tpm {
    Tpm(Swtpm::start())
}

const CONTEXT: &[u8] = b"vault 6f1c/slot 0";

fn vmk() -> SecretBytes {
    SecretBytes::new((0u8..32).map(|i| i.wrapping_mul(37) ^ 0x5a).collect())
}

fn seal(dev: &mut dyn Backend) -> SealedBlob {
    dev.seal(&vmk(), CONTEXT, &SealPolicy::default()).unwrap()
}

fn seal_round_trip(h: &dyn Harness) {
    let mut dev = h.open();
    let blob = seal(dev.as_mut());
    let back = dev.unseal(&blob, CONTEXT, None).unwrap();
    assert_eq!(back.expose(), vmk().expose());
}

fn sealed_blob_survives_reopen_and_storage(h: &dyn Harness) {
    let blob = seal(h.open().as_mut());
    // What the daemon stores is the serialised blob.
    let stored = serde_json::to_string(&blob).unwrap();
    let loaded: SealedBlob = serde_json::from_str(&stored).unwrap();
    let back = h.open().unseal(&loaded, CONTEXT, None).unwrap();
    assert_eq!(back.expose(), vmk().expose());
}

fn other_context_is_rejected(h: &dyn Harness) {
    let mut dev = h.open();
    let blob = seal(dev.as_mut());
    let err = dev.unseal(&blob, b"vault 6f1c/slot 1", None).unwrap_err();
    assert!(matches!(err, DeviceError::InvalidBlob(_)), "{err:?}");
}

fn tampered_blob_is_rejected(h: &dyn Harness) {
    let mut dev = h.open();
    let blob = seal(dev.as_mut());
    let mut bad = blob.clone();
    match &mut bad {
        SealedBlob::Pkcs11AesGcm { ciphertext, .. }
        | SealedBlob::Pkcs11RsaOaep { ciphertext, .. } => {
            ciphertext[3] ^= 0x01;
        }
        SealedBlob::Tpm2 { private, .. } => {
            let last = private.len() - 1;
            private[last] ^= 0x01;
        }
    }
    let err = dev.unseal(&bad, CONTEXT, None).unwrap_err();
    assert!(matches!(err, DeviceError::InvalidBlob(_)), "{err:?}");
    // The device keeps working after rejecting the blob.
    assert_eq!(
        dev.unseal(&blob, CONTEXT, None).unwrap().expose(),
        vmk().expose()
    );
}

fn oversized_secret_is_refused(h: &dyn Harness) {
    let mut dev = h.open();
    let err = dev
        .seal(
            &SecretBytes::new(vec![1; 65]),
            CONTEXT,
            &SealPolicy::default(),
        )
        .unwrap_err();
    assert!(matches!(err, DeviceError::InvalidArgument(_)), "{err:?}");
}

fn signatures_verify_with_openssl(h: &dyn Harness) {
    let mut dev = h.open();
    let message = b"release v1.2.3 of the thing";
    for algorithm in KeyAlgorithm::ALL {
        let spec = KeySpec {
            label: format!("conformance-{algorithm}"),
            algorithm,
            id: None,
        };
        let key = match dev.generate(&spec) {
            Ok(k) => k,
            Err(DeviceError::Unsupported(_)) if !h.required().contains(&algorithm) => continue,
            Err(e) => panic!("generate {algorithm}: {e:?}"),
        };
        assert_eq!(key.algorithm(), algorithm);
        let public = dev.public_key(&key).unwrap();
        let sig = dev.sign(&key, SignInput::Message(message)).unwrap();
        openssl::verify(&public, algorithm, message, &sig).unwrap();
        assert!(
            openssl::verify(&public, algorithm, b"another message", &sig).is_err(),
            "{algorithm}: a signature must not verify over another message"
        );
        let digest: [u8; 32] = Sha256::digest(message).into();
        match dev.sign(&key, SignInput::Sha256Digest(&digest)) {
            Ok(sig) => openssl::verify(&public, algorithm, message, &sig).unwrap(),
            Err(DeviceError::Unsupported(_)) => assert_eq!(algorithm, KeyAlgorithm::Ed25519),
            Err(e) => panic!("{algorithm} prehashed: {e:?}"),
        }
        // SHA-512 (SSH's rsa-sha2-512) for RSA PKCS#1 v1.5 keys, refused by every other.
        let digest: [u8; 64] = Sha512::digest(message).into();
        match dev.sign(&key, SignInput::Sha512Digest(&digest)) {
            Ok(sig) => {
                assert_eq!(algorithm, KeyAlgorithm::RsaPkcs1_3072);
                openssl::verify_over(&public, algorithm, SignHash::Sha512, message, &sig).unwrap();
                assert!(
                    openssl::verify(&public, algorithm, message, &sig).is_err(),
                    "a SHA-512 signature must not verify as a SHA-256 one"
                );
            }
            Err(DeviceError::Unsupported(_)) => {
                assert_ne!(algorithm, KeyAlgorithm::RsaPkcs1_3072)
            }
            Err(e) => panic!("{algorithm} SHA-512: {e:?}"),
        }
    }
}

fn public_key_is_stable_across_reopen(h: &dyn Harness) {
    let spec = KeySpec {
        label: "stable".into(),
        algorithm: KeyAlgorithm::EcdsaP256,
        id: None,
    };
    let (key, first) = {
        let mut dev = h.open();
        let key = dev.generate(&spec).unwrap();
        let public = dev.public_key(&key).unwrap();
        (key, public)
    };
    let mut dev = h.open();
    assert_eq!(dev.public_key(&key).unwrap(), first);
    let sig = dev.sign(&key, SignInput::Message(b"after reopen")).unwrap();
    openssl::verify(&first, KeyAlgorithm::EcdsaP256, b"after reopen", &sig).unwrap();
}

fn keys_are_non_extractable(h: &dyn Harness) {
    let mut dev = h.open();
    for &algorithm in h.required() {
        let key = dev
            .generate(&KeySpec {
                label: "guarded".into(),
                algorithm,
                id: None,
            })
            .unwrap();
        let p = dev.protection(&key).unwrap();
        assert!(!p.extractable, "{algorithm}: {p:?}");
        assert!(p.sensitive, "{algorithm}: {p:?}");
        assert!(p.generated_on_device, "{algorithm}: {p:?}");
        assert!(
            p.never_extractable && p.always_sensitive,
            "{algorithm}: {p:?}"
        );
    }
}

macro_rules! conformance {
    ($backend:ident, $harness:expr) => {
        mod $backend {
            #[test]
            fn seal_round_trip() {
                super::seal_round_trip(&$harness);
            }
            #[test]
            fn sealed_blob_survives_reopen_and_storage() {
                super::sealed_blob_survives_reopen_and_storage(&$harness);
            }
            #[test]
            fn other_context_is_rejected() {
                super::other_context_is_rejected(&$harness);
            }
            #[test]
            fn tampered_blob_is_rejected() {
                super::tampered_blob_is_rejected(&$harness);
            }
            #[test]
            fn oversized_secret_is_refused() {
                super::oversized_secret_is_refused(&$harness);
            }
            #[test]
            fn signatures_verify_with_openssl() {
                super::signatures_verify_with_openssl(&$harness);
            }
            #[test]
            fn public_key_is_stable_across_reopen() {
                super::public_key_is_stable_across_reopen(&$harness);
            }
            #[test]
            fn keys_are_non_extractable() {
                super::keys_are_non_extractable(&$harness);
            }
        }
    };
}

conformance!(softhsm, super::softhsm());
conformance!(swtpm, super::swtpm());
