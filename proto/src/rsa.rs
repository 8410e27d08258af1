//! RSA public keys in DER: the PKCS#1 `RSAPublicKey` and the `SubjectPublicKeyInfo` around it.
//! The one encoding and parsing of them in the tree, for the device layer (public keys), the
//! attestation verifier, the signed-PCR-policy keys and the SSH forms.
//!
//! Must not: do anything but byte work on public keys.

use der::asn1::{ObjectIdentifier, UintRef};

/// `SEQUENCE { modulus INTEGER, publicExponent INTEGER }` (RFC 8017 A.1.1).
#[derive(Debug, der::Sequence)]
pub struct RsaPublicKey<'a> {
    pub modulus: UintRef<'a>,
    pub public_exponent: UintRef<'a>,
}

/// `rsaEncryption` (RFC 8017 A.1), the algorithm of an RSA SubjectPublicKeyInfo.
pub const RSA_ENCRYPTION: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");

/// DER SubjectPublicKeyInfo (rsaEncryption, NULL parameters) of an RSA key from its big-endian
/// modulus and public exponent.
///
/// # Errors
/// A DER encoding error (an empty modulus).
pub fn spki(modulus: &[u8], exponent: &[u8]) -> Result<Vec<u8>, der::Error> {
    use der::Encode as _;
    let inner = RsaPublicKey {
        modulus: UintRef::new(modulus)?,
        public_exponent: UintRef::new(exponent)?,
    }
    .to_der()?;
    spki::SubjectPublicKeyInfoOwned {
        algorithm: spki::AlgorithmIdentifierOwned {
            oid: RSA_ENCRYPTION,
            parameters: Some(der::asn1::AnyRef::NULL.into()),
        },
        subject_public_key: der::asn1::BitString::from_bytes(&inner)?,
    }
    .to_der()
}
