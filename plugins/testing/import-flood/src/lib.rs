//! Test plugin `import-flood` (interface 0.2.0): `on_access` calls the
//! gateway's `call` imports in a loop that never ends (the host must end
//! it at the time limit, counting the host's work too). Config
//! `name_bytes` (default 0): when above 0, each round also asks for an
//! attribute whose name is that long (a large argument for the host to
//! read on every call).

use std::hint::black_box;

use sessiongate_policy::__private::bindings::sessiongate::policy::call;
use sessiongate_policy::{Access, Config, Hooks, Policy, RequestInfo, Session};

pub struct ImportFlood {
    name: String,
}

impl Policy for ImportFlood {
    fn init(config: Config) -> Result<Self, String> {
        config.reject_unknown(&["name_bytes"])?;
        let bytes = config.u64_or("name_bytes", 0)?;
        Ok(ImportFlood {
            name: "n".repeat(usize::try_from(bytes).map_err(|e| e.to_string())?),
        })
    }

    fn hooks(&self) -> Hooks {
        Hooks::NONE.with_access()
    }

    fn on_access(&self, _session: &Session, _request: &RequestInfo, _now: i64) -> Access {
        loop {
            black_box(call::request_path());
            black_box(call::user_agent());
            black_box(call::session_attributes());
            if !self.name.is_empty() {
                black_box(call::session_attribute(&self.name));
            }
        }
    }
}

sessiongate_policy::export_policy!(ImportFlood);
