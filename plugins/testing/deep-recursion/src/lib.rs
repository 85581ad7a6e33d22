//! Test plugin `deep-recursion`: `on_access` recurses without bound (the
//! host's stack limit must stop it).

use std::hint::black_box;

use sessiongate_policy::{Access, Config, Hooks, Policy, RequestInfo, Session};

pub struct DeepRecursion;

/// Recurses until the stack runs out. `black_box` hides the stop condition
/// and the frame's contents from the optimizer, and the result is used after
/// the call returns, so the call is not in tail position and cannot be turned
/// into a loop.
#[inline(never)]
fn recurse(depth: u64) -> u64 {
    if black_box(depth) == u64::MAX {
        return 0;
    }
    let mut frame = [0u8; 128];
    frame[(depth % 128) as usize] = depth as u8;
    let frame = black_box(frame);
    let below = recurse(black_box(depth + 1));
    below.wrapping_add(u64::from(frame[black_box(depth as usize % 128)]))
}

impl Policy for DeepRecursion {
    fn init(_config: Config) -> Result<Self, String> {
        Ok(DeepRecursion)
    }

    fn hooks(&self) -> Hooks {
        Hooks::NONE.with_access()
    }

    fn on_access(&self, _session: &Session, _request: &RequestInfo, _now: i64) -> Access {
        if recurse(0) == black_box(42) {
            Access::deny(403, "unreachable")
        } else {
            Access::Allow
        }
    }
}

sessiongate_policy::export_policy!(DeepRecursion);
