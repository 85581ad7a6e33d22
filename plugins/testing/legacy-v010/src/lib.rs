//! Test plugin `legacy-v010`: a policy built against interface 0.1.0
//! (`plugins/wit/0.1.0`) directly with wit-bindgen, as plugins were
//! before 0.2.0, so the gateway's support of 0.1.0 stays tested.
//!
//! Config `mode`:
//! - `"refresh"` (default): `activity-refresh`'s decision, with
//!   `idle_timeout_seconds` and `absolute_lifetime_seconds` (the 0.1.0
//!   twin of the bundled plugin, for the benchmark);
//! - `"echo"`: denies 403 with what it was given, `<method> <path> <host>
//!   <client-addr> <user-agent> <id> <user-id> <attr>` (`attr`: the
//!   session's attribute `echo`, or `-`);
//! - `"loop"`: `on-access` never returns;
//! - `"panic"`: `on-access` panics.

use std::cell::RefCell;
use std::hint::black_box;

#[allow(clippy::all)]
mod bindings {
    wit_bindgen::generate!({ world: "policy", path: "../../wit/0.1.0" });
}

use bindings::sessiongate::policy::types::{Access, Creation, Denial, Hooks, RequestInfo, Session};

#[derive(Clone, Copy)]
enum Mode {
    Refresh { idle_ms: i64, absolute_ms: i64 },
    Echo,
    Loop,
    Panic,
}

thread_local! {
    static MODE: RefCell<Option<Mode>> = const { RefCell::new(None) };
}

fn mode() -> Mode {
    MODE.with_borrow(|m| m.expect("init ran"))
}

fn millis(config: &serde_json::Value, key: &str) -> Result<i64, String> {
    config[key]
        .as_i64()
        .filter(|s| *s >= 1)
        .map(|s| s * 1000)
        .ok_or_else(|| format!("config key `{key}` must be a positive integer"))
}

struct Legacy;

impl bindings::Guest for Legacy {
    fn init(config: String) -> Result<Hooks, String> {
        let config: serde_json::Value = serde_json::from_str(&config).map_err(|e| e.to_string())?;
        let mode = match config["mode"].as_str().unwrap_or("refresh") {
            "refresh" => Mode::Refresh {
                idle_ms: millis(&config, "idle_timeout_seconds")?,
                absolute_ms: millis(&config, "absolute_lifetime_seconds")?,
            },
            "echo" => Mode::Echo,
            "loop" => Mode::Loop,
            "panic" => Mode::Panic,
            other => return Err(format!("unknown mode {other:?}")),
        };
        MODE.with_borrow_mut(|m| *m = Some(mode));
        Ok(Hooks {
            on_create: false,
            on_access: true,
            on_evict: false,
        })
    }

    fn on_create(
        _session: Session,
        _request: Option<RequestInfo>,
        _now: i64,
    ) -> Result<Creation, Denial> {
        Ok(Creation {
            expires_at: None,
            attributes: Vec::new(),
        })
    }

    fn on_access(session: Session, request: RequestInfo, now: i64) -> Access {
        match mode() {
            Mode::Refresh {
                idle_ms,
                absolute_ms,
            } => {
                if now - session.last_seen_at > idle_ms {
                    return deny(401, "idle timeout".into());
                }
                if now - session.created_at > absolute_ms {
                    return deny(401, "absolute lifetime exceeded".into());
                }
                let target = (now + idle_ms).min(session.created_at + absolute_ms);
                if session.expires_at - now < idle_ms / 2 && target > session.expires_at {
                    Access::Extend(target)
                } else {
                    Access::Allow
                }
            }
            Mode::Echo => {
                let attr = session
                    .attributes
                    .iter()
                    .rev()
                    .find(|(k, _)| k == "echo")
                    .map_or("-", |(_, v)| v.as_str());
                deny(
                    403,
                    format!(
                        "{} {} {} {} {} {} {} {attr}",
                        request.method,
                        request.path,
                        request.host,
                        request.client_addr,
                        request.user_agent,
                        session.id,
                        session.user_id,
                    ),
                )
            }
            Mode::Loop => {
                let mut n = now;
                loop {
                    n = black_box(n.wrapping_add(1));
                }
            }
            Mode::Panic => panic!("legacy-v010 panics on purpose"),
        }
    }

    fn on_evict(_created: Session, _live: Vec<Session>, _now: i64) -> Vec<String> {
        Vec::new()
    }
}

fn deny(status: u16, reason: String) -> Access {
    Access::Deny(Denial { status, reason })
}

bindings::export!(Legacy with_types_in bindings);
