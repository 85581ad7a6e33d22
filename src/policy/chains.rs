//! Named policy chains: the default chain (`[[policies]]`) and every
//! `[[chains.<name>]]`, loaded together into one [`ChainSet`], which
//! [`super::Policies`] swaps whole so that a reload changes every chain at
//! once or none.
//!
//! A route picks its chain by name (`routes[].policies`); each request
//! looks the name up in the set it runs on, so a route always meets the
//! chain of that name in the set current when the request began.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::plugin::LoadError;
use super::{PluginInfo, PolicyChain};
use crate::config::{Config, PolicyConfig};
use crate::metrics::Metrics;

/// The name of the `[[policies]]` chain in outputs and metrics, and the
/// one name a `[chains.<name>]` may not take.
pub const DEFAULT_CHAIN: &str = "default";

/// Longest chain name (it becomes a metric label).
const MAX_NAME: usize = 64;

/// Checks a `[chains.<name>]` name: 1 to 64 of `a-z`, `0-9`, `_`, `-`,
/// and not `default`.
pub(crate) fn validate_name(name: &str) -> Result<(), String> {
    if name == DEFAULT_CHAIN {
        return Err(format!(
            "{name:?} is the name of the [[policies]] chain; give this chain another name"
        ));
    }
    let valid = (1..=MAX_NAME).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if valid {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a valid chain name: 1 to {MAX_NAME} of a-z, 0-9, '_' and '-'"
        ))
    }
}

/// The defined chain names, for a message about a name that is not one.
pub(crate) fn names_for_message<'a>(names: impl Iterator<Item = &'a String>) -> String {
    let names: Vec<String> = names.map(|n| format!("{n:?}")).collect();
    if names.is_empty() {
        "none defined".into()
    } else {
        names.join(", ")
    }
}

/// What every chain of a config is made of.
#[derive(Debug, Clone, Default)]
pub struct ChainConfigs {
    pub default: Vec<PolicyConfig>,
    pub named: BTreeMap<String, Vec<PolicyConfig>>,
}

impl ChainConfigs {
    pub fn of(config: &Config) -> ChainConfigs {
        ChainConfigs {
            default: config.policies.clone(),
            named: config.chains.clone(),
        }
    }

    /// Every chain, the default first.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[PolicyConfig])> {
        std::iter::once((DEFAULT_CHAIN, self.default.as_slice()))
            .chain(self.named.iter().map(|(n, c)| (n.as_str(), c.as_slice())))
    }

    /// Whether any chain has a plugin (the file watcher runs only then).
    pub fn has_plugins(&self) -> bool {
        self.iter().any(|(_, c)| !c.is_empty())
    }
}

/// Every chain, loaded.
pub struct ChainSet {
    default: Arc<PolicyChain>,
    named: BTreeMap<String, Arc<PolicyChain>>,
    /// What the chains were loaded from (file stamps, reloads without a
    /// config file).
    configs: Arc<ChainConfigs>,
}

/// What `GET /v1/policies` and a reload answer: the default chain as
/// `policies` (the contract), and every chain, the default included, by
/// name.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ChainsInfo {
    pub policies: Vec<PluginInfo>,
    pub chains: BTreeMap<String, Vec<PluginInfo>>,
}

impl ChainSet {
    /// Loads every chain (compiling each plugin and running its `init`);
    /// the first failure, naming its chain, fails the whole set.
    /// Blocking: call off the request path.
    pub fn load(
        configs: ChainConfigs,
        log_lines_per_second: u32,
        metrics: Arc<Metrics>,
    ) -> Result<ChainSet, LoadError> {
        let load = |name: &str, c: &[PolicyConfig]| {
            PolicyChain::load_named(name, c, log_lines_per_second, metrics.clone()).map_err(|e| {
                LoadError::Chain {
                    chain: name.to_string(),
                    error: Box::new(e),
                }
            })
        };
        let default = Arc::new(load(DEFAULT_CHAIN, &configs.default)?);
        let mut named = BTreeMap::new();
        for (name, c) in &configs.named {
            named.insert(name.clone(), Arc::new(load(name, c)?));
        }
        Ok(ChainSet {
            default,
            named,
            configs: Arc::new(configs),
        })
    }

    /// A set of the default chain alone.
    pub fn only(default: PolicyChain, configs: Vec<PolicyConfig>) -> ChainSet {
        ChainSet {
            default: Arc::new(default),
            named: BTreeMap::new(),
            configs: Arc::new(ChainConfigs {
                default: configs,
                named: BTreeMap::new(),
            }),
        }
    }

    pub fn default_chain(&self) -> &Arc<PolicyChain> {
        &self.default
    }

    /// The chain a route's `policies` names (`None`: the default); `None`
    /// for a name this set does not have.
    pub fn get(&self, name: Option<&str>) -> Option<&PolicyChain> {
        match name {
            None | Some(DEFAULT_CHAIN) => Some(&self.default),
            Some(name) => self.named.get(name).map(|c| &**c),
        }
    }

    pub fn has(&self, name: &str) -> bool {
        self.get(Some(name)).is_some()
    }

    pub fn configs(&self) -> &Arc<ChainConfigs> {
        &self.configs
    }

    pub fn info(&self) -> ChainsInfo {
        let policies = self.default.info();
        let mut chains = BTreeMap::new();
        chains.insert(DEFAULT_CHAIN.to_string(), policies.clone());
        for (name, chain) in &self.named {
            chains.insert(name.clone(), chain.info());
        }
        ChainsInfo { policies, chains }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_names() {
        for good in ["admin", "a", "app-2_x", &"z".repeat(64)] {
            assert!(validate_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "default",
            "Admin",
            "a b",
            "a.b",
            "ädmin",
            "a/b",
            &"z".repeat(65),
        ] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
    }
}
