//! The physical limits each Keyward path is measured against, all in this process: a minimal
//! NUL-framed JSON echo server and a bare accept-and-write credential server ([`servers`]), a
//! cryptoki `C_Sign` loop ([`pkcs11`]), a tss-esapi sign loop and the bare TPM unseal path
//! ([`tpm`]), and single-row SQLite commits ([`sqlite`]).
//!
//! Each does the least the path physically needs (the device call, the socket round trip, the
//! fsync) and nothing Keyward adds (policy, vault, store, framing checks), so that the ratio
//! says what Keyward costs on top.

pub mod pkcs11;
pub mod servers;
pub mod sqlite;
pub mod tpm;
