//! [`Sealer`] for the TPM: a sealed-data object under the SRK whose authPolicy is, in order,
//! PolicyAuthorize on a signed PCR policy's key (optional, `signed.rs`), PolicyPCR over the
//! literal PCRs (sha256 bank) and, with a PIN, PolicyAuthValue.
//!
//! The sealed data is `context_digest(context) || secret`, so a blob unsealed for another purpose
//! is refused on the host after the TPM released it. Both commands that carry the secret (Create
//! in, Unseal out) run in a session salted with the SRK with AES-128-CFB parameter encryption.

use tss_esapi::constants::SessionType;
use tss_esapi::handles::ObjectHandle;
use tss_esapi::interface_types::session_handles::AuthSession;
use tss_esapi::structures::{Auth, PcrSelectionList, SensitiveData};
use tss_esapi::traits::Marshall;
use zeroize::Zeroizing;

use super::error::{map, with_retries, Op};
use super::session::{self, flush_quietly, ParamEncryption};
use super::{signed, template, unmarshal_public, TpmDevice};
use crate::{
    check_secret_len, context_digest, DeviceError, Pin, Result, SealPolicy, SealedBlob, Sealer,
    SecretBytes, SignedPcrs,
};

/// A TPM authValue is at most the size of the object's name digest (SHA-256: 32 bytes).
const MAX_TPM_PIN: usize = 32;

fn pin_auth(pin: &Pin) -> Result<Auth> {
    let bytes = pin.expose().as_bytes();
    if bytes.len() > MAX_TPM_PIN {
        return Err(DeviceError::InvalidArgument(format!(
            "a TPM PIN is at most {MAX_TPM_PIN} bytes (the size of a SHA-256 digest)"
        )));
    }
    // `Auth` copies into a zeroizing buffer.
    Auth::try_from(bytes).map_err(|e| map(Op::SessionSetup, e))
}

impl Sealer for TpmDevice {
    fn seal(
        &mut self,
        secret: &SecretBytes,
        context: &[u8],
        policy: &SealPolicy,
    ) -> Result<SealedBlob> {
        check_secret_len(secret)?;
        let pcrs = literal_pcrs(
            policy.pcrs.as_deref().unwrap_or(&self.pcrs),
            policy.signed.as_ref(),
        )
        .map_err(DeviceError::InvalidArgument)?;
        let auth = policy.pin.as_ref().map(pin_auth).transpose()?;
        let selection = literal_selection(&pcrs)?;
        let name = match &policy.signed {
            Some(signed) => {
                let key = signed::key(&signed.public_key).map_err(DeviceError::InvalidArgument)?;
                Some(signed::name(&mut self.ctx, &key)?)
            }
            None => None,
        };
        let digest = session::trial_policy_digest(
            &mut self.ctx,
            name.as_ref(),
            selection.as_ref(),
            auth.is_some(),
        )?;
        let public = template::sealed_object(digest, auth.is_some())?;

        // Exactly sized so the zeroizing buffer never reallocates and leaves a copy behind.
        let mut data = Zeroizing::new(Vec::with_capacity(32 + secret.len()));
        data.extend_from_slice(&context_digest(context));
        data.extend_from_slice(secret.expose());
        let sensitive = SensitiveData::try_from(data.as_slice()).map_err(|e| map(Op::Create, e))?;

        let srk = self.srk;
        let hmac = session::start_salted(
            &mut self.ctx,
            srk,
            SessionType::Hmac,
            ParamEncryption {
                command: true,
                response: true,
            },
        )?;
        let created = self
            .ctx
            .execute_with_session(Some(hmac), |c| {
                c.create(srk, public, auth, Some(sensitive), None, None)
            })
            .map_err(|e| map(Op::Create, e));
        flush_quietly(&mut self.ctx, session::session_object(hmac));
        let created = created?;

        Ok(SealedBlob::Tpm2 {
            public: created
                .out_public
                .marshall()
                .map_err(|e| map(Op::Create, e))?,
            private: created.out_private.value().to_vec(),
            pcrs,
            pin: policy.pin.is_some(),
            signed: policy.signed.clone(),
        })
    }

    fn unseal(
        &mut self,
        blob: &SealedBlob,
        context: &[u8],
        pin: Option<&Pin>,
    ) -> Result<SecretBytes> {
        self.unseal_noting(blob, context, pin)
            .map(|(secret, _)| secret)
    }

    fn unseal_noting(
        &mut self,
        blob: &SealedBlob,
        context: &[u8],
        pin: Option<&Pin>,
    ) -> Result<(SecretBytes, Option<String>)> {
        let SealedBlob::Tpm2 {
            public,
            private,
            pcrs,
            pin: needs_pin,
            signed,
        } = blob
        else {
            return Err(DeviceError::InvalidBlob("not a TPM sealed blob".into()));
        };
        let auth = match (needs_pin, pin) {
            (true, None) => {
                return Err(DeviceError::InvalidArgument("this slot needs a PIN".into()));
            }
            (true, Some(pin)) => Some(pin_auth(pin)?),
            // A PIN offered to a slot that has none is not needed, and ignoring it costs nothing.
            (false, _) => None,
        };
        let pcrs = literal_pcrs(pcrs, signed.as_ref()).map_err(DeviceError::InvalidBlob)?;
        let selection = literal_selection(&pcrs)?;
        let public = unmarshal_public(public)?;
        if signed.is_some() {
            // The external key takes an object slot while the sealed object is loaded (swtpm
            // has three, the SRK holds one).
            self.evict_cached_key();
        }
        let object = self.load(public, private)?;

        let result = self.unseal_loaded(object.into(), signed.as_ref(), selection.as_ref(), auth);
        flush_quietly(&mut self.ctx, object.into());
        let (data, note) = result?;

        let data = data.value();
        let expected = context_digest(context);
        let Some((digest, rest)) = data.split_first_chunk::<32>() else {
            return Err(DeviceError::InvalidBlob(
                "the sealed data is too short".into(),
            ));
        };
        if digest != &expected {
            return Err(DeviceError::InvalidBlob(
                "the blob was sealed for another context".into(),
            ));
        }
        if rest.is_empty() {
            return Err(DeviceError::InvalidBlob(
                "the sealed data holds no secret".into(),
            ));
        }
        // Exactly sized, so the only copies are this one and tss-esapi's zeroizing buffer.
        let mut secret = Vec::with_capacity(rest.len());
        secret.extend_from_slice(rest);
        Ok((SecretBytes::new(secret), note))
    }
}

/// Check the literal PCR list of a seal: what [`template::check_pcrs`] accepts, or an empty list
/// when a signed policy binds the object instead, and never a PCR that is in both (a literal
/// binding to a signed PCR would break at the first update the signature is there to survive).
fn literal_pcrs(pcrs: &[u8], signed: Option<&SignedPcrs>) -> std::result::Result<Vec<u8>, String> {
    let Some(signed) = signed else {
        return template::check_pcrs(pcrs);
    };
    if pcrs.is_empty() {
        return Ok(Vec::new());
    }
    let pcrs = template::check_pcrs(pcrs)?;
    if let Some(both) = pcrs.iter().find(|p| signed.pcrs.contains(p)) {
        return Err(format!(
            "PCR {both} is both a literal and a signed PCR of this seal: bind it one way"
        ));
    }
    Ok(pcrs)
}

fn literal_selection(pcrs: &[u8]) -> Result<Option<PcrSelectionList>> {
    if pcrs.is_empty() {
        return Ok(None);
    }
    template::pcr_selection(pcrs).map(Some)
}

impl TpmDevice {
    /// Satisfy the policy of a loaded sealed object and unseal it; the policy session is flushed
    /// whatever happens.
    fn unseal_loaded(
        &mut self,
        object: ObjectHandle,
        signed: Option<&SignedPcrs>,
        selection: Option<&PcrSelectionList>,
        auth: Option<Auth>,
    ) -> Result<(SensitiveData, Option<String>)> {
        let srk = self.srk;
        let policy = session::start_salted(
            &mut self.ctx,
            srk,
            SessionType::Policy,
            // Unseal has no command parameter; its response (the secret) is what we encrypt.
            ParamEncryption {
                command: false,
                response: true,
            },
        )?;
        let result = self.run_unseal(policy, object, signed, selection, auth);
        flush_quietly(&mut self.ctx, session::session_object(policy));
        result.map_err(|e| with_retries(&mut self.ctx, e))
    }

    fn run_unseal(
        &mut self,
        policy: AuthSession,
        object: ObjectHandle,
        signed: Option<&SignedPcrs>,
        selection: Option<&PcrSelectionList>,
        auth: Option<Auth>,
    ) -> Result<(SensitiveData, Option<String>)> {
        let policy_session = session::policy_session(policy)?;
        let note = match signed {
            Some(signed) => Some(signed::authorize(
                &mut self.ctx,
                policy_session,
                signed,
                &self.signature_files,
            )?),
            None => None,
        };
        session::apply_policy(&mut self.ctx, policy_session, selection, auth.is_some())?;
        if let Some(auth) = auth {
            self.ctx
                .tr_set_auth(object, auth)
                .map_err(|e| map(Op::SessionSetup, e))?;
        }
        let data = self
            .ctx
            .execute_with_session(Some(policy), |c| c.unseal(object))
            .map_err(|e| map(Op::Unseal, e))?;
        Ok((data, note))
    }
}
