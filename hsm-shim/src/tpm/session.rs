//! TPM sessions: salted sessions with parameter encryption for commands that carry a secret, the
//! seal policy (run identically in a trial session at seal time and a real one at unseal time;
//! its signed part is in `signed.rs`), and flushing that never masks the error that matters.
//!
//! Salting with the SRK means the session key comes from a secret only the TPM can decrypt, so
//! the AES-128-CFB parameter encryption protects the VMK and PIN from anyone on the bus or the
//! TCTI (a TPM interposer, a logging resource manager) even though our auth values are empty.

use tss_esapi::attributes::SessionAttributesBuilder;
use tss_esapi::constants::SessionType;
use tss_esapi::handles::{KeyHandle as TpmKey, ObjectHandle, SessionHandle};
use tss_esapi::interface_types::algorithm::HashingAlgorithm;
use tss_esapi::interface_types::session_handles::{AuthSession, PolicySession};
use tss_esapi::structures::{Digest, Name, PcrSelectionList, SymmetricDefinition};
use tss_esapi::Context;

use super::error::{map, Op};
use crate::{DeviceError, Result};

/// Which directions of parameter encryption a session does.
#[derive(Clone, Copy, Debug)]
pub(super) struct ParamEncryption {
    /// Encrypt the first command parameter (what we send: a secret, a PIN).
    pub(super) command: bool,
    /// Encrypt the first response parameter (what the TPM returns: an unsealed secret).
    pub(super) response: bool,
}

/// Start a session salted with `srk`, AES-128-CFB parameter encryption as asked, SHA-256.
pub(super) fn start_salted(
    ctx: &mut Context,
    srk: TpmKey,
    kind: SessionType,
    enc: ParamEncryption,
) -> Result<AuthSession> {
    let session = ctx
        .execute_without_session(|c| {
            c.start_auth_session(
                Some(srk),
                None,
                None,
                kind,
                SymmetricDefinition::AES_128_CFB,
                HashingAlgorithm::Sha256,
            )
        })
        .map_err(|e| map(Op::StartSession, e))?
        .ok_or_else(|| no_session(Op::StartSession))?;
    let (attributes, mask) = SessionAttributesBuilder::new()
        .with_continue_session(true)
        .with_decrypt(enc.command)
        .with_encrypt(enc.response)
        .build();
    if let Err(e) = ctx.tr_sess_set_attributes(session, attributes, mask) {
        flush_quietly(ctx, session_object(session));
        return Err(map(Op::SessionSetup, e));
    }
    Ok(session)
}

/// The policy every Keyward sealed object carries after its signed part (if any): PolicyPCR
/// over the literal PCRs of the sha256 bank (if any), then PolicyAuthValue when a PIN is part
/// of it. Running the same function in the trial session and the real one is what keeps the
/// two digests in step.
///
/// PolicyPCR is sent with an empty expected digest: in a trial session the TPM then digests the
/// current PCR values into the policy, in a real session it uses the current values again, and
/// Unseal fails with TPM_RC_POLICY_FAIL when they differ.
pub(super) fn apply_policy(
    ctx: &mut Context,
    session: PolicySession,
    pcrs: Option<&PcrSelectionList>,
    with_pin: bool,
) -> Result<()> {
    if let Some(pcrs) = pcrs {
        ctx.execute_without_session(|c| c.policy_pcr(session, Digest::default(), pcrs.clone()))
            .map_err(|e| map(Op::Policy, e))?;
    }
    if with_pin {
        ctx.execute_without_session(|c| c.policy_auth_value(session))
            .map_err(|e| map(Op::Policy, e))?;
    }
    Ok(())
}

/// The authPolicy digest for a new sealed object bound to the current values of `pcrs`, and
/// first, when `authorize` names a key, to whatever PCR policy that key signs
/// (`PolicyAuthorize` resets the digest, so it must come first: that is also systemd's order).
pub(super) fn trial_policy_digest(
    ctx: &mut Context,
    authorize: Option<&Name>,
    pcrs: Option<&PcrSelectionList>,
    with_pin: bool,
) -> Result<Digest> {
    // A trial session carries nothing secret and authorises nothing: no salt, no encryption.
    let session = ctx
        .execute_without_session(|c| {
            c.start_auth_session(
                None,
                None,
                None,
                SessionType::Trial,
                SymmetricDefinition::Null,
                HashingAlgorithm::Sha256,
            )
        })
        .map_err(|e| map(Op::StartSession, e))?
        .ok_or_else(|| no_session(Op::StartSession))?;
    let result = policy_session(session).and_then(|policy| {
        if let Some(name) = authorize {
            super::signed::authorize_trial(ctx, policy, name)?;
        }
        apply_policy(ctx, policy, pcrs, with_pin)?;
        ctx.execute_without_session(|c| c.policy_get_digest(policy))
            .map_err(|e| map(Op::Policy, e))
    });
    flush_quietly(ctx, session_object(session));
    result
}

/// The policy view of a session we started as a policy or trial session.
pub(super) fn policy_session(session: AuthSession) -> Result<PolicySession> {
    PolicySession::try_from(session).map_err(|e| map(Op::StartSession, e))
}

/// The object handle of a session, for flushing.
pub(super) fn session_object(session: AuthSession) -> ObjectHandle {
    ObjectHandle::from(SessionHandle::from(session))
}

/// Flush a transient object or session, logging (not returning) a failure: callers flush on
/// their way out, where the error worth reporting is the one that sent them there. If the TPM is
/// gone, so is the object.
pub(super) fn flush_quietly(ctx: &mut Context, handle: ObjectHandle) {
    if let Err(e) = ctx.flush_context(handle) {
        tracing::debug!(error = %e, "flushing a TPM handle failed");
    }
}

fn no_session(op: Op) -> DeviceError {
    DeviceError::Backend {
        op: op.name(),
        detail: "the TPM returned no session handle".into(),
    }
}
