//! The device layer of Keyward: seal, unseal and sign **inside** a TPM 2.0 or a PKCS#11 token.
//!
//! This crate owns the conversation with the hardware and nothing else: it knows no sockets, no
//! store, no callers and no policy. Every backend implements the same three small traits
//! ([`Device`], [`Sealer`], [`Signer`]) with `&mut self` methods, because a cryptoki session and an
//! ESAPI context each belong to exactly one thread; the daemon gives every device its own owner
//! thread and talks to it over channels.
//!
//! **The device keeps nothing we must remember.** What a backend hands back ([`SealedBlob`],
//! [`KeyHandle`]) is a versioned, serialisable value that the caller stores; with it, the object can
//! be found again (PKCS#11: by `CKA_ID` on the token the URI names) or loaded again (TPM: public +
//! private blobs under a primary key re-created from a fixed template).
//!
//! There is never a silent software fallback: an absent or broken device is an error.
//!
//! Its one dependency inside Keyward is the contract's vocabulary (`keyward-proto`'s
//! [`KeyAlgorithm`] and [`DeviceKind`]), so an algorithm has one name from the CLI to the device.

pub mod error;
pub mod pkcs11;
mod pubkey;
pub mod secret;
pub mod tpm;
pub mod uri;

use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// The algorithms and device kinds are the contract's: one name for each, on the wire, in the
/// config, in the store and here.
pub use keyward_proto::kinds::{DeviceKind, KeyAlgorithm};

pub use error::DeviceError;
pub use secret::{Pin, SecretBytes};

/// Result of every device operation.
pub type Result<T, E = DeviceError> = std::result::Result<T, E>;

/// What a device says about itself; shown to admins, never secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceInfo {
    /// The backend.
    pub kind: DeviceKind,
    /// Manufacturer as reported by the device.
    pub manufacturer: String,
    /// Model (PKCS#11) or vendor string (TPM).
    pub model: String,
    /// Serial number (PKCS#11 token) or firmware version (TPM).
    pub serial: String,
    /// Token label (PKCS#11) or the TCTI in use (TPM).
    pub label: String,
    /// The algorithms [`Signer::generate`] can make here, as probed when the device opened.
    #[serde(default)]
    pub algorithms: Vec<KeyAlgorithm>,
}

/// What to create with [`Signer::generate`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeySpec {
    /// A human label stored with the object where the device has room for one (PKCS#11 `CKA_LABEL`).
    pub label: String,
    /// The algorithm.
    pub algorithm: KeyAlgorithm,
    /// The id to give the key where the device names its objects (PKCS#11 `CKA_ID`); `None`
    /// lets the device pick one. A caller that names the key up front can find what
    /// [`Signer::generate`] made even if the handle never reached it (a crash in between):
    /// see [`Signer::destroy_generated`].
    pub id: Option<Vec<u8>>,
}

/// A signing key that lives in a device. Store it; pass it back to sign.
///
/// The variant names carry a version so that a stored handle keeps its meaning when the format
/// grows: a new layout is a new variant, never a changed one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "format")]
pub enum KeyHandle {
    /// A key pair on a PKCS#11 token, found by `CKA_ID` (the private and public object share it).
    #[serde(rename = "pkcs11/v1")]
    Pkcs11 {
        /// Algorithm of the pair.
        algorithm: KeyAlgorithm,
        /// `CKA_ID` of both objects.
        id: Vec<u8>,
    },
    /// A TPM key, loadable under the storage root key.
    #[serde(rename = "tpm2/v1")]
    Tpm2 {
        /// Algorithm of the key.
        algorithm: KeyAlgorithm,
        /// Marshalled `TPMT_PUBLIC` (no size prefix).
        public: Vec<u8>,
        /// The `TPM2B_PRIVATE` buffer (encrypted by the TPM under its parent).
        private: Vec<u8>,
    },
}

impl KeyHandle {
    /// The key's algorithm.
    pub fn algorithm(&self) -> KeyAlgorithm {
        match self {
            Self::Pkcs11 { algorithm, .. } | Self::Tpm2 { algorithm, .. } => *algorithm,
        }
    }
}

/// A secret sealed by a device. Only that device (and, for a TPM, only in the sealed-to state)
/// can turn it back into the secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "format")]
pub enum SealedBlob {
    /// AES-256-GCM by a token-resident, non-extractable key.
    #[serde(rename = "pkcs11-aes-gcm/v1")]
    Pkcs11AesGcm {
        /// `CKA_ID` of the AES key.
        key_id: Vec<u8>,
        /// 12-byte GCM IV.
        iv: Vec<u8>,
        /// Ciphertext followed by the 16-byte tag.
        ciphertext: Vec<u8>,
    },
    /// RSA-OAEP (SHA-1, MGF1-SHA-1) by a token-resident key pair, for tokens without AES
    /// (smart cards).
    #[serde(rename = "pkcs11-rsa-oaep/v1")]
    Pkcs11RsaOaep {
        /// `CKA_ID` of the RSA key pair.
        key_id: Vec<u8>,
        /// OAEP ciphertext of `SHA-256(context) || secret`.
        ciphertext: Vec<u8>,
    },
    /// A TPM sealed-data object bound to PCR values (and optionally a PIN).
    #[serde(rename = "tpm2-sealed/v1")]
    Tpm2 {
        /// Marshalled `TPMT_PUBLIC` of the sealed object (no size prefix).
        public: Vec<u8>,
        /// Its `TPM2B_PRIVATE` buffer.
        private: Vec<u8>,
        /// PCR indices (sha256 bank) of the policy.
        pcrs: Vec<u8>,
        /// Whether the policy also needs the PIN (`PolicyAuthValue`).
        pin: bool,
        /// A signed PCR policy the object is also bound to (`PolicyAuthorize`). Absent in
        /// blobs sealed before signed policies existed, which load as they always did; a
        /// daemon that predates the field ignores it and can only fail the unseal (the TPM
        /// enforces the policy), never open the slot some other way.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        signed: Option<SignedPcrs>,
    },
}

/// A signed PCR policy, in the scheme of systemd's `systemd-measure sign`: the secret opens
/// for whatever values of `pcrs` the holder of the private key has signed (`PolicyAuthorize`
/// on the key), so an update that changes those PCRs ships a new signature instead of
/// needing a re-enrollment. PCR 11 (what systemd-stub measures a unified kernel into) is the
/// usual one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedPcrs {
    /// The RSA public key that signs the policies, as DER `SubjectPublicKeyInfo`.
    pub public_key: Vec<u8>,
    /// PCR indices (sha256 bank) the signed policies cover, sorted.
    pub pcrs: Vec<u8>,
}

/// What a sealed secret is bound to, beyond the device itself.
#[derive(Debug, Default)]
pub struct SealPolicy {
    /// TPM only: PCR indices of the sha256 bank whose current values the secret is bound to.
    /// `None` uses the device's configured default. A PKCS#11 token rejects `Some`.
    pub pcrs: Option<Vec<u8>>,
    /// TPM only: a PIN that is needed on top of the PCR policy. A PKCS#11 token is protected by
    /// its login PIN instead and rejects `Some`.
    pub pin: Option<Pin>,
    /// TPM only: a signed PCR policy the secret is bound to as well (a slot may have literal
    /// and signed PCRs). A PKCS#11 token rejects `Some`.
    pub signed: Option<SignedPcrs>,
}

/// What [`Signer::sign`] signs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SignInput<'a> {
    /// The message; the device (or the host, where the device needs a digest) hashes it.
    Message(&'a [u8]),
    /// A SHA-256 digest the caller computed. Ed25519 signs messages only and rejects this.
    Sha256Digest(&'a [u8; 32]),
    /// A SHA-512 digest the caller computed: RSA PKCS#1 v1.5 keys only (SSH's `rsa-sha2-512`);
    /// every other algorithm rejects it.
    Sha512Digest(&'a [u8; 64]),
}

/// What to sign, owned: a [`SignInput`] that can travel to the thread that signs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SignData {
    /// As [`SignInput::Message`].
    Message(Vec<u8>),
    /// As [`SignInput::Sha256Digest`].
    Sha256Digest([u8; 32]),
    /// As [`SignInput::Sha512Digest`].
    Sha512Digest([u8; 64]),
}

impl SignData {
    /// The input, borrowed.
    pub fn input(&self) -> SignInput<'_> {
        match self {
            Self::Message(m) => SignInput::Message(m),
            Self::Sha256Digest(d) => SignInput::Sha256Digest(d),
            Self::Sha512Digest(d) => SignInput::Sha512Digest(d),
        }
    }
}

/// How a device protects a key, read back from the device itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyProtection {
    /// Can the private key leave the device (wrapped)? Keyward keys never can.
    pub extractable: bool,
    /// Is the private key readable in clear? Keyward keys never are.
    pub sensitive: bool,
    /// Was the key generated inside the device (PKCS#11 `CKA_LOCAL`, TPM `sensitiveDataOrigin`)?
    pub generated_on_device: bool,
    /// Has the key never been extractable (PKCS#11 `CKA_NEVER_EXTRACTABLE`; TPM: as
    /// `!extractable`, since a TPM object's fixedTPM and fixedParent can't change)?
    pub never_extractable: bool,
    /// Has the key always been sensitive (PKCS#11 `CKA_ALWAYS_SENSITIVE`; TPM: always)?
    pub always_sensitive: bool,
}

/// A TPM's `TPM2_Certify` of one of its keys: the TPM's own statement that it holds the key,
/// signed by an attestation key. Checked offline by `keyward_proto::attestation`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Certification {
    /// The signed `TPMS_ATTEST` bytes.
    pub attest: Vec<u8>,
    /// The attestation key's ECDSA P-256 signature over them (DER).
    pub signature: Vec<u8>,
    /// The certified key's `TPMT_PUBLIC`, as the TPM holds it.
    pub key_public_area: Vec<u8>,
    /// The attestation key's `TPMT_PUBLIC`.
    pub signer_public_area: Vec<u8>,
    /// The attestation key as DER SubjectPublicKeyInfo.
    pub signer_public_key: PublicKeyDer,
    /// The endorsement key certificates stored in the TPM's NV (DER X.509), where it has any.
    pub ek_certificates: Vec<Vec<u8>>,
}

/// A public key as DER `SubjectPublicKeyInfo`, the form OpenSSL and every X.509 library read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublicKeyDer(pub Vec<u8>);

impl PublicKeyDer {
    /// PEM (`-----BEGIN PUBLIC KEY-----`).
    pub fn to_pem(&self) -> String {
        pubkey::to_pem(&self.0)
    }
}

/// Liveness and identity.
pub trait Device {
    /// What the device says it is.
    fn info(&self) -> &DeviceInfo;
    /// A cheap round trip to the device. `Err(DeviceGone)` means the caller should reopen it.
    ///
    /// # Errors
    /// [`DeviceError::DeviceGone`] when the device no longer answers.
    fn ping(&mut self) -> Result<()>;

    /// The monotonic counter the device keeps at `index` (created on first use), after
    /// incrementing it by one if `increment`. Only a TPM has one (an NV counter index).
    ///
    /// # Errors
    /// [`DeviceError::Unsupported`] on devices without counters; device errors otherwise.
    fn counter(&mut self, index: u32, increment: bool) -> Result<Counter> {
        let _ = (index, increment);
        Err(DeviceError::Unsupported(
            "this device keeps no monotonic counter".into(),
        ))
    }
}

/// A monotonic counter's value, and whether this call created it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Counter {
    pub value: u64,
    pub created: bool,
}

/// Seal and unseal small secrets (a vault master key) inside the device.
pub trait Sealer {
    /// Seal `secret` (at most [`MAX_SEALED_SECRET`] bytes). `context` is bound into the blob:
    /// unsealing with another context fails, so a blob can't be replayed for another purpose.
    ///
    /// # Errors
    /// [`DeviceError::Unsupported`] for a policy the device cannot enforce, device errors otherwise.
    fn seal(
        &mut self,
        secret: &SecretBytes,
        context: &[u8],
        policy: &SealPolicy,
    ) -> Result<SealedBlob>;

    /// Unseal a blob made by [`Sealer::seal`] on this device with the same `context`.
    ///
    /// # Errors
    /// [`DeviceError::PolicyMismatch`] when PCRs changed, [`DeviceError::PinIncorrect`] for a wrong
    /// PIN, [`DeviceError::InvalidBlob`] for a tampered or foreign blob or another context.
    fn unseal(
        &mut self,
        blob: &SealedBlob,
        context: &[u8],
        pin: Option<&Pin>,
    ) -> Result<SecretBytes>;

    /// [`Sealer::unseal`], also saying what let the secret out beyond the blob itself (which
    /// signed PCR policy matched), for the admin's status. Never secret.
    ///
    /// # Errors
    /// As [`Sealer::unseal`].
    fn unseal_noting(
        &mut self,
        blob: &SealedBlob,
        context: &[u8],
        pin: Option<&Pin>,
    ) -> Result<(SecretBytes, Option<String>)> {
        self.unseal(blob, context, pin).map(|s| (s, None))
    }
}

/// Create keys in the device and sign with them there.
pub trait Signer {
    /// Generate a key pair inside the device; the private key is non-extractable and sensitive.
    ///
    /// # Errors
    /// [`DeviceError::Unsupported`] when the device lacks the algorithm.
    fn generate(&mut self, spec: &KeySpec) -> Result<KeyHandle>;

    /// The public half as DER SubjectPublicKeyInfo.
    ///
    /// # Errors
    /// [`DeviceError::NotFound`] when a token no longer holds the key,
    /// [`DeviceError::InvalidBlob`] for a handle of another device or a tampered one.
    fn public_key(&mut self, handle: &KeyHandle) -> Result<PublicKeyDer>;

    /// Sign inside the device. Signatures come in the forms OpenSSL verifies: Ed25519 raw 64 bytes,
    /// ECDSA DER, RSA-PSS raw.
    ///
    /// # Errors
    /// [`DeviceError::NotFound`] when the key is gone, [`DeviceError::InvalidBlob`] for a foreign
    /// or tampered handle, [`DeviceError::Unsupported`] for a digest
    /// given to Ed25519.
    fn sign(&mut self, handle: &KeyHandle, input: SignInput<'_>) -> Result<Vec<u8>>;

    /// How the device protects the private key, as the device reports it.
    ///
    /// # Errors
    /// [`DeviceError::NotFound`] when the key is not on this device.
    fn protection(&mut self, handle: &KeyHandle) -> Result<KeyProtection>;

    /// Have the device itself certify that it holds the key, binding `nonce` (at most 64
    /// bytes). Only a TPM can (`TPM2_Certify`).
    ///
    /// # Errors
    /// [`DeviceError::Unsupported`] on devices without key attestation; as [`Signer::sign`].
    fn certify(&mut self, handle: &KeyHandle, nonce: &[u8]) -> Result<Certification> {
        let _ = (handle, nonce);
        Err(DeviceError::Unsupported(
            "this device has no key attestation of its own".into(),
        ))
    }

    /// Destroy the key in the device, where the device holds it (a TPM key lives only in its
    /// blobs, so for a TPM this is a no-op and forgetting the handle destroys it).
    ///
    /// # Errors
    /// Device errors; a key that is already gone is not an error.
    fn destroy(&mut self, handle: &KeyHandle) -> Result<()>;

    /// Destroy what [`Signer::generate`] made for `spec` (which names an id), found by the
    /// label **and** the id rather than by a handle: for a caller that lost the handle (it died
    /// between generating the key and recording it). An object that carries only one of the
    /// two is someone else's and is left alone. Returns how many objects were destroyed: 0
    /// when the generate never got that far, or when the device keeps no objects of ours (a
    /// TPM key exists only in its blobs).
    ///
    /// # Errors
    /// [`DeviceError::InvalidArgument`] for a spec without an id, on a device that keeps
    /// objects; device errors.
    fn destroy_generated(&mut self, spec: &KeySpec) -> Result<usize>;

    /// A signer that works beside this one, on sessions of its own, for devices that sign in
    /// parallel: a PKCS#11 token serves each session independently, so several callers sign at
    /// once, each on its own thread, rather than one after another on this object's thread. A
    /// TPM is one serial device and has none.
    ///
    /// The shared signer is this device's: opened with it, valid while it is (its sessions
    /// share this object's login), and to be dropped when this object is.
    fn shared_signer(&mut self) -> Option<Arc<dyn SharedSigner>> {
        None
    }
}

/// Signing that many threads may call at once ([`Signer::shared_signer`]).
pub trait SharedSigner: Send + Sync {
    /// As [`Signer::sign`].
    ///
    /// # Errors
    /// As [`Signer::sign`]; [`DeviceError::DeviceGone`] when the device went away.
    fn sign(&self, handle: &KeyHandle, input: SignInput<'_>) -> Result<Vec<u8>>;

    /// As [`Device::ping`]: after an error that could hide a vanished device, is it still
    /// there?
    ///
    /// # Errors
    /// [`DeviceError::DeviceGone`] when the device no longer answers,
    /// [`DeviceError::PinLocked`] when its PIN got locked.
    fn ping(&self) -> Result<()>;
}

/// Everything a configured device does, for callers that hold any backend.
pub trait Backend: Device + Sealer + Signer + Send {}
impl<T: Device + Sealer + Signer + Send> Backend for T {}

/// Largest secret [`Sealer::seal`] accepts: a TPM sealed-data object holds 128 bytes, of which
/// 32 carry the context digest.
pub const MAX_SEALED_SECRET: usize = 64;

/// SHA-256 of the seal context, as bound into blobs that have no AAD of their own.
pub(crate) fn context_digest(context: &[u8]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"keyward seal context v1\0");
    h.update(context);
    h.finalize().into()
}

/// Check a secret's size against [`MAX_SEALED_SECRET`].
pub(crate) fn check_secret_len(secret: &SecretBytes) -> Result<()> {
    let n = secret.expose().len();
    if n == 0 || n > MAX_SEALED_SECRET {
        return Err(DeviceError::InvalidArgument(format!(
            "a sealed secret is 1 to {MAX_SEALED_SECRET} bytes, not {n}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A TPM blob as stored before signed PCR policies existed.
    const OLD_TPM_BLOB: &str =
        r#"{"format":"tpm2-sealed/v1","public":[1,2],"private":[3],"pcrs":[7],"pin":false}"#;

    #[test]
    fn tpm_blobs_sealed_before_signed_policies_load_and_stay_the_same() {
        let blob: SealedBlob = serde_json::from_str(OLD_TPM_BLOB).unwrap();
        assert!(matches!(
            &blob,
            SealedBlob::Tpm2 { pcrs, signed: None, .. } if pcrs == &[7]
        ));
        assert_eq!(serde_json::to_string(&blob).unwrap(), OLD_TPM_BLOB);
        let signed = SealedBlob::Tpm2 {
            public: vec![1],
            private: vec![2],
            pcrs: vec![],
            pin: false,
            signed: Some(SignedPcrs {
                public_key: vec![9],
                pcrs: vec![11],
            }),
        };
        let text = serde_json::to_string(&signed).unwrap();
        assert!(
            text.contains(r#""signed":{"public_key":[9],"pcrs":[11]}"#),
            "{text}"
        );
        assert_eq!(serde_json::from_str::<SealedBlob>(&text).unwrap(), signed);
    }
}
