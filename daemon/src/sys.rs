//! The process-level protections and the systemd plumbing: the only module allowed `unsafe`
//! (locked memory for secrets, turning inherited socket-activation descriptors into listeners),
//! each use saying why.
//!
//! - core dumps off (`RLIMIT_CORE=0`) and the process non-dumpable (`PR_SET_DUMPABLE=0`, which
//!   also keeps other same-uid processes from ptrace-attaching or reading `/proc/PID/mem`);
//! - key material in [`LockedBytes`]: pages of its own, `mlock`ed (never written to swap) and
//!   `MADV_DONTDUMP` (left out of any core dump even if dumps were turned back on), zeroized
//!   before they are freed or kept, locked, for the next key. Per-request plaintexts live for
//!   microseconds in zeroizing buffers; the unit's `MemorySwapMax=0` keeps the whole service
//!   out of swap for those;
//! - umask 077, so nothing the daemon creates is readable by others;
//! - `sd_notify`: `READY=1`, `STATUS=`, `STOPPING=1`, `WATCHDOG=1` (no-ops without
//!   `NOTIFY_SOCKET`), and whether systemd asked for watchdog pings;
//! - pidfds (`pidfd_open`, `pidfd_send_signal`), which pin the process a caller's identity was
//!   read from, so a recycled pid can't lend a caller another process's groups or unit.
#![allow(unsafe_code)]

use std::alloc::Layout;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use nix::sys::mman::{madvise, mlock, munlock, MmapAdvise};
use nix::sys::resource::{setrlimit, Resource};
use nix::sys::stat::{umask, Mode};

/// Harden the process. Call first thing in `main`, before any secret exists.
///
/// # Errors
/// A protection that could not be applied: the daemon must not run without it.
pub fn harden() -> Result<(), String> {
    umask(Mode::from_bits_truncate(0o077));
    setrlimit(Resource::RLIMIT_CORE, 0, 0).map_err(|e| format!("RLIMIT_CORE=0: {e}"))?;
    nix::sys::prctl::set_dumpable(false).map_err(|e| format!("PR_SET_DUMPABLE=0: {e}"))?;
    Ok(())
}

/// Make sure `dir` exists, belongs to us and is closed to group and others.
///
/// # Errors
/// The directory can't be created, or is open to others (its contents would be exposed).
pub fn private_dir(dir: &Path) -> Result<(), String> {
    if !dir.exists() {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| format!("cannot chmod {}: {e}", dir.display()))?;
    }
    let meta = std::fs::metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    if !meta.is_dir() {
        return Err(format!("{} is not a directory", dir.display()));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "state directory {} has mode {mode:04o}: it must be closed to group and others \
             (chmod 700)",
            dir.display()
        ));
    }
    Ok(())
}

/// Tell systemd something (`READY=1`, `STATUS=…`); a no-op when not run by systemd.
pub fn notify(states: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::warn!(error = %e, "sd_notify failed");
    }
}

/// The watchdog interval systemd asked this process for (`WatchdogSec=`: `WATCHDOG_USEC`, with
/// `WATCHDOG_PID` naming us), or `None`. The environment is left as it is.
pub fn watchdog_interval() -> Option<std::time::Duration> {
    let mut usec = 0;
    (sd_notify::watchdog_enabled(false, &mut usec) && usec > 0)
        .then(|| std::time::Duration::from_micros(usec))
}

/// The listening Unix sockets systemd passed (socket activation), by their
/// `FileDescriptorName=` (`api`, `credentials`). Empty when not socket-activated.
///
/// # Errors
/// `LISTEN_FDS` is set but a descriptor is unusable.
pub fn activated_listeners(
) -> std::io::Result<std::collections::HashMap<String, std::os::unix::net::UnixListener>> {
    let mut out = std::collections::HashMap::new();
    for (fd, name) in sd_notify::listen_fds_with_names(true)? {
        let listener = listener_from_fd(fd)?;
        if out.insert(name.clone(), listener).is_some() {
            tracing::warn!(name = %name, "two activated sockets share a name; using the last");
        }
    }
    Ok(out)
}

fn listener_from_fd(fd: RawFd) -> std::io::Result<std::os::unix::net::UnixListener> {
    // SAFETY: `sd_notify::listen_fds` checked LISTEN_PID is us and yields each inherited
    // descriptor (3..3+LISTEN_FDS) exactly once; nothing else in the process owns it, so this
    // takes sole ownership.
    let listener = unsafe { std::os::unix::net::UnixListener::from_raw_fd(fd) };
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Whether this process is non-dumpable (for tests and `Status`).
pub fn is_dumpable() -> bool {
    nix::sys::prctl::get_dumpable().unwrap_or(true)
}

/// A pidfd for process `pid` (Linux 5.3+). It refers to that process for as long as it is
/// open, whatever later happens to the pid number; [`pidfd_alive`] then tells whether the
/// process still exists.
///
/// # Errors
/// No such process (`ESRCH`), or a kernel without pidfds (`ENOSYS`).
pub fn pidfd_open(pid: i32) -> std::io::Result<OwnedFd> {
    use nix::libc;
    // SAFETY: pidfd_open(2) takes a pid and a flags word and returns a new descriptor or -1;
    // no memory is passed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, libc::c_long::from(pid), 0_i64) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd = RawFd::try_from(fd).map_err(|_| std::io::Error::other("pidfd out of range"))?;
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Whether the process `pidfd` refers to still exists (a zombie counts: its pid is not free
/// for reuse until it is reaped). Signal 0 only checks: nothing is delivered. A process we may
/// not signal (`EPERM`: another user's, and the daemon runs without `CAP_KILL`) exists.
///
/// # Errors
/// `pidfd` is not a pidfd, or the kernel lacks `pidfd_send_signal` (Linux 5.1+).
pub fn pidfd_alive(pidfd: BorrowedFd<'_>) -> std::io::Result<bool> {
    use nix::libc;
    // SAFETY: pidfd_send_signal(2) with signal 0, a null siginfo and no flags reads nothing
    // from our memory; the descriptor is borrowed, so it stays open for the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            libc::c_long::from(pidfd.as_raw_fd()),
            0_i64,
            std::ptr::null::<libc::siginfo_t>(),
            0_i64,
        )
    };
    if r == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::ESRCH) => Ok(false),
        Some(libc::EPERM) => Ok(true),
        _ => Err(e),
    }
}

/// The page size (locking and `madvise` work on whole pages).
fn page_size() -> usize {
    static PAGE: OnceLock<usize> = OnceLock::new();
    *PAGE.get_or_init(|| {
        nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
            .ok()
            .flatten()
            .and_then(|n| usize::try_from(n).ok())
            .filter(|n| n.is_power_of_two())
            .unwrap_or(4096)
    })
}

/// Set once a lock failed, so the warning is said once, not per key.
static LOCK_FAILED: AtomicBool = AtomicBool::new(false);

/// Whether every [`LockedBytes`] so far could be locked in memory (`Status`, tests).
pub fn memory_locked() -> bool {
    !LOCK_FAILED.load(Ordering::Relaxed)
}

/// Single locked pages given back by dropped [`LockedBytes`], zeroized, for the next one:
/// a data key opened for one request (a transit key, the keyring key a write seals with) then
/// costs no allocation, `mlock`, `madvise` and `munlock` (four system calls and page faults,
/// more than the request's cryptography).
static SPARE_PAGES: std::sync::Mutex<Vec<SparePage>> = std::sync::Mutex::new(Vec::new());
/// Spare pages kept at most (a page each: 256 KiB of locked memory with 4 KiB pages).
const MAX_SPARE_PAGES: usize = 64;

/// A zeroized page, still locked (if `locked`) and `MADV_DONTDUMP`, owned by the spare list.
struct SparePage {
    ptr: NonNull<u8>,
    locked: bool,
}

// SAFETY: a spare page is owned by the list alone (no other pointer to it exists), like a
// `Box<[u8]>` moved between threads.
unsafe impl Send for SparePage {}

fn spare_pages() -> std::sync::MutexGuard<'static, Vec<SparePage>> {
    SPARE_PAGES
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Secret bytes in pages of their own: locked in RAM, left out of core dumps, zeroized before
/// they are freed. For keys: the long-lived ones (the VMK, the keyring's data keys), which sit
/// in memory for as long as the vault is open, and the ones opened for one request, whose
/// pages are reused (one-page allocations go back to a bounded spare list, zeroized and still
/// locked, instead of being unlocked and freed).
///
/// Own pages, because locks do not nest: `munlock` of a page shared with another secret would
/// unlock that one too. If the kernel refuses the lock (`RLIMIT_MEMLOCK` too low), the bytes are
/// still zeroized and kept out of dumps, and the daemon says once, loudly, which limit to raise:
/// refusing to unseal would turn a tuning problem into an outage.
pub struct LockedBytes<const N: usize> {
    ptr: NonNull<[u8; N]>,
    layout: Layout,
    locked: bool,
}

// SAFETY: `LockedBytes` owns its allocation exclusively (like a `Box<[u8]>`); shared access
// only reads through `&self`, mutation needs `&mut self`.
unsafe impl<const N: usize> Send for LockedBytes<N> {}
// SAFETY: as above: no interior mutability.
unsafe impl<const N: usize> Sync for LockedBytes<N> {}

impl<const N: usize> LockedBytes<N> {
    /// `N` zero bytes in fresh, locked pages. Allocation failure aborts, as for any `Box`.
    pub fn zeroed() -> Self {
        let page = page_size();
        let size = N.max(1).div_ceil(page) * page;
        let layout = match Layout::from_size_align(size, page) {
            Ok(l) => l,
            Err(_) => std::alloc::handle_alloc_error(Layout::new::<u8>()),
        };
        if size == page {
            if let Some(spare) = spare_pages().pop() {
                return Self {
                    ptr: spare.ptr.cast::<[u8; N]>(),
                    layout,
                    locked: spare.locked,
                };
            }
        }
        // SAFETY: `layout` has a non-zero size.
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw.cast::<[u8; N]>()) else {
            std::alloc::handle_alloc_error(layout)
        };
        let region = ptr.cast::<std::ffi::c_void>();
        // SAFETY: `region` is the start of `size` bytes we own, page-aligned by `layout`.
        let locked = unsafe { mlock(region, size) }.is_ok();
        if !locked && !LOCK_FAILED.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                "cannot lock key memory (RLIMIT_MEMLOCK too low?): keys may reach swap; \
                 raise LimitMEMLOCK= or run with MemorySwapMax=0"
            );
        }
        // SAFETY: as above; MADV_DONTDUMP only changes what a core dump would include.
        if let Err(e) = unsafe { madvise(region, size, MmapAdvise::MADV_DONTDUMP) } {
            tracing::debug!(error = %e, "MADV_DONTDUMP failed");
        }
        Self {
            ptr,
            layout,
            locked,
        }
    }

    /// The bytes.
    pub fn get(&self) -> &[u8; N] {
        // SAFETY: `ptr` points to `layout.size() >= N` initialised bytes we own, and a byte
        // array needs no alignment.
        unsafe { self.ptr.as_ref() }
    }

    /// The bytes, to fill.
    pub fn get_mut(&mut self) -> &mut [u8; N] {
        // SAFETY: as in `get`, and `&mut self` makes this the only reference.
        unsafe { self.ptr.as_mut() }
    }

    /// Whether the pages are locked in RAM.
    pub fn is_locked(&self) -> bool {
        self.locked
    }
}

impl<const N: usize> Drop for LockedBytes<N> {
    fn drop(&mut self) {
        // SAFETY: the whole allocation is ours and initialised (alloc_zeroed).
        let all = unsafe {
            std::slice::from_raw_parts_mut(self.ptr.as_ptr().cast::<u8>(), self.layout.size())
        };
        zeroize::Zeroize::zeroize(all);
        if self.layout.size() == page_size() {
            let mut spare = spare_pages();
            if spare.len() < MAX_SPARE_PAGES {
                // Zeroized above; locked and left out of dumps as it was made.
                spare.push(SparePage {
                    ptr: self.ptr.cast::<u8>(),
                    locked: self.locked,
                });
                return;
            }
        }
        if self.locked {
            // SAFETY: the region locked in `zeroed`.
            let _ = unsafe { munlock(self.ptr.cast(), self.layout.size()) };
        }
        // SAFETY: allocated in `zeroed` with this layout, freed once.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr().cast::<u8>(), self.layout) };
    }
}

impl<const N: usize> std::fmt::Debug for LockedBytes<N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LockedBytes({N} bytes, redacted)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    fn vm_locked_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        crate::identity::status_field(&status, "VmLck")
            .and_then(|v| v.trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    #[test]
    fn locked_bytes_are_locked_zeroed_and_writable() {
        let before = vm_locked_kib();
        let mut b = LockedBytes::<32>::zeroed();
        assert_eq!(b.get(), &[0u8; 32]);
        b.get_mut().copy_from_slice(&[7u8; 32]);
        assert_eq!(b.get(), &[7u8; 32]);
        assert!(b.is_locked(), "mlock of one page should succeed");
        assert!(vm_locked_kib() > before, "VmLck did not grow");
        assert_eq!(format!("{b:?}"), "LockedBytes(32 bytes, redacted)");
        let (held, page) = (vm_locked_kib(), b.ptr.as_ptr() as usize);
        drop(b);
        // The page went to the spare list: zeroized, still locked, and the next one gets it.
        assert_eq!(vm_locked_kib(), held, "a spare page was unlocked");
        let again = LockedBytes::<32>::zeroed();
        assert_eq!(
            again.ptr.as_ptr() as usize,
            page,
            "the spare page was not reused"
        );
        assert_eq!(again.get(), &[0u8; 32], "a reused page was not zeroized");
        assert!(again.is_locked());
    }

    /// Past the spare list's bound, dropped pages are unlocked and freed.
    #[test]
    fn the_spare_list_is_bounded() {
        let before = vm_locked_kib();
        let many: Vec<_> = (0..MAX_SPARE_PAGES + 8)
            .map(|_| LockedBytes::<32>::zeroed())
            .collect();
        drop(many);
        assert_eq!(spare_pages().len(), MAX_SPARE_PAGES);
        let kib = u64::try_from(MAX_SPARE_PAGES * page_size() / 1024).unwrap();
        assert_eq!(
            vm_locked_kib(),
            before + kib,
            "only the spare list's pages stay locked"
        );
    }

    #[test]
    fn a_pidfd_tells_a_live_process_from_a_reaped_one() {
        let me = pidfd_open(std::process::id() as i32).unwrap();
        assert!(pidfd_alive(me.as_fd()).unwrap());
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let fd = pidfd_open(child.id() as i32).unwrap();
        child.wait().unwrap();
        assert!(!pidfd_alive(fd.as_fd()).unwrap(), "reaped, yet alive");
        assert!(
            pidfd_alive(std::io::stdin().as_fd()).is_err(),
            "not a pidfd"
        );
    }

    #[test]
    fn each_value_has_pages_of_its_own() {
        let a = LockedBytes::<32>::zeroed();
        let b = LockedBytes::<32>::zeroed();
        let page = page_size();
        assert_eq!(a.ptr.as_ptr() as usize % page, 0);
        assert_ne!(
            a.ptr.as_ptr() as usize / page,
            b.ptr.as_ptr() as usize / page
        );
    }
}
