//! The test harness: one server for the whole run, one fresh database per test.

use orm::dev::{DevServer, TestDatabase};
use orm::Engine;
use tokio::sync::OnceCell;

static SERVER: OnceCell<DevServer> = OnceCell::const_new();

/// The server every test uses: `DATABASE_URL`, the local default, or a
/// throwaway cluster (stopped by its watchdog when the test process exits).
pub async fn server() -> &'static DevServer {
    SERVER
        .get_or_init(|| async { DevServer::start().await.expect("a PostgreSQL server for the tests") })
        .await
}

/// A fresh database, dropped when this value is.
pub struct TestDb {
    pub engine: Engine,
    pub database: TestDatabase,
}

impl TestDb {
    /// Connections to this database left idle inside a transaction.
    pub async fn idle_in_transaction(&self) -> i64 {
        self.scalar(&format!(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = '{}' AND state LIKE 'idle in transaction%'",
            self.database.name()
        ))
        .await
    }

    pub fn url(&self) -> &str {
        self.database.url()
    }

    /// Runs plain SQL on a connection of its own (outside any session).
    pub async fn execute(&self, sql: &str) {
        let conn = self.engine.connect().await.expect("connect");
        conn.raw_batch(sql).await.expect(sql);
    }

    /// A single bigint value from a query run outside any session.
    pub async fn scalar(&self, sql: &str) -> i64 {
        let conn = self.engine.connect().await.expect("connect");
        let rows = conn.raw_query(sql, &[]).await.expect(sql);
        rows[0].get(0)
    }

    /// Rows of one text column, from a query run outside any session.
    pub async fn strings(&self, sql: &str) -> Vec<String> {
        let conn = self.engine.connect().await.expect("connect");
        let rows = conn.raw_query(sql, &[]).await.expect(sql);
        rows.iter().map(|r| r.get(0)).collect()
    }

    /// Locks `table` against every other connection until the lock is
    /// released: a statement on it waits, so a timeout surely cuts it off.
    pub async fn lock_table(&self, table: &str) -> TableLock {
        let conn = self.engine.connect().await.expect("connect");
        conn.raw_batch(&format!("BEGIN; LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE"))
            .await
            .expect("lock");
        TableLock(conn)
    }
}

/// A table lock held by a transaction of its own; see [`TestDb::lock_table`].
pub struct TableLock(orm::Connection);

impl TableLock {
    pub async fn release(self) {
        self.0.raw_batch("COMMIT").await.expect("release the lock");
    }
}

/// Fails unless `conn` is outside any transaction block: there, SAVEPOINT is
/// refused with SQLSTATE 25P01.
pub async fn assert_outside_transaction(conn: &orm::Connection) {
    match conn.raw_batch("SAVEPOINT probe").await {
        Err(orm::Error::Database { code, .. }) => assert_eq!(code.as_deref(), Some("25P01")),
        other => panic!("the connection is still inside a transaction: {other:?}"),
    }
}

pub async fn test_db() -> TestDb {
    test_db_with(|builder| builder).await
}

pub async fn test_db_with(configure: impl FnOnce(orm::EngineBuilder) -> orm::EngineBuilder) -> TestDb {
    let database = TestDatabase::create(server().await)
        .await
        .expect("create test database");
    let engine = configure(Engine::builder(database.url()).echo(true))
        .build()
        .expect("engine");
    TestDb { engine, database }
}

thread_local! {
    /// The echo events of the test running on this thread, while captured.
    static CAPTURED: std::cell::RefCell<Option<Vec<Echoed>>> = const { std::cell::RefCell::new(None) };
}

/// Records every `orm::echo` event of this thread while alive. Tests run on
/// tokio's current-thread runtime, so a test's statements are echoed on its
/// own thread. One global subscriber serves all tests: a per-thread one
/// would race with tracing's process-wide cache of which callsites are on.
pub struct EchoCapture;

impl EchoCapture {
    pub fn start() -> Self {
        static INSTALL: std::sync::Once = std::sync::Once::new();
        INSTALL.call_once(|| {
            tracing::subscriber::set_global_default(Recorder).expect("no other global subscriber");
        });
        CAPTURED.with(|c| *c.borrow_mut() = Some(Vec::new()));
        EchoCapture
    }

    /// SQL of the statements seen so far, emptying the record.
    pub fn take(&self) -> Vec<String> {
        self.take_events().into_iter().map(|e| e.sql).collect()
    }

    /// Everything recorded so far, emptying the record.
    pub fn take_events(&self) -> Vec<Echoed> {
        CAPTURED.with(|c| c.borrow_mut().as_mut().map(std::mem::take).unwrap_or_default())
    }

    /// The first statement recorded so far whose SQL starts with `prefix`,
    /// emptying the record.
    pub fn take_starting_with(&self, prefix: &str) -> Echoed {
        self.take_events()
            .into_iter()
            .find(|e| e.sql.starts_with(prefix))
            .unwrap_or_else(|| panic!("no statement starting with {prefix:?} was echoed"))
    }
}

impl Drop for EchoCapture {
    fn drop(&mut self) {
        CAPTURED.with(|c| *c.borrow_mut() = None);
    }
}

/// One `orm::echo` event.
#[derive(Debug, Default)]
pub struct Echoed {
    pub sql: String,
    pub params: Option<u64>,
    pub elapsed_us: Option<u64>,
    /// The error of a statement that failed.
    pub error: Option<String>,
}

struct Recorder;

struct SqlField<'a>(&'a mut Echoed);

impl tracing::field::Visit for SqlField<'_> {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if field.name() == "sql" {
            self.0.sql = value.to_owned();
        }
    }

    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        match field.name() {
            "params" => self.0.params = Some(value),
            "elapsed_us" => self.0.elapsed_us = Some(value),
            _ => {}
        }
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "error" {
            self.0.error = Some(format!("{value:?}"));
        }
    }
}

impl tracing::Subscriber for Recorder {
    fn enabled(&self, metadata: &tracing::Metadata<'_>) -> bool {
        metadata.target() == "orm::echo"
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        let mut echoed = Echoed::default();
        event.record(&mut SqlField(&mut echoed));
        CAPTURED.with(|c| {
            if let Some(events) = c.borrow_mut().as_mut() {
                events.push(echoed);
            }
        });
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

/// Asserts that `result` failed with a type mismatch naming `table.column`.
#[track_caller]
pub fn assert_type_mismatch<T: std::fmt::Debug>(result: orm::Result<T>, table: &str, column: &str) {
    match result {
        Err(orm::Error::TypeMismatch {
            table: got_table,
            column: got_column,
            ..
        }) => assert_eq!((got_table.as_str(), got_column.as_str()), (table, column)),
        other => panic!("expected a type mismatch on {table}.{column}, got {other:?}"),
    }
}
