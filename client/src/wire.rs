//! Byte-level helpers the Varlink client, the server and the CLI share for buffers that may hold
//! secrets: JSON encoded into a zeroizing buffer of its exact final size, and growth by copying
//! into a fresh zeroizing buffer. Either way no reallocation leaves a copy of a secret behind in
//! freed memory.

use std::io;

use serde::Serialize;
use zeroize::Zeroizing;

/// Make room for `additional` bytes by copying into a new zeroizing buffer (the old one is
/// zeroized on drop), never by a reallocation.
pub fn reserve_zeroizing(buf: &mut Zeroizing<Vec<u8>>, additional: usize) {
    let len = buf.len();
    if buf.capacity() - len >= additional {
        return;
    }
    let capacity = (buf.capacity() * 2).max(len + additional);
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
        reserve_zeroizing(&mut b, 10);
        assert!(b.capacity() >= 12);
        assert_eq!(&b[..], b"ab");
    }
}
