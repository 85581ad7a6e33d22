//! The integration suite: one test binary, real sockets, a real SQLite
//! file, a real upstream server started by the tests.

mod admin;
mod assertion;
mod backend_tls;
mod chains;
mod cluster;
mod config_cli;
mod cores;
mod forward_auth;
mod harness;
mod hybrid;
mod instances;
mod lean;
mod policies;
mod proxy;
mod reload;
mod sec_forwarded;
mod sec_headers;
mod sec_limits;
mod sec_origins;
mod sec_paths;
mod sec_tls;
mod store_suite;
