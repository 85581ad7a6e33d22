//! Test plugin `init-fails`: `init` fails with "missing required key
//! `needed`" unless the config has key `needed`; then `on_access` allows.

use sessiongate_policy::{Config, Hooks, Policy};

#[derive(Debug)]
pub struct InitFails;

impl Policy for InitFails {
    fn init(config: Config) -> Result<Self, String> {
        if !config.has("needed") {
            return Err("missing required key `needed`".into());
        }
        Ok(InitFails)
    }

    fn hooks(&self) -> Hooks {
        Hooks::NONE.with_access()
    }
}

sessiongate_policy::export_policy!(InitFails);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn needs_needed() {
        assert_eq!(
            InitFails::init(Config::parse("{}").unwrap()).unwrap_err(),
            "missing required key `needed`"
        );
        assert!(InitFails::init(Config::parse(r#"{"needed": 1}"#).unwrap()).is_ok());
    }
}
