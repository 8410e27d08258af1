//! Cgroups laid out as systemd lays them out, made by hand, so that tests can put a real
//! process where a systemd unit's processes would be (`/system.slice/postgresql.service`) or
//! where a user's own service manager would put it
//! (`/user.slice/user-UID.slice/user@UID.service/app.slice/postgresql.service`), without
//! systemd running.
//!
//! The tree is made in every hierarchy systemd keeps on this machine, as systemd would: the
//! unified (v2) one (`/sys/fs/cgroup` or, hybrid, `/sys/fs/cgroup/unified`) and the v1
//! `name=systemd` one (`/sys/fs/cgroup/systemd`). A delegated subtree (a user's manager) is
//! owned by its user, as systemd hands it over. What this fixture created is removed on drop.
//! It needs root; where cgroups can't be written it says why, and the test decides.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A cgroup path made in each of systemd's hierarchies.
#[derive(Debug)]
pub struct CgroupTree {
    /// The leaf in each hierarchy.
    leaves: Vec<PathBuf>,
    /// Directories this fixture created, outermost first (removed innermost first).
    created: Vec<PathBuf>,
}

/// The hierarchies systemd keeps its tree in here: v2 (unified or hybrid) and v1 `name=systemd`.
pub fn systemd_hierarchies() -> Vec<PathBuf> {
    use nix::sys::statfs::{statfs, CGROUP2_SUPER_MAGIC, CGROUP_SUPER_MAGIC};
    let is = |path: &str, magic| statfs(path).is_ok_and(|fs| fs.filesystem_type() == magic);
    let mut out = Vec::new();
    if is("/sys/fs/cgroup", CGROUP2_SUPER_MAGIC) {
        out.push(PathBuf::from("/sys/fs/cgroup"));
    } else if is("/sys/fs/cgroup/unified", CGROUP2_SUPER_MAGIC) {
        out.push(PathBuf::from("/sys/fs/cgroup/unified"));
    }
    if is("/sys/fs/cgroup/systemd", CGROUP_SUPER_MAGIC) {
        out.push(PathBuf::from("/sys/fs/cgroup/systemd"));
    }
    out
}

impl CgroupTree {
    /// Make `path` (relative, `a.slice/b.service`) in every systemd hierarchy. With
    /// `delegated = Some((component, uid))`, that component and everything below it belong to
    /// `uid` (directories and their `cgroup.procs`, as systemd delegates a user's manager).
    ///
    /// # Errors
    /// Why cgroups can't be made here: not root, or no writable cgroup hierarchy.
    pub fn create(path: &str, delegated: Option<(&str, u32)>) -> Result<Self, String> {
        if !nix::unistd::geteuid().is_root() {
            return Err("making cgroups needs root".into());
        }
        let roots = systemd_hierarchies();
        if roots.is_empty() {
            return Err(
                "no cgroup2 or name=systemd hierarchy is mounted under /sys/fs/cgroup".into(),
            );
        }
        let mut tree = Self {
            leaves: Vec::new(),
            created: Vec::new(),
        };
        for root in roots {
            let mut dir = root.clone();
            let mut owner = None;
            for component in path.split('/').filter(|c| !c.is_empty()) {
                dir.push(component);
                if let Some((from, uid)) = delegated {
                    if component == from {
                        owner = Some(uid);
                    }
                }
                if !dir.exists() {
                    std::fs::create_dir(&dir)
                        .map_err(|e| format!("cannot create cgroup {}: {e}", dir.display()))?;
                    tree.created.push(dir.clone());
                }
                if let Some(uid) = owner {
                    chown(&dir, uid)?;
                    chown(&dir.join("cgroup.procs"), uid)?;
                }
            }
            tree.leaves.push(dir);
        }
        Ok(tree)
    }

    /// The leaf in each hierarchy.
    pub fn leaves(&self) -> &[PathBuf] {
        &self.leaves
    }

    /// `program ARGS…` run by a shell that first moves itself into the leaf of every hierarchy
    /// (as root), then becomes `uid` (gid the same, no supplementary groups) with `setpriv`
    /// and execs the program: the process that connects is in the cgroup and runs as `uid`.
    pub fn command_as(&self, uid: u32, program: &Path) -> Command {
        let mut script = String::from("set -e; ");
        for leaf in &self.leaves {
            script.push_str(&format!("echo $$ > '{}/cgroup.procs'; ", leaf.display()));
        }
        script.push_str("exec \"$@\"");
        let then = crate::as_uid(uid, program);
        let mut c = Command::new("sh");
        c.arg("-c")
            .arg(script)
            .arg("sh")
            .arg(then.get_program())
            .args(then.get_args());
        c
    }
}

fn chown(path: &Path, uid: u32) -> Result<(), String> {
    std::os::unix::fs::chown(path, Some(uid), Some(uid))
        .map_err(|e| format!("cannot chown {}: {e}", path.display()))
}

impl Drop for CgroupTree {
    fn drop(&mut self) {
        // Innermost first; a cgroup still holding a process (or another test's subtree) stays.
        for dir in self.created.iter().rev() {
            let _ = std::fs::remove_dir(dir);
        }
    }
}
