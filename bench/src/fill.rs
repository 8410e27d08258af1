//! Filling a vault with many secrets for the scale figures, through the daemon's public API
//! only: `PutSecret` calls on several connections at once, each connection pipelined (its
//! calls written ahead of their replies, which the daemon answers in order), so the daemon's
//! store can commit many writes together. Every reply is read and must be a success. The
//! daemon reads the secrets back normally, which the scale phase checks on random names.

use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, ensure, Context as _, Result};
use keyward::api::{self, PutSecretParams, SecretValue};
use serde::Serialize;

/// Connections writing at once: enough for the store to batch commits, well under the
/// daemon's per-user connection bound.
pub const CONNECTIONS: u64 = 16;

/// The name of filled secret `i`.
pub fn name(i: u64) -> String {
    format!("fill/{i:08}")
}

/// The value of filled secret `i`: 32 bytes, distinct per secret, so a read-back proves the row.
pub fn value(i: u64) -> Vec<u8> {
    format!("value-of-secret-{i:016}").into_bytes()
}

/// One Varlink call, as the protocol frames it.
#[derive(Serialize)]
struct Call<'a> {
    method: &'a str,
    parameters: PutSecretParams,
}

/// Add secrets `from..to` (names [`name`], values [`value`]) through the running daemon's API
/// socket. Returns the time taken.
///
/// # Errors
/// A connection fails or the daemon refuses a write.
pub fn fill(socket: &Path, from: u64, to: u64) -> Result<Duration> {
    let started = Instant::now();
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..CONNECTIONS)
            .map(|k| {
                s.spawn(move || put_range(socket, (from + k..to).step_by(CONNECTIONS as usize)))
            })
            .collect();
        workers.into_iter().try_for_each(|w| {
            w.join()
                .map_err(|_| anyhow!("a fill connection panicked"))?
        })
    })?;
    Ok(started.elapsed())
}

/// `PutSecret` of each secret in `indices` on one connection: a writer thread sends the calls
/// while this one reads the replies (the kernel's socket buffers are the window).
fn put_range(socket: &Path, indices: impl Iterator<Item = u64> + Send) -> Result<()> {
    let indices: Vec<u64> = indices.collect();
    let stream = UnixStream::connect(socket)
        .with_context(|| format!("connecting to {}", socket.display()))?;
    let mut writer = stream.try_clone()?;
    let method = format!("{}.PutSecret", api::INTERFACE);
    let mut replies = BufReader::new(stream);
    std::thread::scope(|s| {
        let calls = &indices;
        let sender = s.spawn(move || -> Result<()> {
            for &i in calls {
                let call = Call {
                    method: &method,
                    parameters: PutSecretParams {
                        name: api::SecretName::try_from(name(i))?,
                        value: SecretValue::new(value(i)),
                    },
                };
                let frame = keyward::wire::encode_frame(&call, api::MAX_FRAME_LEN)?
                    .ok_or_else(|| anyhow!("a PutSecret call too large"))?;
                writer.write_all(&frame)?;
            }
            Ok(())
        });
        let mut frame = Vec::new();
        for answered in 0..calls.len() {
            frame.clear();
            ensure!(
                replies.read_until(0, &mut frame)? > 0,
                "the daemon closed the connection after {answered} of {} replies",
                calls.len()
            );
            frame.pop();
            let reply: serde_json::Value = serde_json::from_slice(&frame)?;
            ensure!(reply.get("error").is_none(), "PutSecret refused: {reply}");
        }
        sender
            .join()
            .map_err(|_| anyhow!("the fill writer panicked"))?
    })
}
