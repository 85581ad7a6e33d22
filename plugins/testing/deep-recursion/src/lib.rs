//! Test plugin `deep-recursion`: `on_access` recurses without bound (the
//! host's limits must stop it).
//!
//! Config `exhaust` picks which stack runs out first:
//! - `"shadow-stack"` (default): each frame keeps a 128-byte buffer on
//!   Rust's shadow stack in linear memory (1 MiB), which runs out before the
//!   engine's wasm stack limit: an out-of-bounds memory access trap.
//! - `"wasm-stack"`: frames hold only scalars (wasm locals), so the engine's
//!   `max_wasm_stack` stops it: a `StackOverflow` trap.
//!
//! Either way `black_box` hides the stop condition from the optimizer and
//! the result is combined with work done after the call returns, so the call
//! is never in tail position and cannot be turned into a loop.

use std::hint::black_box;

use sessiongate_policy::{Access, Config, Hooks, Policy, RequestInfo, Session};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exhaust {
    ShadowStack,
    WasmStack,
}

pub struct DeepRecursion {
    exhaust: Exhaust,
}

/// Uses 128 bytes of shadow stack per level.
#[inline(never)]
fn recurse_shadow(depth: u64) -> u64 {
    if black_box(depth) == u64::MAX {
        return 0;
    }
    let mut frame = [0u8; 128];
    frame[(depth % 128) as usize] = depth as u8;
    let frame = black_box(frame);
    let below = recurse_shadow(black_box(depth + 1));
    below.wrapping_add(u64::from(frame[black_box(depth as usize % 128)]))
}

/// Uses only wasm locals (rotate and xor after the call: not an
/// accumulation LLVM can turn into a loop).
#[inline(never)]
fn recurse_wasm(depth: u64) -> u64 {
    if black_box(depth) == u64::MAX {
        return 0;
    }
    let below = recurse_wasm(black_box(depth.wrapping_add(1)));
    below.rotate_left(1) ^ black_box(depth)
}

impl Policy for DeepRecursion {
    fn init(config: Config) -> Result<Self, String> {
        config.reject_unknown(&["exhaust"])?;
        let exhaust = match config.str_or("exhaust", "shadow-stack")?.as_str() {
            "shadow-stack" => Exhaust::ShadowStack,
            "wasm-stack" => Exhaust::WasmStack,
            other => {
                return Err(format!(
                    "config key `exhaust` must be \"shadow-stack\" or \"wasm-stack\", not {other:?}"
                ));
            }
        };
        Ok(DeepRecursion { exhaust })
    }

    fn hooks(&self) -> Hooks {
        Hooks::NONE.with_access()
    }

    fn on_access(&self, _session: &Session, _request: &RequestInfo, _now: i64) -> Access {
        let result = match self.exhaust {
            Exhaust::ShadowStack => recurse_shadow(0),
            Exhaust::WasmStack => recurse_wasm(0),
        };
        if result == black_box(42) {
            Access::deny(403, "unreachable")
        } else {
            Access::Allow
        }
    }
}

sessiongate_policy::export_policy!(DeepRecursion);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config() {
        let mode = |j: &str| DeepRecursion::init(Config::parse(j).unwrap()).map(|p| p.exhaust);
        assert_eq!(mode("{}"), Ok(Exhaust::ShadowStack));
        assert_eq!(mode(r#"{"exhaust": "wasm-stack"}"#), Ok(Exhaust::WasmStack));
        assert!(mode(r#"{"exhaust": "heap"}"#).is_err());
    }
}
