//! One sync: every mapping's KV v2 secrets read from the upstream and, where the upstream
//! version is not the one last written here, written into the local vault as a new version of
//! the mapped secret together with the record of that upstream version (one transaction).
//!
//! What the upstream deleted or destroyed follows `on_remote_delete` (keep the last good value
//! and say so, or remove it). A failure never removes a local secret: a mapping that can't be
//! read or written is a problem of its own (in [`Outcome::problems`]), the others go on. This
//! module must not log or audit a value (the audit events name secrets, paths and versions
//! only) or keep a body beyond the call that read it.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use hyper::{Method, StatusCode};
use keyward_proto::api::{SecretName, SecretValue};
use serde::Deserialize;
use serde_json::value::RawValue;
use zeroize::Zeroizing;

use super::client::{Answer, Connection};
use super::UpstreamError;
use crate::config::{OnRemoteDelete, UpstreamMapping, UpstreamSettings};
use crate::service::Service;

/// Most secrets a prefix mapping may bring (a bound on a listing the upstream controls).
const MAX_LISTED: usize = 10_000;
/// Deepest folder nesting followed under a prefix.
const MAX_DEPTH: usize = 16;

/// What one sync did.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Secrets that got a new version: `(secret, local version, remote path, remote version)`.
    pub changed: Vec<(String, u64, String, u64)>,
    /// Secrets already at the upstream's version.
    pub unchanged: usize,
    /// Secrets the upstream deleted: `(secret, what was done)`.
    pub deleted: Vec<(String, String)>,
    /// Mappings that could not be brought in step, and why.
    pub problems: Vec<String>,
}

/// A KV v2 read, borrowed from the (zeroizing) body: the value stays raw until it is copied
/// into zeroizing memory.
#[derive(Deserialize)]
struct KvRead<'a> {
    #[serde(borrow)]
    data: Option<KvData<'a>>,
}

#[derive(Deserialize)]
struct KvData<'a> {
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
    metadata: Option<KvMetadata>,
}

#[derive(Deserialize)]
struct KvMetadata {
    version: u64,
    #[serde(default)]
    deletion_time: String,
    #[serde(default)]
    destroyed: bool,
}

#[derive(Deserialize)]
struct KvList {
    data: Option<KvKeys>,
}

#[derive(Deserialize)]
struct KvKeys {
    #[serde(default)]
    keys: Vec<String>,
}

/// A secret as the upstream has it.
enum Remote {
    Value { version: u64, value: SecretValue },
    Deleted { version: u64 },
}

/// The requests of one sync, on one connection, with one token.
pub struct Reader<'a> {
    pub conn: &'a mut Connection,
    pub token: &'a str,
    pub mount: &'a str,
    /// The token is from a login of this sync: a refusal now is the upstream's policy on that
    /// path (OpenBao answers 403 to both), a problem of the mapping rather than of the token.
    pub fresh_token: bool,
    /// The upstream said, in this sync, that it still takes the token (`lookup-self`): a
    /// refusal is then its policy too. Starts `false`.
    pub token_alive: bool,
}

impl std::fmt::Debug for Reader<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reader")
            .field("mount", &self.mount)
            .finish_non_exhaustive()
    }
}

impl Reader<'_> {
    /// `e` ends the sync: the connection failed, or the token may be what was refused.
    fn fatal(&self, e: &UpstreamError) -> bool {
        match e {
            UpstreamError::Http(_) | UpstreamError::Timeout(_) | UpstreamError::Unavailable(_) => {
                true
            }
            UpstreamError::Refused { .. } => !self.fresh_token && !self.token_alive,
            _ => false,
        }
    }

    async fn get(&mut self, path: &str) -> Result<Answer, UpstreamError> {
        let answer = self
            .conn
            .call(Method::GET, path, Some(self.token), None)
            .await?;
        if super::login::token_refused(answer.status) {
            // A token the upstream still takes was refused by its policy: a problem of this
            // path only, and no reason for a new login. Asked once per sync (and not for a
            // token just given): a token that dies during the sync fails the next one.
            if !self.fresh_token && !self.token_alive {
                self.token_alive = match super::login::token_alive(self.conn, self.token).await {
                    Ok(alive) => alive,
                    Err(e @ (UpstreamError::Http(_) | UpstreamError::Timeout(_))) => return Err(e),
                    // An answer that says neither: as before, a new login will tell.
                    Err(e) => {
                        tracing::info!("upstream: {e}");
                        false
                    }
                };
            }
            return Err(UpstreamError::Refused {
                what: "a read",
                why: answer.errors(),
            });
        }
        Ok(answer)
    }

    /// Every secret path under `prefix` (which ends with `/`), folders followed.
    async fn list(&mut self, prefix: &str) -> Result<Vec<String>, UpstreamError> {
        let mut found = Vec::new();
        let mut folders = vec![(prefix.to_owned(), 0)];
        while let Some((folder, depth)) = folders.pop() {
            let answer = self
                .get(&format!("/v1/{}/metadata/{folder}?list=true", self.mount))
                .await?;
            if answer.status == StatusCode::NOT_FOUND {
                continue;
            }
            if !answer.status.is_success() {
                return Err(UpstreamError::Refused {
                    what: "a listing",
                    why: answer.errors(),
                });
            }
            let list: KvList = serde_json::from_slice(&answer.body)
                .map_err(|e| UpstreamError::Response(format!("listing {folder}: {e}")))?;
            for key in list.data.map(|d| d.keys).unwrap_or_default() {
                let path = format!("{folder}{key}");
                if key.ends_with('/') {
                    if depth < MAX_DEPTH {
                        folders.push((path, depth + 1));
                    }
                } else if found.len() < MAX_LISTED {
                    found.push(path);
                } else {
                    return Err(UpstreamError::Response(format!(
                        "more than {MAX_LISTED} secrets under {prefix}"
                    )));
                }
            }
        }
        found.sort();
        Ok(found)
    }

    /// The secret at `path` (`None`: there is none), its `field` or, without one, its whole
    /// data object as JSON.
    async fn read(
        &mut self,
        path: &str,
        field: Option<&str>,
    ) -> Result<Option<Remote>, UpstreamError> {
        let answer = self.get(&format!("/v1/{}/data/{path}", self.mount)).await?;
        parse_read(&answer, path, field)
    }
}

/// What a KV v2 read answered: the value (its `field`, or the whole data object as JSON), a
/// deleted or destroyed latest version, or nothing at that path.
fn parse_read(
    answer: &Answer,
    path: &str,
    field: Option<&str>,
) -> Result<Option<Remote>, UpstreamError> {
    if answer.status != StatusCode::NOT_FOUND && !answer.status.is_success() {
        return Err(UpstreamError::Refused {
            what: "a read",
            why: answer.errors(),
        });
    }
    // A deleted or destroyed latest version is a 404 that still carries its metadata.
    let read: KvRead<'_> = match serde_json::from_slice(&answer.body) {
        Ok(read) => read,
        Err(_) if answer.status == StatusCode::NOT_FOUND => return Ok(None),
        Err(e) => return Err(UpstreamError::Response(format!("reading {path}: {e}"))),
    };
    let Some(KvData {
        data,
        metadata: Some(meta),
    }) = read.data
    else {
        return Ok(None);
    };
    let data = data.filter(|d| d.get() != "null");
    let Some(data) = data.filter(|_| !meta.destroyed && meta.deletion_time.is_empty()) else {
        return Ok(Some(Remote::Deleted {
            version: meta.version,
        }));
    };
    let value = match field {
        None => SecretValue::new(data.get().as_bytes().to_vec()),
        Some(field) => {
            let fields: HashMap<String, &RawValue> = serde_json::from_str(data.get())
                .map_err(|e| UpstreamError::Response(format!("reading {path}: {e}")))?;
            let raw = fields
                .get(field)
                .ok_or_else(|| UpstreamError::Response(format!("{path} has no field {field:?}")))?;
            let text: Zeroizing<String> = serde_json::from_str(raw.get()).map_err(|_| {
                UpstreamError::Response(format!("field {field:?} of {path} is not a string"))
            })?;
            SecretValue::new(text.as_bytes().to_vec())
        }
    };
    Ok(Some(Remote::Value {
        version: meta.version,
        value,
    }))
}

/// A remote version next to the one synced here from the same path.
#[derive(Debug, PartialEq, Eq)]
enum Versus {
    /// Nothing synced yet, or the upstream moved on: write it.
    Newer,
    /// Already here.
    Same,
    /// Older than what was synced (the version given): a node that lags behind the one it
    /// was synced from (a standby serving reads from its replica). Never written: a value
    /// never steps back.
    Older(u64),
}

fn versus(synced: Option<u64>, version: u64) -> Versus {
    match synced {
        Some(s) if s == version => Versus::Same,
        Some(s) if s > version => Versus::Older(s),
        _ => Versus::Newer,
    }
}

/// The `(remote path, local name)` pairs of one mapping.
async fn targets(
    reader: &mut Reader<'_>,
    mapping: &UpstreamMapping,
) -> Result<Vec<(String, String)>, UpstreamError> {
    if !mapping.is_prefix() {
        return Ok(vec![(mapping.remote.clone(), mapping.secret.clone())]);
    }
    Ok(reader
        .list(&mapping.remote)
        .await?
        .into_iter()
        .filter_map(|path| {
            let rest = path.strip_prefix(&mapping.remote)?.to_owned();
            Some((path, format!("{}{rest}", mapping.secret)))
        })
        .collect())
}

/// Bring every mapping in step. An error is returned only when the connection failed or the
/// upstream refused a token that was not fresh (the caller logs in again and retries);
/// everything else is a problem of the mapping, in [`Outcome::problems`].
///
/// # Errors
/// [`UpstreamError::Refused`] for a refused token, a failed connection.
pub async fn run(
    reader: &mut Reader<'_>,
    settings: &UpstreamSettings,
    service: &Arc<Service>,
) -> Result<Outcome, UpstreamError> {
    let vault = service.vault();
    let known: BTreeMap<String, (String, u64, Option<String>)> = vault
        .synced_secrets()
        .await
        .map_err(|e| UpstreamError::Local(e.to_string()))?
        .into_iter()
        .map(|r| (r.secret, (r.remote, r.remote_version, r.note)))
        .collect();
    let mut outcome = Outcome::default();
    for mapping in &settings.mappings {
        let pairs = match targets(reader, mapping).await {
            Ok(pairs) => pairs,
            Err(e) if reader.fatal(&e) => return Err(e),
            Err(e) => {
                outcome.problems.push(format!("{}: {e}", mapping.remote));
                continue;
            }
        };
        for (remote, local) in pairs {
            let name = match SecretName::try_from(local.clone()) {
                Ok(name) => name,
                Err(e) => {
                    outcome
                        .problems
                        .push(format!("{remote}: local name {local:?}: {e}"));
                    continue;
                }
            };
            let found = match reader.read(&remote, mapping.field.as_deref()).await {
                Ok(found) => found,
                Err(e) if reader.fatal(&e) => return Err(e),
                Err(e) => {
                    outcome.problems.push(format!("{remote}: {e}"));
                    continue;
                }
            };
            let synced = known
                .get(&local)
                .filter(|(r, _, _)| *r == remote)
                .map(|(_, v, _)| *v);
            match found {
                None => outcome.problems.push(format!(
                    "{remote}: not found upstream; {local} left as it is"
                )),
                Some(Remote::Value { version, value }) => {
                    match versus(synced, version) {
                        Versus::Same => {
                            outcome.unchanged += 1;
                            continue;
                        }
                        Versus::Older(s) => {
                            outcome.problems.push(format!(
                                "{remote}: the node answered version {version}, older than version {s} synced here; {local} left as it is"
                            ));
                            continue;
                        }
                        Versus::Newer => {}
                    }
                    match vault
                        .put_synced_secret(name, value, remote.clone(), version)
                        .await
                    {
                        Ok(local_version) => {
                            service.announce_change(&local, local_version);
                            // Audited as it happens, so a sync that fails later leaves no
                            // change unrecorded.
                            super::audit_event(
                                service,
                                "upstream-change",
                                &format!(
                                    "secret {local} version {local_version} from {}/{remote} version {version}",
                                    settings.mount
                                ),
                            )
                            .await;
                            outcome
                                .changed
                                .push((local, local_version, remote, version))
                        }
                        Err(e) => outcome.problems.push(format!("{remote} -> {local}: {e}")),
                    }
                }
                Some(Remote::Deleted { version }) => {
                    let done = match settings.on_remote_delete {
                        OnRemoteDelete::Keep => {
                            let note = format!(
                                "deleted upstream (version {version}): the last good value is kept"
                            );
                            // Said once, not at every sync.
                            if known
                                .get(&local)
                                .is_some_and(|k| k.2.as_ref() == Some(&note))
                            {
                                outcome.unchanged += 1;
                                continue;
                            }
                            if let Err(e) = vault
                                .note_synced_secret(local.clone(), Some(note.clone()))
                                .await
                            {
                                outcome.problems.push(format!("{local}: {e}"));
                            }
                            note
                        }
                        OnRemoteDelete::Remove => match vault.delete_secret(name).await {
                            Ok(()) => {
                                service.announce_change(&local, 0);
                                format!("deleted upstream (version {version}): removed here")
                            }
                            Err(crate::error::Error::NotFound { .. }) => {
                                format!("deleted upstream (version {version}): not here either")
                            }
                            Err(e) => {
                                outcome.problems.push(format!("{local}: {e}"));
                                continue;
                            }
                        },
                    };
                    tracing::warn!(secret = %local, "upstream: {done}");
                    super::audit_event(
                        service,
                        "upstream-deleted",
                        &format!("secret {local}: {done}"),
                    )
                    .await;
                    outcome.deleted.push((local, done));
                }
            }
        }
    }
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(status: u16, body: &str) -> Answer {
        Answer {
            status: StatusCode::from_u16(status).unwrap(),
            body: Zeroizing::new(body.as_bytes().to_vec()),
        }
    }

    fn value(r: Result<Option<Remote>, UpstreamError>) -> (u64, Vec<u8>) {
        match r {
            Ok(Some(Remote::Value { version, value })) => (version, value.expose().to_vec()),
            Ok(Some(Remote::Deleted { version })) => panic!("deleted at {version}"),
            Ok(None) => panic!("nothing"),
            Err(e) => panic!("{e}"),
        }
    }

    const LIVE: &str = r#"{"data":{"data":{"password":"p\"w","n":3},"metadata":{"version":4,"deletion_time":"","destroyed":false}}}"#;

    #[test]
    fn a_field_or_the_whole_object_is_the_value() {
        assert_eq!(
            value(parse_read(&answer(200, LIVE), "app/db", Some("password"))),
            (4, b"p\"w".to_vec())
        );
        assert_eq!(
            value(parse_read(&answer(200, LIVE), "app/db", None)),
            (4, br#"{"password":"p\"w","n":3}"#.to_vec())
        );
    }

    #[test]
    fn a_missing_or_non_string_field_is_an_error_that_names_no_value() {
        for (field, says) in [("user", "has no field"), ("n", "is not a string")] {
            let Err(e) = parse_read(&answer(200, LIVE), "app/db", Some(field)) else {
                panic!("{field}: no error");
            };
            let e = e.to_string();
            assert!(e.contains(says) && !e.contains("p\\\"w"), "{e}");
        }
    }

    #[test]
    fn a_version_older_than_the_one_synced_is_never_written() {
        assert_eq!(versus(None, 1), Versus::Newer);
        assert_eq!(versus(Some(2), 3), Versus::Newer);
        assert_eq!(versus(Some(3), 3), Versus::Same);
        assert_eq!(versus(Some(3), 2), Versus::Older(3));
    }

    #[test]
    fn deleted_destroyed_and_absent_are_told_apart() {
        let deleted = r#"{"data":{"data":null,"metadata":{"version":2,"deletion_time":"2026-12-04T18:33:13Z","destroyed":false}}}"#;
        let destroyed = r#"{"data":{"data":null,"metadata":{"version":5,"deletion_time":"","destroyed":true}}}"#;
        for (body, version) in [(deleted, 2), (destroyed, 5)] {
            assert!(matches!(
                parse_read(&answer(404, body), "app/db", None),
                Ok(Some(Remote::Deleted { version: v })) if v == version
            ));
        }
        assert!(matches!(
            parse_read(&answer(404, r#"{"errors":[]}"#), "app/db", None),
            Ok(None)
        ));
        assert!(matches!(
            parse_read(
                &answer(403, r#"{"errors":["permission denied"]}"#),
                "app/db",
                None
            ),
            Err(UpstreamError::Refused { .. })
        ));
    }
}
