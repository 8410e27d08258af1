//! Short blocking calls made right where the request runs: a signature on a token session, a
//! read of the store.
//!
//! Why not hand them to another thread (`spawn_blocking`, an actor's queue): the call itself
//! takes tens of microseconds, about what two thread hand-offs cost (one to wake the thread
//! that does the work, one to wake the task waiting for it), so the hand-offs would double the
//! latency. On the multi-threaded runtime (keywardd's) [`here`] runs the call through
//! [`tokio::task::block_in_place`]: this worker's other tasks move to another thread while the
//! call runs, so a slow or hung device holds up its own request, never the runtime.
//!
//! Must not: be used for work that waits on something unbounded by design (a lock held across
//! awaits, a queue), or for long work whose caller must be able to time out (that stays on a
//! thread of its own, like the device actor's).

/// Run `f` on this thread, telling the runtime that it blocks. Outside a multi-threaded
/// runtime (a current-thread runtime in a unit test, no runtime at all) it just runs `f`.
pub fn here<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}
