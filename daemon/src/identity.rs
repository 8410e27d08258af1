//! Who is calling: the identity a transport got from the kernel when the client connected
//! (`SO_PEERCRED` on a Unix socket, `GetConnectionCredentials` on D-Bus), never from anything
//! the client said.

use std::fmt;

/// The transport a request came in on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// The Varlink API socket.
    Varlink,
    /// D-Bus.
    Dbus,
    /// systemd's `LoadCredential=` socket.
    Credentials,
    /// The daemon itself (unattended unseal at start).
    Daemon,
}

/// A caller as the kernel identified it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// Effective uid.
    pub uid: u32,
    /// Effective primary gid.
    pub gid: u32,
    /// Supplementary groups (from `/proc/PID/status`), when known.
    pub groups: Vec<u32>,
    /// Process id at connect time, when known.
    pub pid: Option<i32>,
    /// The caller's systemd unit (`foo.service`), from `/proc/PID/cgroup`.
    pub unit: Option<String>,
    /// How the request arrived.
    pub via: Via,
}

impl Caller {
    /// The daemon acting for itself.
    pub fn daemon() -> Self {
        Self {
            uid: 0,
            gid: 0,
            groups: Vec::new(),
            pid: None,
            unit: None,
            via: Via::Daemon,
        }
    }

    /// A caller from peer credentials: adds the supplementary groups and the systemd unit
    /// read from `/proc/PID`.
    pub fn from_peer(uid: u32, gid: u32, pid: Option<i32>, via: Via) -> Self {
        let (groups, unit) = match pid {
            Some(pid) if pid > 0 => (supplementary_groups(pid), unit_of_pid(pid)),
            _ => (Vec::new(), None),
        };
        Self {
            uid,
            gid,
            groups,
            pid,
            unit,
            via,
        }
    }
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "uid={} gid={}", self.uid, self.gid)?;
        if let Some(pid) = self.pid {
            write!(f, " pid={pid}")?;
        }
        if let Some(unit) = &self.unit {
            write!(f, " unit={unit}")?;
        }
        Ok(())
    }
}

/// The systemd unit a process runs in, from the unified cgroup hierarchy line
/// `0::/system.slice/foo.service` (or the legacy `name=systemd` line).
pub fn unit_of_pid(pid: i32) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    unit_of_cgroup(&text)
}

/// The unit named by a `/proc/PID/cgroup` file's contents: the innermost path component that
/// is a unit (`.service`, `.scope`, `.socket`, ...), skipping slices.
pub fn unit_of_cgroup(text: &str) -> Option<String> {
    let path = text.lines().find_map(|l| {
        l.strip_prefix("0::")
            .or_else(|| l.split_once(":name=systemd:").map(|(_, p)| p))
    })?;
    path.split('/')
        .rev()
        .find(|c| {
            [".service", ".scope", ".socket", ".mount", ".swap", ".timer"]
                .iter()
                .any(|s| c.ends_with(s))
        })
        .map(str::to_owned)
}

fn supplementary_groups(pid: i32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("Groups:")).map(|g| {
                g.split_whitespace()
                    .filter_map(|n| n.parse().ok())
                    .collect()
            })
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_from_cgroup() {
        assert_eq!(
            unit_of_cgroup("0::/system.slice/postgresql.service\n").as_deref(),
            Some("postgresql.service")
        );
        assert_eq!(
            unit_of_cgroup("0::/user.slice/user-1000.slice/session-2.scope\n").as_deref(),
            Some("session-2.scope")
        );
        assert_eq!(
            unit_of_cgroup("0::/system.slice/foo.service/init.scope\n").as_deref(),
            Some("init.scope")
        );
        assert_eq!(unit_of_cgroup("0::/\n"), None);
        assert_eq!(
            unit_of_cgroup("12:cpu:/x\n1:name=systemd:/system.slice/cron.service\n").as_deref(),
            Some("cron.service")
        );
    }

    #[test]
    fn own_process_is_readable() {
        let me = Caller::from_peer(0, 0, Some(std::process::id() as i32), Via::Varlink);
        assert!(me.to_string().contains("pid="));
    }
}
