//! `session.query::<M>()`: joins, filters, order, limit and offset, then a
//! loader.

use std::marker::PhantomData;

use tokio_postgres::Row;

use crate::counted::Clones;
use crate::error::{Error, Result};
use crate::expr::{Column, Condition, Order};
use crate::model::{Model, RawValue, TableDef};
use crate::session::{put_unit, take_unit, unit_of, Session, Units};
use crate::sql::{BinaryOp, ColumnRef, Expr, JoinClause, JoinKind, LoadSizes, OrderExpr, ParamValue, SelectStatement};
use crate::tracked::{Block, BlockInner, Tracked, MAX_BLOCK};
use crate::types::ColumnType;
use crate::unit::{FreshRows, TableState};

/// A query bound to a session. `S` is what each row yields: a model `M`
/// (from `session.query::<M>()`), or after each join a pair of what came
/// before and the joined model: `(S, B)` from [`join`](Query::join),
/// `(S, Option<B>)` from [`left_join`](Query::left_join).
///
/// Built with [`filter`](Query::filter), [`order_by`](Query::order_by),
/// [`limit`](Query::limit) and [`offset`](Query::offset), then run with
/// [`all`](Query::all), [`first`](Query::first), [`one`](Query::one),
/// [`one_or_none`](Query::one_or_none) or [`count`](Query::count).
///
/// Running it flushes the session first when `autoflush` is on.
#[derive(Debug)]
pub struct Query<'s, S> {
    session: &'s mut Session,
    joins: Vec<JoinClause>,
    filters: Vec<Expr>,
    order_by: Vec<OrderExpr>,
    limit: Option<u64>,
    offset: Option<u64>,
    /// A join that cannot be built (no foreign key to infer it from),
    /// reported when the query runs so that building stays chainable.
    invalid: Option<String>,
    _selection: PhantomData<fn() -> S>,
}

/// What one row of a query yields: a model `M`, or after joins a nested
/// pair `(S, J)`, where `S` is what the query selected before the join and
/// `J` the joined model `B` (inner join) or `Option<B>` (left join).
pub trait Selection: 'static {
    /// The loaded value: `Tracked<M>`, or nested pairs of them.
    type Output: Clone + Send;
    /// The row as plain values, untracked: `M`, or nested pairs of them.
    type Value: Send;
    #[doc(hidden)]
    type Merger<'u>: Send;
    /// The table the query selects `FROM`.
    #[doc(hidden)]
    fn root() -> &'static TableDef;
    /// The tables selected, in order.
    #[doc(hidden)]
    fn tables(out: &mut Vec<&'static TableDef>);
    /// How many columns each row carries.
    #[doc(hidden)]
    fn width() -> usize;
    /// The positions of the primary key columns of each model, in a row
    /// whose columns for this selection start at `offset`.
    #[doc(hidden)]
    fn key_columns(offset: usize, out: &mut Vec<usize>);
    /// The selected columns: every column of each model, in order.
    #[doc(hidden)]
    fn projection() -> Vec<Expr> {
        let mut tables = Vec::new();
        Self::tables(&mut tables);
        tables.into_iter().map(Expr::AllColumns).collect()
    }
    /// Borrows the identity maps that rows are merged into, once per query.
    #[doc(hidden)]
    fn merger(units: SessionUnits<'_>) -> Self::Merger<'_>;
    /// Decodes one row, merges it into the identity maps and appends its
    /// objects to `out`, or holds them back until [`finish`](Self::finish).
    #[doc(hidden)]
    fn merge(merger: &mut Self::Merger<'_>, row: &Row, out: &mut Vec<Self::Output>) -> Result<()>;
    /// Appends whatever `merge` held back, after the last row.
    #[doc(hidden)]
    fn finish(merger: &mut Self::Merger<'_>, out: &mut Vec<Self::Output>) {
        let _ = (merger, out);
    }
    /// Decodes this selection's columns from `offset` on and merges them,
    /// finding each model's identity map in `units`.
    #[doc(hidden)]
    fn merge_at(units: &mut SessionUnits<'_>, row: &Row, offset: usize) -> Result<Self::Output>;
    /// Decodes this selection's columns from `offset` on, untracked.
    #[doc(hidden)]
    fn decode_at(row: &Row, offset: usize) -> Result<Self::Value>;
    /// What a join's left side keeps while it loads: for a model, its
    /// state, its new objects' values held back to be tracked a block at a
    /// time, and the row before's key and object; for a pair, the row
    /// before's keys (as bytes) and objects.
    #[doc(hidden)]
    type Gathered: Send;
    /// The block made of what was held back.
    #[doc(hidden)]
    type GatheredBlock: Send;
    /// Takes what [`gather_at`](Self::gather_at) needs from `units`, once
    /// per query.
    #[doc(hidden)]
    fn start_gathering(units: &mut SessionUnits<'_>) -> Self::Gathered;
    /// Like [`merge_at`](Self::merge_at), but a model's new object has its
    /// value held back in `gathered` and its place in the block to come
    /// returned (a pair of models merges at once).
    #[doc(hidden)]
    fn gather_at(
        units: &mut SessionUnits<'_>,
        gathered: &mut Self::Gathered,
        row: &Row,
        offset: usize,
    ) -> Result<Pending<Self::Output>>;
    /// How many values `gathered` holds.
    #[doc(hidden)]
    fn gathered_len(gathered: &Self::Gathered) -> usize;
    /// Tracks what `gathered` holds in one block, at the place its keys
    /// name, with the references of the `uses` handles that pending rows
    /// will take counted at once (and any `gathered` keeps itself); none if
    /// it holds nothing.
    #[doc(hidden)]
    fn finish_gathering(gathered: &mut Self::Gathered, uses: usize) -> Option<Self::GatheredBlock>;
    /// What a row yields for the object at `index` of a gathered block.
    #[doc(hidden)]
    fn gathered_output(block: &mut Self::GatheredBlock, index: usize) -> Self::Output;
    /// Tracks what is left in `gathered` and gives back to `units` what
    /// [`start_gathering`](Self::start_gathering) took.
    #[doc(hidden)]
    fn end_gathering(units: &mut SessionUnits<'_>, gathered: &mut Self::Gathered);
}

/// A block of objects a join gathered, with the references its handles
/// take counted ahead, for [`Selection`].
#[doc(hidden)]
pub struct GatheredBlock<M> {
    block: Block<M>,
    handles: Clones<BlockInner<M>>,
}

impl<M: Model> GatheredBlock<M> {
    /// A handle to the object at `index`, from the references counted
    /// ahead while they last.
    #[inline]
    fn handle(&mut self, index: usize) -> Tracked<M> {
        let block = self.handles.next().unwrap_or_else(|| self.block.clone());
        Tracked::from_counted(block, index)
    }
}

impl<M: Model> std::fmt::Debug for GatheredBlock<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatheredBlock").field("table", &M::TABLE.name).finish()
    }
}

/// One model's part in a join while it loads. Its state is taken out of
/// the session's units for the whole load (a join never selects a model
/// twice), rather than found again for every row; the values of its new
/// objects wait here to be tracked a block at a time (one allocation for
/// many, as a plain load does); and the row before's key and object are
/// kept, since a join repeats the left side (a user, for each of its
/// posts) on consecutive rows, and often the right side too.
///
/// Taking the state creates it if the session had none, so a join leaves
/// each of its models' (empty) state in the session even if it met no row.
#[doc(hidden)]
pub struct ModelGathering<M: Model> {
    /// None once the load has given it back.
    state: Option<Box<TableState<M>>>,
    values: Vec<M>,
    last: Option<(M::PrimaryKey, Pending<Tracked<M>>)>,
    /// The model's side in the statement's [`LoadSizes`], and the size of
    /// its identity map when the load began.
    side: usize,
    before: usize,
}

impl<M: Model> std::fmt::Debug for ModelGathering<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelGathering")
            .field("table", &M::TABLE.name)
            .field("held", &self.values.len())
            .finish()
    }
}

impl<M: Model> ModelGathering<M> {
    fn start(units: &mut SessionUnits<'_>, side: usize) -> Self {
        let mut state = take_unit::<M>(units.0);
        ModelGathering {
            before: state.identity.start_load(units.1, side),
            state: Some(state),
            values: Vec::new(),
            last: None,
            side,
        }
    }

    /// The object of the model's columns in `row`, from `offset` on: the
    /// row before's if the key is the same, else the session's (merged with
    /// the row), else a place in the block being gathered.
    #[inline]
    fn gather(&mut self, row: &Row, offset: usize) -> Result<Pending<Tracked<M>>> {
        let key = M::primary_key_at(row, offset)?;
        if let Some((last_key, last)) = &self.last {
            if *last_key == key {
                return Ok(last.clone());
            }
        }
        let Some(state) = &mut self.state else {
            unreachable!("the state is held until the load ends")
        };
        let found = state.gather_row(key.clone(), &mut self.values, row, offset)?;
        self.last = Some((key, found.clone()));
        Ok(found)
    }

    /// Tracks the held-back values in one block, with `uses` handles to it
    /// counted ahead (and one for the row before's object, if it is there).
    fn finish(&mut self, uses: usize) -> Option<GatheredBlock<M>> {
        let state = self.state.as_mut()?;
        let block = state.finish_gathering(&mut self.values)?;
        let last_is_new = matches!(self.last, Some((_, Pending::Gathering(_))));
        let mut gathered = GatheredBlock {
            handles: block.clones(uses + usize::from(last_is_new)),
            block,
        };
        // A row that repeats the row before's object takes it from the
        // block from now on.
        if let Some((_, last)) = &mut self.last {
            if let Pending::Gathering(index) = *last {
                *last = Pending::Ready(gathered.handle(index));
            }
        }
        Some(gathered)
    }

    fn end(&mut self, units: &mut SessionUnits<'_>) {
        self.finish(0);
        self.last = None;
        if let Some(mut state) = self.state.take() {
            state.identity.end_load(units.1, self.side, self.before);
            put_unit(units.0, state);
        }
    }
}

/// The session's units of work, lent to a [`Selection`] while it loads,
/// with the sizes of the statement's last load.
#[doc(hidden)]
pub struct SessionUnits<'u>(pub(crate) &'u mut Units, pub(crate) LoadSizes<'u>);

impl std::fmt::Debug for SessionUnits<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionUnits").field("models", &self.0.len()).finish()
    }
}

/// One model's identity map, lent to a [`Selection`] while it loads, with
/// the rows not seen before held back until a block of them can be tracked
/// with one allocation.
#[doc(hidden)]
pub struct IdentityMap<'u, M: Model> {
    state: &'u mut TableState<M>,
    fresh: FreshRows<M>,
    /// Whether the session held objects of `M` before the load began. If
    /// not, no row can belong to an object it knew, and a key repeated
    /// within the load is caught when the rows are tracked.
    had_objects: bool,
    /// Whether the load's blocks may go into the identity map unindexed:
    /// the session held no objects of `M` when it began, and every row's key
    /// so far was greater than the one before, so no key can repeat.
    unindexed: bool,
    /// Where the load records how many objects it added to the map.
    sizes: LoadSizes<'u>,
    /// The map's size when the load began.
    before: usize,
}

impl<M: Model> std::fmt::Debug for IdentityMap<'_, M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityMap")
            .field("table", &M::TABLE.name)
            .field("objects", &self.state.identity.len())
            .finish()
    }
}

impl<M: Model> Selection for M {
    type Output = Tracked<M>;
    type Value = M;
    // One model: its identity map is found once per query, not per row.
    type Merger<'u> = IdentityMap<'u, M>;

    fn root() -> &'static TableDef {
        M::TABLE
    }

    fn tables(out: &mut Vec<&'static TableDef>) {
        out.push(M::TABLE);
    }

    // One allocation, not two: the default gathers the tables first.
    fn projection() -> Vec<Expr> {
        vec![Expr::AllColumns(M::TABLE)]
    }

    fn width() -> usize {
        M::TABLE.columns.len()
    }

    fn key_columns(offset: usize, out: &mut Vec<usize>) {
        out.extend(M::TABLE.primary_key.iter().map(|&c| offset + c));
    }

    fn merger(units: SessionUnits<'_>) -> Self::Merger<'_> {
        let SessionUnits(units, sizes) = units;
        let state = unit_of::<M>(units);
        let had_objects = state.has_objects();
        IdentityMap {
            had_objects,
            unindexed: !had_objects,
            fresh: std::mem::take(&mut state.spare_rows),
            sizes,
            before: state.identity.start_load(sizes, 0),
            state,
        }
    }

    #[inline]
    fn merge(merger: &mut Self::Merger<'_>, row: &Row, out: &mut Vec<Tracked<M>>) -> Result<()> {
        let (key, value) = if merger.had_objects {
            let key = M::primary_key_at(row, 0)?;
            if let Some(known) = merger.state.merge_if_known(&key, row, 0)? {
                // Earlier rows come out first, keeping the rows' order.
                merger.state.track_fresh(&mut merger.fresh, false, out);
                out.push(known);
                return Ok(());
            }
            let value = M::from_row_with_key(row, 0, key.clone())?;
            (key, value)
        } else {
            let value = M::from_row(row)?;
            let key = value.primary_key();
            if merger.unindexed {
                let last = merger
                    .fresh
                    .last_key()
                    .or_else(|| merger.state.identity.last_unindexed_key());
                merger.unindexed = last.is_none_or(|last| key > *last);
            }
            (key, value)
        };
        if merger.fresh.push(key, value) {
            merger.state.track_fresh(&mut merger.fresh, merger.unindexed, out);
        }
        Ok(())
    }

    fn finish(merger: &mut Self::Merger<'_>, out: &mut Vec<Tracked<M>>) {
        merger.state.track_fresh(&mut merger.fresh, merger.unindexed, out);
        merger.state.spare_rows = std::mem::take(&mut merger.fresh);
        merger.state.identity.end_load(merger.sizes, 0, merger.before);
    }

    #[inline]
    fn merge_at(units: &mut SessionUnits<'_>, row: &Row, offset: usize) -> Result<Tracked<M>> {
        unit_of::<M>(units.0).merge_row(row, offset)
    }

    #[inline]
    fn decode_at(row: &Row, offset: usize) -> Result<M> {
        M::from_row_at(row, offset)
    }

    type Gathered = ModelGathering<M>;
    type GatheredBlock = GatheredBlock<M>;

    fn start_gathering(units: &mut SessionUnits<'_>) -> ModelGathering<M> {
        ModelGathering::start(units, 0)
    }

    #[inline]
    fn gather_at(
        _: &mut SessionUnits<'_>,
        gathered: &mut ModelGathering<M>,
        row: &Row,
        offset: usize,
    ) -> Result<Pending<Tracked<M>>> {
        gathered.gather(row, offset)
    }

    fn gathered_len(gathered: &ModelGathering<M>) -> usize {
        gathered.values.len()
    }

    fn finish_gathering(gathered: &mut ModelGathering<M>, uses: usize) -> Option<GatheredBlock<M>> {
        gathered.finish(uses)
    }

    fn gathered_output(block: &mut GatheredBlock<M>, index: usize) -> Tracked<M> {
        block.handle(index)
    }

    fn end_gathering(units: &mut SessionUnits<'_>, gathered: &mut ModelGathering<M>) {
        gathered.end(units);
    }
}

/// The right-hand side of a join: a model `B` (inner join: always there)
/// or `Option<B>` (left join: `None` where nothing matched).
pub trait Joined: 'static {
    /// The joined model.
    type Model: Model;
    /// What each row yields for it.
    type Output: Clone + Send;
    /// What each row yields for it as a plain value, untracked.
    type Value: Send;
    /// Decodes the model's columns from `offset` on and merges them.
    #[doc(hidden)]
    fn merge_at(units: &mut SessionUnits<'_>, row: &Row, offset: usize) -> Result<Self::Output>;
    /// The same, into the model's state that a join's merger holds; a new
    /// object's value is held back there, to be tracked with the others of
    /// its block, and its place in that block comes back.
    #[doc(hidden)]
    fn gather_into(
        gathered: &mut ModelGathering<Self::Model>,
        row: &Row,
        offset: usize,
    ) -> Result<Pending<Self::Output>>;
    /// What a row yields for an object of the gathered block.
    #[doc(hidden)]
    fn gathered(object: Tracked<Self::Model>) -> Self::Output;
    /// Decodes the model's columns from `offset` on, untracked.
    #[doc(hidden)]
    fn decode_at(row: &Row, offset: usize) -> Result<Self::Value>;
}

impl<B: Model> Joined for B {
    type Model = B;
    type Output = Tracked<B>;
    type Value = B;

    #[inline]
    fn merge_at(units: &mut SessionUnits<'_>, row: &Row, offset: usize) -> Result<Tracked<B>> {
        <B as Selection>::merge_at(units, row, offset)
    }

    #[inline]
    fn gather_into(gathered: &mut ModelGathering<B>, row: &Row, offset: usize) -> Result<Pending<Tracked<B>>> {
        gathered.gather(row, offset)
    }

    fn gathered(object: Tracked<B>) -> Tracked<B> {
        object
    }

    #[inline]
    fn decode_at(row: &Row, offset: usize) -> Result<B> {
        B::from_row_at(row, offset)
    }
}

/// Whether a left join found a `B` for this row. A primary key is never
/// NULL, so a NULL key means the join found no row. Every derived model has
/// a key; `joined` refuses others.
fn left_matched<B: Model>(row: &Row, offset: usize) -> Result<bool> {
    let key_column = B::TABLE.primary_key.first().copied().unwrap_or(0);
    Ok(row
        .try_get::<_, RawValue>(offset + key_column)
        .map_err(|source| Error::TypeMismatch {
            table: B::TABLE.name.to_owned(),
            column: B::TABLE.columns.get(key_column).map_or("?", |c| c.name).to_owned(),
            source,
        })?
        .0
        .is_some())
}

impl<B: Model> Joined for Option<B> {
    type Model = B;
    type Output = Option<Tracked<B>>;
    type Value = Option<B>;

    #[inline]
    fn merge_at(units: &mut SessionUnits<'_>, row: &Row, offset: usize) -> Result<Option<Tracked<B>>> {
        if left_matched::<B>(row, offset)? {
            Ok(Some(<B as Selection>::merge_at(units, row, offset)?))
        } else {
            Ok(None)
        }
    }

    #[inline]
    fn gather_into(gathered: &mut ModelGathering<B>, row: &Row, offset: usize) -> Result<Pending<Option<Tracked<B>>>> {
        if !left_matched::<B>(row, offset)? {
            return Ok(Pending::Ready(None));
        }
        Ok(gathered.gather(row, offset)?.map(Some))
    }

    fn gathered(object: Tracked<B>) -> Option<Tracked<B>> {
        Some(object)
    }

    #[inline]
    fn decode_at(row: &Row, offset: usize) -> Result<Option<B>> {
        if left_matched::<B>(row, offset)? {
            Ok(Some(B::from_row_at(row, offset)?))
        } else {
            Ok(None)
        }
    }
}

/// Merges the rows of a join: each side's new objects are gathered into
/// blocks, and rows that name an object of a block not made yet wait for it.
#[doc(hidden)]
pub struct JoinMerger<'u, S: Selection, J: Joined> {
    units: SessionUnits<'u>,
    left: S::Gathered,
    right: ModelGathering<J::Model>,
    /// Rows from the first that needs a held-back object on, in order,
    /// until their blocks are made.
    pending: Vec<PendingRow<S, J>>,
}

/// A join's row waiting for the blocks its objects go in.
type PendingRow<S, J> = (Pending<<S as Selection>::Output>, Pending<<J as Joined>::Output>);

/// What a join's row yields for one of its models, before the block of new
/// objects it may need is made.
#[doc(hidden)]
#[derive(Clone, Debug)]
pub enum Pending<O> {
    /// The output itself: an object the session held, or none.
    Ready(O),
    /// The object at this place in the block being gathered: a `usize`,
    /// as in a handle, so that either variant is written as whole words.
    Gathering(usize),
}

impl<O> Pending<O> {
    fn map<P>(self, f: impl FnOnce(O) -> P) -> Pending<P> {
        match self {
            Pending::Ready(output) => Pending::Ready(f(output)),
            Pending::Gathering(index) => Pending::Gathering(index),
        }
    }

    fn is_gathering(&self) -> bool {
        matches!(self, Pending::Gathering(_))
    }

    /// The output, taking the object at a gathered place from `block`, the
    /// block made of what was gathered.
    fn resolve<B>(self, block: Option<&mut B>, object_at: impl FnOnce(&mut B, usize) -> O) -> O {
        match (self, block) {
            (Pending::Ready(output), _) => output,
            (Pending::Gathering(index), Some(block)) => object_at(block, index),
            (Pending::Gathering(_), None) => unreachable!("a gathered object has its block"),
        }
    }
}

impl<S: Selection, J: Joined> Drop for JoinMerger<'_, S, J> {
    fn drop(&mut self) {
        // A load cut short still tracks what it gathered: the identity maps
        // already name those objects' places.
        S::end_gathering(&mut self.units, &mut self.left);
        self.right.end(&mut self.units);
    }
}

impl<S: Selection, J: Joined> std::fmt::Debug for JoinMerger<'_, S, J> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinMerger")
            .field("right", &self.right)
            .field("pending", &self.pending.len())
            .finish()
    }
}

impl<S: Selection, J: Joined> JoinMerger<'_, S, J> {
    /// Tracks the gathered objects in one block per side and appends the
    /// pending rows, in order, their handles counted ahead.
    fn flush(&mut self, out: &mut Vec<(S::Output, J::Output)>) {
        let (left_uses, right_uses) = self
            .pending
            .iter()
            .fold((0, 0), |(left_uses, right_uses), (left, right)| {
                (
                    left_uses + usize::from(left.is_gathering()),
                    right_uses + usize::from(right.is_gathering()),
                )
            });
        let mut left_block = S::finish_gathering(&mut self.left, left_uses);
        let mut right_block = self.right.finish(right_uses);
        out.extend(self.pending.drain(..).map(|(left, right)| {
            let left = left.resolve(left_block.as_mut(), S::gathered_output);
            let right = right.resolve(right_block.as_mut(), |block, index| J::gathered(block.handle(index)));
            (left, right)
        }));
    }
}

/// A pair on the left of another join: it merges at once (only a model
/// gathers), and keeps the row before's keys, as the row's bytes, and its
/// objects, for a row with the same keys to reuse, skipping the lookups.
/// That is sound because the same key bytes decode to the same keys, whose
/// objects the session already merged that row into.
#[doc(hidden)]
#[derive(Debug)]
pub struct PairGathering<O> {
    /// Where the pair's key columns are in a row.
    key_columns: Vec<usize>,
    /// The keys in this row and in the row before, each column as a length
    /// (or `u32::MAX` for NULL) and its bytes.
    key: Vec<u8>,
    last_key: Vec<u8>,
    last: Option<O>,
}

impl<S: Selection, J: Joined> Selection for (S, J) {
    type Output = (S::Output, J::Output);
    type Value = (S::Value, J::Value);
    type Merger<'u> = JoinMerger<'u, S, J>;

    fn root() -> &'static TableDef {
        S::root()
    }

    fn tables(out: &mut Vec<&'static TableDef>) {
        S::tables(out);
        out.push(J::Model::TABLE);
    }

    fn width() -> usize {
        S::width() + J::Model::TABLE.columns.len()
    }

    fn key_columns(offset: usize, out: &mut Vec<usize>) {
        S::key_columns(offset, out);
        <J::Model as Selection>::key_columns(offset + S::width(), out);
    }

    fn merger(mut units: SessionUnits<'_>) -> Self::Merger<'_> {
        let left = S::start_gathering(&mut units);
        let right = ModelGathering::start(&mut units, 1);
        JoinMerger {
            units,
            left,
            right,
            pending: Vec::new(),
        }
    }

    #[inline]
    fn merge(merger: &mut Self::Merger<'_>, row: &Row, out: &mut Vec<Self::Output>) -> Result<()> {
        let left = S::gather_at(&mut merger.units, &mut merger.left, row, 0)?;
        let right = J::gather_into(&mut merger.right, row, S::width())?;
        match (left, right) {
            // Nothing waits for a block: the row goes out as it is.
            (Pending::Ready(left), Pending::Ready(right)) if merger.pending.is_empty() => out.push((left, right)),
            row => {
                merger.pending.push(row);
                if merger.right.values.len() == MAX_BLOCK || S::gathered_len(&merger.left) == MAX_BLOCK {
                    merger.flush(out);
                }
            }
        }
        Ok(())
    }

    fn finish(merger: &mut Self::Merger<'_>, out: &mut Vec<Self::Output>) {
        merger.flush(out);
    }

    #[inline]
    fn merge_at(units: &mut SessionUnits<'_>, row: &Row, offset: usize) -> Result<Self::Output> {
        let left = S::merge_at(units, row, offset)?;
        let right = J::merge_at(units, row, offset + S::width())?;
        Ok((left, right))
    }

    type Gathered = PairGathering<Self::Output>;
    type GatheredBlock = ();

    fn start_gathering(_: &mut SessionUnits<'_>) -> Self::Gathered {
        let mut key_columns = Vec::new();
        Self::key_columns(0, &mut key_columns);
        PairGathering {
            key_columns,
            key: Vec::new(),
            last_key: Vec::new(),
            last: None,
        }
    }

    #[inline]
    fn gather_at(
        units: &mut SessionUnits<'_>,
        gathered: &mut Self::Gathered,
        row: &Row,
        offset: usize,
    ) -> Result<Pending<Self::Output>> {
        gathered.key.clear();
        for &column in &gathered.key_columns {
            let RawValue(raw) = row.try_get(offset + column).map_err(Error::from_driver)?;
            match raw {
                Some(bytes) => {
                    gathered.key.extend_from_slice(&(bytes.len() as u32).to_ne_bytes());
                    gathered.key.extend_from_slice(bytes);
                }
                None => gathered.key.extend_from_slice(&u32::MAX.to_ne_bytes()),
            }
        }
        if let Some(last) = &gathered.last {
            // Element by element: `==` on slices calls libc's memcmp, which
            // the profile put at 2% of a join of 1,000 rows for these few
            // bytes.
            if gathered.key.iter().eq(gathered.last_key.iter()) {
                return Ok(Pending::Ready(last.clone()));
            }
        }
        let merged = Self::merge_at(units, row, offset)?;
        std::mem::swap(&mut gathered.key, &mut gathered.last_key);
        gathered.last = Some(merged.clone());
        Ok(Pending::Ready(merged))
    }

    fn gathered_len(_: &Self::Gathered) -> usize {
        0
    }

    fn finish_gathering(_: &mut Self::Gathered, _: usize) -> Option<()> {
        None
    }

    fn gathered_output((): &mut (), _: usize) -> Self::Output {
        unreachable!("a pair gathers nothing")
    }

    fn end_gathering(_: &mut SessionUnits<'_>, gathered: &mut Self::Gathered) {
        gathered.last = None;
    }

    #[inline]
    fn decode_at(row: &Row, offset: usize) -> Result<Self::Value> {
        Ok((S::decode_at(row, offset)?, J::decode_at(row, offset + S::width())?))
    }
}

/// Which model of a selection a condition or order is on. The position
/// markers (`Only`, `Right`, `InLeft<P>`) let the compiler find a model in
/// nested pairs; they are inferred, never written.
#[diagnostic::on_unimplemented(
    message = "this query does not select `{N}`",
    label = "a condition, order or join column on `{N}`, in a query of `{Self}`",
    note = "use columns of the models the query selects; join `{N}` first to use its columns"
)]
pub trait Contains<N, Position> {}

/// Position marker: the query's only model.
#[doc(hidden)]
#[derive(Debug)]
pub enum Only {}
/// Position marker: the model joined last.
#[doc(hidden)]
#[derive(Debug)]
pub enum Right {}
/// Position marker: somewhere in what was selected before the last join.
#[doc(hidden)]
#[derive(Debug)]
pub struct InLeft<P>(PhantomData<P>);

impl<M: Model> Contains<M, Only> for M {}
impl<S, J: Joined, N, P> Contains<N, InLeft<P>> for (S, J) where S: Contains<N, P> {}
impl<S, J: Joined> Contains<J::Model, Right> for (S, J) {}

/// Something `order_by` takes: a column (ascending) or an [`Order`].
pub trait IntoOrder {
    /// The model whose column it sorts by.
    type Model;
    /// The `ORDER BY` term.
    fn into_order(self) -> Order<Self::Model>;
}

impl<M: Model> IntoOrder for Order<M> {
    type Model = M;
    fn into_order(self) -> Order<M> {
        self
    }
}

impl<M: Model, T: ColumnType> IntoOrder for Column<M, T> {
    type Model = M;
    fn into_order(self) -> Order<M> {
        self.asc()
    }
}

/// Columns of two models that a join may compare: the same type, or one
/// the nullable form of the other (a nullable foreign key to a key).
#[diagnostic::on_unimplemented(
    message = "a column of type `{Self}` cannot be joined to a column of type `{T}`",
    label = "join columns must have the same type, or one its Option<...>"
)]
pub trait Joinable<T> {}

impl<T: ColumnType> Joinable<T> for T {}
impl<T: ColumnType> Joinable<T> for Option<T> {}
impl<T: ColumnType> Joinable<Option<T>> for T {}

/// `"table"."column"`.
fn column_expr(table: &'static TableDef, position: usize) -> Expr {
    Expr::Column(ColumnRef {
        table: table.name,
        column: table.columns[position].name,
    })
}

fn equals(left: Expr, right: Expr) -> Expr {
    Expr::Binary(Box::new(left), BinaryOp::Eq, Box::new(right))
}

/// `left = right`, for a join's `ON`.
fn columns_equal<N: Model, J: Model, T, U>(left: Column<N, T>, right: Column<J, U>) -> Expr {
    equals(
        column_expr(N::TABLE, left.position),
        column_expr(J::TABLE, right.position),
    )
}

/// The `ON` condition of a join of `joined` to a query selecting `selected`,
/// read from the one foreign key that links `joined` with one of them (in
/// either direction).
fn foreign_key_condition(
    selected: &[&'static TableDef],
    joined: &'static TableDef,
) -> std::result::Result<Expr, String> {
    let mut links = Vec::new();
    for &table in selected {
        for (from, to) in [(joined, table), (table, joined)] {
            for (position, column) in from.columns.iter().enumerate() {
                let Some(fk) = &column.foreign_key else { continue };
                if (fk.target)().same_as(to) {
                    let Some(target) = to.columns.iter().position(|c| c.name == fk.column) else {
                        continue;
                    };
                    links.push(equals(column_expr(from, position), column_expr(to, target)));
                }
            }
        }
    }
    let models = selected.iter().map(|t| t.model).collect::<Vec<_>>().join(", ");
    let tables = selected
        .iter()
        .map(|t| format!("\"{}\"", t.name))
        .collect::<Vec<_>>()
        .join(", ");
    match links.len() {
        1 => Ok(links.pop().expect("one link")),
        0 => Err(format!(
            "cannot join {} to {models}: no foreign key links table \"{}\" with {tables}; name the columns with join_on",
            joined.model, joined.name
        )),
        n => Err(format!(
            "cannot join {} to {models}: {n} foreign keys link table \"{}\" with {tables}; choose one with join_on",
            joined.model, joined.name
        )),
    }
}

impl<'s, M: Model> Query<'s, M> {
    pub(crate) fn new(session: &'s mut Session) -> Self {
        Query {
            session,
            joins: Vec::new(),
            filters: Vec::new(),
            order_by: Vec::new(),
            limit: None,
            offset: None,
            invalid: None,
            _selection: PhantomData,
        }
    }
}

impl<'s, S: Selection> Query<'s, S> {
    fn joined<T>(
        mut self,
        kind: JoinKind,
        table: &'static TableDef,
        on: std::result::Result<Expr, String>,
    ) -> Query<'s, T> {
        let mut selected = Vec::new();
        S::tables(&mut selected);
        if let Some(own) = selected.iter().find(|t| t.name == table.name) {
            self.invalid = self.invalid.or(Some(format!(
                "cannot join {} to table \"{}\", which {} already selects: joins of a table with itself need \
                 aliases, which are not supported yet",
                table.model, table.name, own.model
            )));
        } else if table.primary_key.is_empty() {
            self.invalid = self
                .invalid
                .or(Some(format!("cannot join {}: it has no primary key", table.model)));
        }
        match on {
            Ok(on) => self.joins.push(JoinClause {
                kind,
                table: table.name,
                on,
            }),
            Err(message) => self.invalid = self.invalid.or(Some(message)),
        }
        Query {
            session: self.session,
            joins: self.joins,
            filters: self.filters,
            order_by: self.order_by,
            limit: self.limit,
            offset: self.offset,
            invalid: self.invalid,
            _selection: PhantomData,
        }
    }

    fn inferred_on<J: Model>() -> std::result::Result<Expr, String> {
        let mut selected = Vec::new();
        S::tables(&mut selected);
        foreign_key_condition(&selected, J::TABLE)
    }

    /// `JOIN`s model `J`'s table on the foreign key that links it with a
    /// model the query selects, and yields pairs: `(Tracked<M>, Tracked<J>)`
    /// after the first join, `((a, b), Tracked<J>)` after a second, and so
    /// on. The foreign key may point either way; when none or several link
    /// `J` with the selected models, the query fails with `Error::Metadata`
    /// (use [`join_on`](Query::join_on) then).
    ///
    /// Every object of each row enters the identity map, so a parent that
    /// matches several children is the same object in each pair.
    pub fn join<J: Model>(self) -> Query<'s, (S, J)> {
        let on = Self::inferred_on::<J>();
        self.joined(JoinKind::Inner, J::TABLE, on)
    }

    /// `LEFT JOIN`s model `J`'s table on the foreign key that links it with
    /// a model the query selects (SQLAlchemy's `outerjoin`): every row so far
    /// comes back, paired with `None` where no row of `J` matches.
    pub fn left_join<J: Model>(self) -> Query<'s, (S, Option<J>)> {
        let on = Self::inferred_on::<J>();
        self.joined(JoinKind::Left, J::TABLE, on)
    }

    /// [`join`](Query::join) on `left = right`, where `left` is a column of
    /// any model the query selects: for tables linked by no foreign key or
    /// by several.
    pub fn join_on<N: Model, Position, J: Model, T, U>(
        self,
        left: Column<N, T>,
        right: Column<J, U>,
    ) -> Query<'s, (S, J)>
    where
        S: Contains<N, Position>,
        T: ColumnType + Joinable<U>,
        U: ColumnType,
    {
        self.joined(JoinKind::Inner, J::TABLE, Ok(columns_equal(left, right)))
    }

    /// [`left_join`](Query::left_join) on `left = right`.
    pub fn left_join_on<N: Model, Position, J: Model, T, U>(
        self,
        left: Column<N, T>,
        right: Column<J, U>,
    ) -> Query<'s, (S, Option<J>)>
    where
        S: Contains<N, Position>,
        T: ColumnType + Joinable<U>,
        U: ColumnType,
    {
        self.joined(JoinKind::Left, J::TABLE, Ok(columns_equal(left, right)))
    }

    /// Keeps rows matching `condition`; several filters are joined with AND.
    /// After joins, conditions may be on any model the query selects.
    pub fn filter<N, Position>(mut self, condition: Condition<N>) -> Self
    where
        S: Contains<N, Position>,
    {
        self.filters.push(condition.into_expr());
        self
    }

    /// Sorts by a column (`User::name`, ascending) or an explicit
    /// `User::name.desc()`; later calls add tie-breakers.
    pub fn order_by<O: IntoOrder, Position>(mut self, order: O) -> Self
    where
        S: Contains<O::Model, Position>,
    {
        self.order_by.push(order.into_order().term);
        self
    }

    /// Returns at most `count` rows.
    pub fn limit(mut self, count: u64) -> Self {
        self.limit = Some(count);
        self
    }

    /// Skips the first `count` rows.
    pub fn offset(mut self, count: u64) -> Self {
        self.offset = Some(count);
        self
    }

    fn where_clause(filters: Vec<Expr>) -> Option<Expr> {
        match filters.len() {
            0 => None,
            1 => filters.into_iter().next(),
            _ => Some(Expr::And(filters)),
        }
    }

    fn bound(name: &str, value: Option<u64>) -> Result<Option<Expr>> {
        value
            .map(|v| {
                i64::try_from(v)
                    .map(|v| Expr::Param(ParamValue::new(Box::new(v))))
                    .map_err(|_| Error::InvalidState(format!("{name} {v} is larger than PostgreSQL's bigint")))
            })
            .transpose()
    }

    fn statement(self, limit_override: Option<u64>) -> Result<(&'s mut Session, SelectStatement)> {
        if let Some(message) = self.invalid {
            return Err(Error::Metadata(message));
        }
        let limit = match (self.limit, limit_override) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let statement = SelectStatement {
            projection: S::projection(),
            from: S::root().name,
            joins: self.joins,
            filter: Self::where_clause(self.filters),
            order_by: self.order_by,
            limit: Self::bound("limit", limit)?,
            offset: Self::bound("offset", self.offset)?,
        };
        Ok((self.session, statement))
    }

    /// Every matching row.
    pub async fn all(self) -> Result<Vec<S::Output>> {
        let (session, statement) = self.statement(None)?;
        session.load::<S>(statement).await
    }

    /// Every matching row as plain values, not tracked by the session: no
    /// identity map entry, no change tracking, so it costs what decoding the
    /// rows by hand costs. For read-only work (rendering, serializing,
    /// reports). Changes to these values reach no database; load with
    /// [`all`](Query::all) to change rows.
    pub async fn values(self) -> Result<Vec<S::Value>> {
        let (session, statement) = self.statement(None)?;
        let mut values = Vec::new();
        session
            .stream(statement, |row| {
                values.push(S::decode_at(row, 0)?);
                Ok(())
            })
            .await?;
        Ok(values)
    }

    /// Runs the query and hands each row's values to `on_value` as the row
    /// arrives, untracked as with [`values`](Query::values), and without a
    /// list of all results. For result sets too large to hold; memory stays
    /// flat however many rows come back. Changes to these values are not
    /// saved.
    pub async fn for_each(self, mut on_value: impl FnMut(S::Value) -> Result<()>) -> Result<()> {
        let (session, statement) = self.statement(None)?;
        session.stream(statement, |row| on_value(S::decode_at(row, 0)?)).await
    }

    /// The first matching row, or `None`.
    pub async fn first(self) -> Result<Option<S::Output>> {
        let (session, statement) = self.statement(Some(1))?;
        Ok(session.load::<S>(statement).await?.into_iter().next())
    }

    /// Exactly one row: `NotFound` when none matches,
    /// `MultipleRowsFound` when several do.
    pub async fn one(self) -> Result<S::Output> {
        self.one_or_none().await?.ok_or_else(|| Error::NotFound {
            table: S::root().name.to_owned(),
        })
    }

    /// One row or `None`; `MultipleRowsFound` when several match.
    pub async fn one_or_none(self) -> Result<Option<S::Output>> {
        let (session, statement) = self.statement(Some(2))?;
        let mut found = session.load::<S>(statement).await?;
        if found.len() > 1 {
            return Err(Error::MultipleRowsFound {
                table: S::root().name.to_owned(),
            });
        }
        Ok(found.pop())
    }

    /// How many rows match, honouring `limit` and `offset` as a count of the
    /// query's rows would.
    pub async fn count(self) -> Result<u64> {
        let (limit, offset) = (self.limit, self.offset.unwrap_or(0));
        let table = S::root().name;
        let (session, mut statement) = self.statement(None)?;
        statement.projection = vec![Expr::CountStar];
        statement.order_by.clear();
        statement.limit = None;
        statement.offset = None;
        let rows = session.fetch_rows(statement).await?;
        let total: i64 = rows
            .first()
            .ok_or_else(|| Error::NotFound {
                table: table.to_owned(),
            })?
            .try_get(0)
            .map_err(|source| Error::TypeMismatch {
                table: table.to_owned(),
                column: "count(*)".to_owned(),
                source,
            })?;
        let after_offset = u64::try_from(total).unwrap_or(0).saturating_sub(offset);
        Ok(limit.map_or(after_offset, |limit| after_offset.min(limit)))
    }
}
