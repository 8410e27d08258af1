//! Client of the `keywardd` Varlink API (`org.keyward.Custodian`), the wire types both sides
//! share ([`api`]), and the audit log's format and offline verification ([`audit`]).

pub mod api;
pub mod audit;
pub mod varlink;
pub mod wire;

pub use varlink::{Client, ClientError, DEFAULT_SOCKET, SOCKET_ENV};
