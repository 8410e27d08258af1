//! Transports: each turns (kernel-verified identity, bytes) into a call of the one service
//! layer, through [`Handler`], and the result back into bytes. No transport touches the store,
//! the vault or a device.

pub mod varlink;

use std::future::Future;

use keyward::api::{ApiError, Reply, Request};

use crate::identity::Caller;

/// What a transport calls. The daemon's [`crate::service::Service`] implements it; tests of a
/// transport may use a small stand-in.
pub trait Handler: Send + Sync + 'static {
    /// Run one request for `caller`.
    fn handle(
        &self,
        caller: Caller,
        request: Request,
    ) -> impl Future<Output = Result<Reply, ApiError>> + Send;
}
