//! The daemon's domain error: what the vault, the store, the devices and the audit log can fail
//! with, by cause, and the one mapping from it to the wire error ([`ApiError`]).
//!
//! The vault decides on these errors (the unseal retry asks [`Error::is_retryable`]); only the
//! service turns one into an [`ApiError`], through `From`, at the edge. The top-level enum says
//! what went wrong for the caller; a variant's typed cause ([`CallError`] and its
//! [`hsm_shim::DeviceError`], [`StoreError`], [`CryptoError`], [`AuditError`]) says why, for the
//! admin and the logs.
//!
//! Must not: carry secret material (a value, a PIN, a share, a key) in any variant, or in the
//! text of one; name Varlink protocol errors (those belong to the transport).

use std::fmt;

use keyward_proto::api::ApiError;

use crate::audit::{no_space, AuditError};
use crate::device::CallError;
use crate::store::StoreError;
use crate::vault::crypto::CryptoError;

/// A request parameter the vault found wrong, by its wire name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Param {
    /// A secret's or key's name.
    Name,
    /// A secret's value.
    Value,
    /// A device name.
    Device,
    /// A key algorithm.
    Algorithm,
    /// The data to sign.
    Data,
    /// The hash a signature is made over.
    Hash,
    /// The list of keyslots for `Init`.
    Slots,
    /// One keyslot's spec.
    Slot,
    /// A keyslot's kind.
    Kind,
    /// A PIN.
    Pin,
    /// One recovery share (`Unseal`).
    RecoveryShare,
    /// Recovery shares (`ConfirmRecovery`).
    RecoveryShares,
    /// A transit ciphertext (`Decrypt`).
    Ciphertext,
    /// The combination of parameters.
    Parameters,
    /// An attestation nonce.
    Nonce,
}

impl Param {
    /// The parameter's name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Name => "name",
            Self::Value => "value",
            Self::Device => "device",
            Self::Algorithm => "algorithm",
            Self::Data => "data",
            Self::Hash => "hash",
            Self::Slots => "slots",
            Self::Slot => "slot",
            Self::Kind => "kind",
            Self::Pin => "pin",
            Self::RecoveryShare => "recovery_share",
            Self::RecoveryShares => "recovery_shares",
            Self::Ciphertext => "ciphertext",
            Self::Parameters => "parameters",
            Self::Nonce => "nonce",
        }
    }
}

impl fmt::Display for Param {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a name names, for `NotFound` and `AlreadyExists`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Thing {
    /// A secret (or one version of it, `name@version`).
    Secret,
    /// A signing key.
    Key,
    /// A keyslot, by id.
    Keyslot,
    /// An object on a device.
    DeviceObject,
    /// A transit key (or one version of it, `name@version`).
    TransitKey,
}

impl Thing {
    /// The kind's name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Secret => "secret",
            Self::Key => "key",
            Self::Keyslot => "keyslot",
            Self::DeviceObject => "device object",
            Self::TransitKey => "transit key",
        }
    }
}

impl fmt::Display for Thing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failure of the vault or of what it stands on.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No vault yet.
    #[error("the vault is not initialised: run `keyward init`")]
    NotInitialized,
    /// `Init` of a vault that exists.
    #[error("the vault is already initialised")]
    AlreadyInitialized,
    /// The VMK is not in memory; `reason` says why (never anything secret).
    #[error("the vault is sealed ({reason})")]
    Sealed { reason: String },
    /// `name` names no `what`.
    #[error("{what} {name:?} not found")]
    NotFound { what: Thing, name: String },
    /// `name` is taken.
    #[error("{what} {name:?} already exists")]
    AlreadyExists { what: Thing, name: String },
    /// A parameter is malformed or makes no sense here; `reason` says what is wrong without
    /// quoting a secret parameter.
    #[error("invalid {parameter}: {reason}")]
    InvalidArgument { parameter: Param, reason: String },
    /// A device name that is not configured.
    #[error("invalid device: no device {name:?} is configured (configured: {})", .configured.join(", "))]
    UnknownDevice {
        name: String,
        configured: Vec<String>,
    },
    /// A parameter is longer than the vault takes.
    #[error("{parameter} is larger than {limit} bytes")]
    TooLarge { parameter: Param, limit: u64 },
    /// Removing keyslot `id` would leave no confirmed way into the vault.
    #[error("keyslot {id} is the last way into the vault")]
    LastKeyslot { id: u32 },
    /// Keyslots can't change while a rekey waits for its new shares (until `until`).
    #[error("a rekey waits for its new recovery shares until {until}")]
    RekeyPending { until: String },
    /// Another `CreateKey` or `DeleteKey` of the key `name` is running.
    #[error("key {name:?} is busy with another operation")]
    KeyInUse { name: String },
    /// The device `device` did not do what was asked.
    #[error("{}", device_message(.device, .cause))]
    Device {
        device: String,
        #[source]
        cause: CallError,
    },
    /// The database failed.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// The audit log can't be written: what can't be audited isn't done.
    #[error("audit log: {0}")]
    Audit(#[from] AuditError),
    /// Data the vault itself stored failed to decrypt: corruption or tampering.
    #[error("stored data failed its integrity check")]
    Decrypt(#[source] CryptoError),
    /// Encrypting (or re-sealing the keyring, or rotating it) failed.
    #[error("cannot encrypt: {0}")]
    Encrypt(#[source] CryptoError),
    /// Data the vault stored (a sealed blob, a handle, slot data) does not decode.
    #[error("stored {what} does not decode")]
    Corrupt { what: String },
    /// A device or recovery slot opened the vault with a key that is not its VMK.
    #[error("{by} released a key that does not open this vault")]
    WrongKey { by: String },
    /// A new keyslot failed its test unseal: it is not stored.
    #[error("{reason}")]
    SelfTest { reason: String },
    /// A state the vault's own logic rules out.
    #[error("{reason}")]
    Internal { reason: String },
}

/// Short name of a device failure, e.g. `device "tpm" unavailable: not open`.
fn device_message(device: &str, cause: &CallError) -> String {
    match cause {
        CallError::Unavailable { reason, .. } => format!("device {device:?} unavailable: {reason}"),
        CallError::Busy { .. } => format!("device {device:?} is busy: its queue is full"),
        CallError::Device(d) => format!("device {device:?}: {d}"),
    }
}

/// Shorthand for an [`Error::InvalidArgument`].
pub fn invalid(parameter: Param, reason: impl Into<String>) -> Error {
    Error::InvalidArgument {
        parameter,
        reason: reason.into(),
    }
}

/// Shorthand for an [`Error::Corrupt`].
pub fn corrupt(what: impl Into<String>) -> Error {
    Error::Corrupt { what: what.into() }
}

impl Error {
    /// A device call's failure on `device`.
    pub fn device(device: &str, cause: CallError) -> Self {
        Self::Device {
            device: device.to_owned(),
            cause,
        }
    }

    /// Whether the failure was only that a device was not there to ask (absent, not open,
    /// stopped answering, busy): worth another try once the device is back. A wrong PIN,
    /// a changed PCR policy, anything of the store or the vault's own data is not.
    pub fn is_retryable(&self) -> bool {
        use hsm_shim::DeviceError as D;
        match self {
            Self::Device { cause, .. } => match cause {
                CallError::Busy { .. } | CallError::Unavailable { .. } => true,
                CallError::Device(d) => matches!(
                    d,
                    D::Busy
                        | D::DeviceGone(_)
                        | D::Config(_)
                        | D::InvalidBlob(_)
                        | D::Backend { .. }
                ),
            },
            _ => false,
        }
    }

    /// Whether the state directory's file system is full (the admin's to fix, not a bug).
    pub fn is_storage_full(&self) -> bool {
        match self {
            Self::Store(StoreError::DiskFull) => true,
            Self::Store(StoreError::Io { source, .. }) => no_space(source),
            Self::Audit(e) => e.storage_full(),
            _ => false,
        }
    }
}

/// The wire error of a device failure on `device`.
fn device_to_api(device: String, cause: CallError) -> ApiError {
    use hsm_shim::DeviceError as D;
    match cause {
        CallError::Busy { .. } => ApiError::Busy,
        CallError::Unavailable { reason, .. } => ApiError::DeviceUnavailable { device, reason },
        CallError::Device(d) => match d {
            D::PinIncorrect { retries_left } => ApiError::PinIncorrect { retries_left },
            D::PinLocked => ApiError::PinLocked { device },
            D::PolicyMismatch | D::PolicyUnsigned(_) => ApiError::PolicyMismatch { device },
            D::NotFound(what) => ApiError::NotFound {
                kind: Thing::DeviceObject.as_str().into(),
                name: what,
            },
            D::Unsupported(what) => ApiError::InvalidArgument {
                parameter: Param::Algorithm.as_str().into(),
                reason: format!("device {device:?} cannot do this: {what}"),
            },
            D::InvalidArgument(reason) => ApiError::InvalidArgument {
                parameter: Param::Data.as_str().into(),
                reason,
            },
            D::Busy => ApiError::Busy,
            other @ (D::DeviceGone(_) | D::Config(_) | D::InvalidBlob(_) | D::Backend { .. }) => {
                ApiError::DeviceUnavailable {
                    device,
                    reason: other.to_string(),
                }
            }
        },
    }
}

/// The one mapping to the wire. Details that help an admin (which device, which code) go into
/// the wire error; a server-side fault is logged here, once, in full.
impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        if e.is_storage_full() {
            tracing::error!(error = %e, "the state directory's file system is full");
            let what = match &e {
                Error::Audit(AuditError::PublicKey { path, .. }) => path
                    .file_name()
                    .map_or_else(|| "audit log".into(), |n| n.to_string_lossy().into_owned()),
                Error::Audit(_) => "audit log".to_owned(),
                _ => "database".to_owned(),
            };
            return ApiError::StorageFull { what };
        }
        match e {
            Error::NotInitialized => ApiError::NotInitialized,
            Error::AlreadyInitialized => ApiError::AlreadyInitialized,
            Error::Sealed { reason } => ApiError::Sealed { reason },
            Error::NotFound { what, name } => ApiError::NotFound {
                kind: what.as_str().into(),
                name,
            },
            Error::AlreadyExists { what, name } => ApiError::AlreadyExists {
                kind: what.as_str().into(),
                name,
            },
            Error::InvalidArgument { parameter, reason } => ApiError::InvalidArgument {
                parameter: parameter.as_str().into(),
                reason,
            },
            Error::UnknownDevice { name, configured } => ApiError::InvalidArgument {
                parameter: Param::Device.as_str().into(),
                reason: format!(
                    "no device {name:?} is configured (configured: {})",
                    configured.join(", ")
                ),
            },
            Error::TooLarge { parameter, limit } => ApiError::TooLarge {
                parameter: parameter.as_str().into(),
                limit,
            },
            Error::LastKeyslot { id } => ApiError::LastKeyslot { id },
            Error::RekeyPending { until } => ApiError::RekeyPending { until },
            Error::KeyInUse { .. } => ApiError::Busy,
            Error::Device { device, cause } => device_to_api(device, cause),
            Error::Audit(e) => ApiError::AuditUnavailable {
                reason: e.to_string(),
            },
            Error::Store(e) => {
                tracing::error!(error = %e, "store failure");
                ApiError::Internal {
                    reason: format!("store: {e}"),
                }
            }
            e @ Error::Decrypt(_) => {
                tracing::error!(error = %e, "stored ciphertext failed to decrypt");
                ApiError::Internal {
                    reason: e.to_string(),
                }
            }
            e @ (Error::Encrypt(_)
            | Error::Corrupt { .. }
            | Error::WrongKey { .. }
            | Error::SelfTest { .. }
            | Error::Internal { .. }) => {
                tracing::error!(error = %e, "internal failure");
                ApiError::Internal {
                    reason: e.to_string(),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
