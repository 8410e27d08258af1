//! The one place where PKCS#11 return codes become [`DeviceError`]s.
//!
//! cryptoki's `Display` for a return code is a paragraph of the specification; the detail we keep
//! is the function and the `CKR_*` name (`Debug`), which is what an admin can search for.

use cryptoki::error::{Error as CkError, RvError};

use crate::DeviceError;

/// Map a cryptoki error from operation `op` (a `C_*` function name).
pub fn map_error(op: &'static str, e: CkError) -> DeviceError {
    let mapped = match &e {
        CkError::Pkcs11(rv, _) => match rv {
            RvError::PinIncorrect => DeviceError::PinIncorrect { retries_left: None },
            RvError::PinLocked => DeviceError::PinLocked,
            RvError::UserNotLoggedIn => DeviceError::Config(format!(
                "{op}: the token needs a login and no PIN was configured"
            )),
            RvError::DeviceRemoved
            | RvError::TokenNotPresent
            | RvError::TokenNotRecognized
            | RvError::DeviceError
            | RvError::SessionClosed
            | RvError::SessionHandleInvalid
            | RvError::SlotIdInvalid
            | RvError::CryptokiNotInitialized => DeviceError::DeviceGone(format!("{op}: {rv:?}")),
            RvError::SessionCount | RvError::SessionParallelNotSupported => DeviceError::Busy,
            RvError::MechanismInvalid
            | RvError::MechanismParamInvalid
            | RvError::KeyTypeInconsistent
            | RvError::CurveNotSupported
            | RvError::FunctionNotSupported => DeviceError::Unsupported(format!("{op}: {rv:?}")),
            RvError::ObjectHandleInvalid | RvError::KeyHandleInvalid => {
                DeviceError::NotFound(format!("{op}: {rv:?}"))
            }
            // SoftHSM answers a bad GCM tag with CKR_GENERAL_ERROR rather than
            // CKR_ENCRYPTED_DATA_INVALID; on decryption both mean the blob was not ours.
            RvError::GeneralError if op == "C_Decrypt" => {
                DeviceError::InvalidBlob(format!("{op}: the token rejected the ciphertext"))
            }
            RvError::EncryptedDataInvalid | RvError::EncryptedDataLenRange => {
                DeviceError::InvalidBlob(format!("{op}: the token rejected the ciphertext"))
            }
            RvError::DataLenRange | RvError::DataInvalid => {
                DeviceError::InvalidArgument(format!("{op}: {rv:?}"))
            }
            _ => DeviceError::Backend {
                op,
                detail: format!("{rv:?}"),
            },
        },
        CkError::LibraryLoading(l) => DeviceError::Config(format!("{op}: {l}")),
        other => DeviceError::Backend {
            op,
            detail: format!("{other:?}"),
        },
    };
    tracing::debug!(op, error = ?e, mapped = mapped.reason(), "PKCS#11 call failed");
    mapped
}
