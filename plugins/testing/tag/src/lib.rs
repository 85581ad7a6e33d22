//! Test plugin `tag`: `on_create` sets attribute `key` (default "tag") to
//! `value` (required), and appends `value` to the comma-separated attribute
//! `chain`, so a test can see the order plugins ran in. With `client_key`,
//! it also records the request's `client-addr` under that attribute (what
//! a policy is told the client's address is). `on_access` allows.

use sessiongate_policy::{Config, Creation, Denial, Hooks, Policy, RequestInfo, Session};

#[derive(Debug, PartialEq)]
pub struct Tag {
    key: String,
    value: String,
    client_key: Option<String>,
}

impl Tag {
    pub fn creation(&self, session: &Session, request: Option<&RequestInfo>) -> Creation {
        let chain = match session.attr("chain") {
            Some(chain) if !chain.is_empty() => format!("{chain},{}", self.value),
            _ => self.value.clone(),
        };
        let creation = Creation::unchanged()
            .set(self.key.clone(), self.value.clone())
            .set("chain", chain);
        match (&self.client_key, request) {
            (Some(key), Some(request)) => creation.set(key.clone(), request.client_addr()),
            _ => creation,
        }
    }
}

impl Policy for Tag {
    fn init(config: Config) -> Result<Self, String> {
        config.reject_unknown(&["key", "value", "client_key"])?;
        let client_key = config.str_opt("client_key")?;
        Ok(Tag {
            key: config.str_or("key", "tag")?,
            value: config.str("value")?,
            client_key,
        })
    }

    fn hooks(&self) -> Hooks {
        Hooks::NONE.with_create().with_access()
    }

    fn on_create(
        &self,
        session: &Session,
        request: Option<&RequestInfo>,
        _now: i64,
    ) -> Result<Creation, Denial> {
        Ok(self.creation(session, request))
    }
}

sessiongate_policy::export_policy!(Tag);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_and_chains() {
        let t = Tag::init(Config::parse(r#"{"key": "team", "value": "b"}"#).unwrap()).unwrap();
        let c = t.creation(&Session::default(), None);
        assert_eq!(c, Creation::unchanged().set("team", "b").set("chain", "b"));
        let s = Session::default().with_attr("chain", "a");
        assert_eq!(t.creation(&s, None).attributes["chain"], "a,b");
        let t = Tag::init(Config::parse(r#"{"value": "b", "client_key": "ip"}"#).unwrap()).unwrap();
        let request = RequestInfo::default().with_client_addr("203.0.113.7");
        assert_eq!(
            t.creation(&Session::default(), Some(&request)).attributes["ip"],
            "203.0.113.7"
        );
        assert_eq!(
            Tag::init(Config::parse("{}").unwrap()),
            Err("missing required key `value`".into())
        );
    }
}
