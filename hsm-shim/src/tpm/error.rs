//! The one place where tss-esapi errors and TPM response codes become [`DeviceError`]s.
//!
//! A TSS2 return code is 32 bits: the layer that produced it in bits 16–23 (0 = the TPM itself,
//! 7 = ESAPI, 8 = SAPI, 9 = marshalling, 10 = TCTI, 12 = TPM code relayed by a resource manager)
//! and the code in the low 16 bits. The daemon acts on the variant, so the mapping decides what a
//! caller does next: re-ask for the PIN, reopen the device, report a changed PCR. The raw code is
//! kept in `Backend` details and logged at debug; nothing secret is ever logged here.

use tss_esapi::constants::response_code::{Tss2ResponseCode, Tss2ResponseCodeKind as Kind};
use tss_esapi::constants::{CapabilityType, PropertyTag};
use tss_esapi::structures::CapabilityData;
use tss_esapi::{Context, Error as TssError};

use crate::DeviceError;

/// The operation that failed. Some codes mean different things per operation: an integrity
/// error on `Load` is a tampered or foreign blob, an auth failure on `Unseal` is a wrong PIN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Op {
    /// Connecting (TCTI and ESAPI initialisation).
    Open,
    /// Re-creating the storage root key.
    CreatePrimary,
    /// Starting an HMAC, policy or trial session.
    StartSession,
    /// Setting session attributes or an object's auth value in ESAPI.
    SessionSetup,
    /// A policy command (PolicyPCR, PolicyAuthValue, PolicyGetDigest).
    Policy,
    /// Creating a sealed object or a key under the SRK.
    Create,
    /// Loading stored public/private blobs under the SRK.
    Load,
    /// Reading a loaded object's public area.
    ReadPublic,
    /// Unsealing a sealed-data object.
    Unseal,
    /// Signing a digest.
    Sign,
    /// Reading TPM properties.
    GetCapability,
    /// The liveness probe (reading the SRK's public area).
    Ping,
    /// Parsing stored blobs on the host (no TPM involved).
    Unmarshal,
    /// Defining, incrementing or reading an NV counter.
    Nv,
    /// Re-creating the attestation key under the endorsement hierarchy.
    AttestationKey,
    /// Certifying a key with the attestation key.
    Certify,
}

impl Op {
    /// The ESAPI call (or host step) for `Backend { op }` and logs.
    pub(super) fn name(self) -> &'static str {
        match self {
            Self::Open => "Esys_Initialize",
            Self::CreatePrimary => "Esys_CreatePrimary",
            Self::StartSession => "Esys_StartAuthSession",
            Self::SessionSetup => "Esys_TRSess_SetAttributes",
            Self::Policy => "Esys_Policy*",
            Self::Create => "Esys_Create",
            Self::Load => "Esys_Load",
            Self::ReadPublic => "Esys_ReadPublic",
            Self::Unseal => "Esys_Unseal",
            Self::Sign => "Esys_Sign",
            Self::GetCapability => "Esys_GetCapability",
            Self::Ping => "Esys_ReadPublic(SRK)",
            Self::Unmarshal => "unmarshal stored blob",
            Self::Nv => "Esys_NV_*",
            Self::AttestationKey => "Esys_CreatePrimary(AK)",
            Self::Certify => "Esys_Certify",
        }
    }
}

const LAYER_TPM: u32 = 0;
const LAYER_ESAPI: u32 = 7;
const LAYER_SAPI: u32 = 8;
const LAYER_MU: u32 = 9;
const LAYER_TCTI: u32 = 10;
const LAYER_RESMGR: u32 = 11;
const LAYER_RESMGR_TPM: u32 = 12;

// TSS2 "base" codes shared by the software layers (tss2_common.h).
const BASE_BAD_SEQUENCE: u32 = 7;
const BASE_NO_CONNECTION: u32 = 8;
const BASE_TRY_AGAIN: u32 = 9;
const BASE_IO_ERROR: u32 = 10;

/// Map a tss-esapi error from `op` to what the caller should do about it.
///
/// `PinIncorrect` comes back with `retries_left: None`; [`retries_left`] fills it in where the
/// TPM can still be asked.
pub(super) fn map(op: Op, err: TssError) -> DeviceError {
    let mapped = match err {
        TssError::WrapperError(kind) => match op {
            // A stored blob that doesn't fit the TSS structures (too long, bad enum values).
            Op::Load | Op::Unmarshal => DeviceError::InvalidBlob(format!("{kind}")),
            _ => DeviceError::Backend {
                op: op.name(),
                detail: format!("tss-esapi: {kind:?}"),
            },
        },
        TssError::Tss2Error(code) => match raw_rc(code) {
            Some(rc) => map_rc(op, rc),
            None => DeviceError::Backend {
                op: op.name(),
                detail: format!("{code:?}"),
            },
        },
    };
    tracing::debug!(op = op.name(), error = %err, mapped = mapped.reason(), "TPM call failed");
    mapped
}

/// The classification itself, on the raw 32-bit code (kept separate so the table is testable).
fn map_rc(op: Op, rc: u32) -> DeviceError {
    let layer = (rc >> 16) & 0xff;
    let base = rc & 0xffff;
    let backend = |what: &str| DeviceError::Backend {
        op: op.name(),
        detail: format!("{what} 0x{rc:08x}"),
    };
    match layer {
        LAYER_TPM | LAYER_RESMGR_TPM => map_tpm_rc(op, base, rc),
        LAYER_TCTI => match base {
            BASE_TRY_AGAIN => DeviceError::Busy,
            _ => DeviceError::DeviceGone(format!(
                "{}: the TPM connection failed (TCTI code 0x{rc:08x}{})",
                op.name(),
                if base == BASE_IO_ERROR {
                    ", I/O error"
                } else {
                    ""
                }
            )),
        },
        LAYER_ESAPI | LAYER_SAPI | LAYER_RESMGR
            if base == BASE_IO_ERROR || base == BASE_NO_CONNECTION =>
        {
            DeviceError::DeviceGone(format!("{}: TPM connection lost (0x{rc:08x})", op.name()))
        }
        // After a transport error inside a command, tpm2-tss 3.2 leaves the ESAPI context mid
        // command and refuses every later call with BAD_SEQUENCE. We never use the async API,
        // so this only follows a lost TPM; the context is dead and must be reopened.
        LAYER_ESAPI if base == BASE_BAD_SEQUENCE => DeviceError::DeviceGone(format!(
            "{}: the TPM connection failed earlier; reopen the device (0x{rc:08x})",
            op.name()
        )),
        LAYER_MU if matches!(op, Op::Load | Op::Unmarshal) => {
            DeviceError::InvalidBlob(format!("stored TPM structure does not parse (0x{rc:08x})"))
        }
        LAYER_ESAPI => backend("ESAPI"),
        LAYER_SAPI => backend("SAPI"),
        LAYER_MU => backend("marshalling"),
        LAYER_RESMGR => backend("resource manager"),
        _ => backend("TSS"),
    }
}

/// A code from the TPM itself (`tpm_rc` is the TPM_RC in the low 16 bits, `rc` the full code).
fn map_tpm_rc(op: Op, tpm_rc: u32, rc: u32) -> DeviceError {
    let kind = Tss2ResponseCode::from(tpm_rc).kind();
    match kind {
        // PolicyPCR in a real session digests the *current* PCRs; a changed PCR makes the
        // session digest differ from the object's authPolicy: TPM_RC_POLICY_FAIL at Unseal.
        Some(Kind::PolicyFail | Kind::PcrChanged | Kind::Pcr) => DeviceError::PolicyMismatch,
        Some(Kind::AuthFail | Kind::BadAuth) => match op {
            Op::CreatePrimary => DeviceError::Config(
                "the TPM's owner hierarchy has an authorization value; Keyward needs an empty \
                 owner auth to re-create its storage root key"
                    .into(),
            ),
            Op::AttestationKey => DeviceError::Unsupported(
                "the TPM's endorsement hierarchy has an authorization value; Keyward needs an \
                 empty endorsement auth to re-create its attestation key"
                    .into(),
            ),
            Op::Unseal => DeviceError::PinIncorrect { retries_left: None },
            _ => tpm_backend(op, rc, kind),
        },
        Some(Kind::Lockout) => DeviceError::PinLocked,
        // A handle we hold (the SRK, a cached key, a session) that the TPM no longer knows: it
        // was reset under us (an swtpm restart; a resume that lost the resource manager's
        // contexts). Reopening re-creates the SRK, so tell the caller to do just that.
        Some(
            Kind::ReferenceH0
            | Kind::ReferenceH1
            | Kind::ReferenceH2
            | Kind::ReferenceH3
            | Kind::ReferenceH4
            | Kind::ReferenceH5
            | Kind::ReferenceH6
            | Kind::ReferenceS0
            | Kind::ReferenceS1
            | Kind::ReferenceS2
            | Kind::ReferenceS3
            | Kind::ReferenceS4
            | Kind::ReferenceS5
            | Kind::ReferenceS6,
        ) => DeviceError::DeviceGone(format!(
            "{}: the TPM no longer holds the objects this connection loaded (was it reset?); \
             reopen the device (0x{rc:08x})",
            op.name()
        )),
        Some(Kind::Retry | Kind::Yielded | Kind::Testing | Kind::NvRate | Kind::Canceled) => {
            DeviceError::Busy
        }
        Some(
            Kind::Integrity
            | Kind::Size
            | Kind::Value
            | Kind::Key
            | Kind::KeySize
            | Kind::Type
            | Kind::Attributes
            | Kind::Hash
            | Kind::Scheme
            | Kind::Symmetric
            | Kind::Asymmetric
            | Kind::Kdf
            | Kind::Curve
            | Kind::EccPoint
            | Kind::Selector
            | Kind::ReservedBits
            | Kind::Tag
            | Kind::Insufficient
            | Kind::Binding
            | Kind::Sensitive
            | Kind::Policy,
        ) if op == Op::Load => DeviceError::InvalidBlob(format!(
            "the TPM rejected the stored object ({} 0x{rc:08x}): tampered, corrupted, or made by \
             another TPM",
            kind.map_or_else(String::new, |k| format!("{k:?}"))
        )),
        _ => tpm_backend(op, rc, kind),
    }
}

fn tpm_backend(op: Op, rc: u32, kind: Option<Kind>) -> DeviceError {
    let name = kind.map_or_else(|| "unknown".to_owned(), |k| format!("{k:?}"));
    DeviceError::Backend {
        op: op.name(),
        detail: format!("TPM_RC 0x{rc:08x} ({name})"),
    }
}

/// The raw 32-bit code inside a `Tss2ResponseCode`.
///
/// tss-esapi 7.7 keeps the value private and exposes it only through `Display`
/// (`"Response code value: 0x99d"`) of the format-zero/format-one wrappers; the version is pinned
/// (`=7.7.0`), and a unit test catches a change of that text.
fn raw_rc(code: Tss2ResponseCode) -> Option<u32> {
    let text = match code {
        Tss2ResponseCode::Success => return Some(0),
        Tss2ResponseCode::FormatZero(rc) => rc.to_string(),
        Tss2ResponseCode::FormatOne(rc) => rc.to_string(),
    };
    let hex = text.rsplit_once("0x")?.1;
    u32::from_str_radix(hex.trim(), 16).ok()
}

/// Dictionary-attack tries left (`TPM_PT_MAX_AUTH_FAIL − TPM_PT_LOCKOUT_COUNTER`), read fresh
/// (tss-esapi's `get_tpm_property` caches, and these change with every failure). `None` when
/// the TPM can't be asked.
pub(super) fn retries_left(ctx: &mut Context) -> Option<u32> {
    let (data, _) = ctx
        .execute_without_session(|c| {
            c.get_capability(
                CapabilityType::TpmProperties,
                PropertyTag::LockoutCounter.into(),
                2,
            )
        })
        .ok()?;
    let CapabilityData::TpmProperties(props) = data else {
        return None;
    };
    let counter = props.find(PropertyTag::LockoutCounter)?.value();
    let max = props.find(PropertyTag::MaxAuthFail)?.value();
    Some(max.saturating_sub(counter))
}

/// Fill `retries_left` into a `PinIncorrect`; other errors pass through.
pub(super) fn with_retries(ctx: &mut Context, e: DeviceError) -> DeviceError {
    match e {
        DeviceError::PinIncorrect { retries_left: None } => DeviceError::PinIncorrect {
            retries_left: retries_left(ctx),
        },
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tss(rc: u32) -> TssError {
        TssError::Tss2Error(Tss2ResponseCode::from(rc))
    }

    #[test]
    fn raw_code_survives_the_display_round_trip() {
        for rc in [0x99d, 0x98e, 0x921, 0xa000a, 0x9000b, 0x1df, 0x0000_0101] {
            assert_eq!(raw_rc(Tss2ResponseCode::from(rc)), Some(rc), "{rc:#x}");
        }
    }

    #[test]
    fn table() {
        assert!(matches!(
            map(Op::Unseal, tss(0x99d)),
            DeviceError::PolicyMismatch
        ));
        assert!(matches!(
            map(Op::Policy, tss(0x128)),
            DeviceError::PolicyMismatch
        ));
        assert!(matches!(
            map(Op::Unseal, tss(0x98e)),
            DeviceError::PinIncorrect { retries_left: None }
        ));
        assert!(matches!(
            map(Op::Unseal, tss(0x9a2)),
            DeviceError::PinIncorrect { .. }
        ));
        assert!(matches!(
            map(Op::Sign, tss(0x98e)),
            DeviceError::Backend { .. }
        ));
        assert!(matches!(
            map(Op::CreatePrimary, tss(0x9a2)),
            DeviceError::Config(_)
        ));
        assert!(matches!(
            map(Op::Unseal, tss(0x921)),
            DeviceError::PinLocked
        ));
        assert!(matches!(
            map(Op::Load, tss(0x19f)),
            DeviceError::InvalidBlob(_)
        ));
        assert!(matches!(
            map(Op::Load, tss(0x1d5)),
            DeviceError::InvalidBlob(_)
        ));
        assert!(matches!(
            map(Op::Load, tss(0x9000b)),
            DeviceError::InvalidBlob(_)
        ));
        assert!(matches!(
            map(Op::Unseal, tss(0x19f)),
            DeviceError::Backend { .. }
        ));
        assert!(matches!(
            map(Op::Ping, tss(0xa000a)),
            DeviceError::DeviceGone(_)
        ));
        assert!(matches!(
            map(Op::Open, tss(0xa0008)),
            DeviceError::DeviceGone(_)
        ));
        assert!(matches!(
            map(Op::Sign, tss(0x7000a)),
            DeviceError::DeviceGone(_)
        ));
        assert!(matches!(
            map(Op::Sign, tss(0x70007)),
            DeviceError::DeviceGone(_)
        ));
        assert!(matches!(map(Op::Sign, tss(0xa0009)), DeviceError::Busy));
        assert!(matches!(
            map(Op::Ping, tss(0x910)),
            DeviceError::DeviceGone(_)
        ));
        assert!(matches!(
            map(Op::Load, tss(0x918)),
            DeviceError::DeviceGone(_)
        ));
        for busy in [0x922, 0x908, 0x90a, 0x920] {
            assert!(
                matches!(map(Op::Sign, tss(busy)), DeviceError::Busy),
                "{busy:#x}"
            );
        }
        assert!(matches!(
            map(Op::Unseal, tss(0xc099d)),
            DeviceError::PolicyMismatch
        ));
        match map(Op::Create, tss(0x2c3)) {
            DeviceError::Backend { op, detail } => {
                assert_eq!(op, "Esys_Create");
                assert!(detail.contains("0x000002c3"), "{detail}");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            map(
                Op::Unmarshal,
                TssError::WrapperError(tss_esapi::WrapperErrorKind::WrongParamSize)
            ),
            DeviceError::InvalidBlob(_)
        ));
    }
}
