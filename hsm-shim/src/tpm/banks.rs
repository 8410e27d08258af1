//! Which PCR banks a TPM has allocated, and which PCRs in each: for `keywardd --doctor`, which
//! says whether the bank Keyward's policies use (sha256) is there with the configured PCRs.
//! A TPM can ship with only its sha1 bank allocated; a policy on sha256 PCRs then never
//! matches anything a boot measured. Reads one capability; changes nothing.

use tss_esapi::constants::CapabilityType;
use tss_esapi::structures::CapabilityData;

use super::error::{map, Op};
use super::TpmDevice;
use crate::{DeviceError, Result};

/// One allocated PCR bank.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PcrBank {
    /// The bank's hash (`sha1`, `sha256`, ...).
    pub hash: String,
    /// The PCRs allocated in it.
    pub pcrs: Vec<u8>,
}

impl TpmDevice {
    /// The PCR banks the TPM has allocated (`TPM2_GetCapability(TPM_CAP_PCRS)`).
    ///
    /// # Errors
    /// The TPM did not answer, or answered with another capability.
    pub fn pcr_banks(&mut self) -> Result<Vec<PcrBank>> {
        let (data, _) = self
            .ctx
            .execute_without_session(|c| c.get_capability(CapabilityType::AssignedPcr, 0, 16))
            .map_err(|e| map(Op::GetCapability, e))?;
        let CapabilityData::AssignedPcr(list) = data else {
            return Err(DeviceError::Backend {
                op: Op::GetCapability.name(),
                detail: "the TPM answered with another capability".into(),
            });
        };
        Ok(list
            .get_selections()
            .iter()
            .filter(|s| !s.is_empty())
            .map(|s| PcrBank {
                hash: format!("{:?}", s.hashing_algorithm()).to_lowercase(),
                pcrs: s
                    .selected()
                    .into_iter()
                    .filter_map(|slot| u32::from(slot).checked_ilog2())
                    .filter_map(|bit| u8::try_from(bit).ok())
                    .collect(),
            })
            .collect())
    }
}
