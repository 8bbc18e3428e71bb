//! Integration tests against a real PostgreSQL server, each test in a fresh
//! database. One binary, so the crate and its dependencies link once.

mod common;
mod ddl;
mod engine;
mod hygiene;
mod joins;
mod models;
mod query;
mod session;
mod tracking;
