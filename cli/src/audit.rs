//! `keyward audit verify|tail`: offline, on a copy of the log (or the live one); no daemon is
//! asked anything. The format and the checks are [`keyward::audit`]'s; this is the printing.

use std::fs::File;
use std::io::{self, Read as _, Seek as _, SeekFrom, Write as _};
use std::path::{Path, PathBuf};

use keyward::audit::{self, Report};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use serde_json::json;

use super::{AuditCommand, CliError};

/// Run an `audit` subcommand.
pub fn run(cmd: AuditCommand, json: bool) -> Result<(), CliError> {
    match cmd {
        AuditCommand::Verify {
            paths,
            public_key,
            expect_seq,
            anchor,
        } => verify(
            &paths,
            public_key.as_deref(),
            expect_seq,
            anchor.as_deref(),
            json,
        ),
        AuditCommand::Tail {
            path,
            lines,
            follow,
        } => tail(&path, lines, follow, json),
    }
}

/// The trusted key: `--public-key` (a file, or the key itself), else `audit.pub` beside the
/// log.
fn trusted_key(log: &Path, given: Option<&str>) -> Result<ed25519_dalek::VerifyingKey, CliError> {
    let (text, from) = match given {
        Some(g) if Path::new(g).is_file() => (read_text(Path::new(g))?, g.to_owned()),
        Some(g) => (g.to_owned(), "--public-key".to_owned()),
        None => {
            let beside = log
                .parent()
                .unwrap_or(Path::new("."))
                .join(audit::PUBLIC_KEY_FILE);
            if !beside.is_file() {
                return Err(CliError::Usage(format!(
                    "no public key to verify against: {} does not exist; give --public-key (the key `keyward status` shows)",
                    beside.display()
                )));
            }
            (read_text(&beside)?, beside.display().to_string())
        }
    };
    audit::decode_key(&text).map_err(|e| CliError::Usage(format!("{from}: {e}")))
}

fn read_text(path: &Path) -> Result<String, CliError> {
    std::fs::read_to_string(path)
        .map_err(|e| CliError::Local(format!("cannot read {}: {e}", path.display())))
}

/// The files to verify, oldest first: the paths as given, or the set in a directory.
fn files_of(paths: &[PathBuf]) -> Result<Vec<PathBuf>, CliError> {
    match paths {
        [dir] if dir.is_dir() => {
            let set = audit::set_in(dir)
                .map_err(|e| CliError::Local(format!("cannot read {}: {e}", dir.display())))?;
            if set.is_empty() {
                return Err(CliError::Usage(format!(
                    "{} holds no {} files",
                    dir.display(),
                    audit::LOG_FILE
                )));
            }
            Ok(set)
        }
        _ => Ok(paths.to_vec()),
    }
}

/// The anchor to check against: `--anchor`, else `audit.anchor` beside the live log when the
/// files given end with it.
fn anchor_of(
    files: &[PathBuf],
    given: Option<&Path>,
) -> Result<Option<(PathBuf, audit::CheckedAnchor)>, CliError> {
    let path = match given {
        Some(p) => p.to_owned(),
        None => {
            let Some(last) = files.last() else {
                return Ok(None);
            };
            if last.file_name().and_then(|n| n.to_str()) != Some(audit::LOG_FILE) {
                return Ok(None);
            }
            let beside = last
                .parent()
                .unwrap_or(Path::new("."))
                .join(audit::ANCHOR_FILE);
            if !beside.is_file() {
                return Ok(None);
            }
            beside
        }
    };
    let bytes = std::fs::read(&path)
        .map_err(|e| CliError::Local(format!("cannot read {}: {e}", path.display())))?;
    let anchor = audit::Anchor::parse(&bytes)
        .map_err(|e| CliError::Usage(format!("{}: not an anchor: {e}", path.display())))?;
    let checked = anchor.check().map_err(|problem| CliError::AuditInvalid {
        path: path.clone(),
        failure: audit::Failure {
            line: None,
            seq: Some(anchor.seq),
            problem,
        },
    })?;
    Ok(Some((path, checked)))
}

fn verify(
    paths: &[PathBuf],
    public_key: Option<&str>,
    expect_seq: Option<u64>,
    anchor: Option<&Path>,
    json: bool,
) -> Result<(), CliError> {
    let files = files_of(paths)?;
    let first = files.first().cloned().unwrap_or_default();
    let key = trusted_key(&first, public_key)?;
    let anchor = anchor_of(&files, anchor)?;
    // The set end to end, and where each file's lines start, to name a file and its line.
    let mut log = Vec::new();
    let mut starts = Vec::with_capacity(files.len());
    for path in &files {
        let bytes = std::fs::read(path)
            .map_err(|e| CliError::Local(format!("cannot read {}: {e}", path.display())))?;
        starts.push(audit::lines(&log).len());
        log.extend_from_slice(&bytes);
    }
    let expect = audit::Expect {
        anchor: anchor.as_ref().map(|(_, a)| a),
        last_seq: expect_seq,
    };
    let report = audit::verify_against(&log, &key, expect).map_err(|mut failure| {
        let mut path = files.last().cloned().unwrap_or_default();
        if let Some(line) = failure.line {
            let at = starts.iter().rposition(|&s| s < line).unwrap_or(0);
            path = files[at].clone();
            failure.line = Some(line - starts[at]);
        }
        CliError::AuditInvalid { path, failure }
    })?;
    let shown = files
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(" ");
    let text = if json {
        let mut doc = serde_json::to_value(&report).unwrap_or_default();
        if let Some(m) = doc.as_object_mut() {
            m.insert("ok".into(), json!(true));
            m.insert("trusted_key".into(), json!(audit::encode_key(&key)));
            m.insert("files".into(), json!(files));
            if let Some((path, _)) = &anchor {
                m.insert("anchor".into(), json!(path));
            }
        }
        format!(
            "{}\n",
            serde_json::to_string_pretty(&doc).unwrap_or_default()
        )
    } else {
        let mut t = report_text(Path::new(&shown), &report);
        if let Some((path, a)) = &anchor {
            use std::fmt::Write as _;
            let _ = writeln!(
                t,
                "matches the anchor {} (checkpoint seq {})",
                path.display(),
                a.seq
            );
        }
        t
    };
    write_out(text.as_bytes())
}

/// The report for people.
pub fn report_text(path: &Path, r: &Report) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let cp = &r.last_checkpoint;
    let _ = writeln!(
        s,
        "{}: OK: {} records (seq {} to {}), {} checkpoints",
        path.display(),
        r.records,
        r.first_seq,
        r.last_seq,
        r.checkpoints
    );
    let _ = writeln!(
        s,
        "last signed checkpoint: seq {} (line {}, {}, {})",
        cp.seq, cp.line, cp.time, cp.reason
    );
    let _ = writeln!(s, "signed by: {}", cp.public_key);
    if r.keys.len() > 1 {
        let _ = writeln!(
            s,
            "signing keys, handed over in this order: {}",
            r.keys.join(" -> ")
        );
    }
    if r.unsigned_tail > 0 {
        let _ = writeln!(
            s,
            "{} record(s) after it are protected by the hash chain only: cutting them off would go unnoticed offline",
            r.unsigned_tail
        );
    }
    for d in &r.damage {
        let _ = writeln!(
            s,
            "note: line {}: {} damaged bytes (a write cut short by a crash or a full disk), kept and noted by the daemon at seq {}",
            d.line, d.bytes, d.noted_at_seq
        );
    }
    for l in &r.lost {
        let _ = writeln!(
            s,
            "note: line {} (seq {}) declares {} record(s) before it that the daemon could not write ({} to {}: {}): a declared gap, not a deletion",
            l.line, l.declared_at_seq, l.records, l.first, l.last, l.reason
        );
    }
    s
}

fn write_out(bytes: &[u8]) -> Result<(), CliError> {
    let mut out = io::stdout().lock();
    out.write_all(bytes)
        .and_then(|()| out.flush())
        .map_err(|e| CliError::Local(format!("cannot write to stdout: {e}")))
}

/// One line of the log as printed: the JSON as it is (`--json`) or the human form.
fn show(line: &[u8], json: bool) -> String {
    match audit::parse(line) {
        Ok(_) if json => format!("{}\n", String::from_utf8_lossy(line)),
        Ok(record) => format!("{}\n", audit::human(&record)),
        Err(_) if json => format!(
            "{}\n",
            json!({ "unreadable": String::from_utf8_lossy(line) })
        ),
        Err(_) => format!("(unreadable line: {} bytes)\n", line.len()),
    }
}

fn tail(path: &Path, n: usize, follow: bool, json: bool) -> Result<(), CliError> {
    let local = |e: io::Error| CliError::Local(format!("{}: {e}", path.display()));
    // Watch before reading, so nothing appended in between is missed. The directory too: when
    // the log rolls over, the file is renamed and a new one appears under the name.
    let file_events = AddWatchFlags::IN_MODIFY
        | AddWatchFlags::IN_ATTRIB
        | AddWatchFlags::IN_CLOSE_WRITE
        | AddWatchFlags::IN_MOVE_SELF
        | AddWatchFlags::IN_DELETE_SELF;
    let inotify = if follow {
        let i = Inotify::init(InitFlags::IN_CLOEXEC).map_err(|e| local(e.into()))?;
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        i.add_watch(dir, AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO)
            .map_err(|e| local(e.into()))?;
        let wd = i
            .add_watch(path, file_events)
            .map_err(|e| local(e.into()))?;
        Some((i, wd))
    } else {
        None
    };
    let mut file = File::open(path).map_err(local)?;
    let mut data = Vec::new();
    file.read_to_end(&mut data).map_err(local)?;
    // Only complete lines: a partial one is printed when its newline arrives.
    let complete = data.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1);
    let lines = audit::lines(&data[..complete]);
    let mut text = String::new();
    for line in &lines[lines.len().saturating_sub(n)..] {
        text.push_str(&show(line.bytes, json));
    }
    write_out(text.as_bytes())?;
    let Some((inotify, mut watched)) = inotify else {
        return Ok(());
    };
    // The file was renamed away (rolled over): follow the name once what it held is printed.
    let mut moved = false;
    let mut offset = complete as u64;
    let mut pending: Vec<u8> = data[complete..].to_vec();
    loop {
        let len = file.metadata().map_err(local)?.len();
        if len < offset {
            // Replaced or truncated: start again from its beginning.
            offset = 0;
            pending.clear();
        }
        if len > offset {
            file.seek(SeekFrom::Start(offset)).map_err(local)?;
            let mut more = Vec::new();
            (&mut file)
                .take(len - offset)
                .read_to_end(&mut more)
                .map_err(local)?;
            offset += more.len() as u64;
            pending.extend_from_slice(&more);
            let complete = pending
                .iter()
                .rposition(|&b| b == b'\n')
                .map_or(0, |p| p + 1);
            let mut text = String::new();
            for line in audit::lines(&pending[..complete]) {
                text.push_str(&show(line.bytes, json));
            }
            pending.drain(..complete);
            write_out(text.as_bytes())?;
        }
        if moved {
            match File::open(path) {
                Ok(f) => {
                    // The new file under the name: watch it and print it from its start.
                    watched = inotify
                        .add_watch(path, file_events)
                        .map_err(|e| local(e.into()))?;
                    file = f;
                    offset = 0;
                    pending.clear();
                    moved = false;
                    continue;
                }
                // Not created yet: the directory's watch wakes us when it is.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(local(e)),
            }
        }
        // Blocks until the file or the directory changes.
        let events = inotify.read_events().map_err(|e| local(e.into()))?;
        moved |= events.iter().any(|e| {
            e.wd == watched
                && e.mask
                    .intersects(AddWatchFlags::IN_MOVE_SELF | AddWatchFlags::IN_DELETE_SELF)
        });
    }
}

/// For the `AuditInvalid` error's JSON form.
pub fn failure_json(path: &Path, f: &audit::Failure) -> serde_json::Value {
    json!({
        "path": path.display().to_string(),
        "line": f.line,
        "seq": f.seq,
        "problem": f.problem.to_string(),
    })
}
