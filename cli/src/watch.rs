//! `keyward watch`: the daemon's `WatchSecrets` stream as one line per change, and, with
//! `--restart-unit`, `systemctl try-restart` of the named units after each change.
//!
//! It owns the check of unit names (only names systemd could have, so nothing else reaches
//! `systemctl`'s command line) and what happens when the watch falls behind. It prints names
//! and versions only: the stream carries no value. It must not restart anything but the units
//! it was given, nor run a shell.

use std::io::{self, Write as _};
use std::path::Path;
use std::process::Command;

use keyward::api::{methods, ApiError, ChangeKind, SecretChange, WatchSecretsParams};
use keyward::{Client, ClientError};

use super::commands::Out;
use super::{CliError, WatchArgs};

/// The unit types `systemctl try-restart` can act on by name.
const UNIT_SUFFIXES: &[&str] = &[
    "service",
    "socket",
    "target",
    "path",
    "timer",
    "mount",
    "automount",
    "swap",
    "slice",
    "scope",
    "device",
];

/// The longest unit name systemd takes.
const MAX_UNIT_NAME: usize = 255;

/// A unit name as systemd spells one (`name[@instance].type`, ASCII letters, digits and
/// `:-_.\@`), for clap.
///
/// # Errors
/// Says what is wrong with the name.
pub fn parse_unit(s: &str) -> Result<String, String> {
    let bad = |why: &str| Err(format!("{s:?} is not a systemd unit name: {why}"));
    if s.is_empty() || s.len() > MAX_UNIT_NAME {
        return bad("1 to 255 characters");
    }
    if s.starts_with(['-', '.', '@']) {
        return bad("it must start with a letter, digit or one of :_\\");
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b":-_.\\@".contains(&b))
    {
        return bad("only ASCII letters, digits and :-_.\\@");
    }
    if s.bytes().filter(|&b| b == b'@').count() > 1 {
        return bad("at most one @");
    }
    let Some((stem, suffix)) = s.rsplit_once('.') else {
        return bad("it needs a type, like .service");
    };
    if stem.is_empty() {
        return bad("no name before the type");
    }
    if !UNIT_SUFFIXES.contains(&suffix) {
        return bad(&format!("unknown type .{suffix}"));
    }
    Ok(s.to_owned())
}

/// `keyward watch`: until the daemon ends the watch or the connection is lost.
pub(crate) fn run(socket: &Path, out: &Out, args: &WatchArgs) -> Result<(), CliError> {
    let mut client = Client::connect(socket)?;
    // A watch waits for changes as long as they take.
    client.set_timeout(None)?;
    let params = WatchSecretsParams {
        names: (!args.names.is_empty()).then(|| args.names.clone()),
    };
    for reply in client.stream::<methods::WatchSecrets>(&params)? {
        let change = match reply {
            Ok(change) => change,
            Err(e @ ClientError::Api(ApiError::WatchOverflow { .. })) => {
                // Changes were missed: whatever they were, the units must see them.
                restart(&args.restart_units);
                return Err(e.into());
            }
            Err(e) => return Err(e.into()),
        };
        print(out, &change)?;
        if change.change != ChangeKind::Watching {
            restart(&args.restart_units);
        }
    }
    Ok(())
}

/// One line on stdout (the first, `watching`, reply only on stderr, as text).
fn print(out: &Out, change: &SecretChange) -> Result<(), CliError> {
    let line = if out.json {
        serde_json::to_string(change).map_err(|e| CliError::Local(e.to_string()))?
    } else {
        let name = change.name.as_deref().unwrap_or_default();
        match (change.change, change.version) {
            (ChangeKind::Watching, _) => {
                eprintln!("keyward: watching for changes");
                return Ok(());
            }
            (ChangeKind::Put, Some(v)) => format!("put {name} {v}"),
            (kind, _) => format!("{kind} {name}"),
        }
    };
    let mut stdout = io::stdout().lock();
    writeln!(stdout, "{line}")
        .and_then(|()| stdout.flush())
        .map_err(|e| CliError::Local(format!("cannot write to stdout: {e}")))
}

/// `systemctl try-restart UNIT...` (nothing without units). A failure is said on stderr and
/// the watch goes on: the next change tries again.
fn restart(units: &[String]) {
    if units.is_empty() {
        return;
    }
    match Command::new("systemctl")
        .arg("try-restart")
        .args(units)
        .status()
    {
        Ok(status) if status.success() => {}
        Ok(status) => eprintln!(
            "keyward: systemctl try-restart {} failed ({status})",
            units.join(" ")
        ),
        Err(e) => eprintln!("keyward: cannot run systemctl: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_names_as_systemd_spells_them() {
        for ok in [
            "app.service",
            "getty@tty1.service",
            "web-1.target",
            "a:b_c\\x2d.socket",
        ] {
            assert_eq!(parse_unit(ok).as_deref(), Ok(ok));
        }
        for bad in [
            "",
            "app",
            "app.bogus",
            "-app.service",
            "app;rm.service",
            "a b.service",
            "a@b@c.service",
            ".service",
            "app.service\n",
        ] {
            assert!(parse_unit(bad).is_err(), "{bad:?}");
        }
        assert!(parse_unit(&format!("{}.service", "a".repeat(250))).is_err());
    }
}
