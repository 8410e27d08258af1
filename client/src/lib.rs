//! Client of the `keywardd` Varlink API (`org.keyward.Custodian`): one connection, one call at a
//! time, with the daemon's bounds and errors made typed ([`Client`], [`ClientError`]).
//!
//! The contract itself (types, errors, the frame codec, the audit format, the recovery share
//! text) is `keyward-proto`'s; it is re-exported here so that a client needs one dependency.
//! This crate must not grow command-line concerns (those are the `keyward` binary's) nor
//! anything the daemon needs.

pub use keyward_proto::{api, attestation, audit, backup, recovery_share, ssh, text, wire};

pub mod varlink;

pub use varlink::{Client, ClientError, Replies, DEFAULT_SOCKET, SOCKET_ENV};
