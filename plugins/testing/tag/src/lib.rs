//! Test plugin `tag`: `on_create` sets attribute `key` (default "tag") to
//! `value` (required), and appends `value` to the comma-separated attribute
//! `chain`, so a test can see the order plugins ran in. `on_access` allows.

use sessiongate_policy::{Config, Creation, Denial, Hooks, Policy, RequestInfo, Session};

#[derive(Debug, PartialEq)]
pub struct Tag {
    key: String,
    value: String,
}

impl Tag {
    pub fn creation(&self, session: &Session) -> Creation {
        let chain = match session.attr("chain") {
            Some(chain) if !chain.is_empty() => format!("{chain},{}", self.value),
            _ => self.value.clone(),
        };
        Creation::unchanged()
            .set(self.key.clone(), self.value.clone())
            .set("chain", chain)
    }
}

impl Policy for Tag {
    fn init(config: Config) -> Result<Self, String> {
        config.reject_unknown(&["key", "value"])?;
        Ok(Tag {
            key: config.str_or("key", "tag")?,
            value: config.str("value")?,
        })
    }

    fn hooks(&self) -> Hooks {
        Hooks::NONE.with_create().with_access()
    }

    fn on_create(
        &self,
        session: &Session,
        _request: Option<&RequestInfo>,
        _now: i64,
    ) -> Result<Creation, Denial> {
        Ok(self.creation(session))
    }
}

sessiongate_policy::export_policy!(Tag);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_and_chains() {
        let t = Tag::init(Config::parse(r#"{"key": "team", "value": "b"}"#).unwrap()).unwrap();
        let c = t.creation(&Session::default());
        assert_eq!(c, Creation::unchanged().set("team", "b").set("chain", "b"));
        let mut s = Session::default();
        s.attributes.insert("chain".into(), "a".into());
        assert_eq!(t.creation(&s).attributes["chain"], "a,b");
        assert_eq!(
            Tag::init(Config::parse("{}").unwrap()),
            Err("missing required key `value`".into())
        );
    }
}
