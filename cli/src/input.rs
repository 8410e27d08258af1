//! Reading what the admin hands the CLI: secret values, data to sign, PIN files and recovery
//! shares — from files or stdin, never from argv.
//!
//! Everything that may be secret lands in zeroizing buffers that are bounded and grown by
//! copying (no reallocation leaves a copy behind), and no error message quotes the input. A
//! recovery share is checked here with the daemon's own reader
//! ([`keyward::recovery_share::parse`]) before anything sends it: a typo is named at once,
//! for the reason keywardd would give, and never reaches the daemon.

use std::fs::File;
use std::io::{self, BufRead, IsTerminal as _, Read, Write};
use std::path::Path;

use keyward::api::SecretString;
use zeroize::{Zeroize, Zeroizing};

use super::CliError;

/// Longest PIN file accepted.
pub const MAX_PIN_LEN: usize = 4096;

/// Longest recovery share line accepted.
pub const MAX_SHARE_LEN: usize = 8192;

const CHUNK: usize = 16 * 1024;

/// Read all of `reader`, at most `limit` bytes.
///
/// # Errors
/// A read error, or more than `limit` bytes (named `what` in the message).
pub fn read_bounded(
    mut reader: impl Read,
    limit: usize,
    what: &str,
) -> Result<Zeroizing<Vec<u8>>, CliError> {
    let mut buf = Zeroizing::new(Vec::new());
    loop {
        let len = buf.len();
        let want = CHUNK.min(limit + 1 - len);
        keyward::wire::reserve_zeroizing(&mut buf, want, limit + 1);
        buf.resize(len + want, 0);
        let n = loop {
            match reader.read(&mut buf[len..]) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(CliError::Local(format!("cannot read {what}: {e}"))),
            }
        };
        buf.truncate(len + n);
        if n == 0 {
            return Ok(buf);
        }
        if buf.len() > limit {
            return Err(CliError::Local(format!(
                "{what} is larger than {limit} bytes"
            )));
        }
    }
}

/// The contents of `path`, at most `limit` bytes.
///
/// # Errors
/// The file can't be opened or read, or is too large.
pub fn read_file(path: &Path, limit: usize, what: &str) -> Result<Zeroizing<Vec<u8>>, CliError> {
    let file = File::open(path)
        .map_err(|e| CliError::Local(format!("cannot open {}: {e}", path.display())))?;
    read_bounded(file, limit, &format!("{what} ({})", path.display()))
}

/// A value from `--file`, or else all of stdin. An interactive stdin is refused: `hint` says
/// how to give the value instead.
///
/// # Errors
/// A terminal on stdin (usage), unreadable input, or more than `limit` bytes.
pub fn file_or_stdin(
    file: Option<&Path>,
    limit: usize,
    what: &str,
    hint: &str,
) -> Result<Zeroizing<Vec<u8>>, CliError> {
    match file {
        Some(path) => read_file(path, limit, what),
        None => {
            let stdin = io::stdin();
            if stdin.is_terminal() {
                return Err(CliError::Usage(format!(
                    "refusing to read {what} from a terminal: {hint}"
                )));
            }
            read_bounded(stdin.lock(), limit, &format!("{what} from stdin"))
        }
    }
}

/// Bytes as a secret string: valid UTF-8, the trailing newline removed, not empty.
fn secret_text(mut bytes: Zeroizing<Vec<u8>>, what: &str) -> Result<SecretString, CliError> {
    while matches!(bytes.last(), Some(b'\n' | b'\r')) {
        if let Some(b) = bytes.last_mut() {
            *b = 0;
        }
        bytes.pop();
    }
    if bytes.is_empty() {
        return Err(CliError::Usage(format!("{what} is empty")));
    }
    match String::from_utf8(std::mem::take(&mut *bytes)) {
        Ok(text) => Ok(SecretString(Zeroizing::new(text))),
        Err(e) => {
            e.into_bytes().zeroize();
            Err(CliError::Usage(format!("{what} is not valid UTF-8 text")))
        }
    }
}

/// A PIN from a file (a trailing newline is dropped).
///
/// # Errors
/// The file can't be read, is too long, empty, or not text.
pub fn read_pin_file(path: &Path) -> Result<SecretString, CliError> {
    let bytes = read_file(path, MAX_PIN_LEN, "the PIN file")?;
    secret_text(bytes, &format!("the PIN in {}", path.display()))
}

/// A PEM public key file, sent as its text: the daemon parses it (and never reads a path a
/// client names).
///
/// # Errors
/// The file can't be read, is larger than 16 KiB, or is not text.
pub fn read_public_key_pem(path: &Path) -> Result<String, CliError> {
    let bytes = read_file(path, 16 * 1024, "the public key file")?;
    String::from_utf8(bytes.to_vec())
        .map_err(|_| CliError::Usage(format!("{} is not a PEM text file", path.display())))
}

/// One line of `reader` (without its newline), or `None` at end of input.
///
/// # Errors
/// A read error, or a line longer than `limit`.
pub fn read_line_bounded(
    reader: &mut impl BufRead,
    limit: usize,
) -> io::Result<Option<Zeroizing<Vec<u8>>>> {
    // Allocated once at the bound: a line never makes it reallocate.
    let mut line = Zeroizing::new(Vec::with_capacity(limit));
    let mut seen_any = false;
    loop {
        let available = match reader.fill_buf() {
            Ok(buf) => buf,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if available.is_empty() {
            return Ok(seen_any.then_some(line));
        }
        seen_any = true;
        let (take, done) = match available.iter().position(|&b| b == b'\n') {
            Some(i) => (i, true),
            None => (available.len(), false),
        };
        if line.len() + take > limit {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("a line longer than {limit} bytes"),
            ));
        }
        line.extend_from_slice(&available[..take]);
        reader.consume(take + usize::from(done));
        if done {
            return Ok(Some(line));
        }
    }
}

/// A buffered reader whose buffer is zeroizing (std's `BufReader` frees its buffer without
/// wiping it). Its buffer is as large as std's stdin buffer or larger, so reads through it
/// bypass that one.
pub struct ZeroizingReader<R> {
    inner: R,
    buf: Zeroizing<Vec<u8>>,
    pos: usize,
}

impl<R> std::fmt::Debug for ZeroizingReader<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZeroizingReader").finish_non_exhaustive()
    }
}

impl<R: Read> ZeroizingReader<R> {
    /// Buffer `inner`.
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            buf: Zeroizing::new(Vec::with_capacity(CHUNK)),
            pos: 0,
        }
    }
}

impl<R: Read> Read for ZeroizingReader<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let available = self.fill_buf()?;
        let n = available.len().min(out.len());
        out[..n].copy_from_slice(&available[..n]);
        self.consume(n);
        Ok(n)
    }
}

impl<R: Read> BufRead for ZeroizingReader<R> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        if self.pos >= self.buf.len() {
            self.buf.zeroize();
            self.buf.resize(CHUNK, 0);
            self.pos = 0;
            let n = loop {
                match self.inner.read(&mut self.buf) {
                    Ok(n) => break n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        self.buf.truncate(0);
                        return Err(e);
                    }
                }
            };
            self.buf.truncate(n);
        }
        Ok(&self.buf[self.pos..])
    }

    fn consume(&mut self, n: usize) {
        self.pos = (self.pos + n).min(self.buf.len());
    }
}

/// Recovery shares, one per line, read lazily (so an interactive unseal stops asking once
/// the vault opens). Blank lines and `#` comments are skipped. Each share must read as one
/// (its check group catches a typo); one that does not is an error in its place, so that the
/// caller stops before sending it.
pub struct Shares<R> {
    reader: R,
    /// Prompt on stderr before each share (an interactive terminal).
    prompt: bool,
    count: usize,
    source: String,
}

impl<R> std::fmt::Debug for Shares<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shares")
            .field("source", &self.source)
            .field("count", &self.count)
            .finish_non_exhaustive()
    }
}

impl<R: BufRead> Shares<R> {
    /// Shares from `reader`, named `source` in errors.
    pub fn new(reader: R, source: impl Into<String>, prompt: bool) -> Self {
        Self {
            reader,
            prompt,
            count: 0,
            source: source.into(),
        }
    }
}

impl<R: BufRead> Iterator for Shares<R> {
    type Item = Result<SecretString, CliError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if self.prompt {
                let mut err = io::stderr();
                let _ = write!(err, "recovery share {} (hidden): ", self.count + 1);
                let _ = err.flush();
            }
            let line = read_line_bounded(&mut self.reader, MAX_SHARE_LEN);
            if self.prompt {
                let _ = writeln!(io::stderr());
            }
            let line = match line {
                Ok(Some(line)) => line,
                Ok(None) => return None,
                Err(e) => {
                    return Some(Err(CliError::Local(format!(
                        "cannot read recovery shares from {}: {e}",
                        self.source
                    ))))
                }
            };
            let text = line.trim_ascii();
            if text.is_empty() || text.starts_with(b"#") {
                continue;
            }
            self.count += 1;
            let share = Zeroizing::new(text.to_vec());
            let what = format!("recovery share {}", self.count);
            return Some(secret_text(share, &what).and_then(|share| {
                match keyward::recovery_share::parse(share.expose()) {
                    Ok(_) => Ok(share),
                    Err(e) => Err(CliError::Usage(format!("{what} not sent: {e}"))),
                }
            }));
        }
    }
}

/// Turns terminal echo off while alive (shares typed at a terminal are not shown), and back
/// on when dropped.
#[derive(Debug)]
pub struct NoEcho {
    saved: Option<nix::sys::termios::Termios>,
}

impl NoEcho {
    /// Echo off on stdin if it is a terminal; otherwise nothing.
    pub fn stdin() -> Self {
        use nix::sys::termios::{tcgetattr, tcsetattr, LocalFlags, SetArg};
        let stdin = io::stdin();
        if !stdin.is_terminal() {
            return Self { saved: None };
        }
        let Ok(saved) = tcgetattr(&stdin) else {
            return Self { saved: None };
        };
        let mut quiet = saved.clone();
        quiet.local_flags.remove(LocalFlags::ECHO);
        match tcsetattr(&stdin, SetArg::TCSAFLUSH, &quiet) {
            Ok(()) => Self { saved: Some(saved) },
            Err(_) => Self { saved: None },
        }
    }
}

impl Drop for NoEcho {
    fn drop(&mut self) {
        if let Some(saved) = &self.saved {
            let _ = nix::sys::termios::tcsetattr(
                io::stdin(),
                nix::sys::termios::SetArg::TCSAFLUSH,
                saved,
            );
        }
    }
}

/// Write `bytes` to `path`, created (or truncated) with mode 0600 — for secret values.
///
/// # Errors
/// The file can't be created or written.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<(), CliError> {
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    let fail = |e: io::Error| CliError::Local(format!("cannot write {}: {e}", path.display()));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(fail)?;
    // An existing file keeps its mode on open: tighten it before the secret goes in.
    file.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(fail)?;
    file.write_all(bytes).map_err(fail)?;
    file.sync_all().map_err(fail)
}

/// Write `bytes` to `path` (public data: keys, signatures).
///
/// # Errors
/// The file can't be written.
pub fn write_public(path: &Path, bytes: &[u8]) -> Result<(), CliError> {
    std::fs::write(path, bytes)
        .map_err(|e| CliError::Local(format!("cannot write {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    use keyward::recovery_share;

    /// Share `i` of a 2-of-n test set.
    fn share(i: u8) -> String {
        recovery_share::render(&[0x5E, 0x70, 0x1D, 0x00], 2, i, &[i; 32]).to_string()
    }

    fn shares(input: &str) -> Vec<String> {
        Shares::new(input.as_bytes(), "test", false)
            .map(|s| s.unwrap().expose().to_owned())
            .collect()
    }

    #[test]
    fn shares_are_read_one_per_line_skipping_blanks_and_comments() {
        let (one, two, three) = (share(1), share(2), share(3));
        let lower = three.to_lowercase();
        assert_eq!(
            shares(&format!("  {one} \n\n# a comment\r\n{two}\r\n{lower}")),
            [one.as_str(), two.as_str(), lower.as_str()],
            "each share as typed (the daemon reads it as forgivingly)"
        );
        assert!(shares("").is_empty());
        assert!(shares("\n \n").is_empty());
    }

    #[test]
    fn shares_are_read_lazily() {
        let rest = format!("{}\n{}\n", share(2), share(3));
        let text = format!("{}\n{rest}", share(1));
        let mut input = text.as_bytes();
        let mut it = Shares::new(&mut input, "test", false);
        assert_eq!(it.next().unwrap().unwrap().expose(), share(1));
        drop(it);
        assert_eq!(
            input,
            rest.as_bytes(),
            "nothing read beyond the first share"
        );
    }

    /// A share that does not read is refused where it stands, with the reason keywardd gives
    /// (the shared reader's), as bad input; it never quotes the share.
    #[test]
    fn a_mistyped_share_is_refused_in_its_place_with_the_daemons_reason() {
        let good = share(1);
        let mut typo = share(2);
        let last = typo.pop().unwrap();
        typo.push(if last == 'A' { 'B' } else { 'A' });
        let text = format!("{good}\n{typo}\n{}\nnot a share\n", share(3));
        let mut it = Shares::new(text.as_bytes(), "test", false);
        assert_eq!(it.next().unwrap().unwrap().expose(), good);
        let e = it.next().unwrap().unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "recovery share 2 not sent: {}",
                recovery_share::parse(&typo).unwrap_err()
            )
        );
        assert_eq!(
            e.to_string(),
            "recovery share 2 not sent: share has a typo: its checksum does not match"
        );
        assert_eq!(e.exit_code(), 2);
        assert!(!e.to_string().contains(&typo[20..30]), "{e}");
        assert_eq!(it.next().unwrap().unwrap().expose(), share(3));
        let e = it.next().unwrap().unwrap_err();
        assert!(
            e.to_string()
                .starts_with("recovery share 4 not sent: not a recovery share: "),
            "{e}"
        );
    }

    #[test]
    fn an_overlong_share_line_is_an_error_that_quotes_nothing() {
        let long = "s".repeat(MAX_SHARE_LEN + 1);
        let e = Shares::new(long.as_bytes(), "stdin", false)
            .next()
            .unwrap()
            .unwrap_err();
        assert!(!e.to_string().contains("sss"), "{e}");
    }

    #[test]
    fn bounded_reads() {
        assert_eq!(&*read_bounded(&b"abc"[..], 3, "x").unwrap(), b"abc");
        let e = read_bounded(&b"abcd"[..], 3, "the secret").unwrap_err();
        assert!(e.to_string().contains("larger than 3 bytes"), "{e}");
        let big = vec![7u8; 100_000];
        assert_eq!(read_bounded(&big[..], 100_000, "x").unwrap().len(), 100_000);
    }

    #[test]
    fn pin_files_lose_their_newline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pin");
        std::fs::write(&path, b"1234\n").unwrap();
        assert_eq!(read_pin_file(&path).unwrap().expose(), "1234");
        std::fs::write(&path, b"\n").unwrap();
        assert!(read_pin_file(&path).is_err());
        std::fs::write(&path, b"\xff\xfe").unwrap();
        assert!(read_pin_file(&path).is_err());
    }

    #[test]
    fn private_files_are_0600_even_when_they_existed() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out");
        std::fs::write(&path, b"old and longer").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_private(&path, b"new").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
}
