//! Two bare Unix-socket servers on tokio, the physical limit of the daemon's socket paths:
//!
//! - an echo server speaking Varlink's framing (NUL-terminated JSON): it parses each request
//!   as JSON and answers with a reply of GetSecret's exact shape and size, so the same
//!   `keyward::Client` code can call it and decode the answer;
//! - a credential server that accepts and writes a fixed value, then closes: what systemd's
//!   `LoadCredential=` socket needs at the very least.

use std::path::Path;

use anyhow::{Context as _, Result};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::runtime::Handle;

/// Serve the echo protocol on `path` until the runtime stops; every reply carries `value`.
///
/// # Errors
/// The socket can't be bound.
pub fn start_echo(rt: &Handle, path: &Path, value: &[u8]) -> Result<()> {
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
