//! Integration tests: the real `release` binary against a real S3-compatible server (Garage)
//! and the local backend. One test binary; see `support` for the harness.

mod abuse;
mod audit;
mod backup;
mod bodies;
mod concurrency;
mod crash;
mod curation;
mod floods;
mod hostile_archives;
mod hostile_nodes;
mod large;
mod load;
mod metrics;
mod nodes;
mod openapi;
mod packaging;
mod pages;
mod policies;
mod proxy;
mod recipes;
mod refusals;
mod releases;
mod roles;
mod scopes;
mod server;
mod services;
mod ssh;
mod support;
mod throttles;
mod timeouts;
mod tls;
mod tokens;
mod tour;
mod upload;
mod webhooks;
