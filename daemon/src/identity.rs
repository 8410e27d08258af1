//! Who is calling: the identity a transport got from the kernel when the client connected
//! (`SO_PEERCRED` and `SO_PEERPIDFD` on a Unix socket, `GetConnectionCredentials` on D-Bus),
//! never from anything the client said.
//!
//! It owns the one reader of `/proc/PID` that every transport uses: the supplementary groups
//! and the systemd unit of the process that connected. What it reads counts only while that
//! process provably is the peer: it must still run as the uid the kernel reported at connect
//! time, and, where the kernel gives a pidfd, still be alive after the read (a dead peer's pid
//! may already name another process). Otherwise the caller is its uid alone: no groups, no
//! unit. It decides nothing: policy is [`crate::policy`]'s business.
//!
//! The unit is derived as systemd's `sd_pid_get_unit()` does: the *system* unit, i.e. the
//! first component of the cgroup path that is not a slice. Everything below a user's service
//! manager is `user@UID.service`, never a name chosen inside it: the user runs that manager
//! and names its units freely (`systemd-run --user --unit=postgresql.service`).

use std::fmt;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::OnceLock;

use keyward_policy::Identity;
use nix::sys::socket::{getsockopt, sockopt};
use tracing::{debug, info};

/// The transport a request came in on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// The Varlink API socket.
    Varlink,
    /// D-Bus.
    Dbus,
    /// systemd's `LoadCredential=` socket.
    Credentials,
    /// The ssh-agent socket.
    SshAgent,
    /// The OpenBao-compatible transit socket.
    Transit,
    /// The daemon itself (unattended unseal at start).
    Daemon,
}

/// A caller as the kernel identified it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// What the access policy looks at: the effective uid and primary gid, the supplementary
    /// groups (from `/proc/PID/status`, when known) and the systemd (system) unit
    /// (`foo.service`, `user@1000.service`, from `/proc/PID/cgroup`).
    pub who: Identity,
    /// Process id at connect time, when known.
    pub pid: Option<i32>,
    /// How the request arrived.
    pub via: Via,
}

impl Caller {
    /// The daemon acting for itself (uid 0, gid 0).
    pub fn daemon() -> Self {
        Self {
            who: Identity::default(),
            pid: None,
            via: Via::Daemon,
        }
    }
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "uid={} gid={}", self.who.uid, self.who.gid)?;
        if let Some(pid) = self.pid {
            write!(f, " pid={pid}")?;
        }
        if let Some(unit) = &self.who.unit {
            write!(f, " unit={unit}")?;
        }
        Ok(())
    }
}

/// The process at the other end of a connection, as the kernel named it when it connected.
#[derive(Debug)]
pub struct Peer {
    /// Effective uid at connect time.
    pub uid: u32,
    /// Effective gid at connect time.
    pub gid: u32,
    /// Process id, when the kernel or the bus gave one.
    pub pid: Option<i32>,
    /// A pidfd for `pid`: from the kernel with the credentials (`SO_PEERPIDFD`, Linux 6.5+;
    /// `ProcessFD` on D-Bus), else opened by pid as soon as the pid was known.
    pub pidfd: Option<OwnedFd>,
    /// The process had already exited when a pidfd was to be opened for it: whatever its pid
    /// names now is someone else.
    gone: bool,
}

/// What `/proc/PID` said about a peer's process while it provably was that peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Process {
    /// Effective gid now.
    pub gid: u32,
    /// Supplementary groups.
    pub groups: Vec<u32>,
    /// The systemd unit, if the process runs in one.
    pub unit: Option<String>,
}

impl Peer {
    /// The peer of a connected Unix socket: `SO_PEERCRED`, and `SO_PEERPIDFD` where the kernel
    /// has it (6.5+), else a pidfd opened by the pid right away.
    ///
    /// # Errors
    /// The kernel gives no peer credentials (not a connected Unix socket).
    pub fn of_socket<F: AsFd>(socket: &F) -> std::io::Result<Self> {
        let cred = getsockopt(socket, sockopt::PeerCredentials)?;
        match getsockopt(socket, sockopt::PeerPidfd) {
            Ok(fd) => Ok(Self::with_pidfd(
                cred.uid(),
                cred.gid(),
                Some(cred.pid()),
                fd,
            )),
            Err(e) => {
                debug!(error = %e, "SO_PEERPIDFD unavailable; opening a pidfd by pid");
                Ok(Self::by_pid(cred.uid(), cred.gid(), Some(cred.pid())))
            }
        }
    }

    /// A peer whose pidfd came with its credentials (`SO_PEERPIDFD`, D-Bus `ProcessFD`).
    pub fn with_pidfd(uid: u32, gid: u32, pid: Option<i32>, pidfd: OwnedFd) -> Self {
        Self {
            uid,
            gid,
            pid: pid.filter(|p| *p > 0),
            pidfd: Some(pidfd),
            gone: false,
        }
    }

    /// A peer known by uid and pid only (D-Bus without `ProcessFD`): a pidfd is opened by the
    /// pid at once, which narrows, but cannot close, the window in which the pid could have
    /// been recycled; the uid check in [`Peer::process`] still holds.
    pub fn by_pid(uid: u32, gid: u32, pid: Option<i32>) -> Self {
        let pid = pid.filter(|p| *p > 0);
        let opened = pid.map(crate::sys::pidfd_open);
        let gone = matches!(&opened, Some(Err(e)) if e.raw_os_error() == Some(nix::libc::ESRCH));
        Self {
            uid,
            gid,
            pid,
            pidfd: opened.and_then(Result::ok),
            gone,
        }
    }

    /// Read `/proc/PID` for this peer. `None` (fail closed) when there is no pid, the files
    /// can't be read, the process no longer runs as [`Peer::uid`] (it changed uid, or the pid
    /// now names another user's process), or the pidfd says the peer died during the read.
    pub fn process(&self) -> Option<Process> {
        let pid = self.pid?;
        if self.gone {
            info!(
                pid,
                "caller's process exited before it could be pinned; not read"
            );
            return None;
        }
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
        if let Some(fd) = &self.pidfd {
            // Alive now means alive all along the reads: the pid named the peer throughout.
            if !crate::sys::pidfd_alive(fd.as_fd()).unwrap_or(false) {
                info!(
                    pid,
                    "caller's process is gone; its /proc entries are not trusted"
                );
                return None;
            }
        }
        let (euid, egid, groups) = parse_status(&status)?;
        if euid != self.uid {
            info!(
                pid,
                uid = self.uid,
                now = euid,
                "caller's process no longer runs as the uid it connected with: \
                 no groups and no unit for it"
            );
            return None;
        }
        let unit = cgroup_path(&cgroup, systemd_hierarchy()).and_then(|path| {
            let root = pid1_root();
            unit_of_cgroup_path(shift_path(path, root.as_deref()))
        });
        Some(Process {
            gid: egid,
            groups,
            unit,
        })
    }

    /// The caller: this peer's uid and gid, and the groups and unit of [`Peer::process`] (none
    /// of either when that fails).
    pub fn caller(&self, via: Via) -> Caller {
        let process = self.process();
        let (groups, unit) = process.map_or((Vec::new(), None), |p| (p.groups, p.unit));
        Caller {
            who: Identity {
                uid: self.uid,
                gid: self.gid,
                groups,
                unit,
            },
            pid: self.pid,
            via,
        }
    }
}

/// The value of field `name` (`"Uid"`, `"VmLck"`) in the text of a `/proc/PID/status` file:
/// what follows `name:` on its line, trimmed. The daemon's one reader of that format.
pub fn status_field<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .map(str::trim)
}

/// (effective uid, effective gid, supplementary groups) from `/proc/PID/status`.
fn parse_status(text: &str) -> Option<(u32, u32, Vec<u32>)> {
    // `Uid:` and `Gid:` list real, effective, saved and filesystem ids.
    let effective = |name: &str| {
        status_field(text, name)?
            .split_whitespace()
            .nth(1)?
            .parse::<u32>()
            .ok()
    };
    let groups = status_field(text, "Groups")
        .map(|g| {
            g.split_whitespace()
                .filter_map(|n| n.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    Some((effective("Uid")?, effective("Gid")?, groups))
}

/// Which cgroup hierarchy systemd keeps its tree in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hierarchy {
    /// The unified (v2) hierarchy, line `0::` of `/proc/PID/cgroup`: cgroup v2 alone, or
    /// "hybrid" (v1 controllers, with systemd's own tree on the v2 hierarchy mounted at
    /// `/sys/fs/cgroup/unified`).
    Unified,
    /// Legacy v1: the named hierarchy `name=systemd`.
    Legacy,
}

/// systemd's hierarchy on this machine, decided as systemd does (`cg_unified_cached`): v2 if
/// `/sys/fs/cgroup` is cgroup2 or `/sys/fs/cgroup/unified` is (hybrid), else legacy.
pub fn systemd_hierarchy() -> Hierarchy {
    static MODE: OnceLock<Hierarchy> = OnceLock::new();
    *MODE.get_or_init(|| {
        use nix::sys::statfs::{statfs, CGROUP2_SUPER_MAGIC};
        let is_v2 =
            |path: &str| statfs(path).is_ok_and(|fs| fs.filesystem_type() == CGROUP2_SUPER_MAGIC);
        if is_v2("/sys/fs/cgroup/") || is_v2("/sys/fs/cgroup/unified/") {
            Hierarchy::Unified
        } else {
            Hierarchy::Legacy
        }
    })
}

/// The path of systemd's tree in a `/proc/PID/cgroup` file (`ID:controllers:path` lines).
pub fn cgroup_path(text: &str, hierarchy: Hierarchy) -> Option<&str> {
    text.lines().find_map(|line| {
        let mut fields = line.splitn(3, ':');
        let (id, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
        let ours = match hierarchy {
            Hierarchy::Unified => id == "0" && controllers.is_empty(),
            Hierarchy::Legacy => controllers.split(',').any(|c| c == "name=systemd"),
        };
        ours.then_some(path)
    })
}

/// The root of the tree PID 1 manages, as systemd finds it (`cg_get_root_path`): PID 1's own
/// cgroup without its `/init.scope`. Not `/` only when the daemon runs in a container that
/// sees the host's tree; then callers' paths are read relative to it.
fn pid1_root() -> Option<String> {
    let text = std::fs::read_to_string("/proc/1/cgroup").ok()?;
    let path = cgroup_path(&text, systemd_hierarchy())?;
    let root = ["/init.scope", "/system.slice", "/system"]
        .iter()
        .find_map(|suffix| path.strip_suffix(suffix))
        .unwrap_or(path);
    Some(root.to_owned())
}

/// `path` relative to `root` (both absolute), if it lies below it; else `path` unchanged.
pub fn shift_path<'a>(path: &'a str, root: Option<&str>) -> &'a str {
    let Some(root) = root
        .map(|r| r.trim_end_matches('/'))
        .filter(|r| !r.is_empty())
    else {
        return path;
    };
    match path.strip_prefix(root) {
        Some(rest) if rest.starts_with('/') => rest,
        _ => path,
    }
}

/// The unit a cgroup path belongs to, as systemd's `cg_path_get_unit()` says: skip the leading
/// slices; the next component, unescaped (a leading `_` dropped), is the unit, if it is a valid
/// unit name and not a slice. So `/system.slice/foo.service/init.scope` is `foo.service`, and
/// `/user.slice/user-1000.slice/user@1000.service/app.slice/x.service` is `user@1000.service`.
pub fn unit_of_cgroup_path(path: &str) -> Option<String> {
    let component = path
        .split('/')
        .filter(|c| !c.is_empty())
        .find(|c| !is_slice(c))?;
    let unit = component.strip_prefix('_').unwrap_or(component);
    (component.len() >= 3 && is_unit_name(unit) && !unit.ends_with(".slice"))
        .then(|| unit.to_owned())
}

fn is_slice(component: &str) -> bool {
    let name = component.strip_prefix('_').unwrap_or(component);
    name.ends_with(".slice") && is_unit_name(name)
}

/// The unit types systemd knows.
const UNIT_TYPES: [&str; 11] = [
    "service",
    "mount",
    "swap",
    "socket",
    "target",
    "device",
    "automount",
    "timer",
    "path",
    "slice",
    "scope",
];

/// Whether `name` is a unit name systemd accepts for a running unit (`unit_name_is_valid` with
/// plain and instance names, not templates): `prefix[@instance].type`, at most 255 bytes,
/// of `[A-Za-z0-9:_.\-\\]` (and `@` in the instance), with a known type.
pub fn is_unit_name(name: &str) -> bool {
    if name.is_empty() || name.len() > 255 {
        return false;
    }
    let Some((stem, kind)) = name.rsplit_once('.') else {
        return false;
    };
    let plain = |b: u8| b.is_ascii_alphanumeric() || b":-_.\\".contains(&b);
    let stem_ok = match stem.split_once('@') {
        None => !stem.is_empty() && stem.bytes().all(plain),
        Some((prefix, instance)) => {
            !prefix.is_empty()
                && prefix.bytes().all(plain)
                && !instance.is_empty()
                && instance.bytes().all(|b| b == b'@' || plain(b))
        }
    };
    stem_ok && UNIT_TYPES.contains(&kind)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(path: &str) -> Option<String> {
        unit_of_cgroup_path(path)
    }

    #[test]
    fn the_unit_is_the_system_unit() {
        let cases: &[(&str, Option<&str>)] = &[
            (
                "/system.slice/postgresql.service",
                Some("postgresql.service"),
            ),
            ("/system.slice/foo.service/init.scope", Some("foo.service")),
            (
                "/system.slice/system-getty.slice/getty@tty1.service",
                Some("getty@tty1.service"),
            ),
            (
                "/user.slice/user-1000.slice/session-2.scope",
                Some("session-2.scope"),
            ),
            // Anything under a user's manager is the manager, whatever the user named it.
            (
                "/user.slice/user-1000.slice/user@1000.service/app.slice/postgresql.service",
                Some("user@1000.service"),
            ),
            (
                "/user.slice/user-65534.slice/user@65534.service/init.scope",
                Some("user@65534.service"),
            ),
            (
                "/user.slice/user-1000.slice/user@1000.service/app.slice/app-x.slice/\
                 postgresql.service/sub",
                Some("user@1000.service"),
            ),
            // A delegated service's own subtree is the service.
            (
                "/system.slice/docker.service/payload/system.slice/postgresql.service",
                Some("docker.service"),
            ),
            ("/init.scope", Some("init.scope")),
            // Escaped names (cg_escape prefixes `_`).
            ("/system.slice/_cpu.service", Some("cpu.service")),
            ("/_user.slice/_x.service", Some("x.service")),
            // No unit: the root, slices only, or a component that is not a unit name.
            ("/", None),
            ("", None),
            ("/system.slice", None),
            ("/user.slice/user-1000.slice", None),
            ("/postgresql", None),
            ("/machine/postgresql.service", None),
            ("/system.slice/foo.bogus/x.service", None),
            ("/system.slice/@x.service", None),
            ("/system.slice/x@.service", None),
        ];
        for (path, want) in cases {
            assert_eq!(unit(path).as_deref(), *want, "{path}");
        }
    }

    #[test]
    fn the_hierarchy_systemd_uses_is_read() {
        let hybrid = "9:name=systemd:/system.slice/old.service\n\
                      4:memory:/x\n\
                      0::/user.slice/user-1000.slice/user@1000.service/app.slice/a.service\n";
        assert_eq!(
            cgroup_path(hybrid, Hierarchy::Unified),
            Some("/user.slice/user-1000.slice/user@1000.service/app.slice/a.service")
        );
        assert_eq!(
            cgroup_path(hybrid, Hierarchy::Legacy),
            Some("/system.slice/old.service")
        );
        let legacy = "12:cpu:/x\n1:name=systemd:/system.slice/cron.service\n";
        assert_eq!(cgroup_path(legacy, Hierarchy::Unified), None);
        assert_eq!(
            cgroup_path(legacy, Hierarchy::Legacy),
            Some("/system.slice/cron.service")
        );
        // A path may hold colons.
        assert_eq!(
            cgroup_path("0::/system.slice/a:b.service\n", Hierarchy::Unified),
            Some("/system.slice/a:b.service")
        );
        // A v1 hierarchy numbered 0 with controllers is not the unified one.
        assert_eq!(cgroup_path("0:cpu:/x\n", Hierarchy::Unified), None);
    }

    #[test]
    fn paths_are_read_relative_to_pid1s_tree() {
        let p = "/lxc/c1/system.slice/a.service";
        assert_eq!(shift_path(p, Some("/lxc/c1")), "/system.slice/a.service");
        assert_eq!(shift_path(p, Some("/lxc/c1/")), "/system.slice/a.service");
        assert_eq!(shift_path(p, Some("/")), p);
        assert_eq!(shift_path(p, Some("")), p);
        assert_eq!(shift_path(p, None), p);
        assert_eq!(shift_path(p, Some("/lxc/c")), p, "whole components only");
        assert_eq!(
            shift_path("/other/x.service", Some("/lxc/c1")),
            "/other/x.service"
        );
    }

    #[test]
    fn unit_names() {
        for ok in [
            "a.service",
            "postgresql.service",
            "getty@tty1.service",
            "user@1000.service",
            "a@b@c.service",
            "dev-sda1.device",
            "x\\x2dy.mount",
            "session-2.scope",
            "-.slice",
        ] {
            assert!(is_unit_name(ok), "{ok}");
        }
        let long = format!("{}.service", "a".repeat(247));
        assert!(is_unit_name(&long));
        let too_long = format!("{}.service", "a".repeat(248));
        assert!(!is_unit_name(&too_long));
        for bad in [
            "",
            "service",
            ".service",
            "a.",
            "a.bogus",
            "a b.service",
            "a/b.service",
            "@a.service",
            "a@.service",
            "a.service\n",
            "é.service",
        ] {
            assert!(!is_unit_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn status_fields() {
        let text = "Name:\tx\nUid:\t1000\t1001\t1001\t1001\nGid:\t100\t101\t101\t101\n\
                    Groups:\t4 24 27 \n";
        assert_eq!(parse_status(text), Some((1001, 101, vec![4, 24, 27])));
        assert_eq!(
            parse_status("Uid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\nGroups:\n"),
            Some((0, 0, vec![]))
        );
        assert_eq!(parse_status("Gid:\t0\t0\t0\t0\n"), None);
        let text = "UidMap:\tno\nVmLck:\t     8 kB\nSigCgt:\t0000000000004a02\n";
        assert_eq!(status_field(text, "VmLck"), Some("8 kB"));
        assert_eq!(status_field(text, "SigCgt"), Some("0000000000004a02"));
        assert_eq!(
            status_field(text, "Uid"),
            None,
            "a longer name is another field"
        );
    }

    fn me() -> Peer {
        Peer::by_pid(
            nix::unistd::geteuid().as_raw(),
            nix::unistd::getegid().as_raw(),
            Some(std::process::id() as i32),
        )
    }

    #[test]
    fn own_process_is_read() {
        let peer = me();
        assert!(peer.pidfd.is_some());
        let p = peer.process().expect("own /proc entry");
        assert_eq!(p.gid, nix::unistd::getegid().as_raw());
        let caller = peer.caller(Via::Varlink);
        assert_eq!(caller.who.uid, peer.uid);
        assert!(caller.to_string().contains("pid="));
    }

    #[test]
    fn a_process_of_another_uid_gives_no_groups_and_no_unit() {
        let mut peer = me();
        peer.uid = peer.uid.wrapping_add(1);
        assert_eq!(peer.process(), None);
        let caller = peer.caller(Via::Dbus);
        assert!(caller.who.groups.is_empty() && caller.who.unit.is_none());
        assert_eq!(caller.who.uid, peer.uid, "the kernel's uid stays");
    }

    #[test]
    fn a_dead_peer_is_not_read() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        let uid = nix::unistd::geteuid().as_raw();
        let peer = Peer::by_pid(uid, 0, Some(pid));
        child.wait().unwrap();
        // Whatever the pid names now (nothing, or a recycled process), it is not the peer.
        assert_eq!(peer.process(), None);
        // Gone before it could be pinned: the same.
        let late = Peer::by_pid(uid, 0, Some(pid));
        assert!(late.pidfd.is_none() && late.gone);
        assert_eq!(late.process(), None);
        assert_eq!(Peer::by_pid(uid, 0, None).process(), None);
    }

    #[test]
    fn a_socket_peer_has_credentials_and_a_pidfd() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let peer = Peer::of_socket(&a).unwrap();
        assert_eq!(peer.uid, nix::unistd::geteuid().as_raw());
        assert_eq!(peer.pid, Some(std::process::id() as i32));
        assert!(peer.pidfd.is_some(), "SO_PEERPIDFD or pidfd_open");
        assert!(peer.process().is_some());
        let file = tempfile::tempfile().unwrap();
        assert!(Peer::of_socket(&file).is_err(), "not a socket");
    }
}
