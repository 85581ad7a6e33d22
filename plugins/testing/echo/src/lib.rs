//! Test plugin `echo` (interface 0.2.0): `on_access` denies 403 with what
//! it read through the gateway's `call` imports, `<method> <path> <host>
//! <client-addr> <user-agent> <id> <user-id> <attr>` (`attr`: the session's
//! attribute `echo`, or `-`), so a test can check that each call sees its
//! own request and session. `on_create` calls the same imports directly
//! (outside an access call, where they must answer nothing) and stores
//! what they said, joined, in the attribute `outside`.

use sessiongate_policy::__private::bindings::sessiongate::policy::call;
use sessiongate_policy::{Access, Config, Creation, Denial, Hooks, Policy, RequestInfo, Session};

pub struct Echo;

/// Everything the imports answer, as one line.
pub fn echo(session: &Session, request: &RequestInfo) -> String {
    format!(
        "{} {} {} {} {} {} {} {}",
        request.method(),
        request.path(),
        request.host(),
        request.client_addr(),
        request.user_agent(),
        session.id(),
        session.user_id(),
        session.attr("echo").unwrap_or("-"),
    )
}

impl Policy for Echo {
    fn init(_config: Config) -> Result<Self, String> {
        Ok(Echo)
    }

    fn hooks(&self) -> Hooks {
        Hooks::NONE.with_create().with_access()
    }

    fn on_create(
        &self,
        _session: &Session,
        _request: Option<&RequestInfo>,
        _now: i64,
    ) -> Result<Creation, Denial> {
        let outside = [
            call::request_method(),
            call::request_path(),
            call::request_host(),
            call::client_addr(),
            call::user_agent(),
            call::session_id(),
            call::user_id(),
            call::session_attribute("echo").unwrap_or_default(),
            format!("{}", call::session_attributes().len()),
        ]
        .join("|");
        Ok(Creation::unchanged().set("outside", outside))
    }

    fn on_access(&self, session: &Session, request: &RequestInfo, _now: i64) -> Access {
        Access::deny(403, echo(session, request))
    }
}

sessiongate_policy::export_policy!(Echo);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echoes_what_it_reads() {
        let s = Session::default().with_id("i").with_user_id("u");
        let r = RequestInfo::default()
            .with_method("GET")
            .with_path("/p")
            .with_host("h")
            .with_client_addr("c")
            .with_user_agent("a");
        assert_eq!(echo(&s, &r), "GET /p h c a i u -");
    }
}
