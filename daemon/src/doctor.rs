//! `keywardd --doctor` (and `keyward doctor`, which runs it): the checks for what an admin
//! gets wrong, each `ok`, `warn` or `fail` with the fix.
//!
//! It lives in the daemon's binary because the checks are the daemon's own judgement: the same
//! config parser ([`Config::load`]), the same SoftHSM naming rule, the same device openers
//! (hsm-shim) and the same policy loader the daemon starts with. A separate copy in the CLI
//! would drift, and would pull the device stack into a Varlink client.
//!
//! It reads and probes; it changes nothing: no login on a token (a wrong PIN would burn one of
//! its retries; the PIN file's mode is checked, not its content), no write to the state
//! directory. A device that does not answer within [`DEVICE_TIMEOUT`] is reported as such
//! (a swtpm serves one client at a time, and a running keywardd may be that client).
//!
//! Must not: print a PIN or anything read from a PIN file, or repair what it finds.

use std::fmt;
use std::io::{Read as _, Seek as _, SeekFrom};
use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, SystemTime};

use hsm_shim::pkcs11::{Pkcs11Config, Pkcs11Device};
use hsm_shim::tpm::{TpmConfig, TpmDevice};

use serde::Serialize;

use crate::config::{Config, SocketSettings};
use crate::device::DeviceSpec;
use crate::transport::dbus::Bus;

/// How long a device may take to answer before the check gives up on it.
pub const DEVICE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where dbus-daemon looks for the system bus policy of `org.keyward.Custodian1`.
pub const DBUS_POLICY_PATHS: &[&str] = &[
    "/etc/dbus-1/system.d/org.keyward.Custodian1.conf",
    "/usr/share/dbus-1/system.d/org.keyward.Custodian1.conf",
];

/// Below this `RLIMIT_MEMLOCK` the master key itself can't be locked in memory.
const MEMLOCK_FAIL: u64 = 64 * 1024;
/// Below this, a few large secrets in flight at once may not be locked.
const MEMLOCK_WARN: u64 = 8 * 1024 * 1024;

/// The earliest plausible wall-clock time: before it, the clock was never set.
const CLOCK_FLOOR: &str = "2025-01-01T00:00:00";

/// A check's verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    Warn,
    Fail,
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `pad`, so that `{:<4}` lines the report up.
        f.pad(match self {
            Self::Ok => "ok",
            Self::Warn => "warn",
            Self::Fail => "fail",
        })
    }
}

/// One check's finding.
#[derive(Clone, Debug, Serialize)]
pub struct Finding {
    /// What was checked (`state_dir`, `device.tpm`, `socket.api`, ...).
    pub check: String,
    pub level: Level,
    /// What was found.
    pub detail: String,
    /// What to do about it (warn and fail).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

fn found(check: impl Into<String>, level: Level, detail: impl Into<String>) -> Finding {
    Finding {
        check: check.into(),
        level,
        detail: detail.into(),
        fix: None,
    }
}

impl Finding {
    fn fix(mut self, fix: impl Into<String>) -> Self {
        self.fix = Some(fix.into());
        self
    }
}

/// Run every check on the config at `config_path`. With a config that does not load, that is
/// the one finding: the rest depends on it.
pub fn run(config_path: &Path) -> Vec<Finding> {
    let config = match Config::load(config_path) {
        Ok(c) => c,
        Err(e) => {
            return vec![found("config", Level::Fail, e.to_string()).fix(format!(
                "correct {} (keywardd refuses to start on it)",
                config_path.display()
            ))]
        }
    };
    let mut all = vec![found(
        "config",
        Level::Ok,
        format!("{} loads", config_path.display()),
    )];
    all.push(policy(&config));
    all.extend(state_dir(&config));
    all.extend(pin_files(&config));
    let softhsm = softhsm(&config);
    let softhsm_ok = softhsm.as_ref().is_none_or(|f| f.level != Level::Fail);
    all.extend(softhsm);
    all.extend(devices(&config, softhsm_ok));
    all.push(dbus_policy(&config, DBUS_POLICY_PATHS));
    let mut daemon_pid = None;
    for (name, socket) in sockets(&config) {
        let (finding, pid) = socket_check(name, socket);
        daemon_pid = daemon_pid.or(pid);
        all.push(finding);
    }
    all.push(memlock(daemon_pid));
    all.push(clock(
        &config.state_dir.join(keyward_proto::audit::LOG_FILE),
    ));
    all
}

fn mode_of(m: &std::fs::Metadata) -> u32 {
    m.mode() & 0o7777
}

fn user_name(uid: u32) -> String {
    nix::unistd::User::from_uid(uid.into())
        .ok()
        .flatten()
        .map_or_else(|| format!("uid {uid}"), |u| u.name)
}

fn group_name(gid: u32) -> String {
    nix::unistd::Group::from_gid(gid.into())
        .ok()
        .flatten()
        .map_or_else(|| format!("gid {gid}"), |g| g.name)
}

fn policy(config: &Config) -> Finding {
    match &config.policy {
        None => found(
            "policy",
            Level::Warn,
            "no policy file: everything but Status is denied",
        )
        .fix("set policy = \"/etc/keyward/policy.toml\" in the config and write rules (see policy.toml.example)"),
        Some(path) => match keyward_policy::Policy::load(path) {
            Ok(p) => found(
                "policy",
                Level::Ok,
                format!("{} loads: {} rule(s)", path.display(), p.rule_count()),
            ),
            Err(e) => found("policy", Level::Fail, e.to_string())
                .fix(format!("`keyward policy check {}` says more", path.display())),
        },
    }
}

fn state_dir(config: &Config) -> Vec<Finding> {
    let dir = &config.state_dir;
    let meta = match std::fs::metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return vec![found(
                "state_dir",
                Level::Warn,
                format!("{} does not exist yet", dir.display()),
            )
            .fix("keywardd creates it (mode 0700) at start; or restore a backup into it with `keywardd --restore FILE`")]
        }
        Err(e) => {
            return vec![found("state_dir", Level::Fail, format!("{}: {e}", dir.display()))
                .fix("make it readable by keywardd's user")]
        }
    };
    if !meta.is_dir() {
        return vec![found(
            "state_dir",
            Level::Fail,
            format!("{} is not a directory", dir.display()),
        )
        .fix("point state_dir at a directory (default /var/lib/keyward)")];
    }
    let mode = mode_of(&meta);
    let owner = user_name(meta.uid());
    let mut out = vec![if mode & 0o077 != 0 {
        found(
            "state_dir",
            Level::Fail,
            format!(
                "{} is mode {mode:04o} (owner {owner}): others can look into the vault's files",
                dir.display()
            ),
        )
        .fix(format!("chmod 0700 {}", dir.display()))
    } else {
        found(
            "state_dir",
            Level::Ok,
            format!("{} is mode {mode:04o}, owner {owner}", dir.display()),
        )
    }];
    for file in ["keyward.db", keyward_proto::audit::LOG_FILE] {
        let path = dir.join(file);
        if let Ok(m) = std::fs::metadata(&path) {
            let mode = mode_of(&m);
            if mode & 0o077 != 0 {
                out.push(
                    found(
                        format!("state_dir.{file}"),
                        Level::Fail,
                        format!("{} is mode {mode:04o}", path.display()),
                    )
                    .fix(format!("chmod 0600 {}", path.display())),
                );
            }
        }
    }
    out
}

fn pin_files(config: &Config) -> Vec<Finding> {
    let mut out = Vec::new();
    for (name, spec) in &config.devices {
        let DeviceSpec::Pkcs11(p) = spec else {
            continue;
        };
        let check = format!("pin_file.{name}");
        let Some(path) = &p.pin_file else {
            out.push(
                found(&check, Level::Warn, "no pin_file: the token's slot can't unseal unattended")
                    .fix("give the PIN as a systemd credential (LoadCredentialEncrypted=) and set pin_file to its path"),
            );
            continue;
        };
        out.push(match std::fs::metadata(path) {
            // A systemd credential exists only while the service runs.
            Err(_) if path.starts_with("/run/credentials/") => found(
                &check,
                Level::Warn,
                format!("{} is a systemd credential: it exists only while keywardd.service runs", path.display()),
            )
            .fix("check LoadCredentialEncrypted= in keywardd.service names it; run `keyward doctor` while the service runs to check its mode"),
            Err(e) => found(&check, Level::Fail, format!("{}: {e}", path.display()))
                .fix("create it, or with systemd: LoadCredentialEncrypted= in the unit and pin_file = \"/run/credentials/keywardd.service/NAME\""),
            Ok(m) if !m.is_file() => found(
                &check,
                Level::Fail,
                format!("{} is not a regular file", path.display()),
            )
            .fix("point pin_file at the file that holds the PIN"),
            Ok(m) if mode_of(&m) & 0o077 != 0 => found(
                &check,
                Level::Fail,
                format!(
                    "{} is mode {:04o}: {} can read the token's PIN",
                    path.display(),
                    mode_of(&m),
                    if mode_of(&m) & 0o004 != 0 { "every user" } else { "its group" },
                ),
            )
            .fix(format!(
                "chmod 0600 {} (better: a systemd credential, LoadCredentialEncrypted=)",
                path.display()
            )),
            Ok(m) => found(
                &check,
                Level::Ok,
                format!(
                    "{} is mode {:04o}, owner {}",
                    path.display(),
                    mode_of(&m),
                    user_name(m.uid())
                ),
            ),
        });
    }
    out
}

/// SoftHSM's config: named by the config, present, with its token directory. Sets
/// `SOFTHSM2_CONF` as the daemon does, so the device checks see the same tokens.
fn softhsm(config: &Config) -> Option<Finding> {
    let uses_softhsm = config.devices.values().any(
        |d| matches!(d, DeviceSpec::Pkcs11(p) if p.module.to_string_lossy().contains("softhsm")),
    );
    if !uses_softhsm && config.softhsm_conf.is_none() {
        return None;
    }
    if let Err(e) = crate::startup::export_softhsm_conf(config) {
        return Some(found("softhsm_conf", Level::Fail, e.to_string()).fix(
            "set softhsm_conf on the SoftHSM device to an existing softhsm2.conf whose directories.tokendir exists",
        ));
    }
    let path = config.softhsm_conf.as_ref()?;
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            return Some(
                found(
                    "softhsm_conf",
                    Level::Fail,
                    format!("{}: {e}", path.display()),
                )
                .fix("make it readable by keywardd's user"),
            )
        }
    };
    let tokendir = text.lines().find_map(|l| {
        let (key, value) = l.split_once('=')?;
        (key.trim() == "directories.tokendir").then(|| PathBuf::from(value.trim()))
    });
    Some(match tokendir {
        None => found(
            "softhsm_conf",
            Level::Fail,
            format!("{} sets no directories.tokendir", path.display()),
        )
        .fix("add directories.tokendir = /var/lib/softhsm/tokens (or where the tokens are)"),
        Some(dir) if !dir.is_dir() => found(
            "softhsm_conf",
            Level::Fail,
            format!(
                "{} names the token directory {}, which does not exist",
                path.display(),
                dir.display()
            ),
        )
        .fix("create the directory, or point directories.tokendir at the tokens"),
        Some(dir) => found(
            "softhsm_conf",
            Level::Ok,
            format!("{} (tokens in {})", path.display(), dir.display()),
        ),
    })
}

/// Run `probe` on a thread of its own and wait at most [`DEVICE_TIMEOUT`] (a device that
/// hangs leaves its thread behind; the process exits after the report).
fn bounded(probe: impl FnOnce() -> (Level, String) + Send + 'static) -> Option<(Level, String)> {
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("keyward-doctor".into())
        .spawn(move || {
            let _ = tx.send(probe());
        })
        .ok()?;
    rx.recv_timeout(DEVICE_TIMEOUT).ok()
}

fn devices(config: &Config, softhsm_ok: bool) -> Vec<Finding> {
    let mut out = Vec::new();
    for (name, spec) in &config.devices {
        let check = format!("device.{name}");
        match spec {
            DeviceSpec::Tpm2(tpm) => out.push(tpm_check(check, tpm.clone())),
            DeviceSpec::Pkcs11(_) if !softhsm_ok => out.push(
                found(
                    check,
                    Level::Fail,
                    "not checked: the SoftHSM config is wrong (above)",
                )
                .fix("fix softhsm_conf first"),
            ),
            DeviceSpec::Pkcs11(p) => {
                let (module, token) = (p.module.clone(), p.token.clone());
                let uri = token.to_string();
                let answer = bounded(move || {
                    // No PIN: finding the token needs none, and a login could burn a retry.
                    match Pkcs11Device::open(Pkcs11Config::new(module, token, None)) {
                        Ok(_) => (Level::Ok, "exactly one token matches".to_owned()),
                        Err(e) => (Level::Fail, e.to_string()),
                    }
                });
                out.push(match answer {
                    Some((Level::Ok, _)) => found(
                        check,
                        Level::Ok,
                        format!("{uri}: exactly one token matches"),
                    ),
                    Some((level, detail)) => found(check, level, detail).fix(format!(
                        "make the token URI name exactly one token (token=LABEL, and serial= when labels repeat); \
                         `pkcs11-tool --module {} --list-token-slots` lists them",
                        p.module.display()
                    )),
                    None => timed_out(check),
                });
            }
        }
    }
    out
}

fn timed_out(check: String) -> Finding {
    found(
        check,
        Level::Warn,
        format!("no answer within {}s", DEVICE_TIMEOUT.as_secs()),
    )
    .fix("check the device; a running keywardd may hold it (a swtpm serves one client at a time)")
}

fn tpm_check(check: String, tpm: TpmConfig) -> Finding {
    let tcti = tpm.tcti.to_string();
    let pcrs = tpm.pcrs.clone();
    let answer = bounded(move || {
        let mut device = match TpmDevice::open(tpm) {
            Ok(d) => d,
            Err(e) => return (Level::Fail, e.to_string()),
        };
        match device.pcr_banks() {
            Err(e) => (
                Level::Fail,
                format!("reachable, but its PCR banks can't be read: {e}"),
            ),
            Ok(banks) => {
                let list = banks
                    .iter()
                    .map(|b| format!("{} ({} PCRs)", b.hash, b.pcrs.len()))
                    .collect::<Vec<_>>()
                    .join(", ");
                let sha256 = banks.iter().find(|b| b.hash == "sha256");
                match sha256 {
                    Some(bank) if pcrs.iter().all(|p| bank.pcrs.contains(p)) => (
                        Level::Ok,
                        format!("reachable; PCR banks: {list}; keyslots bind sha256 PCRs {pcrs:?}"),
                    ),
                    _ => (
                        Level::Fail,
                        format!(
                            "reachable, but the sha256 bank lacks PCRs {pcrs:?} (banks: {list})"
                        ),
                    ),
                }
            }
        }
    });
    match answer {
        Some((Level::Ok, detail)) => found(check, Level::Ok, format!("{tcti}: {detail}")),
        Some((level, detail)) => found(check, level, format!("{tcti}: {detail}")).fix(
            "check tcti in the config (device:/dev/tpmrm0 on real hardware), that the device exists \
             and keywardd's user is in its group (tss); a missing sha256 bank: tpm2_pcrallocate sha256:all, then reboot",
        ),
        None => timed_out(check),
    }
}

/// The D-Bus system bus policy, needed only when the daemon joins the system bus.
pub fn dbus_policy(config: &Config, paths: &[&str]) -> Finding {
    match config.dbus.as_ref().map(|d| &d.bus) {
        Some(Bus::System) => match paths.iter().find(|p| Path::new(p).is_file()) {
            Some(p) => found("dbus_policy", Level::Ok, format!("{p} is installed")),
            None => found(
                "dbus_policy",
                Level::Fail,
                format!(
                    "the daemon joins the system bus, but no policy for org.keyward.Custodian1 is installed ({})",
                    paths.join(", ")
                ),
            )
            .fix(format!(
                "install systemd/dbus-1/system.d/org.keyward.Custodian1.conf as {} (dbus-daemon refuses the bus name without it), then reload dbus",
                paths.first().copied().unwrap_or_default()
            )),
        },
        Some(_) => found(
            "dbus_policy",
            Level::Ok,
            "D-Bus is not on the system bus: no policy file needed",
        ),
        None => found("dbus_policy", Level::Ok, "D-Bus is not configured"),
    }
}

fn sockets(config: &Config) -> Vec<(&'static str, &SocketSettings)> {
    let mut out = vec![("api", &config.api)];
    if let Some(c) = &config.credentials {
        out.push(("credentials", &c.socket));
    }
    if let Some(s) = &config.ssh_agent {
        out.push(("ssh_agent", &s.socket));
    }
    if let Some(t) = &config.transit {
        out.push(("transit", &t.socket));
    }
    out
}

/// Who the mode lets connect (connecting needs write permission on the socket).
fn who_can_connect(mode: u32, uid: u32, gid: u32) -> String {
    let mut who = vec![format!("user {}", user_name(uid))];
    if mode & 0o020 != 0 {
        who.push(format!("group {}", group_name(gid)));
    }
    if mode & 0o002 != 0 {
        who.push("every user".into());
    }
    who.join(", ")
}

/// Whether the socket is there and answers, and who may connect to it; the pid of the
/// daemon behind it.
fn socket_check(name: &str, socket: &SocketSettings) -> (Finding, Option<i32>) {
    let check = format!("socket.{name}");
    let path = &socket.path;
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(_) => {
            return (
                found(
                    check,
                    Level::Warn,
                    format!("{} is not there: keywardd is not running", path.display()),
                )
                .fix("start keywardd (systemctl start keywardd.service or its socket units)"),
                None,
            )
        }
    };
    if !meta.file_type().is_socket() {
        return (
            found(
                check,
                Level::Fail,
                format!("{} is not a socket", path.display()),
            )
            .fix("remove it; keywardd creates the socket"),
            None,
        );
    }
    let mode = mode_of(&meta) & 0o777;
    let stream = match UnixStream::connect(path) {
        Ok(s) => s,
        Err(e) => {
            return (
                found(
                    check,
                    Level::Fail,
                    format!("{} does not answer ({e}): a stale socket", path.display()),
                )
                .fix("start keywardd; it replaces the stale socket"),
                None,
            )
        }
    };
    let pid = nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials)
        .ok()
        .map(|c| c.pid());
    let who = who_can_connect(mode, meta.uid(), meta.gid());
    let finding = if mode != socket.mode.bits() {
        found(
            check,
            Level::Warn,
            format!(
                "{} answers, but is mode {mode:04o}, not the configured {} (who can connect: {who})",
                path.display(),
                socket.mode
            ),
        )
        .fix("something changed its mode, or systemd's socket unit sets another SocketMode=: make them agree")
    } else {
        found(
            check,
            Level::Ok,
            format!(
                "{} answers; mode {mode:04o}: {who} can connect",
                path.display()
            ),
        )
    };
    (finding, pid)
}

/// `RLIMIT_MEMLOCK` of the running daemon (from `/proc/PID/limits`), else the one a daemon
/// started from here would get.
fn memlock(daemon_pid: Option<i32>) -> Finding {
    let (limit, whose) = match daemon_pid.and_then(|pid| {
        let text = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
        let line = text.lines().find(|l| l.starts_with("Max locked memory"))?;
        let soft = line.split_whitespace().nth(3)?;
        Some((
            if soft == "unlimited" {
                None
            } else {
                soft.parse::<u64>().ok()
            },
            format!("the running keywardd (pid {pid})"),
        ))
    }) {
        Some(found) => found,
        None => match nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_MEMLOCK) {
            Ok((soft, _)) => (
                (soft != nix::sys::resource::RLIM_INFINITY).then_some(soft),
                "this process (a keywardd started from here inherits it)".to_owned(),
            ),
            Err(e) => {
                return found(
                    "rlimit_memlock",
                    Level::Warn,
                    format!("cannot read RLIMIT_MEMLOCK: {e}"),
                )
            }
        },
    };
    let shown = limit.map_or("unlimited".into(), |l| format!("{} KiB", l / 1024));
    let fix = "raise it: LimitMEMLOCK=8M (or more) in keywardd.service, or `ulimit -l` before starting it by hand";
    match limit {
        Some(l) if l < MEMLOCK_FAIL => found(
            "rlimit_memlock",
            Level::Fail,
            format!("RLIMIT_MEMLOCK of {whose} is {shown}: the master key can't be locked in memory (it may reach swap)"),
        )
        .fix(fix),
        Some(l) if l < MEMLOCK_WARN => found(
            "rlimit_memlock",
            Level::Warn,
            format!("RLIMIT_MEMLOCK of {whose} is {shown}: large secrets in flight may not be locked"),
        )
        .fix(fix),
        _ => found("rlimit_memlock", Level::Ok, format!("RLIMIT_MEMLOCK of {whose} is {shown}")),
    }
}

/// The last record's time in the audit log at `path`, if it has a readable one.
fn last_record_time(path: &Path) -> Option<String> {
    let mut file = std::fs::File::open(path).ok()?;
    let len = file.metadata().ok()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)))
        .ok()?;
    let mut tail = Vec::new();
    file.read_to_end(&mut tail).ok()?;
    tail.split(|&b| b == b'\n').rev().find_map(|line| {
        let record: serde_json::Value = serde_json::from_slice(line).ok()?;
        record.get("time")?.as_str().map(str::to_owned)
    })
}

/// The wall clock: set, and not behind the audit log (whose records' times must not go
/// backwards for `keyward audit verify` to read them as a history).
fn clock(audit_log: &Path) -> Finding {
    let now = keyward_proto::audit::rfc3339_millis(SystemTime::now());
    let fix =
        "set the clock (timedatectl set-ntp true, or chronyc makestep) before starting keywardd";
    if now.as_str() < CLOCK_FLOOR {
        return found(
            "clock",
            Level::Fail,
            format!("the clock says {now}: it was never set"),
        )
        .fix(fix);
    }
    match last_record_time(audit_log) {
        // Both are RFC 3339 UTC of the same form: their text orders as their times do.
        Some(last) if last.get(..19) > now.get(..19) => found(
            "clock",
            Level::Fail,
            format!(
                "the clock says {now}, before the audit log's last record ({last}): new records would go back in time"
            ),
        )
        .fix(fix),
        Some(last) => found(
            "clock",
            Level::Ok,
            format!("{now}, after the audit log's last record ({last})"),
        ),
        None => found("clock", Level::Ok, format!("{now} (no audit record yet)")),
    }
}

/// The findings as text: one line each, the fix under it.
pub fn text(findings: &[Finding]) -> String {
    let mut out = String::new();
    for f in findings {
        out.push_str(&format!("{:<4}  {:<24} {}\n", f.level, f.check, f.detail));
        if let Some(fix) = &f.fix {
            out.push_str(&format!("      {:<24} fix: {fix}\n", ""));
        }
    }
    let count = |l| findings.iter().filter(|f| f.level == l).count();
    out.push_str(&format!(
        "{} ok, {} warn, {} fail\n",
        count(Level::Ok),
        count(Level::Warn),
        count(Level::Fail)
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn who_can_connect_follows_the_mode() {
        assert_eq!(who_can_connect(0o600, 0, 0), "user root");
        assert_eq!(who_can_connect(0o660, 0, 0), "user root, group root");
        assert_eq!(
            who_can_connect(0o666, 0, 0),
            "user root, group root, every user"
        );
    }

    #[test]
    fn the_clock_behind_the_log_fails() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("audit.log");
        std::fs::write(&log, "{\"seq\":0,\"time\":\"2999-01-01T00:00:00.000Z\"}\n").unwrap();
        assert_eq!(clock(&log).level, Level::Fail);
        std::fs::write(
            &log,
            "{\"seq\":0,\"time\":\"2025-06-01T00:00:00.000Z\"}\n{\"torn",
        )
        .unwrap();
        assert_eq!(clock(&log).level, Level::Ok);
        assert_eq!(clock(&dir.path().join("none")).level, Level::Ok);
    }

    #[test]
    fn the_dbus_policy_is_needed_on_the_system_bus_only() {
        let dir = tempfile::tempdir().unwrap();
        let installed = dir.path().join("org.keyward.Custodian1.conf");
        std::fs::write(&installed, "<busconfig/>").unwrap();
        let (installed, missing) = (installed.to_str().unwrap(), "/nonexistent/policy.conf");
        let config = |dbus: &str| {
            let path = dir.path().join("keywardd.toml");
            std::fs::write(
                &path,
                format!("state_dir = \"/x\"\n[api]\nsocket = \"/x/api.sock\"\n{dbus}"),
            )
            .unwrap();
            Config::load(&path).unwrap()
        };
        let system = config("[dbus]\nbus = \"system\"\n");
        assert_eq!(dbus_policy(&system, &[missing]).level, Level::Fail);
        assert_eq!(dbus_policy(&system, &[missing, installed]).level, Level::Ok);
        let private = config("[dbus]\naddress = \"unix:path=/x/bus\"\n");
        assert_eq!(dbus_policy(&private, &[missing]).level, Level::Ok);
        assert_eq!(dbus_policy(&config(""), &[missing]).level, Level::Ok);
    }
}
