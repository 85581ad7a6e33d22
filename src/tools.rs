//! Operator tools behind the command line: `sessiongate plugin try`.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use crate::config::{OnError, PolicyConfig};
use crate::metrics::Metrics;
use crate::policy::plugin::block_on;
use crate::policy::{AccessOutcome, PolicyChain, Refusal, RequestInfo};
use crate::session::{Session, now_ms};

fn refusal(r: Refusal) -> Value {
    match r {
        Refusal::Denied { status, reason } => {
            json!({"deny": {"status": status.as_u16(), "reason": reason}})
        }
        Refusal::Failed { plugin } => {
            json!({"failed": format!("plugin {plugin} failed (see the log above)")})
        }
    }
}

fn apply_session(session: &mut Session, overrides: &Value) -> Result<(), String> {
    let obj = overrides
        .as_object()
        .ok_or("--session must be a JSON object")?;
    for (k, v) in obj {
        let int = || {
            v.as_i64()
                .ok_or(format!("--session {k} must be an integer"))
        };
        match k.as_str() {
            "user_id" => session.user_id = v.as_str().ok_or("user_id must be a string")?.into(),
            "created_at" => session.created_at = int()?,
            "last_seen_at" => session.last_seen_at = int()?,
            "expires_at" => session.expires_at = int()?,
            "attributes" => {
                session.attributes = serde_json::from_value(v.clone())
                    .map_err(|_| "attributes must be an object of strings")?
            }
            other => return Err(format!("--session has no field {other:?}")),
        }
    }
    Ok(())
}

fn apply_request(request: &mut RequestInfo, overrides: &Value) -> Result<(), String> {
    let obj = overrides
        .as_object()
        .ok_or("--request must be a JSON object")?;
    for (k, v) in obj {
        let text = v
            .as_str()
            .ok_or(format!("--request {k} must be a string"))?
            .to_string();
        match k.as_str() {
            "method" => request.method = text,
            "path" => request.path = text,
            "host" => request.host = text,
            "client_addr" => request.client_addr = text,
            "user_agent" => request.user_agent = text,
            other => return Err(format!("--request has no field {other:?}")),
        }
    }
    Ok(())
}

/// Loads one plugin and reports each hook's decision on a sample session
/// and request, as pretty JSON.
pub fn try_plugin(
    file: &Path,
    config: &str,
    session: Option<&str>,
    request: Option<&str>,
    now: Option<i64>,
) -> Result<String, String> {
    let config_value: Value =
        serde_json::from_str(config).map_err(|e| format!("--config is not JSON: {e}"))?;
    if !config_value.is_object() {
        return Err("--config must be a JSON object".into());
    }
    let now = now.unwrap_or_else(now_ms);
    let mut sample = Session::new("alice".into(), BTreeMap::new(), Duration::from_secs(3600));
    sample.created_at = now - 10 * 60_000;
    sample.last_seen_at = now - 60_000;
    sample.expires_at = now + 3_600_000;
    if let Some(text) = session {
        let v: Value = serde_json::from_str(text).map_err(|e| format!("--session: {e}"))?;
        apply_session(&mut sample, &v)?;
    }
    let mut req = RequestInfo {
        method: "GET".into(),
        path: "/".into(),
        host: "app.example".into(),
        client_addr: "127.0.0.1".into(),
        user_agent: "sessiongate-plugin-try".into(),
    };
    if let Some(text) = request {
        let v: Value = serde_json::from_str(text).map_err(|e| format!("--request: {e}"))?;
        apply_request(&mut req, &v)?;
    }

    let chain = PolicyChain::load(
        &[PolicyConfig {
            plugin: file.to_path_buf(),
            config_json: config_value.to_string(),
            on_error: OnError::Deny,
            timeout: Duration::from_millis(100),
            memory_bytes: 64 << 20,
        }],
        // `plugins.log_lines_per_second`'s default: what the plugin would
        // get in the gateway.
        100,
        Arc::new(Metrics::new()),
    )
    .map_err(|e| e.to_string())?;
    let info = chain.info().pop().ok_or("no plugin loaded")?;

    let mut report = json!({
        "plugin": info.plugin,
        "sha256": info.sha256,
        "hooks": info.hooks,
        "interface": info.interface,
        "now": now,
        "session": sample.view(),
        "request": {
            "method": req.method, "path": req.path, "host": req.host,
            "client_addr": req.client_addr, "user_agent": req.user_agent,
        },
    });
    if info.hooks.contains(&"create") {
        let mut created = sample.clone();
        created.created_at = now;
        created.last_seen_at = now;
        report["create"] = match block_on(chain.on_create(&mut created, Some(&req), now)) {
            Ok(()) => json!({
                "expires_at": crate::session::rfc3339(created.expires_at),
                "expires_in_seconds": (created.expires_at - now) / 1000,
                "attributes": created.attributes,
            }),
            Err(r) => refusal(r),
        };
    }
    if info.hooks.contains(&"access") {
        report["access"] =
            match block_on(chain.on_access(&Arc::new(sample.clone()), &Arc::new(req.clone()), now))
            {
                AccessOutcome::Allow => json!("allow"),
                AccessOutcome::Extend(at) => json!({"extend": crate::session::rfc3339(at)}),
                AccessOutcome::Refuse(r) => refusal(r),
            };
    }
    if info.hooks.contains(&"evict") {
        // The user's other sessions: three, seen 3, 2 and 1 hours ago.
        let others: Vec<Session> = (1..=3)
            .map(|i| {
                let mut s = sample.clone();
                s.id = uuid::Uuid::now_v7();
                s.created_at = now - i * 7_200_000;
                s.last_seen_at = now - i * 3_600_000;
                s
            })
            .collect();
        let evicted = block_on(chain.on_evict(&sample, &others, now));
        report["evict"] = json!({
            "others": others.iter().map(|s| json!({"id": s.id, "last_seen_at": crate::session::rfc3339(s.last_seen_at)})).collect::<Vec<_>>(),
            "revoke": evicted,
        });
    }
    Ok(serde_json::to_string_pretty(&report).unwrap_or_default())
}
