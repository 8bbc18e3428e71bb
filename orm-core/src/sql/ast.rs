//! Statements as plain data. Nothing here knows how SQL is spelled; a
//! [`Dialect`](super::Dialect) writes these nodes as text, and the bound
//! values are moved out of them separately (see [`super::Statement`]).

use crate::types::Param;

/// A scalar or boolean SQL expression.
#[derive(Debug)]
pub enum Expr {
    /// `"table"."column"`.
    Column(ColumnRef),
    /// A bound value, rendered as a placeholder.
    Param(ParamValue),
    /// `left op right`.
    Binary(Box<Expr>, BinaryOp, Box<Expr>),
    /// `(a AND b AND ...)`; an empty list is `TRUE`.
    And(Vec<Expr>),
    /// `(a OR b OR ...)`; an empty list is `FALSE`.
    Or(Vec<Expr>),
    /// `NOT expr`.
    Not(Box<Expr>),
    /// `expr IS NULL`.
    IsNull(Box<Expr>),
    /// `expr IS NOT NULL`.
    IsNotNull(Box<Expr>),
    /// `expr = ANY(array)`: membership in a list bound as one array parameter,
    /// so the statement's text does not depend on the list's length.
    EqualsAny(Box<Expr>, ParamValue),
    /// `count(*)`.
    CountStar,
    /// `"table"."column", ...` for every column of a model's table, in the
    /// model's order: a projection item only. One item, however many
    /// columns, so that building and caching a query of a model does not
    /// walk its columns.
    AllColumns(&'static crate::model::TableDef),
}

/// A bound value. Rendering writes only its placeholder; the value itself
/// is moved out, in placeholder order, when the statement's binds are
/// collected (see [`Statement::collect`](super::Statement::collect)).
pub struct ParamValue(Option<Param>);

impl ParamValue {
    /// Wraps a value to bind.
    pub fn new(param: Param) -> Self {
        ParamValue(Some(param))
    }

    /// Moves the value out. Each statement's binds are collected once.
    pub(crate) fn take(&mut self) -> Param {
        self.0.take().expect("a statement's bound values are collected once")
    }
}

impl std::fmt::Debug for ParamValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Some(param) => write!(f, "{param:?}"),
            None => f.write_str("<collected>"),
        }
    }
}

/// A column, qualified by its table or by an alias.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ColumnRef {
    /// The table name or alias.
    pub table: &'static str,
    /// The column name.
    pub column: &'static str,
}

/// Binary operators.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinaryOp {
    /// `=`
    Eq,
    /// `<>`
    Ne,
    /// `<`
    Lt,
    /// `<=`
    Le,
    /// `>`
    Gt,
    /// `>=`
    Ge,
    /// `LIKE`
    Like,
    /// `ILIKE`
    ILike,
}

/// One `ORDER BY` term.
#[derive(Debug)]
pub struct OrderExpr {
    /// What to sort by.
    pub expr: Expr,
    /// `DESC` instead of `ASC`.
    pub descending: bool,
}

/// `SELECT projection FROM table [JOIN ...] [WHERE] [ORDER BY] [LIMIT] [OFFSET]`.
#[derive(Debug, Default)]
pub struct SelectStatement {
    /// The selected expressions.
    pub projection: Vec<Expr>,
    /// The table.
    pub from: &'static str,
    /// Tables joined to `from`, in order.
    pub joins: Vec<JoinClause>,
    /// The `WHERE` condition.
    pub filter: Option<Expr>,
    /// `ORDER BY` terms.
    pub order_by: Vec<OrderExpr>,
    /// `LIMIT`, bound.
    pub limit: Option<Expr>,
    /// `OFFSET`, bound.
    pub offset: Option<Expr>,
}

/// How a joined table's rows combine with the rows before it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JoinKind {
    /// `JOIN`: only pairs that match.
    Inner,
    /// `LEFT JOIN`: every row on the left, with NULLs where nothing matches.
    Left,
}

/// `[LEFT] JOIN table ON condition`.
#[derive(Debug)]
pub struct JoinClause {
    /// Inner or left outer.
    pub kind: JoinKind,
    /// The joined table.
    pub table: &'static str,
    /// The `ON` condition.
    pub on: Expr,
}

/// `unnest($1::type[], $2::type[], ...) [WITH ORDINALITY] AS alias(columns...)`:
/// many rows bound as one array per column, so one statement carries any
/// number of rows and its text does not depend on how many.
#[derive(Debug)]
pub struct UnnestSource {
    /// The alias the rows are known by.
    pub alias: &'static str,
    /// One array parameter per column, with its PostgreSQL array type.
    pub arrays: Vec<(ParamValue, &'static str)>,
    /// The names of the produced columns, one per array.
    pub columns: Vec<&'static str>,
    /// When set, `WITH ORDINALITY`, the ordinal column named so.
    pub ordinality: Option<&'static str>,
}

/// Where an `INSERT` takes its rows from.
#[derive(Debug)]
pub enum InsertSource {
    /// `DEFAULT VALUES`: one row, every column from its default.
    DefaultValues,
    /// `SELECT alias.columns FROM unnest(...) ... [ORDER BY ordinality]`.
    Unnest(UnnestSource),
    /// `VALUES ($1::type, ...)`: one row, a parameter per column, each cast
    /// to its PostgreSQL type as the arrays of `Unnest` are.
    Values(Vec<(ParamValue, &'static str)>),
}

/// `INSERT INTO table (columns) source [RETURNING ...]`.
#[derive(Debug)]
pub struct InsertStatement {
    /// The table.
    pub table: &'static str,
    /// The inserted columns, in the order of the source's columns.
    pub columns: Vec<&'static str>,
    /// The rows.
    pub source: InsertSource,
    /// Columns to send back.
    pub returning: Vec<&'static str>,
}

/// `UPDATE table SET ... [FROM unnest(...)] [WHERE ...]`.
#[derive(Debug)]
pub struct UpdateStatement {
    /// The table.
    pub table: &'static str,
    /// `column = value` pairs.
    pub assignments: Vec<(&'static str, Expr)>,
    /// Rows to join against, for updating many rows in one statement.
    pub from: Option<UnnestSource>,
    /// The `WHERE` condition.
    pub filter: Option<Expr>,
}

/// `COPY table (columns) FROM STDIN (FORMAT binary)`: rows streamed in
/// PostgreSQL's binary copy format, the fastest way in.
#[derive(Debug, Clone)]
pub struct CopyInStatement {
    /// The table.
    pub table: &'static str,
    /// The columns, in the order each row's fields are sent.
    pub columns: Vec<&'static str>,
}

/// Takes `count` values from the sequence behind an identity column, as one
/// `bigint[]`, so that rows can be sent with their keys (by binary COPY) and
/// the keys still be known. Values taken are never handed out again, used
/// or not.
#[derive(Debug)]
pub struct ReserveKeysStatement {
    /// The table, as the text of its (quoted) identifier: a bound value.
    pub table: ParamValue,
    /// The identity column's name: a bound value.
    pub column: ParamValue,
    /// How many values, as a bound `bigint`.
    pub count: ParamValue,
}

/// `DELETE FROM table [USING unnest(...)] [WHERE ...]`.
#[derive(Debug)]
pub struct DeleteStatement {
    /// The table.
    pub table: &'static str,
    /// Rows to join against, for deleting many rows in one statement.
    pub using: Option<UnnestSource>,
    /// The `WHERE` condition.
    pub filter: Option<Expr>,
}

/// `CREATE TABLE [IF NOT EXISTS] name (columns, constraints)`.
#[derive(Debug, Clone)]
pub struct CreateTableStatement {
    /// The table.
    pub name: &'static str,
    /// Add `IF NOT EXISTS`.
    pub if_not_exists: bool,
    /// The columns.
    pub columns: Vec<ColumnSpec>,
    /// Table constraints.
    pub constraints: Vec<TableConstraint>,
}

/// One column in `CREATE TABLE`.
#[derive(Debug, Clone)]
pub struct ColumnSpec {
    /// The column's name.
    pub name: &'static str,
    /// Its SQL type.
    pub sql_type: SqlType,
    /// `NOT NULL`.
    pub not_null: bool,
    /// `GENERATED BY DEFAULT AS IDENTITY`.
    pub identity: bool,
    /// `DEFAULT expr`, an SQL expression written by the model's author.
    pub default: Option<&'static str>,
}

/// A column type in DDL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SqlType {
    /// A type spelled as is (`bigint`, `text`).
    Named(&'static str),
    /// `varchar(n)`.
    Varchar(u32),
}

/// Constraints in `CREATE TABLE`.
#[derive(Debug, Clone)]
pub enum TableConstraint {
    /// `CONSTRAINT name PRIMARY KEY (columns)`.
    PrimaryKey {
        /// The constraint's name.
        name: String,
        /// The key's columns.
        columns: Vec<&'static str>,
    },
    /// `CONSTRAINT name UNIQUE (columns)`.
    Unique {
        /// The constraint's name.
        name: String,
        /// The columns.
        columns: Vec<&'static str>,
    },
    /// `CONSTRAINT name CHECK (expression)`.
    Check {
        /// The constraint's name.
        name: String,
        /// The boolean SQL expression, written by the model's author.
        expression: &'static str,
    },
    /// `CONSTRAINT name FOREIGN KEY (columns) REFERENCES table (columns) ON DELETE ...`.
    ForeignKey {
        /// The constraint's name.
        name: String,
        /// The referencing columns.
        columns: Vec<&'static str>,
        /// The referenced table.
        references: &'static str,
        /// The referenced columns.
        referenced_columns: Vec<&'static str>,
        /// What happens to this row when the referenced row is deleted.
        on_delete: ReferentialAction,
    },
}

/// `ON DELETE` actions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReferentialAction {
    /// `NO ACTION`, PostgreSQL's default.
    #[default]
    NoAction,
    /// `RESTRICT`.
    Restrict,
    /// `CASCADE`.
    Cascade,
    /// `SET NULL`.
    SetNull,
    /// `SET DEFAULT`.
    SetDefault,
}

/// `CREATE [UNIQUE] INDEX [IF NOT EXISTS] name ON table (columns)`.
#[derive(Debug, Clone)]
pub struct CreateIndexStatement {
    /// The index's name.
    pub name: String,
    /// The table.
    pub table: &'static str,
    /// The columns.
    pub columns: Vec<&'static str>,
    /// `UNIQUE`.
    pub unique: bool,
    /// `IF NOT EXISTS`.
    pub if_not_exists: bool,
}

/// `DROP TABLE [IF EXISTS] name`.
#[derive(Debug, Clone)]
pub struct DropTableStatement {
    /// The table.
    pub name: &'static str,
    /// `IF EXISTS`.
    pub if_exists: bool,
}
