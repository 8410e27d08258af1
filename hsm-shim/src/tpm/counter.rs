//! NV monotonic counters: an NV index of type counter in the owner hierarchy, defined on first
//! use, that only ever goes up. The daemon binds its audit log's anchor to one, so that putting
//! back an older anchor (with the log it matches) shows: the counter has moved on.
//!
//! A TPM counter starts at the highest value any counter on that TPM has had, not at zero: the
//! value is opaque, only its order means anything. The index is not `TPMA_NV_ORDERLY`: an
//! orderly counter jumps ahead after an unclean shutdown, which would look like a rollback.
//!
//! Must not: undefine the index (nothing here ever makes the counter go back), or keep the
//! ESAPI object of the index open between calls.

use tss_esapi::attributes::NvIndexAttributesBuilder;
use tss_esapi::constants::nv_index_type::NvIndexType;
use tss_esapi::constants::CapabilityType;
use tss_esapi::handles::{NvIndexHandle, NvIndexTpmHandle, ObjectHandle, TpmHandle};
use tss_esapi::interface_types::algorithm::HashingAlgorithm;
use tss_esapi::interface_types::resource_handles::{NvAuth, Provision};
use tss_esapi::interface_types::session_handles::AuthSession;
use tss_esapi::structures::{CapabilityData, NvPublicBuilder};
use tss_esapi::Context;

use super::error::{map, Op};
use crate::{Counter, DeviceError, Result};

/// The counter at `index`, incremented first if `increment` (or if this call defines it: a
/// counter can't be read before its first increment).
///
/// # Errors
/// [`DeviceError::Config`] for an index outside the NV range, device errors otherwise.
pub(super) fn counter(ctx: &mut Context, index: u32, increment: bool) -> Result<Counter> {
    let tpm_handle = NvIndexTpmHandle::new(index)
        .map_err(|e| DeviceError::Config(format!("NV index 0x{index:08x}: {e}")))?;
    let created = !defined(ctx, index)?;
    let mut object = if created {
        define(ctx, tpm_handle)?
    } else {
        ctx.execute_without_session(|c| c.tr_from_tpm_public(TpmHandle::NvIndex(tpm_handle)))
            .map_err(|e| map(Op::Nv, e))?
    };
    let nv = NvIndexHandle::from(object);
    let result = (|| {
        if increment || created {
            ctx.execute_with_session(Some(AuthSession::Password), |c| {
                c.nv_increment(NvAuth::Owner, nv)
            })
            .map_err(|e| map(Op::Nv, e))?;
        }
        let data = ctx
            .execute_with_session(Some(AuthSession::Password), |c| {
                c.nv_read(NvAuth::Owner, nv, 8, 0)
            })
            .map_err(|e| map(Op::Nv, e))?;
        let bytes: [u8; 8] = data.value().try_into().map_err(|_| DeviceError::Backend {
            op: Op::Nv.name(),
            detail: format!("a counter read gave {} bytes, not 8", data.value().len()),
        })?;
        Ok(Counter {
            value: u64::from_be_bytes(bytes),
            created,
        })
    })();
    // Only ESAPI's record of the index goes; the index stays in the TPM.
    if let Err(e) = ctx.tr_close(&mut object) {
        tracing::debug!(error = %e, "closing the ESAPI object of an NV index failed");
    }
    result
}

/// Whether an NV index `index` exists.
fn defined(ctx: &mut Context, index: u32) -> Result<bool> {
    let (data, _) = ctx
        .execute_without_session(|c| c.get_capability(CapabilityType::Handles, index, 1))
        .map_err(|e| map(Op::GetCapability, e))?;
    Ok(match data {
        CapabilityData::Handles(list) => list
            .into_inner()
            .first()
            .is_some_and(|h| u32::from(*h) == index),
        _ => false,
    })
}

/// Define the counter: owner read and write (empty owner auth, as for the SRK), no dictionary
/// attack lockout (a counter read is no guess at anything).
fn define(ctx: &mut Context, index: NvIndexTpmHandle) -> Result<ObjectHandle> {
    let attributes = NvIndexAttributesBuilder::new()
        .with_owner_write(true)
        .with_owner_read(true)
        .with_no_da(true)
        .with_nv_index_type(NvIndexType::Counter)
        .build()
        .map_err(|e| map(Op::Nv, e))?;
    let public = NvPublicBuilder::new()
        .with_nv_index(index)
        .with_index_name_algorithm(HashingAlgorithm::Sha256)
        .with_index_attributes(attributes)
        .with_data_area_size(8)
        .build()
        .map_err(|e| map(Op::Nv, e))?;
    let handle = ctx
        .execute_with_session(Some(AuthSession::Password), |c| {
            c.nv_define_space(Provision::Owner, None, public)
        })
        .map_err(|e| map(Op::Nv, e))?;
    tracing::info!(
        index = format!("0x{:08x}", u32::from(index)),
        "TPM NV counter defined"
    );
    Ok(handle.into())
}
