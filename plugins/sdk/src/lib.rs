//! Write sessiongate's session policies as WebAssembly plugins in plain
//! Rust.
//!
//! A policy is a type that implements [`Policy`]: it is built once per load
//! from its `config` table in `gateway.toml` ([`Policy::init`]), says which
//! hooks it implements ([`Policy::hooks`]) and implements those. The
//! [`export_policy!`] macro wires it to the plugin interface
//! (`plugins/wit/0.2.0/policy.wit`, world `policy` of
//! `sessiongate:policy@0.2.0`).
//!
//! ```no_run
//! use sessiongate_policy::{Access, Config, Hooks, Policy, RequestInfo, Session};
//!
//! struct AdminOnly {
//!     prefix: String,
//! }
//!
//! impl Policy for AdminOnly {
//!     fn init(config: Config) -> Result<Self, String> {
//!         config.reject_unknown(&["prefix"])?;
//!         Ok(AdminOnly { prefix: config.str_or("prefix", "/admin")? })
//!     }
//!
//!     fn hooks(&self) -> Hooks {
//!         Hooks::NONE.with_access()
//!     }
//!
//!     fn on_access(&self, session: &Session, request: &RequestInfo, _now: i64) -> Access {
//!         if request.path().starts_with(&self.prefix) && session.attr("role") != Some("admin") {
//!             return Access::deny(403, "admins only");
//!         }
//!         Access::Allow
//!     }
//! }
//!
//! sessiongate_policy::export_policy!(AdminOnly);
//! ```
//!
//! Build it as a `cdylib` for `wasm32-unknown-unknown`; the result is a core
//! module that carries the WIT world in a `component-type:*` custom section,
//! and the gateway turns it into a component when it loads it.
//!
//! # What a policy can and cannot do
//!
//! A policy has no clock, filesystem, network or environment: everything it
//! may look at is the [`Session`] and [`RequestInfo`] the hooks get, and
//! `now` is the gateway's clock in milliseconds since the Unix epoch.
//!
//! # Paying only for what the policy reads
//!
//! The access hook runs on every authenticated request, so the SDK builds
//! on interface 0.2.0: `on_access`'s session carries its times
//! (`created_at`, `last_seen_at`, `expires_at`) at once, and every string
//! — [`Session::id`], [`Session::user_id`], [`Session::attr`],
//! [`RequestInfo::path`] and the rest — is fetched from the gateway the
//! first time the policy calls its method, then kept for the rest of the
//! call. A policy that decides on the times alone copies no string at all.
//! (`on_create` and `on_evict` get everything up front: they are rare.) It can write to the gateway's log
//! with the [`log`] helpers. Each call runs under a time and a memory limit;
//! a policy that traps (a panic, running out of memory or stack, a time-out)
//! has its instance thrown away, and the request gets the policy's
//! `on_error` answer. So keep no state that matters between calls: an
//! instance may be replaced at any time, and the gateway may run several at
//! once. That is why the hooks take `&self`.
//!
//! A panic is logged at `error` level (with its message and location)
//! before the instance traps, so a failing policy says why in the
//! gateway's log.
//!
//! # How the bindings cross the crate boundary
//!
//! `wit_bindgen::generate!` runs once, here, in module
//! `__private::bindings`, with `pub_export_macro: true` and
//! `export_macro_name: "export_world"`. That turns the generated `export!`
//! macro into a `#[macro_export]` macro, callable from any crate as
//! `sessiongate_policy::__private::bindings::export_world!(T with_types_in
//! sessiongate_policy::__private::bindings)`. The explicit `with_types_in`
//! path makes the generated `#[unsafe(export_name = ...)]` shims call the
//! generated glue in this crate, so a plugin crate needs no direct
//! dependency on `wit-bindgen` (the glue uses this crate's).
//!
//! With `pub_export_macro`, wit-bindgen splits the component-type custom
//! section in two: this crate carries the world with its exports removed
//! (the imports only), and the `export_world!` invocation emits the full
//! world into the plugin crate. So a library that merely depends on this
//! crate exports nothing, and the plugin that calls [`export_policy!`]
//! exports all four functions.
//!
//! This crate implements the generated `Guest` trait once, generically, for
//! any type implementing the hidden `__private::Export` trait. That trait
//! names the policy type and gives access to a per-plugin slot holding the
//! instance built by `init`. [`export_policy!`] defines that slot (a
//! `thread_local!`, a plain static on wasm) and a unit type implementing
//! `Export` in the plugin crate, then invokes `export_world!` for it (the
//! macro only accepts an identifier, hence the unit type).
//!
//! The generated code compiles for the host target too (imports become
//! stubs that panic if called), so plugins' unit tests run with a plain
//! `cargo test`. On the host, the [`log`] helpers print to stderr instead of
//! calling the (absent) host import.

#![warn(missing_docs)]

mod config;
pub mod log;
mod types;

pub use config::Config;
pub use serde_json;
pub use types::{Access, Creation, Denial, Hooks, RequestInfo, Session};

/// A session policy.
///
/// Implement [`init`](Policy::init) and [`hooks`](Policy::hooks), and the
/// hooks that `hooks` declares; the gateway calls only the declared ones.
/// The defaults change nothing: `on_create` keeps the session as it is,
/// `on_access` allows, `on_evict` revokes nothing.
pub trait Policy: Sized + 'static {
    /// Builds the policy from its `config` table in `gateway.toml`. An
    /// error fails the plugin's load with this message, so say which key is
    /// wrong and why (the [`Config`] helpers do).
    fn init(config: Config) -> Result<Self, String>;

    /// Which hooks this policy implements.
    fn hooks(&self) -> Hooks;

    /// A session is being created; `request` is `None` when it is created
    /// through the admin API. Return the changes to make, or a denial to
    /// refuse the login.
    fn on_create(
        &self,
        session: &Session,
        request: Option<&RequestInfo>,
        now: i64,
    ) -> Result<Creation, Denial> {
        let _ = (session, request, now);
        Ok(Creation::unchanged())
    }

    /// An authenticated request is about to go upstream.
    fn on_access(&self, session: &Session, request: &RequestInfo, now: i64) -> Access {
        let _ = (session, request, now);
        Access::Allow
    }

    /// `created` was just created; `live` are the user's other live
    /// sessions, newest first. Returns the ids of sessions to revoke.
    fn on_evict(&self, created: &Session, live: &[Session], now: i64) -> Vec<String> {
        let _ = (created, live, now);
        Vec::new()
    }
}

/// Exports a [`Policy`] type as the plugin's implementation of the WIT world
/// `policy`. Use it once, in the plugin crate (a `cdylib`):
///
/// ```ignore
/// sessiongate_policy::export_policy!(MyPolicy);
/// ```
///
/// The instance made by `init` is kept in a static; a later `init` replaces
/// it. A hook called before a successful `init` panics (and so traps).
#[macro_export]
macro_rules! export_policy {
    ($policy:ty) => {
        const _: () = {
            ::std::thread_local! {
                static __SESSIONGATE_POLICY_INSTANCE: ::core::cell::RefCell<
                    ::core::option::Option<$policy>,
                > = const { ::core::cell::RefCell::new(::core::option::Option::None) };
            }

            struct __SessiongatePolicyExport;

            impl $crate::__private::Export for __SessiongatePolicyExport {
                type Policy = $policy;

                fn with_instance<R>(
                    f: impl ::core::ops::FnOnce(&mut ::core::option::Option<$policy>) -> R,
                ) -> R {
                    __SESSIONGATE_POLICY_INSTANCE.with_borrow_mut(f)
                }
            }

            $crate::__private::bindings::export_world!(
                __SessiongatePolicyExport with_types_in $crate::__private::bindings
            );
        };
    };
}

#[doc(hidden)]
pub mod __private {
    //! Not public API: used by [`export_policy!`](crate::export_policy).

    use crate::{Config, Policy, RequestInfo, Session};

    /// The bindings generated from `plugins/wit/0.2.0` (world `policy`).
    #[allow(missing_docs, clippy::all)]
    pub mod bindings {
        wit_bindgen::generate!({
            world: "policy",
            path: "../wit/0.2.0",
            pub_export_macro: true,
            export_macro_name: "export_world",
        });
    }

    use bindings::sessiongate::policy::types as wit;

    /// Implemented by [`export_policy!`](crate::export_policy) for a unit
    /// type in the plugin crate.
    pub trait Export {
        /// The exported policy.
        type Policy: Policy;
        /// Runs `f` on the slot holding the instance built by `init`.
        fn with_instance<R>(f: impl FnOnce(&mut Option<Self::Policy>) -> R) -> R;
    }

    fn with_policy<E: Export, R>(hook: &str, f: impl FnOnce(&E::Policy) -> R) -> R {
        E::with_instance(|slot| match slot.as_ref() {
            Some(policy) => f(policy),
            None => panic!("sessiongate-policy: `{hook}` was called before `init` succeeded"),
        })
    }

    #[cfg(target_arch = "wasm32")]
    fn install_panic_hook() {
        static INSTALLED: std::sync::Once = std::sync::Once::new();
        INSTALLED.call_once(|| {
            std::panic::set_hook(Box::new(|info| {
                crate::log::error(format!("policy panicked: {info}"));
            }));
        });
    }

    #[cfg(not(target_arch = "wasm32"))]
    fn install_panic_hook() {}

    impl<E: Export> bindings::Guest for E {
        fn init(config: String) -> Result<wit::Hooks, String> {
            install_panic_hook();
            let config = Config::parse(&config)?;
            let policy = E::Policy::init(config)?;
            let hooks = policy.hooks();
            E::with_instance(|slot| *slot = Some(policy));
            Ok(hooks.into())
        }

        fn on_create(
            session: wit::Session,
            request: Option<wit::RequestInfo>,
            now: i64,
        ) -> Result<wit::Creation, wit::Denial> {
            let session = Session::from(session);
            let request = request.map(RequestInfo::from);
            with_policy::<E, _>("on-create", |p| {
                p.on_create(&session, request.as_ref(), now)
            })
            .map(Into::into)
            .map_err(Into::into)
        }

        fn on_access(created_at: i64, last_seen_at: i64, expires_at: i64, now: i64) -> wit::Access {
            let session = Session::live(created_at, last_seen_at, expires_at);
            let request = RequestInfo::live();
            with_policy::<E, _>("on-access", |p| p.on_access(&session, &request, now)).into()
        }

        fn on_evict(created: wit::Session, live: Vec<wit::Session>, now: i64) -> Vec<String> {
            let created = Session::from(created);
            let live: Vec<Session> = live.into_iter().map(Session::from).collect();
            with_policy::<E, _>("on-evict", |p| p.on_evict(&created, &live, now))
        }
    }
}
