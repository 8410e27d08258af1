//! The OpenBao upstream sync: this machine logs in to an OpenBao (or Vault) cluster's
//! `auth/cert` with a certificate whose key is in its TPM or token, and keeps mapped KV v2
//! secrets in the local vault, so the services that need them at boot get the last synced
//! value even when the cluster is unreachable.
//!
//! It is a client, not a transport: one task ([`run`]) syncs at start, then every `interval`
//! (plus up to `jitter`), and whenever an admin asks (`UpstreamSync`); [`Upstream`] is the
//! handle the service holds for `UpstreamStatus` and `UpstreamSync`. Secrets are written
//! through the vault (a new version and the record of the upstream version, one transaction),
//! and every login, sync, change and failure is an event in the audit log, which never carries
//! a value or the token. A failure never removes a local secret, and the token lives only in
//! this task's memory.
//!
//! Files: `client.rs` (TLS with the device's signature, HTTP), `login.rs` (the token),
//! `sync.rs` (what one sync reads and writes).

pub mod client;
pub mod login;
pub mod sync;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use keyward_proto::api::{UpstreamMapping as MappingStatus, UpstreamStatusReply};
use tokio::sync::{mpsc, oneshot, watch};
use zeroize::Zeroizing;

use crate::config::UpstreamSettings;
use crate::service::Service;
use crate::store::tables::rfc3339;

/// Why a sync (or a login) failed. Never carries a value, a token or a body, only what the
/// upstream said in its `errors` and what failed here.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The machine identity can't be used: files, key, settings.
    #[error("machine identity: {0}")]
    Identity(String),
    /// The server can't be reached.
    #[error("cannot connect: {0}")]
    Connect(String),
    /// The TLS handshake failed (the server's or our certificate refused, the device did not
    /// sign).
    #[error("TLS handshake failed: {0}")]
    Tls(String),
    /// No answer in time.
    #[error("no answer in time to {0}")]
    Timeout(&'static str),
    /// The HTTP exchange failed.
    #[error("HTTP: {0}")]
    Http(String),
    /// The node answered with a server error (sealed, no active node): another node may serve.
    #[error("the node is unavailable: {0}")]
    Unavailable(String),
    /// The upstream answered with an error.
    #[error("the upstream refused {what}: {why}")]
    Refused {
        /// What was asked (`the login`, `a read`).
        what: &'static str,
        /// Its status and `errors`.
        why: String,
    },
    /// The upstream's answer does not parse as it should.
    #[error("unexpected answer: {0}")]
    Response(String),
    /// The local vault or store failed.
    #[error("local vault: {0}")]
    Local(String),
}

/// What the status says, kept by the sync task.
#[derive(Debug, Default)]
struct State {
    last_attempt: Option<SystemTime>,
    last_success: Option<SystemTime>,
    last_error: Option<String>,
    token_expires: Option<Instant>,
    /// Syncs finished (well or not), for those who wait on the first one.
    finished: u64,
    /// The index in `servers` of the node the next sync tries first: the last that answered.
    server: usize,
}

/// The service's handle on the sync task.
#[derive(Debug)]
pub struct Upstream {
    settings: UpstreamSettings,
    state: Mutex<State>,
    kick: mpsc::Sender<oneshot::Sender<()>>,
    finished: watch::Sender<u64>,
}

impl Upstream {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wait until `n` syncs have finished, for at most `limit`; `true` if they did.
    pub async fn wait_finished(&self, n: u64, limit: Duration) -> bool {
        let mut rx = self.finished.subscribe();
        tokio::time::timeout(limit, rx.wait_for(|done| *done >= n))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Sync now (the sync task runs it; a sync in progress finishes first) and wait for it.
    pub async fn sync_now(&self) {
        let (tx, rx) = oneshot::channel();
        if self.kick.send(tx).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// `UpstreamStatus`: the last attempt, success and error, the token's time left, and what
    /// each mapping brought.
    ///
    /// # Errors
    /// The store can't be read.
    pub async fn status(
        &self,
        service: &Service,
    ) -> Result<UpstreamStatusReply, crate::error::Error> {
        let rows = service.vault().synced_secrets().await?;
        let mut mappings: Vec<MappingStatus> = rows
            .into_iter()
            .map(|r| MappingStatus {
                remote: r.remote,
                secret: r.secret,
                remote_version: Some(r.remote_version),
                local_version: Some(r.local_version),
                synced: Some(r.synced),
                note: r.note,
            })
            .collect();
        for m in &self.settings.mappings {
            let brought = mappings.iter().any(|s| {
                if m.is_prefix() {
                    s.remote.starts_with(&m.remote)
                } else {
                    s.remote == m.remote && s.secret == m.secret
                }
            });
            if !brought {
                mappings.push(MappingStatus {
                    remote: m.remote.clone(),
                    secret: m.secret.clone(),
                    remote_version: None,
                    local_version: None,
                    synced: None,
                    note: Some("nothing synced yet".into()),
                });
            }
        }
        let state = self.state();
        Ok(UpstreamStatusReply {
            configured: true,
            address: self
                .settings
                .servers
                .get(state.server)
                .map(|s| s.address.clone()),
            role: Some(self.settings.role.clone()),
            key: Some(self.settings.key.to_string()),
            last_attempt: state.last_attempt.map(rfc3339),
            last_success: state.last_success.map(rfc3339),
            last_error: state.last_error.clone(),
            token_ttl: state
                .token_expires
                .map(|e| e.saturating_duration_since(Instant::now()).as_secs()),
            mappings,
        })
    }
}

/// The status when no `[upstream]` is configured.
pub fn not_configured() -> UpstreamStatusReply {
    UpstreamStatusReply {
        configured: false,
        address: None,
        role: None,
        key: None,
        last_attempt: None,
        last_success: None,
        last_error: None,
        token_ttl: None,
        mappings: Vec::new(),
    }
}

/// The handle, and what [`run`] needs to serve it.
#[derive(Debug)]
pub struct Task {
    kicks: mpsc::Receiver<oneshot::Sender<()>>,
}

/// A handle for `settings` and the receiving end of its requests.
pub fn new(settings: UpstreamSettings) -> (Arc<Upstream>, Task) {
    let (kick, kicks) = mpsc::channel(8);
    let (finished, _) = watch::channel(0);
    (
        Arc::new(Upstream {
            settings,
            state: Mutex::new(State::default()),
            kick,
            finished,
        }),
        Task { kicks },
    )
}

/// A random share of `jitter`, so a fleet started together does not sync in step.
fn jittered(interval: Duration, jitter: Duration) -> Duration {
    use chacha20poly1305::aead::rand_core::RngCore as _;
    let ms = u64::try_from(jitter.as_millis()).unwrap_or(u64::MAX);
    let extra = if ms == 0 {
        0
    } else {
        chacha20poly1305::aead::OsRng.next_u64() % (ms + 1)
    };
    interval + Duration::from_millis(extra)
}

/// Sync at once, then every interval and on each request, until `stop` turns true.
pub async fn run(
    upstream: Arc<Upstream>,
    service: Arc<Service>,
    mut task: Task,
    mut stop: watch::Receiver<bool>,
) {
    let mut session = Session { token: None };
    let mut waiting: Vec<oneshot::Sender<()>> = Vec::new();
    loop {
        session.sync(&upstream, &service).await;
        for w in waiting.drain(..) {
            let _ = w.send(());
        }
        let next = jittered(upstream.settings.interval, upstream.settings.jitter);
        tokio::select! {
            () = tokio::time::sleep(next) => {}
            kick = task.kicks.recv() => match kick {
                Some(done) => waiting.push(done),
                None => return,
            },
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// The token between syncs.
struct Session {
    token: Option<login::Token>,
}

impl Session {
    /// One sync, with its audit events and its mark on the status.
    async fn sync(&mut self, upstream: &Upstream, service: &Arc<Service>) {
        let started = SystemTime::now();
        let clock = Instant::now();
        upstream.state().last_attempt = Some(started);
        let result = self.attempt(upstream, service).await;
        if let Err(e) = &result {
            // The node went away or failed mid-sync: this sync fails (what it wrote stays, each
            // write audited), and the next starts at the next node.
            if e.node_failed() {
                let mut state = upstream.state();
                state.server = (state.server + 1) % upstream.settings.servers.len().max(1);
            }
        }
        let elapsed = clock.elapsed().as_millis();
        let line = match &result {
            Ok(outcome) => {
                let mut line = format!(
                    "ok: {} changed, {} unchanged, {} deleted upstream in {elapsed} ms",
                    outcome.changed.len(),
                    outcome.unchanged,
                    outcome.deleted.len()
                );
                if !outcome.problems.is_empty() {
                    line = format!(
                        "partial: {} changed, {} unchanged; {} problem(s): {}",
                        outcome.changed.len(),
                        outcome.unchanged,
                        outcome.problems.len(),
                        outcome.problems.join("; ")
                    );
                }
                line
            }
            Err(e) => format!("failed: {e}"),
        };
        let ok = result.as_ref().is_ok_and(|o| o.problems.is_empty());
        if ok {
            tracing::info!("upstream sync {line}");
        } else {
            tracing::warn!("upstream sync {line}");
        }
        audit_event(service, "upstream-sync", &line).await;
        let finished = {
            let mut state = upstream.state();
            if ok {
                state.last_success = Some(started);
                state.last_error = None;
            } else {
                state.last_error = Some(line);
            }
            state.token_expires = self
                .token
                .as_ref()
                .and_then(login::Token::ttl)
                .map(|ttl| Instant::now() + ttl);
            state.finished += 1;
            state.finished
        };
        upstream.finished.send_replace(finished);
    }

    /// Connect (the device signs the handshake), make sure of the token, read and write.
    async fn attempt(
        &mut self,
        upstream: &Upstream,
        service: &Arc<Service>,
    ) -> Result<sync::Outcome, UpstreamError> {
        let settings = &upstream.settings;
        let key = client::DeviceKey::new(Arc::clone(service), settings.key.clone()).await?;
        let mut conn = connect(upstream, key).await?;
        let mut fresh_login = false;
        if self
            .token
            .as_ref()
            .is_some_and(|t| t.expired(settings.request_timeout))
        {
            self.token = None;
        }
        if let Some(token) = self.token.as_ref().filter(|t| t.due_for_renewal()) {
            match login::renew(&mut conn, token).await {
                Ok(renewed) => self.token = Some(renewed),
                Err(e) => {
                    tracing::info!("upstream: token renewal failed ({e}); logging in again");
                    self.token = None;
                }
            }
        }
        if self.token.is_none() {
            self.token = Some(self.login(&mut conn, upstream, service).await?);
            fresh_login = true;
        }
        loop {
            let token = self
                .token
                .as_ref()
                .map(|t| Zeroizing::new(t.expose().to_owned()))
                .unwrap_or_default();
            let mut reader = sync::Reader {
                conn: &mut conn,
                token: &token,
                mount: &settings.mount,
                fresh_token: fresh_login,
                token_alive: false,
            };
            match sync::run(&mut reader, settings, service).await {
                // A token the upstream no longer takes (revoked, expired early): once more
                // with a new login.
                Err(UpstreamError::Refused { .. }) if !fresh_login => {
                    self.token = Some(self.login(&mut conn, upstream, service).await?);
                    fresh_login = true;
                }
                other => return other,
            }
        }
    }

    /// Log in, with its audit event either way.
    async fn login(
        &mut self,
        conn: &mut client::Connection,
        upstream: &Upstream,
        service: &Arc<Service>,
    ) -> Result<login::Token, UpstreamError> {
        let role = &upstream.settings.role;
        let result = login::login(conn, role).await;
        let detail = match &result {
            Ok(t) => format!(
                "ok: role {role} with key {}, token ttl {}",
                upstream.settings.key,
                t.ttl()
                    .map_or_else(|| "unlimited".to_owned(), |d| format!("{}s", d.as_secs()))
            ),
            Err(e) => format!(
                "failed: role {role} with key {}: {e}",
                upstream.settings.key
            ),
        };
        audit_event(service, "upstream-login", &detail).await;
        result
    }
}

impl UpstreamError {
    /// The node failed rather than the request: it can't be reached, broke the connection, or
    /// answered a server error (sealed, no leader). Another node of the cluster may serve.
    fn node_failed(&self) -> bool {
        matches!(
            self,
            Self::Connect(_) | Self::Timeout(_) | Self::Http(_) | Self::Unavailable(_)
        )
    }
}

/// Connect to the cluster: the node that answered last, else each next one in turn (every
/// node once). A node that fails is logged and skipped; the last failure is the error.
async fn connect(
    upstream: &Upstream,
    key: client::DeviceKey,
) -> Result<client::Connection, UpstreamError> {
    let settings = &upstream.settings;
    let first = upstream.state().server;
    let mut failed = None;
    for i in 0..settings.servers.len() {
        let at = (first + i) % settings.servers.len();
        let server = &settings.servers[at];
        match client::Client::new(settings, server, key.clone())?
            .connect()
            .await
        {
            Ok(conn) => {
                upstream.state().server = at;
                return Ok(conn);
            }
            Err(e) if e.node_failed() => {
                tracing::warn!(server = %server.address, "upstream: {e}");
                failed = Some(e);
            }
            Err(e) => return Err(e),
        }
    }
    Err(failed
        .unwrap_or_else(|| UpstreamError::Identity("upstream.address names no server".into())))
}

/// Write one upstream event to the audit log (names and versions only, never a value).
async fn audit_event(service: &Service, event: &str, detail: &str) {
    if let Err(e) = service.audit().event(event, detail).await {
        tracing::error!("audit log: {e}");
    }
}
