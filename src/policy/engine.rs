//! The one wasmtime [`Engine`] every plugin shares, and its epoch ticker.
//!
//! Settings: fuel (a call's time limit is a budget of fuel, about a
//! million units per millisecond of guest work: deterministic, and not
//! spent while the thread is preempted, so a busy machine does not fail
//! innocent calls), epoch interruption as the wall-clock backstop (a ticker
//! thread advances the epoch every [`TICK`]), a bounded guest
//! stack, the pooling instance allocator (instantiation in microseconds,
//! memory reserved up front), and no component-model concurrency support
//! (it costs every call and our hooks are synchronous WIT functions; the
//! host calls them with `call_async` so that a long call yields, see
//! [`YIELD_FUEL`], except the first try of a 0.2.0 access call, which is a
//! sync call limited to one such slice: see `plugin`).

use std::sync::OnceLock;
use std::time::Duration;

use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

/// The epoch period. Fuel enforces a call's time limit; the epoch is only
/// the wall-clock backstop, at ten times the limit plus 100 ms, so 10 ms
/// is fine-grained enough, and the ticker wakes 100 times a second rather
/// than 1,000 (each wake-up lands on a core that serves requests).
pub const TICK: Duration = Duration::from_millis(10);

/// Fuel per millisecond of a plugin's time limit (measured: an empty
/// loop burns about a million units per millisecond).
pub const FUEL_PER_MS: u64 = 1_000_000;

/// Fuel between two yields of a running call to the async scheduler:
/// about 100 µs of guest work, so a call burning its whole time limit
/// holds its worker thread for at most that long at a time. Also the
/// budget of a sync first try (`plugin`), for the same reason. An ordinary
/// hook call uses a few thousand units and never reaches a yield point, so
/// it pays nothing for this.
pub const YIELD_FUEL: u64 = 100_000;

/// Largest memory any plugin may be given.
pub const MAX_PLUGIN_MEMORY: usize = 256 << 20;

/// Guest stack limit: deep enough for real policies, small enough that a
/// runaway recursion traps quickly.
const MAX_WASM_STACK: usize = 512 << 10;

/// Instances alive at once across all plugins (pooled slots).
const POOL_INSTANCES: u32 = 256;

static ENGINE: OnceLock<Engine> = OnceLock::new();

/// The shared engine; the first call starts the epoch ticker.
pub fn engine() -> &'static Engine {
    ENGINE.get_or_init(|| {
        let mut config = Config::new();
        config.epoch_interruption(true);
        config.consume_fuel(true);
        config.max_wasm_stack(MAX_WASM_STACK);
        config.concurrency_support(false);
        let mut pool = PoolingAllocationConfig::default();
        pool.total_component_instances(POOL_INSTANCES)
            .total_core_instances(POOL_INSTANCES)
            .total_memories(POOL_INSTANCES)
            .total_tables(POOL_INSTANCES)
            // One stack per call in flight, and every call in flight holds
            // an instance: no more stacks than instances.
            .total_stacks(POOL_INSTANCES)
            .max_memory_size(MAX_PLUGIN_MEMORY);
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&config).expect("the wasmtime engine configuration is valid");
        let ticker = engine.weak();
        std::thread::Builder::new()
            .name("sessiongate-epoch".into())
            .spawn(move || {
                while let Some(engine) = ticker.upgrade() {
                    engine.increment_epoch();
                    drop(engine);
                    std::thread::sleep(TICK);
                }
            })
            .expect("the epoch ticker thread starts");
        engine
    })
}
