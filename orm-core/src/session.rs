//! Session factory and sessions: identity map, unit of work, transaction.

use std::any::TypeId;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

use crate::engine::{DetachOnDrop, Engine, Executor, PooledConnection};
use crate::error::{Error, Result};
use crate::metadata::parents_first;
use crate::model::Model;
use crate::model::TableDef;
use crate::query::{Query, Selection, SessionUnits};
use crate::sql::{BinaryOp, BoundSql, ColumnRef, Expr, LoadSizes, ParamValue, SelectStatement};
use crate::tracked::{ObjectStatus, Tracked};
use crate::types::Param;
use crate::unit::{TableState, TableUnit};

/// The flags of a session, as SQLAlchemy's `sessionmaker` keywords.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionConfig {
    /// `false` (default): the first statement opens a transaction that lasts
    /// until `commit` or `rollback`. `true`: no transaction is held open;
    /// each flush commits on its own, and `begin` opens one explicitly.
    pub autocommit: bool,
    /// `true` (default): pending changes are flushed before every query, so
    /// queries see the session's own changes.
    pub autoflush: bool,
    /// `true` (default): `commit` expires every object, so the next load of
    /// each row refreshes it from the database.
    pub expire_on_commit: bool,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            autocommit: false,
            autoflush: true,
            expire_on_commit: true,
        }
    }
}

/// Makes sessions bound to one engine with one set of flags
/// (SQLAlchemy's `sessionmaker`).
///
/// ```no_run
/// # #[tokio::main]
/// # async fn main() -> orm_core::Result<()> {
/// let engine = orm_core::create_engine("postgresql://postgres@localhost/app")?;
/// let session_local = orm_core::sessionmaker(&engine).autoflush(false);
/// let mut session = session_local.session();
/// # session.close().await
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct SessionMaker {
    engine: Engine,
    config: SessionConfig,
}

/// A session factory bound to `engine`, with the default flags
/// (`autocommit = false`, `autoflush = true`, `expire_on_commit = true`).
pub fn sessionmaker(engine: &Engine) -> SessionMaker {
    SessionMaker {
        engine: engine.clone(),
        config: SessionConfig::default(),
    }
}

impl SessionMaker {
    /// Sets `autocommit`.
    pub fn autocommit(mut self, autocommit: bool) -> Self {
        self.config.autocommit = autocommit;
        self
    }

    /// Sets `autoflush`.
    pub fn autoflush(mut self, autoflush: bool) -> Self {
        self.config.autoflush = autoflush;
        self
    }

    /// Sets `expire_on_commit`.
    pub fn expire_on_commit(mut self, expire: bool) -> Self {
        self.config.expire_on_commit = expire;
        self
    }

    /// The flags sessions get.
    pub fn config(&self) -> SessionConfig {
        self.config
    }

    /// A new session (`SessionLocal()` in SQLAlchemy).
    pub fn session(&self) -> Session {
        Session::with_config(&self.engine, self.config)
    }
}

/// An identity map, a unit of work and a transaction on one pooled
/// connection, borrowed lazily at the first statement.
///
/// Dropping a session that is inside a transaction rolls it back before the
/// connection goes back to the pool.
pub struct Session {
    engine: Engine,
    config: SessionConfig,
    conn: Option<PooledConnection>,
    /// A transaction is open, or decided and about to open.
    in_transaction: bool,
    /// The transaction's BEGIN has not been sent yet: it goes out with the
    /// next statement, in the same round trip. If no statement follows,
    /// ending the transaction costs nothing.
    begin_pending: AtomicBool,
    /// A flush or statement failed inside the transaction: only `rollback`
    /// (or `close`) may follow. Holds the failure's description.
    failed: Option<String>,
    /// Set while a call that talks to the server runs. Still set afterwards
    /// only if that call's future was dropped half-way: what the server did
    /// is then unknown (half a flush, a COMMIT sent or not, a statement still
    /// running), so the session refuses everything but `rollback`, which
    /// closes the connection rather than trust it.
    busy: bool,
    units: Units,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("config", &self.config)
            .field("connected", &self.conn.is_some())
            .field("in_transaction", &self.in_transaction)
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

impl Session {
    /// A session on `engine` with the default flags, without a factory.
    pub fn new(engine: &Engine) -> Self {
        Self::with_config(engine, SessionConfig::default())
    }

    /// A session on `engine` with the given flags.
    pub fn with_config(engine: &Engine, config: SessionConfig) -> Self {
        Session {
            engine: engine.clone(),
            config,
            conn: None,
            in_transaction: false,
            begin_pending: AtomicBool::new(false),
            failed: None,
            busy: false,
            units: Units::default(),
        }
    }

    /// The session's flags.
    pub fn config(&self) -> SessionConfig {
        self.config
    }

    /// Whether a transaction is open.
    pub fn in_transaction(&self) -> bool {
        self.in_transaction
    }

    pub(crate) fn unit<M: Model>(&mut self) -> &mut TableState<M> {
        unit_of::<M>(&mut self.units)
    }

    /// Stages a new object for insertion at the next flush and returns the
    /// handle through which it is read and changed. Values the database
    /// generates (identity keys, server defaults) appear on it after the flush.
    pub fn add<M: Model>(&mut self, object: M) -> Tracked<M> {
        let unit = self.unit::<M>();
        let tracked = unit.track(object, ObjectStatus::Pending);
        unit.new.push(tracked.clone());
        tracked
    }

    /// Stages several new objects, keeping their order.
    pub fn add_all<M: Model>(&mut self, objects: impl IntoIterator<Item = M>) -> Vec<Tracked<M>> {
        let unit = self.unit::<M>();
        let tracked = unit.track_all(objects.into_iter(), ObjectStatus::Pending);
        unit.new.extend(tracked.iter().cloned());
        tracked
    }

    /// Marks an object for deletion at the next flush. A pending object is
    /// simply dropped from the session; a detached one is an error.
    pub fn delete<M: Model>(&mut self, object: &Tracked<M>) -> Result<()> {
        let status = object.status();
        let unit = self.unit::<M>();
        match status {
            ObjectStatus::Pending => {
                let before = unit.new.len();
                unit.new.retain(|t| !t.ptr_eq(object));
                if unit.new.len() == before {
                    return Err(Error::InvalidState(format!(
                        "this pending {} object belongs to another session",
                        M::TABLE.model
                    )));
                }
                object.meta().set_final_status(ObjectStatus::Detached);
                Ok(())
            }
            ObjectStatus::Persistent => {
                let key = match object.data() {
                    Ok(data) => {
                        let key = data.stored().primary_key();
                        drop(data);
                        unit.identity.holds(&key, object).then_some(key)
                    }
                    // Borrowed mutably, by the caller perhaps: found by handle instead.
                    Err(_) => unit.identity.key_of(object),
                };
                let key = key.ok_or_else(|| {
                    Error::InvalidState(format!("this {} object belongs to another session", M::TABLE.model))
                })?;
                unit.identity.remove(&key);
                object.meta().set_status(ObjectStatus::Deleted);
                unit.deleted.push((key, object.clone()));
                Ok(())
            }
            ObjectStatus::Deleted => {
                let known = unit.deleted.iter().any(|(_, t)| t.ptr_eq(object))
                    || unit.flushed_deletes.iter().any(|t| t.ptr_eq(object));
                if known {
                    Ok(())
                } else {
                    Err(Error::InvalidState(format!(
                        "this {} object was deleted in a committed transaction or belongs to another session",
                        M::TABLE.model
                    )))
                }
            }
            ObjectStatus::Detached => Err(Error::InvalidState(format!(
                "cannot delete a detached {} object; load it in this session first",
                M::TABLE.model
            ))),
        }
    }

    fn check_usable(&self) -> Result<()> {
        if self.busy {
            return Err(Error::InvalidState(
                "a call on this session was interrupted (its future was dropped); call rollback() before using it again"
                    .into(),
            ));
        }
        match &self.failed {
            Some(reason) => Err(Error::InvalidState(format!(
                "this session's transaction was rolled back after an error ({reason}); call rollback() before using it again"
            ))),
            None => Ok(()),
        }
    }

    /// Checks out a connection if the session has none; opens the transaction
    /// when the session is not in autocommit mode.
    async fn connect(&mut self) -> Result<()> {
        if self.conn.is_none() {
            self.conn = Some(self.engine.checkout().await?);
        }
        if !self.config.autocommit && !self.in_transaction {
            self.open_transaction();
        }
        Ok(())
    }

    /// Decides on a transaction; its BEGIN travels with the next statement.
    fn open_transaction(&mut self) {
        self.in_transaction = true;
        self.begin_pending.store(true, Ordering::Release);
    }

    /// Ends the transaction with `COMMIT` or `ROLLBACK`, unless its BEGIN
    /// was never sent, in which case there is nothing to end.
    async fn end_transaction(&mut self, statement: &str) -> Result<()> {
        if self.begin_pending.swap(false, Ordering::AcqRel) {
            self.in_transaction = false;
            return Ok(());
        }
        let result = match &self.conn {
            Some(conn) => Executor::new(conn, self.engine.echo()).batch(statement).await,
            None => Ok(()),
        };
        // Only now: had this call been cancelled mid-way, the session would
        // still count the transaction as open and roll it back when dropped.
        self.in_transaction = false;
        result
    }

    fn executor(&self) -> Executor<'_> {
        Executor::new(self.conn.as_ref().expect("connected"), self.engine.echo())
            .with_pending_begin(&self.begin_pending)
    }

    /// Lets the connection go back to the engine when no transaction holds it.
    fn release_if_idle(&mut self) {
        if !self.in_transaction {
            self.release_connection();
        }
    }

    /// Gives the connection, in a clean state, back to the engine.
    fn release_connection(&mut self) {
        if let Some(conn) = self.conn.take() {
            self.engine.release(conn);
        }
    }

    /// After a statement failed inside a transaction: the server has aborted
    /// it, so end it now and refuse further work until `rollback`.
    async fn fail_transaction(&mut self, error: &Error) {
        if self.in_transaction {
            // Recorded first, so that even if this call is cancelled the
            // session knows it must be rolled back.
            self.failed = Some(error.to_string());
            if self.end_transaction("ROLLBACK").await.is_err() {
                self.discard_connection();
            }
        }
        self.conn = None;
    }

    /// Closes the connection instead of pooling it: its state is unknown.
    fn discard_connection(&mut self) {
        drop(DetachOnDrop(self.conn.take()));
    }

    /// Opens a transaction now. In autocommit mode this starts a block that
    /// lasts until `commit` or `rollback`; otherwise the session would open
    /// one at its first statement anyway.
    pub async fn begin(&mut self) -> Result<()> {
        self.check_usable()?;
        if self.in_transaction {
            return Err(Error::InvalidState(
                "a transaction is already open; commit or roll it back first".into(),
            ));
        }
        if self.conn.is_none() {
            self.conn = Some(self.engine.checkout().await?);
        }
        self.open_transaction();
        Ok(())
    }

    /// Whether a flush would send anything.
    fn has_changes(&self) -> bool {
        self.units.values().any(|unit| unit.has_changes())
    }

    /// Sends every pending change: inserts parents before children, then
    /// updates, then deletes children before parents, each table's rows
    /// batched into as few statements as possible. In autocommit mode the
    /// flush is its own transaction.
    pub async fn flush(&mut self) -> Result<()> {
        self.check_usable()?;
        if !self.has_changes() {
            return Ok(());
        }
        // Refused before anything is sent: the transaction and the session
        // stay as they were, and fixing the object is enough.
        for unit in self.units.values_mut() {
            unit.plan_updates()?;
        }
        self.busy = true;
        // Boxed: a flush with work to do allocates once, and the future of
        // every query, whose autoflush usually has none, stays kilobytes
        // smaller (moving a query's future copies all of it).
        let result = Box::pin(self.flush_inner()).await;
        self.busy = false;
        if let Err(error) = &result {
            // Part of the flush may have reached the server, and the objects
            // may already say so: always roll back, and always require the
            // caller's rollback() too, even when the flush was its own
            // transaction (autocommit) and its COMMIT is what failed.
            Box::pin(self.fail_transaction(error)).await;
            self.failed = Some(error.to_string());
        }
        result
    }

    async fn flush_inner(&mut self) -> Result<()> {
        self.connect().await?;
        let own_transaction = !self.in_transaction;
        if own_transaction {
            self.open_transaction();
        }
        let Session {
            conn,
            units,
            engine,
            begin_pending,
            ..
        } = self;
        let cache = engine.sql_cache();
        let exec = Executor::new(conn.as_ref().expect("connected"), engine.echo()).with_pending_begin(begin_pending);
        let mut order: Vec<&mut Box<dyn TableUnit>> = units.values_mut().collect();
        let tables: Vec<&'static TableDef> = order.iter().map(|u| u.table()).collect();
        let ranks = parents_first(&tables);
        order.sort_by_key(|u| ranks.iter().position(|t| t.same_as(u.table())));
        for unit in order.iter_mut() {
            unit.flush_inserts(&exec, cache).await?;
        }
        for unit in order.iter_mut() {
            unit.flush_updates(&exec, cache).await?;
        }
        for unit in order.iter_mut().rev() {
            unit.flush_deletes(&exec, cache).await?;
        }
        if own_transaction {
            self.end_transaction("COMMIT").await?;
            self.release_if_idle();
            // A flush that was its own transaction is a commit.
            let expire = self.config.expire_on_commit;
            for unit in self.units.values_mut() {
                unit.after_commit(expire);
            }
        }
        Ok(())
    }

    /// Flushes, then commits the transaction and returns the connection to
    /// the pool. With `expire_on_commit`, every object is expired: the next
    /// `get` or query of its row reloads it.
    pub async fn commit(&mut self) -> Result<()> {
        self.flush().await?;
        if self.in_transaction {
            self.busy = true;
            let result = self.end_transaction("COMMIT").await;
            self.busy = false;
            if let Err(error) = result {
                self.failed = Some(error.to_string());
                self.discard_connection();
                return Err(error);
            }
        }
        self.release_connection();
        let expire = self.config.expire_on_commit;
        for unit in self.units.values_mut() {
            unit.after_commit(expire);
        }
        Ok(())
    }

    /// Rolls the transaction back and discards every staged change; the
    /// session's objects are detached and the identity map emptied, so later
    /// loads see the database as it is.
    pub async fn rollback(&mut self) -> Result<()> {
        let result = self.roll_back_transaction().await;
        for unit in self.units.values_mut() {
            unit.discard();
        }
        result
    }

    /// Rolls back whatever transaction is open and lets go of the
    /// connection, leaving the objects to the caller.
    async fn roll_back_transaction(&mut self) -> Result<()> {
        let mut result = Ok(());
        if self.busy {
            // An interrupted call left the connection in an unknown state
            // (a statement still running, a COMMIT sent or not): close it, and
            // the server rolls back whatever is open.
            self.discard_connection();
            self.in_transaction = false;
            self.begin_pending.store(false, Ordering::Release);
        } else if self.in_transaction {
            self.busy = true;
            // Boxed: close() ends every request, most often with no
            // transaction open, and need not carry a statement's future.
            result = Box::pin(self.end_transaction("ROLLBACK")).await;
            self.busy = false;
            if result.is_err() {
                self.discard_connection();
            }
        }
        self.release_connection();
        self.failed = None;
        self.busy = false;
        result
    }

    /// Rolls back whatever is open, forgets every object and returns the
    /// connection. The session can be used again afterwards.
    pub async fn close(&mut self) -> Result<()> {
        let result = self.roll_back_transaction().await;
        // Dropping each model's state detaches its objects, as a rollback's
        // discard would, without making a fresh state only to drop it.
        self.units.clear();
        result
    }

    /// The object with this primary key: from the identity map when it holds
    /// a live copy, else with one query. `None` when no such row exists.
    pub async fn get<M: Model>(&mut self, key: M::PrimaryKey) -> Result<Option<Tracked<M>>> {
        self.check_usable()?;
        let unit = unit_of::<M>(&mut self.units);
        if let Some(tracked) = unit.identity.get(&key) {
            if !tracked.meta().is_expired() {
                return Ok(Some(tracked.clone()));
            }
        }
        if unit.deleted.iter().any(|(deleted, _)| *deleted == key) {
            // Marked for deletion: gone as far as this session is concerned.
            return Ok(None);
        }
        // A get's statement depends only on the model: its text is cached
        // under the model's table (and kept at hand for the session's next
        // get), and only the key's values are bound.
        let sql = unit
            .get_sql
            .get_or_insert_with(|| {
                let table = M::TABLE;
                self.engine
                    .sql_cache()
                    .render_fixed(&[GET_BY_KEY, std::ptr::from_ref(table) as u64], || {
                        select_all::<M>(Some(primary_key_filter(table)))
                    })
            })
            .clone();
        let mut found = std::mem::take(&mut unit.spare_found);
        let key_values = M::primary_key_refs(&key);
        self.load_into::<M>(sql.bind(key_values.as_ref()), &mut found).await?;
        debug_assert!(found.len() <= 1, "a key names one row");
        let object = found.pop();
        self.unit::<M>().spare_found = found;
        Ok(object)
    }

    /// Reloads an object's row from the database, overwriting its value and
    /// any unflushed change. Errors with `NotFound` when the row is gone.
    pub async fn refresh<M: Model>(&mut self, object: &Tracked<M>) -> Result<()> {
        let key = object.data()?.stored().primary_key();
        let tracked_here = self.unit::<M>().identity.holds(&key, object);
        if !tracked_here {
            return Err(Error::InvalidState(format!(
                "this {} object is not persistent in this session (pending, deleted, detached or another session's); \
                 only objects this session loaded or flushed can be refreshed",
                M::TABLE.model
            )));
        }
        object.data_mut()?.loaded = None;
        object.meta().expire();
        match self.get::<M>(key).await? {
            Some(_) => Ok(()),
            None => Err(Error::NotFound {
                table: M::TABLE.name.to_owned(),
            }),
        }
    }

    /// Starts a query for objects of model `M`.
    pub fn query<M: Model>(&mut self) -> Query<'_, M> {
        Query::new(self)
    }

    /// Autoflushes when configured, then makes sure a connection (and, when
    /// not in autocommit mode, a transaction) is there for a read.
    async fn prepare_read(&mut self) -> Result<()> {
        self.check_usable()?;
        // Checked here, before the flush's future is even made: a read's
        // autoflush usually has nothing to send.
        if self.config.autoflush && self.has_changes() {
            self.flush().await?;
        }
        if let Err(error) = self.connect().await {
            // Boxed, as rare paths are: see flush().
            Box::pin(self.fail_transaction(&error)).await;
            return Err(error);
        }
        Ok(())
    }

    async fn finish_read<T>(&mut self, result: Result<T>) -> Result<T> {
        if let Err(error) = &result {
            // Errors found on this side (a type mismatch, an error returned by
            // a for_each callback) leave the server's transaction intact.
            if error.aborts_transaction() {
                self.busy = false;
                Box::pin(self.fail_transaction(error)).await;
            }
        }
        self.end_read();
        result
    }

    /// What ends every read that went well: the session is no longer busy,
    /// and outside a transaction its connection goes back to the pool.
    fn end_read(&mut self) {
        self.busy = false;
        self.release_if_idle();
    }

    /// Runs a select of the selection's columns and merges each row's objects
    /// into the identity maps.
    pub(crate) async fn load<S: Selection>(&mut self, statement: SelectStatement) -> Result<Vec<S::Output>> {
        let rendered = self.engine.sql_cache().render(statement);
        let mut objects = Vec::new();
        self.load_into::<S>(rendered.bound(), &mut objects).await?;
        Ok(objects)
    }

    /// Runs a select of the selection's columns, merging each row's objects
    /// into the identity maps and appending them to `objects`.
    async fn load_into<S: Selection>(&mut self, bound: BoundSql<'_>, objects: &mut Vec<S::Output>) -> Result<()> {
        self.prepare_read().await?;
        let Session {
            conn,
            units,
            engine,
            begin_pending,
            ..
        } = self;
        let exec = Executor::new(conn.as_ref().expect("connected"), engine.echo()).with_pending_begin(begin_pending);
        let sizes = match bound.learns_sizes {
            true => engine.sql_cache().load_sizes(bound.slot),
            false => LoadSizes::default(),
        };
        let mut merger = S::merger(SessionUnits(units, sizes));
        self.busy = true;
        let result = exec
            .for_each_row(bound, |row| S::merge(&mut merger, &row, objects))
            .await;
        S::finish(&mut merger, objects);
        // Ends the loan of the identity maps before the session is used again.
        drop(merger);
        match result {
            // Without the future of finish_read, whose work is all for errors.
            Ok(()) => {
                self.end_read();
                Ok(())
            }
            Err(error) => self.finish_read(Err(error)).await,
        }
    }

    /// Runs a select and hands each row to `on_row` as it arrives.
    pub(crate) async fn stream(
        &mut self,
        statement: SelectStatement,
        mut on_row: impl FnMut(&Row) -> Result<()>,
    ) -> Result<()> {
        self.prepare_read().await?;
        let writer = self.engine.sql_cache().render(statement);
        self.busy = true;
        let result = self.executor().for_each_row(writer.bound(), |row| on_row(&row)).await;
        self.finish_read(result).await
    }

    /// Runs a select whose rows are returned as they are (for `count`).
    pub(crate) async fn fetch_rows(&mut self, statement: SelectStatement) -> Result<Vec<Row>> {
        self.prepare_read().await?;
        let writer = self.engine.sql_cache().render(statement);
        self.busy = true;
        let result = self.executor().query(&writer).await;
        self.finish_read(result).await
    }

    /// Runs one SQL statement written by hand inside the session's
    /// transaction (after an autoflush) and returns its rows. Transaction
    /// control (`BEGIN`, `COMMIT`, ...) is refused: the session would no
    /// longer know where its transaction stands.
    pub async fn raw_query(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>> {
        refuse_transaction_control(sql)?;
        self.prepare_read().await?;
        self.busy = true;
        let result = self.executor().raw_query(sql, params).await;
        self.finish_read(result).await
    }

    /// Runs one SQL statement written by hand inside the session's
    /// transaction (after an autoflush) and returns how many rows it changed.
    /// Transaction control is refused, as by [`raw_query`](Session::raw_query).
    pub async fn raw_execute(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64> {
        refuse_transaction_control(sql)?;
        self.prepare_read().await?;
        self.busy = true;
        let result = self.executor().raw_execute(sql, params).await;
        self.finish_read(result).await
    }
}

/// Each model's unit of work, by the model's type. A session holds a
/// handful of models, so a list scanned in order finds one faster than
/// hashing its 128-bit `TypeId`: a `get` finds its model's state three
/// times. The order means nothing: a join takes states out and puts them
/// back at the end.
#[derive(Default)]
pub(crate) struct Units(Vec<(TypeId, Box<dyn TableUnit>)>);

impl Units {
    fn position(&self, model: TypeId) -> Option<usize> {
        self.0.iter().position(|(id, _)| *id == model)
    }

    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }

    pub(crate) fn values(&self) -> impl Iterator<Item = &dyn TableUnit> {
        self.0.iter().map(|(_, unit)| unit.as_ref())
    }

    pub(crate) fn values_mut(&mut self) -> impl Iterator<Item = &mut Box<dyn TableUnit>> {
        self.0.iter_mut().map(|(_, unit)| unit)
    }

    pub(crate) fn clear(&mut self) {
        self.0.clear();
    }
}

/// Takes model `M`'s state out of `units` (a new one if it has none), for a
/// load to use without finding it again for every row; the load gives it
/// back with [`put_unit`].
pub(crate) fn take_unit<M: Model>(units: &mut Units) -> Box<TableState<M>> {
    match units.position(TypeId::of::<M>()) {
        Some(at) => units
            .0
            .swap_remove(at)
            .1
            .into_any()
            .downcast::<TableState<M>>()
            .unwrap_or_else(|_| unreachable!("units are keyed by their model's TypeId")),
        None => Box::default(),
    }
}

/// Gives back a state [`take_unit`] took.
pub(crate) fn put_unit<M: Model>(units: &mut Units, state: Box<TableState<M>>) {
    debug_assert!(units.position(TypeId::of::<M>()).is_none());
    units.0.push((TypeId::of::<M>(), state));
}

pub(crate) fn unit_of<M: Model>(units: &mut Units) -> &mut TableState<M> {
    let at = match units.position(TypeId::of::<M>()) {
        Some(at) => at,
        None => {
            units.0.push((TypeId::of::<M>(), Box::new(TableState::<M>::default())));
            units.0.len() - 1
        }
    };
    units.0[at]
        .1
        .as_any_mut()
        .downcast_mut::<TableState<M>>()
        .expect("units are keyed by their model's TypeId")
}

/// Statements that would begin or end a transaction behind the session's
/// back; `SAVEPOINT`, `RELEASE` and `ROLLBACK TO` stay inside it and pass.
fn refuse_transaction_control(sql: &str) -> Result<()> {
    let mut words = sql
        .trim_start_matches(|c: char| c.is_whitespace() || c == '(' || c == ';')
        .split(|c: char| c.is_whitespace() || c == ';')
        .filter(|w| !w.is_empty())
        .map(str::to_ascii_uppercase);
    let first = words.next().unwrap_or_default();
    let second = words.next().unwrap_or_default();
    let controls = match first.as_str() {
        "BEGIN" | "START" | "COMMIT" | "END" | "ABORT" => true,
        "ROLLBACK" => !matches!(second.as_str(), "TO"),
        "PREPARE" => second == "TRANSACTION",
        _ => false,
    };
    if controls {
        return Err(Error::InvalidState(format!(
            "{first} through raw SQL would leave the session unaware of its transaction; \
             use session.begin(), commit() or rollback()"
        )));
    }
    Ok(())
}

/// The first word of the cache key of a get by primary key.
const GET_BY_KEY: u64 = 1000;

/// `key column = $1 AND ...`, in key column order. Only its text is used:
/// a get binds its key's values itself, so the placeholders hold none.
fn primary_key_filter(table: &'static TableDef) -> Expr {
    Expr::And(
        table
            .primary_key
            .iter()
            .map(|&c| {
                let placeholder: Param = Box::new(None::<i64>);
                Expr::Binary(
                    Box::new(Expr::Column(ColumnRef {
                        table: table.name,
                        column: table.columns[c].name,
                    })),
                    BinaryOp::Eq,
                    Box::new(Expr::Param(ParamValue::new(placeholder))),
                )
            })
            .collect(),
    )
}

/// `SELECT <every column of M> FROM <M's table> [WHERE filter]`.
pub(crate) fn select_all<M: Model>(filter: Option<Expr>) -> SelectStatement {
    let table = M::TABLE;
    SelectStatement {
        projection: vec![Expr::AllColumns(table)],
        from: table.name,
        filter,
        ..SelectStatement::default()
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            // A BEGIN still pending was never sent: the connection is clean.
            if self.busy || (self.in_transaction && !self.begin_pending.load(Ordering::Acquire)) {
                release_after_rollback(conn);
            }
        }
    }
}

/// Rolls back a connection left inside a transaction and then pools it
/// again; if that cannot happen (no runtime, the ROLLBACK fails, the task is
/// dropped), the connection is closed instead and the server rolls back.
fn release_after_rollback(conn: PooledConnection) {
    let mut guard = DetachOnDrop(Some(conn));
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(async move {
            let rolled_back = match &guard.0 {
                Some(conn) => conn.batch_execute("ROLLBACK").await.is_ok(),
                None => false,
            };
            if rolled_back {
                // Clean again: back to the pool.
                drop(guard.0.take());
            }
        });
    }
    // Without a runtime the guard drops here and closes the connection.
}
