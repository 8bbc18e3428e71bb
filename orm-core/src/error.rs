//! The one error type of the crate.
//!
//! We follow sqlx here (a public `#[non_exhaustive]` enum) rather than
//! tokio-postgres' opaque struct: callers of an ORM branch on *what* went
//! wrong (a unique violation, a missing row) far more often than driver users
//! do, and a match on a variant reads better than a chain of accessors. The
//! driver's error always stays reachable through [`std::error::Error::source`].

/// Shorthand for results whose error is [`enum@Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in `orm`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The database URL could not be parsed; `part` names the culprit
    /// (`scheme`, `host`, `port`, `password`, `query option "connect_timeout"`, ...).
    #[error("invalid database URL: bad {part}: {reason}")]
    InvalidUrl {
        /// Which part of the URL is wrong.
        part: String,
        /// Why it is wrong.
        reason: String,
    },

    /// The URL names a scheme other than `postgresql`, `postgres` or
    /// `postgresql+<driver>`.
    #[error(
        "unsupported database URL scheme {scheme:?}: expected postgresql://, postgres:// or postgresql+<driver>://"
    )]
    UnsupportedScheme {
        /// The scheme as written.
        scheme: String,
    },

    /// An engine option is out of range or cannot be honoured.
    #[error("invalid engine option {option}: {reason}")]
    InvalidOption {
        /// The option's name, as in `create_engine`'s keywords.
        option: &'static str,
        /// Why it is rejected.
        reason: String,
    },

    /// No server answered at the configured address.
    #[error("database server unreachable: {message}")]
    ServerUnreachable {
        /// What the operating system or driver said.
        message: String,
        /// The driver's error.
        #[source]
        source: tokio_postgres::Error,
    },

    /// The server refused the user name or password.
    #[error("authentication failed: {message}")]
    AuthenticationFailed {
        /// PostgreSQL's message.
        message: String,
        /// The driver's error.
        #[source]
        source: tokio_postgres::Error,
    },

    /// The database named in the URL does not exist.
    #[error("database does not exist: {message}")]
    DatabaseNotFound {
        /// PostgreSQL's message.
        message: String,
        /// The driver's error.
        #[source]
        source: tokio_postgres::Error,
    },

    /// No pooled connection became free within the pool timeout.
    #[error("timed out after {waited:?} waiting for a connection from the pool")]
    PoolTimeout {
        /// How long the caller waited (the engine's `pool_timeout`).
        waited: std::time::Duration,
    },

    /// Opening a new connection took longer than the connect timeout.
    #[error("timed out after {waited:?} connecting to the database server")]
    ConnectTimeout {
        /// The engine's connect timeout.
        waited: std::time::Duration,
    },

    /// The connection to the server broke while it was in use.
    #[error("connection to the database was lost")]
    ConnectionLost {
        /// The driver's error.
        #[source]
        source: tokio_postgres::Error,
    },

    /// A statement violated a unique constraint or primary key.
    #[error(
        "unique constraint {} violated on table {}: {message}",
        display_opt(constraint),
        display_opt(table)
    )]
    UniqueViolation {
        /// The violated constraint's name.
        constraint: Option<String>,
        /// The table the constraint belongs to.
        table: Option<String>,
        /// PostgreSQL's message and detail.
        message: String,
        /// The driver's error.
        #[source]
        source: tokio_postgres::Error,
    },

    /// A statement violated a foreign key.
    #[error(
        "foreign key {} violated on table {}: {message}",
        display_opt(constraint),
        display_opt(table)
    )]
    ForeignKeyViolation {
        /// The violated constraint's name.
        constraint: Option<String>,
        /// The table the constraint belongs to.
        table: Option<String>,
        /// PostgreSQL's message and detail.
        message: String,
        /// The driver's error.
        #[source]
        source: tokio_postgres::Error,
    },

    /// A statement violated a CHECK constraint.
    #[error(
        "check constraint {} violated on table {}: {message}",
        display_opt(constraint),
        display_opt(table)
    )]
    CheckViolation {
        /// The violated constraint's name.
        constraint: Option<String>,
        /// The table the constraint belongs to.
        table: Option<String>,
        /// PostgreSQL's message and detail.
        message: String,
        /// The driver's error.
        #[source]
        source: tokio_postgres::Error,
    },

    /// A statement put NULL into a NOT NULL column.
    #[error(
        "NULL in non-nullable column {} of table {}: {message}",
        display_opt(column),
        display_opt(table)
    )]
    NotNullViolation {
        /// The column.
        column: Option<String>,
        /// The table.
        table: Option<String>,
        /// PostgreSQL's message.
        message: String,
        /// The driver's error.
        #[source]
        source: tokio_postgres::Error,
    },

    /// Any other error reported by the server or the driver.
    #[error("database error: {message}")]
    Database {
        /// PostgreSQL's SQLSTATE code, when the server sent one.
        code: Option<String>,
        /// The message.
        message: String,
        /// The driver's error.
        #[source]
        source: tokio_postgres::Error,
    },

    /// A column's value could not be converted to or from the Rust field type.
    #[error("type mismatch in column {table}.{column}: {source}")]
    TypeMismatch {
        /// The table.
        table: String,
        /// The column.
        column: String,
        /// The driver's conversion error.
        #[source]
        source: tokio_postgres::Error,
    },

    /// `one()` found no row, or `refresh` found its row gone.
    #[error("no row found in table {table}")]
    NotFound {
        /// The queried table.
        table: String,
    },

    /// `one()` or `one_or_none()` found more than one row.
    #[error("expected one row from table {table}, found several")]
    MultipleRowsFound {
        /// The queried table.
        table: String,
    },

    /// A flush's INSERT, UPDATE or DELETE touched another number of rows than
    /// the session expected: for updates and deletes, the rows were deleted by
    /// someone else since they were loaded.
    #[error("stale data in table {table}: expected to {operation} {expected} row(s), matched {actual}")]
    StaleData {
        /// The table.
        table: String,
        /// `update` or `delete`.
        operation: &'static str,
        /// Rows the session meant to change.
        expected: u64,
        /// Rows the database changed.
        actual: u64,
    },

    /// The models' metadata is inconsistent (for example a foreign key cycle
    /// that cannot be ordered, or two models claiming one table name).
    #[error("invalid model metadata: {0}")]
    Metadata(String),

    /// The session was used in a way its state does not allow
    /// (for example `begin` while a transaction is already open).
    #[error("invalid session state: {0}")]
    InvalidState(String),

    /// The local development server could not be found or started.
    #[error("no PostgreSQL server available: {0}")]
    DevServer(String),
}

fn display_opt(value: &Option<String>) -> &str {
    value.as_deref().unwrap_or("<unknown>")
}

impl Error {
    /// True when the error says that a row was not found.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::NotFound { .. })
    }

    /// True for a unique, foreign key, check or not-null violation.
    pub fn is_constraint_violation(&self) -> bool {
        self.constraint().is_some()
            || matches!(
                self,
                Error::UniqueViolation { .. }
                    | Error::ForeignKeyViolation { .. }
                    | Error::CheckViolation { .. }
                    | Error::NotNullViolation { .. }
            )
    }

    /// The name of the violated constraint, for constraint violations.
    pub fn constraint(&self) -> Option<&str> {
        match self {
            Error::UniqueViolation { constraint, .. }
            | Error::ForeignKeyViolation { constraint, .. }
            | Error::CheckViolation { constraint, .. } => constraint.as_deref(),
            _ => None,
        }
    }

    /// Whether the server refused a prepared statement because a table it
    /// reads changed its columns' types since it was prepared. Told by the
    /// server function that raised it, which `lc_messages` never translates
    /// (the English message is the fallback for servers that omit it).
    pub(crate) fn is_stale_statement(&self) -> bool {
        let Error::Database {
            code: Some(code),
            message,
            source,
        } = self
        else {
            return false;
        };
        let routine = source.as_db_error().and_then(|db| db.routine());
        code == "0A000"
            && (routine == Some("RevalidateCachedQuery")
                || message.starts_with("cached plan must not change result type"))
    }

    /// Sorts a driver error into the variant that describes it best.
    pub fn from_driver(source: tokio_postgres::Error) -> Self {
        if let Some(db) = source.as_db_error() {
            let message = match db.detail() {
                Some(detail) => format!("{} ({detail})", db.message()),
                None => db.message().to_owned(),
            };
            let constraint = db.constraint().map(str::to_owned);
            let table = db.table().map(str::to_owned);
            return match db.code().code() {
                "23505" => Error::UniqueViolation {
                    constraint,
                    table,
                    message,
                    source,
                },
                "23503" => Error::ForeignKeyViolation {
                    constraint,
                    table,
                    message,
                    source,
                },
                "23514" => Error::CheckViolation {
                    constraint,
                    table,
                    message,
                    source,
                },
                "23502" => Error::NotNullViolation {
                    column: db.column().map(str::to_owned),
                    table,
                    message,
                    source,
                },
                "28P01" | "28000" => Error::AuthenticationFailed { message, source },
                // The server ended this backend (pg_terminate_backend, shutdown).
                "57P01" | "57P02" | "57P03" => Error::ConnectionLost { source },
                "3D000" => Error::DatabaseNotFound { message, source },
                code => Error::Database {
                    code: Some(code.to_owned()),
                    message,
                    source,
                },
            };
        }
        if source.is_closed() {
            return Error::ConnectionLost { source };
        }
        let io_kind = std::error::Error::source(&source)
            .and_then(|inner| inner.downcast_ref::<std::io::Error>())
            .map(std::io::Error::kind);
        match io_kind {
            Some(
                std::io::ErrorKind::ConnectionRefused
                | std::io::ErrorKind::NotFound
                | std::io::ErrorKind::TimedOut
                | std::io::ErrorKind::AddrNotAvailable
                | std::io::ErrorKind::HostUnreachable
                | std::io::ErrorKind::NetworkUnreachable,
            ) => Error::ServerUnreachable {
                message: source_chain(&source),
                source,
            },
            Some(
                std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::BrokenPipe
                | std::io::ErrorKind::UnexpectedEof,
            ) => Error::ConnectionLost { source },
            _ => {
                let message = source_chain(&source);
                // The server asked for a password and none was given, or the
                // exchange (SCRAM) failed on the client's side.
                if message.contains("password missing") || message.contains("authentication error") {
                    Error::AuthenticationFailed { message, source }
                } else if message.contains("error connecting to server") || message.contains("timeout") {
                    Error::ServerUnreachable { message, source }
                } else {
                    Error::Database {
                        code: None,
                        message,
                        source,
                    }
                }
            }
        }
    }

    /// Whether the server aborted the transaction the error happened in:
    /// every error the server reports inside a transaction block does, and
    /// so does a broken connection. Errors found on the client side
    /// (decoding, encoding a parameter, misuse, a callback's own error)
    /// leave it usable.
    pub(crate) fn aborts_transaction(&self) -> bool {
        match self.driver_error() {
            Some(source) => source.as_db_error().is_some() || source.is_closed() || self.is_connection_failure(),
            None => matches!(self, Error::StaleData { .. } | Error::ConnectTimeout { .. }),
        }
    }

    fn is_connection_failure(&self) -> bool {
        matches!(self, Error::ConnectionLost { .. } | Error::ServerUnreachable { .. })
            || self
                .driver_error()
                .and_then(|e| std::error::Error::source(e))
                .is_some_and(|inner| inner.is::<std::io::Error>())
    }

    /// The driver's error behind this one, if any.
    fn driver_error(&self) -> Option<&tokio_postgres::Error> {
        match self {
            Error::ServerUnreachable { source, .. }
            | Error::AuthenticationFailed { source, .. }
            | Error::DatabaseNotFound { source, .. }
            | Error::ConnectionLost { source }
            | Error::UniqueViolation { source, .. }
            | Error::ForeignKeyViolation { source, .. }
            | Error::CheckViolation { source, .. }
            | Error::NotNullViolation { source, .. }
            | Error::Database { source, .. }
            | Error::TypeMismatch { source, .. } => Some(source),
            _ => None,
        }
    }

    pub(crate) fn from_pool(
        error: deadpool_postgres::PoolError,
        pool_timeout: std::time::Duration,
        connect_timeout: Option<std::time::Duration>,
    ) -> Self {
        use deadpool_postgres::{PoolError, TimeoutType};
        match error {
            PoolError::Timeout(TimeoutType::Create) => Error::ConnectTimeout {
                waited: connect_timeout.unwrap_or(pool_timeout),
            },
            PoolError::Timeout(_) => Error::PoolTimeout { waited: pool_timeout },
            PoolError::Backend(source) => Error::from_driver(source),
            other => Error::InvalidState(format!("connection pool: {other}")),
        }
    }
}

/// Joins an error and its sources into one line, as a log would show them.
fn source_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut next = error.source();
    while let Some(inner) = next {
        let part = inner.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        next = inner.source();
    }
    text
}
