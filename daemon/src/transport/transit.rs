//! The OpenBao-compatible transit subset, on a Unix socket of its own: what OpenBao's (and
//! Vault's) `seal "transit"` calls to auto-unseal a node, with `address = "unix:///…"`.
//!
//! Exactly two routes, HTTP/1.1 (hyper), `PUT` or `POST`:
//! - `/v1/<mount>/encrypt/<key>` `{"plaintext": b64, "associated_data"|"context": b64}` →
//!   `{"data": {"ciphertext": "vault:v<N>:…"}}`;
//! - `/v1/<mount>/decrypt/<key>` `{"ciphertext": "vault:v<N>:…", …}` →
//!   `{"data": {"plaintext": b64}}`;
//!
//! and errors in Vault's form, `{"errors": ["…"]}`, with a fitting status. The caller is who the
//! kernel says connected (`SO_PEERCRED`, its unit), read by the shared accept loop; an
//! `X-Vault-Token` header is accepted and ignored (it proves nothing here). Each request becomes
//! the same `Encrypt`/`Decrypt` [`Request`] the other transports make, answered by the one
//! [`Handler`]: the policy (`encrypt`/`decrypt` on the transit key) and the audit log apply as
//! everywhere.
//!
//! It owns the bounds of this socket (request body size, connections at once, time to send the
//! request headers) and the drain at shutdown. It never touches the store, the vault or a
//! device, and never logs a body: bodies hold plaintext. (The decoded plaintext and the reply's
//! JSON are zeroizing; hyper's own read and write buffers are not.)

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request as HttpRequest, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use keyward_proto::api::{self, ApiError, Reply, Request, SecretValue};
use serde::Deserialize;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{watch, Semaphore};
use tracing::debug;
use zeroize::Zeroizing;

use super::socket::{self, shutdown_requested};
use super::Handler;
use crate::identity::{Caller, Peer, Via};

/// Bounds and naming of the transit socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransitLimits {
    /// The mount path clients put after `/v1/` (`transit`: OpenBao's `mount_path`).
    pub mount: String,
    /// Largest request body, in bytes.
    pub max_body: usize,
    /// Connections served at once; more are closed on accept.
    pub max_connections: usize,
    /// How long a client may take to send a request's headers (and so how long an idle
    /// keep-alive connection is held).
    pub header_timeout: Duration,
}

/// Serve the transit subset on `listener` until `shutdown` turns true; then close idle
/// connections, finish the requests in hand, and return.
pub async fn serve<H: Handler>(
    listener: UnixListener,
    handler: Arc<H>,
    limits: TransitLimits,
    shutdown: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let limits = Arc::new(limits);
    let stop = shutdown.clone();
    socket::accept_loop("transit", listener, shutdown, |stream, peer| {
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            debug!(
                uid = peer.uid,
                "transit: every connection slot is taken; closed"
            );
            return None;
        };
        let handler = Arc::clone(&handler);
        let limits = Arc::clone(&limits);
        let stop = stop.clone();
        Some(async move {
            connection(stream, peer, handler, limits, stop).await;
            drop(slot);
        })
    })
    .await;
}

async fn connection<H: Handler>(
    stream: UnixStream,
    peer: Peer,
    handler: Arc<H>,
    limits: Arc<TransitLimits>,
    mut shutdown: watch::Receiver<bool>,
) {
    let caller = peer.caller(Via::Transit);
    drop(peer);
    debug!(caller = %caller, "transit: connection accepted");
    let service = hyper::service::service_fn(|request| {
        let (caller, handler, limits) = (caller.clone(), Arc::clone(&handler), Arc::clone(&limits));
        async move { Ok::<_, Infallible>(answer(request, &caller, &*handler, &limits).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .serve_connection(TokioIo::new(stream), service);
    let mut conn = std::pin::pin!(conn);
    let ended = tokio::select! {
        ended = conn.as_mut() => ended,
        () = shutdown_requested(&mut shutdown) => {
            // Idle: closed now; busy: the reply goes out first.
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = ended {
        debug!(caller = %caller, error = %e, "transit: connection ended");
    }
}

/// What the client sends: OpenBao's seal sends `plaintext` or `ciphertext`; `associated_data`
/// (or Vault's `context`) binds extra bytes. Other fields are ignored, as Vault ignores them.
#[derive(Deserialize)]
struct Body {
    #[serde(default)]
    plaintext: Option<SecretValue>,
    #[serde(default)]
    ciphertext: Option<String>,
    #[serde(default)]
    associated_data: Option<api::Bytes>,
    #[serde(default)]
    context: Option<api::Bytes>,
}

/// The one place a request turns into a response.
async fn answer<H: Handler>(
    request: HttpRequest<Incoming>,
    caller: &Caller,
    handler: &H,
    limits: &TransitLimits,
) -> Response<Full<Bytes>> {
    match call(request, caller, handler, limits).await {
        Ok(reply) => reply,
        Err((status, message)) => errors(status, &message),
    }
}

/// Which of the two routes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Encrypt,
    Decrypt,
}

/// `/v1/<mount>/<encrypt|decrypt>/<key>`, or `None`.
fn route<'a>(path: &'a str, mount: &str) -> Option<(Op, &'a str)> {
    let rest = path
        .strip_prefix("/v1/")?
        .strip_prefix(mount.trim_matches('/'))?
        .strip_prefix('/')?;
    let (op, key) = rest.split_once('/')?;
    let op = match op {
        "encrypt" => Op::Encrypt,
        "decrypt" => Op::Decrypt,
        _ => return None,
    };
    (!key.is_empty() && !key.contains('/')).then_some((op, key))
}

type Refusal = (StatusCode, String);

async fn call<H: Handler>(
    request: HttpRequest<Incoming>,
    caller: &Caller,
    handler: &H,
    limits: &TransitLimits,
) -> Result<Response<Full<Bytes>>, Refusal> {
    let Some((op, key)) = route(request.uri().path(), &limits.mount) else {
        return Err((
            StatusCode::NOT_FOUND,
            format!(
                "no such path: this socket serves /v1/{}/encrypt/<key> and /v1/{}/decrypt/<key>",
                limits.mount, limits.mount
            ),
        ));
    };
    // Checked before the body is read, as Varlink checks names while it parses.
    let key = api::TransitKeyName::try_from(key)
        .map_err(|e| (StatusCode::BAD_REQUEST, format!("the key name: {e}")))?;
    if !matches!(*request.method(), Method::PUT | Method::POST) {
        return Err((StatusCode::METHOD_NOT_ALLOWED, "use PUT or POST".to_owned()));
    }
    // Bounded before anything is read.
    let body = Limited::new(request.into_body(), limits.max_body)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                (
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("the request body is larger than {} bytes", limits.max_body),
                )
            } else {
                (
                    StatusCode::BAD_REQUEST,
                    "the request body could not be read".to_owned(),
                )
            }
        })?;
    let body: Body = serde_json::from_slice(&body.to_bytes()).map_err(|e| {
        // A syntax error's message names the line and column only; a data error's may quote
        // the value, so it is not repeated.
        let reason = if e.is_data() {
            "a field has the wrong type or is not valid base64".to_owned()
        } else {
            format!("the body is not JSON: {e}")
        };
        (StatusCode::BAD_REQUEST, reason)
    })?;
    let associated_data = match (body.associated_data, body.context) {
        (Some(_), Some(_)) => {
            return Err((
                StatusCode::BAD_REQUEST,
                "give associated_data or context, not both".to_owned(),
            ))
        }
        (a, c) => a.or(c),
    };
    let request = match (op, body.plaintext, body.ciphertext) {
        (Op::Encrypt, Some(plaintext), _) => Request::Encrypt(api::EncryptParams {
            name: key,
            plaintext,
            associated_data,
        }),
        (Op::Decrypt, _, Some(ciphertext)) => Request::Decrypt(api::DecryptParams {
            name: key,
            ciphertext,
            associated_data,
        }),
        (Op::Encrypt, None, _) => {
            return Err((StatusCode::BAD_REQUEST, "missing plaintext".to_owned()))
        }
        (Op::Decrypt, _, None) => {
            return Err((StatusCode::BAD_REQUEST, "missing ciphertext".to_owned()))
        }
    };
    let data = match handler.handle(caller.clone(), request).await {
        Ok(Reply::Encrypt(r)) => serde_json::json!({ "ciphertext": r.ciphertext }),
        Ok(Reply::Decrypt(r)) => {
            // The JSON text of the plaintext is built in zeroizing memory; hyper holds the
            // body it sends until it is written.
            let text = Zeroizing::new(
                serde_json::to_vec(&serde_json::json!({ "data": { "plaintext": r.plaintext } }))
                    .map_err(|_| internal())?,
            );
            return Ok(json_response(StatusCode::OK, Bytes::copy_from_slice(&text)));
        }
        Ok(_) => return Err(internal()),
        Err(e) => return Err((status_of(&e), e.to_string())),
    };
    let text = serde_json::to_vec(&serde_json::json!({ "data": data })).map_err(|_| internal())?;
    Ok(json_response(StatusCode::OK, Bytes::from(text)))
}

fn internal() -> Refusal {
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal error".to_owned(),
    )
}

/// The HTTP status of an API error, as Vault would give it.
fn status_of(e: &ApiError) -> StatusCode {
    match e {
        ApiError::PermissionDenied { .. } => StatusCode::FORBIDDEN,
        ApiError::NotFound { .. } => StatusCode::NOT_FOUND,
        ApiError::InvalidArgument { .. }
        | ApiError::InvalidParameter { .. }
        | ApiError::AlreadyExists { .. } => StatusCode::BAD_REQUEST,
        ApiError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        // Vault answers 503 while sealed; so does a vault whose device or audit log is away.
        ApiError::Sealed { .. }
        | ApiError::NotInitialized
        | ApiError::DeviceUnavailable { .. }
        | ApiError::PolicyMismatch { .. }
        | ApiError::AuditUnavailable { .. }
        | ApiError::StorageFull { .. }
        | ApiError::Busy => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn json_response(status: StatusCode, body: Bytes) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// Vault's error form: `{"errors": [message]}`.
fn errors(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    let text = serde_json::json!({ "errors": [message] }).to_string();
    json_response(status, Bytes::from(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let r = |p| route(p, "transit");
        assert_eq!(r("/v1/transit/encrypt/bao"), Some((Op::Encrypt, "bao")));
        assert_eq!(r("/v1/transit/decrypt/bao"), Some((Op::Decrypt, "bao")));
        assert_eq!(
            route("/v1/kw/transit/encrypt/k", "kw/transit/"),
            Some((Op::Encrypt, "k"))
        );
        for bad in [
            "/v1/transit/encrypt/",
            "/v1/transit/encrypt/a/b",
            "/v1/transit/rewrap/bao",
            "/v1/other/encrypt/bao",
            "/v1/transitx/encrypt/bao",
            "/transit/encrypt/bao",
            "/v1/transit/keys/bao",
        ] {
            assert_eq!(r(bad), None, "{bad}");
        }
    }

    #[test]
    fn errors_have_vaults_form_and_status() {
        let denied = ApiError::PermissionDenied {
            action: "encrypt".into(),
            resource: "transit/bao".into(),
        };
        assert_eq!(status_of(&denied), StatusCode::FORBIDDEN);
        assert_eq!(
            status_of(&ApiError::Sealed { reason: "x".into() }),
            StatusCode::SERVICE_UNAVAILABLE
        );
        let r = errors(StatusCode::FORBIDDEN, "no");
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        assert_eq!(r.headers()[CONTENT_TYPE], "application/json");
    }
}
