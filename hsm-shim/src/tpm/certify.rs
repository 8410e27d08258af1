//! Key attestation on the TPM: `TPM2_Certify` of a Keyward key by an attestation key (AK).
//!
//! The AK is a primary key re-created from a fixed template (`template::attestation_key`)
//! under the endorsement hierarchy for each call and flushed afterwards, so the TPM keeps no
//! state of ours and the AK's public key is the same on every call (until the endorsement
//! seed changes). The TPM signs a `TPMS_ATTEST` that names the key and carries the caller's
//! nonce; the verifier (`keyward_proto::attestation`) checks it offline. The endorsement key
//! certificates the manufacturer stored in NV, where there are any, come along for a verifier
//! that wants to tie the TPM to its maker.
//!
//! Must not: keep the AK loaded (a TPM has three transient slots and the SRK and the cached
//! signing key hold two), or sign anything with it but what the TPM itself generated.

use tss_esapi::abstraction::ek::retrieve_ek_pubcert;
use tss_esapi::abstraction::AsymmetricAlgorithmSelection;
use tss_esapi::constants::CapabilityType;
use tss_esapi::interface_types::algorithm::HashingAlgorithm;
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::key_bits::RsaKeyBits;
use tss_esapi::interface_types::resource_handles::Hierarchy;
use tss_esapi::interface_types::session_handles::AuthSession;
use tss_esapi::structures::{CapabilityData, Data, HashScheme, Signature, SignatureScheme};
use tss_esapi::traits::Marshall;

use super::error::{map, Op};
use super::session::flush_quietly;
use super::sign::{spki_of, tpm_blobs};
use super::{template, TpmDevice};
use crate::pubkey::ecdsa_p256_rs_to_der;
use crate::{Certification, DeviceError, KeyHandle, Result};

/// Largest nonce `TPM2_Certify` takes (a `TPM2B_DATA`: one SHA-512 digest).
const MAX_NONCE: usize = 64;

impl TpmDevice {
    /// `TPM2_Certify` of `handle`'s key by the AK, with `nonce` as qualifying data.
    pub(super) fn certify_key(
        &mut self,
        handle: &KeyHandle,
        nonce: &[u8],
    ) -> Result<Certification> {
        if nonce.len() > MAX_NONCE {
            return Err(DeviceError::InvalidArgument(format!(
                "a TPM attestation nonce is at most {MAX_NONCE} bytes, not {}",
                nonce.len()
            )));
        }
        let qualifying = Data::try_from(nonce.to_vec()).map_err(|e| map(Op::Certify, e))?;
        let (public, private) = tpm_blobs(handle)?;
        let key_public_area = self
            .loaded_public(handle)?
            .marshall()
            .map_err(|e| map(Op::Certify, e))?;
        let object = self.key_object(public, private)?;
        let ek_certificates = self.ek_certificates();
        let ak_template = template::attestation_key()?;
        let ak = self
            .ctx
            .execute_with_session(Some(AuthSession::Password), |c| {
                c.create_primary(Hierarchy::Endorsement, ak_template, None, None, None, None)
            })
            .map_err(|e| map(Op::AttestationKey, e))?;
        let scheme = SignatureScheme::EcDsa {
            hash_scheme: HashScheme::new(HashingAlgorithm::Sha256),
        };
        // Both the key and the AK have empty auth values: two password sessions.
        let certified = self.ctx.execute_with_sessions(
            (
                Some(AuthSession::Password),
                Some(AuthSession::Password),
                None,
            ),
            |c| c.certify(object.into(), ak.key_handle, qualifying, scheme),
        );
        flush_quietly(&mut self.ctx, ak.key_handle.into());
        let (attest, signature) = certified.map_err(|e| map(Op::Certify, e))?;
        let signature = match signature {
            Signature::EcDsa(sig) => {
                ecdsa_p256_rs_to_der(sig.signature_r().value(), sig.signature_s().value())?
            }
            other => {
                return Err(DeviceError::Backend {
                    op: Op::Certify.name(),
                    detail: format!("the TPM returned a {:?} signature", other.algorithm()),
                })
            }
        };
        Ok(Certification {
            attest: attest.marshall().map_err(|e| map(Op::Certify, e))?,
            signature,
            key_public_area,
            signer_public_area: ak.out_public.marshall().map_err(|e| map(Op::Certify, e))?,
            signer_public_key: spki_of(&ak.out_public)?,
            ek_certificates,
        })
    }

    /// The EK certificates in the TPM's NV (RSA 2048 and ECC P-256 indices of the TCG EK
    /// Credential Profile); a TPM without them (swtpm unless set up with `--create-ek-cert`)
    /// has none, which is not an error. The NV handles are listed first so that a missing
    /// index is not tried (ESAPI would print errors for it on stderr).
    fn ek_certificates(&mut self) -> Vec<Vec<u8>> {
        let present: Vec<u32> = match self.ctx.execute_without_session(|c| {
            c.get_capability(CapabilityType::Handles, EK_CERT_NV_FIRST, EK_CERT_NV_SPAN)
        }) {
            Ok((CapabilityData::Handles(list), _)) => {
                list.into_inner().into_iter().map(u32::from).collect()
            }
            Ok(_) => Vec::new(),
            Err(e) => {
                tracing::debug!(error = %e, "listing the TPM's NV indices failed");
                Vec::new()
            }
        };
        [
            (
                RSA_2048_EK_CERT,
                AsymmetricAlgorithmSelection::Rsa(RsaKeyBits::Rsa2048),
            ),
            (
                ECC_P256_EK_CERT,
                AsymmetricAlgorithmSelection::Ecc(EccCurve::NistP256),
            ),
        ]
        .into_iter()
        .filter(|(index, _)| present.contains(index))
        .filter_map(|(_, alg)| match retrieve_ek_pubcert(&mut self.ctx, alg) {
            Ok(cert) if !cert.is_empty() => Some(cert),
            Ok(_) => None,
            Err(e) => {
                tracing::debug!(?alg, error = %e, "no EK certificate read");
                None
            }
        })
        .collect()
    }
}

/// NV indices of the RSA 2048 and ECC P-256 EK certificates (TCG EK Credential Profile 2.3).
const RSA_2048_EK_CERT: u32 = 0x01c0_0002;
const ECC_P256_EK_CERT: u32 = 0x01c0_000a;
/// The range listed to find them.
const EK_CERT_NV_FIRST: u32 = 0x01c0_0000;
const EK_CERT_NV_SPAN: u32 = 16;
