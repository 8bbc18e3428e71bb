//! Internal engine of [`orm`](https://docs.rs/orm): the engine and pool,
//! sessions, metadata, the SQL AST and its PostgreSQL dialect, and DDL.
//!
//! **Not semver-stable on its own.** Depend on the `orm` crate, which
//! re-exports everything users need from here.

// Denied but for one module, whose few lines of unsafe code are what lets
// a load take its handles' references in one step.
#![deny(unsafe_code)]

#[doc(hidden)]
pub mod codegen;
#[allow(unsafe_code)]
mod counted;
pub mod dev;
pub mod engine;
pub mod error;
pub mod expr;
mod identity;
pub mod metadata;
pub mod model;
pub mod query;
pub mod session;
pub mod sql;
pub mod tracked;
pub mod types;
mod unit;
pub mod url;

pub use engine::{create_engine, Connection, Engine, EngineBuilder, PoolStatus};
pub use error::{Error, Result};
pub use expr::{Column, Condition, Order};
pub use metadata::{MetaData, Registration};
pub use model::{ColumnDef, ForeignKeyDef, Model, TableDef};
pub use query::{Joined, Query, Selection};
pub use session::{sessionmaker, Session, SessionConfig, SessionMaker};
pub use tracked::{ObjectStatus, Tracked, TrackedMut, TrackedRef};
pub use types::{ColumnType, IntoValue, Param};
pub use url::DatabaseUrl;

/// Re-exported for `#[derive(Model)]`'s generated code.
#[doc(hidden)]
pub use inventory;
