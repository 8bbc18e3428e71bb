//! `session.query::<M>()`: joins, filters, order, limit and offset, then a
//! loader.

use std::any::TypeId;
use std::marker::PhantomData;

use tokio_postgres::types::{FromSql, Type};
use tokio_postgres::Row;

use crate::error::{Error, Result};
use crate::expr::{Column, Condition, Order};
use crate::model::{Model, TableDef};
use crate::session::{unit_of, Session, Units};
use crate::sql::{BinaryOp, ColumnRef, Expr, JoinClause, JoinKind, OrderExpr, ParamValue, SelectStatement};
use crate::tracked::Tracked;
use crate::types::ColumnType;
use crate::unit::TableState;

/// A query bound to a session. `S` is what each row yields: a model `M`
/// (from `session.query::<M>()`), or a pair after a join: `(A, B)` from
/// [`join`](Query::join), `(A, Option<B>)` from [`left_join`](Query::left_join).
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

/// What one row of a query yields. Implemented for every model, for
/// `(A, B)` (an inner join) and for `(A, Option<B>)` (a left join).
pub trait Selection: 'static {
    /// The loaded value: `Tracked<M>`, or a pair of them.
    type Output: Send;
    #[doc(hidden)]
    type Merger<'u>: Send;
    /// The table the query selects `FROM`.
    #[doc(hidden)]
    fn root() -> &'static TableDef;
    /// The selected columns: every column of each model, in order.
    #[doc(hidden)]
    fn projection() -> Vec<Expr>;
    /// Borrows the identity maps that rows are merged into, once per query.
    #[doc(hidden)]
    fn merger(units: SessionUnits<'_>) -> Self::Merger<'_>;
    /// Decodes one row and merges it into the identity maps.
    #[doc(hidden)]
    fn merge(merger: &mut Self::Merger<'_>, row: &Row) -> Result<Self::Output>;
}

/// The session's units of work, lent to a [`Selection`] while it loads.
#[doc(hidden)]
pub struct SessionUnits<'u>(pub(crate) &'u mut Units);

impl std::fmt::Debug for SessionUnits<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionUnits").field("models", &self.0.len()).finish()
    }
}

/// One model's identity map, lent to a [`Selection`] while it loads.
#[doc(hidden)]
pub struct IdentityMap<'u, M: Model>(&'u mut TableState<M>);

impl<M: Model> std::fmt::Debug for IdentityMap<'_, M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityMap")
            .field("table", &M::TABLE.name)
            .field("objects", &self.0.identity.len())
            .finish()
    }
}

fn columns_of(table: &'static TableDef, out: &mut Vec<Expr>) {
    out.extend(table.columns.iter().map(|c| {
        Expr::Column(ColumnRef {
            table: table.name,
            column: c.name,
        })
    }));
}

impl<M: Model> Selection for M {
    type Output = Tracked<M>;
    type Merger<'u> = IdentityMap<'u, M>;

    fn root() -> &'static TableDef {
        M::TABLE
    }

    fn projection() -> Vec<Expr> {
        let mut out = Vec::with_capacity(M::TABLE.columns.len());
        columns_of(M::TABLE, &mut out);
        out
    }

    fn merger(units: SessionUnits<'_>) -> Self::Merger<'_> {
        IdentityMap(unit_of::<M>(units.0))
    }

    #[inline]
    fn merge(merger: &mut Self::Merger<'_>, row: &Row) -> Result<Tracked<M>> {
        Ok(merger.0.merge_loaded(M::from_row(row)?))
    }
}

/// Both models' identity maps at once; a join of a model with itself is
/// refused before any row is read, so the two are always distinct.
fn two_units<A: Model, B: Model>(units: SessionUnits<'_>) -> (IdentityMap<'_, A>, IdentityMap<'_, B>) {
    unit_of::<A>(units.0);
    unit_of::<B>(units.0);
    let (mut a, mut b) = (None, None);
    // Mutable borrows of two entries at once, from one pass over the few
    // models a session holds.
    for (id, unit) in units.0.iter_mut() {
        if *id == TypeId::of::<A>() {
            a = unit.as_any_mut().downcast_mut::<TableState<A>>();
        } else if *id == TypeId::of::<B>() {
            b = unit.as_any_mut().downcast_mut::<TableState<B>>();
        }
    }
    (
        IdentityMap(a.expect("unit created above")),
        IdentityMap(b.expect("unit created above")),
    )
}

fn pair_projection<A: Model, B: Model>() -> Vec<Expr> {
    let mut out = Vec::with_capacity(A::TABLE.columns.len() + B::TABLE.columns.len());
    columns_of(A::TABLE, &mut out);
    columns_of(B::TABLE, &mut out);
    out
}

impl<A: Model, B: Model> Selection for (A, B) {
    type Output = (Tracked<A>, Tracked<B>);
    type Merger<'u> = (IdentityMap<'u, A>, IdentityMap<'u, B>);

    fn root() -> &'static TableDef {
        A::TABLE
    }

    fn projection() -> Vec<Expr> {
        pair_projection::<A, B>()
    }

    fn merger(units: SessionUnits<'_>) -> Self::Merger<'_> {
        two_units::<A, B>(units)
    }

    #[inline]
    fn merge((a, b): &mut Self::Merger<'_>, row: &Row) -> Result<Self::Output> {
        let left = a.0.merge_loaded(A::from_row_at(row, 0)?);
        let right = b.0.merge_loaded(B::from_row_at(row, A::TABLE.columns.len())?);
        Ok((left, right))
    }
}

/// Accepts a value of any type, to ask only whether it is NULL.
struct AnyValue;

impl<'a> FromSql<'a> for AnyValue {
    fn from_sql(_: &Type, _: &'a [u8]) -> std::result::Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(AnyValue)
    }

    fn accepts(_: &Type) -> bool {
        true
    }
}

impl<A: Model, B: Model> Selection for (A, Option<B>) {
    type Output = (Tracked<A>, Option<Tracked<B>>);
    type Merger<'u> = (IdentityMap<'u, A>, IdentityMap<'u, B>);

    fn root() -> &'static TableDef {
        A::TABLE
    }

    fn projection() -> Vec<Expr> {
        pair_projection::<A, B>()
    }

    fn merger(units: SessionUnits<'_>) -> Self::Merger<'_> {
        two_units::<A, B>(units)
    }

    #[inline]
    fn merge((a, b): &mut Self::Merger<'_>, row: &Row) -> Result<Self::Output> {
        let left = a.0.merge_loaded(A::from_row_at(row, 0)?);
        let offset = A::TABLE.columns.len();
        // A primary key is never NULL, so a NULL key means the join found no
        // row. Every derived model has a key; `joined` refuses others.
        let key = offset + B::TABLE.primary_key.first().copied().unwrap_or(0);
        let matched = matches!(row.try_get::<_, Option<AnyValue>>(key), Ok(Some(_)));
        let right = if matched {
            Some(b.0.merge_loaded(B::from_row_at(row, offset)?))
        } else {
            None
        };
        Ok((left, right))
    }
}

/// Which model of a selection a condition or order is on; the marker types
/// `Only`, `Left` and `Right` let one model's column be found in a pair.
#[diagnostic::on_unimplemented(
    message = "this query does not select `{N}`",
    label = "a condition or order on `{N}`, in a query of `{Self}`",
    note = "filter and order a query by columns of the models it selects; join `{N}` first to use its columns"
)]
pub trait Contains<N, Position> {}

/// Position marker: the query's only model.
#[doc(hidden)]
#[derive(Debug)]
pub enum Only {}
/// Position marker: the first model of a join.
#[doc(hidden)]
#[derive(Debug)]
pub enum Left {}
/// Position marker: the joined model.
#[doc(hidden)]
#[derive(Debug)]
pub enum Right {}

impl<M: Model> Contains<M, Only> for M {}
impl<A: Model, B: Model> Contains<A, Left> for (A, B) {}
impl<A: Model, B: Model> Contains<B, Right> for (A, B) {}
impl<A: Model, B: Model> Contains<A, Left> for (A, Option<B>) {}
impl<A: Model, B: Model> Contains<B, Right> for (A, Option<B>) {}

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

/// The `ON` condition of a join between two tables, read from the one
/// foreign key that links them (in either direction).
fn foreign_key_condition(left: &'static TableDef, right: &'static TableDef) -> std::result::Result<Expr, String> {
    let mut links = Vec::new();
    for (from, to) in [(right, left), (left, right)] {
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
    match links.len() {
        1 => Ok(links.pop().expect("one link")),
        0 => Err(format!(
            "cannot join {} to {}: no foreign key links tables \"{}\" and \"{}\"; name the columns with join_on",
            left.model, right.model, left.name, right.name
        )),
        n => Err(format!(
            "cannot join {} to {}: {n} foreign keys link tables \"{}\" and \"{}\"; choose one with join_on",
            left.model, right.model, left.name, right.name
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

    fn joined<S>(
        mut self,
        kind: JoinKind,
        table: &'static TableDef,
        on: std::result::Result<Expr, String>,
    ) -> Query<'s, S> {
        if M::TABLE.name == table.name {
            self.invalid = Some(format!(
                "cannot join {} to table \"{}\", its own: joins of a table with itself need aliases, \
                 which are not supported yet",
                M::TABLE.model,
                table.name
            ));
        } else if table.primary_key.is_empty() {
            self.invalid = Some(format!("cannot join {}: it has no primary key", table.model));
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

    /// `JOIN`s model `J`'s table on the foreign key between the two, and
    /// yields `(Tracked<M>, Tracked<J>)` pairs: one per matching pair of rows.
    /// The foreign key may point either way; when none or several link the
    /// tables, the query fails with `Error::Metadata` (use
    /// [`join_on`](Query::join_on) then).
    ///
    /// Both objects of each pair enter the identity map, so a parent that
    /// matches several children is the same object in each pair.
    pub fn join<J: Model>(self) -> Query<'s, (M, J)> {
        let on = foreign_key_condition(M::TABLE, J::TABLE);
        self.joined(JoinKind::Inner, J::TABLE, on)
    }

    /// `LEFT JOIN`s model `J`'s table on the foreign key between the two
    /// (SQLAlchemy's `outerjoin`): every row of `M` comes back, paired with
    /// `None` where no row of `J` matches.
    pub fn left_join<J: Model>(self) -> Query<'s, (M, Option<J>)> {
        let on = foreign_key_condition(M::TABLE, J::TABLE);
        self.joined(JoinKind::Left, J::TABLE, on)
    }

    /// [`join`](Query::join) on `left = right`, for tables linked by no
    /// foreign key or by several.
    pub fn join_on<J: Model, T, U>(self, left: Column<M, T>, right: Column<J, U>) -> Query<'s, (M, J)>
    where
        T: ColumnType + Joinable<U>,
        U: ColumnType,
    {
        let on = equals(
            column_expr(M::TABLE, left.position),
            column_expr(J::TABLE, right.position),
        );
        self.joined(JoinKind::Inner, J::TABLE, Ok(on))
    }

    /// [`left_join`](Query::left_join) on `left = right`.
    pub fn left_join_on<J: Model, T, U>(self, left: Column<M, T>, right: Column<J, U>) -> Query<'s, (M, Option<J>)>
    where
        T: ColumnType + Joinable<U>,
        U: ColumnType,
    {
        let on = equals(
            column_expr(M::TABLE, left.position),
            column_expr(J::TABLE, right.position),
        );
        self.joined(JoinKind::Left, J::TABLE, Ok(on))
    }

    /// Runs the query and hands each object to `on_object` as its row
    /// arrives, without tracking it: no identity map entry, no list of all
    /// results. For result sets too large to hold; memory stays flat
    /// however many rows come back. Changes to these objects are not saved.
    pub async fn for_each(self, on_object: impl FnMut(M) -> Result<()>) -> Result<()> {
        let (session, statement) = self.statement(None)?;
        session.stream::<M>(statement, on_object).await
    }
}

impl<'s, S: Selection> Query<'s, S> {
    /// Keeps rows matching `condition`; several filters are joined with AND.
    /// After a join, conditions may be on either model.
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
