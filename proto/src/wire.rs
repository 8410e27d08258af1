//! The Varlink framing both ends use, for buffers that may hold secrets: JSON encoded into a
//! zeroizing buffer of its exact final size ([`encode_frame`]), the receive buffer that splits a
//! stream into NUL-terminated messages within a bound ([`FrameBuf`]), and growth by copying into
//! a fresh zeroizing buffer ([`reserve_zeroizing`]). No reallocation leaves a copy of a secret
//! behind in freed memory. No I/O: the caller reads and writes the socket.

use std::fmt;
use std::io;
use std::ops::Range;

use serde::Serialize;
use zeroize::{Zeroize, Zeroizing};

/// How much is read from a socket at a time; also the buffer an idle connection keeps.
pub const READ_CHUNK: usize = 16 * 1024;

/// Make room for `additional` bytes by copying into a new zeroizing buffer (the old one is
/// zeroized on drop), never by a reallocation. The capacity doubles, but not past `limit`
/// (unless `additional` itself needs more), so a bounded buffer stays bounded.
pub fn reserve_zeroizing(buf: &mut Zeroizing<Vec<u8>>, additional: usize, limit: usize) {
    let len = buf.len();
    if buf.capacity() - len >= additional {
        return;
    }
    let needed = len + additional;
    let capacity = (buf.capacity() * 2).max(needed).min(limit.max(needed));
    let mut bigger = Zeroizing::new(Vec::with_capacity(capacity));
    bigger.extend_from_slice(buf);
    *buf = bigger;
}

/// Counts what serde_json would write, so the real buffer is allocated once at its final size.
struct Counter(usize);

impl io::Write for Counter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// `msg` as JSON plus the terminating NUL of a Varlink frame, in a zeroizing buffer that never
/// reallocated; `Ok(None)` when the JSON is longer than `max` bytes.
///
/// # Errors
/// `msg` can't be serialized.
pub fn encode_frame<T: Serialize>(
    msg: &T,
    max: usize,
) -> Result<Option<Zeroizing<Vec<u8>>>, serde_json::Error> {
    let mut count = Counter(0);
    serde_json::to_writer(&mut count, msg)?;
    if count.0 > max {
        return Ok(None);
    }
    let mut out = Zeroizing::new(Vec::with_capacity(count.0 + 1));
    serde_json::to_writer(&mut *out, msg)?;
    out.push(0);
    Ok(Some(out))
}

/// What the buffer holds next: the result of [`FrameBuf::next_frame`].
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// A complete message (NUL excluded) at this range of the buffer.
    Frame(Range<usize>),
    /// More than `max_frame` bytes without a NUL.
    TooLarge,
    /// Read more.
    Incomplete,
}

/// The receive buffer of one connection. It never holds more than `max_frame + 1` bytes, is
/// allocated in steps (never past `max_frame + 1`), grows by copying into a new zeroizing
/// buffer (the old one is zeroized), and wipes consumed frames.
///
/// Use: read into [`FrameBuf::space`], report the count with [`FrameBuf::filled`], then take
/// frames with [`FrameBuf::next_frame`] until it says [`Next::Incomplete`]. Public so that the
/// fuzz targets drive the same splitting a connection does.
///
/// Both ends use it: the daemon for requests, the client for replies.
pub struct FrameBuf {
    /// Received bytes up to `end`, then zeroed room to read into. The room is zero-filled
    /// once, when the buffer grows, not on every read: a client sending a byte at a time
    /// must not make each read clear a whole chunk.
    buf: Zeroizing<Vec<u8>>,
    /// End of the received bytes.
    end: usize,
    /// First byte not yet handed out as a frame.
    start: usize,
    /// Bytes after `start` already searched for a NUL.
    scanned: usize,
    max_frame: usize,
}

impl fmt::Debug for FrameBuf {
    /// Sizes only: the buffer holds request bytes, which may be secrets.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FrameBuf")
            .field("received", &self.end)
            .field("capacity", &self.buf.capacity())
            .field("start", &self.start)
            .field("max_frame", &self.max_frame)
            .finish_non_exhaustive()
    }
}

impl FrameBuf {
    /// An empty buffer for frames of at most `max_frame` bytes (NUL excluded).
    pub fn new(max_frame: usize) -> Self {
        Self {
            buf: Zeroizing::new(Vec::new()),
            end: 0,
            start: 0,
            scanned: 0,
            max_frame,
        }
    }

    /// The next complete frame, if the buffer holds one; [`Next::TooLarge`] once more than
    /// `max_frame` bytes arrived without a NUL (the connection must then be closed: it is out
    /// of step).
    pub fn next_frame(&mut self) -> Next {
        let from = self.start + self.scanned;
        let unscanned = self.buf.get(from..self.end).unwrap_or_default();
        match unscanned.iter().position(|&b| b == 0) {
            Some(i) => {
                let end = from + i;
                if end - self.start > self.max_frame {
                    return Next::TooLarge;
                }
                let frame = self.start..end;
                self.start = end + 1;
                self.scanned = 0;
                Next::Frame(frame)
            }
            None => {
                self.scanned = self.end - self.start;
                if self.scanned > self.max_frame {
                    Next::TooLarge
                } else {
                    Next::Incomplete
                }
            }
        }
    }

    /// The bytes of a frame [`FrameBuf::next_frame`] just returned (empty for a range that is
    /// not one).
    pub fn frame(&self, range: Range<usize>) -> &[u8] {
        self.buf.get(range).unwrap_or_default()
    }

    /// A copy of a frame [`FrameBuf::next_frame`] just returned, wiping it from the buffer at
    /// once (for a reader that keeps the message, like the client: the buffer then holds no
    /// second copy until it is next compacted).
    pub fn take(&mut self, range: Range<usize>) -> Zeroizing<Vec<u8>> {
        match self.buf.get_mut(range) {
            Some(bytes) => {
                let copy = Zeroizing::new(bytes.to_vec());
                bytes.zeroize();
                copy
            }
            None => Zeroizing::new(Vec::new()),
        }
    }

    /// Bytes allocated for the buffer: never more than `max_frame + 1`, whatever a client
    /// sends, so a connection's memory is bounded.
    pub fn capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// Room to read into (at least one byte): consumed frames are wiped and dropped first.
    /// Call it only after [`FrameBuf::next_frame`] said [`Next::Incomplete`], so what is left
    /// is at most `max_frame` bytes.
    pub fn space(&mut self) -> &mut [u8] {
        if self.start > 0 {
            let rest = self.end - self.start;
            self.buf.copy_within(self.start..self.end, 0);
            self.buf[rest..self.end].zeroize();
            self.end = rest;
            self.start = 0;
        }
        if self.end == 0 && self.buf.capacity() > READ_CHUNK {
            // An idle connection keeps a small buffer; the big one is zeroized on drop.
            self.buf = Zeroizing::new(Vec::new());
        }
        let limit = self.max_frame.saturating_add(1);
        let want = READ_CHUNK.min(limit.saturating_sub(self.end)).max(1);
        let len = self.end + want;
        if self.buf.len() < len {
            self.buf.truncate(self.end);
            reserve_zeroizing(&mut self.buf, want, limit);
            self.buf.resize(len, 0);
        }
        let end = self.end;
        &mut self.buf[end..]
    }

    /// `n` bytes were read into the slice [`FrameBuf::space`] returned.
    pub fn filled(&mut self, n: usize) {
        self.end = (self.end + n).min(self.buf.len());
    }

    /// Whether bytes of a frame not yet complete are held (a peer that closes now closed in the
    /// middle of a message).
    pub fn holds_partial(&self) -> bool {
        self.end > self.start
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_exact_and_bounded() {
        let f = encode_frame(&serde_json::json!({"a": 1}), 100)
            .unwrap()
            .unwrap();
        assert_eq!(&f[..], b"{\"a\":1}\0");
        assert_eq!(f.capacity(), f.len());
        assert!(encode_frame(&"x".repeat(10), 5).unwrap().is_none());
        let mut b = Zeroizing::new(Vec::with_capacity(2));
        b.extend_from_slice(b"ab");
        reserve_zeroizing(&mut b, 10, usize::MAX);
        assert!(b.capacity() >= 12);
        assert_eq!(&b[..], b"ab");
    }

    #[test]
    fn the_receive_buffer_stays_bounded() {
        let max = 100_000;
        let mut frames = FrameBuf::new(max);
        let mut total = 0;
        let outcome = loop {
            match frames.next_frame() {
                Next::Incomplete => {}
                other => break other,
            }
            let space = frames.space();
            space.fill(b'x');
            let n = space.len();
            frames.filled(n);
            total += n;
            assert!(
                frames.buf.capacity() <= max + 1,
                "{}",
                frames.buf.capacity()
            );
        };
        assert_eq!(outcome, Next::TooLarge);
        assert_eq!(total, max + 1);
        // Frames are handed out in order; consumed ones are wiped when room is made.
        let mut frames = FrameBuf::new(max);
        let space = frames.space();
        space[..8].copy_from_slice(b"one\0two\0");
        frames.filled(8);
        assert_eq!(frames.next_frame(), Next::Frame(0..3));
        assert_eq!(frames.next_frame(), Next::Frame(4..7));
        assert_eq!(frames.next_frame(), Next::Incomplete);
        let _ = frames.space();
        assert!(frames.buf.iter().all(|&b| b == 0));
        // A partial frame survives compaction.
        let mut frames = FrameBuf::new(max);
        let space = frames.space();
        space[..6].copy_from_slice(b"a\0bcde");
        frames.filled(6);
        assert_eq!(frames.next_frame(), Next::Frame(0..1));
        assert_eq!(frames.next_frame(), Next::Incomplete);
        let space = frames.space();
        space[..2].copy_from_slice(b"f\0");
        frames.filled(2);
        assert_eq!(frames.next_frame(), Next::Frame(0..5));
        assert_eq!(&frames.buf[0..5], b"bcdef");
    }
}

/// Generated messages: a frame is the message's JSON and one NUL, its only one, and it decodes
/// back to the message; the bound is exact.
#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::Value;

    /// JSON without floats (serde_json prints them in a form that need not read back exactly):
    /// any text, control characters and NUL included, nested arrays and objects.
    fn json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            "\\PC{0,12}|[\\x00-\\x1f\"\\\\]{0,4}".prop_map(Value::from),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
                proptest::collection::btree_map("\\PC{0,8}", inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn encode_then_decode_is_the_identity(
            method in "[a-zA-Z.]{1,40}",
            parameters in json(),
            max in 0usize..400,
        ) {
            let message = serde_json::json!({ "method": method, "parameters": parameters });
            let text = serde_json::to_vec(&message).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let frame = encode_frame(&message, max).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let Some(frame) = frame else {
                prop_assert!(text.len() > max);
                return Ok(());
            };
            prop_assert!(text.len() <= max);
            prop_assert_eq!(frame.len(), text.len() + 1);
            prop_assert_eq!(frame.capacity(), frame.len(), "allocated once, at its final size");
            prop_assert_eq!(frame.iter().position(|&b| b == 0), Some(text.len()), "one NUL, last");
            let back: Value = serde_json::from_slice(&frame[..text.len()])
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(back, message);
        }

        /// Growth keeps the bytes and makes the room asked for, from any starting point.
        #[test]
        fn reserve_keeps_content_and_makes_room(
            content in proptest::collection::vec(any::<u8>(), 0..64),
            spare in 0usize..64,
            additional in 0usize..200,
        ) {
            let mut buf = Zeroizing::new(Vec::with_capacity(content.len() + spare));
            buf.extend_from_slice(&content);
            reserve_zeroizing(&mut buf, additional, usize::MAX);
            prop_assert_eq!(&buf[..], &content[..]);
            prop_assert!(buf.capacity() - buf.len() >= additional);
        }
    }
}
