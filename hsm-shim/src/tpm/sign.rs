//! [`Signer`] for the TPM: ECDSA P-256 keys, and RSASSA-PSS 2048/3072 and PKCS#1 v1.5 3072
//! (SHA-256 or SHA-512) keys where the TPM has them (`TPM2_TestParms` at open), generated inside the TPM under the SRK, stored by the caller
//! as public + private blobs, signing with a password session. Attestation is in `certify.rs`.
//!
//! Signing is the hot path, so it costs one TPM round trip when the same key signs again: the
//! most recently used key stays loaded (a TPM has only a few transient slots, so only one) and a
//! password session needs no TPM-side setup. Nothing secret crosses the bus when signing: the
//! digest is not confidential and the key's auth value is empty (the daemon's policy decides who
//! may sign).

use sha2::{Digest as _, Sha256};
use tss_esapi::constants::tss::{TPM2_RH_NULL, TPM2_ST_HASHCHECK};
use tss_esapi::handles::KeyHandle as TpmKey;
use tss_esapi::interface_types::algorithm::HashingAlgorithm;
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::session_handles::AuthSession;
use tss_esapi::structures::{
    Digest, HashScheme, HashcheckTicket, Public, Signature, SignatureScheme,
};
use tss_esapi::traits::Marshall;
use tss_esapi::tss2_esys::TPMT_TK_HASHCHECK;

use super::error::{map, Op};
use super::{template, unmarshal_public, CachedKey, TpmDevice};
use crate::pubkey::{ecdsa_p256_rs_to_der, p256_spki, rsa_spki};
use crate::{
    Certification, DeviceError, KeyAlgorithm, KeyHandle, KeyProtection, KeySpec, PublicKeyDer,
    Result, SignInput, Signer,
};

/// Whether the TPM makes keys of `algorithm` from [`template::rsa_signing_key`].
pub(super) fn is_rsa(algorithm: KeyAlgorithm) -> bool {
    match algorithm {
        KeyAlgorithm::RsaPss2048 | KeyAlgorithm::RsaPss3072 | KeyAlgorithm::RsaPkcs1_3072 => true,
        KeyAlgorithm::Ed25519 | KeyAlgorithm::EcdsaP256 => false,
    }
}

/// The blobs of a TPM key handle, refusing other devices' handles and algorithms we don't make.
pub(super) fn tpm_blobs(handle: &KeyHandle) -> Result<(&[u8], &[u8])> {
    match handle {
        KeyHandle::Tpm2 {
            algorithm:
                KeyAlgorithm::EcdsaP256
                | KeyAlgorithm::RsaPss2048
                | KeyAlgorithm::RsaPss3072
                | KeyAlgorithm::RsaPkcs1_3072,
            public,
            private,
        } => Ok((public, private)),
        KeyHandle::Tpm2 { algorithm, .. } => Err(DeviceError::Unsupported(format!(
            "{algorithm} keys in the TPM"
        ))),
        KeyHandle::Pkcs11 { .. } => Err(DeviceError::NotFound(
            "a PKCS#11 key handle is not on the TPM".into(),
        )),
    }
}

/// DER SPKI of a key's public area: P-256 or RSA.
pub(super) fn spki_of(public: &Public) -> Result<PublicKeyDer> {
    match public {
        Public::Rsa {
            parameters, unique, ..
        } => {
            let exponent = match parameters.exponent().value() {
                0 => 65537u32,
                e => e,
            }
            .to_be_bytes();
            let start = exponent.iter().position(|&b| b != 0).unwrap_or(3);
            rsa_spki(unique.value(), &exponent[start..])
        }
        _ => p256_spki(&p256_point(public)?),
    }
}

/// `04 || x || y` of a P-256 public area, each coordinate left-padded to 32 bytes (the TPM may
/// drop leading zeros).
fn p256_point(public: &Public) -> Result<Vec<u8>> {
    let Public::Ecc {
        parameters, unique, ..
    } = public
    else {
        return Err(DeviceError::InvalidBlob("the key is not an ECC key".into()));
    };
    if parameters.ecc_curve() != EccCurve::NistP256 {
        return Err(DeviceError::InvalidBlob("the key is not on P-256".into()));
    }
    let (x, y) = (unique.x().value(), unique.y().value());
    if x.len() > 32 || y.len() > 32 {
        return Err(DeviceError::InvalidBlob(
            "P-256 coordinate longer than 32 bytes".into(),
        ));
    }
    let mut point = vec![0u8; 65];
    point[0] = 0x04;
    point[33 - x.len()..33].copy_from_slice(x);
    point[65 - y.len()..].copy_from_slice(y);
    Ok(point)
}

/// The ticket for signing a digest the TPM did not hash itself; valid for unrestricted keys.
fn null_ticket() -> Result<HashcheckTicket> {
    HashcheckTicket::try_from(TPMT_TK_HASHCHECK {
        tag: TPM2_ST_HASHCHECK,
        hierarchy: TPM2_RH_NULL,
        digest: Default::default(),
    })
    .map_err(|e| map(Op::Sign, e))
}

impl TpmDevice {
    /// The loaded TPM object for a key handle: the cached one, or load it (evicting the cached
    /// one first, since swtpm has three transient slots and the SRK holds one).
    pub(super) fn key_object(&mut self, public: &[u8], private: &[u8]) -> Result<TpmKey> {
        if let Some(cached) = &self.cached_key {
            if cached.public == public && cached.private == private {
                return Ok(cached.handle);
            }
        }
        self.evict_cached_key();
        let area = unmarshal_public(public)?;
        let handle = self.load(area, private)?;
        self.cached_key = Some(CachedKey {
            public: public.to_vec(),
            private: private.to_vec(),
            handle,
        });
        Ok(handle)
    }

    /// The public area as the TPM holds it for a loaded key (not as the caller's blob says).
    pub(super) fn loaded_public(&mut self, handle: &KeyHandle) -> Result<Public> {
        let (public, private) = tpm_blobs(handle)?;
        let object = self.key_object(public, private)?;
        let (area, _, _) = self
            .ctx
            .execute_without_session(|c| c.read_public(object))
            .map_err(|e| map(Op::ReadPublic, e))?;
        Ok(area)
    }
}

impl Signer for TpmDevice {
    fn generate(&mut self, spec: &KeySpec) -> Result<KeyHandle> {
        if !self.info.algorithms.contains(&spec.algorithm) {
            let offered: Vec<&str> = self.info.algorithms.iter().map(|a| a.as_str()).collect();
            return Err(DeviceError::Unsupported(format!(
                "{} keys in this TPM (it makes {})",
                spec.algorithm,
                offered.join(", ")
            )));
        }
        let template = if is_rsa(spec.algorithm) {
            template::rsa_signing_key(spec.algorithm)?
        } else {
            template::ecdsa_p256_signing_key()?
        };
        let srk = self.srk;
        // The key is generated inside the TPM: no secret goes in, so a password session is enough.
        let created = self
            .ctx
            .execute_with_session(Some(AuthSession::Password), |c| {
                c.create(srk, template, None, None, None, None)
            })
            .map_err(|e| map(Op::Create, e))?;
        Ok(KeyHandle::Tpm2 {
            algorithm: spec.algorithm,
            public: created
                .out_public
                .marshall()
                .map_err(|e| map(Op::Create, e))?,
            private: created.out_private.value().to_vec(),
        })
    }

    fn public_key(&mut self, handle: &KeyHandle) -> Result<PublicKeyDer> {
        let area = self.loaded_public(handle)?;
        spki_of(&area)
    }

    fn sign(&mut self, handle: &KeyHandle, input: SignInput<'_>) -> Result<Vec<u8>> {
        let (public, private) = tpm_blobs(handle)?;
        let algorithm = handle.algorithm();
        let sha256: [u8; 32];
        let (hash, digest): (HashingAlgorithm, &[u8]) = match input {
            SignInput::Message(m) => {
                sha256 = Sha256::digest(m).into();
                (HashingAlgorithm::Sha256, &sha256)
            }
            SignInput::Sha256Digest(d) => (HashingAlgorithm::Sha256, d),
            SignInput::Sha512Digest(d) if algorithm == KeyAlgorithm::RsaPkcs1_3072 => {
                (HashingAlgorithm::Sha512, d)
            }
            SignInput::Sha512Digest(_) => {
                return Err(DeviceError::Unsupported(format!(
                    "{algorithm} keys sign SHA-256 digests; SHA-512 is for rsa-pkcs1 keys"
                )))
            }
        };
        let digest = Digest::try_from(digest).map_err(|e| map(Op::Sign, e))?;
        let ticket = null_ticket()?;
        let object = self.key_object(public, private)?;
        let hash_scheme = HashScheme::new(hash);
        let scheme = match algorithm {
            KeyAlgorithm::RsaPss2048 | KeyAlgorithm::RsaPss3072 => {
                SignatureScheme::RsaPss { hash_scheme }
            }
            // The key has no scheme of its own: RSASSA with the hash asked for.
            KeyAlgorithm::RsaPkcs1_3072 => SignatureScheme::RsaSsa { hash_scheme },
            KeyAlgorithm::EcdsaP256 | KeyAlgorithm::Ed25519 => {
                SignatureScheme::EcDsa { hash_scheme }
            }
        };
        let signature = self
            .ctx
            .execute_with_session(Some(AuthSession::Password), |c| {
                c.sign(object, digest, scheme, ticket)
            })
            .map_err(|e| map(Op::Sign, e))?;
        match signature {
            Signature::EcDsa(sig) => {
                ecdsa_p256_rs_to_der(sig.signature_r().value(), sig.signature_s().value())
            }
            // RSA signatures come back raw, as OpenSSL and PKCS#11 tokens give them.
            Signature::RsaPss(sig) | Signature::RsaSsa(sig) => Ok(sig.signature().value().to_vec()),
            other => Err(DeviceError::Backend {
                op: Op::Sign.name(),
                detail: format!("the TPM returned a {:?} signature", other.algorithm()),
            }),
        }
    }

    fn protection(&mut self, handle: &KeyHandle) -> Result<KeyProtection> {
        let attributes = self.loaded_public(handle)?.object_attributes();
        Ok(KeyProtection {
            // With fixedParent clear the key can be duplicated to another parent; with fixedTPM
            // clear, one of its ancestors could be, taking it to another TPM.
            extractable: !(attributes.fixed_tpm() && attributes.fixed_parent()),
            // A TPM never reveals a private key in clear; `private` is encrypted under the SRK.
            sensitive: true,
            generated_on_device: attributes.sensitive_data_origin(),
            // fixedTPM and fixedParent are fixed at creation: never changed since.
            never_extractable: attributes.fixed_tpm() && attributes.fixed_parent(),
            always_sensitive: true,
        })
    }

    fn certify(&mut self, handle: &KeyHandle, nonce: &[u8]) -> Result<Certification> {
        self.certify_key(handle, nonce)
    }

    fn destroy(&mut self, handle: &KeyHandle) -> Result<()> {
        // The key exists only in the caller's blobs; forgetting them destroys it. Just don't
        // keep it loaded.
        if let KeyHandle::Tpm2 {
            public, private, ..
        } = handle
        {
            if self
                .cached_key
                .as_ref()
                .is_some_and(|c| &c.public == public && &c.private == private)
            {
                self.evict_cached_key();
            }
        }
        Ok(())
    }

    fn destroy_generated(&mut self, _spec: &KeySpec) -> Result<usize> {
        // `generate` leaves nothing in the TPM: TPM2_Create hands the key back as public and
        // private blobs and loads nothing, and nothing is made persistent (no EvictControl).
        // A lost handle is a key nobody can ever load: there is nothing to sweep.
        Ok(0)
    }
}
