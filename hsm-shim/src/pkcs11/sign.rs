//! Signing on a PKCS#11 token, and the [`Signer`] impl that ties `keys.rs` and this together.
//!
//! Mechanisms (checked against SoftHSM 2.6): Ed25519 with `CKM_EDDSA` (pure), ECDSA with
//! `CKM_ECDSA` over a host-computed SHA-256 (`CKM_ECDSA_SHA256` is missing on SoftHSM), RSA-PSS
//! with `CKM_SHA256_RSA_PKCS_PSS` for messages and `CKM_RSA_PKCS_PSS` for digests, RSA PKCS#1 v1.5
//! with `CKM_SHA256_RSA_PKCS` for messages and `CKM_RSA_PKCS` over the DigestInfo of a SHA-256
//! or SHA-512 digest.

use cryptoki::mechanism::eddsa::{EddsaParams, EddsaSignatureScheme};
use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsPssParams};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::ObjectClass;
use sha2::{Digest, Sha256};

use std::sync::Arc;

use cryptoki::session::Session;

use super::{map_error, Handles, Pkcs11Device};
use crate::{
    pubkey, DeviceError, KeyAlgorithm, KeyHandle, KeyProtection, KeySpec, PublicKeyDer, Result,
    SharedSigner, SignInput, Signer,
};

/// The DER `DigestInfo` before a SHA-256 digest (RFC 8017 §9.2, note 1): `CKM_RSA_PKCS` signs
/// the DigestInfo as given, so the host supplies it for a digest it computed.
const SHA256_DIGEST_INFO: [u8; 19] = [
    0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01, 0x05,
    0x00, 0x04, 0x20,
];
/// The DER `DigestInfo` before a SHA-512 digest (RFC 8017 §9.2, note 1).
const SHA512_DIGEST_INFO: [u8; 19] = [
    0x30, 0x51, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x03, 0x05,
    0x00, 0x04, 0x40,
];

fn digest_info(prefix: &[u8; 19], digest: &[u8]) -> Vec<u8> {
    [prefix.as_slice(), digest].concat()
}

fn pss() -> PkcsPssParams {
    PkcsPssParams {
        hash_alg: MechanismType::SHA256,
        mgf: PkcsMgfType::MGF1_SHA256,
        s_len: 32.into(),
    }
}

impl Signer for Pkcs11Device {
    fn generate(&mut self, spec: &KeySpec) -> Result<KeyHandle> {
        self.generate_pair(spec)
    }

    fn public_key(&mut self, handle: &KeyHandle) -> Result<PublicKeyDer> {
        self.read_public(handle)
    }

    fn sign(&mut self, handle: &KeyHandle, input: SignInput<'_>) -> Result<Vec<u8>> {
        sign_on(&self.session, &mut self.handles, handle, input)
    }

    fn protection(&mut self, handle: &KeyHandle) -> Result<KeyProtection> {
        self.read_protection(handle)
    }

    fn destroy(&mut self, handle: &KeyHandle) -> Result<()> {
        self.destroy_pair(handle)
    }

    fn destroy_generated(&mut self, spec: &KeySpec) -> Result<usize> {
        self.destroy_by_spec(spec)
    }

    fn shared_signer(&mut self) -> Option<Arc<dyn SharedSigner>> {
        Some(self.session_pool())
    }
}

/// Sign with the token key `handle` on `session`, finding the key through `handles` (that
/// session's cache): the one signing path of the device's own session and of the pooled ones.
pub(super) fn sign_on(
    session: &Session,
    handles: &mut Handles,
    handle: &KeyHandle,
    input: SignInput<'_>,
) -> Result<Vec<u8>> {
    let (id, algorithm) = super::keys::key_id(handle)?;
    let id = id.to_vec();
    let digest: [u8; 32];
    let info: Vec<u8>;
    let (mechanism, data): (Mechanism<'_>, &[u8]) = match (algorithm, input) {
        (KeyAlgorithm::Ed25519, SignInput::Message(m)) => (
            Mechanism::Eddsa(EddsaParams::new(EddsaSignatureScheme::Pure)),
            m,
        ),
        (KeyAlgorithm::Ed25519, SignInput::Sha256Digest(_)) => {
            return Err(DeviceError::Unsupported(
                "Ed25519 signs messages, not digests (pure EdDSA)".into(),
            ))
        }
        (KeyAlgorithm::EcdsaP256, SignInput::Message(m)) => {
            digest = Sha256::digest(m).into();
            (Mechanism::Ecdsa, &digest[..])
        }
        (KeyAlgorithm::EcdsaP256, SignInput::Sha256Digest(d)) => (Mechanism::Ecdsa, d.as_slice()),
        (KeyAlgorithm::RsaPss3072 | KeyAlgorithm::RsaPss2048, SignInput::Message(m)) => {
            (Mechanism::Sha256RsaPkcsPss(pss()), m)
        }
        (KeyAlgorithm::RsaPss3072 | KeyAlgorithm::RsaPss2048, SignInput::Sha256Digest(d)) => {
            (Mechanism::RsaPkcsPss(pss()), d.as_slice())
        }
        (KeyAlgorithm::RsaPkcs1_3072, SignInput::Message(m)) => (Mechanism::Sha256RsaPkcs, m),
        (KeyAlgorithm::RsaPkcs1_3072, SignInput::Sha256Digest(d)) => {
            info = digest_info(&SHA256_DIGEST_INFO, d);
            (Mechanism::RsaPkcs, &info[..])
        }
        (KeyAlgorithm::RsaPkcs1_3072, SignInput::Sha512Digest(d)) => {
            info = digest_info(&SHA512_DIGEST_INFO, d);
            (Mechanism::RsaPkcs, &info[..])
        }
        (
            KeyAlgorithm::Ed25519
            | KeyAlgorithm::EcdsaP256
            | KeyAlgorithm::RsaPss3072
            | KeyAlgorithm::RsaPss2048,
            SignInput::Sha512Digest(_),
        ) => {
            return Err(DeviceError::Unsupported(format!(
                "{algorithm} keys sign SHA-256 digests; SHA-512 is for rsa-pkcs1 keys"
            )))
        }
    };
    let key = handles.find(session, ObjectClass::PRIVATE_KEY, &id)?;
    let signature = match session.sign(&mechanism, key, data) {
        Ok(s) => s,
        Err(e) => {
            // A cached handle can go stale (object destroyed elsewhere): forget it.
            handles.forget(&id);
            return Err(map_error("C_Sign", e));
        }
    };
    match algorithm {
        KeyAlgorithm::EcdsaP256 => pubkey::ecdsa_p256_raw_to_der(&signature),
        KeyAlgorithm::Ed25519
        | KeyAlgorithm::RsaPss3072
        | KeyAlgorithm::RsaPkcs1_3072
        | KeyAlgorithm::RsaPss2048 => Ok(signature),
    }
}
