//! Key pairs on a PKCS#11 token: generate, read the public half, read the protection flags,
//! destroy (by handle, or by label and id when the handle was lost). Private keys are generated
//! on the token as sensitive and non-extractable. Nothing here touches an object it did not
//! name exactly: other applications may share the token.

use cryptoki::context::Pkcs11;
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, ObjectClass};
use cryptoki::slot::Slot;

use super::{map_error, Pkcs11Device};
use crate::{
    pubkey, DeviceError, KeyAlgorithm, KeyHandle, KeyProtection, KeySpec, PublicKeyDer, Result,
};

/// DER of the Ed25519 curve OID 1.3.101.112 (`CKA_EC_PARAMS`).
const ED25519_PARAMS: [u8; 5] = [0x06, 0x03, 0x2b, 0x65, 0x70];
/// DER of the P-256 curve OID 1.2.840.10045.3.1.7 (`CKA_EC_PARAMS`).
const P256_PARAMS: [u8; 10] = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

/// The algorithms the token in `slot` can generate and sign with, asked mechanism by
/// mechanism (`C_GetMechanismInfo`; reading the whole list would have cryptoki log an error
/// for every vendor mechanism it has no name for): what `keyward status` shows.
pub(super) fn algorithms(ctx: &Pkcs11, slot: Slot) -> Vec<KeyAlgorithm> {
    let has = |wanted: &[MechanismType]| {
        wanted
            .iter()
            .all(|&m| ctx.get_mechanism_info(slot, m).is_ok())
    };
    KeyAlgorithm::ALL
        .into_iter()
        .filter(|algorithm| match algorithm {
            KeyAlgorithm::Ed25519 => has(&[
                MechanismType::ECC_EDWARDS_KEY_PAIR_GEN,
                MechanismType::EDDSA,
            ]),
            KeyAlgorithm::EcdsaP256 => {
                has(&[MechanismType::ECC_KEY_PAIR_GEN, MechanismType::ECDSA])
            }
            KeyAlgorithm::RsaPss3072 | KeyAlgorithm::RsaPss2048 => has(&[
                MechanismType::RSA_PKCS_KEY_PAIR_GEN,
                MechanismType::SHA256_RSA_PKCS_PSS,
            ]),
            KeyAlgorithm::RsaPkcs1_3072 => has(&[
                MechanismType::RSA_PKCS_KEY_PAIR_GEN,
                MechanismType::SHA256_RSA_PKCS,
            ]),
        })
        .collect()
}

/// The `CKA_ID` and algorithm of a token key's handle.
pub(super) fn key_id(handle: &KeyHandle) -> Result<(&[u8], KeyAlgorithm)> {
    match handle {
        KeyHandle::Pkcs11 { algorithm, id } => Ok((id, *algorithm)),
        KeyHandle::Tpm2 { .. } => Err(DeviceError::InvalidBlob(
            "a TPM key handle given to a PKCS#11 token".into(),
        )),
    }
}

impl Pkcs11Device {
    /// Generate a key pair for `spec` on the token.
    pub(super) fn generate_pair(&mut self, spec: &KeySpec) -> Result<KeyHandle> {
        let id = match &spec.id {
            Some(id) => id.clone(),
            None => self.random(16)?,
        };
        let label = spec.label.as_bytes().to_vec();
        let mut public = vec![
            Attribute::Token(true),
            Attribute::Private(false),
            Attribute::Verify(true),
            Attribute::Encrypt(false),
            Attribute::Wrap(false),
            Attribute::Id(id.clone()),
            Attribute::Label(label.clone()),
        ];
        let private = vec![
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Sign(true),
            Attribute::Decrypt(false),
            Attribute::Unwrap(false),
            Attribute::Derive(false),
            Attribute::Id(id.clone()),
            Attribute::Label(label),
        ];
        let mechanism = match spec.algorithm {
            KeyAlgorithm::Ed25519 => {
                public.push(Attribute::EcParams(ED25519_PARAMS.to_vec()));
                Mechanism::EccEdwardsKeyPairGen
            }
            KeyAlgorithm::EcdsaP256 => {
                public.push(Attribute::EcParams(P256_PARAMS.to_vec()));
                Mechanism::EccKeyPairGen
            }
            KeyAlgorithm::RsaPss3072 | KeyAlgorithm::RsaPkcs1_3072 | KeyAlgorithm::RsaPss2048 => {
                let bits: u64 = if spec.algorithm == KeyAlgorithm::RsaPss2048 {
                    2048
                } else {
                    3072
                };
                public.push(Attribute::ModulusBits(bits.into()));
                public.push(Attribute::PublicExponent(vec![1, 0, 1]));
                Mechanism::RsaPkcsKeyPairGen
            }
        };
        self.session
            .generate_key_pair(&mechanism, &public, &private)
            .map_err(|e| match map_error("C_GenerateKeyPair", e) {
                DeviceError::Unsupported(d) => {
                    DeviceError::Unsupported(format!("{} on this token ({d})", spec.algorithm))
                }
                other => other,
            })?;
        Ok(KeyHandle::Pkcs11 {
            algorithm: spec.algorithm,
            id,
        })
    }

    pub(super) fn read_public(&mut self, handle: &KeyHandle) -> Result<PublicKeyDer> {
        let (id, algorithm) = key_id(handle)?;
        let object = self.find(ObjectClass::PUBLIC_KEY, id)?;
        let wanted: &[AttributeType] = match algorithm {
            KeyAlgorithm::RsaPss3072 | KeyAlgorithm::RsaPkcs1_3072 | KeyAlgorithm::RsaPss2048 => {
                &[AttributeType::Modulus, AttributeType::PublicExponent]
            }
            KeyAlgorithm::Ed25519 | KeyAlgorithm::EcdsaP256 => &[AttributeType::EcPoint],
        };
        let attrs = self
            .session
            .get_attributes(object, wanted)
            .map_err(|e| map_error("C_GetAttributeValue", e))?;
        let (mut modulus, mut exponent, mut point) = (None, None, None);
        for a in attrs {
            match a {
                Attribute::Modulus(m) => modulus = Some(m),
                Attribute::PublicExponent(e) => exponent = Some(e),
                Attribute::EcPoint(p) => point = Some(p),
                _ => {}
            }
        }
        let missing = |what: &str| DeviceError::Backend {
            op: "C_GetAttributeValue",
            detail: format!("public key has no {what}"),
        };
        match algorithm {
            KeyAlgorithm::RsaPss3072 | KeyAlgorithm::RsaPkcs1_3072 | KeyAlgorithm::RsaPss2048 => {
                pubkey::rsa_spki(
                    &modulus.ok_or_else(|| missing("CKA_MODULUS"))?,
                    &exponent.ok_or_else(|| missing("CKA_PUBLIC_EXPONENT"))?,
                )
            }
            KeyAlgorithm::Ed25519 => {
                let point = point.ok_or_else(|| missing("CKA_EC_POINT"))?;
                pubkey::ed25519_spki(unwrap_octet_string(&point, 32))
            }
            KeyAlgorithm::EcdsaP256 => {
                let point = point.ok_or_else(|| missing("CKA_EC_POINT"))?;
                pubkey::p256_spki(unwrap_octet_string(&point, 65))
            }
        }
    }

    pub(super) fn read_protection(&mut self, handle: &KeyHandle) -> Result<KeyProtection> {
        let (id, _) = key_id(handle)?;
        let object = self.find(ObjectClass::PRIVATE_KEY, id)?;
        let attrs = self
            .session
            .get_attributes(
                object,
                &[
                    AttributeType::Extractable,
                    AttributeType::Sensitive,
                    AttributeType::Local,
                    AttributeType::NeverExtractable,
                    AttributeType::AlwaysSensitive,
                ],
            )
            .map_err(|e| map_error("C_GetAttributeValue", e))?;
        // Absent flags count against the key: a token that won't say is not trusted to protect.
        let mut p = KeyProtection {
            extractable: true,
            sensitive: false,
            generated_on_device: false,
            never_extractable: false,
            always_sensitive: false,
        };
        for a in attrs {
            match a {
                Attribute::Extractable(v) => p.extractable = v,
                Attribute::Sensitive(v) => p.sensitive = v,
                Attribute::Local(v) => p.generated_on_device = v,
                Attribute::NeverExtractable(v) => p.never_extractable = v,
                Attribute::AlwaysSensitive(v) => p.always_sensitive = v,
                _ => {}
            }
        }
        Ok(p)
    }

    pub(super) fn destroy_pair(&mut self, handle: &KeyHandle) -> Result<()> {
        let (id, _) = key_id(handle)?;
        let id = id.to_vec();
        let objects = self
            .session
            .find_objects(&[Attribute::Id(id.clone())])
            .map_err(|e| map_error("C_FindObjects", e))?;
        for object in objects {
            self.session
                .destroy_object(object)
                .map_err(|e| map_error("C_DestroyObject", e))?;
        }
        self.handles.forget(&id);
        Ok(())
    }

    /// The objects labelled `spec.label` with `CKA_ID` `spec.id`, destroyed; how many.
    pub(super) fn destroy_by_spec(&mut self, spec: &KeySpec) -> Result<usize> {
        let Some(id) = &spec.id else {
            return Err(DeviceError::InvalidArgument(
                "finding a generated key without its handle needs the id it was given".into(),
            ));
        };
        let objects = self
            .session
            .find_objects(&[
                Attribute::Id(id.clone()),
                Attribute::Label(spec.label.as_bytes().to_vec()),
            ])
            .map_err(|e| map_error("C_FindObjects", e))?;
        for &object in &objects {
            self.session
                .destroy_object(object)
                .map_err(|e| map_error("C_DestroyObject", e))?;
        }
        self.handles.forget(id);
        Ok(objects.len())
    }
}

/// `CKA_EC_POINT` is a DER OCTET STRING around the point (PKCS#11 2.40 §2.3.3), though some
/// tokens return the bare point. Tell them apart by length, not by the first byte: an
/// uncompressed point also starts with 0x04.
fn unwrap_octet_string(value: &[u8], point_len: usize) -> &[u8] {
    if value.len() == point_len + 2 && value[0] == 0x04 && usize::from(value[1]) == point_len {
        &value[2..]
    } else {
        value
    }
}
