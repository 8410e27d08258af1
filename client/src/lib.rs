//! Client of the `keywardd` Varlink API (`org.keyward.Custodian`), and the wire types both sides
//! share ([`api`]).

pub mod api;
pub mod varlink;
pub mod wire;

pub use varlink::{Client, ClientError, DEFAULT_SOCKET, SOCKET_ENV};
