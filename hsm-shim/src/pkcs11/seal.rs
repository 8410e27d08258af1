//! Sealing on a PKCS#11 token: the secret is encrypted by a key that never leaves the token.
//!
//! - AES-GCM (default): a token-resident AES-256 key (`CKA_SENSITIVE`, not extractable, encrypt and
//!   decrypt only), a fresh 12-byte IV from the token RNG per seal, AAD binding the format, the
//!   key's `CKA_ID` and the caller's context.
//! - RSA-OAEP for tokens without AES: the plaintext carries the context digest in front of the
//!   secret, checked on unseal. OAEP runs with SHA-1 and MGF1-SHA-1, the only parameters SoftHSM
//!   2.6 and most smart cards accept; OAEP's security rests on the hash as a random oracle, not on
//!   its collision resistance, so SHA-1's collisions do not weaken it.
//!
//! The sealing key is found by `CKA_LABEL` and created on the first seal; each blob names its key
//! by `CKA_ID`, so a later change of label or mode leaves old blobs unsealable.

use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsOaepParams, PkcsOaepSource};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, KeyType, ObjectClass};
use zeroize::Zeroizing;

use super::{map_error, Pkcs11Device, SealMode};
use crate::{
    check_secret_len, context_digest, DeviceError, Pin, Result, SealPolicy, SealedBlob, Sealer,
    SecretBytes,
};

const GCM_IV_LEN: usize = 12;
const GCM_TAG_BITS: u64 = 128;
const RSA_SEAL_BITS: u64 = 3072;

/// AAD of an AES-GCM blob. Its parts before `context` have fixed lengths, so the encoding is
/// unambiguous.
fn gcm_aad(key_id: &[u8], context: &[u8]) -> Vec<u8> {
    let mut aad = Vec::with_capacity(32 + key_id.len() + context.len());
    aad.extend_from_slice(b"keyward pkcs11-aes-gcm/v1\0");
    aad.extend_from_slice(&(key_id.len() as u32).to_be_bytes());
    aad.extend_from_slice(key_id);
    aad.extend_from_slice(context);
    aad
}

fn oaep() -> Mechanism<'static> {
    Mechanism::RsaPkcsOaep(PkcsOaepParams::new(
        MechanismType::SHA1,
        PkcsMgfType::MGF1_SHA1,
        PkcsOaepSource::empty(),
    ))
}

impl Pkcs11Device {
    /// The mode a new seal uses: the configured one, or for `Auto` what the token offers.
    fn seal_mode(&self) -> Result<SealMode> {
        if self.config.seal_mode != SealMode::Auto {
            return Ok(self.config.seal_mode);
        }
        let mechs = self
            .ctx
            .get_mechanism_list(self.slot)
            .map_err(|e| map_error("C_GetMechanismList", e))?;
        if mechs.contains(&MechanismType::AES_GCM) && mechs.contains(&MechanismType::AES_KEY_GEN) {
            Ok(SealMode::AesGcm)
        } else if mechs.contains(&MechanismType::RSA_PKCS_OAEP) {
            Ok(SealMode::RsaOaep)
        } else {
            Err(DeviceError::Unsupported(
                "the token offers neither AES-GCM nor RSA-OAEP for sealing".into(),
            ))
        }
    }

    /// `CKA_ID` of the sealing key for `mode`, creating the key when the token has none.
    fn seal_key(&mut self, mode: SealMode) -> Result<Vec<u8>> {
        let (class, key_type) = match mode {
            SealMode::RsaOaep => (ObjectClass::PRIVATE_KEY, KeyType::RSA),
            SealMode::AesGcm | SealMode::Auto => (ObjectClass::SECRET_KEY, KeyType::AES),
        };
        let label = self.config.seal_key_label.clone();
        let found = self
            .session
            .find_objects(&[
                Attribute::Class(class),
                Attribute::KeyType(key_type),
                Attribute::Label(label.as_bytes().to_vec()),
            ])
            .map_err(|e| map_error("C_FindObjects", e))?;
        if let Some(&h) = found.first() {
            let attrs = self
                .session
                .get_attributes(h, &[cryptoki::object::AttributeType::Id])
                .map_err(|e| map_error("C_GetAttributeValue", e))?;
            if let Some(Attribute::Id(id)) = attrs.into_iter().next() {
                return Ok(id);
            }
            return Err(DeviceError::Backend {
                op: "C_GetAttributeValue",
                detail: format!("sealing key {label:?} has no CKA_ID"),
            });
        }
        let id = self.random(16)?;
        let common = |extra: &[Attribute]| {
            let mut t = vec![
                Attribute::Token(true),
                Attribute::Id(id.clone()),
                Attribute::Label(label.as_bytes().to_vec()),
            ];
            t.extend_from_slice(extra);
            t
        };
        let secret_attrs = [
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Sign(false),
            Attribute::Derive(false),
            Attribute::Unwrap(false),
            Attribute::Decrypt(true),
        ];
        match mode {
            SealMode::RsaOaep => {
                let public = common(&[
                    Attribute::Encrypt(true),
                    Attribute::Verify(false),
                    Attribute::Wrap(false),
                    Attribute::ModulusBits(RSA_SEAL_BITS.into()),
                    Attribute::PublicExponent(vec![1, 0, 1]),
                ]);
                let private = common(&secret_attrs);
                self.session
                    .generate_key_pair(&Mechanism::RsaPkcsKeyPairGen, &public, &private)
                    .map_err(|e| map_error("C_GenerateKeyPair", e))?;
            }
            SealMode::AesGcm | SealMode::Auto => {
                let mut t = common(&secret_attrs);
                t.extend([
                    Attribute::Encrypt(true),
                    Attribute::Wrap(false),
                    Attribute::ValueLen(32.into()),
                ]);
                self.session
                    .generate_key(&Mechanism::AesKeyGen, &t)
                    .map_err(|e| map_error("C_GenerateKey", e))?;
            }
        }
        tracing::info!(label = %label, ?mode, "created the token's sealing key");
        Ok(id)
    }
}

impl Sealer for Pkcs11Device {
    fn seal(
        &mut self,
        secret: &SecretBytes,
        context: &[u8],
        policy: &SealPolicy,
    ) -> Result<SealedBlob> {
        check_secret_len(secret)?;
        if policy.pcrs.is_some() || policy.signed.is_some() {
            return Err(DeviceError::Unsupported("PCR policies need a TPM".into()));
        }
        if policy.pin.is_some() {
            return Err(DeviceError::Unsupported(
                "a PKCS#11 token is guarded by its login PIN, not a per-secret PIN".into(),
            ));
        }
        let mode = self.seal_mode()?;
        let key_id = self.seal_key(mode)?;
        match mode {
            SealMode::RsaOaep => {
                let public = self.find(cryptoki::object::ObjectClass::PUBLIC_KEY, &key_id)?;
                let mut plain = Zeroizing::new(context_digest(context).to_vec());
                plain.extend_from_slice(secret.expose());
                let ciphertext = self
                    .session
                    .encrypt(&oaep(), public, &plain)
                    .map_err(|e| map_error("C_Encrypt", e))?;
                Ok(SealedBlob::Pkcs11RsaOaep { key_id, ciphertext })
            }
            SealMode::AesGcm | SealMode::Auto => {
                let key = self.find(ObjectClass::SECRET_KEY, &key_id)?;
                let mut iv = self.random(GCM_IV_LEN as u32)?;
                let aad = gcm_aad(&key_id, context);
                let params = GcmParams::new(&mut iv, &aad, GCM_TAG_BITS.into()).map_err(|e| {
                    DeviceError::Backend {
                        op: "GCM parameters",
                        detail: format!("{e:?}"),
                    }
                })?;
                let ciphertext = self
                    .session
                    .encrypt(&Mechanism::AesGcm(params), key, secret.expose())
                    .map_err(|e| map_error("C_Encrypt", e))?;
                Ok(SealedBlob::Pkcs11AesGcm {
                    key_id,
                    iv,
                    ciphertext,
                })
            }
        }
    }

    fn unseal(
        &mut self,
        blob: &SealedBlob,
        context: &[u8],
        pin: Option<&Pin>,
    ) -> Result<SecretBytes> {
        if pin.is_some() {
            return Err(DeviceError::Unsupported(
                "a PKCS#11 token is guarded by its login PIN, not a per-secret PIN".into(),
            ));
        }
        match blob {
            SealedBlob::Pkcs11AesGcm {
                key_id,
                iv,
                ciphertext,
            } => {
                if iv.len() != GCM_IV_LEN {
                    return Err(DeviceError::InvalidBlob(format!(
                        "GCM IV of {} bytes",
                        iv.len()
                    )));
                }
                let key = self.find(ObjectClass::SECRET_KEY, key_id)?;
                let mut iv = iv.clone();
                let aad = gcm_aad(key_id, context);
                let params = GcmParams::new(&mut iv, &aad, GCM_TAG_BITS.into()).map_err(|e| {
                    DeviceError::Backend {
                        op: "GCM parameters",
                        detail: format!("{e:?}"),
                    }
                })?;
                let plain = self
                    .session
                    .decrypt(&Mechanism::AesGcm(params), key, ciphertext)
                    .map(Zeroizing::new)
                    .map_err(|e| map_error("C_Decrypt", e))?;
                Ok(SecretBytes::from(plain))
            }
            SealedBlob::Pkcs11RsaOaep { key_id, ciphertext } => {
                let key = self.find(ObjectClass::PRIVATE_KEY, key_id)?;
                let plain = self
                    .session
                    .decrypt(&oaep(), key, ciphertext)
                    .map(Zeroizing::new)
                    .map_err(|e| map_error("C_Decrypt", e))?;
                let digest = context_digest(context);
                match plain.split_at_checked(digest.len()) {
                    Some((d, secret)) if d == digest => Ok(SecretBytes::new(secret.to_vec())),
                    _ => Err(DeviceError::InvalidBlob(
                        "sealed for another context than the one given".into(),
                    )),
                }
            }
            SealedBlob::Tpm2 { .. } => Err(DeviceError::InvalidBlob(
                "a TPM blob given to a PKCS#11 token".into(),
            )),
        }
    }
}
