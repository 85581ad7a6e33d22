//! The plugin's `config` table, as the host passes it to `init`.

use serde_json::{Map, Value};

/// A plugin's `config` table from `gateway.toml`, as the JSON object the
/// gateway passes to `init`.
///
/// The getters return `Err(String)` naming the key and what is wrong with
/// it, ready to be returned from [`Policy::init`](crate::Policy::init) with
/// `?`:
///
/// ```
/// use sessiongate_policy::Config;
///
/// let config = Config::parse(r#"{"ttl_seconds": 3600, "name": 7}"#).unwrap();
/// assert_eq!(config.u64("ttl_seconds"), Ok(3600));
/// assert_eq!(config.u64_or("grace_seconds", 30), Ok(30));
/// assert_eq!(
///     config.str_or("name", "x"),
///     Err("config key `name`: expected a string, got 7".to_string())
/// );
/// assert_eq!(
///     config.u64("idle_seconds"),
///     Err("missing required key `idle_seconds`".to_string())
/// );
/// ```
///
/// A key whose value is JSON `null` counts as absent.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Config {
    map: Map<String, Value>,
}

impl Config {
    /// Parses the JSON text the gateway passes to `init`. It must be an
    /// object; an empty text or `null` is an empty config.
    pub fn parse(json: &str) -> Result<Config, String> {
        if json.trim().is_empty() {
            return Ok(Config::default());
        }
        let value: Value =
            serde_json::from_str(json).map_err(|e| format!("config is not valid JSON: {e}"))?;
        Config::from_value(value)
    }

    /// A config from a JSON value, which must be an object (or `null`).
    pub fn from_value(value: Value) -> Result<Config, String> {
        match value {
            Value::Object(map) => Ok(Config { map }),
            Value::Null => Ok(Config::default()),
            other => Err(format!(
                "config must be a table (a JSON object), got {}",
                show(&other)
            )),
        }
    }

    /// The whole object.
    pub fn json(&self) -> &Map<String, Value> {
        &self.map
    }

    /// The raw value of `key`, if present and not `null`.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    /// Whether `key` is present (and not `null`).
    pub fn has(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// Fails naming the first key that is not in `known`: catches typos in
    /// `gateway.toml` at load time instead of silently using a default.
    pub fn reject_unknown(&self, known: &[&str]) -> Result<(), String> {
        match self.map.keys().find(|k| !known.contains(&k.as_str())) {
            None => Ok(()),
            Some(key) if known.is_empty() => Err(format!(
                "unknown config key `{key}` (this plugin takes none)"
            )),
            Some(key) => Err(format!(
                "unknown config key `{key}` (known keys: {})",
                known.join(", ")
            )),
        }
    }

    fn typed<T>(
        &self,
        key: &str,
        what: &str,
        convert: impl FnOnce(&Value) -> Option<T>,
    ) -> Result<Option<T>, String> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => convert(v)
                .map(Some)
                .ok_or_else(|| format!("config key `{key}`: expected {what}, got {}", show(v))),
        }
    }

    fn required<T>(&self, key: &str, value: Result<Option<T>, String>) -> Result<T, String> {
        value?.ok_or_else(|| format!("missing required key `{key}`"))
    }

    /// The non-negative integer `key`, if present.
    pub fn u64_opt(&self, key: &str) -> Result<Option<u64>, String> {
        self.typed(key, "a non-negative integer", Value::as_u64)
    }

    /// The non-negative integer `key`, which must be present.
    pub fn u64(&self, key: &str) -> Result<u64, String> {
        self.required(key, self.u64_opt(key))
    }

    /// The non-negative integer `key`, or `default` if absent.
    pub fn u64_or(&self, key: &str, default: u64) -> Result<u64, String> {
        Ok(self.u64_opt(key)?.unwrap_or(default))
    }

    /// The integer `key`, if present.
    pub fn i64_opt(&self, key: &str) -> Result<Option<i64>, String> {
        self.typed(key, "an integer", Value::as_i64)
    }

    /// The integer `key`, which must be present.
    pub fn i64(&self, key: &str) -> Result<i64, String> {
        self.required(key, self.i64_opt(key))
    }

    /// The integer `key`, or `default` if absent.
    pub fn i64_or(&self, key: &str, default: i64) -> Result<i64, String> {
        Ok(self.i64_opt(key)?.unwrap_or(default))
    }

    /// The number `key` (an integer or a float), if present.
    pub fn f64_opt(&self, key: &str) -> Result<Option<f64>, String> {
        self.typed(key, "a number", Value::as_f64)
    }

    /// The number `key`, which must be present.
    pub fn f64(&self, key: &str) -> Result<f64, String> {
        self.required(key, self.f64_opt(key))
    }

    /// The number `key`, or `default` if absent.
    pub fn f64_or(&self, key: &str, default: f64) -> Result<f64, String> {
        Ok(self.f64_opt(key)?.unwrap_or(default))
    }

    /// The string `key`, if present.
    pub fn str_opt(&self, key: &str) -> Result<Option<String>, String> {
        self.typed(key, "a string", |v| v.as_str().map(str::to_owned))
    }

    /// The string `key`, which must be present.
    pub fn str(&self, key: &str) -> Result<String, String> {
        self.required(key, self.str_opt(key))
    }

    /// The string `key`, or `default` if absent.
    pub fn str_or(&self, key: &str, default: &str) -> Result<String, String> {
        Ok(self.str_opt(key)?.unwrap_or_else(|| default.to_owned()))
    }

    /// The boolean `key`, if present.
    pub fn bool_opt(&self, key: &str) -> Result<Option<bool>, String> {
        self.typed(key, "true or false", Value::as_bool)
    }

    /// The boolean `key`, which must be present.
    pub fn bool(&self, key: &str) -> Result<bool, String> {
        self.required(key, self.bool_opt(key))
    }

    /// The boolean `key`, or `default` if absent.
    pub fn bool_or(&self, key: &str, default: bool) -> Result<bool, String> {
        Ok(self.bool_opt(key)?.unwrap_or(default))
    }
}

/// A value for an error message, cut short if long.
fn show(v: &Value) -> String {
    let text = v.to_string();
    if text.chars().count() <= 60 {
        text
    } else {
        format!("{}…", text.chars().take(60).collect::<String>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(json: &str) -> Config {
        Config::parse(json).unwrap()
    }

    #[test]
    fn parse_accepts_objects_null_and_empty() {
        assert!(cfg("{}").json().is_empty());
        assert!(cfg("").json().is_empty());
        assert!(cfg("null").json().is_empty());
        assert_eq!(
            Config::parse("[1]"),
            Err("config must be a table (a JSON object), got [1]".into())
        );
        assert!(
            Config::parse("{")
                .unwrap_err()
                .starts_with("config is not valid JSON")
        );
    }

    #[test]
    fn integers() {
        let c = cfg(r#"{"a": 5, "neg": -3, "f": 1.5, "s": "5", "n": null}"#);
        assert_eq!(c.u64("a"), Ok(5));
        assert_eq!(c.u64_or("a", 9), Ok(5));
        assert_eq!(c.u64_or("zz", 9), Ok(9));
        assert_eq!(c.u64_or("n", 9), Ok(9));
        assert_eq!(c.u64_opt("zz"), Ok(None));
        assert_eq!(c.u64("zz"), Err("missing required key `zz`".into()));
        assert_eq!(
            c.u64("neg"),
            Err("config key `neg`: expected a non-negative integer, got -3".into())
        );
        assert_eq!(
            c.u64_or("s", 1),
            Err("config key `s`: expected a non-negative integer, got \"5\"".into())
        );
        assert_eq!(
            c.u64("f"),
            Err("config key `f`: expected a non-negative integer, got 1.5".into())
        );
        assert_eq!(c.i64("neg"), Ok(-3));
        assert_eq!(c.i64_or("zz", -1), Ok(-1));
    }

    #[test]
    fn floats_strings_bools() {
        let c = cfg(
            r#"{"f": 0.25, "i": 2, "s": "x", "b": true, "long": "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"}"#,
        );
        assert_eq!(c.f64("f"), Ok(0.25));
        assert_eq!(c.f64_or("i", 0.5), Ok(2.0));
        assert_eq!(c.f64_or("zz", 0.5), Ok(0.5));
        assert_eq!(
            c.f64("s"),
            Err("config key `s`: expected a number, got \"x\"".into())
        );
        assert_eq!(c.str("s"), Ok("x".into()));
        assert_eq!(c.str_or("zz", "d"), Ok("d".into()));
        assert_eq!(
            c.str("i"),
            Err("config key `i`: expected a string, got 2".into())
        );
        assert_eq!(c.bool("b"), Ok(true));
        assert_eq!(c.bool_or("zz", false), Ok(false));
        assert_eq!(
            c.bool_or("s", false),
            Err("config key `s`: expected true or false, got \"x\"".into())
        );
        assert!(c.bool("long").unwrap_err().ends_with("aaaa…"));
    }

    #[test]
    fn reject_unknown_names_the_key() {
        let c = cfg(r#"{"ttl_seconds": 1, "ttl_second": 2}"#);
        assert_eq!(
            c.reject_unknown(&["ttl_seconds", "other"]),
            Err("unknown config key `ttl_second` (known keys: ttl_seconds, other)".into())
        );
        assert_eq!(c.reject_unknown(&["ttl_seconds", "ttl_second"]), Ok(()));
        assert_eq!(
            c.reject_unknown(&[]),
            Err("unknown config key `ttl_second` (this plugin takes none)".into())
        );
        assert!(c.has("ttl_seconds"));
        assert!(!c.has("zz"));
    }
}
