//! Public keys and signatures into the encodings OpenSSL reads: DER SubjectPublicKeyInfo, PEM,
//! and DER ECDSA signatures. Pure byte work; nothing here touches a device.

use der::asn1::{BitString, ObjectIdentifier};
use der::Encode;
use p256::pkcs8::EncodePublicKey;
use spki::{AlgorithmIdentifierOwned, SubjectPublicKeyInfoOwned};

use crate::{DeviceError, PublicKeyDer, Result};

const OID_ED25519: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.101.112");

fn encoding(what: &str, e: impl std::fmt::Display) -> DeviceError {
    DeviceError::Backend {
        op: "public key encoding",
        detail: format!("{what}: {e}"),
    }
}

/// SPKI for a raw 32-byte Ed25519 public key.
pub(crate) fn ed25519_spki(raw: &[u8]) -> Result<PublicKeyDer> {
    if raw.len() != 32 {
        return Err(encoding(
            "Ed25519 public key",
            format!("{} bytes, want 32", raw.len()),
        ));
    }
    let spki = SubjectPublicKeyInfoOwned {
        algorithm: AlgorithmIdentifierOwned {
            oid: OID_ED25519,
            parameters: None,
        },
        subject_public_key: BitString::from_bytes(raw).map_err(|e| encoding("Ed25519", e))?,
    };
    Ok(PublicKeyDer(
        spki.to_der().map_err(|e| encoding("Ed25519 SPKI", e))?,
    ))
}

/// SPKI for a P-256 point in SEC1 form (`04 || x || y`).
pub(crate) fn p256_spki(sec1: &[u8]) -> Result<PublicKeyDer> {
    let key = p256::PublicKey::from_sec1_bytes(sec1).map_err(|e| encoding("P-256 point", e))?;
    let der = key
        .to_public_key_der()
        .map_err(|e| encoding("P-256 SPKI", e))?;
    Ok(PublicKeyDer(der.as_bytes().to_vec()))
}

/// SPKI for an RSA key from its big-endian modulus and public exponent (the contract's one
/// RSA encoding, which the attestation verifier compares against).
pub(crate) fn rsa_spki(modulus: &[u8], exponent: &[u8]) -> Result<PublicKeyDer> {
    keyward_proto::rsa::spki(modulus, exponent)
        .map(PublicKeyDer)
        .map_err(|e| encoding("RSA SPKI", e))
}

/// An ECDSA P-256 signature from raw `r || s` (what PKCS#11 returns) to DER.
pub(crate) fn ecdsa_p256_raw_to_der(raw: &[u8]) -> Result<Vec<u8>> {
    let sig =
        p256::ecdsa::Signature::from_slice(raw).map_err(|e| encoding("ECDSA signature", e))?;
    Ok(sig.to_der().as_bytes().to_vec())
}

/// An ECDSA P-256 signature from its scalars `r`, `s` (what a TPM returns, possibly shorter than
/// 32 bytes) to DER.
pub(crate) fn ecdsa_p256_rs_to_der(r: &[u8], s: &[u8]) -> Result<Vec<u8>> {
    if r.len() > 32 || s.len() > 32 {
        return Err(encoding("ECDSA signature", "scalar longer than 32 bytes"));
    }
    let mut raw = [0u8; 64];
    raw[32 - r.len()..32].copy_from_slice(r);
    raw[64 - s.len()..].copy_from_slice(s);
    ecdsa_p256_raw_to_der(&raw)
}

/// PEM armour for a DER SPKI.
pub(crate) fn to_pem(der: &[u8]) -> String {
    // Encoding into a String only fails on a length overflow, which a public key can't reach.
    der::pem::encode_string("PUBLIC KEY", der::pem::LineEnding::LF, der).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ed25519_spki_matches_dalek_encoding_prefix() {
        let der = ed25519_spki(&[7u8; 32]).unwrap();
        // RFC 8410 §4: 30 2a 30 05 06 03 2b 65 70 03 21 00 || key
        assert_eq!(
            &der.0[..12],
            &[0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00]
        );
        assert_eq!(&der.0[12..], &[7u8; 32]);
        assert!(der.to_pem().starts_with("-----BEGIN PUBLIC KEY-----\n"));
    }

    #[test]
    fn rsa_spki_has_null_params() {
        let der = rsa_spki(&[0xc5; 384], &[1, 0, 1]).unwrap();
        let parsed = spki::SubjectPublicKeyInfoRef::try_from(der.0.as_slice()).unwrap();
        assert_eq!(parsed.algorithm.oid.to_string(), "1.2.840.113549.1.1.1");
        assert!(parsed.algorithm.parameters.is_some());
    }

    #[test]
    fn short_scalars_are_left_padded() {
        let der = ecdsa_p256_rs_to_der(&[1u8; 31], &[2u8; 32]).unwrap();
        let sig = p256::ecdsa::Signature::from_der(&der).unwrap();
        assert_eq!(sig.r().to_bytes()[0], 0);
        assert!(ed25519_spki(&[0u8; 31]).is_err());
    }
}
