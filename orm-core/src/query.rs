//! `session.query::<M>()`: filters, order, limit and offset, then a loader.

use std::marker::PhantomData;

use crate::error::{Error, Result};
use crate::expr::{Condition, Order};
use crate::model::Model;
use crate::session::{select_all, Session};
use crate::sql::{Expr, OrderExpr, ParamValue, SelectStatement};
use crate::tracked::Tracked;

/// A query for objects of model `M`, bound to a session. Built with
/// [`filter`](Query::filter), [`order_by`](Query::order_by),
/// [`limit`](Query::limit) and [`offset`](Query::offset), then run with
/// [`all`](Query::all), [`first`](Query::first), [`one`](Query::one),
/// [`one_or_none`](Query::one_or_none) or [`count`](Query::count).
///
/// Running it flushes the session first when `autoflush` is on.
#[derive(Debug)]
pub struct Query<'s, M> {
    session: &'s mut Session,
    filters: Vec<Expr>,
    order_by: Vec<OrderExpr>,
    limit: Option<u64>,
    offset: Option<u64>,
    _model: PhantomData<fn() -> M>,
}

impl<'s, M: Model> Query<'s, M> {
    pub(crate) fn new(session: &'s mut Session) -> Self {
        Query {
            session,
            filters: Vec::new(),
            order_by: Vec::new(),
            limit: None,
            offset: None,
            _model: PhantomData,
        }
    }

    /// Keeps rows matching `condition`; several filters are joined with AND.
    pub fn filter(mut self, condition: Condition<M>) -> Self {
        self.filters.push(condition.into_expr());
        self
    }

    /// Sorts by a column (`User::name`, ascending) or an explicit
    /// `User::name.desc()`; later calls add tie-breakers.
    pub fn order_by(mut self, order: impl Into<Order<M>>) -> Self {
        self.order_by.push(order.into().term);
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
                    .map(|v| Expr::Param(ParamValue(Box::new(v))))
                    .map_err(|_| Error::InvalidState(format!("{name} {v} is larger than PostgreSQL's bigint")))
            })
            .transpose()
    }

    fn statement(self, limit_override: Option<u64>) -> Result<(&'s mut Session, SelectStatement)> {
        let limit = match (self.limit, limit_override) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let mut statement = select_all::<M>(Self::where_clause(self.filters));
        statement.order_by = self.order_by;
        statement.limit = Self::bound("limit", limit)?;
        statement.offset = Self::bound("offset", self.offset)?;
        Ok((self.session, statement))
    }

    /// Every matching object.
    pub async fn all(self) -> Result<Vec<Tracked<M>>> {
        let (session, statement) = self.statement(None)?;
        session.load::<M>(statement).await
    }

    /// The first matching object, or `None`.
    pub async fn first(self) -> Result<Option<Tracked<M>>> {
        let (session, statement) = self.statement(Some(1))?;
        Ok(session.load::<M>(statement).await?.into_iter().next())
    }

    /// Exactly one object: `NotFound` when none matches,
    /// `MultipleRowsFound` when several do.
    pub async fn one(self) -> Result<Tracked<M>> {
        self.one_or_none().await?.ok_or_else(|| Error::NotFound {
            table: M::TABLE.name.to_owned(),
        })
    }

    /// One object or `None`; `MultipleRowsFound` when several match.
    pub async fn one_or_none(self) -> Result<Option<Tracked<M>>> {
        let (session, statement) = self.statement(Some(2))?;
        let mut found = session.load::<M>(statement).await?;
        if found.len() > 1 {
            return Err(Error::MultipleRowsFound {
                table: M::TABLE.name.to_owned(),
            });
        }
        Ok(found.pop())
    }

    /// Runs the query and hands each object to `on_object` as its row
    /// arrives, without tracking it: no identity map entry, no list of all
    /// results. For result sets too large to hold; memory stays flat
    /// however many rows come back. Changes to these objects are not saved.
    pub async fn for_each(self, on_object: impl FnMut(M) -> Result<()>) -> Result<()> {
        let (session, statement) = self.statement(None)?;
        session.stream::<M>(statement, on_object).await
    }

    /// How many rows match, honouring `limit` and `offset` as a count of the
    /// query's rows would.
    pub async fn count(self) -> Result<u64> {
        let (limit, offset) = (self.limit, self.offset.unwrap_or(0));
        let table = M::TABLE.name;
        let statement = SelectStatement {
            projection: vec![Expr::CountStar],
            from: table,
            filter: Self::where_clause(self.filters),
            ..SelectStatement::default()
        };
        let rows = self.session.fetch_rows(statement).await?;
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
