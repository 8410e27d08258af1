//! The durable-write limit: one row per transaction into an SQLite file in WAL mode with
//! `synchronous=FULL` (an fsync of the WAL per commit), the row shaped like a stored secret
//! version, on the same filesystem as the daemon's database.
//!
//! Measured in steady state: a WAL that is still growing makes every fsync also commit the
//! file's new size to the filesystem journal, which halves the commit rate on ext4. A running
//! daemon's WAL has long reached its size, so the baseline's is grown first, as far as the
//! daemon's `journal_size_limit` keeps it.

use std::path::Path;

use anyhow::{Context as _, Result};
use rusqlite::{params, Connection};

/// An open database with the table the loop writes to.
#[derive(Debug)]
pub struct RawCommits {
    conn: Connection,
    /// The row name this connection writes (one per connection: versions don't collide).
    name: String,
    next: u64,
}

impl RawCommits {
    /// Create `path` (WAL, `synchronous=FULL`) with a table like the daemon's `secrets`.
    ///
    /// # Errors
    /// SQLite failures.
    pub fn create(path: &Path) -> Result<Self> {
        let conn = Connection::open(path).with_context(|| format!("opening {}", path.display()))?;
        let mode: String =
            conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
        anyhow::ensure!(mode.eq_ignore_ascii_case("wal"), "journal_mode is {mode}");
        conn.pragma_update(None, "synchronous", "FULL")?;
        // As the daemon's store: after a checkpoint the WAL is cut back to 4 MiB, not to zero.
        conn.pragma_update(None, "journal_size_limit", 4 * 1024 * 1024)?;
        conn.execute_batch(
            "CREATE TABLE secrets (
                name TEXT NOT NULL,
                version INTEGER NOT NULL,
                term INTEGER NOT NULL,
                ciphertext BLOB NOT NULL,
                created TEXT NOT NULL,
                PRIMARY KEY (name, version)
            ) STRICT;",
        )?;
        // Grow the WAL past one checkpoint (1000 pages), then empty the table again.
        conn.execute_batch("BEGIN")?;
        {
            let mut grow = conn.prepare(
                "INSERT INTO secrets (name, version, term, ciphertext, created)
                 VALUES ('warm', ?1, 1, zeroblob(4000), '')",
            )?;
            for i in 1..=1300 {
                grow.execute([i])?;
            }
        }
        conn.execute_batch("COMMIT; PRAGMA wal_checkpoint(PASSIVE); DELETE FROM secrets;")?;
        Ok(Self {
            conn,
            name: "bench/put/0".into(),
            next: 1,
        })
    }

    /// Another connection to the database [`RawCommits::create`] made, writing rows of its own:
    /// several of them are concurrent writers, each committing its own rows, waiting for the
    /// write lock as SQLite makes them.
    ///
    /// # Errors
    /// SQLite failures.
    pub fn open(path: &Path, lane: usize) -> Result<Self> {
        let conn = Connection::open(path).with_context(|| format!("opening {}", path.display()))?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        Ok(Self {
            conn,
            name: format!("bench/put/{lane}"),
            next: 1,
        })
    }

    /// Commit one row (its own transaction; durable when this returns).
    ///
    /// # Errors
    /// SQLite failures.
    pub fn commit_one(&mut self, ciphertext: &[u8]) -> Result<()> {
        let mut stmt = self.conn.prepare_cached(
            "INSERT INTO secrets (name, version, term, ciphertext, created)
             VALUES (?1, ?2, 1, ?3, '2026-01-01T00:00:00Z')",
        )?;
        stmt.execute(params![self.name, self.next, ciphertext])?;
        self.next += 1;
        Ok(())
    }
}
