//! PKCS#10 certificate signing requests (`keyward key csr`): parsing the subject, building the
//! CertificationRequestInfo around a device key's SubjectPublicKeyInfo, and wrapping the
//! device's signature over it into the request.
//!
//! Pure encoding, no I/O: the signature comes from keywardd's `Sign` (so its policy and audit
//! apply), never from a key in this process. Must not: sign anything itself, or guess an
//! algorithm from the SPKI (an RSA key's SPKI does not say which padding it is for).

use std::str::FromStr as _;

use der::asn1::Any;
use der::asn1::{BitString, Ia5String, OctetString};
use der::oid::db::rfc5912::{ECDSA_WITH_SHA_256, SHA_256_WITH_RSA_ENCRYPTION};
use der::oid::db::rfc8410::ID_ED_25519;
use der::oid::AssociatedOid as _;
use der::{Decode as _, Encode as _, EncodePem as _};
use keyward::api::KeyAlgorithm;
use spki::{AlgorithmIdentifierOwned, SubjectPublicKeyInfoOwned};
use x509_cert::attr::{Attribute, AttributeTypeAndValue};
use x509_cert::ext::pkix::name::GeneralName;
use x509_cert::ext::pkix::SubjectAltName;
use x509_cert::ext::Extension;
use x509_cert::name::Name;
use x509_cert::request::{CertReq, CertReqInfo, ExtensionReq, Version};

/// Why a request could not be built; all of them are the caller's input or key, so usage errors.
#[derive(Debug, thiserror::Error)]
pub enum CsrError {
    #[error("key algorithm {0} cannot sign a certificate request here (RSA-PSS requests are not supported: use an ed25519 or ecdsa-p256 key)")]
    Algorithm(KeyAlgorithm),
    #[error("the daemon's public key is not a SubjectPublicKeyInfo: {0}")]
    PublicKey(der::Error),
    #[error("cannot encode the request: {0}")]
    Encode(der::Error),
}

/// `--subject`: an RFC 4514 distinguished name, most specific part first
/// (`CN=host.example,O=Example`). The message names the part that does not parse.
pub fn parse_subject(text: &str) -> Result<Name, String> {
    const FORM: &str = "expected an RFC 4514 name of TYPE=value parts separated by commas, \
                        like CN=host.example,O=Example";
    if text.trim().is_empty() {
        return Err(format!("the subject is empty: {FORM}"));
    }
    Name::from_str(text).map_err(|_| {
        // The parser does not say which part failed; find it by trying each part on its own.
        let bad = split_unescaped(text)
            .into_iter()
            .find(|part| AttributeTypeAndValue::from_str(part).is_err());
        match bad {
            Some(part) if !part.contains('=') => format!("{part:?} has no '=': {FORM}"),
            Some(part) => format!(
                "{part:?}: unknown attribute type or bad escape (types are CN, O, OU, C, L, ST, \
                 DC, … or a dotted OID; no spaces around ',' and '='): {FORM}"
            ),
            None => format!("{text:?}: {FORM}"),
        }
    })
}

/// `--dns`: a DNS name for the subjectAltName extension request (IA5, that is ASCII).
pub fn parse_dns_name(text: &str) -> Result<Ia5String, String> {
    if text.is_empty() || text.chars().any(char::is_whitespace) {
        return Err(format!("{text:?} is not a DNS name"));
    }
    Ia5String::new(text)
        .map_err(|_| format!("{text:?}: a DNS name must be ASCII (use its A-label, xn--…)"))
}

/// The parts of an RFC 4514 string between commas and plus signs that no backslash escapes.
fn split_unescaped(text: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut start, mut escaped) = (0, false);
    for (i, c) in text.char_indices() {
        match (escaped, c) {
            (true, _) => escaped = false,
            (false, '\\') => escaped = true,
            (false, ',' | '+') => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    parts
}

/// The signatureAlgorithm for what the device's `Sign` returns with `algorithm`: Ed25519 is
/// pure EdDSA (raw 64 bytes); ECDSA P-256 hashes the message with SHA-256 (DER signature);
/// RSA PKCS#1 v1.5 too (raw signature; its identifier carries NULL parameters, RFC 4055 §5).
fn signature_algorithm(algorithm: KeyAlgorithm) -> Result<AlgorithmIdentifierOwned, CsrError> {
    let (oid, parameters) = match algorithm {
        KeyAlgorithm::Ed25519 => (ID_ED_25519, None),
        KeyAlgorithm::EcdsaP256 => (ECDSA_WITH_SHA_256, None),
        KeyAlgorithm::RsaPkcs1_3072 => (SHA_256_WITH_RSA_ENCRYPTION, Some(Any::null())),
        KeyAlgorithm::RsaPss3072 | KeyAlgorithm::RsaPss2048 => {
            return Err(CsrError::Algorithm(algorithm))
        }
    };
    Ok(AlgorithmIdentifierOwned { oid, parameters })
}

/// A request under way: the CertificationRequestInfo and the algorithm its signature will use.
pub struct Unsigned {
    info: CertReqInfo,
    algorithm: AlgorithmIdentifierOwned,
}

impl Unsigned {
    /// The CertificationRequestInfo for the key with SPKI `public` (DER) and `algorithm`;
    /// `dns` names go into a subjectAltName extension request. Refuses an algorithm this
    /// module cannot name before anything is signed.
    pub fn new(
        algorithm: KeyAlgorithm,
        subject: Name,
        public: &[u8],
        dns: &[Ia5String],
    ) -> Result<Self, CsrError> {
        let algorithm = signature_algorithm(algorithm)?;
        let public_key =
            SubjectPublicKeyInfoOwned::from_der(public).map_err(CsrError::PublicKey)?;
        let mut info = CertReqInfo {
            version: Version::V1,
            subject,
            public_key,
            attributes: Default::default(),
        };
        if !dns.is_empty() {
            let names = dns.iter().cloned().map(GeneralName::DnsName).collect();
            let san = Extension {
                extn_id: SubjectAltName::OID,
                critical: false,
                extn_value: OctetString::new(
                    SubjectAltName(names).to_der().map_err(CsrError::Encode)?,
                )
                .map_err(CsrError::Encode)?,
            };
            let attribute =
                Attribute::try_from(ExtensionReq(vec![san])).map_err(CsrError::Encode)?;
            info.attributes
                .insert(attribute)
                .map_err(CsrError::Encode)?;
        }
        Ok(Self { info, algorithm })
    }

    /// The bytes the device signs: the DER of the CertificationRequestInfo.
    pub fn to_be_signed(&self) -> Result<Vec<u8>, CsrError> {
        self.info.to_der().map_err(CsrError::Encode)
    }

    /// The request in PEM (`CERTIFICATE REQUEST`) with the device's `signature` over
    /// [`Self::to_be_signed`].
    pub fn finish(self, signature: &[u8]) -> Result<String, CsrError> {
        let request = CertReq {
            info: self.info,
            algorithm: self.algorithm,
            signature: BitString::from_bytes(signature).map_err(CsrError::Encode)?,
        };
        request
            .to_pem(der::pem::LineEnding::LF)
            .map_err(CsrError::Encode)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use der::DecodePem as _;
    use ed25519_dalek::pkcs8::EncodePublicKey as _;
    use ed25519_dalek::Signer as _;

    #[test]
    fn subjects_parse_in_rfc4514_order_and_bad_parts_are_named() {
        let name = parse_subject("CN=host.example,O=Example").unwrap();
        assert_eq!(name.to_string(), "CN=host.example,O=Example");
        // Encoded least specific first.
        assert_eq!(name.0.len(), 2);
        assert!(parse_subject("CN=a\\,b,O=Example").is_ok());
        let e = parse_subject("CN=host, O=Example").unwrap_err();
        assert!(e.contains("\" O=Example\""), "{e}");
        let e = parse_subject("host.example").unwrap_err();
        assert!(e.contains("has no '='"), "{e}");
        assert!(parse_subject("").unwrap_err().contains("empty"));
        assert!(parse_dns_name("host.example").is_ok());
        assert!(parse_dns_name("hôst.example").is_err());
        assert!(parse_dns_name("a b").is_err());
    }

    #[test]
    fn an_ed25519_request_verifies_and_carries_its_names() {
        let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
        let public = key.verifying_key().to_public_key_der().unwrap();
        let dns = [parse_dns_name("host.example").unwrap()];
        let subject = parse_subject("CN=host.example,O=Example").unwrap();
        let unsigned =
            Unsigned::new(KeyAlgorithm::Ed25519, subject, public.as_bytes(), &dns).unwrap();
        let tbs = unsigned.to_be_signed().unwrap();
        let pem = unsigned.finish(&key.sign(&tbs).to_bytes()).unwrap();
        let request = CertReq::from_pem(pem.as_bytes()).unwrap();
        assert_eq!(request.info.to_der().unwrap(), tbs);
        assert_eq!(request.algorithm.oid, ID_ED_25519);
        assert_eq!(request.info.public_key.to_der().unwrap(), public.as_bytes());
        let signature =
            ed25519_dalek::Signature::from_slice(request.signature.raw_bytes()).unwrap();
        key.verify_strict(&tbs, &signature).unwrap();
        assert_eq!(request.info.attributes.len(), 1);
    }

    #[test]
    fn rsa_pss_is_refused_before_anything_is_signed() {
        let subject = parse_subject("CN=x").unwrap();
        let e = Unsigned::new(KeyAlgorithm::RsaPss3072, subject, &[], &[])
            .err()
            .unwrap();
        assert!(e.to_string().contains("RSA-PSS"), "{e}");
    }
}
