//! Signed PCR policies in the format of systemd's `systemd-measure sign`: the key that blesses
//! PCR values, the signature file, and the `PolicyAuthorize` step of a sealed object's policy.
//!
//! What `systemd-measure sign` writes (checked against systemd 252 and its source): a JSON
//! object with one array per bank (`"sha256": [...]`), each entry `{"pcrs": [11], "pkfp": hex
//! SHA-256 of the PKCS#1 `RSAPublicKey` DER, "pol": hex PolicyPCR digest of the expected
//! values (from a zero digest), "sig": base64 RSASSA-PKCS1-v1_5 SHA-256 signature over
//! "pol"}`. The TPM checks the RSA part (`VerifySignature` on SHA-256(pol)), which is also the
//! `aHash` of `PolicyAuthorize` with an empty policyRef, so the ticket fits.
//!
//! The key is loaded (`LoadExternal`, public part only) with the public template systemd uses
//! (RSA, nameAlg SHA-256, decrypt|sign|userWithAuth, no scheme), so its TPM name, which the
//! sealed object's policy names, is the one `systemd-cryptenroll --tpm2-public-key` seals to.
//! It goes into the owner hierarchy, as systemd loads it: for a key in the NULL hierarchy
//! `VerifySignature` returns a NULL ticket, which `PolicyAuthorize` refuses (TPM_RC_VALUE on
//! checkTicket). The name does not depend on the hierarchy.
//!
//! This file reads the signature file (a host path from the device configuration, never from a
//! request) and decides which entry applies; it never logs or returns anything secret (there is
//! nothing secret here: keys are public, signatures are public).

use std::path::{Path, PathBuf};

use base64::Engine as _;
use der::{Decode, DecodePem};
use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use tss_esapi::constants::tss::{TPM2_RH_NULL, TPM2_ST_VERIFIED};
use tss_esapi::handles::KeyHandle as TpmKey;
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, PublicAlgorithm};
use tss_esapi::interface_types::key_bits::RsaKeyBits;
use tss_esapi::interface_types::resource_handles::Hierarchy;
use tss_esapi::interface_types::session_handles::PolicySession;
use tss_esapi::structures::{
    Digest, Name, Nonce, Public, PublicBuilder, PublicKeyRsa, PublicRsaParametersBuilder,
    RsaExponent, RsaScheme, RsaSignature, Signature, VerifiedTicket,
};
use tss_esapi::tss2_esys::{TPM2B_DIGEST, TPMT_TK_VERIFIED};
use tss_esapi::Context;

use super::error::{map, Op};
use super::session::flush_quietly;
use super::template;
use crate::{DeviceError, Result, SignedPcrs};
use keyward_proto::rsa::{RsaPublicKey, RSA_ENCRYPTION};

/// Where systemd puts the signature of the running UKI's PCR 11 values, in the order systemd
/// itself looks (`/run` from systemd-stub's `.pcrsig` section, then the one the OS ships).
pub const DEFAULT_SIGNATURE_FILES: [&str; 2] = [
    "/run/systemd/tpm2-pcr-signature.json",
    "/usr/lib/systemd/tpm2-pcr-signature.json",
];

/// The PCRs a signed policy covers when the admin doesn't say: 11, where systemd-stub
/// measures the unified kernel image and systemd its boot phases.
pub const DEFAULT_SIGNED_PCRS: [u8; 1] = [11];

/// A signature file larger than this is not one `systemd-measure` wrote (a few entries of a
/// few hundred bytes each); refuse it before reading it all.
const MAX_SIGNATURE_FILE: u64 = 1024 * 1024;

/// The signing key as the TPM and the signature file know it.
pub(super) struct Key {
    /// The public area loaded with `LoadExternal`.
    pub(super) public: Public,
    /// `pkfp`: SHA-256 of the PKCS#1 `RSAPublicKey` DER.
    pub(super) fingerprint: [u8; 32],
}

/// Make the [`SignedPcrs`] of a slot from the signing key's PEM (`SubjectPublicKeyInfo`, as
/// `openssl pkey -pubout` writes it) and the PCRs its signatures cover (default `[11]`).
///
/// # Errors
/// [`DeviceError::InvalidArgument`] for anything but an RSA public key of 1024 to 4096 bits
/// (what a TPM loads; systemd 252 signs with RSA only) or a bad PCR list.
pub fn signed_pcrs(pem: &str, pcrs: Option<&[u8]>) -> Result<SignedPcrs> {
    let spki = spki::SubjectPublicKeyInfoOwned::from_pem(pem.trim().as_bytes()).map_err(|e| {
        DeviceError::InvalidArgument(format!("the PCR public key is not a PEM public key: {e}"))
    })?;
    let der = der::Encode::to_der(&spki)
        .map_err(|e| DeviceError::InvalidArgument(format!("the PCR public key: {e}")))?;
    let pcrs = template::check_pcrs(pcrs.unwrap_or(&DEFAULT_SIGNED_PCRS))
        .map_err(DeviceError::InvalidArgument)?;
    key(&der).map_err(DeviceError::InvalidArgument)?;
    Ok(SignedPcrs {
        public_key: der,
        pcrs,
    })
}

/// SHA-256 of the key's PKCS#1 DER: what `pkfp` in a signature file holds.
///
/// # Errors
/// When `spki_der` is not an RSA `SubjectPublicKeyInfo`.
pub fn fingerprint(spki_der: &[u8]) -> std::result::Result<[u8; 32], String> {
    Ok(key(spki_der)?.fingerprint)
}

/// Parse a stored or offered key (DER `SubjectPublicKeyInfo`).
pub(super) fn key(spki_der: &[u8]) -> std::result::Result<Key, String> {
    let spki = spki::SubjectPublicKeyInfoRef::from_der(spki_der)
        .map_err(|e| format!("the PCR public key is not a DER public key: {e}"))?;
    if spki.algorithm.oid != RSA_ENCRYPTION {
        return Err(format!(
            "the PCR public key is not RSA (algorithm {}): systemd-measure signs with RSA keys",
            spki.algorithm.oid
        ));
    }
    let pkcs1 = spki
        .subject_public_key
        .as_bytes()
        .ok_or("the PCR public key's bit string is not whole bytes")?;
    let rsa = RsaPublicKey::from_der(pkcs1)
        .map_err(|e| format!("the PCR public key is not an RSA public key: {e}"))?;
    let modulus = rsa.modulus.as_bytes();
    let bits = match modulus.len() {
        128 => RsaKeyBits::Rsa1024,
        256 => RsaKeyBits::Rsa2048,
        384 => RsaKeyBits::Rsa3072,
        512 => RsaKeyBits::Rsa4096,
        n => {
            return Err(format!(
                "an RSA key of {} bits cannot be loaded into a TPM (1024, 2048, 3072 or 4096)",
                n * 8
            ))
        }
    };
    let e = rsa.public_exponent.as_bytes();
    if e.len() > 4 {
        return Err("the RSA public exponent is larger than a TPM takes (32 bits)".into());
    }
    let exponent = e.iter().fold(0u32, |acc, b| (acc << 8) | u32::from(*b));
    // The TPM's encoding of the default exponent is 0.
    let exponent = if exponent == 65537 { 0 } else { exponent };
    let public =
        rsa_public(bits, exponent, modulus).map_err(|e| format!("the PCR public key: {e}"))?;
    Ok(Key {
        public,
        fingerprint: Sha256::digest(pkcs1).into(),
    })
}

fn rsa_public(bits: RsaKeyBits, exponent: u32, modulus: &[u8]) -> Result<Public> {
    let attributes = tss_esapi::attributes::ObjectAttributesBuilder::new()
        .with_decrypt(true)
        .with_sign_encrypt(true)
        .with_user_with_auth(true)
        .build()
        .map_err(|e| map(Op::Policy, e))?;
    let parameters = PublicRsaParametersBuilder::new()
        .with_scheme(RsaScheme::Null)
        .with_key_bits(bits)
        .with_exponent(RsaExponent::create(exponent).map_err(|e| map(Op::Policy, e))?)
        .with_is_signing_key(true)
        .with_is_decryption_key(true)
        .with_restricted(false)
        .build()
        .map_err(|e| map(Op::Policy, e))?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Rsa)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attributes)
        .with_rsa_parameters(parameters)
        .with_rsa_unique_identifier(
            PublicKeyRsa::try_from(modulus.to_vec()).map_err(|e| map(Op::Policy, e))?,
        )
        .build()
        .map_err(|e| map(Op::Policy, e))
}

/// Load the key into the owner hierarchy (public part only: nothing to authorise), so the
/// tickets `VerifySignature` makes with it are real ones (see the module note).
fn load(ctx: &mut Context, key: &Key) -> Result<TpmKey> {
    ctx.execute_without_session(|c| c.load_external_public(key.public.clone(), Hierarchy::Owner))
        .map_err(|e| map(Op::Policy, e))
}

/// The key's TPM name (nameAlg || SHA-256 of its public area), as the TPM computes it.
pub(super) fn name(ctx: &mut Context, key: &Key) -> Result<Name> {
    let handle = load(ctx, key)?;
    let name = ctx
        .tr_get_name(handle.into())
        .map_err(|e| map(Op::Policy, e));
    flush_quietly(ctx, handle.into());
    name
}

/// `PolicyAuthorize` in a trial session: the TPM checks neither the approved policy nor the
/// ticket there, and leaves the digest as `H(H(0 || CC_PolicyAuthorize || name) || "")`.
pub(super) fn authorize_trial(
    ctx: &mut Context,
    session: PolicySession,
    name: &Name,
) -> Result<()> {
    let ticket = null_ticket()?;
    ctx.execute_without_session(|c| {
        c.policy_authorize(session, Digest::default(), Nonce::default(), name, ticket)
    })
    .map_err(|e| map(Op::Policy, e))
}

fn null_ticket() -> Result<VerifiedTicket> {
    VerifiedTicket::try_from(TPMT_TK_VERIFIED {
        tag: TPM2_ST_VERIFIED,
        hierarchy: TPM2_RH_NULL,
        digest: TPM2B_DIGEST {
            size: 0,
            buffer: [0; 64],
        },
    })
    .map_err(|e| map(Op::Policy, e))
}

/// Satisfy the signed part of a policy session: PolicyPCR over the signed PCRs' current
/// values, the signature file's entry for exactly that digest, `VerifySignature` for a ticket,
/// and `PolicyAuthorize`. Returns which policy matched, for the admin.
///
/// # Errors
/// [`DeviceError::PolicyUnsigned`] saying why no entry applies (no signature file, no entry
/// for the current values, signed by another key, a signature that does not verify); device
/// errors otherwise.
pub(super) fn authorize(
    ctx: &mut Context,
    session: PolicySession,
    signed: &SignedPcrs,
    files: &[PathBuf],
) -> Result<String> {
    let key = key(&signed.public_key).map_err(DeviceError::InvalidBlob)?;
    let pcrs = template::check_pcrs(&signed.pcrs).map_err(DeviceError::InvalidBlob)?;
    let selection = template::pcr_selection(&pcrs)?;
    let (file, text) = read_signature_file(files)?;
    ctx.execute_without_session(|c| c.policy_pcr(session, Digest::default(), selection))
        .map_err(|e| map(Op::Policy, e))?;
    let current = ctx
        .execute_without_session(|c| c.policy_get_digest(session))
        .map_err(|e| map(Op::Policy, e))?;
    let entry = pick(&text, &pcrs, &key.fingerprint, current.value())
        .map_err(|why| DeviceError::PolicyUnsigned(format!("{why} ({})", file.display())))?;

    let handle = load(ctx, &key)?;
    let verified = verify(ctx, handle, current.value(), &entry.sig);
    let name = ctx
        .tr_get_name(handle.into())
        .map_err(|e| map(Op::Policy, e));
    flush_quietly(ctx, handle.into());
    let ticket = verified.map_err(|e| match e {
        DeviceError::DeviceGone(_) | DeviceError::Busy => e,
        _ => DeviceError::PolicyUnsigned(format!(
            "the signature for the current {} values in {} does not verify with this slot's key {}",
            pcr_names(&pcrs),
            file.display(),
            short(&key.fingerprint)
        )),
    })?;
    let name = name?;
    let approved = current.clone();
    ctx.execute_without_session(|c| {
        c.policy_authorize(session, approved, Nonce::default(), &name, ticket)
    })
    .map_err(|e| map(Op::Policy, e))?;
    Ok(format!(
        "signed PCR policy: {} policy {} signed by key {} ({})",
        pcr_names(&pcrs),
        short(current.value()),
        short(&key.fingerprint),
        file.display()
    ))
}

fn verify(ctx: &mut Context, key: TpmKey, policy: &[u8], sig: &[u8]) -> Result<VerifiedTicket> {
    let digest =
        Digest::try_from(Sha256::digest(policy).to_vec()).map_err(|e| map(Op::Policy, e))?;
    let signature = Signature::RsaSsa(
        RsaSignature::create(
            HashingAlgorithm::Sha256,
            PublicKeyRsa::try_from(sig.to_vec()).map_err(|e| map(Op::Policy, e))?,
        )
        .map_err(|e| map(Op::Policy, e))?,
    );
    ctx.execute_without_session(|c| c.verify_signature(key, digest, signature))
        .map_err(|e| map(Op::Policy, e))
}

/// The first signature file that exists, read whole (bounded).
fn read_signature_file(files: &[PathBuf]) -> Result<(PathBuf, String)> {
    for file in files {
        match read_bounded(file) {
            Ok(text) => return Ok((file.clone(), text)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => {
                return Err(DeviceError::PolicyUnsigned(format!(
                    "cannot read the PCR signature file {}: {e}",
                    file.display()
                )))
            }
        }
    }
    let looked = files
        .iter()
        .map(|f| f.display().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    Err(DeviceError::PolicyUnsigned(format!(
        "no PCR signature file (looked for {looked})"
    )))
}

fn read_bounded(path: &Path) -> std::io::Result<String> {
    use std::io::Read as _;
    let file = std::fs::File::open(path)?;
    let mut text = String::new();
    file.take(MAX_SIGNATURE_FILE + 1)
        .read_to_string(&mut text)?;
    if text.len() as u64 > MAX_SIGNATURE_FILE {
        return Err(std::io::Error::other(format!(
            "larger than {MAX_SIGNATURE_FILE} bytes"
        )));
    }
    Ok(text)
}

/// A signature file as `systemd-measure sign` writes it. Only the sha256 bank is read; the
/// others (and fields added later) are ignored.
#[derive(Deserialize)]
struct SignatureFile {
    #[serde(default)]
    sha256: Vec<Entry>,
}

#[derive(Deserialize)]
struct Entry {
    pcrs: Vec<u32>,
    pkfp: String,
    pol: String,
    sig: String,
}

/// The entry [`authorize`] uses.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Chosen {
    pub(super) sig: Vec<u8>,
}

/// Pick the entry of `text` for `pcrs` whose policy digest is `current` and whose key is
/// `fingerprint`; otherwise say why there is none.
pub(super) fn pick(
    text: &str,
    pcrs: &[u8],
    fingerprint: &[u8; 32],
    current: &[u8],
) -> std::result::Result<Chosen, String> {
    let file: SignatureFile = serde_json::from_str(text)
        .map_err(|e| format!("the PCR signature file is not systemd-measure JSON: {e}"))?;
    let ours = |e: &Entry| {
        let mut listed = e.pcrs.clone();
        listed.sort_unstable();
        listed.dedup();
        listed
            .iter()
            .copied()
            .eq(pcrs.iter().map(|&p| u32::from(p)))
    };
    let same_pcrs: Vec<&Entry> = file.sha256.iter().filter(|e| ours(e)).collect();
    if same_pcrs.is_empty() {
        return Err(format!(
            "no sha256 entry for {} in the PCR signature file",
            pcr_names(pcrs)
        ));
    }
    let for_now: Vec<&Entry> = same_pcrs
        .iter()
        .copied()
        .filter(|e| hex_eq(&e.pol, current))
        .collect();
    if for_now.is_empty() {
        return Err(format!(
            "no entry for the current {} values (policy {}) among {} signed",
            pcr_names(pcrs),
            short(current),
            same_pcrs.len()
        ));
    }
    let Some(entry) = for_now.iter().find(|e| hex_eq(&e.pkfp, fingerprint)) else {
        let others = for_now
            .iter()
            .map(|e| e.pkfp.get(..12).unwrap_or(&e.pkfp).to_owned())
            .collect::<Vec<_>>()
            .join(", ");
        return Err(format!(
            "the current {} values are signed by another key ({others}), not by this slot's key {}",
            pcr_names(pcrs),
            short(fingerprint)
        ));
    };
    let sig = base64::engine::general_purpose::STANDARD
        .decode(entry.sig.trim())
        .map_err(|_| "a signature in the PCR signature file is not base64".to_owned())?;
    Ok(Chosen { sig })
}

fn hex_eq(text: &str, bytes: &[u8]) -> bool {
    let mut buf = vec![0u8; bytes.len()];
    matches!(base16ct::mixed::decode(text.trim(), &mut buf), Ok(d) if d == bytes)
}

/// The first 6 bytes in hex: enough to tell policies and keys apart in a status line.
fn short(bytes: &[u8]) -> String {
    base16ct::lower::encode_string(bytes.get(..6).unwrap_or(bytes))
}

fn pcr_names(pcrs: &[u8]) -> String {
    let list = pcrs.iter().map(u8::to_string).collect::<Vec<_>>().join(",");
    if pcrs.len() == 1 {
        format!("PCR {list}")
    } else {
        format!("PCRs {list}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Made with `openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048` and
    /// `systemd-measure sign --phase=enter-initrd --bank=sha256` (systemd 252).
    const PUBLIC_PEM: &str = include_str!("testdata/pcr-public-key.pem");
    const SIGNATURE: &str = include_str!("testdata/tpm2-pcr-signature.json");
    const POLICY: &str = "65e261a270a3ce88a1d09eea5ff01f9276286095bf56beee8d6d85f7b663cc1c";

    fn current() -> Vec<u8> {
        base16ct::lower::decode_vec(POLICY).unwrap()
    }

    #[test]
    fn fingerprint_is_systemds_pkfp() {
        let signed = signed_pcrs(PUBLIC_PEM, None).unwrap();
        assert_eq!(signed.pcrs, [11]);
        assert_eq!(
            base16ct::lower::encode_string(&fingerprint(&signed.public_key).unwrap()),
            "ad99eb57b589601751008b06fa43734ca588ed2c48745f5971b0461fa2ea885b"
        );
    }

    #[test]
    fn the_entry_for_the_current_policy_is_picked() {
        let key = key(&signed_pcrs(PUBLIC_PEM, None).unwrap().public_key).unwrap();
        let chosen = pick(SIGNATURE, &[11], &key.fingerprint, &current()).unwrap();
        assert_eq!(chosen.sig.len(), 256);
    }

    #[test]
    fn each_way_of_not_matching_says_which() {
        let key = key(&signed_pcrs(PUBLIC_PEM, None).unwrap().public_key).unwrap();
        let other = pick(SIGNATURE, &[11], &key.fingerprint, &[0u8; 32]).unwrap_err();
        assert!(
            other.contains("no entry for the current PCR 11 values"),
            "{other}"
        );
        let wrong_key = pick(SIGNATURE, &[11], &[7u8; 32], &current()).unwrap_err();
        assert!(
            wrong_key.contains("signed by another key (ad99eb57b589)"),
            "{wrong_key}"
        );
        let no_pcr = pick(SIGNATURE, &[7, 11], &key.fingerprint, &current()).unwrap_err();
        assert!(no_pcr.contains("no sha256 entry for PCRs 7,11"), "{no_pcr}");
        let garbage = pick("{\"sha256\": 5}", &[11], &key.fingerprint, &current()).unwrap_err();
        assert!(garbage.contains("not systemd-measure JSON"), "{garbage}");
    }

    #[test]
    fn non_rsa_keys_are_refused() {
        let p256 = "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE9PRmdMIX0L7qod/P59QuIgt6ED6V\nyN9R2U+iZyADdM4NM5yb+fmN0KLCvIBV0YHcLFfKXw5juqFx2s+gZlXH8w==\n-----END PUBLIC KEY-----\n";
        let err = signed_pcrs(p256, None).unwrap_err().to_string();
        assert!(err.contains("not RSA"), "{err}");
        assert!(signed_pcrs("garbage", None).is_err());
        assert!(signed_pcrs(PUBLIC_PEM, Some(&[24])).is_err());
    }
}
