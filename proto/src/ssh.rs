//! The OpenSSH side of Keyward keys: the ssh-agent protocol messages keywardd serves
//! (RFC 9987: `REQUEST_IDENTITIES` and `SIGN_REQUEST`, `FAILURE` for everything else), and the
//! translation of a device's public keys and signatures into SSH's forms (`ssh-ed25519`,
//! `ecdsa-sha2-nistp256`, `rsa-sha2-256`/`rsa-sha2-512`; an OpenSSH public key line for
//! `authorized_keys`).
//!
//! Encoding and decoding are `ssh-encoding`'s and `ssh-key`'s; this module only says which
//! fields a message has. It reads nothing but the two messages it serves: any other message
//! type is reported as [`AgentRequest::Unsupported`] unread (a client's private keys in an
//! `ADD_IDENTITY` are never parsed). Must not: do I/O, or offer an RSA-PSS key to SSH (SSH has
//! no RSA-PSS; a PSS signature would not verify).

use crate::rsa::{RsaPublicKey as Pkcs1PublicKey, RSA_ENCRYPTION};
use der::asn1::UintRef;
use ssh_encoding::{Decode, Encode, Reader};
use ssh_key::public::{EcdsaPublicKey, Ed25519PublicKey, RsaPublicKey};
use ssh_key::{Algorithm, EcdsaCurve, HashAlg, Mpint};

pub use ssh_key::public::KeyData;
pub use ssh_key::Signature;

use crate::kinds::{KeyAlgorithm, SignHash};

/// `SSH_AGENT_RSA_SHA2_256`: sign with `rsa-sha2-256`.
pub const RSA_SHA2_256: u32 = 0x02;
/// `SSH_AGENT_RSA_SHA2_512`: sign with `rsa-sha2-512`.
pub const RSA_SHA2_512: u32 = 0x04;

/// Largest agent message accepted, length field excluded: OpenSSH's own bound
/// (`AGENT_MAX_LEN`, 256 KiB).
pub const MAX_MESSAGE: usize = 256 * 1024;

/// `SSH_AGENT_FAILURE`.
pub const FAILURE: u8 = 5;
/// `SSH_AGENTC_REQUEST_IDENTITIES`.
pub const REQUEST_IDENTITIES: u8 = 11;
/// `SSH_AGENT_IDENTITIES_ANSWER`.
pub const IDENTITIES_ANSWER: u8 = 12;
/// `SSH_AGENTC_SIGN_REQUEST`.
pub const SIGN_REQUEST: u8 = 13;
/// `SSH_AGENT_SIGN_RESPONSE`.
pub const SIGN_RESPONSE: u8 = 14;

/// Why an agent message, a public key or a signature has no SSH form.
#[derive(Debug, thiserror::Error)]
pub enum SshError {
    /// An empty message (no type byte).
    #[error("empty agent message")]
    Empty,
    /// A message of a served type whose fields don't decode, or that has bytes after them.
    #[error("malformed agent message: {0}")]
    Malformed(#[from] ssh_encoding::Error),
    /// A key SSH can't use (RSA-PSS), or a public key that isn't what its algorithm says.
    #[error("{0}")]
    UnsupportedKey(String),
    /// A device signature that isn't what its algorithm says.
    #[error("the device's signature has no SSH form: {0}")]
    Signature(String),
    /// An RSA sign request without `rsa-sha2-256`/`rsa-sha2-512` flags: plain `ssh-rsa` is
    /// SHA-1, which Keyward does not sign with.
    #[error("ssh-rsa (SHA-1) signatures are refused: ask for rsa-sha2-256 or rsa-sha2-512")]
    Sha1,
}

/// A decoded agent message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AgentRequest {
    /// `REQUEST_IDENTITIES`: list the keys.
    Identities,
    /// `SIGN_REQUEST`.
    Sign(SignRequest),
    /// Any other message type, left unread.
    Unsupported(u8),
}

/// `SIGN_REQUEST`: which key (its public key blob), what to sign, and the flags.
#[derive(Clone, PartialEq, Eq)]
pub struct SignRequest {
    /// The key's public key blob, as `REQUEST_IDENTITIES` listed it.
    pub key_blob: Vec<u8>,
    /// The data to sign.
    pub data: Vec<u8>,
    /// `SSH_AGENT_RSA_SHA2_256` (2) / `SSH_AGENT_RSA_SHA2_512` (4); others are ignored.
    pub flags: u32,
}

impl std::fmt::Debug for SignRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The data to sign is the caller's business: its length only.
        f.debug_struct("SignRequest")
            .field("key_blob", &self.key_blob.len())
            .field("data", &self.data.len())
            .field("flags", &self.flags)
            .finish()
    }
}

impl SignRequest {
    /// The message as a client sends it after the length field: type byte and fields.
    ///
    /// # Errors
    /// [`SshError::Malformed`] for a field longer than `u32` can say.
    pub fn encode(&self) -> Result<Vec<u8>, SshError> {
        let mut message = vec![SIGN_REQUEST];
        self.key_blob.encode(&mut message)?;
        self.data.encode(&mut message)?;
        self.flags.encode(&mut message)?;
        Ok(message)
    }
}

/// Decode one agent message (its length field already removed).
///
/// # Errors
/// [`SshError::Empty`], or [`SshError::Malformed`] for a served message type whose fields do
/// not decode or are followed by more bytes.
pub fn parse_request(message: &[u8]) -> Result<AgentRequest, SshError> {
    let (&kind, mut body) = message.split_first().ok_or(SshError::Empty)?;
    let request = match kind {
        REQUEST_IDENTITIES => AgentRequest::Identities,
        SIGN_REQUEST => AgentRequest::Sign(SignRequest {
            key_blob: Vec::decode(&mut body)?,
            data: Vec::decode(&mut body)?,
            flags: u32::decode(&mut body)?,
        }),
        other => return Ok(AgentRequest::Unsupported(other)),
    };
    Ok(body.finish(request)?)
}

/// The length a message's 4-byte header announces, if it is within [`MAX_MESSAGE`].
pub fn message_len(header: [u8; 4]) -> Option<usize> {
    usize::try_from(u32::from_be_bytes(header))
        .ok()
        .filter(|&len| len <= MAX_MESSAGE)
}

/// A key as `REQUEST_IDENTITIES` lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// The public key.
    pub key: KeyData,
    /// Its comment: the Keyward key name.
    pub comment: String,
}

/// A key's public key blob: what `SIGN_REQUEST` names the key by.
///
/// # Errors
/// [`SshError::Malformed`] if the key can't be encoded.
pub fn key_blob(key: &KeyData) -> Result<Vec<u8>, SshError> {
    let mut blob = Vec::new();
    key.encode(&mut blob)?;
    Ok(blob)
}

/// `SSH_AGENT_FAILURE`, framed.
pub fn failure() -> Vec<u8> {
    framed(&[FAILURE])
}

/// `SSH_AGENT_IDENTITIES_ANSWER` for `identities`, framed.
///
/// # Errors
/// [`SshError::Malformed`] if an identity can't be encoded (lengths beyond `u32`).
pub fn identities_answer(identities: &[Identity]) -> Result<Vec<u8>, SshError> {
    let mut body = vec![IDENTITIES_ANSWER];
    u32::try_from(identities.len())
        .map_err(|_| ssh_encoding::Error::Overflow)?
        .encode(&mut body)?;
    for identity in identities {
        identity.key.encode_prefixed(&mut body)?;
        identity.comment.encode(&mut body)?;
    }
    Ok(framed(&body))
}

/// `SSH_AGENT_SIGN_RESPONSE` carrying `signature`, framed.
///
/// # Errors
/// [`SshError::Malformed`] if the signature can't be encoded.
pub fn sign_response(signature: &Signature) -> Result<Vec<u8>, SshError> {
    let mut body = vec![SIGN_RESPONSE];
    signature.encode_prefixed(&mut body)?;
    Ok(framed(&body))
}

/// `body` behind its 4-byte length field: one message on the wire.
pub fn framed(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 4);
    // Bodies here are a few KiB at most.
    out.extend_from_slice(&u32::try_from(body.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// Whether keys of `algorithm` can serve SSH. RSA-PSS can't: SSH's RSA signatures are
/// PKCS#1 v1.5.
pub fn usable(algorithm: KeyAlgorithm) -> bool {
    match algorithm {
        KeyAlgorithm::Ed25519 | KeyAlgorithm::EcdsaP256 | KeyAlgorithm::RsaPkcs1_3072 => true,
        KeyAlgorithm::RsaPss3072 | KeyAlgorithm::RsaPss2048 => false,
    }
}

/// The hash a `SIGN_REQUEST` with `flags` wants from a key of `algorithm`: `None` for the
/// algorithms whose SSH signature fixes it (Ed25519, ECDSA P-256), and for RSA the one the
/// flags name.
///
/// # Errors
/// [`SshError::Sha1`]: an RSA request naming neither SHA-2 hash (`ssh-rsa`, SHA-1).
pub fn sign_hash(algorithm: KeyAlgorithm, flags: u32) -> Result<Option<SignHash>, SshError> {
    if algorithm != KeyAlgorithm::RsaPkcs1_3072 {
        return Ok(None);
    }
    if flags & RSA_SHA2_512 != 0 {
        Ok(Some(SignHash::Sha512))
    } else if flags & RSA_SHA2_256 != 0 {
        Ok(Some(SignHash::Sha256))
    } else {
        Err(SshError::Sha1)
    }
}

/// The SSH public key of a key of `algorithm` whose DER SubjectPublicKeyInfo is `spki` (as
/// `PublicKey` returns it).
///
/// # Errors
/// [`SshError::UnsupportedKey`]: the algorithm has no SSH form, or `spki` isn't a key of it.
pub fn public_key(algorithm: KeyAlgorithm, spki: &[u8]) -> Result<KeyData, SshError> {
    use ed25519_dalek::pkcs8::DecodePublicKey as _;
    let bad = |e: &dyn std::fmt::Display| {
        SshError::UnsupportedKey(format!("not an {algorithm} public key: {e}"))
    };
    match algorithm {
        KeyAlgorithm::Ed25519 => {
            let key =
                ed25519_dalek::VerifyingKey::from_public_key_der(spki).map_err(|e| bad(&e))?;
            Ok(KeyData::Ed25519(Ed25519PublicKey(key.to_bytes())))
        }
        KeyAlgorithm::EcdsaP256 => {
            let key = p256::PublicKey::from_public_key_der(spki).map_err(|e| bad(&e))?;
            let point = p256::elliptic_curve::sec1::ToEncodedPoint::to_encoded_point(&key, false);
            let key = EcdsaPublicKey::from_sec1_bytes(point.as_bytes()).map_err(|e| bad(&e))?;
            Ok(KeyData::Ecdsa(key))
        }
        KeyAlgorithm::RsaPkcs1_3072 => {
            let spki = spki::SubjectPublicKeyInfoRef::try_from(spki).map_err(|e| bad(&e))?;
            if spki.algorithm.oid != RSA_ENCRYPTION {
                return Err(bad(&format!("algorithm {}", spki.algorithm.oid)));
            }
            let bits = spki
                .subject_public_key
                .as_bytes()
                .ok_or_else(|| bad(&"unused bits"))?;
            let key: Pkcs1PublicKey<'_> = der::Decode::from_der(bits).map_err(|e| bad(&e))?;
            let mpint = |v: UintRef<'_>| Mpint::from_positive_bytes(v.as_bytes());
            Ok(KeyData::Rsa(RsaPublicKey {
                e: mpint(key.public_exponent).map_err(|e| bad(&e))?,
                n: mpint(key.modulus).map_err(|e| bad(&e))?,
            }))
        }
        KeyAlgorithm::RsaPss3072 | KeyAlgorithm::RsaPss2048 => Err(SshError::UnsupportedKey(
            format!("{algorithm} keys can't serve SSH: SSH has no RSA-PSS"),
        )),
    }
}

/// The OpenSSH public key line (`ssh-ed25519 AAAA… name`) of a key, for `authorized_keys`.
///
/// # Errors
/// As [`public_key`].
pub fn public_key_line(
    algorithm: KeyAlgorithm,
    spki: &[u8],
    comment: &str,
) -> Result<String, SshError> {
    let key = ssh_key::PublicKey::new(public_key(algorithm, spki)?, comment);
    key.to_openssh()
        .map_err(|e| SshError::UnsupportedKey(e.to_string()))
}

/// The SSH signature of a key of `algorithm`, from the signature the device made over `hash`
/// (as [`sign_hash`] chose it) in the form `Sign` returns: Ed25519 raw, ECDSA DER, RSA raw.
///
/// # Errors
/// [`SshError::Signature`]: `device` is not a signature of that algorithm.
pub fn signature(
    algorithm: KeyAlgorithm,
    hash: Option<SignHash>,
    device: &[u8],
) -> Result<Signature, SshError> {
    let bad = |e: &dyn std::fmt::Display| SshError::Signature(e.to_string());
    match algorithm {
        KeyAlgorithm::Ed25519 => Signature::new(Algorithm::Ed25519, device).map_err(|e| bad(&e)),
        KeyAlgorithm::EcdsaP256 => {
            // SSH: string(mpint r || mpint s), each a positive mpint.
            let sig = p256::ecdsa::Signature::from_der(device).map_err(|e| bad(&e))?;
            let (r, s) = sig.split_bytes();
            let mut blob = Vec::new();
            Mpint::from_positive_bytes(&r)
                .and_then(|r| Ok(r.encode(&mut blob)?))
                .map_err(|e| bad(&e))?;
            Mpint::from_positive_bytes(&s)
                .and_then(|s| Ok(s.encode(&mut blob)?))
                .map_err(|e| bad(&e))?;
            Signature::new(
                Algorithm::Ecdsa {
                    curve: EcdsaCurve::NistP256,
                },
                blob,
            )
            .map_err(|e| bad(&e))
        }
        KeyAlgorithm::RsaPkcs1_3072 => {
            let hash = match hash {
                Some(SignHash::Sha512) => HashAlg::Sha512,
                Some(SignHash::Sha256) => HashAlg::Sha256,
                None => return Err(SshError::Sha1),
            };
            Signature::new(Algorithm::Rsa { hash: Some(hash) }, device).map_err(|e| bad(&e))
        }
        KeyAlgorithm::RsaPss3072 | KeyAlgorithm::RsaPss2048 => Err(SshError::Signature(format!(
            "{algorithm} signatures have no SSH form"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(framed: &[u8]) -> &[u8] {
        let len = u32::from_be_bytes(framed[..4].try_into().unwrap()) as usize;
        assert_eq!(framed.len(), len + 4, "length field matches");
        &framed[4..]
    }

    #[test]
    fn the_two_served_messages_decode_and_others_stay_unread() {
        assert_eq!(parse_request(&[11]).unwrap(), AgentRequest::Identities);
        let sign = SignRequest {
            key_blob: b"blob".to_vec(),
            data: b"data".to_vec(),
            flags: 4,
        };
        let msg = sign.encode().unwrap();
        assert_eq!(
            msg, b"\x0d\0\0\0\x04blob\0\0\0\x04data\0\0\0\x04",
            "type byte, two strings, flags"
        );
        assert_eq!(parse_request(&msg).unwrap(), AgentRequest::Sign(sign));
        // ADD_IDENTITY with garbage: not parsed, just named.
        assert_eq!(
            parse_request(&[17, 0xff, 0xff]).unwrap(),
            AgentRequest::Unsupported(17)
        );
        assert!(matches!(parse_request(&[]), Err(SshError::Empty)));
        // Truncated, and trailing bytes.
        assert!(parse_request(&msg[..msg.len() - 1]).is_err());
        let mut long = msg.clone();
        long.push(0);
        assert!(parse_request(&long).is_err());
        assert!(parse_request(&[11, 0]).is_err());
        // A length field that claims more than the message holds.
        assert!(parse_request(&[13, 0xff, 0xff, 0xff, 0xff]).is_err());
    }

    #[test]
    fn lengths_beyond_openssh_bound_are_refused() {
        assert_eq!(message_len([0, 0, 0, 1]), Some(1));
        assert_eq!(message_len([0, 4, 0, 0]), Some(MAX_MESSAGE));
        assert_eq!(message_len([0, 4, 0, 1]), None);
        assert_eq!(message_len([0xff; 4]), None);
    }

    #[test]
    fn replies_are_framed() {
        assert_eq!(failure(), [0, 0, 0, 1, FAILURE]);
        assert_eq!(body(&identities_answer(&[]).unwrap()), [12, 0, 0, 0, 0]);
        let key = KeyData::Ed25519(Ed25519PublicKey([7; 32]));
        let answer = identities_answer(&[Identity {
            key: key.clone(),
            comment: "ci/deploy".into(),
        }])
        .unwrap();
        let mut r = &body(&answer)[1..];
        assert_eq!(u32::decode(&mut r).unwrap(), 1);
        let blob = Vec::<u8>::decode(&mut r).unwrap();
        assert_eq!(KeyData::decode(&mut &blob[..]).unwrap(), key);
        assert_eq!(String::decode(&mut r).unwrap(), "ci/deploy");
        assert!(r.is_empty());
    }

    #[test]
    fn device_keys_and_signatures_take_their_ssh_form() {
        use ed25519_dalek::pkcs8::EncodePublicKey as _;
        use ed25519_dalek::Signer as _;

        let ed = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
        let spki = ed.verifying_key().to_public_key_der().unwrap();
        let line = public_key_line(KeyAlgorithm::Ed25519, spki.as_bytes(), "git/sign").unwrap();
        assert!(line.starts_with("ssh-ed25519 AAAA") && line.ends_with(" git/sign"));
        let sig = signature(KeyAlgorithm::Ed25519, None, &ed.sign(b"m").to_bytes()).unwrap();
        assert_eq!(sig.algorithm(), Algorithm::Ed25519);

        let ec = p256::ecdsa::SigningKey::from_slice(&[3; 32]).unwrap();
        let spki = p256::pkcs8::EncodePublicKey::to_public_key_der(&p256::PublicKey::from(
            ec.verifying_key(),
        ))
        .unwrap();
        let key = public_key(KeyAlgorithm::EcdsaP256, spki.as_bytes()).unwrap();
        assert_eq!(
            key.algorithm(),
            Algorithm::Ecdsa {
                curve: EcdsaCurve::NistP256
            }
        );
        let der: p256::ecdsa::DerSignature = ec.sign(b"m");
        let sig = signature(KeyAlgorithm::EcdsaP256, None, der.as_bytes()).unwrap();
        // The blob is two mpints that give back r and s.
        let mut r = sig.as_bytes();
        let (sr, ss) = (
            Mpint::decode(&mut r).unwrap(),
            Mpint::decode(&mut r).unwrap(),
        );
        assert!(r.is_empty());
        let parsed = p256::ecdsa::Signature::from_der(der.as_bytes()).unwrap();
        let (pr, ps) = parsed.split_bytes();
        assert_eq!(strip(sr.as_positive_bytes().unwrap()), strip(&pr));
        assert_eq!(strip(ss.as_positive_bytes().unwrap()), strip(&ps));

        // Wrong key for the algorithm, PSS, and junk are refused.
        assert!(public_key(KeyAlgorithm::Ed25519, spki.as_bytes()).is_err());
        assert!(public_key(KeyAlgorithm::RsaPss3072, spki.as_bytes()).is_err());
        assert!(signature(KeyAlgorithm::EcdsaP256, None, b"junk").is_err());
        assert!(signature(KeyAlgorithm::Ed25519, None, &[0; 63]).is_err());
        assert!(!usable(KeyAlgorithm::RsaPss3072));
    }

    #[test]
    fn rsa_keys_serve_ssh_with_sha2_only() {
        use der::Encode as _;
        let modulus = [0xc5u8; 384];
        let body = Pkcs1PublicKey {
            modulus: UintRef::new(&modulus).unwrap(),
            public_exponent: UintRef::new(&[1, 0, 1]).unwrap(),
        }
        .to_der()
        .unwrap();
        let spki = spki::SubjectPublicKeyInfoOwned {
            algorithm: spki::AlgorithmIdentifierOwned {
                oid: RSA_ENCRYPTION,
                parameters: Some(der::asn1::AnyRef::NULL.into()),
            },
            subject_public_key: der::asn1::BitString::from_bytes(&body).unwrap(),
        }
        .to_der()
        .unwrap();
        let KeyData::Rsa(key) = public_key(KeyAlgorithm::RsaPkcs1_3072, &spki).unwrap() else {
            panic!("not an RSA key");
        };
        assert_eq!(key.n.as_positive_bytes().unwrap(), modulus);
        assert_eq!(key.e.as_positive_bytes().unwrap(), [1, 0, 1]);
        assert!(usable(KeyAlgorithm::RsaPkcs1_3072));

        let rsa = KeyAlgorithm::RsaPkcs1_3072;
        assert_eq!(
            sign_hash(rsa, RSA_SHA2_512).unwrap(),
            Some(SignHash::Sha512)
        );
        assert_eq!(
            sign_hash(rsa, RSA_SHA2_256).unwrap(),
            Some(SignHash::Sha256)
        );
        assert_eq!(
            sign_hash(rsa, RSA_SHA2_256 | RSA_SHA2_512).unwrap(),
            Some(SignHash::Sha512)
        );
        assert!(matches!(sign_hash(rsa, 0), Err(SshError::Sha1)));
        assert_eq!(sign_hash(KeyAlgorithm::Ed25519, 0).unwrap(), None);
        let sig = signature(rsa, Some(SignHash::Sha512), &[7; 384]).unwrap();
        assert_eq!(sig.algorithm().as_str(), "rsa-sha2-512");
        assert!(signature(rsa, None, &[7; 384]).is_err());
    }

    /// Leading zero bytes dropped, for comparing big-endian integers.
    fn strip(bytes: &[u8]) -> &[u8] {
        let start = bytes.iter().position(|&b| b != 0).unwrap_or(bytes.len());
        &bytes[start..]
    }
}
