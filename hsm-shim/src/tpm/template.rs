//! The fixed public templates Keyward creates TPM objects from (storage root key, sealed-data
//! object, signing key) and the PCR selection they are bound to.
//!
//! These are part of the stored format: the SRK is *re-created* from its template on every open,
//! so changing a single bit of it orphans every blob sealed before. Treat a change here as a new
//! blob format version.

use tss_esapi::attributes::ObjectAttributesBuilder;
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, PublicAlgorithm};
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::key_bits::RsaKeyBits;
use tss_esapi::structures::{
    Digest, EccParameter, EccPoint, EccScheme, HashScheme, KeyedHashScheme, PcrSelectionList,
    PcrSelectionListBuilder, PcrSlot, Public, PublicBuilder, PublicEccParametersBuilder,
    PublicKeyRsa, PublicKeyedHashParameters, PublicRsaParameters, PublicRsaParametersBuilder,
    RsaExponent, RsaScheme, SymmetricDefinitionObject,
};

use super::error::{map, Op};
use crate::{DeviceError, KeyAlgorithm, Result};

/// Highest PCR index of the sha256 bank a PC-client TPM has.
pub(super) const MAX_PCR: u8 = 23;

/// The all-zero `unique` (32+32 bytes) of a primary ECC key made from a fixed template: with
/// it, the same template under the same seed gives the same key on every call.
fn zero_unique() -> Result<EccPoint> {
    let zero = || EccParameter::try_from(vec![0u8; 32]).map_err(|e| map(Op::CreatePrimary, e));
    Ok(EccPoint::new(zero()?, zero()?))
}

/// The storage root key: ECC P-256, restricted decrypt, AES-128-CFB for its children, as in the
/// TCG "TPM v2.0 Provisioning Guidance" SRK template (including `noDA` and an all-zero
/// `unique` of 32+32 bytes). The same template under the same owner seed yields the same key,
/// which is what lets us keep no TPM state of our own.
pub fn srk() -> Result<Public> {
    let attributes = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_no_da(true)
        .with_restricted(true)
        .with_decrypt(true)
        .build()
        .map_err(|e| map(Op::CreatePrimary, e))?;
    let unique = zero_unique()?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Ecc)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attributes)
        .with_ecc_parameters(
            PublicEccParametersBuilder::new_restricted_decryption_key(
                SymmetricDefinitionObject::AES_128_CFB,
                EccCurve::NistP256,
            )
            .build()
            .map_err(|e| map(Op::CreatePrimary, e))?,
        )
        .with_ecc_unique_identifier(unique)
        .build()
        .map_err(|e| map(Op::CreatePrimary, e))
}

/// A sealed-data object whose only way in is its policy.
///
/// `user_with_auth = false` and `admin_with_policy` make the policy (PCRs, and the PIN through
/// PolicyAuthValue) mandatory for every role. `no_da` is set only without a PIN: an object that
/// has a PIN must count wrong guesses towards dictionary-attack lockout, one without has nothing
/// to guess and must not be able to lock the TPM.
pub(super) fn sealed_object(policy_digest: Digest, has_pin: bool) -> Result<Public> {
    let attributes = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_admin_with_policy(true)
        .with_user_with_auth(false)
        .with_no_da(!has_pin)
        .build()
        .map_err(|e| map(Op::Create, e))?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::KeyedHash)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attributes)
        .with_auth_policy(policy_digest)
        .with_keyed_hash_parameters(PublicKeyedHashParameters::new(KeyedHashScheme::Null))
        .with_keyed_hash_unique_identifier(Digest::default())
        .build()
        .map_err(|e| map(Op::Create, e))
}

/// An unrestricted ECDSA-P256/SHA-256 signing key, generated in the TPM, never leaving it
/// (`fixed_tpm`, `fixed_parent`), with an empty auth value: who may sign is the daemon's policy,
/// and a password session keeps signing at one round trip.
pub fn ecdsa_p256_signing_key() -> Result<Public> {
    let attributes = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_sign_encrypt(true)
        .build()
        .map_err(|e| map(Op::Create, e))?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Ecc)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attributes)
        .with_ecc_parameters(
            PublicEccParametersBuilder::new_unrestricted_signing_key(
                EccScheme::EcDsa(HashScheme::new(HashingAlgorithm::Sha256)),
                EccCurve::NistP256,
            )
            .build()
            .map_err(|e| map(Op::Create, e))?,
        )
        .with_ecc_unique_identifier(EccPoint::default())
        .build()
        .map_err(|e| map(Op::Create, e))
}

/// An unrestricted RSA signing key of `algorithm` (RSASSA-PSS 2048/3072, or PKCS#1 v1.5
/// 3072), with the same protections as [`ecdsa_p256_signing_key`]. The exponent is the TPM's
/// default, 65537.
pub fn rsa_signing_key(algorithm: KeyAlgorithm) -> Result<Public> {
    let attributes = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_sign_encrypt(true)
        .build()
        .map_err(|e| map(Op::Create, e))?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Rsa)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attributes)
        .with_rsa_parameters(rsa_parameters(algorithm)?)
        .with_rsa_unique_identifier(PublicKeyRsa::default())
        .build()
        .map_err(|e| map(Op::Create, e))
}

/// The parameters of [`rsa_signing_key`], also what `TPM2_TestParms` is asked about. A PSS key
/// is fixed to RSASSA-PSS/SHA-256. A PKCS#1 v1.5 key has no scheme of its own (NULL), so that
/// each `TPM2_Sign` names RSASSA with the hash the caller asked for: SSH wants SHA-512 as well
/// as SHA-256, and a key fixed to one scheme refuses the other.
pub(super) fn rsa_parameters(algorithm: KeyAlgorithm) -> Result<PublicRsaParameters> {
    let (scheme, bits) = match algorithm {
        KeyAlgorithm::RsaPss2048 => (
            RsaScheme::RsaPss(HashScheme::new(HashingAlgorithm::Sha256)),
            RsaKeyBits::Rsa2048,
        ),
        KeyAlgorithm::RsaPss3072 => (
            RsaScheme::RsaPss(HashScheme::new(HashingAlgorithm::Sha256)),
            RsaKeyBits::Rsa3072,
        ),
        KeyAlgorithm::RsaPkcs1_3072 => (RsaScheme::Null, RsaKeyBits::Rsa3072),
        KeyAlgorithm::Ed25519 | KeyAlgorithm::EcdsaP256 => {
            return Err(DeviceError::Unsupported(format!(
                "{algorithm} is not an RSA algorithm"
            )))
        }
    };
    PublicRsaParametersBuilder::new_unrestricted_signing_key(scheme, bits, RsaExponent::default())
        .build()
        .map_err(|e| map(Op::Create, e))
}

/// The attestation key (AK): ECC P-256, ECDSA-SHA256, **restricted** signing, under the
/// endorsement hierarchy, with an all-zero `unique` like the SRK's. Restricted: the TPM signs
/// with it only digests it computed itself of structures it made (`TPMS_ATTEST`, which start
/// with `TPM_GENERATED_VALUE`), so nothing a caller hands in can pass for an attestation. The
/// same template under the same endorsement seed yields the same key on every call, so the
/// AK's public key identifies the TPM until its endorsement seed is changed (TPM2_Clear keeps
/// it; TPM2_ChangeEPS does not).
pub fn attestation_key() -> Result<Public> {
    let attributes = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_no_da(true)
        .with_restricted(true)
        .with_sign_encrypt(true)
        .build()
        .map_err(|e| map(Op::CreatePrimary, e))?;
    let unique = zero_unique()?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Ecc)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attributes)
        .with_ecc_parameters(
            PublicEccParametersBuilder::new_unrestricted_signing_key(
                EccScheme::EcDsa(HashScheme::new(HashingAlgorithm::Sha256)),
                EccCurve::NistP256,
            )
            .with_restricted(true)
            .build()
            .map_err(|e| map(Op::CreatePrimary, e))?,
        )
        .with_ecc_unique_identifier(unique)
        .build()
        .map_err(|e| map(Op::CreatePrimary, e))
}

/// Check a PCR list: non-empty, indices `0..=23`, no repeats. Returns it sorted (the canonical
/// form stored in blobs; the TPM digests PCRs in index order whatever the list order).
///
/// An empty list is refused so that a missing setting can never seal a secret bound to nothing.
pub(super) fn check_pcrs(pcrs: &[u8]) -> std::result::Result<Vec<u8>, String> {
    if pcrs.is_empty() {
        return Err("the PCR list is empty; a TPM seal binds to at least one PCR".into());
    }
    let mut sorted = pcrs.to_vec();
    sorted.sort_unstable();
    if let Some(bad) = sorted.iter().find(|&&p| p > MAX_PCR) {
        return Err(format!("PCR {bad} does not exist (0 to {MAX_PCR})"));
    }
    if sorted.windows(2).any(|w| w[0] == w[1]) {
        return Err(format!("PCR list {pcrs:?} names a PCR twice"));
    }
    Ok(sorted)
}

/// The sha256-bank selection of `pcrs` (already checked by [`check_pcrs`]).
pub(super) fn pcr_selection(pcrs: &[u8]) -> Result<PcrSelectionList> {
    let slots = pcrs
        .iter()
        .map(|&p| PcrSlot::try_from(1u32 << u32::from(p)))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| map(Op::Policy, e))?;
    PcrSelectionListBuilder::new()
        .with_selection(HashingAlgorithm::Sha256, &slots)
        .build()
        .map_err(|e| map(Op::Policy, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pcr_lists() {
        assert_eq!(check_pcrs(&[7]).unwrap(), vec![7]);
        assert_eq!(check_pcrs(&[14, 0, 7]).unwrap(), vec![0, 7, 14]);
        assert!(check_pcrs(&[]).is_err());
        assert!(check_pcrs(&[24]).is_err());
        assert!(check_pcrs(&[7, 7]).is_err());
        assert!(pcr_selection(&[0, 7, 23]).is_ok());
    }

    #[test]
    fn templates_build() {
        let srk = srk().unwrap();
        assert!(srk.object_attributes().restricted());
        let sealed = sealed_object(Digest::try_from(vec![1u8; 32]).unwrap(), true).unwrap();
        assert!(!sealed.object_attributes().no_da());
        assert!(!sealed.object_attributes().user_with_auth());
        let sealed = sealed_object(Digest::default(), false).unwrap();
        assert!(sealed.object_attributes().no_da());
        assert!(ecdsa_p256_signing_key()
            .unwrap()
            .object_attributes()
            .sign_encrypt());
        let ak = attestation_key().unwrap().object_attributes();
        assert!(ak.restricted() && ak.sign_encrypt() && ak.fixed_tpm() && !ak.decrypt());
        let rsa = rsa_signing_key(KeyAlgorithm::RsaPss2048).unwrap();
        assert!(rsa.object_attributes().sensitive_data_origin());
    }
}
