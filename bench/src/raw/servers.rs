//! Two bare Unix-socket servers on tokio, the physical limit of the daemon's socket paths:
//!
//! - an echo server speaking Varlink's framing (NUL-terminated JSON): it parses each request
//!   as JSON and answers with a reply of GetSecret's exact shape and size, so the same
//!   `keyward::Client` code can call it and decode the answer. It runs in a process of its own
//!   ([`EchoProcess`]), on a runtime built as keywardd builds its own: a server in the
//!   benchmark's process would switch to and from its clients without changing address
//!   space, which no daemon can;
//! - a credential server that accepts and writes a fixed value, then closes: what systemd's
//!   `LoadCredential=` socket needs at the very least.

use std::io::{BufRead as _, BufReader as StdBufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use anyhow::{bail, Context as _, Result};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::runtime::Handle;

/// Serve the echo protocol on `path` until the runtime stops; every reply carries `value`.
///
/// # Errors
/// The socket can't be bound.
fn start_echo(rt: &Handle, path: &Path, value: &[u8]) -> Result<()> {
    let _guard = rt.enter();
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    let value = B64.encode(value);
    rt.spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(echo_connection(stream, value.clone()));
        }
    });
    Ok(())
}

/// The line [`serve_echo`] prints once it listens.
const ECHO_READY: &str = "echo ready";

/// Serve the echo protocol on `path` in this process until it is killed: the body of
/// `keyward-bench --echo-server`.
///
/// # Errors
/// The runtime can't start or the socket can't be bound.
pub fn serve_echo(path: &Path, value: &[u8]) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    start_echo(rt.handle(), path, value)?;
    println!("{ECHO_READY}");
    rt.block_on(std::future::pending::<()>());
    Ok(())
}

/// The echo server in a process of its own (this benchmark's binary, `--echo-server`); killed
/// when dropped.
pub struct EchoProcess(Child);

impl EchoProcess {
    /// Start it on `path` and wait until it listens.
    ///
    /// # Errors
    /// It can't start, or it exits before saying it listens.
    pub fn start(path: &Path) -> Result<EchoProcess> {
        let exe = std::env::current_exe().context("finding this benchmark's binary")?;
        let mut child = Command::new(exe)
            .arg("--echo-server")
            .arg(path)
            .stdout(Stdio::piped())
            .spawn()
            .context("starting the echo server")?;
        let ready = child.stdout.take().map(|out| {
            let mut line = String::new();
            StdBufReader::new(out).read_line(&mut line).map(|_| line)
        });
        let echo = EchoProcess(child);
        match ready {
            Some(Ok(line)) if line.trim_end() == ECHO_READY => Ok(echo),
            other => bail!("the echo server did not start: {other:?}"),
        }
    }
}

impl Drop for EchoProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn echo_connection(stream: UnixStream, value: String) {
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    let mut frame = Vec::with_capacity(512);
    loop {
        frame.clear();
        match read.read_until(0, &mut frame).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if frame.last() == Some(&0) {
            frame.pop();
        }
        // Parse the call as the daemon must; a malformed one ends the connection.
        if serde_json::from_slice::<serde_json::Value>(&frame).is_err() {
            return;
        }
        let reply = serde_json::json!({ "parameters": { "value": value, "version": 1 } });
        let Ok(mut out) = serde_json::to_vec(&reply) else {
            return;
        };
        out.push(0);
        if write.write_all(&out).await.is_err() {
            return;
        }
    }
}

/// Serve `value` to every connection on `path`: accept, write, close.
///
/// # Errors
/// The socket can't be bound.
pub fn start_credentials(rt: &Handle, path: &Path, value: &[u8]) -> Result<()> {
    let _guard = rt.enter();
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    let value = value.to_vec();
    rt.spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let value = value.clone();
            tokio::spawn(async move {
                let _ = stream.write_all(&value).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    Ok(())
}
