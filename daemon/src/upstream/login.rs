//! The upstream token: `auth/cert` login with the machine's certificate, renewal, and when to
//! do which.
//!
//! The token lives only in memory ([`Token`], zeroized on drop, never in Debug, a log or the
//! audit log). OpenBao binds a cert-auth token to the certificate it logged in with, so it is
//! renewed over the same mTLS identity; a token that can't be renewed, or has expired, is
//! replaced by a new login. This module must not decide what to sync or touch the vault.

use std::time::{Duration, Instant};

use hyper::{Method, StatusCode};
use serde::Deserialize;
use zeroize::Zeroizing;

use super::client::{Answer, Connection};
use super::UpstreamError;

/// A token of the upstream's.
pub struct Token {
    value: Zeroizing<String>,
    /// `None`: it does not expire (a lease of 0).
    expires: Option<Instant>,
    lease: Duration,
    renewable: bool,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("ttl", &self.ttl())
            .field("renewable", &self.renewable)
            .finish_non_exhaustive()
    }
}

/// What OpenBao says about a token it hands out (`auth` of a login or a renewal).
#[derive(Deserialize)]
struct AuthReply {
    auth: Option<Auth>,
}

#[derive(Deserialize)]
struct Auth {
    client_token: Zeroizing<String>,
    #[serde(default)]
    lease_duration: u64,
    #[serde(default)]
    renewable: bool,
}

impl Token {
    /// The token, for the `X-Vault-Token` header.
    pub fn expose(&self) -> &str {
        &self.value
    }

    /// Time left; `None` when it does not expire.
    pub fn ttl(&self) -> Option<Duration> {
        self.expires
            .map(|e| e.saturating_duration_since(Instant::now()))
    }

    /// It has expired (or is about to: within the request timeout `margin`).
    pub fn expired(&self, margin: Duration) -> bool {
        self.ttl().is_some_and(|left| left <= margin)
    }

    /// Past half its lease: renew it now, while a failure still leaves time to log in again.
    pub fn due_for_renewal(&self) -> bool {
        self.renewable && self.ttl().is_some_and(|left| left < self.lease / 2)
    }

    fn from_answer(answer: &Answer, what: &'static str) -> Result<Self, UpstreamError> {
        if !answer.status.is_success() {
            return Err(UpstreamError::Refused {
                what,
                why: answer.errors(),
            });
        }
        let reply: AuthReply = serde_json::from_slice(&answer.body)
            .map_err(|e| UpstreamError::Response(format!("{what}: {e}")))?;
        let auth = reply
            .auth
            .ok_or_else(|| UpstreamError::Response(format!("{what}: no auth in the reply")))?;
        let lease = Duration::from_secs(auth.lease_duration);
        Ok(Self {
            value: auth.client_token,
            expires: (auth.lease_duration > 0).then(|| Instant::now() + lease),
            lease,
            renewable: auth.renewable,
        })
    }
}

/// `POST /v1/auth/cert/login {"name": role}`: the TLS session's client certificate is the
/// credential.
///
/// # Errors
/// The upstream refused (no role of that name, a certificate the role does not trust), or
/// the exchange failed.
pub async fn login(conn: &mut Connection, role: &str) -> Result<Token, UpstreamError> {
    let body = serde_json::to_vec(&serde_json::json!({ "name": role }))
        .map_err(|e| UpstreamError::Response(e.to_string()))?;
    let answer = conn
        .call(Method::POST, "/v1/auth/cert/login", None, Some(body))
        .await?;
    Token::from_answer(&answer, "the login")
}

/// `POST /v1/auth/token/renew-self` over the same identity.
///
/// # Errors
/// The upstream refused (the token expired or is not renewable), or the exchange failed.
pub async fn renew(conn: &mut Connection, token: &Token) -> Result<Token, UpstreamError> {
    let answer = conn
        .call(
            Method::POST,
            "/v1/auth/token/renew-self",
            Some(token.expose()),
            Some(b"{}".to_vec()),
        )
        .await?;
    Token::from_answer(&answer, "the token renewal")
}

/// `GET /v1/auth/token/lookup-self`: whether the upstream still takes `token`. OpenBao answers
/// 403 both to a dead token and to a live one its policy does not let at a path; this tells
/// the two apart (any token may look itself up).
///
/// # Errors
/// The exchange failed, or the upstream answered something other than a yes or a refusal.
pub async fn token_alive(conn: &mut Connection, token: &str) -> Result<bool, UpstreamError> {
    let answer = conn
        .call(Method::GET, "/v1/auth/token/lookup-self", Some(token), None)
        .await?;
    if answer.status.is_success() {
        Ok(true)
    } else if token_refused(answer.status) {
        Ok(false)
    } else {
        Err(UpstreamError::Response(format!(
            "the token lookup: {}",
            answer.errors()
        )))
    }
}

/// The upstream said the token is not (or no longer) good: a new login may help.
pub fn token_refused(status: StatusCode) -> bool {
    status == StatusCode::FORBIDDEN || status == StatusCode::UNAUTHORIZED
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(status: u16, body: &str) -> Answer {
        Answer {
            status: StatusCode::from_u16(status).unwrap_or(StatusCode::IM_A_TEAPOT),
            body: Zeroizing::new(body.as_bytes().to_vec()),
        }
    }

    #[test]
    fn a_login_reply_gives_a_token_that_never_shows() {
        let t = Token::from_answer(
            &answer(
                200,
                r#"{"auth":{"client_token":"s.very-secret","lease_duration":3600,"renewable":true}}"#,
            ),
            "the login",
        );
        let Ok(t) = t else { unreachable!("{t:?}") };
        assert_eq!(t.expose(), "s.very-secret");
        assert!(!format!("{t:?}").contains("very-secret"));
        assert!(!t.due_for_renewal() && !t.expired(Duration::from_secs(1)));
        assert!(t.ttl().is_some_and(|l| l > Duration::from_secs(3500)));
    }

    #[test]
    fn a_refusal_says_what_openbao_said() {
        let e = Token::from_answer(
            &answer(
                400,
                r#"{"errors":["invalid certificate or no client certificate supplied"]}"#,
            ),
            "the login",
        );
        let Err(e) = e else { unreachable!() };
        assert!(
            e.to_string()
                .contains("the login: 400 Bad Request: invalid certificate"),
            "{e}"
        );
    }
}
