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
            reserve_zeroizing(&mut buf, additional);
            prop_assert_eq!(&buf[..], &content[..]);
            prop_assert!(buf.capacity() - buf.len() >= additional);
        }
    }
}
