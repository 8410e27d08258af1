//! The contract's closed vocabularies: signing algorithms ([`KeyAlgorithm`]), kinds of device
//! ([`DeviceKind`]) and kinds of keyslot ([`KeyslotKind`]), each with its one wire name.
//!
//! The device layer (`hsm-shim`) uses the same enums, so a name read from a request, the CLI,
//! the config or the store means one thing everywhere and is compared as a value, not as text.
//!
//! Must not: grow a variant that some end of the wire would not know how to handle.

use crate::invalid::{checked_text, Invalid};

macro_rules! wire_enum {
    (
        $(#[$doc:meta])* $t:ident, $parameter:literal, $what:literal {
            $( $(#[$vdoc:meta])* $v:ident = $wire:literal, )+
        }
    ) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $t {
            $( $(#[$vdoc])* $v, )+
        }

        impl $t {
            /// Every value, for help texts and exhaustive tests.
            pub const ALL: [$t; [$($wire),+].len()] = [$(Self::$v),+];

            /// The wire name.
            pub fn as_str(self) -> &'static str {
                match self {
                    $( Self::$v => $wire, )+
                }
            }
        }

        impl TryFrom<String> for $t {
            type Error = Invalid;
            fn try_from(s: String) -> Result<Self, Invalid> {
                match s.as_str() {
                    $( $wire => Ok(Self::$v), )+
                    _ => Err(Invalid::new(
                        $parameter,
                        format!(
                            concat!("unknown ", $what, " {:?}: expected one of {}"),
                            s,
                            [$($wire),+].join(", ")
                        ),
                    )),
                }
            }
        }

        checked_text!($t);
    };
}

wire_enum!(
    /// Signing algorithms Keyward offers.
    KeyAlgorithm, "algorithm", "algorithm" {
        /// Ed25519 (pure EdDSA); signature is the raw 64 bytes.
        Ed25519 = "ed25519",
        /// ECDSA over P-256 with SHA-256; signature is DER (X9.62 `Ecdsa-Sig-Value`).
        EcdsaP256 = "ecdsa-p256",
        /// RSA-3072 with PSS padding, SHA-256, MGF1-SHA-256; signature is raw. Salt as for
        /// `rsa-pss-2048`.
        RsaPss3072 = "rsa-pss-3072",
        /// RSA-3072 with PKCS#1 v1.5 padding (SHA-256, or SHA-512 when asked); signature is
        /// raw. The RSA that SSH speaks (`rsa-sha2-256`/`rsa-sha2-512`): SSH has no PSS.
        RsaPkcs1_3072 = "rsa-pkcs1-3072",
        /// RSA-2048 with PSS padding, SHA-256, MGF1-SHA-256; signature is raw. The salt is 32
        /// bytes from a PKCS#11 token and from swtpm (libtpms); TPM firmware that follows
        /// older TCG specs uses the largest salt that fits, so verify with
        /// `rsa_pss_saltlen:auto` where the TPM is not known.
        RsaPss2048 = "rsa-pss-2048",
    }
);

wire_enum!(
    /// The hash a signature is made over. SHA-256 for every algorithm; SHA-512 only for
    /// RSA PKCS#1 v1.5 keys, which SSH asks for as `rsa-sha2-512`.
    SignHash, "hash", "hash" {
        /// SHA-256.
        Sha256 = "sha256",
        /// SHA-512.
        Sha512 = "sha512",
    }
);

impl SignHash {
    /// The digest length in bytes.
    pub fn digest_len(self) -> usize {
        match self {
            Self::Sha256 => 32,
            Self::Sha512 => 64,
        }
    }
}

wire_enum!(
    /// Which kind of device a backend drives.
    DeviceKind, "kind", "device kind" {
        /// A PKCS#11 token or HSM.
        Pkcs11 = "pkcs11",
        /// A TPM 2.0.
        Tpm2 = "tpm2",
    }
);

wire_enum!(
    /// What holds a keyslot's copy of the vault master key.
    KeyslotKind, "kind", "keyslot kind" {
        /// Sealed by a TPM 2.0 to PCR values (and a PIN).
        Tpm2 = "tpm2",
        /// Wrapped by a key inside a PKCS#11 token.
        Pkcs11 = "pkcs11",
        /// Split into recovery shares held by people.
        Recovery = "recovery",
    }
);

impl KeyslotKind {
    /// The kind of device a keyslot of this kind is sealed by; `None` for recovery shares.
    pub fn device(self) -> Option<DeviceKind> {
        match self {
            Self::Tpm2 => Some(DeviceKind::Tpm2),
            Self::Pkcs11 => Some(DeviceKind::Pkcs11),
            Self::Recovery => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_names_round_trip_and_unknown_ones_are_refused() {
        for a in KeyAlgorithm::ALL {
            assert_eq!(a.as_str().parse::<KeyAlgorithm>(), Ok(a));
            let json = serde_json::to_string(&a).unwrap();
            assert_eq!(serde_json::from_str::<KeyAlgorithm>(&json).unwrap(), a);
        }
        for k in KeyslotKind::ALL {
            assert_eq!(k.to_string().parse::<KeyslotKind>(), Ok(k));
            assert_eq!(
                k.device().map(DeviceKind::as_str),
                (k != KeyslotKind::Recovery).then_some(k.as_str())
            );
        }
        let e = "dsa".parse::<KeyAlgorithm>().unwrap_err();
        assert_eq!(e.parameter, "algorithm");
        assert_eq!(
            e.reason,
            r#"unknown algorithm "dsa": expected one of ed25519, ecdsa-p256, rsa-pss-3072, rsa-pkcs1-3072, rsa-pss-2048"#
        );
        assert!(serde_json::from_str::<DeviceKind>(r#""tpm""#).is_err());
    }
}
