//! keyward-proto: the contract between `keywardd` and everything that talks to it or reads what
//! it writes.
//!
//! It owns the wire types and errors of `org.keyward.Custodian` and the Varlink interface text
//! ([`api`]), the frame codec both ends use ([`wire`]), and the audit log's record format with
//! its offline verifier ([`audit`]), the text forms of bytes they share ([`text`]), the text of
//! a recovery share, printed by the daemon and read back by it and by the CLI
//! ([`recovery_share`]), and the checked values a request carries: names ([`names`]) and closed
//! vocabularies ([`kinds`]), refused with an [`Invalid`] that says which parameter and why, and
//! the SSH forms of keys and signatures with the ssh-agent messages ([`ssh`]), and the header
//! and checksum of a backup file ([`backup`]). It must stay
//! pure: no sockets, no files opened on its own account, no threads, no cryptography beyond
//! the audit verifier's (and reading public keys and signatures into their SSH form), no
//! command-line or daemon dependencies, so that the daemon, the client library, the CLI, the
//! device layer and the fuzz targets can all build on it and nothing else.

pub mod api;
pub mod attestation;
pub mod audit;
pub mod backup;
mod invalid;
pub mod kinds;
pub mod names;
pub mod recovery_share;
pub mod rsa;
pub mod ssh;
pub mod text;
pub mod wire;

pub use invalid::Invalid;
