//! The Varlink decoder as a connection runs it: a byte stream cut into reads of varying sizes
//! goes through `FrameBuf` (NUL framing under a size bound) and every frame through
//! `parse_frame` (envelope, flags, method, typed parameters).
//!
//! Checks, beyond "no panic": frames come out exactly as a plain NUL-split of the stream
//! says, `TooLarge` exactly when a frame outgrows the bound, the buffer never holds more than
//! the bound, and whatever the transport answers itself is one well-formed reply frame.
//!
//! Input: byte 0 picks the frame bound, byte 1 the read sizes, the rest is the stream.
#![no_main]

use keyward_policy::Identity;
use keywardd::identity::{Caller, Via};
use keyward_proto::wire::{FrameBuf, Next};
use keywardd::transport::varlink::{encode_result, parse_frame, Call};
use libfuzzer_sys::fuzz_target;

/// Small bounds reach `TooLarge` often; the real one (2 MiB) checks nothing overflows.
const BOUNDS: [usize; 5] = [0, 7, 64, 4096, keyward_proto::api::MAX_FRAME_LEN];

fuzz_target!(|data: &[u8]| {
    let [bound, reads, stream @ ..] = data else {
        return;
    };
    let max_frame = BOUNDS[usize::from(*bound) % BOUNDS.len()];
    let read_sizes = [1, 2, 3, 7, 64, 4096, 1 << 20];
    let caller = Caller {
        who: Identity {
            uid: 1000,
            gid: 1000,
            ..Identity::default()
        },
        pid: None,
        via: Via::Varlink,
    };

    let mut expected = stream.split(|&b| b == 0).peekable();
    let mut frames = FrameBuf::new(max_frame);
    let mut at = 0;
    let mut turn = usize::from(*reads);
    loop {
        loop {
            match frames.next_frame() {
                Next::Frame(range) => {
                    let frame = frames.frame(range);
                    let want = expected.next();
                    assert_eq!(Some(frame), want, "frames come out as a NUL-split says");
                    assert!(frame.len() <= max_frame);
                    check_call(parse_frame(frame, &caller));
                }
                Next::TooLarge => {
                    let want = expected.next().unwrap_or_default();
                    assert!(want.len() > max_frame, "TooLarge only past the bound");
                    return;
                }
                Next::Incomplete => break,
            }
        }
        if at == stream.len() {
            // What is left is one unfinished frame within the bound.
            let rest = expected.next().unwrap_or_default();
            assert!(expected.next().is_none());
            assert!(rest.len() <= max_frame);
            return;
        }
        let space = frames.space();
        assert!(!space.is_empty());
        let n = read_sizes[turn % read_sizes.len()]
            .min(space.len())
            .min(stream.len() - at);
        turn = turn.wrapping_mul(31).wrapping_add(7);
        space[..n].copy_from_slice(&stream[at..at + n]);
        frames.filled(n);
        at += n;
        assert!(frames.capacity() <= max_frame + 1, "memory bound");
    }
});

fn check_call(call: Call) {
    match call {
        Call::Handler { request, .. } => {
            assert!(!request.method().is_empty());
        }
        Call::Answer { result, .. } => {
            let reply = encode_result(&result, keyward_proto::api::MAX_FRAME_LEN);
            let (last, json) = reply.split_last().expect("a reply is never empty");
            assert_eq!(*last, 0);
            assert!(!json.contains(&0), "one NUL, at the end");
            let value: serde_json::Value = serde_json::from_slice(json).expect("valid JSON");
            assert!(value["parameters"].is_object(), "{value}");
        }
    }
}
