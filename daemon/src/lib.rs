//! keywardd: a vault whose master key only a TPM or a PKCS#11 token can release, the store it
//! keeps secrets in, and the transports that serve them.
//!
//! Data flows one way: a transport (`transport/`) turns bytes and a kernel-verified identity
//! into an [`keyward_proto::api::Request`] and a [`identity::Caller`]; the [`service`] checks the
//! policy ([`keyward_policy`]) and runs the request against the [`vault`], the [`store`] and the device actors
//! ([`device`]), and records it in the [`audit`] log. A transport never touches the store or a device.
//! What fails below the service is an [`error::Error`]; the service alone turns it into the wire's
//! [`keyward_proto::api::ApiError`].
//!
//! What this crate must never do: hold the VMK or a plaintext secret outside zeroizing, locked
//! memory, or let one reach a log line, an error or the audit log; unwrap or sign outside a
//! device; answer a request the policy did not allow or that could not be audited (`Status`
//! alone answers with its record declared lost); acknowledge a write before it is durable.

pub mod audit;
pub mod backup;
pub mod blocking;
pub mod config;
pub mod device;
pub mod doctor;
pub mod error;
pub mod health;
pub mod identity;
pub mod logging;
pub mod service;
pub mod startup;
pub mod store;
pub mod sys;
pub mod transport;
pub mod upstream;
pub mod vault;
