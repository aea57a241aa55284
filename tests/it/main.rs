//! Integration tests: the real `release` binary against a real S3-compatible server (Garage)
//! and the local backend. One test binary; see `support` for the harness.

mod large;
mod packaging;
mod refusals;
mod server;
mod support;
mod tokens;
mod upload;
