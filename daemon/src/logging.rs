//! Where the daemon's log goes and in what form: straight into the journal when systemd
//! connected stderr to it (`JOURNAL_STREAM` names stderr), so every line keeps its priority and
//! its fields (`KEYWARD_METHOD=`, `KEYWARD_UNIT=` of the caller, …) stay searchable with
//! `journalctl KEYWARD_UNIT=postgresql.service`; otherwise plain text on stderr, coloured
//! only for a terminal.
//!
//! Must not: log a value, PIN or share (callers never pass one), or fail the start because the
//! journal is away (it falls back to stderr).

use std::io::IsTerminal as _;
use std::os::fd::AsFd as _;

use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _};

/// The filter: `KEYWARD_LOG` (an `EnvFilter`), else `info`.
fn filter() -> EnvFilter {
    EnvFilter::try_from_env("KEYWARD_LOG")
        // cryptoki reports every mechanism it can't name at ERROR while listing a token's
        // mechanisms: noise, not a fault.
        .unwrap_or_else(|_| EnvFilter::new("info,cryptoki::mechanism=off"))
}

/// Whether stderr is the journal stream systemd set up: `JOURNAL_STREAM` is `DEVICE:INODE` of
/// it, and stderr must still be that very file (a shell redirect would not be).
fn stderr_is_journal() -> bool {
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = stream.to_str().and_then(|s| s.split_once(':')) else {
        return false;
    };
    let Ok(stat) = nix::sys::stat::fstat(std::io::stderr().as_fd()) else {
        return false;
    };
    dev.parse::<u64>().ok() == Some(stat.st_dev) && ino.parse::<u64>().ok() == Some(stat.st_ino)
}

/// Install the daemon's subscriber. Returns whether it logs to the journal.
pub fn init() -> bool {
    if stderr_is_journal() {
        if let Ok(journald) = tracing_journald::layer() {
            let journald = journald
                .with_field_prefix(Some("KEYWARD".into()))
                .with_syslog_identifier("keywardd".into());
            tracing_subscriber::registry()
                .with(journald.with_filter(filter()))
                .init();
            return true;
        }
    }
    tracing_subscriber::fmt()
        .with_env_filter(filter())
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
    false
}
