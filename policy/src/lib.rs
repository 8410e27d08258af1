//! The access policy: who may do what to which secret or key. Default deny.
//!
//! This module owns the policy file (TOML: `[[rule]]` tables of `who` × `allow` × name globs, and
//! `[[credential]]` tables mapping a unit's `LoadCredential=` id to a secret) and the pure
//! decision function [`decide`]. It must not do I/O when deciding: user and group names are
//! resolved to ids once, when the file loads, so [`decide`] reads no files, asks no NSS and reads
//! no clock. It knows nothing of transports, the store or devices: `keywardd` asks it with a
//! [`Subject`] it filled from the kernel (peer credentials, `/proc`, the cgroup), and
//! `keyward policy check` asks it offline with a subject named on its command line, through
//! [`Policy::explain`], which says why each rule did or did not apply.
//!
//! It must never widen access to make a file load: every table denies unknown fields, and a rule
//! that could not match or grants nothing is an error, not a warning.
//!
//! Rules are numbered from 1 in file order; load errors and [`Decision::Allow`] use that number.

use std::fmt;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use keyward_proto::names::SecretName;
use serde::Deserialize;

/// Largest policy file accepted, in bytes.
pub const MAX_POLICY_SIZE: u64 = 1 << 20;

/// What a caller wants to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// `GetSecret`, `ListSecrets`, `SecretVersions`: matched against `secrets`.
    Read,
    /// `PutSecret`, `DeleteSecret`: matched against `secrets`.
    Write,
    /// `Sign`, `PublicKey`: matched against `keys`.
    Sign,
    /// `CreateKey`, `DeleteKey`, `ListKeys`: matched against `keys`.
    Keys,
    /// Vault operations (init, enroll, keyslots, rekey, rotate, seal, unseal, creating and
    /// rotating transit keys) on [`Resource::Vault`].
    Admin,
    /// `Encrypt` under a transit key: matched against `transit`.
    Encrypt,
    /// `Decrypt` with a transit key: matched against `transit`.
    Decrypt,
}

impl Action {
    /// Every action, in the order the policy file documents them.
    pub const ALL: [Action; 7] = [
        Self::Read,
        Self::Write,
        Self::Sign,
        Self::Keys,
        Self::Admin,
        Self::Encrypt,
        Self::Decrypt,
    ];

    /// The name used in the policy file.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Write => "write",
            Self::Sign => "sign",
            Self::Keys => "keys",
            Self::Admin => "admin",
            Self::Encrypt => "encrypt",
            Self::Decrypt => "decrypt",
        }
    }

    fn bit(self) -> u8 {
        match self {
            Self::Read => 1,
            Self::Write => 2,
            Self::Sign => 4,
            Self::Keys => 8,
            Self::Admin => 16,
            Self::Encrypt => 32,
            Self::Decrypt => 64,
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A name that is not an [`Action`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown action {0:?}: expected one of read, write, sign, keys, admin, encrypt, decrypt")]
pub struct UnknownAction(pub String);

impl FromStr for Action {
    type Err = UnknownAction;

    fn from_str(s: &str) -> Result<Self, UnknownAction> {
        Self::ALL
            .into_iter()
            .find(|a| a.as_str() == s)
            .ok_or_else(|| UnknownAction(s.to_owned()))
    }
}

/// What an action is done to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resource<'a> {
    /// A secret by name (for [`Action::Read`] and [`Action::Write`]).
    Secret(&'a str),
    /// A signing key by name (for [`Action::Sign`] and [`Action::Keys`]).
    Key(&'a str),
    /// The vault itself (for [`Action::Admin`]).
    Vault,
    /// A transit key by name (for [`Action::Encrypt`] and [`Action::Decrypt`]).
    Transit(&'a str),
}

/// Who asks: what the kernel vouches for about the calling process. Borrowed, so that the
/// daemon asks per request without copying its caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Subject<'a> {
    /// Effective uid.
    pub uid: u32,
    /// Effective primary gid.
    pub gid: u32,
    /// Supplementary groups.
    pub groups: &'a [u32],
    /// The caller's systemd (system) unit, when it has one.
    pub unit: Option<&'a str>,
}

/// The outcome of [`decide`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Allowed by the rule with this number (1-based, in file order).
    Allow {
        /// The rule's number, for the audit log.
        rule: usize,
    },
    /// No rule allows it.
    Deny,
}

impl Decision {
    /// True for [`Decision::Allow`].
    pub fn is_allowed(self) -> bool {
        matches!(self, Self::Allow { .. })
    }
}

/// A policy that could not be loaded. Messages name the rule (1-based) and what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The file could not be opened or read.
    #[error("cannot read policy {path}: {source}")]
    Read {
        /// The policy file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file (or its directory) could be changed by someone who must not write policy.
    #[error("refusing policy {path}: {reason}")]
    Insecure {
        /// The policy file.
        path: PathBuf,
        /// What is unsafe about it and how to fix it.
        reason: String,
    },
    /// Not valid TOML, an unknown field, a missing field or a value of the wrong type.
    #[error("{origin}: {source}")]
    Parse {
        /// The file, or `policy` when parsed from text.
        origin: String,
        /// The parser's message (with line and column).
        source: toml::de::Error,
    },
    /// Well-formed, but inconsistent (an unknown action, an empty `who`, an unknown user, ...).
    #[error("{origin}: {reason}")]
    Invalid {
        /// The file, or `policy` when parsed from text.
        origin: String,
        /// What is wrong, naming the rule.
        reason: String,
    },
}

/// A name glob: `*` matches any run of characters (including `/`), `?` exactly one character,
/// everything else itself.
#[derive(Clone, PartialEq, Eq)]
struct Glob {
    pattern: Vec<char>,
}

impl fmt::Debug for Glob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text: String = self.pattern.iter().collect();
        write!(f, "{text:?}")
    }
}

impl Glob {
    fn new(pattern: &str) -> Self {
        Self {
            pattern: pattern.chars().collect(),
        }
    }

    /// Iterative matching with one backtrack point (the last `*`): O(pattern × text) at worst,
    /// never exponential.
    fn matches(&self, text: &str) -> bool {
        let p = &self.pattern;
        let mut pi = 0; // index into the pattern (chars)
        let mut ti = 0; // byte index into the text
                        // After the last `*` seen: where the pattern resumes, and where in the text the star's
                        // match currently ends.
        let mut star: Option<(usize, usize)> = None;
        while let Some(c) = text[ti..].chars().next() {
            match p.get(pi) {
                Some('*') => {
                    pi += 1;
                    star = Some((pi, ti));
                }
                Some(&pc) if pc == '?' || pc == c => {
                    pi += 1;
                    ti += c.len_utf8();
                }
                _ => match star {
                    // Let the last star eat one more character and retry from there.
                    Some((resume, end)) => {
                        let eaten = text[end..].chars().next().map_or(1, char::len_utf8);
                        star = Some((resume, end + eaten));
                        pi = resume;
                        ti = end + eaten;
                    }
                    None => return false,
                },
            }
        }
        p[pi..].iter().all(|&c| c == '*')
    }
}

/// The caller conditions of a rule; every condition given must hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Who {
    uid: Option<u32>,
    /// `user = "name"`, resolved at load: (name, uid).
    user: Option<(String, u32)>,
    gid: Option<u32>,
    /// `group = "name"`, resolved at load: (name, gid).
    group: Option<(String, u32)>,
    unit: Option<String>,
}

impl Who {
    fn matches(&self, caller: Subject<'_>) -> bool {
        let in_group = |gid: u32| caller.gid == gid || caller.groups.contains(&gid);
        self.uid.is_none_or(|uid| caller.uid == uid)
            && self.user.as_ref().is_none_or(|(_, uid)| caller.uid == *uid)
            && self.gid.is_none_or(in_group)
            && self.group.as_ref().is_none_or(|(_, gid)| in_group(*gid))
            && self
                .unit
                .as_ref()
                .is_none_or(|unit| caller.unit == Some(unit.as_str()))
    }

    /// The first condition `caller` fails, said for a person; `None` when all hold.
    fn mismatch(&self, caller: Subject<'_>) -> Option<String> {
        let in_group = |gid: u32| caller.gid == gid || caller.groups.contains(&gid);
        if let Some(uid) = self.uid.filter(|&uid| caller.uid != uid) {
            return Some(format!("needs uid {uid}, the caller is uid {}", caller.uid));
        }
        if let Some((name, uid)) = self.user.as_ref().filter(|(_, uid)| caller.uid != *uid) {
            return Some(format!(
                "needs user {name:?} (uid {uid}), the caller is uid {}",
                caller.uid
            ));
        }
        if let Some(gid) = self.gid.filter(|&gid| !in_group(gid)) {
            return Some(format!("needs gid {gid}, the caller is not in it"));
        }
        if let Some((name, gid)) = self.group.as_ref().filter(|(_, gid)| !in_group(*gid)) {
            return Some(format!(
                "needs group {name:?} (gid {gid}), the caller is not in it"
            ));
        }
        match (&self.unit, caller.unit) {
            (Some(want), Some(have)) if want != have => {
                Some(format!("needs unit {want:?}, the caller runs in {have:?}"))
            }
            (Some(want), None) => Some(format!(
                "needs unit {want:?}, the caller runs in no system unit"
            )),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Rule {
    who: Who,
    /// Bit set of [`Action::bit`].
    allow: u8,
    secrets: Vec<Glob>,
    keys: Vec<Glob>,
    transit: Vec<Glob>,
}

impl Rule {
    fn allows(&self, action: Action) -> bool {
        self.allow & action.bit() != 0
    }

    /// Does the rule's name list cover `resource` for `action`? A mismatched pair (reading a
    /// key, administering a secret) is never covered.
    fn covers(&self, action: Action, resource: Resource<'_>) -> bool {
        match (action, resource) {
            (Action::Read | Action::Write, Resource::Secret(name)) => {
                self.secrets.iter().any(|g| g.matches(name))
            }
            (Action::Sign | Action::Keys, Resource::Key(name)) => {
                self.keys.iter().any(|g| g.matches(name))
            }
            (Action::Encrypt | Action::Decrypt, Resource::Transit(name)) => {
                self.transit.iter().any(|g| g.matches(name))
            }
            (Action::Admin, Resource::Vault) => true,
            _ => false,
        }
    }

    /// The rule in one line, as the file says it (names resolved at load shown with their ids).
    fn describe(&self) -> String {
        let mut who = Vec::new();
        if let Some(uid) = self.who.uid {
            who.push(format!("uid {uid}"));
        }
        if let Some((name, uid)) = &self.who.user {
            who.push(format!("user {name:?} (uid {uid})"));
        }
        if let Some(gid) = self.who.gid {
            who.push(format!("gid {gid}"));
        }
        if let Some((name, gid)) = &self.who.group {
            who.push(format!("group {name:?} (gid {gid})"));
        }
        if let Some(unit) = &self.who.unit {
            who.push(format!("unit {unit:?}"));
        }
        let allow: Vec<&str> = Action::ALL
            .into_iter()
            .filter(|a| self.allows(*a))
            .map(Action::as_str)
            .collect();
        let mut line = format!("{} may {}", who.join(" and "), allow.join(", "));
        if !self.secrets.is_empty() {
            line.push_str(&format!(" secrets {:?}", self.secrets));
        }
        if !self.keys.is_empty() {
            line.push_str(&format!(" keys {:?}", self.keys));
        }
        if !self.transit.is_empty() {
            line.push_str(&format!(" transit keys {:?}", self.transit));
        }
        line
    }

    /// Why the rule does not allow the request, said for a person; `None` when it does.
    /// Agrees with [`decide`], which asks the same questions without building sentences.
    fn refusal(
        &self,
        caller: Subject<'_>,
        action: Action,
        resource: Resource<'_>,
    ) -> Option<String> {
        if !self.allows(action) {
            let granted: Vec<&str> = Action::ALL
                .into_iter()
                .filter(|a| self.allows(*a))
                .map(Action::as_str)
                .collect();
            return Some(format!("allows {}, not {action}", granted.join(", ")));
        }
        if let Some(why) = self.who.mismatch(caller) {
            return Some(why);
        }
        if self.covers(action, resource) {
            return None;
        }
        let list = |globs: &[Glob]| {
            globs
                .iter()
                .map(|g| format!("{g:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        Some(match (action, resource) {
            (Action::Read | Action::Write, Resource::Secret(name)) => {
                format!(
                    "secret {name:?} matches none of its secrets [{}]",
                    list(&self.secrets)
                )
            }
            (Action::Sign | Action::Keys, Resource::Key(name)) => {
                format!(
                    "key {name:?} matches none of its keys [{}]",
                    list(&self.keys)
                )
            }
            (Action::Encrypt | Action::Decrypt, Resource::Transit(name)) => {
                format!(
                    "transit key {name:?} matches none of its transit keys [{}]",
                    list(&self.transit)
                )
            }
            (Action::Admin, _) => "admin applies to the vault, not to a secret or key".to_owned(),
            (Action::Read | Action::Write, _) => format!("{action} applies to a secret"),
            (Action::Sign | Action::Keys, _) => format!("{action} applies to a key"),
            (Action::Encrypt | Action::Decrypt, _) => {
                format!("{action} applies to a transit key")
            }
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct CredentialMap {
    unit: String,
    id: String,
    secret: SecretName,
}

/// A loaded, checked policy. Build one with [`Policy::load`], [`Policy::from_toml`] or
/// [`Policy::deny_all`]; ask it with [`decide`] and [`credential_secret`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    rules: Vec<Rule>,
    credentials: Vec<CredentialMap>,
}

// The file's shape. Every table denies unknown fields: a typo must not silently widen or
// narrow access.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default)]
    rule: Vec<RuleSpec>,
    #[serde(default)]
    credential: Vec<CredentialSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleSpec {
    who: WhoSpec,
    allow: Vec<String>,
    #[serde(default)]
    secrets: Option<Vec<String>>,
    #[serde(default)]
    keys: Option<Vec<String>>,
    /// Transit key names (globs), for `encrypt` and `decrypt`.
    #[serde(default)]
    transit: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WhoSpec {
    #[serde(default)]
    uid: Option<u32>,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    gid: Option<u32>,
    #[serde(default)]
    group: Option<String>,
    #[serde(default)]
    unit: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CredentialSpec {
    unit: String,
    id: String,
    secret: String,
}

/// Name resolution at load time. The real one asks NSS; tests use a table.
trait Resolver {
    fn uid_of(&self, user: &str) -> Result<Option<u32>, String>;
    fn gid_of(&self, group: &str) -> Result<Option<u32>, String>;
}

struct Nss;

impl Resolver for Nss {
    fn uid_of(&self, user: &str) -> Result<Option<u32>, String> {
        nix::unistd::User::from_name(user)
            .map(|u| u.map(|u| u.uid.as_raw()))
            .map_err(|e| e.to_string())
    }

    fn gid_of(&self, group: &str) -> Result<Option<u32>, String> {
        nix::unistd::Group::from_name(group)
            .map(|g| g.map(|g| g.gid.as_raw()))
            .map_err(|e| e.to_string())
    }
}

impl Policy {
    /// The empty policy: every request is denied.
    pub fn deny_all() -> Self {
        Self::default()
    }

    /// Parse and check a policy. User and group names are resolved to ids now (NSS), so that
    /// deciding never needs a lookup; a later rename in `/etc/passwd` takes effect on reload.
    ///
    /// # Errors
    /// [`PolicyError::Parse`] for bad TOML, an unknown or missing field; [`PolicyError::Invalid`]
    /// for an unknown action, an empty `who`, an unknown user or group, a rule granting
    /// `read`/`write` without `secrets` or `sign`/`keys` without `keys`, an empty glob, or a
    /// credential mapped twice.
    pub fn from_toml(text: &str) -> Result<Self, PolicyError> {
        Self::parse(text, "policy", &Nss)
    }

    /// Load the policy file at `path`, after checking that only root or the daemon's own user
    /// can change it: the file must be a regular file owned by root or by the daemon's uid, not
    /// writable by group or others, in a directory that group and others can't write to
    /// (unless the directory is sticky).
    ///
    /// # Errors
    /// [`PolicyError::Read`] when it can't be read, [`PolicyError::Insecure`] for the
    /// ownership and mode rules above or a file over [`MAX_POLICY_SIZE`], and as
    /// [`Policy::from_toml`].
    pub fn load(path: &Path) -> Result<Self, PolicyError> {
        Self::load_as(path, nix::unistd::geteuid().as_raw())
    }

    /// [`Policy::load`] for a daemon running as `daemon_uid` (so that `keyward policy check`,
    /// run by an admin, judges the file as keywardd will).
    ///
    /// # Errors
    /// As [`Policy::load`].
    pub fn load_as(path: &Path, daemon_uid: u32) -> Result<Self, PolicyError> {
        let read_err = |source| PolicyError::Read {
            path: path.to_owned(),
            source,
        };
        let insecure = |reason: String| PolicyError::Insecure {
            path: path.to_owned(),
            reason,
        };
        let mut file = std::fs::File::open(path).map_err(read_err)?;
        // Check the file we opened, not the path again (no window to swap it in between).
        let meta = file.metadata().map_err(read_err)?;
        check_file_meta(&meta, daemon_uid).map_err(insecure)?;
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
            _ => PathBuf::from("."),
        };
        let dir_meta = std::fs::metadata(&dir).map_err(read_err)?;
        check_dir_meta(&dir_meta, &dir).map_err(insecure)?;
        let mut text = String::new();
        file.by_ref()
            .take(MAX_POLICY_SIZE + 1)
            .read_to_string(&mut text)
            .map_err(read_err)?;
        if text.len() as u64 > MAX_POLICY_SIZE {
            return Err(insecure(format!("larger than {MAX_POLICY_SIZE} bytes")));
        }
        Self::parse(&text, &path.display().to_string(), &Nss)
    }

    fn parse(text: &str, origin: &str, names: &dyn Resolver) -> Result<Self, PolicyError> {
        let file: PolicyFile = toml::from_str(text).map_err(|source| PolicyError::Parse {
            origin: origin.to_owned(),
            source,
        })?;
        let invalid = |reason: String| PolicyError::Invalid {
            origin: origin.to_owned(),
            reason,
        };
        let mut rules = Vec::with_capacity(file.rule.len());
        for (i, spec) in file.rule.into_iter().enumerate() {
            rules.push(check_rule(i + 1, spec, names).map_err(invalid)?);
        }
        let mut credentials: Vec<CredentialMap> = Vec::with_capacity(file.credential.len());
        for (i, c) in file.credential.into_iter().enumerate() {
            let n = i + 1;
            if c.unit.is_empty() || c.id.is_empty() || c.secret.is_empty() {
                return Err(invalid(format!(
                    "credential {n}: unit, id and secret must not be empty"
                )));
            }
            check_unit_name(&c.unit).map_err(|why| invalid(format!("credential {n}: {why}")))?;
            if let Some(prev) = credentials
                .iter()
                .position(|m| m.unit == c.unit && m.id == c.id)
            {
                return Err(invalid(format!(
                    "credential {n}: unit {:?} id {:?} is already mapped by credential {}",
                    c.unit,
                    c.id,
                    prev + 1
                )));
            }
            let secret = SecretName::try_from(c.secret)
                .map_err(|e| invalid(format!("credential {n}: secret: {e}")))?;
            credentials.push(CredentialMap {
                unit: c.unit,
                id: c.id,
                secret,
            });
        }
        Ok(Self { rules, credentials })
    }

    /// Number of `[[rule]]` tables.
    pub fn rule_count(&self) -> usize {
        self.rules.len()
    }

    /// Number of `[[credential]]` mappings.
    pub fn credential_count(&self) -> usize {
        self.credentials.len()
    }
}

fn check_file_meta(meta: &std::fs::Metadata, own_uid: u32) -> Result<(), String> {
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    if meta.uid() != 0 && meta.uid() != own_uid {
        return Err(format!(
            "owned by uid {}, not by root or the daemon's uid {own_uid}: \
             whoever owns it can grant themselves access (chown root:root)",
            meta.uid()
        ));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(format!(
            "mode {mode:04o} lets group or others write it, and so grant themselves access \
             (chmod go-w)"
        ));
    }
    Ok(())
}

fn check_dir_meta(meta: &std::fs::Metadata, dir: &Path) -> Result<(), String> {
    let mode = meta.mode() & 0o7777;
    let sticky = mode & 0o1000 != 0;
    if mode & 0o022 != 0 && !sticky {
        return Err(format!(
            "its directory {} (mode {mode:04o}) lets group or others replace the file \
             (chmod go-w on the directory)",
            dir.display()
        ));
    }
    Ok(())
}

/// A systemd unit name has a type suffix (`postgresql.service`); without one it is a typo that
/// would never match.
fn check_unit_name(unit: &str) -> Result<(), String> {
    const TYPES: [&str; 11] = [
        ".service",
        ".socket",
        ".scope",
        ".slice",
        ".mount",
        ".automount",
        ".swap",
        ".timer",
        ".path",
        ".target",
        ".device",
    ];
    if TYPES
        .iter()
        .any(|t| unit.len() > t.len() && unit.ends_with(t))
    {
        Ok(())
    } else {
        Err(format!(
            "unit {unit:?} has no unit type suffix: write the full name, e.g. \"{unit}.service\""
        ))
    }
}

fn check_globs(n: usize, field: &str, globs: Option<Vec<String>>) -> Result<Vec<Glob>, String> {
    let globs = globs.unwrap_or_default();
    if globs.iter().any(String::is_empty) {
        return Err(format!(
            "rule {n}: an empty pattern in `{field}` matches nothing"
        ));
    }
    Ok(globs.iter().map(|g| Glob::new(g)).collect())
}

fn check_rule(n: usize, spec: RuleSpec, names: &dyn Resolver) -> Result<Rule, String> {
    let w = spec.who;
    if w.uid.is_none()
        && w.user.is_none()
        && w.gid.is_none()
        && w.group.is_none()
        && w.unit.is_none()
    {
        return Err(format!(
            "rule {n}: `who` is empty: give at least one of uid, user, gid, group, unit"
        ));
    }
    let user = match w.user {
        Some(name) => match names.uid_of(&name) {
            Ok(Some(uid)) => Some((name, uid)),
            Ok(None) => return Err(format!("rule {n}: unknown user {name:?}")),
            Err(e) => return Err(format!("rule {n}: cannot look up user {name:?}: {e}")),
        },
        None => None,
    };
    let group = match w.group {
        Some(name) => match names.gid_of(&name) {
            Ok(Some(gid)) => Some((name, gid)),
            Ok(None) => return Err(format!("rule {n}: unknown group {name:?}")),
            Err(e) => return Err(format!("rule {n}: cannot look up group {name:?}: {e}")),
        },
        None => None,
    };
    if let Some(unit) = &w.unit {
        check_unit_name(unit).map_err(|why| format!("rule {n}: {why}"))?;
    }
    if spec.allow.is_empty() {
        return Err(format!(
            "rule {n}: `allow` is empty, so the rule grants nothing"
        ));
    }
    let mut allow = 0u8;
    for name in &spec.allow {
        let action: Action = name.parse().map_err(|e| format!("rule {n}: {e}"))?;
        allow |= action.bit();
    }
    let secrets = check_globs(n, "secrets", spec.secrets)?;
    let keys = check_globs(n, "keys", spec.keys)?;
    let transit = check_globs(n, "transit", spec.transit)?;
    for action in Action::ALL {
        if allow & action.bit() == 0 {
            continue;
        }
        let (missing, field, example) = match action {
            Action::Read | Action::Write => (secrets.is_empty(), "secrets", "secrets = [\"db/*\"]"),
            Action::Sign | Action::Keys => (keys.is_empty(), "keys", "keys = [\"release-*\"]"),
            Action::Encrypt | Action::Decrypt => {
                (transit.is_empty(), "transit", "transit = [\"bao-unseal\"]")
            }
            Action::Admin => (false, "", ""),
        };
        if missing {
            return Err(format!(
                "rule {n} allows {action} but has no `{field}` list: say which, e.g. {example}"
            ));
        }
    }
    Ok(Rule {
        who: Who {
            uid: w.uid,
            user,
            gid: w.gid,
            group,
            unit: w.unit,
        },
        allow,
        secrets,
        keys,
        transit,
    })
}

/// May `caller` do `action` to `resource`? The first rule (in file order) that allows it wins;
/// without one, [`Decision::Deny`]. Pure: no I/O, no clock.
///
/// [`Action::Read`]/[`Action::Write`] need a [`Resource::Secret`] matching the rule's `secrets`,
/// [`Action::Sign`]/[`Action::Keys`] a [`Resource::Key`] matching its `keys`, and
/// [`Action::Encrypt`]/[`Action::Decrypt`] a [`Resource::Transit`] matching its `transit`, and
/// [`Action::Admin`] [`Resource::Vault`]; any other pairing is denied.
pub fn decide(
    policy: &Policy,
    caller: Subject<'_>,
    action: Action,
    resource: Resource<'_>,
) -> Decision {
    policy
        .rules
        .iter()
        .position(|rule| {
            rule.allows(action) && rule.who.matches(caller) && rule.covers(action, resource)
        })
        .map_or(Decision::Deny, |i| Decision::Allow { rule: i + 1 })
}

/// [`decide`], with the reasons: what each rule made of the request, in file order, up to the one
/// that decides. For people (`keyward policy check`), not for the request path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Explanation {
    /// The same answer [`decide`] gives.
    pub decision: Decision,
    /// `(rule number, why it does not apply)` for every rule before the deciding one (all of
    /// them when the request is denied).
    pub passed_over: Vec<(usize, String)>,
}

impl Policy {
    /// Explain [`decide`]'s answer for this request.
    pub fn explain(
        &self,
        caller: Subject<'_>,
        action: Action,
        resource: Resource<'_>,
    ) -> Explanation {
        let mut passed_over = Vec::new();
        for (i, rule) in self.rules.iter().enumerate() {
            match rule.refusal(caller, action, resource) {
                None => {
                    return Explanation {
                        decision: Decision::Allow { rule: i + 1 },
                        passed_over,
                    }
                }
                Some(why) => passed_over.push((i + 1, why)),
            }
        }
        Explanation {
            decision: Decision::Deny,
            passed_over,
        }
    }

    /// The rules as the file states them, one line each, numbered from 1 (for `policy check`).
    pub fn describe_rules(&self) -> Vec<String> {
        self.rules.iter().map(Rule::describe).collect()
    }

    /// The `[[credential]]` mappings as `(unit, id, secret)`, in file order.
    pub fn credentials(&self) -> impl Iterator<Item = (&str, &str, &str)> {
        self.credentials
            .iter()
            .map(|m| (m.unit.as_str(), m.id.as_str(), m.secret.as_str()))
    }
}

/// The secret that unit `unit` gets for its `LoadCredential=` id `id`, if the policy maps one.
/// Whether to trust the unit name is the credential transport's business (only from uid 0).
pub fn credential_secret<'p>(policy: &'p Policy, unit: &str, id: &str) -> Option<&'p SecretName> {
    policy
        .credentials
        .iter()
        .find(|m| m.unit == unit && m.id == id)
        .map(|m| &m.secret)
}

/// An owned [`Subject`]: what the daemon keeps of a caller the kernel identified, and what
/// `keyward policy check` and tests build by hand.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Identity {
    /// Effective uid.
    pub uid: u32,
    /// Effective primary gid.
    pub gid: u32,
    /// Supplementary groups.
    pub groups: Vec<u32>,
    /// The systemd (system) unit, if any.
    pub unit: Option<String>,
}

impl Identity {
    /// Borrow it to ask [`decide`] or [`Policy::explain`].
    pub fn subject(&self) -> Subject<'_> {
        Subject {
            uid: self.uid,
            gid: self.gid,
            groups: &self.groups,
            unit: self.unit.as_deref(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::os::unix::fs::PermissionsExt;

    /// A fixed name table, so tests don't depend on the machine's users and groups.
    struct Names(HashMap<&'static str, u32>, HashMap<&'static str, u32>);

    impl Resolver for Names {
        fn uid_of(&self, user: &str) -> Result<Option<u32>, String> {
            Ok(self.0.get(user).copied())
        }
        fn gid_of(&self, group: &str) -> Result<Option<u32>, String> {
            Ok(self.1.get(group).copied())
        }
    }

    fn names() -> Names {
        Names(
            HashMap::from([("root", 0), ("alice", 1000), ("deploy", 1001)]),
            HashMap::from([("deployers", 2000), ("keyward-readers", 2001)]),
        )
    }

    fn parse(text: &str) -> Result<Policy, PolicyError> {
        Policy::parse(text, "policy", &names())
    }

    const EXAMPLE: &str = r#"
        # Admins: init, enroll, keyslots, rekey, rotate, seal, unseal.
        [[rule]]
        who = { uid = 0 }
        allow = ["admin", "read", "write", "sign", "keys"]
        secrets = ["*"]
        keys = ["*"]

        [[rule]]
        who = { unit = "postgresql.service" }
        allow = ["read"]
        secrets = ["db/*"]

        [[rule]]
        who = { group = "deployers" }
        allow = ["sign"]
        keys = ["release-*"]

        [[rule]]
        who = { user = "alice", gid = 2001 }
        allow = ["read", "write"]
        secrets = ["alice/??/*", "shared/config"]

        [[rule]]
        who = { uid = 1001, unit = "deploy.service" }
        allow = ["keys", "sign"]
        keys = ["ci-*"]

        [[credential]]
        unit = "postgresql.service"
        id = "db-pass"
        secret = "db/password"
    "#;

    fn caller(uid: u32, gid: u32, groups: &[u32], unit: Option<&str>) -> Identity {
        Identity {
            uid,
            gid,
            groups: groups.to_vec(),
            unit: unit.map(str::to_owned),
        }
    }

    #[test]
    fn decision_table() {
        use Action::*;
        use Resource::*;
        let p = parse(EXAMPLE).unwrap();
        let root = caller(0, 0, &[], None);
        let pg = caller(105, 105, &[], Some("postgresql.service"));
        let nobody = caller(65534, 65534, &[], None);
        let deployer_supp = caller(1500, 1500, &[27, 2000], None);
        let deployer_primary = caller(1501, 2000, &[], None);
        let alice_reader = caller(1000, 1000, &[2001], None);
        let alice_plain = caller(1000, 1000, &[], None);
        let deploy_in_unit = caller(1001, 1001, &[], Some("deploy.service"));
        let deploy_elsewhere = caller(1001, 1001, &[], Some("session-3.scope"));
        let other_in_deploy_unit = caller(1002, 1002, &[], Some("deploy.service"));

        let allow = |rule| Decision::Allow { rule };
        let deny = Decision::Deny;
        #[rustfmt::skip]
        let table: &[(&str, &Identity, Action, Resource<'_>, Decision)] = &[
            ("root admin", &root, Admin, Vault, allow(1)),
            ("root reads anything", &root, Read, Secret("x/y/z"), allow(1)),
            ("root signs", &root, Sign, Key("anything"), allow(1)),
            ("pg reads db/*", &pg, Read, Secret("db/password"), allow(2)),
            ("pg: * crosses /", &pg, Read, Secret("db/replica/password"), allow(2)),
            ("pg: db alone isn't db/*", &pg, Read, Secret("db"), deny),
            ("pg: prefix is literal", &pg, Read, Secret("dbx/password"), deny),
            ("pg can't write", &pg, Write, Secret("db/password"), deny),
            ("pg can't admin", &pg, Admin, Vault, deny),
            ("nobody reads", &nobody, Read, Secret("db/password"), deny),
            ("nobody signs", &nobody, Sign, Key("release-1"), deny),
            ("nobody admin", &nobody, Admin, Vault, deny),
            ("supplementary group signs", &deployer_supp, Sign, Key("release-2025"), allow(3)),
            ("primary group signs", &deployer_primary, Sign, Key("release-"), allow(3)),
            ("group: glob holds", &deployer_supp, Sign, Key("debug-1"), deny),
            ("group: sign isn't keys", &deployer_supp, Keys, Key("release-1"), deny),
            ("group: sign isn't read", &deployer_supp, Read, Secret("release-1"), deny),
            ("user+gid both hold", &alice_reader, Read, Secret("alice/ab/c/d"), allow(4)),
            ("? is one char", &alice_reader, Read, Secret("alice/abc/d"), deny),
            ("? is one char (short)", &alice_reader, Read, Secret("alice/a/d"), deny),
            ("literal pattern", &alice_reader, Write, Secret("shared/config"), allow(4)),
            ("literal pattern exact", &alice_reader, Write, Secret("shared/config2"), deny),
            ("user without gid", &alice_plain, Read, Secret("alice/ab/c"), deny),
            ("uid+unit both hold", &deploy_in_unit, Keys, Key("ci-build"), allow(5)),
            ("uid, wrong unit", &deploy_elsewhere, Keys, Key("ci-build"), deny),
            ("unit, wrong uid", &other_in_deploy_unit, Sign, Key("ci-build"), deny),
            ("action/resource mismatch", &root, Read, Key("k"), deny),
            ("admin needs the vault", &root, Admin, Secret("x"), deny),
        ];
        for (what, who, action, resource, want) in table {
            assert_eq!(
                decide(&p, who.subject(), *action, *resource),
                *want,
                "{what}"
            );
        }
    }

    #[test]
    fn explain_names_the_deciding_rule_and_why_the_others_pass() {
        let p = parse(EXAMPLE).unwrap();
        let pg = caller(105, 105, &[], Some("postgresql.service"));
        let e = p.explain(pg.subject(), Action::Read, Resource::Secret("db/password"));
        assert_eq!(e.decision, Decision::Allow { rule: 2 });
        assert_eq!(
            e.passed_over,
            [(1, "needs uid 0, the caller is uid 105".to_owned())]
        );

        let e = p.explain(pg.subject(), Action::Write, Resource::Secret("db/password"));
        assert_eq!(e.decision, Decision::Deny);
        let why: Vec<&str> = e.passed_over.iter().map(|(_, w)| w.as_str()).collect();
        assert_eq!(
            why,
            [
                "needs uid 0, the caller is uid 105",
                "allows read, not write",
                "allows sign, not write",
                "needs user \"alice\" (uid 1000), the caller is uid 105",
                "allows sign, keys, not write",
            ]
        );

        let elsewhere = caller(1001, 1001, &[], Some("session-3.scope"));
        let e = p.explain(elsewhere.subject(), Action::Keys, Resource::Key("ci-1"));
        assert_eq!(e.decision, Decision::Deny);
        assert_eq!(
            e.passed_over[4].1,
            "needs unit \"deploy.service\", the caller runs in \"session-3.scope\""
        );
        let deployer = caller(1500, 1500, &[2000], None);
        let e = p.explain(deployer.subject(), Action::Sign, Resource::Key("debug-1"));
        assert_eq!(
            e.passed_over[2].1,
            "key \"debug-1\" matches none of its keys [\"release-*\"]"
        );
        let e = p.explain(
            deployer.subject(),
            Action::Sign,
            Resource::Secret("release-1"),
        );
        assert_eq!(e.passed_over[2].1, "sign applies to a key");
        assert_eq!(
            p.describe_rules()[3],
            "user \"alice\" (uid 1000) and gid 2001 may read, write \
             secrets [\"alice/??/*\", \"shared/config\"]"
        );
    }

    #[test]
    fn default_deny() {
        let root = caller(0, 0, &[], None);
        for p in [Policy::deny_all(), parse("").unwrap()] {
            for action in Action::ALL {
                for r in [
                    Resource::Secret("a"),
                    Resource::Key("a"),
                    Resource::Transit("a"),
                    Resource::Vault,
                ] {
                    assert_eq!(decide(&p, root.subject(), action, r), Decision::Deny);
                }
            }
        }
    }

    /// Transit keys are a resource of their own: `encrypt`/`decrypt` on `transit` globs, and
    /// nothing else reaches them (nor do those actions reach secrets or signing keys).
    #[test]
    fn transit_keys_are_their_own_resource() {
        let p = parse(
            r#"
            [[rule]]
            who = { uid = 998 }
            allow = ["encrypt"]
            transit = ["bao-*"]
            [[rule]]
            who = { uid = 999 }
            allow = ["encrypt", "decrypt", "read", "sign"]
            transit = ["bao-unseal"]
            secrets = ["*"]
            keys = ["*"]
            "#,
        )
        .unwrap();
        let bao = caller(998, 998, &[], None);
        let app = caller(999, 999, &[], None);
        let allowed = |c: &Identity, a, r| decide(&p, c.subject(), a, r) != Decision::Deny;
        assert!(allowed(&bao, Action::Encrypt, Resource::Transit("bao-1")));
        assert!(!allowed(&bao, Action::Decrypt, Resource::Transit("bao-1")));
        assert!(!allowed(&bao, Action::Encrypt, Resource::Transit("app")));
        assert!(allowed(
            &app,
            Action::Decrypt,
            Resource::Transit("bao-unseal")
        ));
        assert!(!allowed(&app, Action::Decrypt, Resource::Transit("bao-1")));
        // `secrets = ["*"]` and `keys = ["*"]` say nothing about transit keys, and `transit`
        // nothing about secrets or keys.
        assert!(!allowed(
            &app,
            Action::Read,
            Resource::Transit("bao-unseal")
        ));
        assert!(!allowed(
            &app,
            Action::Sign,
            Resource::Transit("bao-unseal")
        ));
        assert!(!allowed(&bao, Action::Encrypt, Resource::Secret("bao-1")));
        assert!(!allowed(&bao, Action::Encrypt, Resource::Key("bao-1")));
        let e = p.explain(bao.subject(), Action::Encrypt, Resource::Transit("app"));
        assert_eq!(
            e.passed_over[0].1,
            "transit key \"app\" matches none of its transit keys [\"bao-*\"]"
        );
        // A rule that grants encrypt must say which transit keys.
        let e = parse("[[rule]]\nwho = { uid = 1 }\nallow = [\"decrypt\"]\n").unwrap_err();
        assert!(e.to_string().contains("no `transit` list"), "{e}");
    }

    #[test]
    fn first_matching_rule_wins() {
        let p = parse(
            r#"
            [[rule]]
            who = { uid = 5 }
            allow = ["read"]
            secrets = ["a/*"]
            [[rule]]
            who = { gid = 5 }
            allow = ["read", "write"]
            secrets = ["*"]
            "#,
        )
        .unwrap();
        let c = caller(5, 5, &[], None);
        assert_eq!(
            decide(&p, c.subject(), Action::Read, Resource::Secret("a/b")),
            Decision::Allow { rule: 1 }
        );
        assert_eq!(
            decide(&p, c.subject(), Action::Write, Resource::Secret("a/b")),
            Decision::Allow { rule: 2 }
        );
    }

    #[test]
    fn credentials_map() {
        let p = parse(EXAMPLE).unwrap();
        assert_eq!(
            credential_secret(&p, "postgresql.service", "db-pass").map(|s| s.as_str()),
            Some("db/password")
        );
        assert_eq!(credential_secret(&p, "postgresql.service", "other"), None);
        assert_eq!(credential_secret(&p, "nginx.service", "db-pass"), None);
        // A secret no request could name is refused when the policy is loaded, not when a
        // unit starts.
        let bad = "[[credential]]\nunit = \"a.service\"\nid = \"x\"\nsecret = \"../etc\"\n";
        let e = parse(bad).unwrap_err().to_string();
        assert!(
            e.contains("credential 1: secret: '.' and '..' are not names"),
            "{e}"
        );
        assert_eq!(p.rule_count(), 5);
        assert_eq!(p.credential_count(), 1);
    }

    #[test]
    fn glob_table() {
        #[rustfmt::skip]
        let table: &[(&str, &str, bool)] = &[
            ("*", "", true),
            ("*", "a/b/c", true),
            ("", "", true),
            ("", "a", false),
            ("abc", "abc", true),
            ("abc", "abd", false),
            ("abc", "ab", false),
            ("ab", "abc", false),
            ("?", "a", true),
            ("?", "", false),
            ("?", "ab", false),
            ("?", "é", true),
            ("a?c", "a/c", true),
            ("db/*", "db/", true),
            ("db/*", "db/x/y", true),
            ("db/*", "db", false),
            ("*/password", "a/b/password", true),
            ("*/password", "password", false),
            ("a*b*c", "abc", true),
            ("a*b*c", "aXbYc", true),
            ("a*b*c", "aXbY", false),
            ("a*b*c", "acb", false),
            ("a*b", "abab", true),
            ("a*ab", "aab", true),
            ("*a", "bbba", true),
            ("*a", "bbbab", false),
            ("**", "x", true),
            ("*?", "", false),
            ("*?", "x", true),
            ("x*", "x", true),
            ("*.*", "a.b.c", true),
            ("release-*", "release-1.2", true),
            ("release-*", "Release-1", false),
        ];
        for (pattern, text, want) in table {
            assert_eq!(
                Glob::new(pattern).matches(text),
                *want,
                "{pattern:?} vs {text:?}"
            );
        }
    }

    #[test]
    fn glob_is_not_exponential() {
        let pattern = format!("{}b", "a*".repeat(30));
        let text = "a".repeat(5000);
        // Backtracking matchers take ages here; this one is O(pattern × text).
        assert!(!Glob::new(&pattern).matches(&text));
    }

    fn invalid(text: &str) -> String {
        match parse(text) {
            Err(e @ (PolicyError::Invalid { .. } | PolicyError::Parse { .. })) => e.to_string(),
            other => panic!("expected a load error, got {other:?}"),
        }
    }

    #[test]
    fn load_errors() {
        let e = invalid("[[rule]]\nwho = { uid = 0 }\nallow = [\"raed\"]\nsecrets = [\"*\"]");
        assert!(
            e.contains("rule 1") && e.contains("unknown action \"raed\""),
            "{e}"
        );

        let e = invalid("[[rule]]\nwho = {}\nallow = [\"admin\"]");
        assert!(e.contains("rule 1") && e.contains("`who` is empty"), "{e}");

        let e = invalid("[[rule]]\nallow = [\"admin\"]");
        assert!(e.contains("missing field `who`"), "{e}");

        let e = invalid("[[rule]]\nwho = { uid = 0 }\nallow = [\"admin\"]\nsecret = [\"*\"]");
        assert!(e.contains("unknown field `secret`"), "{e}");

        let e = invalid("[[rule]]\nwho = { uid = 0, name = \"x\" }\nallow = [\"admin\"]");
        assert!(e.contains("unknown field `name`"), "{e}");

        let e = invalid("[[rules]]\nwho = { uid = 0 }\nallow = [\"admin\"]");
        assert!(e.contains("unknown field `rules`"), "{e}");

        let e = invalid(
            "[[rule]]\nwho = { uid = 0 }\nallow = [\"admin\"]\n\
             [[rule]]\nwho = { user = \"mallory\" }\nallow = [\"admin\"]",
        );
        assert!(e.contains("rule 2: unknown user \"mallory\""), "{e}");

        let e = invalid("[[rule]]\nwho = { group = \"nogrp\" }\nallow = [\"admin\"]");
        assert!(e.contains("rule 1: unknown group \"nogrp\""), "{e}");

        let e = invalid("[[rule]]\nwho = { uid = 7 }\nallow = [\"read\"]");
        assert!(e.contains("allows read but has no `secrets` list"), "{e}");

        let e = invalid("[[rule]]\nwho = { uid = 7 }\nallow = [\"write\"]\nsecrets = []");
        assert!(e.contains("allows write but has no `secrets` list"), "{e}");

        let e =
            invalid("[[rule]]\nwho = { uid = 7 }\nallow = [\"read\", \"sign\"]\nsecrets = [\"*\"]");
        assert!(e.contains("allows sign but has no `keys` list"), "{e}");

        let e = invalid("[[rule]]\nwho = { uid = 7 }\nallow = []");
        assert!(e.contains("grants nothing"), "{e}");

        let e = invalid("[[rule]]\nwho = { uid = 7 }\nallow = [\"read\"]\nsecrets = [\"\"]");
        assert!(e.contains("empty pattern"), "{e}");

        let e = invalid("[[rule]]\nwho = { unit = \"postgresql\" }\nallow = [\"admin\"]");
        assert!(e.contains("no unit type suffix"), "{e}");

        let e = invalid("[[rule]]\nwho = { uid = -1 }\nallow = [\"admin\"]");
        assert!(e.contains("line 2") && e.contains("expected u32"), "{e}");

        let e = invalid(
            "[[credential]]\nunit = \"a.service\"\nid = \"x\"\nsecret = \"s\"\n\
             [[credential]]\nunit = \"a.service\"\nid = \"x\"\nsecret = \"t\"",
        );
        assert!(
            e.contains("credential 2") && e.contains("credential 1"),
            "{e}"
        );

        let e = invalid("[[credential]]\nunit = \"a.service\"\nid = \"x\"");
        assert!(e.contains("missing field `secret`"), "{e}");
    }

    #[test]
    fn real_name_lookup() {
        // root and its group exist on every Linux system; the other name on none.
        let p = Policy::from_toml(
            "[[rule]]\nwho = { user = \"root\", group = \"root\" }\nallow = [\"admin\"]",
        )
        .unwrap();
        assert!(decide(
            &p,
            caller(0, 0, &[], None).subject(),
            Action::Admin,
            Resource::Vault
        )
        .is_allowed());
        let e = Policy::from_toml(
            "[[rule]]\nwho = { user = \"keyward-no-such-user-x9\" }\nallow = [\"admin\"]",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("rule 1: unknown user"), "{e}");
    }

    #[test]
    fn action_names_round_trip() {
        for a in Action::ALL {
            assert_eq!(a.as_str().parse::<Action>(), Ok(a));
            assert_eq!(a.to_string(), a.as_str());
        }
        assert!("Admin".parse::<Action>().is_err());
    }

    #[test]
    fn load_checks_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.toml");
        std::fs::write(
            &path,
            "[[rule]]\nwho = { user = \"root\" }\nallow = [\"admin\"]\n",
        )
        .unwrap();
        let set_mode = |p: &Path, mode| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap()
        };

        set_mode(&path, 0o644);
        assert_eq!(Policy::load(&path).unwrap().rule_count(), 1);

        for mode in [0o666, 0o646, 0o664, 0o620] {
            set_mode(&path, mode);
            let e = Policy::load(&path).unwrap_err();
            assert!(
                matches!(&e, PolicyError::Insecure { reason, .. } if reason.contains("lets group or others write")),
                "{mode:o}: {e}"
            );
        }
        set_mode(&path, 0o600);

        set_mode(dir.path(), 0o777);
        let e = Policy::load(&path).unwrap_err().to_string();
        assert!(e.contains("its directory"), "{e}");
        set_mode(dir.path(), 0o1777);
        Policy::load(&path).unwrap();
        set_mode(dir.path(), 0o700);

        let e = Policy::load(&dir.path().join("absent.toml")).unwrap_err();
        assert!(matches!(e, PolicyError::Read { .. }), "{e}");

        let e = Policy::load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");

        // Owned by someone else: only checkable when we may chown (as root).
        let me = nix::unistd::geteuid().as_raw();
        if me == 0 && std::os::unix::fs::chown(&path, Some(65534), None).is_ok() {
            let e = Policy::load(&path).unwrap_err().to_string();
            assert!(e.contains("owned by uid 65534"), "{e}");
        }
    }
}

/// Generated policies and inputs: rule sets written as TOML load to the rules they describe and
/// decide as a plain reading of them says; globs agree with a naive matcher; no input panics.
#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::collection::vec;
    use proptest::option::of;
    use proptest::prelude::*;

    /// A fixed name table: user and group names never depend on the machine.
    struct Table;

    const USERS: [(&str, u32); 2] = [("alice", 1000), ("deploy", 1001)];
    const GROUPS: [(&str, u32); 2] = [("wheel", 10), ("deployers", 2000)];

    impl Resolver for Table {
        fn uid_of(&self, user: &str) -> Result<Option<u32>, String> {
            Ok(USERS.iter().find(|(n, _)| *n == user).map(|(_, id)| *id))
        }
        fn gid_of(&self, group: &str) -> Result<Option<u32>, String> {
            Ok(GROUPS.iter().find(|(n, _)| *n == group).map(|(_, id)| *id))
        }
    }

    /// The naive definition of a glob match (exponential, fine for short inputs).
    fn naive(p: &[char], t: &[char]) -> bool {
        match p.split_first() {
            None => t.is_empty(),
            Some(('*', rest)) => naive(rest, t) || (!t.is_empty() && naive(p, &t[1..])),
            Some(('?', rest)) => !t.is_empty() && naive(rest, &t[1..]),
            Some((c, rest)) => t.first() == Some(c) && naive(rest, &t[1..]),
        }
    }

    /// One rule as generated: every field the file can hold, within the rules of `check_rule`.
    #[derive(Clone, Debug)]
    struct GenRule {
        uid: Option<u32>,
        user: Option<&'static str>,
        gid: Option<u32>,
        group: Option<&'static str>,
        unit: Option<&'static str>,
        allow: Vec<Action>,
        secrets: Vec<String>,
        keys: Vec<String>,
        transit: Vec<String>,
    }

    impl GenRule {
        fn toml(&self) -> String {
            let mut who = Vec::new();
            if let Some(uid) = self.uid {
                who.push(format!("uid = {uid}"));
            }
            if let Some(user) = self.user {
                who.push(format!("user = {user:?}"));
            }
            if let Some(gid) = self.gid {
                who.push(format!("gid = {gid}"));
            }
            if let Some(group) = self.group {
                who.push(format!("group = {group:?}"));
            }
            if let Some(unit) = self.unit {
                who.push(format!("unit = {unit:?}"));
            }
            let allow: Vec<&str> = self.allow.iter().map(|a| a.as_str()).collect();
            let mut text = format!(
                "[[rule]]\nwho = {{ {} }}\nallow = {allow:?}\n",
                who.join(", ")
            );
            if !self.secrets.is_empty() {
                text.push_str(&format!("secrets = {:?}\n", self.secrets));
            }
            if !self.keys.is_empty() {
                text.push_str(&format!("keys = {:?}\n", self.keys));
            }
            if !self.transit.is_empty() {
                text.push_str(&format!("transit = {:?}\n", self.transit));
            }
            text
        }

        /// The rule read the plain way.
        fn allows(&self, caller: &Identity, action: Action, resource: Resource<'_>) -> bool {
            let id = |name: &str, table: &[(&str, u32)]| {
                table.iter().find(|(n, _)| *n == name).map(|(_, id)| *id)
            };
            let in_group = |gid: u32| caller.gid == gid || caller.groups.contains(&gid);
            let who = self.uid.is_none_or(|u| caller.uid == u)
                && self.user.is_none_or(|u| id(u, &USERS) == Some(caller.uid))
                && self.gid.is_none_or(in_group)
                && self
                    .group
                    .is_none_or(|g| id(g, &GROUPS).is_some_and(in_group))
                && self.unit.is_none_or(|u| caller.unit.as_deref() == Some(u));
            let covers = |globs: &[String], name: &str| {
                let name: Vec<char> = name.chars().collect();
                globs
                    .iter()
                    .any(|g| naive(&g.chars().collect::<Vec<_>>(), &name))
            };
            let what = match (action, resource) {
                (Action::Read | Action::Write, Resource::Secret(s)) => covers(&self.secrets, s),
                (Action::Sign | Action::Keys, Resource::Key(k)) => covers(&self.keys, k),
                (Action::Encrypt | Action::Decrypt, Resource::Transit(k)) => {
                    covers(&self.transit, k)
                }
                (Action::Admin, Resource::Vault) => true,
                _ => false,
            };
            who && what && self.allow.contains(&action)
        }
    }

    fn glob() -> impl Strategy<Value = String> {
        "[ab/*?é]{1,6}"
    }

    fn rule() -> impl Strategy<Value = GenRule> {
        let who = (
            of(proptest::sample::select(vec![0u32, 1000, 1001, 5])),
            of(proptest::sample::select(USERS.map(|(n, _)| n).to_vec())),
            of(proptest::sample::select(vec![0u32, 10, 2000])),
            of(proptest::sample::select(GROUPS.map(|(n, _)| n).to_vec())),
            of(proptest::sample::select(vec!["a.service", "b.socket"])),
        )
            .prop_filter("who is not empty", |w| {
                w.0.is_some() || w.1.is_some() || w.2.is_some() || w.3.is_some() || w.4.is_some()
            });
        (
            who,
            proptest::sample::subsequence(Action::ALL.to_vec(), 1..=Action::ALL.len()),
            vec(glob(), 0..3),
            vec(glob(), 0..3),
            vec(glob(), 0..3),
        )
            .prop_filter_map(
                "secrets and keys where the actions need them",
                |((uid, user, gid, group, unit), allow, secrets, keys, transit)| {
                    let needs_secrets = allow
                        .iter()
                        .any(|a| matches!(a, Action::Read | Action::Write));
                    let needs_keys = allow
                        .iter()
                        .any(|a| matches!(a, Action::Sign | Action::Keys));
                    let needs_transit = allow
                        .iter()
                        .any(|a| matches!(a, Action::Encrypt | Action::Decrypt));
                    ((!needs_secrets || !secrets.is_empty())
                        && (!needs_keys || !keys.is_empty())
                        && (!needs_transit || !transit.is_empty()))
                    .then_some(GenRule {
                        uid,
                        user,
                        gid,
                        group,
                        unit,
                        allow,
                        secrets,
                        keys,
                        transit,
                    })
                },
            )
    }

    fn caller() -> impl Strategy<Value = Identity> {
        (
            proptest::sample::select(vec![0u32, 1000, 1001, 5]),
            proptest::sample::select(vec![0u32, 10, 2000, 7]),
            proptest::sample::subsequence(vec![10u32, 2000, 7], 0..=3),
            of(proptest::sample::select(vec![
                "a.service",
                "b.socket",
                "c.service",
            ])),
        )
            .prop_map(|(uid, gid, groups, unit)| Identity {
                uid,
                gid,
                groups,
                unit: unit.map(str::to_owned),
            })
    }

    /// A request: an action and a name; the resource kind follows from both.
    fn query() -> impl Strategy<Value = (Action, u8, String)> {
        (
            proptest::sample::select(Action::ALL.to_vec()),
            0u8..4,
            "[ab/é]{0,6}",
        )
    }

    fn resource(kind: u8, name: &str) -> Resource<'_> {
        match kind {
            0 => Resource::Secret(name),
            1 => Resource::Key(name),
            2 => Resource::Transit(name),
            _ => Resource::Vault,
        }
    }

    proptest! {
        #[test]
        fn glob_agrees_with_the_naive_matcher(p in "[ab*?/é]{0,8}", t in "[ab/é]{0,10}") {
            let pattern: Vec<char> = p.chars().collect();
            let text: Vec<char> = t.chars().collect();
            prop_assert_eq!(Glob::new(&p).matches(&t), naive(&pattern, &text));
        }

        #[test]
        fn generated_rule_sets_load_and_decide_as_written(
            rules in vec(rule(), 0..6),
            queries in vec((caller(), query()), 1..24),
        ) {
            let text: String = rules.iter().map(GenRule::toml).collect::<Vec<_>>().join("\n");
            let policy = Policy::parse(&text, "policy", &Table)
                .map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
            prop_assert_eq!(policy.rule_count(), rules.len());
            for (caller, (action, kind, name)) in &queries {
                let resource = resource(*kind, name);
                let expect = rules
                    .iter()
                    .position(|r| r.allows(caller, *action, resource))
                    .map_or(Decision::Deny, |i| Decision::Allow { rule: i + 1 });
                prop_assert_eq!(
                    decide(&policy, caller.subject(), *action, resource),
                    expect,
                    "{:?} {:?} {:?}\n{}", caller, action, resource, text
                );
                // The explanation agrees with the decision, and passes over every rule before
                // the deciding one with a reason.
                let explained = policy.explain(caller.subject(), *action, resource);
                prop_assert_eq!(explained.decision, expect);
                let before = match expect {
                    Decision::Allow { rule } => rule - 1,
                    Decision::Deny => rules.len(),
                };
                let numbers: Vec<usize> = explained.passed_over.iter().map(|(n, _)| *n).collect();
                prop_assert_eq!(numbers, (1..=before).collect::<Vec<_>>());
            }
        }

        #[test]
        fn credential_maps_load_and_answer_for_exactly_their_pairs(
            maps in vec(
                (
                    proptest::sample::select(vec!["a.service", "b.service", "c.mount"]),
                    "[a-z-]{1,4}",
                    "[a-z]{1,4}(/[a-z]{1,3})?",
                ),
                0..6,
            ),
            ask in ("[abc]\\.(service|mount)", "[a-z-]{1,4}"),
        ) {
            let text: String = maps
                .iter()
                .map(|(unit, id, secret)| {
                    format!("[[credential]]\nunit = {unit:?}\nid = {id:?}\nsecret = {secret:?}\n")
                })
                .collect();
            let first = |unit: &str, id: &str| {
                maps.iter().position(|(u, i, _)| *u == unit && i == id)
            };
            let duplicated = maps
                .iter()
                .enumerate()
                .any(|(n, (unit, id, _))| first(unit, id) != Some(n));
            match Policy::parse(&text, "policy", &Table) {
                Ok(policy) => {
                    prop_assert!(!duplicated, "a pair mapped twice was accepted\n{}", text);
                    prop_assert_eq!(policy.credential_count(), maps.len());
                    for (unit, id, secret) in &maps {
                        prop_assert_eq!(credential_secret(&policy, unit, id).map(|s| s.as_str()), Some(secret.as_str()));
                    }
                    let (unit, id) = &ask;
                    let expect = first(unit, id).map(|n| maps[n].2.as_str());
                    prop_assert_eq!(credential_secret(&policy, unit, id).map(|s| s.as_str()), expect);
                }
                Err(e) => {
                    prop_assert!(duplicated, "{}\n{}", e, text);
                    prop_assert!(e.to_string().contains("already mapped"), "{}", e);
                }
            }
        }

        #[test]
        fn arbitrary_text_never_panics(text in "\\PC{0,200}") {
            let _ = Policy::parse(&text, "policy", &Table);
        }

        /// Policy-shaped text with the pieces shuffled and mangled.
        #[test]
        fn policy_shaped_text_never_panics(
            lines in vec(
                prop_oneof![
                    Just("[[rule]]".to_owned()),
                    Just("[[credential]]".to_owned()),
                    Just("[rule]".to_owned()),
                    "who = \\{ (uid|gid|user|group|unit|x) = (0|-1|4294967296|\"alice\"|\"a.service\"|\\[\\]) \\}",
                    "allow = \\[(\"(read|write|sign|keys|admin|root)\",? ?){0,3}\\]",
                    "(secrets|keys) = \\[(\"[a*?]{0,3}\",? ?){0,3}\\]",
                    "(unit|id|secret) = \"[a-z.]{0,10}\"",
                    "[a-z =\\[\\]{}\",]{0,20}",
                ],
                0..12,
            ),
        ) {
            let text = lines.join("\n");
            if let Ok(policy) = Policy::parse(&text, "policy", &Table) {
                // Whatever loads can be asked anything.
                let root = Subject { uid: 0, gid: 0, groups: &[], unit: None };
                for action in Action::ALL {
                    let _ = decide(&policy, root, action, Resource::Secret("a"));
                    let _ = decide(&policy, root, action, Resource::Key("a"));
                    let _ = decide(&policy, root, action, Resource::Vault);
                    let _ = decide(&policy, root, action, Resource::Transit("a"));
                }
            }
        }
    }
}
