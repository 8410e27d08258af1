//! `AttestKey`: a signed statement of where a key was made and how it is kept.
//!
//! A TPM speaks for itself: it certifies the key with its attestation key (`TPM2_Certify`,
//! in hsm-shim). A PKCS#11 token has no such statement in the standard, so the vault reads the
//! token's attributes (`CKA_LOCAL`, `CKA_NEVER_EXTRACTABLE`, `CKA_ALWAYS_SENSITIVE`, ...) and
//! signs them with its audit key, which says exactly that: what the token reported, on
//! Keyward's word. Both documents verify offline with `keyward_proto::attestation`.
//!
//! Must not: sign anything with the audit key but the fixed-context message of
//! `keyward_proto::attestation::pkcs11_message`, so an attestation can never pass for an audit
//! checkpoint or the reverse.

use chacha20poly1305::aead::{rand_core::RngCore as _, OsRng};
use ed25519_dalek::Signer as _;
use hsm_shim::{DeviceKind, KeyProtection};
use keyward_proto::api::{Bytes, KeyName};
use keyward_proto::attestation::{self as doc, Attestation, Format, Pkcs11Attributes};

use super::{audit_key, Vault};
use crate::error::{invalid, Error, Param};

impl Vault {
    /// `AttestKey`.
    ///
    /// # Errors
    /// `Sealed`, `NotFound`, a nonce of the wrong size, device failures.
    pub async fn attest_key(
        &self,
        name: KeyName,
        nonce: Option<Vec<u8>>,
    ) -> Result<Attestation, Error> {
        let nonce = match nonce {
            Some(n) if (1..=doc::MAX_NONCE).contains(&n.len()) => n,
            Some(n) => {
                return Err(invalid(
                    Param::Nonce,
                    format!("a nonce is 1 to {} bytes, not {}", doc::MAX_NONCE, n.len()),
                ))
            }
            None => {
                let mut n = vec![0u8; 32];
                OsRng.fill_bytes(&mut n);
                n
            }
        };
        let key = self.key_ref(&name).await?;
        let device = self.device(&key.device)?;
        let handle = key.handle.clone();
        let fail = |e| Error::device(&key.device, e);
        let base = |format, note: &str, signer: Vec<u8>, signature: Vec<u8>| Attestation {
            format,
            key: name.to_string(),
            device: key.device.clone(),
            algorithm: key.handle.algorithm(),
            public_key: Bytes(key.public_key.clone()),
            nonce: Bytes(nonce.clone()),
            signer_public_key: Bytes(signer),
            signature: Bytes(signature),
            attest: None,
            key_public_area: None,
            signer_public_area: None,
            ek_certificates: Vec::new(),
            attributes: None,
            note: note.to_owned(),
        };
        match device.kind() {
            DeviceKind::Tpm2 => {
                let n = nonce.clone();
                let cert = device
                    .call(move |d| d.certify(&handle, &n))
                    .await
                    .map_err(fail)?;
                Ok(Attestation {
                    attest: Some(Bytes(cert.attest)),
                    key_public_area: Some(Bytes(cert.key_public_area)),
                    signer_public_area: Some(Bytes(cert.signer_public_area)),
                    ek_certificates: cert.ek_certificates.into_iter().map(Bytes).collect(),
                    ..base(
                        Format::Tpm2Certify,
                        doc::TPM_NOTE,
                        cert.signer_public_key.0,
                        cert.signature,
                    )
                })
            }
            DeviceKind::Pkcs11 => {
                let p: KeyProtection = device
                    .call(move |d| d.protection(&handle))
                    .await
                    .map_err(fail)?;
                let attributes = Pkcs11Attributes {
                    local: p.generated_on_device,
                    never_extractable: p.never_extractable,
                    always_sensitive: p.always_sensitive,
                    extractable: p.extractable,
                    sensitive: p.sensitive,
                };
                let message = doc::pkcs11_message(
                    name.as_str(),
                    &key.device,
                    key.handle.algorithm(),
                    &key.public_key,
                    &nonce,
                    attributes,
                );
                // The key exists only while the vault is open, and only for this call.
                let (signature, signer) = self
                    .with_open(|open| {
                        let audit = audit_key::derive(&open.vmk, &open.vault_id);
                        (
                            audit.sign(&message).to_bytes().to_vec(),
                            keyward_proto::audit::spki_der(&audit.verifying_key()),
                        )
                    })
                    .await?;
                Ok(Attestation {
                    attributes: Some(attributes),
                    ..base(
                        Format::Pkcs11Attributes,
                        doc::PKCS11_NOTE,
                        signer,
                        signature,
                    )
                })
            }
        }
    }
}
