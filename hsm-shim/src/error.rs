//! [`DeviceError`]: the device failures the daemon acts on, each backend mapping its own codes
//! into these in one place (`pkcs11/error.rs`, `tpm/error.rs`).
//!
//! Messages never contain secret material: no PIN, no key bytes, no plaintext.

use thiserror::Error;

/// A device failure, by what the caller should do about it.
#[derive(Debug, Error)]
pub enum DeviceError {
    /// The PIN was wrong. Do not retry it: every try burns a token retry or a TPM lockout count.
    #[error("PIN incorrect{}", retries_hint(*.retries_left))]
    PinIncorrect {
        /// Tries left before the PIN locks, when the device says.
        retries_left: Option<u32>,
    },
    /// The PIN is locked (token) or the TPM is in dictionary-attack lockout.
    #[error("PIN locked: the device refuses further tries")]
    PinLocked,
    /// The device's policy is not met: for a TPM, the PCR values differ from those sealed to.
    #[error("device policy not satisfied: the PCR values changed since the secret was sealed")]
    PolicyMismatch,
    /// A signed PCR policy is part of the seal and none applies now: no signature file, no
    /// signed entry for the current PCR values, or signatures by another key. On the wire
    /// this is `PolicyMismatch` too; the text says which.
    #[error("no signed PCR policy applies: {0}")]
    PolicyUnsigned(String),
    /// An object the caller named is not on the device.
    #[error("not found on the device: {0}")]
    NotFound(String),
    /// The device cannot do what was asked (an algorithm, a mechanism, a policy).
    #[error("not supported by this device: {0}")]
    Unsupported(String),
    /// The device is absent or stopped answering; reopen it.
    #[error("device unavailable: {0}")]
    DeviceGone(String),
    /// The device is busy with another client; try again later.
    #[error("device busy")]
    Busy,
    /// A sealed blob or key handle was tampered with, corrupted, made by another device, or given
    /// with another context than it was sealed with.
    #[error("sealed data rejected: {0}")]
    InvalidBlob(String),
    /// The caller passed something malformed (a digest of the wrong length, an oversized secret).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The device configuration is wrong (a bad URI or TCTI, no such token, no such module).
    #[error("device configuration: {0}")]
    Config(String),
    /// Any other failure the device reported. `detail` names the operation and the device's
    /// own code (e.g. `C_Sign: CKR_DEVICE_ERROR`, `Esys_Unseal: 0x0000098e`).
    #[error("device error in {op}: {detail}")]
    Backend {
        /// The operation that failed.
        op: &'static str,
        /// The device's code, in its own words.
        detail: String,
    },
}

fn retries_hint(retries: Option<u32>) -> String {
    match retries {
        Some(n) => format!(" ({n} tries left before lockout)"),
        None => String::new(),
    }
}

impl DeviceError {
    /// A stable short name for the variant, for wire error names and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::PinIncorrect { .. } => "PinIncorrect",
            Self::PinLocked => "PinLocked",
            Self::PolicyMismatch | Self::PolicyUnsigned(_) => "PolicyMismatch",
            Self::NotFound(_) => "NotFound",
            Self::Unsupported(_) => "Unsupported",
            Self::DeviceGone(_) => "DeviceUnavailable",
            Self::Busy => "DeviceBusy",
            Self::InvalidBlob(_) => "InvalidBlob",
            Self::InvalidArgument(_) => "InvalidArgument",
            Self::Config(_) => "DeviceConfig",
            Self::Backend { .. } => "DeviceError",
        }
    }
}
