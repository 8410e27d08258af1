//! `keyward policy check`: load a policy file the way keywardd will (owner and mode, syntax,
//! user and group names) and, for a caller named on the command line, say which rule decides a
//! request and why every earlier rule passed it over. Offline: no daemon is asked, nothing is
//! changed.
//!
//! The rules and the decision are `keyward_policy`'s, the very code keywardd runs; this file only
//! builds the caller from the command line and the system's user database, and prints.

use std::path::Path;

use keyward_policy::{Action, Decision, Explanation, Identity, Policy, Resource};
use nix::unistd::{Gid, Group, Uid, User};
use serde_json::json;

use super::commands::Out;
use super::{CliError, PolicyCheckArgs, PolicyCommand};

/// The user keywardd runs as in the shipped units (systemd/sysusers.d).
const DAEMON_USER: &str = "keyward";

/// Run a `policy` subcommand.
pub fn run(cmd: PolicyCommand, json: bool) -> Result<(), CliError> {
    match cmd {
        PolicyCommand::Check(args) => check(&args, json),
    }
}

/// A caller as the command line describes it, filled in from the user database.
#[derive(Debug)]
struct Caller {
    who: Identity,
    /// The user's name, when the uid has one (for the report only).
    name: Option<String>,
}

impl Caller {
    fn describe(&self) -> String {
        let who = &self.who;
        let mut text = format!("uid {}", who.uid);
        if let Some(name) = &self.name {
            text.push_str(&format!(" ({name})"));
        }
        text.push_str(&format!(" gid {}", who.gid));
        if !who.groups.is_empty() {
            let groups: Vec<String> = who.groups.iter().map(u32::to_string).collect();
            text.push_str(&format!(" groups {}", groups.join(",")));
        }
        match &who.unit {
            Some(unit) => text.push_str(&format!(" in {unit}")),
            None => text.push_str(" in no system unit"),
        }
        text
    }
}

fn lookup_failed(what: &str, e: nix::Error) -> CliError {
    CliError::Local(format!("cannot look up {what}: {e}"))
}

/// The uid keywardd runs as, to judge the file's owner as it will.
fn daemon_uid(name: Option<&str>) -> Result<u32, CliError> {
    match name {
        Some(name) => User::from_name(name)
            .map_err(|e| lookup_failed(&format!("user {name:?}"), e))?
            .map(|u| u.uid.as_raw())
            .ok_or_else(|| CliError::Usage(format!("--daemon-user: no user {name:?}"))),
        // Without the service user (a development machine), only root may own the file.
        None => Ok(User::from_name(DAEMON_USER)
            .ok()
            .flatten()
            .map_or(0, |u| u.uid.as_raw())),
    }
}

fn group_id(given: &str) -> Result<u32, CliError> {
    if let Ok(gid) = given.parse::<u32>() {
        return Ok(gid);
    }
    Group::from_name(given)
        .map_err(|e| lookup_failed(&format!("group {given:?}"), e))?
        .map(|g| g.gid.as_raw())
        .ok_or_else(|| CliError::Usage(format!("--group: no group {given:?}")))
}

fn caller(args: &PolicyCheckArgs) -> Result<Caller, CliError> {
    let user = match (&args.user, args.uid) {
        (Some(name), _) => Some(
            User::from_name(name)
                .map_err(|e| lookup_failed(&format!("user {name:?}"), e))?
                .ok_or_else(|| CliError::Usage(format!("--user: no user {name:?}")))?,
        ),
        (None, Some(uid)) => User::from_uid(Uid::from_raw(uid))
            .map_err(|e| lookup_failed(&format!("uid {uid}"), e))?,
        (None, None) => {
            return Err(CliError::Usage(
                "say who asks: --uid or --user (and --unit for a service)".into(),
            ))
        }
    };
    let uid = user
        .as_ref()
        .map_or(args.uid.unwrap_or_default(), |u| u.uid.as_raw());
    let gid = args
        .gid
        .or(user.as_ref().map(|u| u.gid.as_raw()))
        .unwrap_or(uid);
    // The groups a login of this user gets (what a service running as it gets, unless its unit
    // says otherwise: then name them with --group).
    let mut groups: Vec<u32> = match &user {
        Some(u) => {
            let name = std::ffi::CString::new(u.name.as_bytes())
                .map_err(|_| CliError::Usage(format!("user name {:?} has a NUL", u.name)))?;
            nix::unistd::getgrouplist(&name, Gid::from_raw(gid))
                .map_err(|e| lookup_failed(&format!("the groups of {:?}", u.name), e))?
                .into_iter()
                .map(Gid::as_raw)
                .filter(|g| *g != gid)
                .collect()
        }
        None => Vec::new(),
    };
    for given in &args.group {
        let g = group_id(given)?;
        if g != gid && !groups.contains(&g) {
            groups.push(g);
        }
    }
    Ok(Caller {
        who: Identity {
            uid,
            gid,
            groups,
            unit: args.unit.clone(),
        },
        name: user.map(|u| u.name),
    })
}

/// The resource an action applies to, from `--secret`/`--key`/`--transit`.
fn resource<'a>(action: Action, args: &'a PolicyCheckArgs) -> Result<Resource<'a>, CliError> {
    let named = (
        args.secret.as_deref(),
        args.key.as_deref(),
        args.transit.as_deref(),
    );
    match (action, named) {
        (Action::Admin, (None, None, None)) => Ok(Resource::Vault),
        (Action::Admin, _) => Err(CliError::Usage(
            "admin applies to the vault: give none of --secret, --key, --transit".into(),
        )),
        (Action::Read | Action::Write, (Some(name), None, None)) => Ok(Resource::Secret(name)),
        (Action::Sign | Action::Keys, (None, Some(name), None)) => Ok(Resource::Key(name)),
        (Action::Encrypt | Action::Decrypt, (None, None, Some(name))) => {
            Ok(Resource::Transit(name))
        }
        (Action::Read | Action::Write, _) => Err(CliError::Usage(format!(
            "{action} applies to a secret: give --secret NAME"
        ))),
        (Action::Sign | Action::Keys, _) => Err(CliError::Usage(format!(
            "{action} applies to a key: give --key NAME"
        ))),
        (Action::Encrypt | Action::Decrypt, _) => Err(CliError::Usage(format!(
            "{action} applies to a transit key: give --transit NAME"
        ))),
    }
}

fn request_text(action: Action, resource: Resource<'_>) -> String {
    match resource {
        Resource::Secret(name) => format!("{action} secret {name:?}"),
        Resource::Key(name) => format!("{action} key {name:?}"),
        Resource::Transit(name) => format!("{action} transit key {name:?}"),
        Resource::Vault => format!("{action} the vault"),
    }
}

fn load(args: &PolicyCheckArgs) -> Result<Policy, CliError> {
    let uid = daemon_uid(args.daemon_user.as_deref())?;
    Policy::load_as(&args.file, uid).map_err(CliError::PolicyInvalid)
}

fn check(args: &PolicyCheckArgs, json: bool) -> Result<(), CliError> {
    let policy = load(args)?;
    let Some(action) = args.action else {
        return summary(&args.file, &policy, json);
    };
    let caller = caller(args)?;
    let resource = resource(action, args)?;
    let request = request_text(action, resource);
    let explained = policy.explain(caller.who.subject(), action, resource);
    let doc = explanation_json(&args.file, &caller, &request, &explained);
    let text = explanation_text(&caller, &request, &explained);
    let out = Out { json };
    match explained.decision {
        Decision::Allow { .. } => out.emit(&doc, || text),
        Decision::Deny => {
            if !json {
                out.emit(&doc, || text)?;
            }
            Err(CliError::PolicyDenied {
                request: format!("{} to {request}", caller.describe()),
                explanation: doc,
            })
        }
    }
}

fn summary(file: &Path, policy: &Policy, json: bool) -> Result<(), CliError> {
    let rules = policy.describe_rules();
    let credentials: Vec<serde_json::Value> = policy
        .credentials()
        .map(|(unit, id, secret)| json!({ "unit": unit, "id": id, "secret": secret }))
        .collect();
    let mut text = format!(
        "{}: valid, {} rule(s), {} credential mapping(s)\n",
        file.display(),
        rules.len(),
        credentials.len()
    );
    for (i, rule) in rules.iter().enumerate() {
        text.push_str(&format!("  rule {}: {rule}\n", i + 1));
    }
    for (unit, id, secret) in policy.credentials() {
        text.push_str(&format!(
            "  credential {id:?} of {unit} is secret {secret:?}\n"
        ));
    }
    if rules.is_empty() {
        text.push_str("  no rule: every request but Status is denied\n");
    }
    let doc = json!({
        "policy": file,
        "valid": true,
        "rules": rules,
        "credentials": credentials,
    });
    Out { json }.emit(&doc, || text)
}

fn explanation_json(
    file: &Path,
    caller: &Caller,
    request: &str,
    explained: &Explanation,
) -> serde_json::Value {
    let passed_over: Vec<serde_json::Value> = explained
        .passed_over
        .iter()
        .map(|(rule, why)| json!({ "rule": rule, "why": why }))
        .collect();
    let (decision, rule) = match explained.decision {
        Decision::Allow { rule } => ("allow", Some(rule)),
        Decision::Deny => ("deny", None),
    };
    json!({
        "policy": file,
        "caller": {
            "uid": caller.who.uid,
            "user": caller.name,
            "gid": caller.who.gid,
            "groups": caller.who.groups,
            "unit": caller.who.unit,
        },
        "request": request,
        "decision": decision,
        "rule": rule,
        "passed_over": passed_over,
    })
}

fn explanation_text(caller: &Caller, request: &str, explained: &Explanation) -> String {
    let mut text = format!("{}: {request}\n", caller.describe());
    for (rule, why) in &explained.passed_over {
        text.push_str(&format!("  rule {rule}: no, {why}\n"));
    }
    match explained.decision {
        Decision::Allow { rule } => {
            text.push_str(&format!("  rule {rule}: yes\nallowed by rule {rule}\n"))
        }
        Decision::Deny => text.push_str("denied: no rule allows it (default deny)\n"),
    }
    text
}
