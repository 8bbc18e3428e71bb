//! The engine: a parsed URL, options, and a lazily connecting pool.

use std::fmt;
use std::sync::atomic::{fence, AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use deadpool::managed::{Metrics, RecycleError, RecycleResult};
use deadpool_postgres::{ClientWrapper, ManagerConfig, RecyclingMethod, Runtime};
use tokio_postgres::types::ToSql;
use tokio_postgres::{NoTls, Row, Statement};

use crate::error::{Error, Result};
use crate::sql::{BoundSql, Rendered, SqlCache};
use crate::url::DatabaseUrl;

/// Creates an engine for `url` with default options; see [`Engine::builder`]
/// for the keywords of SQLAlchemy's `create_engine`.
///
/// Nothing connects until the first statement.
pub fn create_engine(url: &str) -> Result<Engine> {
    Engine::builder(url).build()
}

/// A connection pool plus the options every session of it shares. Cheap to
/// clone: clones share the pool.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<EngineInner>,
}

struct EngineInner {
    /// The connection a session gave back last, kept out of the pool for
    /// the next checkout (see [`Engine::release`]). Declared before `pool`,
    /// so that it goes back into the pool before the pool is dropped.
    idle: Mutex<Option<PooledConnection>>,
    /// Checkouts waiting on the pool: while there are any, connections go
    /// back into the pool, which hands them to the waiters.
    waiting: AtomicUsize,
    url: DatabaseUrl,
    pool: deadpool::managed::Pool<ConnectionManager>,
    pool_timeout: Duration,
    connect_timeout: Option<Duration>,
    echo: bool,
    /// SQL text by statement shape, shared by the engine's sessions.
    sql: SqlCache,
}

impl fmt::Debug for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The URL's Display masks the password.
        f.debug_struct("Engine")
            .field("url", &self.inner.url.to_string())
            .field("pool_size", &self.inner.pool.status().max_size)
            .field("pool_timeout", &self.inner.pool_timeout)
            .field("echo", &self.inner.echo)
            .finish()
    }
}

/// The most shapes an engine may keep: the cache reserves two 4-byte
/// counters per shape when the engine is built (see `LoadSizes`), 512 KiB
/// at this size.
const MAX_QUERY_CACHE_SIZE: usize = 65_536;

/// Options for an [`Engine`], named after `create_engine`'s keywords.
#[derive(Clone)]
pub struct EngineBuilder {
    url: String,
    pool_size: usize,
    pool_timeout: Duration,
    connect_timeout: Option<Duration>,
    statement_timeout: Option<Duration>,
    echo: bool,
    application_name: Option<String>,
    query_cache_size: usize,
}

impl fmt::Debug for EngineBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let url = DatabaseUrl::parse(&self.url)
            .map(|u| u.to_string())
            .unwrap_or_else(|_| "<invalid url>".into());
        f.debug_struct("EngineBuilder")
            .field("url", &url)
            .field("pool_size", &self.pool_size)
            .field("pool_timeout", &self.pool_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("statement_timeout", &self.statement_timeout)
            .field("echo", &self.echo)
            .field("application_name", &self.application_name)
            .field("query_cache_size", &self.query_cache_size)
            .finish()
    }
}

impl EngineBuilder {
    /// Most connections the pool opens at once (`pool_size`, default 10).
    pub fn pool_size(mut self, size: usize) -> Self {
        self.pool_size = size;
        self
    }

    /// How long to wait for a free pooled connection (`pool_timeout`, default 30 s).
    pub fn pool_timeout(mut self, timeout: Duration) -> Self {
        self.pool_timeout = timeout;
        self
    }

    /// How long to wait for the server when opening a connection
    /// (`connect_args={"connect_timeout": ...}`); overrides the URL's `connect_timeout`.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = Some(timeout);
        self
    }

    /// The server cancels any statement running longer than this.
    /// Set once per connection at startup, so it costs no round trip.
    pub fn statement_timeout(mut self, timeout: Duration) -> Self {
        self.statement_timeout = Some(timeout);
        self
    }

    /// Log every statement, its parameter count and its duration through
    /// `tracing` (target `orm::echo`, level INFO), as SQLAlchemy's `echo=True`.
    pub fn echo(mut self, echo: bool) -> Self {
        self.echo = echo;
        self
    }

    /// The `application_name` shown in `pg_stat_activity`; overrides the URL's.
    pub fn application_name(mut self, name: impl Into<String>) -> Self {
        self.application_name = Some(name.into());
        self
    }

    /// How many shapes of statement the engine keeps rendered SQL for
    /// (`query_cache_size`, default 4096, at most 65536): the first that
    /// many it meets, for its life. Each pooled connection prepares a kept
    /// text once and finds it again by its number in the cache. A statement
    /// of any other shape is rendered each time it runs and prepared
    /// through the connection's statement cache, keyed by the text, which
    /// keeps every text it prepared for as long as the connection lives: a
    /// statement whose shape changes without end (an `AND` of n terms built
    /// in a loop) still grows that cache, and the server's prepared
    /// statements, whatever this says. 0 keeps none.
    pub fn query_cache_size(mut self, shapes: usize) -> Self {
        self.query_cache_size = shapes;
        self
    }

    /// Validates the options and builds the engine. Connects to nothing.
    pub fn build(self) -> Result<Engine> {
        let url = DatabaseUrl::parse(&self.url)?;
        if self.pool_size == 0 {
            return Err(Error::InvalidOption {
                option: "pool_size",
                reason: "must be at least 1".into(),
            });
        }
        if self.pool_timeout.is_zero() {
            return Err(Error::InvalidOption {
                option: "pool_timeout",
                reason: "must be longer than zero".into(),
            });
        }
        if self.query_cache_size > MAX_QUERY_CACHE_SIZE {
            return Err(Error::InvalidOption {
                option: "query_cache_size",
                reason: format!("must be at most {MAX_QUERY_CACHE_SIZE}"),
            });
        }
        let mut config = url.to_config()?;
        if let Some(timeout) = self.connect_timeout {
            if timeout.is_zero() {
                return Err(Error::InvalidOption {
                    option: "connect_timeout",
                    reason: "must be longer than zero".into(),
                });
            }
            config.connect_timeout(timeout);
        }
        if let Some(name) = &self.application_name {
            config.application_name(name);
        }
        if let Some(timeout) = self.statement_timeout {
            let millis = timeout.as_millis();
            if millis == 0 || millis > i32::MAX as u128 {
                return Err(Error::InvalidOption {
                    option: "statement_timeout",
                    reason: format!("must be between 1 ms and {} ms", i32::MAX),
                });
            }
            let options = match config.get_options() {
                Some(existing) => format!("{existing} -c statement_timeout={millis}"),
                None => format!("-c statement_timeout={millis}"),
            };
            config.options(&options);
        }
        let manager = ConnectionManager(deadpool_postgres::Manager::from_config(
            config,
            NoTls,
            // No health-check query on every checkout: a dead connection shows
            // up as `is_closed()`, which `ConnectionManager::recycle` checks.
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        ));
        let connect_timeout = self.connect_timeout.or(url.connect_timeout);
        let pool = deadpool::managed::Pool::builder(manager)
            .max_size(self.pool_size)
            .wait_timeout(Some(self.pool_timeout))
            .create_timeout(connect_timeout)
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| Error::InvalidOption {
                option: "pool",
                reason: e.to_string(),
            })?;
        Ok(Engine {
            inner: Arc::new(EngineInner {
                idle: Mutex::new(None),
                waiting: AtomicUsize::new(0),
                sql: SqlCache::with_capacity(self.query_cache_size),
                url,
                pool,
                pool_timeout: self.pool_timeout,
                connect_timeout,
                echo: self.echo,
            }),
        })
    }
}

/// Opens and recycles connections as deadpool-postgres does, and gives each
/// its own table of statements prepared for the engine's cached SQL.
pub(crate) struct ConnectionManager(deadpool_postgres::Manager);

impl deadpool::managed::Manager for ConnectionManager {
    type Type = PooledClient;
    type Error = tokio_postgres::Error;

    async fn create(&self) -> std::result::Result<PooledClient, tokio_postgres::Error> {
        Ok(PooledClient(Box::new(ClientState {
            client: self.0.create().await?,
            prepared: Mutex::new(Vec::new()),
        })))
    }

    /// What deadpool-postgres' `Fast` recycling does, checked here: its
    /// `recycle` future carries a health-check query's state, which every
    /// checkout would build and carry for nothing.
    async fn recycle(&self, conn: &mut PooledClient, _: &Metrics) -> RecycleResult<tokio_postgres::Error> {
        if conn.0.client.is_closed() {
            return Err(RecycleError::message("the connection was closed"));
        }
        Ok(())
    }

    fn detach(&self, conn: &mut PooledClient) {
        self.0.detach(&mut conn.0.client);
    }
}

/// A connection checked out of an engine's pool; it goes back when dropped.
pub(crate) type PooledConnection = deadpool::managed::Object<ConnectionManager>;

/// A pooled connection: the driver's client with deadpool's statement cache
/// (for SQL written by hand, and texts the engine's cache does not keep),
/// and the statements prepared for the texts the engine's cache keeps,
/// found by the text's number rather than by hashing the text.
///
/// Boxed, so that the pool moves a pointer: every checkout and return moves
/// the connection several times, and moving it whole cost a third of a
/// checkout.
pub(crate) struct PooledClient(Box<ClientState>);

struct ClientState {
    client: ClientWrapper,
    prepared: Mutex<Vec<Option<Statement>>>,
}

impl std::ops::Deref for PooledClient {
    type Target = ClientWrapper;

    fn deref(&self) -> &ClientWrapper {
        &self.0.client
    }
}

impl PooledClient {
    fn prepared(&self, slot: u32) -> Option<Statement> {
        let prepared = self.0.prepared.lock().unwrap_or_else(PoisonError::into_inner);
        prepared.get(slot as usize).and_then(Clone::clone)
    }

    fn keep_prepared(&self, slot: u32, statement: Statement) {
        let mut prepared = self.0.prepared.lock().unwrap_or_else(PoisonError::into_inner);
        let slot = slot as usize;
        if prepared.len() <= slot {
            prepared.resize(slot + 1, None);
        }
        prepared[slot] = Some(statement);
    }

    /// Forgets every statement prepared on this connection, so each is
    /// prepared again when next used.
    fn forget_prepared(&self) {
        self.0.client.statement_cache.clear();
        self.0.prepared.lock().unwrap_or_else(PoisonError::into_inner).clear();
    }
}

/// A pooled connection that, unless taken back out, is closed when dropped
/// instead of returning to the pool: for connections in an unknown state.
pub(crate) struct DetachOnDrop(pub(crate) Option<PooledConnection>);

impl Drop for DetachOnDrop {
    fn drop(&mut self) {
        if let Some(conn) = self.0.take() {
            drop(PooledConnection::take(conn));
        }
    }
}

/// Counts a checkout as waiting on the pool until dropped.
struct WaitingGuard<'a>(&'a AtomicUsize);

impl Drop for WaitingGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Pool occupancy, for monitoring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolStatus {
    /// Most connections the pool may hold.
    pub max_size: usize,
    /// Connections open now.
    pub size: usize,
    /// Open connections not checked out.
    pub available: usize,
}

impl Engine {
    /// Starts building an engine with options; see [`EngineBuilder`].
    pub fn builder(url: impl Into<String>) -> EngineBuilder {
        EngineBuilder {
            url: url.into(),
            pool_size: 10,
            pool_timeout: Duration::from_secs(30),
            connect_timeout: None,
            statement_timeout: None,
            echo: false,
            application_name: None,
            query_cache_size: crate::sql::DEFAULT_CAPACITY,
        }
    }

    /// The engine's URL (its `Display` masks the password).
    pub fn url(&self) -> &DatabaseUrl {
        &self.inner.url
    }

    /// Whether statements are logged.
    pub fn echo(&self) -> bool {
        self.inner.echo
    }

    /// The SQL rendered so far, by statement shape: sessions render each
    /// shape the cache keeps once per engine (see
    /// [`EngineBuilder::query_cache_size`]), and any other every time.
    pub fn sql_cache(&self) -> &SqlCache {
        &self.inner.sql
    }

    /// The pool's occupancy.
    pub fn pool_status(&self) -> PoolStatus {
        let status = self.inner.pool.status();
        // The pool counts the connection kept at hand as checked out.
        let at_hand = usize::from(self.inner.idle.lock().unwrap_or_else(PoisonError::into_inner).is_some());
        PoolStatus {
            max_size: status.max_size,
            size: status.size,
            available: status.available + at_hand,
        }
    }

    /// Checks a connection out of the pool, for plain SQL. It goes back to
    /// the pool when dropped.
    pub async fn connect(&self) -> Result<Connection> {
        Ok(Connection {
            client: self.checkout().await?,
            echo: self.inner.echo,
        })
    }

    pub(crate) async fn checkout(&self) -> Result<PooledConnection> {
        if let Some(conn) = self.take_idle() {
            return Ok(conn);
        }
        // Then the pool, first without waiting: when a connection is free
        // this skips arming the wait timer. Only a full pool waits, with the
        // configured timeout.
        let immediate = deadpool_postgres::Timeouts {
            wait: Some(Duration::ZERO),
            ..self.inner.pool.timeouts()
        };
        let error = match self.inner.pool.timeout_get(&immediate).await {
            Ok(conn) => return Ok(conn),
            Err(deadpool_postgres::PoolError::Timeout(deadpool_postgres::TimeoutType::Wait)) => {
                // Counted as waiting before looking at hand again: a session
                // giving a connection back either sees the count and puts it
                // in the pool, or put it at hand before this looks (see
                // `release`).
                self.inner.waiting.fetch_add(1, Ordering::SeqCst);
                let _waiting = WaitingGuard(&self.inner.waiting);
                if let Some(conn) = self.take_idle() {
                    return Ok(conn);
                }
                match self.inner.pool.get().await {
                    Ok(conn) => return Ok(conn),
                    Err(error) => error,
                }
            }
            Err(error) => error,
        };
        Err(Error::from_pool(
            error,
            self.inner.pool_timeout,
            self.inner.connect_timeout,
        ))
    }

    /// The connection kept at hand, if there is one and it is still open;
    /// a closed one is dropped from the pool.
    fn take_idle(&self) -> Option<PooledConnection> {
        let conn = self.inner.idle.lock().unwrap_or_else(PoisonError::into_inner).take()?;
        if conn.is_closed() {
            drop(PooledConnection::take(conn));
            return None;
        }
        Some(conn)
    }

    /// Gives back a connection a session is done with, in a clean state
    /// (no transaction open). It is kept at hand for the next checkout,
    /// which then skips the pool's semaphore, lock and bookkeeping on both
    /// ways (about 900 instructions of a one-row read); while another
    /// checkout waits on the pool, or one is at hand already, it goes back
    /// into the pool. Connections dropped elsewhere go back into the pool
    /// as before.
    pub(crate) fn release(&self, conn: PooledConnection) {
        let mut idle = self.inner.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.is_some() {
            drop(idle);
            drop(conn);
            return;
        }
        *idle = Some(conn);
        drop(idle);
        // Pairs with the waiter's count-then-look in `checkout`: either it
        // finds this connection at hand, or this sees it waiting and moves
        // the connection into the pool, which hands it over.
        fence(Ordering::SeqCst);
        if self.inner.waiting.load(Ordering::SeqCst) > 0 {
            let conn = self.inner.idle.lock().unwrap_or_else(PoisonError::into_inner).take();
            drop(conn);
        }
    }

    /// Runs DDL statements in one transaction.
    pub(crate) async fn run_in_transaction(&self, statements: &[String]) -> Result<()> {
        // Until COMMIT has completed, dropping the guard (an error, or this
        // future being cancelled) closes the connection instead of pooling
        // it, and the server rolls back.
        let mut guard = DetachOnDrop(Some(self.checkout().await?));
        let client = guard.0.as_ref().expect("just checked out");
        let exec = Executor::new(client, self.inner.echo);
        exec.batch("BEGIN").await?;
        for statement in statements {
            exec.batch(statement).await?;
        }
        exec.batch("COMMIT").await?;
        drop(guard.0.take());
        Ok(())
    }
}

/// A pooled connection for plain SQL (SQLAlchemy Core's `engine.connect()`).
/// Values always travel as bind parameters (`$1`, `$2`, ...).
pub struct Connection {
    client: PooledConnection,
    echo: bool,
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("echo", &self.echo)
            .finish_non_exhaustive()
    }
}

impl Connection {
    /// Runs one SQL statement written by hand and returns its rows.
    pub async fn raw_query(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>> {
        Executor::new(&self.client, self.echo).raw_query(sql, params).await
    }

    /// Runs one SQL statement written by hand and returns the number of rows it changed.
    pub async fn raw_execute(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64> {
        Executor::new(&self.client, self.echo).raw_execute(sql, params).await
    }

    /// Runs several `;`-separated SQL statements written by hand, without parameters.
    pub async fn raw_batch(&self, sql: &str) -> Result<()> {
        Executor::new(&self.client, self.echo).batch(sql).await
    }

    /// The driver's client, for anything this API does not cover.
    pub fn client(&self) -> &tokio_postgres::Client {
        &self.client
    }
}

/// Logs a statement that ran with echo on. Kept out of line: the logging
/// code would otherwise sit inside every statement's future, spreading the
/// code a statement runs over more cache lines.
#[cold]
#[inline(never)]
fn log_echo(sql: &str, params: usize, elapsed: Duration, error: Option<&Error>) {
    let elapsed_us = elapsed.as_micros() as u64;
    match error {
        None => tracing::info!(target: "orm::echo", sql, params, elapsed_us, "{sql}"),
        Some(error) => tracing::info!(target: "orm::echo", sql, params, elapsed_us, %error, "{sql}"),
    }
}

/// Runs statements on one client: prepared-statement cache, error mapping and echo.
pub(crate) struct Executor<'c> {
    client: &'c PooledClient,
    echo: bool,
    /// Set while a session's BEGIN is decided but not yet sent: the next
    /// statement carries it in the same round trip. Cleared just before it
    /// goes out, so a cancelled call still counts the transaction as open.
    pending_begin: Option<&'c AtomicBool>,
}

impl<'c> Executor<'c> {
    pub(crate) fn new(client: &'c PooledClient, echo: bool) -> Self {
        Executor {
            client,
            echo,
            pending_begin: None,
        }
    }

    /// Sends `BEGIN` with the first statement when `flag` is set.
    pub(crate) fn with_pending_begin(mut self, flag: &'c AtomicBool) -> Self {
        self.pending_begin = Some(flag);
        self
    }

    /// Runs the work `start` makes, preceded in the same round trip by a
    /// pending `BEGIN`: tokio-postgres pipelines requests that are in flight
    /// together. Takes a maker rather than the work's future: a future passed
    /// to an async fn is kept beside the futures made from it, which doubled
    /// the size of every query's future (about 5 KB, copied whenever the
    /// future moves).
    async fn pipelined<T, F>(&self, start: impl FnOnce() -> F) -> Result<T>
    where
        F: std::future::Future<Output = Result<T>>,
    {
        // Boxed: once per transaction, where the room of the join with the
        // BEGIN would otherwise be carried by every statement's future.
        if self
            .pending_begin
            .is_some_and(|flag| flag.swap(false, Ordering::AcqRel))
        {
            return Box::pin(self.with_begin(start)).await;
        }
        let result = start().await;
        self.after_statement(&result);
        result
    }

    /// Sends the transaction's `BEGIN` and the work `start` makes together.
    async fn with_begin<T, F>(&self, start: impl FnOnce() -> F) -> Result<T>
    where
        F: std::future::Future<Output = Result<T>>,
    {
        let (began, result) = futures_util::future::join(self.batch_now("BEGIN"), start()).await;
        self.after_statement(&result);
        began?;
        result
    }

    fn after_statement<T>(&self, result: &Result<T>) {
        if let Err(error) = result {
            if error.is_stale_statement() {
                // A table's columns changed type since this connection
                // prepared its statements: prepare them again from the next
                // call on. This call has failed (and aborted its
                // transaction), as SQLAlchemy's asyncpg dialect does.
                self.client.forget_prepared();
            }
        }
    }

    /// Runs the statement `start` makes, with echo: its text, parameter
    /// count and duration are logged whether it succeeds or fails. Takes a
    /// maker for the reason [`pipelined`](Self::pipelined) does.
    async fn echoed<T, F>(&self, sql: &str, params: usize, start: impl FnOnce() -> F) -> Result<T>
    where
        F: std::future::Future<Output = std::result::Result<T, tokio_postgres::Error>>,
    {
        // One await of the statement, not one per branch: each would inline
        // its own copy of the driver's polling code.
        let started = self.echo.then(Instant::now);
        let result = start().await.map_err(Error::from_driver);
        if let Some(started) = started {
            log_echo(sql, params, started.elapsed(), result.as_ref().err());
        }
        result
    }

    pub(crate) async fn query(&self, rendered: &Rendered) -> Result<Vec<Row>> {
        let mut rows = Vec::new();
        self.for_each_row(rendered.bound(), |row| {
            rows.push(row);
            Ok(())
        })
        .await?;
        Ok(rows)
    }

    /// The statement prepared on this connection for `bound`'s text: found
    /// by the text's number in the engine's cache, or prepared now.
    async fn statement(&self, bound: BoundSql<'_>) -> Result<Statement> {
        if let Some(statement) = bound.slot.and_then(|slot| self.client.prepared(slot)) {
            return Ok(statement);
        }
        // Boxed: preparing happens once per statement and connection, and
        // the driver's prepare future is larger than the query's own.
        Box::pin(self.prepare(bound)).await
    }

    /// Prepares `bound`'s text on this connection and keeps the statement
    /// under the text's number, or in the driver's cache when it has none.
    async fn prepare(&self, bound: BoundSql<'_>) -> Result<Statement> {
        let Some(slot) = bound.slot else {
            return self.client.prepare_cached(bound.sql).await.map_err(Error::from_driver);
        };
        let statement = self.client.prepare(bound.sql).await.map_err(Error::from_driver)?;
        self.client.keep_prepared(slot, statement.clone());
        Ok(statement)
    }

    /// Runs a query and hands each row to `on_row` as it arrives, without
    /// collecting the rows first.
    pub(crate) async fn for_each_row(&self, bound: BoundSql<'_>, on_row: impl FnMut(Row) -> Result<()>) -> Result<()> {
        self.pipelined(move || self.for_each_row_now(bound, on_row)).await
    }

    async fn for_each_row_now(&self, bound: BoundSql<'_>, mut on_row: impl FnMut(Row) -> Result<()>) -> Result<()> {
        let statement = self.statement(bound).await?;
        let stream = self
            .echoed(bound.sql, bound.binds.len(), || {
                self.client.query_raw(&statement, bound.binds.iter())
            })
            .await?;
        let mut stream = std::pin::pin!(stream);
        // The driver's item matched as it comes: converting it first (to a
        // `Result<Option<Row>>` of our error) copies every row into another
        // layout, which the profile showed stalling on reads of the copy.
        loop {
            match std::future::poll_fn(|cx| futures_util::Stream::poll_next(stream.as_mut(), cx)).await {
                Some(Ok(row)) => on_row(row)?,
                Some(Err(error)) => return Err(Error::from_driver(error)),
                None => return Ok(()),
            }
        }
    }

    pub(crate) async fn execute(&self, rendered: &Rendered) -> Result<u64> {
        let bound = rendered.bound();
        self.pipelined(move || async move {
            let statement = self.statement(bound).await?;
            self.echoed(bound.sql, bound.binds.len(), || {
                self.client.execute_raw(&statement, bound.binds.iter())
            })
            .await
        })
        .await
    }

    pub(crate) async fn raw_query(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>> {
        self.pipelined(move || async move {
            let statement = self.client.prepare_cached(sql).await.map_err(Error::from_driver)?;
            self.echoed(sql, params.len(), || self.client.query(&statement, params))
                .await
        })
        .await
    }

    pub(crate) async fn raw_execute(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64> {
        self.pipelined(move || async move {
            let statement = self.client.prepare_cached(sql).await.map_err(Error::from_driver)?;
            self.echoed(sql, params.len(), || self.client.execute(&statement, params))
                .await
        })
        .await
    }

    /// Runs `COPY ... FROM STDIN` and streams the data `fill` writes: each
    /// call appends a chunk to the buffer and says whether more follows.
    /// Chunks are made between awaits, so no borrow is held across one.
    pub(crate) async fn copy_in(
        &self,
        sql: &str,
        mut fill: impl FnMut(&mut bytes::BytesMut) -> Result<bool>,
    ) -> Result<u64> {
        self.pipelined(move || async move {
            let started = Instant::now();
            let result = async {
                let sink = self
                    .client
                    .copy_in::<_, bytes::Bytes>(sql)
                    .await
                    .map_err(Error::from_driver)?;
                let mut sink = std::pin::pin!(sink);
                let mut buffer = bytes::BytesMut::with_capacity(64 * 1024);
                loop {
                    let more = fill(&mut buffer)?;
                    if !buffer.is_empty() {
                        futures_util::SinkExt::send(&mut sink, buffer.split().freeze())
                            .await
                            .map_err(Error::from_driver)?;
                    }
                    if !more {
                        break;
                    }
                }
                sink.as_mut().finish().await.map_err(Error::from_driver)
            }
            .await;
            if self.echo {
                log_echo(sql, 0, started.elapsed(), result.as_ref().err());
            }
            result
        })
        .await
    }

    /// Runs statements without parameters over the simple protocol.
    pub(crate) async fn batch(&self, sql: &str) -> Result<()> {
        self.pipelined(move || self.batch_now(sql)).await
    }

    async fn batch_now(&self, sql: &str) -> Result<()> {
        self.echoed(sql, 0, || self.client.batch_execute(sql)).await
    }
}
