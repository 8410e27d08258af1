use std::io;
use std::path::PathBuf;

use hsm_shim::DeviceError as D;
use keyward_proto::api::ApiError;
use keyward_proto::recovery_share;
use serde_json::json;

use super::*;
use crate::vault::crypto::{CryptoError, Key32};
use crate::vault::recovery;

fn os(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

fn dev(cause: CallError) -> Error {
    Error::device("tpm", cause)
}

/// The wire error's short name and parameters.
fn wire(e: Error) -> (String, serde_json::Value) {
    let api = ApiError::from(e);
    let name = api.name();
    let short = name.rsplit('.').next().unwrap_or_default().to_owned();
    (short, api.parameters())
}

#[test]
fn every_domain_error_maps_to_its_wire_error() {
    let internal = |reason: &str| ("Internal", json!({ "reason": reason }));
    let unavailable = |reason: &str| {
        (
            "DeviceUnavailable",
            json!({ "device": "tpm", "reason": reason }),
        )
    };
    let table: Vec<(Error, (&str, serde_json::Value))> = vec![
        (Error::NotInitialized, ("NotInitialized", json!({}))),
        (Error::AlreadyInitialized, ("AlreadyInitialized", json!({}))),
        (
            Error::Sealed {
                reason: "sealed by root".into(),
            },
            ("Sealed", json!({ "reason": "sealed by root" })),
        ),
        (
            Error::NotFound {
                what: Thing::Secret,
                name: "db@3".into(),
            },
            ("NotFound", json!({ "kind": "secret", "name": "db@3" })),
        ),
        (
            Error::NotFound {
                what: Thing::Keyslot,
                name: "7".into(),
            },
            ("NotFound", json!({ "kind": "keyslot", "name": "7" })),
        ),
        (
            Error::AlreadyExists {
                what: Thing::Key,
                name: "k".into(),
            },
            ("AlreadyExists", json!({ "kind": "key", "name": "k" })),
        ),
        (
            invalid(Param::RecoveryShares, "no share given"),
            (
                "InvalidArgument",
                json!({ "parameter": "recovery_shares", "reason": "no share given" }),
            ),
        ),
        (
            Error::UnknownDevice {
                name: "hsm".into(),
                configured: vec!["a".into(), "b".into()],
            },
            (
                "InvalidArgument",
                json!({ "parameter": "device", "reason": "no device \"hsm\" is configured (configured: a, b)" }),
            ),
        ),
        (
            Error::TooLarge {
                parameter: Param::Value,
                limit: 65536,
            },
            ("TooLarge", json!({ "parameter": "value", "limit": 65536 })),
        ),
        (
            Error::LastKeyslot { id: 2 },
            ("LastKeyslot", json!({ "id": 2 })),
        ),
        (
            Error::RekeyPending {
                until: "2026-01-01T00:00:00Z".into(),
            },
            ("RekeyPending", json!({ "until": "2026-01-01T00:00:00Z" })),
        ),
        (Error::KeyInUse { name: "k".into() }, ("Busy", json!({}))),
        // Devices: the kind of failure decides the wire error.
        (
            dev(CallError::Busy {
                device: "tpm".into(),
            }),
            ("Busy", json!({})),
        ),
        (
            dev(CallError::Unavailable {
                device: "tpm".into(),
                reason: "not open".into(),
            }),
            unavailable("not open"),
        ),
        (
            dev(CallError::Device(D::PinIncorrect {
                retries_left: Some(2),
            })),
            ("PinIncorrect", json!({ "retries_left": 2 })),
        ),
        (
            dev(CallError::Device(D::PinIncorrect { retries_left: None })),
            ("PinIncorrect", json!({})),
        ),
        (
            dev(CallError::Device(D::PinLocked)),
            ("PinLocked", json!({ "device": "tpm" })),
        ),
        (
            dev(CallError::Device(D::PolicyMismatch)),
            ("PolicyMismatch", json!({ "device": "tpm" })),
        ),
        (
            dev(CallError::Device(D::NotFound("label k".into()))),
            (
                "NotFound",
                json!({ "kind": "device object", "name": "label k" }),
            ),
        ),
        (
            dev(CallError::Device(D::Unsupported("ed25519".into()))),
            (
                "InvalidArgument",
                json!({ "parameter": "algorithm", "reason": "device \"tpm\" cannot do this: ed25519" }),
            ),
        ),
        (
            dev(CallError::Device(D::InvalidArgument(
                "digest length".into(),
            ))),
            (
                "InvalidArgument",
                json!({ "parameter": "data", "reason": "digest length" }),
            ),
        ),
        (dev(CallError::Device(D::Busy)), ("Busy", json!({}))),
        (
            dev(CallError::Device(D::DeviceGone("reset".into()))),
            unavailable("device unavailable: reset"),
        ),
        (
            dev(CallError::Device(D::Config("no token".into()))),
            unavailable("device configuration: no token"),
        ),
        (
            dev(CallError::Device(D::InvalidBlob("tag".into()))),
            unavailable("sealed data rejected: tag"),
        ),
        (
            dev(CallError::Device(D::Backend {
                op: "C_Sign",
                detail: "CKR_DEVICE_ERROR".into(),
            })),
            unavailable("device error in C_Sign: CKR_DEVICE_ERROR"),
        ),
        // The store: a full disk is the admin's, everything else a fault.
        (
            Error::Store(StoreError::DiskFull),
            ("StorageFull", json!({ "what": "database" })),
        ),
        (
            Error::Store(StoreError::Io {
                what: "create".into(),
                source: os(nix::libc::ENOSPC),
            }),
            ("StorageFull", json!({ "what": "database" })),
        ),
        (
            Error::Store(StoreError::Busy),
            internal("store: the database is locked by another process"),
        ),
        (
            Error::Store(StoreError::Conflict("x".into())),
            internal("store: constraint violated: x"),
        ),
        (
            Error::Store(StoreError::Corrupt("row".into())),
            internal("store: corrupt database: row"),
        ),
        // The audit log: fail closed, and a full disk said as such.
        (
            Error::Audit(AuditError::Write(os(nix::libc::ENOSPC))),
            ("StorageFull", json!({ "what": "audit log" })),
        ),
        (
            Error::Audit(AuditError::Sync(os(nix::libc::EDQUOT))),
            ("StorageFull", json!({ "what": "audit log" })),
        ),
        (
            Error::Audit(AuditError::Degraded { storage_full: true }),
            ("StorageFull", json!({ "what": "audit log" })),
        ),
        (
            Error::Audit(AuditError::PublicKey {
                path: PathBuf::from("/var/lib/keyward").join(keyward_proto::audit::ANCHOR_FILE),
                source: os(nix::libc::ENOSPC),
            }),
            (
                "StorageFull",
                json!({ "what": keyward_proto::audit::ANCHOR_FILE }),
            ),
        ),
        (
            Error::Audit(AuditError::Degraded {
                storage_full: false,
            }),
            (
                "AuditUnavailable",
                json!({ "reason": AuditError::Degraded { storage_full: false }.to_string() }),
            ),
        ),
        (
            Error::Audit(AuditError::Write(os(nix::libc::EIO))),
            (
                "AuditUnavailable",
                json!({ "reason": AuditError::Write(os(nix::libc::EIO)).to_string() }),
            ),
        ),
        // The vault's own data and logic.
        (
            Error::Decrypt(CryptoError::Integrity),
            internal("stored data failed its integrity check"),
        ),
        (
            Error::Encrypt(CryptoError::TooLong),
            internal("cannot encrypt: too much data to encrypt in one message"),
        ),
        (
            corrupt("sealed blob"),
            internal("stored sealed blob does not decode"),
        ),
        (
            Error::WrongKey {
                by: "keyslot 1 (recovery)".into(),
            },
            internal("keyslot 1 (recovery) released a key that does not open this vault"),
        ),
        (
            Error::SelfTest {
                reason: "recovery self-test opened another key".into(),
            },
            internal("recovery self-test opened another key"),
        ),
        (
            Error::Internal {
                reason: "the vault is open".into(),
            },
            internal("the vault is open"),
        ),
    ];
    for (error, (name, parameters)) in table {
        let shown = format!("{error:?}");
        assert_eq!(wire(error), (name.to_owned(), parameters), "{shown}");
    }
}

#[test]
fn only_a_device_that_was_away_is_worth_retrying() {
    let retry = [
        dev(CallError::Busy {
            device: "tpm".into(),
        }),
        dev(CallError::Unavailable {
            device: "tpm".into(),
            reason: "not open".into(),
        }),
        dev(CallError::Device(D::Busy)),
        dev(CallError::Device(D::DeviceGone("reset".into()))),
        dev(CallError::Device(D::Backend {
            op: "Esys_Unseal",
            detail: "0x0000098e".into(),
        })),
    ];
    for e in retry {
        assert!(e.is_retryable(), "{e:?}");
    }
    let never = [
        // Changed PCRs stay changed; a PIN is never retried.
        dev(CallError::Device(D::PolicyMismatch)),
        dev(CallError::Device(D::PinIncorrect {
            retries_left: Some(1),
        })),
        dev(CallError::Device(D::PinLocked)),
        dev(CallError::Device(D::NotFound("blob".into()))),
        Error::KeyInUse { name: "k".into() },
        Error::Store(StoreError::Busy),
        Error::Decrypt(CryptoError::Integrity),
        Error::WrongKey {
            by: "keyslot 1".into(),
        },
        Error::Sealed { reason: "x".into() },
    ];
    for e in never {
        assert!(!e.is_retryable(), "{e:?}");
    }
}

/// Whether `text` shows `secret`, or any 8-character run of it.
fn shows(text: &str, secret: &str) -> bool {
    let chars: Vec<char> = secret.chars().collect();
    chars
        .windows(8)
        .any(|w| text.contains(&w.iter().collect::<String>()))
}

#[test]
fn no_error_shows_the_secret_it_was_about() {
    let vmk = Key32::random();
    let (_, shares) = recovery::enroll(&vmk, &[9; 16], 2, 3).unwrap();
    let share = shares[0].as_str().to_owned();
    // A typo in the last character, a cut-off share, a share with junk appended.
    let mut typo: Vec<char> = share.chars().collect();
    if let Some(last) = typo.last_mut() {
        *last = if *last == 'A' { 'B' } else { 'A' };
    }
    let typo: String = typo.into_iter().collect();
    let cut = share[..share.len() / 2].to_owned();
    let junk = format!("{share}-ZZZZ");
    let mut errors = Vec::new();
    for given in [&typo, &cut, &junk] {
        // As `Unseal` and `ConfirmRecovery` report a share that does not parse.
        let e = recovery_share::parse(given).unwrap_err();
        errors.push(invalid(Param::RecoveryShare, e.to_string()));
        errors.push(invalid(Param::RecoveryShares, format!("share 1: {e}")));
    }
    // As a PIN the device refuses to take is reported.
    let pin = "correct-horse-battery-staple-\u{7f}";
    let e = hsm_shim::Pin::new(pin)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    errors.push(invalid(Param::Pin, e));
    for error in errors {
        let debug = format!("{error:?}");
        let display = error.to_string();
        let api = ApiError::from(error);
        for text in [
            debug,
            display,
            format!("{api:?}"),
            api.to_string(),
            api.parameters().to_string(),
        ] {
            for secret in [share.as_str(), pin] {
                assert!(!shows(&text, secret), "{text:?} shows a secret");
            }
            assert!(!text.contains(keyward_proto::text::hex(vmk.expose()).as_str()));
        }
    }
}
