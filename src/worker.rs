//! Which worker a thread is: the index that per-worker state (plugin
//! instance pools, metric cells) is picked by.
//!
//! With `server.worker_threads = N` (N ≥ 2) the proxy listener is served
//! by N OS threads, each running its own current-thread Tokio runtime
//! (`server.rs`). Everything a request touches that is per connection or
//! per worker lives with the worker; state that must stay shared is
//! sharded by this index so that two workers never write the same cache
//! line on the request path. Any other thread (the main runtime's admin
//! API and background tasks, a test's runtime, a blocking loader thread)
//! has no index and uses the last shard.

use std::cell::Cell;

/// How many shards per-worker state has: one per worker up to 32 workers
/// (more share them) and one for every other thread.
pub(crate) const SHARDS: usize = 33;

thread_local! {
    static INDEX: Cell<Option<usize>> = const { Cell::new(None) };
}

/// Marks the calling thread as worker `index` for the rest of its life.
pub(crate) fn set_index(index: usize) {
    INDEX.with(|i| i.set(Some(index)));
}

/// This thread's worker index, if it is a worker.
pub(crate) fn index() -> Option<usize> {
    INDEX.with(|i| i.get())
}

/// The shard (of `shards`, at least 1) this thread uses: its worker index
/// modulo `shards - 1`, and the last shard for threads that are not
/// workers, so that the admin API and background tasks never share a
/// shard with a worker (unless there is only one).
pub(crate) fn shard(shards: usize) -> usize {
    match (index(), shards) {
        (_, 0 | 1) => 0,
        (Some(i), n) => i % (n - 1),
        (None, n) => n - 1,
    }
}

/// A value alone on its cache line(s), so that shards written by
/// different cores do not invalidate each other (128 bytes: adjacent-line
/// prefetching pairs 64-byte lines on x86).
#[derive(Debug, Default)]
#[repr(align(128))]
pub(crate) struct Padded<T>(pub(crate) T);

impl<T> std::ops::Deref for Padded<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_and_other_threads_get_their_own_shards() {
        let other = std::thread::spawn(|| shard(8)).join().unwrap();
        assert_eq!(other, 7);
        let workers: Vec<usize> = (0..9)
            .map(|i| {
                std::thread::spawn(move || {
                    set_index(i);
                    shard(8)
                })
                .join()
                .unwrap()
            })
            .collect();
        assert_eq!(workers, vec![0, 1, 2, 3, 4, 5, 6, 0, 1]);
        assert_eq!(shard(1), 0);
    }
}
