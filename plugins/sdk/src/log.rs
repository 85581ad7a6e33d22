//! Lines in the gateway's log, tagged with the plugin's name.
//!
//! ```no_run
//! sessiongate_policy::log::info("loaded");
//! sessiongate_policy::log::warn(format!("odd session {}", "0190..."));
//! ```
//!
//! In a wasm build these call the host's `log` import. On any other target
//! (the plugins' unit tests) they print to stderr, which the test harness
//! captures.

/// How important a line is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// Detail for whoever is debugging the policy.
    Debug,
    /// Normal operation.
    Info,
    /// Something looks wrong but the policy goes on.
    Warn,
    /// Something is wrong.
    Error,
}

/// Writes `message` to the gateway's log at `level`.
pub fn log(level: Level, message: impl AsRef<str>) {
    write(level, message.as_ref());
}

/// Writes `message` at `debug` level.
pub fn debug(message: impl AsRef<str>) {
    write(Level::Debug, message.as_ref());
}

/// Writes `message` at `info` level.
pub fn info(message: impl AsRef<str>) {
    write(Level::Info, message.as_ref());
}

/// Writes `message` at `warn` level.
pub fn warn(message: impl AsRef<str>) {
    write(Level::Warn, message.as_ref());
}

/// Writes `message` at `error` level.
pub fn error(message: impl AsRef<str>) {
    write(Level::Error, message.as_ref());
}

#[cfg(target_arch = "wasm32")]
fn write(level: Level, message: &str) {
    use crate::__private::bindings::sessiongate::policy::{host, types::LogLevel};
    let level = match level {
        Level::Debug => LogLevel::Debug,
        Level::Info => LogLevel::Info,
        Level::Warn => LogLevel::Warn,
        Level::Error => LogLevel::Error,
    };
    host::log(level, message);
}

#[cfg(not(target_arch = "wasm32"))]
fn write(level: Level, message: &str) {
    eprintln!("[policy {level:?}] {message}");
}
