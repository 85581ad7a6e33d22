//! sessiongate: an edge session gateway.
//!
//! A reverse proxy that authenticates every request to a protected route
//! by looking its session token up in a hybrid store, and forwards it
//! upstream with the caller's identity in headers.
//!
//! # Map of the modules
//!
//! | module | owns |
//! | --- | --- |
//! | [`config`] | `gateway.toml` + `SESSIONGATE_*` → a validated [`config::Config`] |
//! | [`server`] | stores, listeners, connection cap, background tasks, graceful shutdown |
//! | `tls` | HTTPS for clients: the rustls config, certificates by SNI, reload without dropping connections |
//! | [`path`] | the request path's one normal form (what is routed on, logged and forwarded), or 400 |
//! | [`proxy`] | the request pipeline: the phases below, in order, for one request |
//! | `route` | the route phase: the path's normal form, the longest matching prefix |
//! | [`authn`] | the authenticate phase: token → session → the policy chain's access decision |
//! | [`forward`] | the rewrite, forward and respond phases: the upstream's view of a request, the call, upgrades |
//! | [`sessions`] | the session service: create, revoke, evict, the `x-sessiongate-*` directives, cookies (proxy and admin API alike) |
//! | [`reload`] | live config: what a reload changes, what needs a restart, the atomic swap of every worker's gateway |
//! | [`upstream`] | pooled upstream clients (HTTP and HTTPS), round robin, skipping refused URLs |
//! | `worker` | which per-core worker a thread is (`server.worker_threads`), for per-worker shards |
//! | `backend_tls` | TLS to the backends: PEM files checked at config time, the rustls client of HTTPS upstreams |
//! | [`forwarded`] | behind a load balancer: `server.trusted_proxies`, the `X-Forwarded-For` walk, the PROXY protocol header (public for the fuzz targets) |
//! | `limits` | per-client connection cap, upstream requests per connection, request body size and pace |
//! | [`headers`] | header constants, hop-by-hop removal, cookie and bearer parsing |
//! | [`token`] | token issue and verification (CSPRNG + MAC), the stored hash |
//! | [`session`] | the session record, its limits and the clock |
//! | [`store`] | the fast/durable tier traits, their backends (memory, Redis or Redis Cluster, SQLite, PostgreSQL) and the hybrid composition |
//! | [`policy`] | WebAssembly policy plugins: the wasmtime host, the default and per-route chains, hot swap |
//! | [`tools`] | operator tools (`sessiongate plugin try`) |
//! | [`admin`] | the admin API, `/healthz`, `/readyz`, `/metrics` |
//! | [`forward_auth`] | `[forward_auth]`: auth sub-requests from nginx `auth_request`, Traefik `forwardAuth`, Envoy `ext_authz`, routed and authenticated as the proxy does |
//! | [`assertion`] | signed identity for upstreams: the ES256 assertion, the key set and its reload, the JWKS document, `x-sessiongate-attr-*` headers |
//! | [`error`] | the one place an error becomes an HTTP response |
//! | [`metrics`], [`telemetry`] | Prometheus metrics and structured logs |
//!
//! # The path of a request
//!
//! [`server`] runs one worker per core (`server.worker_threads`), each
//! with its own runtime, listening socket (`SO_REUSEPORT`), [`proxy::Gateway`]
//! and upstream pools. A worker accepts a connection (HTTP/1.1 or h2c, or both over TLS
//! with `[server.tls]`) under its connection, per-client and time limits
//! (after a PROXY protocol header, from a trusted load balancer:
//! [`forwarded`]), and hands each request to
//! [`proxy::Gateway::handle`], which first settles who the client is
//! (a trusted proxy's `X-Forwarded-For`). It normalizes the path once with
//! [`path::normalize`] (400 for a path that reads two ways; that one path
//! is routed on, logged, shown to policies and forwarded), and `route`
//! picks the longest matching route. [`authn::Authenticator`]
//! extracts the token from `Authorization: Bearer` or the session cookie,
//! verifies its MAC with [`token::TokenKey`] (no store sees a forged
//! token), and looks its hash up in [`store::SessionStore`]: the fast tier,
//! then the durable tier with a restore into the fast tier. The route's
//! chain of [`policy`] plugins then allows the request, extends the
//! session's expiry or denies it. [`forward::Forwarder`] sends the request
//! to an [`upstream::Upstream`] with client-supplied identity headers
//! (and their look-alikes) removed and the session's identity added, its
//! body bounded in size and pace, and only a WebSocket upgrade bridged: a
//! request without a body on the lean path ([`h1`], on the request's own
//! task), the rest through hyper's client. On
//! the way back, [`sessions::SessionService`] acts on the upstream's
//! `x-sessiongate-login` / `-logout` headers: it creates or revokes
//! sessions and sets the cookie. Any failure becomes a
//! [`error::ProxyError`] and, in one place, the contract's JSON error.

pub mod admin;
pub mod assertion;
pub mod authn;
pub(crate) mod backend_tls;
pub mod body;
pub mod config;
pub mod error;
pub mod forward;
pub mod forward_auth;
pub mod forwarded;
pub mod h1;
pub mod headers;
pub(crate) mod limits;
pub mod metrics;
pub mod path;
pub mod policy;
pub mod proxy;
pub mod reload;
pub(crate) mod route;
pub mod server;
pub mod session;
pub mod sessions;
pub mod store;
pub mod telemetry;
pub(crate) mod tls;
pub mod token;
pub mod tools;
pub mod upstream;
pub(crate) mod worker;
