//! Statement shapes, and the SQL rendered once per shape.
//!
//! Two statements that differ only in their bound values render to the same
//! text. A statement's [`Shape`] records everything else the text depends
//! on, so [`SqlCache`] renders each shape once and afterwards only moves the
//! values out. Names in the AST are `&'static str`, so a shape records each
//! by address and length: the same address and length is the same text, and
//! the same name stored at two addresses only costs a second cache entry.

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use super::ast::*;
use super::{Dialect, PgDialect, SqlWriter, Statement};
use tokio_postgres::types::ToSql;

use crate::types::Param;

/// Everything a statement's text depends on, as a list of words.
#[derive(Debug, Default, Clone, PartialEq, Eq, Hash)]
pub struct Shape(Vec<u64>);

// Lets the cache be probed with a borrowed key; `Vec` and slices hash alike.
impl std::borrow::Borrow<[u64]> for Shape {
    fn borrow(&self) -> &[u64] {
        &self.0
    }
}

impl Shape {
    fn tag(&mut self, tag: u64) {
        self.0.push(tag);
    }

    fn count(&mut self, count: usize) {
        self.0.push(count as u64);
    }

    fn name(&mut self, name: &'static str) {
        self.0.push(name.as_ptr() as u64);
        self.0.push(name.len() as u64);
    }

    fn names(&mut self, names: &[&'static str]) {
        self.count(names.len());
        for name in names {
            self.name(name);
        }
    }

    fn optional_name(&mut self, name: Option<&'static str>) {
        match name {
            Some(name) => {
                self.tag(1);
                self.name(name);
            }
            None => self.tag(0),
        }
    }
}

// Every walk below visits bound values in the order the dialect writes their
// placeholders (see `Dialect::prepare_*`), and destructures each node whole,
// so a field added to the AST fails to compile here until it is shaped.

fn collect_expr(expr: &mut Expr, shape: &mut Shape, params: &mut Vec<Param>) {
    match expr {
        Expr::Column(ColumnRef { table, column }) => {
            shape.tag(1);
            shape.name(table);
            shape.name(column);
        }
        Expr::Param(value) => {
            shape.tag(2);
            params.push(value.take());
        }
        Expr::AllColumns(table) => {
            // A table's description is static: its address names it.
            shape.tag(11);
            shape.tag(std::ptr::from_ref(*table) as u64);
        }
        Expr::Binary(left, op, right) => {
            shape.tag(3);
            shape.tag(*op as u64);
            collect_expr(left, shape, params);
            collect_expr(right, shape, params);
        }
        Expr::And(terms) => {
            shape.tag(4);
            collect_exprs(terms, shape, params);
        }
        Expr::Or(terms) => {
            shape.tag(5);
            collect_exprs(terms, shape, params);
        }
        Expr::Not(inner) => {
            shape.tag(6);
            collect_expr(inner, shape, params);
        }
        Expr::IsNull(inner) => {
            shape.tag(7);
            collect_expr(inner, shape, params);
        }
        Expr::IsNotNull(inner) => {
            shape.tag(8);
            collect_expr(inner, shape, params);
        }
        Expr::EqualsAny(inner, list) => {
            shape.tag(9);
            collect_expr(inner, shape, params);
            params.push(list.take());
        }
        Expr::CountStar => shape.tag(10),
    }
}

fn collect_exprs(exprs: &mut [Expr], shape: &mut Shape, params: &mut Vec<Param>) {
    shape.count(exprs.len());
    for expr in exprs {
        collect_expr(expr, shape, params);
    }
}

fn collect_optional(expr: &mut Option<Expr>, shape: &mut Shape, params: &mut Vec<Param>) {
    match expr {
        Some(expr) => {
            shape.tag(1);
            collect_expr(expr, shape, params);
        }
        None => shape.tag(0),
    }
}

fn collect_unnest(source: &mut Option<&mut UnnestSource>, shape: &mut Shape, params: &mut Vec<Param>) {
    let Some(UnnestSource {
        alias,
        arrays,
        columns,
        ordinality,
    }) = source
    else {
        shape.tag(0);
        return;
    };
    shape.tag(1);
    shape.name(alias);
    shape.count(arrays.len());
    for (array, array_type) in arrays.iter_mut() {
        shape.name(array_type);
        params.push(array.take());
    }
    shape.names(columns);
    shape.optional_name(*ordinality);
}

pub(super) fn collect_select(stmt: &mut SelectStatement, shape: &mut Shape, params: &mut Vec<Param>) {
    let SelectStatement {
        projection,
        from,
        joins,
        filter,
        order_by,
        limit,
        offset,
    } = stmt;
    shape.tag(100);
    collect_exprs(projection, shape, params);
    shape.name(from);
    shape.count(joins.len());
    for JoinClause { kind, table, on } in joins {
        shape.tag(*kind as u64);
        shape.name(table);
        collect_expr(on, shape, params);
    }
    collect_optional(filter, shape, params);
    shape.count(order_by.len());
    for OrderExpr { expr, descending } in order_by {
        shape.tag(u64::from(*descending));
        collect_expr(expr, shape, params);
    }
    collect_optional(limit, shape, params);
    collect_optional(offset, shape, params);
}

pub(super) fn collect_insert(stmt: &mut InsertStatement, shape: &mut Shape, params: &mut Vec<Param>) {
    let InsertStatement {
        table,
        columns,
        source,
        returning,
    } = stmt;
    shape.tag(200);
    shape.name(table);
    shape.names(columns);
    match source {
        InsertSource::DefaultValues => shape.tag(0),
        InsertSource::Values(values) => {
            shape.tag(2);
            shape.count(values.len());
            for (value, value_type) in values.iter_mut() {
                shape.name(value_type);
                params.push(value.take());
            }
        }
        InsertSource::Unnest(source) => {
            shape.tag(1);
            collect_unnest(&mut Some(source), shape, params);
        }
    }
    shape.names(returning);
}

pub(super) fn collect_update(stmt: &mut UpdateStatement, shape: &mut Shape, params: &mut Vec<Param>) {
    let UpdateStatement {
        table,
        assignments,
        from,
        filter,
    } = stmt;
    shape.tag(300);
    shape.name(table);
    shape.count(assignments.len());
    for (column, value) in assignments {
        shape.name(column);
        collect_expr(value, shape, params);
    }
    collect_unnest(&mut from.as_mut(), shape, params);
    collect_optional(filter, shape, params);
}

pub(super) fn collect_delete(stmt: &mut DeleteStatement, shape: &mut Shape, params: &mut Vec<Param>) {
    let DeleteStatement { table, using, filter } = stmt;
    shape.tag(400);
    shape.name(table);
    collect_unnest(&mut using.as_mut(), shape, params);
    collect_optional(filter, shape, params);
}

pub(super) fn collect_reserve_keys(stmt: &mut ReserveKeysStatement, shape: &mut Shape, params: &mut Vec<Param>) {
    let ReserveKeysStatement { table, column, count } = stmt;
    shape.tag(500);
    params.push(table.take());
    params.push(column.take());
    params.push(count.take());
}

/// A statement's text, shared with the cache, and its bound values.
pub struct Rendered {
    /// The text.
    pub sql: Arc<str>,
    /// The bound values, `$1` first.
    pub params: Vec<Param>,
    /// The text's number in the cache, if the cache keeps it: each pooled
    /// connection finds the statement it prepared for the text by this
    /// number, without hashing the text.
    pub(crate) slot: Option<u32>,
}

/// A text kept by the cache, and its number there; see [`Rendered::slot`].
#[derive(Clone)]
pub(crate) struct CachedSql {
    pub(crate) sql: Arc<str>,
    pub(crate) slot: Option<u32>,
}

impl CachedSql {
    /// The text with its bound values.
    pub(crate) fn with_params(self, params: Vec<Param>) -> Rendered {
        Rendered {
            sql: self.sql,
            params,
            slot: self.slot,
        }
    }

    /// The text with values borrowed from the caller: nothing is boxed or
    /// collected for them.
    pub(crate) fn bind<'a>(&'a self, values: &'a [&'a (dyn ToSql + Sync)]) -> BoundSql<'a> {
        BoundSql {
            sql: &self.sql,
            slot: self.slot,
            binds: Binds::Borrowed(values),
            learns_sizes: false,
        }
    }
}

impl Rendered {
    /// The statement to run.
    pub(crate) fn bound(&self) -> BoundSql<'_> {
        BoundSql {
            sql: &self.sql,
            slot: self.slot,
            binds: Binds::Owned(&self.params),
            learns_sizes: true,
        }
    }
}

/// A statement to run, borrowed: its text, the text's number in the cache
/// (see [`Rendered::slot`]) and its bound values, `$1` first.
#[derive(Clone, Copy)]
pub(crate) struct BoundSql<'a> {
    pub(crate) sql: &'a str,
    pub(crate) slot: Option<u32>,
    pub(crate) binds: Binds<'a>,
    /// Whether a load by this statement uses and keeps [`LoadSizes`]: not
    /// for a get, which meets one row at most.
    pub(crate) learns_sizes: bool,
}

/// A statement's bound values: boxed by the statement that owns them, or
/// borrowed from the caller (a `get`'s key).
#[derive(Clone, Copy)]
pub(crate) enum Binds<'a> {
    Owned(&'a [Param]),
    Borrowed(&'a [&'a (dyn ToSql + Sync)]),
}

impl<'a> Binds<'a> {
    pub(crate) fn len(self) -> usize {
        match self {
            Binds::Owned(values) => values.len(),
            Binds::Borrowed(values) => values.len(),
        }
    }

    /// The values in order, as the driver takes them.
    pub(crate) fn iter(self) -> impl ExactSizeIterator<Item = &'a (dyn ToSql + Sync)> {
        (0..self.len()).map(move |at| match self {
            Binds::Owned(values) => values[at].as_ref() as &(dyn ToSql + Sync),
            Binds::Borrowed(values) => values[at],
        })
    }
}

impl std::fmt::Debug for Rendered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rendered")
            .field("sql", &self.sql)
            .field("params", &self.params.len())
            .finish()
    }
}

/// How many new objects a statement's last load put in the identity maps
/// of its first model (side 0) and of the model it joins last (side 1), if
/// its text has a number. A load of the same statement makes that much room
/// in a map at once, when it first hashes keys into it, rather than
/// doubling the map again and again as the rows stream in (rehashing all it
/// holds each time: half of what a 1,000-row join into a fresh session cost
/// over hand-written code). Other models of a longer chain get no hint.
#[derive(Clone, Copy, Default)]
pub(crate) struct LoadSizes<'c> {
    cells: Option<&'c [AtomicU32]>,
}

impl LoadSizes<'_> {
    const SIDES: usize = 2;

    /// The last load's count for `side`; 0 when there is none.
    pub(crate) fn get(self, side: usize) -> usize {
        self.cells
            .map_or(0, |cells| cells[side].load(Ordering::Relaxed) as usize)
    }

    /// Records this load's count for `side`. Written only when it changed:
    /// a statement run over and over by many threads then shares the cache
    /// line without writing it. Loads too small to use the hint (see
    /// `Identities::make_room`) are not recorded, so a statement keeps its
    /// large loads' size.
    pub(crate) fn set(self, side: usize, objects: usize) {
        if let Some(cells) = self.cells {
            let objects = u32::try_from(objects).unwrap_or(u32::MAX);
            if cells[side].load(Ordering::Relaxed) != objects {
                cells[side].store(objects, Ordering::Relaxed);
            }
        }
    }
}

thread_local! {
    /// The buffer [`SqlCache::render`] collects shapes into, reused.
    static SHAPE_BUFFER: Cell<Vec<u64>> = const { Cell::new(Vec::new()) };
}

/// SQL text by statement shape, shared by an engine's sessions, so each
/// shape of statement it keeps is rendered once. It keeps the first
/// `query_cache_size` shapes it meets (see
/// [`EngineBuilder::query_cache_size`](crate::EngineBuilder::query_cache_size))
/// for the engine's life, and renders any other shape every time.
pub struct SqlCache {
    dialect: PgDialect,
    capacity: usize,
    /// Set once the cache holds `capacity` shapes: a statement of a shape
    /// it does not keep then renders without taking the write lock.
    full: AtomicBool,
    /// Each text with its number: the count of texts cached before it, so
    /// numbers are dense and never reused (nothing is ever evicted).
    rendered: RwLock<HashMap<Shape, (Arc<str>, u32), foldhash::fast::RandomState>>,
    /// For each text, by its number, how many new objects its last load
    /// put in each of two identity maps (see [`LoadSizes`]).
    load_sizes: Box<[AtomicU32]>,
}

impl std::fmt::Debug for SqlCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqlCache").field("shapes", &self.len()).finish()
    }
}

/// Shapes a cache keeps unless told otherwise.
pub(crate) const DEFAULT_CAPACITY: usize = 4096;

impl Default for SqlCache {
    /// A cache of the default size, 4096 shapes.
    fn default() -> Self {
        Self::with_capacity(DEFAULT_CAPACITY)
    }
}

impl SqlCache {
    /// A cache that keeps at most `capacity` shapes. Beyond them, new shapes
    /// are rendered every time instead of cached: statements built in a
    /// loop (an `AND` of n terms) must not grow the cache without bound.
    pub(crate) fn with_capacity(capacity: usize) -> Self {
        SqlCache {
            dialect: PgDialect,
            capacity,
            full: AtomicBool::new(capacity == 0),
            rendered: RwLock::new(HashMap::default()),
            load_sizes: (0..capacity * LoadSizes::SIDES).map(|_| AtomicU32::new(0)).collect(),
        }
    }

    /// The size hints of the statement whose text has number `slot`.
    pub(crate) fn load_sizes(&self, slot: Option<u32>) -> LoadSizes<'_> {
        LoadSizes {
            cells: slot.and_then(|slot| {
                let start = slot as usize * LoadSizes::SIDES;
                self.load_sizes.get(start..start + LoadSizes::SIDES)
            }),
        }
    }

    /// The statement's text, rendered now only if its shape is new, and its
    /// bound values.
    pub fn render(&self, mut statement: impl Statement) -> Rendered {
        // The words are collected into a buffer the thread keeps, so a
        // statement whose shape is cached allocates nothing for it.
        // (A thread being torn down has no buffer left: a new one serves.)
        let mut shape = Shape(SHAPE_BUFFER.try_with(Cell::take).unwrap_or_default());
        shape.0.clear();
        let mut params = Vec::new();
        statement.collect(&mut shape, &mut params);
        let sql = match self.lookup(&shape.0) {
            Some(sql) => sql,
            None => self.write(&shape.0, &statement),
        };
        // A huge statement's buffer is let go rather than kept for good.
        if shape.0.capacity() <= 1024 {
            let _ = SHAPE_BUFFER.try_with(|buffer| buffer.set(shape.0));
        }
        sql.with_params(params)
    }

    /// The text of a statement whose shape the caller names by `key`,
    /// without building the statement unless the text is not cached yet.
    /// For statements whose shape is fixed by a model (a get by primary
    /// key), so the hot path skips the AST altogether. Keys start with a
    /// word no statement's shape starts with (>= 1000), so the two kinds of
    /// key cannot meet.
    pub(crate) fn render_fixed<S: Statement>(&self, key: &[u64], build: impl FnOnce() -> S) -> CachedSql {
        debug_assert!(key.first().is_some_and(|&word| word >= 1000));
        if let Some(sql) = self.lookup(key) {
            return sql;
        }
        let mut statement = build();
        // Its values are bound by the caller; collecting only empties them.
        statement.collect(&mut Shape::default(), &mut Vec::new());
        self.write(key, &statement)
    }

    fn lookup(&self, key: &[u64]) -> Option<CachedSql> {
        self.rendered
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(key)
            .map(|(sql, slot)| CachedSql {
                sql: Arc::clone(sql),
                slot: Some(*slot),
            })
    }

    fn write(&self, shape: &[u64], statement: &impl Statement) -> CachedSql {
        let mut writer = SqlWriter::default();
        statement.write_sql(&self.dialect, &mut writer);
        let sql: Arc<str> = writer.sql.into();
        if self.full.load(Ordering::Relaxed) {
            return CachedSql { sql, slot: None };
        }
        let mut rendered = self.rendered.write().unwrap_or_else(PoisonError::into_inner);
        let count = rendered.len();
        if count >= self.capacity {
            self.full.store(true, Ordering::Relaxed);
            return CachedSql { sql, slot: None };
        }
        // Another session may have cached the shape meanwhile: its entry,
        // and its number, stay.
        let (sql, slot) = rendered
            .entry(Shape(shape.to_vec()))
            .or_insert_with(|| (sql, u32::try_from(count).expect("the capacity fits in u32")));
        CachedSql {
            sql: Arc::clone(sql),
            slot: Some(*slot),
        }
    }

    /// How many shapes are cached.
    pub fn len(&self) -> usize {
        self.rendered.read().unwrap_or_else(PoisonError::into_inner).len()
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The dialect the cache renders with.
    pub fn dialect(&self) -> &dyn Dialect {
        &self.dialect
    }
}
