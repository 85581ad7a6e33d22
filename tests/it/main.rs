//! The integration suite: one test binary, real sockets, a real SQLite
//! file, a real upstream server started by the tests.

mod admin;
mod config_cli;
mod harness;
mod hybrid;
mod policies;
mod proxy;
mod store_suite;
