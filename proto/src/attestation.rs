//! Key attestation documents (`keyward key attest`) and their offline verifier
//! (`keyward key verify-attestation`).
//!
//! Two formats, one document type ([`Attestation`]):
//! - `tpm2-certify/v1`: the TPM's own statement (`TPM2_Certify`) that it holds the key, signed
//!   by an attestation key (AK) the TPM made from a fixed template. The verifier parses the
//!   signed `TPMS_ATTEST` bytes itself (TPM 2.0 Part 2 §10.12, a small bounded parser: no TSS
//!   here), checks that the certified name is the name of the key's `TPMT_PUBLIC`, that this
//!   public area says fixedTPM, fixedParent and sensitiveDataOrigin (made inside this TPM,
//!   never leaves it) and carries the public key the daemon reports, that the AK is a
//!   restricted signing key, that the AK signed it and that the nonce is the caller's.
//! - `pkcs11-attributes/v1`: what a PKCS#11 token says about the key (`CKA_LOCAL`,
//!   `CKA_NEVER_EXTRACTABLE`, `CKA_ALWAYS_SENSITIVE`, ...), signed by the vault's audit key
//!   (Ed25519). This is Keyward's word on what the token reported, not the hardware's: a token
//!   like SoftHSM has no attestation of its own.
//!
//! Trust: a document names its signer's public key; it proves something only to whoever
//! checks that key against one they trust (`signer`: an AK recorded when the machine was
//! enrolled, or its EK certificate chain; the audit key `keyward status` shows). Without it
//! the verifier still checks that the document is consistent and says the signer was not pinned.
//!
//! Must not: do I/O, or trust any length in the bytes it parses before checking it.

use std::fmt;

use ed25519_dalek::Verifier as _;
use p256::pkcs8::{DecodePublicKey as _, EncodePublicKey as _};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::api::Bytes;
use crate::kinds::KeyAlgorithm;

/// Largest nonce: a `TPM2B_DATA` holds at most a SHA-512 digest's worth.
pub const MAX_NONCE: usize = 64;

/// Largest `TPMS_ATTEST` or `TPMT_PUBLIC` the verifier reads (a TPM's are well under 1 KiB).
const MAX_BLOB: usize = 4096;

/// `TPM_GENERATED_VALUE`: the magic a TPM puts at the start of every attestation it signs.
const TPM_GENERATED: u32 = 0xff54_4347;
/// `TPM_ST_ATTEST_CERTIFY`.
const ST_ATTEST_CERTIFY: u16 = 0x8017;
/// `TPM_ALG_SHA256`, the name algorithm of every object Keyward makes.
const ALG_SHA256: u16 = 0x000b;
const ALG_RSA: u16 = 0x0001;
const ALG_ECC: u16 = 0x0023;
const ALG_NULL: u16 = 0x0010;
const ALG_ECDAA: u16 = 0x001a;
const ALG_RSAES: u16 = 0x0015;
#[cfg(test)]
const ALG_ECDSA: u16 = 0x0018;
const ECC_NIST_P256: u16 = 0x0003;

/// `TPMA_OBJECT` bits (Part 2 §8.3).
pub mod object_attributes {
    pub const FIXED_TPM: u32 = 1 << 1;
    pub const FIXED_PARENT: u32 = 1 << 4;
    pub const SENSITIVE_DATA_ORIGIN: u32 = 1 << 5;
    pub const RESTRICTED: u32 = 1 << 16;
    pub const DECRYPT: u32 = 1 << 17;
    pub const SIGN: u32 = 1 << 18;
}
use object_attributes as oa;

/// Which kind of attestation a document is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Format {
    /// `TPM2_Certify` by a TPM attestation key.
    #[serde(rename = "tpm2-certify/v1")]
    Tpm2Certify,
    /// A PKCS#11 token's attributes, signed by the vault's audit key.
    #[serde(rename = "pkcs11-attributes/v1")]
    Pkcs11Attributes,
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tpm2Certify => "tpm2-certify/v1",
            Self::Pkcs11Attributes => "pkcs11-attributes/v1",
        })
    }
}

/// What a PKCS#11 token reports about a private key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pkcs11Attributes {
    /// `CKA_LOCAL`: generated on the token.
    pub local: bool,
    /// `CKA_NEVER_EXTRACTABLE`: has never been extractable.
    pub never_extractable: bool,
    /// `CKA_ALWAYS_SENSITIVE`: has always been sensitive.
    pub always_sensitive: bool,
    /// `CKA_EXTRACTABLE`.
    pub extractable: bool,
    /// `CKA_SENSITIVE`.
    pub sensitive: bool,
}

impl Pkcs11Attributes {
    fn bits(self) -> u8 {
        u8::from(self.local)
            | u8::from(self.never_extractable) << 1
            | u8::from(self.always_sensitive) << 2
            | u8::from(self.extractable) << 3
            | u8::from(self.sensitive) << 4
    }
}

/// An attestation of one key, as `AttestKey` returns it and `keyward key attest` writes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attestation {
    pub format: Format,
    /// The key's name in the vault.
    pub key: String,
    /// The configured device that holds it.
    pub device: String,
    pub algorithm: KeyAlgorithm,
    /// The key's public key as the daemon reports it (DER SubjectPublicKeyInfo).
    pub public_key: Bytes,
    /// The caller's nonce (or one the daemon picked), bound into the signature.
    pub nonce: Bytes,
    /// Who signed: the TPM attestation key (ECDSA P-256) or the audit key (Ed25519), DER SPKI.
    pub signer_public_key: Bytes,
    /// ECDSA DER (TPM) or Ed25519 raw 64 bytes (PKCS#11).
    pub signature: Bytes,
    /// tpm2: the signed `TPMS_ATTEST` (the contents of the `TPM2B_ATTEST`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attest: Option<Bytes>,
    /// tpm2: the key's `TPMT_PUBLIC`, whose SHA-256 is the certified name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_public_area: Option<Bytes>,
    /// tpm2: the attestation key's `TPMT_PUBLIC`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signer_public_area: Option<Bytes>,
    /// tpm2: the endorsement key certificates the TPM holds (DER X.509), if any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ek_certificates: Vec<Bytes>,
    /// pkcs11: what the token reports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attributes: Option<Pkcs11Attributes>,
    /// What the document does and does not prove, in words.
    pub note: String,
}

/// The note a TPM document carries.
pub const TPM_NOTE: &str = "TPM2_Certify by an attestation key the TPM re-creates from a fixed \
template; trust it as far as you trust signer_public_key (pin it, or check it against the \
TPM's endorsement key certificate)";

/// The note a PKCS#11 document carries.
pub const PKCS11_NOTE: &str = "the token's own attributes, signed by this vault's audit key: \
Keyward's word on what the token reported, not a hardware attestation (SoftHSM and most \
PKCS#11 tokens offer none)";

/// Why a document was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttestationError {
    #[error("malformed attestation: {0}")]
    Malformed(String),
    #[error("the nonce is not the one expected")]
    NonceMismatch,
    #[error("the signature does not verify with the signer's public key")]
    BadSignature,
    #[error("the signer is not the pinned key")]
    SignerMismatch,
    #[error("the signer is not a TPM attestation key: {0}")]
    SignerNotAnAttestationKey(String),
    #[error("the certified name is not the name of the key's public area")]
    NameMismatch,
    #[error("the public key in the attestation is not the key's public key")]
    PublicKeyMismatch,
    #[error("the key was not generated inside the device, or can leave it: {0}")]
    NotDeviceBound(String),
}

fn malformed(why: impl Into<String>) -> AttestationError {
    AttestationError::Malformed(why.into())
}

/// What a successful verification established.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Verified {
    pub format: Format,
    pub key: String,
    pub algorithm: KeyAlgorithm,
    /// The signer was checked against a key the verifier was given.
    pub signer_pinned: bool,
    /// The nonce was checked against one the verifier was given.
    pub nonce_checked: bool,
    /// The statement comes from the device itself (TPM), not from Keyward.
    pub hardware: bool,
}

/// Check `doc` offline. `nonce`: the nonce the caller gave (freshness); `signer`: the DER SPKI
/// of the AK or audit key the caller trusts; `public_key`: the DER SPKI the caller expects the
/// key to have. Each `None` skips that comparison, and [`Verified`] says so.
///
/// # Errors
/// [`AttestationError`] saying the first check that failed.
pub fn verify(
    doc: &Attestation,
    nonce: Option<&[u8]>,
    signer: Option<&[u8]>,
    public_key: Option<&[u8]>,
) -> Result<Verified, AttestationError> {
    if nonce.is_some_and(|n| n != doc.nonce.0.as_slice()) {
        return Err(AttestationError::NonceMismatch);
    }
    if signer.is_some_and(|s| s != doc.signer_public_key.0.as_slice()) {
        return Err(AttestationError::SignerMismatch);
    }
    if public_key.is_some_and(|k| k != doc.public_key.0.as_slice()) {
        return Err(AttestationError::PublicKeyMismatch);
    }
    match doc.format {
        Format::Tpm2Certify => verify_tpm(doc)?,
        Format::Pkcs11Attributes => verify_pkcs11(doc)?,
    }
    Ok(Verified {
        format: doc.format,
        key: doc.key.clone(),
        algorithm: doc.algorithm,
        signer_pinned: signer.is_some(),
        nonce_checked: nonce.is_some(),
        hardware: doc.format == Format::Tpm2Certify,
    })
}

fn verify_tpm(doc: &Attestation) -> Result<(), AttestationError> {
    fn field<'a>(f: &'a Option<Bytes>, name: &str) -> Result<&'a [u8], AttestationError> {
        f.as_ref()
            .map(|b| b.0.as_slice())
            .ok_or_else(|| malformed(format!("a tpm2 attestation has no {name}")))
    }
    let attest_bytes = field(&doc.attest, "attest")?;
    let key_area = field(&doc.key_public_area, "key_public_area")?;
    let ak_area = field(&doc.signer_public_area, "signer_public_area")?;

    // The signer: a restricted signing key that never leaves its TPM, whose public area
    // carries the public key the document names. Restricted means the TPM signs with it only
    // what it made itself (a TPMS_ATTEST starting with TPM_GENERATED_VALUE), so no one could
    // have had it sign a forged attestation.
    let ak = TpmPublic::parse(ak_area)?;
    let need =
        oa::RESTRICTED | oa::SIGN | oa::FIXED_TPM | oa::FIXED_PARENT | oa::SENSITIVE_DATA_ORIGIN;
    if ak.attributes & need != need || ak.attributes & oa::DECRYPT != 0 {
        return Err(AttestationError::SignerNotAnAttestationKey(format!(
            "attributes {:#010x}",
            ak.attributes
        )));
    }
    let ak_spki = ak.spki()?;
    if ak_spki != doc.signer_public_key.0 {
        return Err(AttestationError::SignerNotAnAttestationKey(
            "its public area does not hold signer_public_key".into(),
        ));
    }
    let ak_key = p256::ecdsa::VerifyingKey::from_public_key_der(&ak_spki)
        .map_err(|_| AttestationError::SignerNotAnAttestationKey("not a P-256 key".into()))?;
    let signature = p256::ecdsa::Signature::from_der(&doc.signature.0)
        .map_err(|_| malformed("the signature is not a DER ECDSA signature"))?;
    use p256::ecdsa::signature::Verifier as _;
    ak_key
        .verify(attest_bytes, &signature)
        .map_err(|_| AttestationError::BadSignature)?;

    let attest = CertifyInfo::parse(attest_bytes)?;
    if attest.extra_data != doc.nonce.0 {
        return Err(AttestationError::NonceMismatch);
    }
    if attest.signer_name != ak_qualified_name(ak_area) {
        return Err(AttestationError::SignerNotAnAttestationKey(
            "the attestation names another signer, or one outside the endorsement hierarchy".into(),
        ));
    }
    if attest.name != name_of(key_area) {
        return Err(AttestationError::NameMismatch);
    }

    let key = TpmPublic::parse(key_area)?;
    let mut missing = Vec::new();
    for (bit, what) in [
        (oa::FIXED_TPM, "fixedTPM"),
        (oa::FIXED_PARENT, "fixedParent"),
        (oa::SENSITIVE_DATA_ORIGIN, "sensitiveDataOrigin"),
    ] {
        if key.attributes & bit == 0 {
            missing.push(what);
        }
    }
    if !missing.is_empty() {
        return Err(AttestationError::NotDeviceBound(format!(
            "{} clear in the key's public area",
            missing.join(", ")
        )));
    }
    if key.spki()? != doc.public_key.0 {
        return Err(AttestationError::PublicKeyMismatch);
    }
    let fits = match (&key.key, doc.algorithm) {
        (PublicKey::EccP256 { .. }, KeyAlgorithm::EcdsaP256) => true,
        (PublicKey::Rsa { modulus, .. }, KeyAlgorithm::RsaPss2048) => modulus.len() == 256,
        (
            PublicKey::Rsa { modulus, .. },
            KeyAlgorithm::RsaPss3072 | KeyAlgorithm::RsaPkcs1_3072,
        ) => modulus.len() == 384,
        _ => false,
    };
    if !fits {
        return Err(malformed(format!(
            "the key's public area is not an {} key",
            doc.algorithm
        )));
    }
    Ok(())
}

/// The message the audit key signs for a PKCS#11 attestation: a fixed label, then each field
/// with a 4-byte big-endian length, then the attribute bits.
pub fn pkcs11_message(
    key: &str,
    device: &str,
    algorithm: KeyAlgorithm,
    public_key: &[u8],
    nonce: &[u8],
    attributes: Pkcs11Attributes,
) -> Vec<u8> {
    let mut m = b"keyward pkcs11 key attestation v1\0".to_vec();
    for field in [
        key.as_bytes(),
        device.as_bytes(),
        algorithm.as_str().as_bytes(),
        public_key,
        nonce,
    ] {
        // Every field is far below 4 GiB (names, a public key, a 64-byte nonce).
        m.extend_from_slice(&u32::try_from(field.len()).unwrap_or(u32::MAX).to_be_bytes());
        m.extend_from_slice(field);
    }
    m.push(attributes.bits());
    m
}

fn verify_pkcs11(doc: &Attestation) -> Result<(), AttestationError> {
    let attributes = doc
        .attributes
        .ok_or_else(|| malformed("a pkcs11 attestation has no attributes"))?;
    let signer = ed25519_dalek::VerifyingKey::from_public_key_der(&doc.signer_public_key.0)
        .map_err(|_| malformed("signer_public_key is not an Ed25519 key"))?;
    let signature = ed25519_dalek::Signature::from_slice(&doc.signature.0)
        .map_err(|_| malformed("the signature is not 64 bytes"))?;
    let message = pkcs11_message(
        &doc.key,
        &doc.device,
        doc.algorithm,
        &doc.public_key.0,
        &doc.nonce.0,
        attributes,
    );
    signer
        .verify(&message, &signature)
        .map_err(|_| AttestationError::BadSignature)?;
    let mut wrong = Vec::new();
    for (ok, what) in [
        (attributes.local, "CKA_LOCAL false"),
        (attributes.never_extractable, "CKA_NEVER_EXTRACTABLE false"),
        (attributes.always_sensitive, "CKA_ALWAYS_SENSITIVE false"),
        (!attributes.extractable, "CKA_EXTRACTABLE true"),
        (attributes.sensitive, "CKA_SENSITIVE false"),
    ] {
        if !ok {
            wrong.push(what);
        }
    }
    if !wrong.is_empty() {
        return Err(AttestationError::NotDeviceBound(wrong.join(", ")));
    }
    Ok(())
}

/// A TPM object's name: `nameAlg || SHA-256(TPMT_PUBLIC)` (Keyward's objects all use SHA-256).
pub fn name_of(public_area: &[u8]) -> Vec<u8> {
    let mut name = ALG_SHA256.to_be_bytes().to_vec();
    name.extend_from_slice(&Sha256::digest(public_area));
    name
}

/// `TPM_RH_ENDORSEMENT`: the hierarchy the AK is a primary key of.
const RH_ENDORSEMENT: u32 = 0x4000_000b;

/// The qualified name a TPM gives its AK in `qualifiedSigner`: for a primary key,
/// `nameAlg || SHA-256(hierarchy handle || name)` (Part 1 §16: a hierarchy's qualified name is
/// its handle).
pub fn ak_qualified_name(ak_public_area: &[u8]) -> Vec<u8> {
    let mut h = Sha256::new();
    h.update(RH_ENDORSEMENT.to_be_bytes());
    h.update(name_of(ak_public_area));
    let mut name = ALG_SHA256.to_be_bytes().to_vec();
    name.extend_from_slice(&h.finalize());
    name
}

/// A bounded big-endian reader over TPM marshalled bytes.
struct Reader<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8], what: &'static str) -> Result<Self, AttestationError> {
        if buf.len() > MAX_BLOB {
            return Err(malformed(format!("{what} is longer than {MAX_BLOB} bytes")));
        }
        Ok(Self { buf, what })
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], AttestationError> {
        if n > self.buf.len() {
            return Err(malformed(format!("{} is cut short", self.what)));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn u16(&mut self) -> Result<u16, AttestationError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, AttestationError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A `TPM2B_*`: a 16-bit size, then that many bytes.
    fn sized(&mut self) -> Result<&'a [u8], AttestationError> {
        let n = self.u16()?;
        self.take(usize::from(n))
    }

    fn end(&self) -> Result<(), AttestationError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(malformed(format!("{} has trailing bytes", self.what)))
        }
    }
}

/// What the verifier needs of a `TPMS_ATTEST` of type certify.
#[derive(Debug, PartialEq, Eq)]
pub struct CertifyInfo<'a> {
    /// `qualifiedSigner`: the AK's name.
    pub signer_name: &'a [u8],
    /// `extraData`: the nonce.
    pub extra_data: &'a [u8],
    /// `attested.certify.name`: the certified object's name.
    pub name: &'a [u8],
}

impl<'a> CertifyInfo<'a> {
    /// Parse a `TPMS_ATTEST` (Part 2 §10.12.12) that must be a `TPM_ST_ATTEST_CERTIFY` the TPM
    /// generated.
    ///
    /// # Errors
    /// [`AttestationError::Malformed`] for anything else.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, AttestationError> {
        let mut r = Reader::new(bytes, "TPMS_ATTEST")?;
        if r.u32()? != TPM_GENERATED {
            return Err(malformed(
                "TPMS_ATTEST does not start with TPM_GENERATED_VALUE",
            ));
        }
        if r.u16()? != ST_ATTEST_CERTIFY {
            return Err(malformed("TPMS_ATTEST is not a certify attestation"));
        }
        let signer_name = r.sized()?;
        let extra_data = r.sized()?;
        // clockInfo (clock u64, resetCount u32, restartCount u32, safe u8), firmwareVersion u64.
        r.take(8 + 4 + 4 + 1 + 8)?;
        let name = r.sized()?;
        let _qualified_name = r.sized()?;
        r.end()?;
        Ok(Self {
            signer_name,
            extra_data,
            name,
        })
    }
}

/// The public key of a `TPMT_PUBLIC`.
#[derive(Debug, PartialEq, Eq)]
enum PublicKey {
    EccP256 { x: Vec<u8>, y: Vec<u8> },
    Rsa { modulus: Vec<u8>, exponent: u32 },
}

/// What the verifier needs of a `TPMT_PUBLIC`.
#[derive(Debug, PartialEq, Eq)]
struct TpmPublic {
    attributes: u32,
    key: PublicKey,
}

impl TpmPublic {
    /// Parse a `TPMT_PUBLIC` (Part 2 §12.2.4) of an RSA or ECC P-256 key with SHA-256 names.
    fn parse(bytes: &[u8]) -> Result<Self, AttestationError> {
        let mut r = Reader::new(bytes, "TPMT_PUBLIC")?;
        let kind = r.u16()?;
        if r.u16()? != ALG_SHA256 {
            return Err(malformed("the object's name algorithm is not SHA-256"));
        }
        let attributes = r.u32()?;
        let _auth_policy = r.sized()?;
        // TPMT_SYM_DEF_OBJECT: algorithm, then key bits and mode unless NULL.
        if r.u16()? != ALG_NULL {
            r.take(4)?;
        }
        let key = match kind {
            ALG_RSA => {
                // TPMT_RSA_SCHEME: scheme, then a hash algorithm unless NULL or RSAES.
                let scheme = r.u16()?;
                if scheme != ALG_NULL && scheme != ALG_RSAES {
                    r.u16()?;
                }
                let _bits = r.u16()?;
                let exponent = match r.u32()? {
                    0 => 65537,
                    e => e,
                };
                let modulus = r.sized()?.to_vec();
                PublicKey::Rsa { modulus, exponent }
            }
            ALG_ECC => {
                // TPMT_ECC_SCHEME: scheme, then its details (ECDAA: hash and count).
                match r.u16()? {
                    ALG_NULL => {}
                    ALG_ECDAA => {
                        r.take(4)?;
                    }
                    _ => {
                        r.u16()?;
                    }
                }
                if r.u16()? != ECC_NIST_P256 {
                    return Err(malformed("the ECC key is not on P-256"));
                }
                // TPMT_KDF_SCHEME.
                if r.u16()? != ALG_NULL {
                    r.u16()?;
                }
                let x = r.sized()?.to_vec();
                let y = r.sized()?.to_vec();
                PublicKey::EccP256 { x, y }
            }
            other => return Err(malformed(format!("object type {other:#06x} is not a key"))),
        };
        r.end()?;
        Ok(Self { attributes, key })
    }

    /// The public key as DER SubjectPublicKeyInfo, as the daemon reports it.
    fn spki(&self) -> Result<Vec<u8>, AttestationError> {
        match &self.key {
            PublicKey::EccP256 { x, y } => {
                if x.len() > 32 || y.len() > 32 {
                    return Err(malformed("P-256 coordinate longer than 32 bytes"));
                }
                let mut point = [0u8; 65];
                point[0] = 0x04;
                point[33 - x.len()..33].copy_from_slice(x);
                point[65 - y.len()..].copy_from_slice(y);
                let key = p256::PublicKey::from_sec1_bytes(&point)
                    .map_err(|_| malformed("the ECC point is not on P-256"))?;
                key.to_public_key_der()
                    .map(|d| d.as_bytes().to_vec())
                    .map_err(|_| malformed("P-256 key encoding"))
            }
            PublicKey::Rsa { modulus, exponent } => {
                let e = exponent.to_be_bytes();
                let start = e.iter().position(|&b| b != 0).unwrap_or(3);
                crate::rsa::spki(modulus, &e[start..]).map_err(|_| malformed("RSA key encoding"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::Signer as _;

    /// A TPMT_PUBLIC of an ECC P-256 ECDSA-SHA256 key with `attributes` and point (x, y).
    fn ecc_area(attributes: u32, x: &[u8], y: &[u8]) -> Vec<u8> {
        let mut a = Vec::new();
        a.extend_from_slice(&ALG_ECC.to_be_bytes());
        a.extend_from_slice(&ALG_SHA256.to_be_bytes());
        a.extend_from_slice(&attributes.to_be_bytes());
        a.extend_from_slice(&0u16.to_be_bytes()); // authPolicy
        a.extend_from_slice(&ALG_NULL.to_be_bytes()); // symmetric
        a.extend_from_slice(&ALG_ECDSA.to_be_bytes());
        a.extend_from_slice(&ALG_SHA256.to_be_bytes());
        a.extend_from_slice(&ECC_NIST_P256.to_be_bytes());
        a.extend_from_slice(&ALG_NULL.to_be_bytes()); // kdf
        for c in [x, y] {
            a.extend_from_slice(&(c.len() as u16).to_be_bytes());
            a.extend_from_slice(c);
        }
        a
    }

    fn point(key: &p256::ecdsa::SigningKey) -> (Vec<u8>, Vec<u8>) {
        let p = key.verifying_key().to_encoded_point(false);
        (p.x().unwrap().to_vec(), p.y().unwrap().to_vec())
    }

    fn certify(ak_name: &[u8], nonce: &[u8], name: &[u8]) -> Vec<u8> {
        let mut a = TPM_GENERATED.to_be_bytes().to_vec();
        a.extend_from_slice(&ST_ATTEST_CERTIFY.to_be_bytes());
        for b in [ak_name, nonce] {
            a.extend_from_slice(&(b.len() as u16).to_be_bytes());
            a.extend_from_slice(b);
        }
        a.extend_from_slice(&[0u8; 25]);
        for b in [name, name] {
            a.extend_from_slice(&(b.len() as u16).to_be_bytes());
            a.extend_from_slice(b);
        }
        a
    }

    /// A consistent TPM document, signed by a software "AK", for a key with `key_attributes`.
    fn tpm_doc(key_attributes: u32) -> Attestation {
        use p256::ecdsa::signature::Signer as _;
        let ak = p256::ecdsa::SigningKey::from_slice(&[7u8; 32]).unwrap();
        let key = p256::ecdsa::SigningKey::from_slice(&[9u8; 32]).unwrap();
        let (ax, ay) = point(&ak);
        let (kx, ky) = point(&key);
        let ak_area = ecc_area(
            oa::RESTRICTED
                | oa::SIGN
                | oa::FIXED_TPM
                | oa::FIXED_PARENT
                | oa::SENSITIVE_DATA_ORIGIN,
            &ax,
            &ay,
        );
        let key_area = ecc_area(key_attributes, &kx, &ky);
        let nonce = b"fresh".to_vec();
        let attest = certify(&ak_qualified_name(&ak_area), &nonce, &name_of(&key_area));
        let sig: p256::ecdsa::Signature = ak.sign(&attest);
        let spki = |k: &p256::ecdsa::SigningKey| {
            p256::PublicKey::from(k.verifying_key())
                .to_public_key_der()
                .unwrap()
                .as_bytes()
                .to_vec()
        };
        Attestation {
            format: Format::Tpm2Certify,
            key: "k".into(),
            device: "tpm".into(),
            algorithm: KeyAlgorithm::EcdsaP256,
            public_key: Bytes(spki(&key)),
            nonce: Bytes(nonce),
            signer_public_key: Bytes(spki(&ak)),
            signature: Bytes(sig.to_der().as_bytes().to_vec()),
            attest: Some(Bytes(attest)),
            key_public_area: Some(Bytes(key_area)),
            signer_public_area: Some(Bytes(ak_area)),
            ek_certificates: vec![],
            attributes: None,
            note: TPM_NOTE.into(),
        }
    }

    const BOUND: u32 = oa::SIGN | oa::FIXED_TPM | oa::FIXED_PARENT | oa::SENSITIVE_DATA_ORIGIN;

    #[test]
    fn a_consistent_tpm_document_verifies_and_each_tamper_is_caught() {
        let doc = tpm_doc(BOUND);
        let v = verify(&doc, Some(b"fresh"), Some(&doc.signer_public_key.0), None).unwrap();
        assert!(v.signer_pinned && v.nonce_checked && v.hardware);
        assert_eq!(
            verify(&doc, Some(b"stale"), None, None),
            Err(AttestationError::NonceMismatch)
        );
        assert_eq!(
            verify(&doc, None, Some(b"other"), None),
            Err(AttestationError::SignerMismatch)
        );
        let mut bad = doc.clone();
        if let Some(a) = &mut bad.attest {
            let last = a.0.len() - 1;
            a.0[last] ^= 1;
        }
        assert_eq!(
            verify(&bad, None, None, None),
            Err(AttestationError::BadSignature)
        );
        // The nonce field edited to match a verifier's: the signed bytes still say otherwise.
        let mut bad = doc.clone();
        bad.nonce = Bytes(b"other".to_vec());
        assert_eq!(
            verify(&bad, Some(b"other"), None, None),
            Err(AttestationError::NonceMismatch)
        );
        // Another public area in the document: its name is not the certified one.
        let mut bad = doc.clone();
        if let Some(area) = &mut bad.key_public_area {
            area.0[5] ^= oa::SENSITIVE_DATA_ORIGIN as u8;
        }
        assert_eq!(
            verify(&bad, None, None, None),
            Err(AttestationError::NameMismatch)
        );
    }

    #[test]
    fn a_key_made_outside_the_tpm_is_refused() {
        let doc = tpm_doc(oa::SIGN | oa::FIXED_TPM | oa::FIXED_PARENT);
        assert_eq!(
            verify(&doc, None, None, None),
            Err(AttestationError::NotDeviceBound(
                "sensitiveDataOrigin clear in the key's public area".into()
            ))
        );
        let doc = tpm_doc(oa::SIGN | 1 << 6);
        assert!(matches!(
            verify(&doc, None, None, None),
            Err(AttestationError::NotDeviceBound(_))
        ));
    }

    #[test]
    fn a_pkcs11_document_verifies_with_the_audit_key_only() {
        let audit = ed25519_dalek::SigningKey::from_bytes(&[3u8; 32]);
        let attributes = Pkcs11Attributes {
            local: true,
            never_extractable: true,
            always_sensitive: true,
            extractable: false,
            sensitive: true,
        };
        let message = pkcs11_message("k", "hsm", KeyAlgorithm::Ed25519, b"spki", b"n", attributes);
        let doc = Attestation {
            format: Format::Pkcs11Attributes,
            key: "k".into(),
            device: "hsm".into(),
            algorithm: KeyAlgorithm::Ed25519,
            public_key: Bytes(b"spki".to_vec()),
            nonce: Bytes(b"n".to_vec()),
            signer_public_key: Bytes(
                audit
                    .verifying_key()
                    .to_public_key_der()
                    .unwrap()
                    .as_bytes()
                    .to_vec(),
            ),
            signature: Bytes(audit.sign(&message).to_bytes().to_vec()),
            attest: None,
            key_public_area: None,
            signer_public_area: None,
            ek_certificates: vec![],
            attributes: Some(attributes),
            note: PKCS11_NOTE.into(),
        };
        assert!(!verify(&doc, Some(b"n"), None, None).unwrap().hardware);
        let mut bad = doc.clone();
        bad.attributes = Some(Pkcs11Attributes {
            local: false,
            ..attributes
        });
        assert_eq!(
            verify(&bad, None, None, None),
            Err(AttestationError::BadSignature)
        );
        let mut bad = doc.clone();
        bad.key = "other".into();
        assert_eq!(
            verify(&bad, None, None, None),
            Err(AttestationError::BadSignature)
        );
    }

    #[test]
    fn the_parsers_refuse_short_long_and_foreign_input() {
        assert!(CertifyInfo::parse(&[]).is_err());
        assert!(CertifyInfo::parse(&[0xff; 5000]).is_err());
        let good = certify(b"a", b"b", b"c");
        assert!(CertifyInfo::parse(&good).is_ok());
        for cut in 0..good.len() {
            assert!(CertifyInfo::parse(&good[..cut]).is_err());
        }
        let mut long = good.clone();
        long.push(0);
        assert!(CertifyInfo::parse(&long).is_err());
        assert!(TpmPublic::parse(&[0x00, 0x08, 0x00, 0x0b]).is_err());
    }
}
