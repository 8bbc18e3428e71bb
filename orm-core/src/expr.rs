//! Typed column handles and the conditions built from them.
//!
//! `#[derive(Model)]` gives every model one associated constant per column,
//! named like the field: `User::name` is a `Column<User, String>`.
//! Comparisons take only values of the column's type, so
//! `User::id.eq("sandy")` is a compile error, and a condition on `User`
//! can only filter a query of `User`.

use std::marker::PhantomData;
use std::ops::{BitAnd, BitOr, Not};

use crate::model::Model;
use crate::sql::{BinaryOp, ColumnRef, Expr, OrderExpr, ParamValue};
use crate::types::{ColumnType, IntoValue, TextColumnType};

/// A column of model `M` whose Rust type is `T`.
pub struct Column<M, T> {
    /// Position in `M::TABLE.columns`.
    pub position: usize,
    /// The column's name in the database.
    pub name: &'static str,
    _marker: PhantomData<fn() -> (M, T)>,
}

impl<M, T> Column<M, T> {
    /// Used by `#[derive(Model)]`.
    #[doc(hidden)]
    pub const fn new(position: usize, name: &'static str) -> Self {
        Column {
            position,
            name,
            _marker: PhantomData,
        }
    }
}

impl<M, T> Clone for Column<M, T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<M, T> Copy for Column<M, T> {}

impl<M: Model, T> std::fmt::Debug for Column<M, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Column({}.{})", M::TABLE.name, self.name)
    }
}

/// A boolean SQL condition over model `M`, for `filter`.
#[derive(Debug)]
pub struct Condition<M> {
    pub(crate) expr: Expr,
    _marker: PhantomData<fn() -> M>,
}

impl<M> Condition<M> {
    fn new(expr: Expr) -> Self {
        Condition {
            expr,
            _marker: PhantomData,
        }
    }

    /// Both conditions (`AND`).
    pub fn and(self, other: Condition<M>) -> Condition<M> {
        Condition::new(match self.expr {
            Expr::And(mut terms) => {
                terms.push(other.expr);
                Expr::And(terms)
            }
            expr => Expr::And(vec![expr, other.expr]),
        })
    }

    /// Either condition (`OR`).
    pub fn or(self, other: Condition<M>) -> Condition<M> {
        Condition::new(match self.expr {
            Expr::Or(mut terms) => {
                terms.push(other.expr);
                Expr::Or(terms)
            }
            expr => Expr::Or(vec![expr, other.expr]),
        })
    }

    /// The SQL expression.
    pub fn into_expr(self) -> Expr {
        self.expr
    }
}

impl<M> BitAnd for Condition<M> {
    type Output = Condition<M>;
    fn bitand(self, other: Self) -> Self {
        self.and(other)
    }
}

impl<M> BitOr for Condition<M> {
    type Output = Condition<M>;
    fn bitor(self, other: Self) -> Self {
        self.or(other)
    }
}

impl<M> Not for Condition<M> {
    type Output = Condition<M>;
    fn not(self) -> Self {
        Condition::new(Expr::Not(Box::new(self.expr)))
    }
}

/// An `ORDER BY` term over model `M`.
#[derive(Debug)]
pub struct Order<M> {
    pub(crate) term: OrderExpr,
    _marker: PhantomData<fn() -> M>,
}

impl<M: Model, T: ColumnType> From<Column<M, T>> for Order<M> {
    fn from(column: Column<M, T>) -> Self {
        column.asc()
    }
}

impl<M: Model, T: ColumnType> Column<M, T> {
    fn expr(self) -> Expr {
        Expr::Column(ColumnRef {
            table: M::TABLE.name,
            column: self.name,
        })
    }

    fn compare(self, op: BinaryOp, value: impl IntoValue<T>) -> Condition<M> {
        let value = value.into_value();
        // `= NULL` is never true; like SQLAlchemy's `== None`, an equality
        // with NULL means IS NULL.
        if value.is_null() {
            match op {
                BinaryOp::Eq => return self.is_null(),
                BinaryOp::Ne => return self.is_not_null(),
                _ => {}
            }
        }
        Condition::new(Expr::Binary(
            Box::new(self.expr()),
            op,
            Box::new(Expr::Param(ParamValue::new(Box::new(value)))),
        ))
    }

    /// `column = value`; `IS NULL` when the value is `None`.
    pub fn eq(self, value: impl IntoValue<T>) -> Condition<M> {
        self.compare(BinaryOp::Eq, value)
    }

    /// `column <> value`; `IS NOT NULL` when the value is `None`.
    pub fn ne(self, value: impl IntoValue<T>) -> Condition<M> {
        self.compare(BinaryOp::Ne, value)
    }

    /// `column < value`.
    pub fn lt(self, value: impl IntoValue<T>) -> Condition<M> {
        self.compare(BinaryOp::Lt, value)
    }

    /// `column <= value`.
    pub fn le(self, value: impl IntoValue<T>) -> Condition<M> {
        self.compare(BinaryOp::Le, value)
    }

    /// `column > value`.
    pub fn gt(self, value: impl IntoValue<T>) -> Condition<M> {
        self.compare(BinaryOp::Gt, value)
    }

    /// `column >= value`.
    pub fn ge(self, value: impl IntoValue<T>) -> Condition<M> {
        self.compare(BinaryOp::Ge, value)
    }

    /// `column IS NULL`.
    pub fn is_null(self) -> Condition<M> {
        Condition::new(Expr::IsNull(Box::new(self.expr())))
    }

    /// `column IS NOT NULL`.
    pub fn is_not_null(self) -> Condition<M> {
        Condition::new(Expr::IsNotNull(Box::new(self.expr())))
    }

    /// `column = ANY($1)`: the column equals one of `values`, bound as one
    /// array parameter.
    pub fn is_in<V>(self, values: impl IntoIterator<Item = V>) -> Condition<M>
    where
        V: IntoValue<T>,
    {
        // Each value goes through IntoValue for the type check, then is
        // collected as the column's own type so the array binds as `T[]`.
        let list: Vec<T> = values.into_iter().map(|v| v.into_value()).collect();
        Condition::new(Expr::EqualsAny(Box::new(self.expr()), ParamValue::new(Box::new(list))))
    }

    /// Ascending order on this column.
    pub fn asc(self) -> Order<M> {
        Order {
            term: OrderExpr {
                expr: self.expr(),
                descending: false,
            },
            _marker: PhantomData,
        }
    }

    /// Descending order on this column.
    pub fn desc(self) -> Order<M> {
        Order {
            term: OrderExpr {
                expr: self.expr(),
                descending: true,
            },
            _marker: PhantomData,
        }
    }
}

impl<M: Model, T: TextColumnType> Column<M, T> {
    fn pattern(self, op: BinaryOp, pattern: impl IntoValue<String>) -> Condition<M> {
        Condition::new(Expr::Binary(
            Box::new(self.expr()),
            op,
            Box::new(Expr::Param(ParamValue::new(Box::new(pattern.into_value())))),
        ))
    }

    /// `column LIKE pattern` (text columns, nullable or not).
    pub fn like(self, pattern: impl IntoValue<String>) -> Condition<M> {
        self.pattern(BinaryOp::Like, pattern)
    }

    /// `column ILIKE pattern`: case-insensitive `LIKE`.
    pub fn ilike(self, pattern: impl IntoValue<String>) -> Condition<M> {
        self.pattern(BinaryOp::ILike, pattern)
    }
}
