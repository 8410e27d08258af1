//! The one place where device, store and crypto failures become API errors. Details that help
//! an admin (which device, which code) go into the error; nothing secret ever does.

use keyward_proto::api::ApiError;

use crate::device::CallError;
use crate::store::StoreError;

use super::crypto::CryptoError;

/// A device call's failure, for device `device`.
pub fn device_error(device: &str, e: CallError) -> ApiError {
    use hsm_shim::DeviceError as D;
    let device = device.to_owned();
    match e {
        CallError::Busy { .. } => ApiError::Busy,
        CallError::Unavailable { reason, .. } => ApiError::DeviceUnavailable { device, reason },
        CallError::Device(d) => match d {
            D::PinIncorrect { retries_left } => ApiError::PinIncorrect { retries_left },
            D::PinLocked => ApiError::PinLocked { device },
            D::PolicyMismatch => ApiError::PolicyMismatch { device },
            D::NotFound(what) => ApiError::NotFound {
                kind: "device object".into(),
                name: what,
            },
            D::Unsupported(what) => ApiError::InvalidArgument {
                parameter: "algorithm".into(),
                reason: format!("device {device:?} cannot do this: {what}"),
            },
            D::InvalidArgument(reason) => ApiError::InvalidArgument {
                parameter: "data".into(),
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

/// A store failure. The disk being full is said plainly, as its own error: it is the admin's
/// to fix, not a bug.
pub fn store_error(e: StoreError) -> ApiError {
    tracing::error!(error = %e, "store failure");
    match e {
        StoreError::DiskFull => storage_full(),
        StoreError::Io { source, .. } if crate::audit::no_space(&source) => storage_full(),
        other => ApiError::Internal {
            reason: format!("store: {other}"),
        },
    }
}

fn storage_full() -> ApiError {
    ApiError::StorageFull {
        what: "database".into(),
    }
}

/// A crypto failure on data the vault itself stored: corruption or tampering.
pub(super) fn crypto_error(e: CryptoError) -> ApiError {
    tracing::error!(error = %e, "stored ciphertext failed to decrypt");
    ApiError::Internal {
        reason: "stored data failed its integrity check".into(),
    }
}
