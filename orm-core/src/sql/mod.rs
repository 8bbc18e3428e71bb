//! The SQL AST and the dialect that renders it.
//!
//! Statements are plain data ([`ast`]). Two walks turn one into SQL: one
//! collects its bound values and its shape ([`Statement::collect`]), the
//! other, by a [`Dialect`], writes the text with numbered placeholders. They
//! visit values in the same order, which the tests pin down; because the
//! text depends only on the shape, [`SqlCache`] writes it once per shape.
//! Identifiers are quoted in exactly one place, [`Dialect::quote_identifier`];
//! values only ever become placeholders.

pub mod ast;
mod shape;

use std::fmt::Write;

pub use ast::*;
pub(crate) use shape::{BoundSql, CachedSql, LoadSizes, DEFAULT_CAPACITY};
pub use shape::{Rendered, Shape, SqlCache};

use crate::types::Param;

/// Rendered SQL and the values for its placeholders, in order.
#[derive(Default)]
pub struct SqlWriter {
    /// The statement's text.
    pub sql: String,
    /// The bound values, `$1` first, when rendered by [`Statement::render`].
    pub params: Vec<Param>,
    /// Placeholders written so far.
    placeholders: usize,
}

impl std::fmt::Debug for SqlWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqlWriter")
            .field("sql", &self.sql)
            .field("params", &self.params.len())
            .finish()
    }
}

/// Renders AST nodes into SQL. Each `prepare_*` method has a default written
/// in standard SQL; a dialect overrides only what it spells differently.
///
/// An override must write placeholders in the order the default does: the
/// bound values are collected separately, in that order.
pub trait Dialect: Send + Sync {
    /// Writes a quoted identifier, doubling embedded quotes.
    fn quote_identifier(&self, out: &mut String, ident: &str) {
        out.push('"');
        if ident.contains('"') {
            out.push_str(&ident.replace('"', "\"\""));
        } else {
            out.push_str(ident);
        }
        out.push('"');
    }

    /// Writes the placeholder for the `index`-th (1-based) parameter.
    fn placeholder(&self, out: &mut String, index: usize);

    /// Writes the next placeholder. The values themselves are collected
    /// separately, in the same order (see [`Statement::collect`]).
    fn prepare_param(&self, w: &mut SqlWriter) {
        w.placeholders += 1;
        self.placeholder(&mut w.sql, w.placeholders);
    }

    /// Writes a comma-separated list of placeholders, each cast to its type.
    fn prepare_typed_params(&self, w: &mut SqlWriter, types: &mut dyn Iterator<Item = &str>) {
        for (i, value_type) in types.enumerate() {
            if i > 0 {
                w.sql.push_str(", ");
            }
            self.prepare_param(w);
            w.sql.push_str("::");
            w.sql.push_str(value_type);
        }
    }

    /// Writes `"table"."column"`.
    fn prepare_column(&self, out: &mut String, table: &str, column: &str) {
        self.quote_identifier(out, table);
        out.push('.');
        self.quote_identifier(out, column);
    }

    /// Writes a comma-separated list of quoted identifiers.
    fn prepare_identifier_list(&self, out: &mut String, idents: &[&str]) {
        for (i, ident) in idents.iter().enumerate() {
            if i > 0 {
                out.push_str(", ");
            }
            self.quote_identifier(out, ident);
        }
    }

    /// Renders an expression.
    fn prepare_expr(&self, w: &mut SqlWriter, expr: &Expr) {
        match expr {
            Expr::Column(column) => self.prepare_column(&mut w.sql, column.table, column.column),
            Expr::AllColumns(table) => {
                for (i, column) in table.columns.iter().enumerate() {
                    if i > 0 {
                        w.sql.push_str(", ");
                    }
                    self.prepare_column(&mut w.sql, table.name, column.name);
                }
            }
            Expr::Param(_) => self.prepare_param(w),
            Expr::Binary(left, op, right) => {
                self.prepare_expr(w, left);
                w.sql.push_str(match op {
                    BinaryOp::Eq => " = ",
                    BinaryOp::Ne => " <> ",
                    BinaryOp::Lt => " < ",
                    BinaryOp::Le => " <= ",
                    BinaryOp::Gt => " > ",
                    BinaryOp::Ge => " >= ",
                    BinaryOp::Like => " LIKE ",
                    BinaryOp::ILike => " ILIKE ",
                });
                self.prepare_expr(w, right);
            }
            Expr::And(terms) => self.prepare_junction(w, terms, " AND ", "TRUE"),
            Expr::Or(terms) => self.prepare_junction(w, terms, " OR ", "FALSE"),
            Expr::Not(inner) => {
                w.sql.push_str("NOT (");
                self.prepare_expr(w, inner);
                w.sql.push(')');
            }
            Expr::IsNull(inner) => {
                self.prepare_expr(w, inner);
                w.sql.push_str(" IS NULL");
            }
            Expr::IsNotNull(inner) => {
                self.prepare_expr(w, inner);
                w.sql.push_str(" IS NOT NULL");
            }
            Expr::EqualsAny(inner, _) => {
                self.prepare_expr(w, inner);
                w.sql.push_str(" = ANY(");
                self.prepare_param(w);
                w.sql.push(')');
            }
            Expr::CountStar => w.sql.push_str("count(*)"),
        }
    }

    /// Renders ` WHERE condition` when there is one.
    fn prepare_where(&self, w: &mut SqlWriter, filter: Option<&Expr>) {
        if let Some(filter) = filter {
            w.sql.push_str(" WHERE ");
            self.prepare_expr(w, filter);
        }
    }

    /// Renders `(a AND b)` or `(a OR b)`.
    fn prepare_junction(&self, w: &mut SqlWriter, terms: &[Expr], separator: &str, empty: &str) {
        if terms.is_empty() {
            w.sql.push_str(empty);
            return;
        }
        let parenthesize = terms.len() > 1;
        if parenthesize {
            w.sql.push('(');
        }
        for (i, term) in terms.iter().enumerate() {
            if i > 0 {
                w.sql.push_str(separator);
            }
            self.prepare_expr(w, term);
        }
        if parenthesize {
            w.sql.push(')');
        }
    }

    /// Renders a `SELECT`.
    fn prepare_select(&self, w: &mut SqlWriter, stmt: &SelectStatement) {
        w.sql.push_str("SELECT ");
        for (i, expr) in stmt.projection.iter().enumerate() {
            if i > 0 {
                w.sql.push_str(", ");
            }
            self.prepare_expr(w, expr);
        }
        w.sql.push_str(" FROM ");
        self.quote_identifier(&mut w.sql, stmt.from);
        for join in &stmt.joins {
            w.sql.push_str(match join.kind {
                JoinKind::Inner => " JOIN ",
                JoinKind::Left => " LEFT JOIN ",
            });
            self.quote_identifier(&mut w.sql, join.table);
            w.sql.push_str(" ON ");
            self.prepare_expr(w, &join.on);
        }
        self.prepare_where(w, stmt.filter.as_ref());
        for (i, order) in stmt.order_by.iter().enumerate() {
            w.sql.push_str(if i == 0 { " ORDER BY " } else { ", " });
            self.prepare_expr(w, &order.expr);
            w.sql.push_str(if order.descending { " DESC" } else { " ASC" });
        }
        if let Some(limit) = &stmt.limit {
            w.sql.push_str(" LIMIT ");
            self.prepare_expr(w, limit);
        }
        if let Some(offset) = &stmt.offset {
            w.sql.push_str(" OFFSET ");
            self.prepare_expr(w, offset);
        }
    }

    /// Renders `unnest(...) [WITH ORDINALITY] AS alias(columns)`.
    fn prepare_unnest(&self, w: &mut SqlWriter, source: &UnnestSource) {
        w.sql.push_str("unnest(");
        self.prepare_typed_params(w, &mut source.arrays.iter().map(|(_, array_type)| *array_type));
        w.sql.push(')');
        if source.ordinality.is_some() {
            w.sql.push_str(" WITH ORDINALITY");
        }
        w.sql.push_str(" AS ");
        self.quote_identifier(&mut w.sql, source.alias);
        w.sql.push('(');
        self.prepare_identifier_list(&mut w.sql, &source.columns);
        if let Some(ordinality) = source.ordinality {
            w.sql.push_str(", ");
            self.quote_identifier(&mut w.sql, ordinality);
        }
        w.sql.push(')');
    }

    /// Renders an `INSERT`.
    fn prepare_insert(&self, w: &mut SqlWriter, stmt: &InsertStatement) {
        w.sql.push_str("INSERT INTO ");
        self.quote_identifier(&mut w.sql, stmt.table);
        match &stmt.source {
            InsertSource::DefaultValues => w.sql.push_str(" DEFAULT VALUES"),
            InsertSource::Values(values) => {
                w.sql.push_str(" (");
                self.prepare_identifier_list(&mut w.sql, &stmt.columns);
                w.sql.push_str(") VALUES (");
                self.prepare_typed_params(w, &mut values.iter().map(|(_, value_type)| *value_type));
                w.sql.push(')');
            }
            InsertSource::Unnest(source) => {
                w.sql.push_str(" (");
                self.prepare_identifier_list(&mut w.sql, &stmt.columns);
                w.sql.push_str(") SELECT ");
                let alias = source.alias;
                for (i, column) in source.columns.iter().enumerate() {
                    if i > 0 {
                        w.sql.push_str(", ");
                    }
                    self.prepare_column(&mut w.sql, alias, column);
                }
                let ordinality = source.ordinality;
                w.sql.push_str(" FROM ");
                self.prepare_unnest(w, source);
                if let Some(ordinality) = ordinality {
                    // Rows reach the table in this order, so identity values
                    // are assigned in the order the objects were added.
                    w.sql.push_str(" ORDER BY ");
                    self.prepare_column(&mut w.sql, alias, ordinality);
                }
            }
        }
        self.prepare_returning(w, &stmt.returning);
    }

    /// Renders `RETURNING columns` when there are any.
    fn prepare_returning(&self, w: &mut SqlWriter, columns: &[&'static str]) {
        if !columns.is_empty() {
            w.sql.push_str(" RETURNING ");
            self.prepare_identifier_list(&mut w.sql, columns);
        }
    }

    /// Renders an `UPDATE`.
    fn prepare_update(&self, w: &mut SqlWriter, stmt: &UpdateStatement) {
        w.sql.push_str("UPDATE ");
        self.quote_identifier(&mut w.sql, stmt.table);
        w.sql.push_str(" SET ");
        for (i, (column, value)) in stmt.assignments.iter().enumerate() {
            if i > 0 {
                w.sql.push_str(", ");
            }
            self.quote_identifier(&mut w.sql, column);
            w.sql.push_str(" = ");
            self.prepare_expr(w, value);
        }
        if let Some(from) = &stmt.from {
            w.sql.push_str(" FROM ");
            self.prepare_unnest(w, from);
        }
        self.prepare_where(w, stmt.filter.as_ref());
    }

    /// Renders a binary `COPY ... FROM STDIN`.
    fn prepare_copy_in(&self, out: &mut String, stmt: &CopyInStatement) {
        out.push_str("COPY ");
        self.quote_identifier(out, stmt.table);
        out.push_str(" (");
        self.prepare_identifier_list(out, &stmt.columns);
        out.push_str(") FROM STDIN (FORMAT binary)");
    }

    /// Renders the reservation of identity values: PostgreSQL's form, which
    /// reads the column's sequence once and calls `nextval` once per value.
    fn prepare_reserve_keys(&self, w: &mut SqlWriter, _stmt: &ReserveKeysStatement) {
        // The sequence is looked up once, in a subquery that OFFSET 0 keeps
        // the planner from inlining into every row (which made it several
        // times slower). A sequence the role may not take values from gives
        // NULL, and no value is taken. One array rather than a row per key:
        // far less to decode. generate_series in the select list streams its
        // rows; in FROM it would collect them all first.
        w.sql.push_str(
            "SELECT CASE WHEN has_sequence_privilege(\"q\".\"seq\", 'USAGE, UPDATE') \
             THEN ARRAY(SELECT nextval(\"q\".\"seq\") FROM (SELECT generate_series(1, \"q\".\"n\")) AS \"g\") END \
             FROM (SELECT pg_get_serial_sequence(",
        );
        self.prepare_param(w);
        w.sql.push_str(", ");
        self.prepare_param(w);
        w.sql.push_str(")::regclass AS \"seq\", ");
        self.prepare_param(w);
        w.sql.push_str("::bigint AS \"n\" OFFSET 0) AS \"q\"");
    }

    /// Renders a `DELETE`.
    fn prepare_delete(&self, w: &mut SqlWriter, stmt: &DeleteStatement) {
        w.sql.push_str("DELETE FROM ");
        self.quote_identifier(&mut w.sql, stmt.table);
        if let Some(using) = &stmt.using {
            w.sql.push_str(" USING ");
            self.prepare_unnest(w, using);
        }
        self.prepare_where(w, stmt.filter.as_ref());
    }

    /// Renders a column type.
    fn prepare_sql_type(&self, out: &mut String, sql_type: SqlType) {
        match sql_type {
            SqlType::Named(name) => out.push_str(name),
            SqlType::Varchar(length) => {
                let _ = write!(out, "varchar({length})");
            }
        }
    }

    /// Renders an identity column's clause.
    fn prepare_identity(&self, out: &mut String) {
        out.push_str(" GENERATED BY DEFAULT AS IDENTITY");
    }

    /// Renders `CREATE TABLE`.
    fn prepare_create_table(&self, out: &mut String, stmt: &CreateTableStatement) {
        out.push_str("CREATE TABLE ");
        if stmt.if_not_exists {
            out.push_str("IF NOT EXISTS ");
        }
        self.quote_identifier(out, stmt.name);
        out.push_str(" (");
        let mut first = true;
        for column in &stmt.columns {
            out.push_str(if first { "\n    " } else { ",\n    " });
            first = false;
            self.quote_identifier(out, column.name);
            out.push(' ');
            self.prepare_sql_type(out, column.sql_type);
            if column.identity {
                self.prepare_identity(out);
            }
            if let Some(default) = column.default {
                out.push_str(" DEFAULT ");
                out.push_str(default);
            }
            if column.not_null {
                out.push_str(" NOT NULL");
            }
        }
        for constraint in &stmt.constraints {
            out.push_str(",\n    ");
            self.prepare_table_constraint(out, constraint);
        }
        out.push_str("\n)");
    }

    /// Renders one table constraint.
    fn prepare_table_constraint(&self, out: &mut String, constraint: &TableConstraint) {
        out.push_str("CONSTRAINT ");
        match constraint {
            TableConstraint::PrimaryKey { name, columns } => {
                self.quote_identifier(out, name);
                out.push_str(" PRIMARY KEY (");
                self.prepare_identifier_list(out, columns);
                out.push(')');
            }
            TableConstraint::Unique { name, columns } => {
                self.quote_identifier(out, name);
                out.push_str(" UNIQUE (");
                self.prepare_identifier_list(out, columns);
                out.push(')');
            }
            TableConstraint::Check { name, expression } => {
                self.quote_identifier(out, name);
                out.push_str(" CHECK (");
                out.push_str(expression);
                out.push(')');
            }
            TableConstraint::ForeignKey {
                name,
                columns,
                references,
                referenced_columns,
                on_delete,
            } => {
                self.quote_identifier(out, name);
                out.push_str(" FOREIGN KEY (");
                self.prepare_identifier_list(out, columns);
                out.push_str(") REFERENCES ");
                self.quote_identifier(out, references);
                out.push_str(" (");
                self.prepare_identifier_list(out, referenced_columns);
                out.push(')');
                out.push_str(match on_delete {
                    ReferentialAction::NoAction => "",
                    ReferentialAction::Restrict => " ON DELETE RESTRICT",
                    ReferentialAction::Cascade => " ON DELETE CASCADE",
                    ReferentialAction::SetNull => " ON DELETE SET NULL",
                    ReferentialAction::SetDefault => " ON DELETE SET DEFAULT",
                });
            }
        }
    }

    /// Renders `CREATE INDEX`.
    fn prepare_create_index(&self, out: &mut String, stmt: &CreateIndexStatement) {
        out.push_str(if stmt.unique {
            "CREATE UNIQUE INDEX "
        } else {
            "CREATE INDEX "
        });
        if stmt.if_not_exists {
            out.push_str("IF NOT EXISTS ");
        }
        self.quote_identifier(out, &stmt.name);
        out.push_str(" ON ");
        self.quote_identifier(out, stmt.table);
        out.push_str(" (");
        self.prepare_identifier_list(out, &stmt.columns);
        out.push(')');
    }

    /// Renders `DROP TABLE`.
    fn prepare_drop_table(&self, out: &mut String, stmt: &DropTableStatement) {
        out.push_str("DROP TABLE ");
        if stmt.if_exists {
            out.push_str("IF EXISTS ");
        }
        self.quote_identifier(out, stmt.name);
    }
}

/// PostgreSQL: `$n` placeholders, identity columns, `unnest` for batches.
#[derive(Debug, Clone, Copy, Default)]
pub struct PgDialect;

impl Dialect for PgDialect {
    fn placeholder(&self, out: &mut String, index: usize) {
        let _ = write!(out, "${index}");
    }
}

/// A statement the session can run: it renders into SQL plus binds.
pub trait Statement {
    /// Appends the statement's shape (everything its text depends on) to
    /// `shape`, and moves its bound values into `params` in placeholder order.
    /// Called once per statement, by [`render`](Statement::render) or
    /// [`SqlCache::render`]: the values are gone afterwards.
    #[doc(hidden)]
    fn collect(&mut self, shape: &mut Shape, params: &mut Vec<Param>);

    /// Writes the statement's text, numbering placeholders in the order
    /// [`collect`](Statement::collect) gathers their values.
    #[doc(hidden)]
    fn write_sql(&self, dialect: &dyn Dialect, w: &mut SqlWriter);

    /// Renders with `dialect`: the text and the binds.
    fn render(mut self, dialect: &dyn Dialect) -> SqlWriter
    where
        Self: Sized,
    {
        let mut w = SqlWriter::default();
        self.collect(&mut Shape::default(), &mut w.params);
        self.write_sql(dialect, &mut w);
        w
    }

    /// Renders through `cache`: the text is rendered once per shape.
    fn cached(self, cache: &SqlCache) -> Rendered
    where
        Self: Sized,
    {
        cache.render(self)
    }
}

macro_rules! renderable {
    ($($stmt:ty => $method:ident, $collect:ident),*) => {$(
        impl Statement for $stmt {
            fn collect(&mut self, shape: &mut Shape, params: &mut Vec<Param>) {
                shape::$collect(self, shape, params);
            }

            fn write_sql(&self, dialect: &dyn Dialect, w: &mut SqlWriter) {
                dialect.$method(w, self);
            }
        }
    )*};
}

renderable!(
    SelectStatement => prepare_select, collect_select,
    InsertStatement => prepare_insert, collect_insert,
    UpdateStatement => prepare_update, collect_update,
    DeleteStatement => prepare_delete, collect_delete,
    ReserveKeysStatement => prepare_reserve_keys, collect_reserve_keys
);

#[cfg(test)]
mod tests {
    use super::*;

    fn col(table: &'static str, column: &'static str) -> Expr {
        Expr::Column(ColumnRef { table, column })
    }

    fn param<T: tokio_postgres::types::ToSql + Send + Sync + 'static>(value: T) -> Expr {
        Expr::Param(ParamValue::new(Box::new(value)))
    }

    #[test]
    fn identifiers_are_quoted_and_escaped() {
        let mut out = String::new();
        PgDialect.quote_identifier(&mut out, r#"we"ird"#);
        assert_eq!(out, r#""we""ird""#);
    }

    #[test]
    fn select_renders_binds_in_order() {
        let stmt = SelectStatement {
            projection: vec![col("users", "id"), col("users", "name")],
            from: "users",
            joins: Vec::new(),
            filter: Some(Expr::And(vec![
                Expr::Binary(
                    Box::new(col("users", "name")),
                    BinaryOp::Eq,
                    Box::new(param("sandy".to_owned())),
                ),
                Expr::Or(vec![
                    Expr::IsNull(Box::new(col("users", "email"))),
                    Expr::Binary(Box::new(col("users", "id")), BinaryOp::Gt, Box::new(param(3i64))),
                ]),
            ])),
            order_by: vec![OrderExpr {
                expr: col("users", "id"),
                descending: true,
            }],
            limit: Some(param(10i64)),
            offset: Some(param(5i64)),
        };
        let out = stmt.render(&PgDialect);
        assert_eq!(
            out.sql,
            r#"SELECT "users"."id", "users"."name" FROM "users" WHERE ("users"."name" = $1 AND ("users"."email" IS NULL OR "users"."id" > $2)) ORDER BY "users"."id" DESC LIMIT $3 OFFSET $4"#
        );
        assert_eq!(out.params.len(), 4);
    }

    #[test]
    fn joins_render_in_order_with_their_conditions() {
        let on = |left, right| Expr::Binary(Box::new(left), BinaryOp::Eq, Box::new(right));
        let stmt = SelectStatement {
            projection: vec![col("users", "id"), col("posts", "id")],
            from: "users",
            joins: vec![
                JoinClause {
                    kind: JoinKind::Inner,
                    table: "posts",
                    on: on(col("posts", "user_id"), col("users", "id")),
                },
                JoinClause {
                    kind: JoinKind::Left,
                    table: "tags",
                    on: on(col("tags", "post_id"), col("posts", "id")),
                },
            ],
            filter: Some(on(col("posts", "title"), param("x".to_owned()))),
            ..SelectStatement::default()
        };
        assert_eq!(
            stmt.render(&PgDialect).sql,
            r#"SELECT "users"."id", "posts"."id" FROM "users" JOIN "posts" ON "posts"."user_id" = "users"."id" LEFT JOIN "tags" ON "tags"."post_id" = "posts"."id" WHERE "posts"."title" = $1"#
        );
    }

    #[test]
    fn insert_from_unnest_keeps_order() {
        let stmt = InsertStatement {
            table: "users",
            columns: vec!["name", "email"],
            source: InsertSource::Unnest(UnnestSource {
                alias: "v",
                arrays: vec![
                    (ParamValue::new(Box::new(vec!["a".to_owned()])), "text[]"),
                    (ParamValue::new(Box::new(vec![Some("b".to_owned())])), "text[]"),
                ],
                columns: vec!["name", "email"],
                ordinality: Some("ord"),
            }),
            returning: vec!["id"],
        };
        assert_eq!(
            stmt.render(&PgDialect).sql,
            r#"INSERT INTO "users" ("name", "email") SELECT "v"."name", "v"."email" FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS "v"("name", "email", "ord") ORDER BY "v"."ord" RETURNING "id""#
        );
    }

    #[test]
    fn update_and_delete_join_unnest() {
        let update = UpdateStatement {
            table: "users",
            assignments: vec![("name", col("v", "name"))],
            from: Some(UnnestSource {
                alias: "v",
                arrays: vec![
                    (ParamValue::new(Box::new(vec![1i64])), "int8[]"),
                    (ParamValue::new(Box::new(vec!["x".to_owned()])), "text[]"),
                ],
                columns: vec!["id", "name"],
                ordinality: None,
            }),
            filter: Some(Expr::Binary(
                Box::new(col("users", "id")),
                BinaryOp::Eq,
                Box::new(col("v", "id")),
            )),
        };
        assert_eq!(
            update.render(&PgDialect).sql,
            r#"UPDATE "users" SET "name" = "v"."name" FROM unnest($1::int8[], $2::text[]) AS "v"("id", "name") WHERE "users"."id" = "v"."id""#
        );
        let delete = DeleteStatement {
            table: "users",
            using: Some(UnnestSource {
                alias: "v",
                arrays: vec![(ParamValue::new(Box::new(vec![1i64])), "int8[]")],
                columns: vec!["id"],
                ordinality: None,
            }),
            filter: Some(Expr::Binary(
                Box::new(col("users", "id")),
                BinaryOp::Eq,
                Box::new(col("v", "id")),
            )),
        };
        assert_eq!(
            delete.render(&PgDialect).sql,
            r#"DELETE FROM "users" USING unnest($1::int8[]) AS "v"("id") WHERE "users"."id" = "v"."id""#
        );
    }

    /// A select with values in every place one can go, built fresh each call.
    fn busy_select(name: &str, low: i64, high: i64, ids: Vec<i64>, limit: i64) -> SelectStatement {
        let cmp = |left, op, right| Expr::Binary(Box::new(left), op, Box::new(right));
        SelectStatement {
            projection: vec![col("users", "id"), col("users", "name")],
            from: "users",
            joins: vec![JoinClause {
                kind: JoinKind::Left,
                table: "posts",
                on: cmp(col("posts", "user_id"), BinaryOp::Eq, col("users", "id")),
            }],
            filter: Some(Expr::And(vec![
                cmp(col("users", "name"), BinaryOp::Like, param(name.to_owned())),
                Expr::Or(vec![
                    cmp(col("users", "id"), BinaryOp::Lt, param(low)),
                    Expr::Not(Box::new(cmp(col("users", "id"), BinaryOp::Le, param(high)))),
                ]),
                Expr::EqualsAny(Box::new(col("posts", "id")), ParamValue::new(Box::new(ids))),
            ])),
            order_by: vec![OrderExpr {
                expr: col("users", "name"),
                descending: false,
            }],
            limit: Some(param(limit)),
            offset: None,
        }
    }

    fn debug_params(params: &[Param]) -> Vec<String> {
        params.iter().map(|p| format!("{p:?}")).collect()
    }

    #[test]
    fn the_cache_renders_each_shape_once_and_binds_values_in_placeholder_order() {
        let cache = SqlCache::default();
        let first = cache.render(busy_select("s%", 1, 9, vec![4, 5], 10));
        assert_eq!(
            &*first.sql,
            r#"SELECT "users"."id", "users"."name" FROM "users" LEFT JOIN "posts" ON "posts"."user_id" = "users"."id" WHERE ("users"."name" LIKE $1 AND ("users"."id" < $2 OR NOT ("users"."id" <= $3)) AND "posts"."id" = ANY($4)) ORDER BY "users"."name" ASC LIMIT $5"#
        );
        assert_eq!(debug_params(&first.params), [r#""s%""#, "1", "9", "[4, 5]", "10"]);

        // Other values, same shape: the same text, not rendered again.
        let second = cache.render(busy_select("p%", 2, 8, vec![6], 20));
        assert!(std::sync::Arc::ptr_eq(&first.sql, &second.sql));
        assert_eq!(debug_params(&second.params), [r#""p%""#, "2", "8", "[6]", "20"]);
        assert_eq!(cache.len(), 1);

        // The uncached path agrees with the cached one.
        let plain = busy_select("p%", 2, 8, vec![6], 20).render(&PgDialect);
        assert_eq!(plain.sql, &*second.sql);
        assert_eq!(debug_params(&plain.params), debug_params(&second.params));
    }

    #[test]
    fn statements_that_differ_in_anything_but_values_are_different_shapes() {
        let cache = SqlCache::default();
        let mut texts = std::collections::HashSet::new();
        let variants: Vec<SelectStatement> = vec![
            busy_select("a", 1, 2, vec![], 3),
            SelectStatement {
                offset: Some(param(1i64)),
                ..busy_select("a", 1, 2, vec![], 3)
            },
            SelectStatement {
                order_by: vec![OrderExpr {
                    expr: col("users", "name"),
                    descending: true,
                }],
                ..busy_select("a", 1, 2, vec![], 3)
            },
            SelectStatement {
                joins: Vec::new(),
                ..busy_select("a", 1, 2, vec![], 3)
            },
            SelectStatement {
                projection: vec![col("users", "id")],
                ..busy_select("a", 1, 2, vec![], 3)
            },
            SelectStatement {
                filter: Some(Expr::IsNull(Box::new(col("users", "name")))),
                ..busy_select("a", 1, 2, vec![], 3)
            },
            SelectStatement {
                filter: Some(Expr::IsNotNull(Box::new(col("users", "name")))),
                ..busy_select("a", 1, 2, vec![], 3)
            },
        ];
        let count = variants.len();
        for variant in variants {
            texts.insert(cache.render(variant).sql.to_string());
        }
        assert_eq!(texts.len(), count);
        assert_eq!(cache.len(), count);
    }

    const fn column(name: &'static str) -> crate::model::ColumnDef {
        crate::model::ColumnDef {
            name,
            field: name,
            sql_type: "bigint",
            array_type: "int8[]",
            nullable: false,
            primary_key: false,
            identity: false,
            unique: false,
            index: false,
            default: None,
            length: None,
            foreign_key: None,
            check: None,
        }
    }

    static USERS: crate::model::TableDef = crate::model::TableDef {
        name: "users",
        model: "User",
        columns: &[column("id"), column("name")],
        primary_key: &[0],
    };

    static POSTS: crate::model::TableDef = crate::model::TableDef {
        name: "posts",
        model: "Post",
        columns: &[column("id"), column("user_id"), column("title")],
        primary_key: &[0],
    };

    fn select_all_of(tables: &[&'static crate::model::TableDef]) -> SelectStatement {
        SelectStatement {
            projection: tables.iter().map(|&table| Expr::AllColumns(table)).collect(),
            from: tables[0].name,
            ..SelectStatement::default()
        }
    }

    #[test]
    fn all_columns_of_a_model_render_in_its_order_and_name_its_own_shape() {
        let cache = SqlCache::default();
        let users = cache.render(select_all_of(&[&USERS]));
        assert_eq!(&*users.sql, r#"SELECT "users"."id", "users"."name" FROM "users""#);
        let both = cache.render(select_all_of(&[&USERS, &POSTS]));
        assert_eq!(
            &*both.sql,
            r#"SELECT "users"."id", "users"."name", "posts"."id", "posts"."user_id", "posts"."title" FROM "users""#
        );
        let again = cache.render(select_all_of(&[&USERS]));
        assert!(std::sync::Arc::ptr_eq(&users.sql, &again.sql));
        assert_eq!(cache.len(), 2);
        // The same text as naming every column, which is a shape of its own.
        let spelled = cache.render(SelectStatement {
            projection: vec![col("users", "id"), col("users", "name")],
            ..select_all_of(&[&USERS])
        });
        assert_eq!(spelled.sql, users.sql);
        assert_eq!(cache.len(), 3);
    }

    /// Shapes built in a loop: an AND of n terms is a new shape for each n.
    fn and_of(n: usize) -> SelectStatement {
        SelectStatement {
            projection: vec![col("users", "id")],
            from: "users",
            filter: Some(Expr::And(
                (0..n)
                    .map(|i| Expr::Binary(Box::new(col("users", "id")), BinaryOp::Ne, Box::new(param(i as i64))))
                    .collect(),
            )),
            ..SelectStatement::default()
        }
    }

    #[test]
    fn texts_rendered_at_once_on_several_threads_get_distinct_dense_numbers() {
        let cache = SqlCache::default();
        // Shapes 1..=40, each rendered by four threads at once, in
        // different orders.
        let numbers: Vec<Vec<(usize, u32)>> = std::thread::scope(|scope| {
            let threads: Vec<_> = (0..4)
                .map(|thread| {
                    let cache = &cache;
                    scope.spawn(move || {
                        (1..=40)
                            .map(|i| if thread % 2 == 0 { i } else { 41 - i })
                            .map(|n| (n, cache.render(and_of(n)).slot.expect("kept")))
                            .collect()
                    })
                })
                .collect();
            threads.into_iter().map(|thread| thread.join().unwrap()).collect()
        });
        let mut by_shape = std::collections::BTreeMap::new();
        for (n, slot) in numbers.into_iter().flatten() {
            assert_eq!(*by_shape.entry(n).or_insert(slot), slot, "shape {n} got two numbers");
        }
        let mut slots: Vec<u32> = by_shape.into_values().collect();
        slots.sort_unstable();
        assert_eq!(slots, (0..40).collect::<Vec<u32>>());
    }

    #[test]
    fn beyond_its_capacity_the_cache_still_renders_but_stops_growing() {
        let cache = SqlCache::with_capacity(8);
        for n in 1..=18 {
            let rendered = cache.render(and_of(n));
            assert_eq!(rendered.params.len(), n);
            assert!(rendered.sql.ends_with(&format!("<> ${n})")) || n == 1, "{n}");
            // Connections find their prepared statements by these numbers:
            // one per cached text, dense, and none for texts not kept.
            let expected_slot = (n <= 8).then(|| n as u32 - 1);
            assert_eq!(rendered.slot, expected_slot, "{n}");
        }
        assert_eq!(cache.len(), 8);
        assert_eq!(cache.render(and_of(18)).params.len(), 18);
        let again = cache.render(and_of(3));
        assert_eq!((again.params.len(), again.slot), (3, Some(2)));

        // A cache that keeps nothing renders every statement, each time.
        let none = SqlCache::with_capacity(0);
        for _ in 0..2 {
            let rendered = none.render(and_of(2));
            assert_eq!((rendered.params.len(), rendered.slot), (2, None));
            assert!(rendered.sql.ends_with("<> $2)"), "{}", rendered.sql);
        }
        assert!(none.is_empty());
    }

    /// Each cached text keeps the object counts of its last load, one per
    /// side, apart from every other text's; a text the cache does not keep
    /// has none.
    #[test]
    fn each_cached_text_remembers_its_last_load_sizes() {
        let cache = SqlCache::with_capacity(4);
        let slots: Vec<Option<u32>> = (1..=5).map(|n| cache.render(and_of(n)).slot).collect();
        assert_eq!(slots, [Some(0), Some(1), Some(2), Some(3), None]);
        for (n, &slot) in slots.iter().enumerate() {
            assert_eq!((cache.load_sizes(slot).get(0), cache.load_sizes(slot).get(1)), (0, 0));
            cache.load_sizes(slot).set(0, 100 + n);
            cache.load_sizes(slot).set(1, 200 + n);
        }
        for (n, &slot) in slots.iter().enumerate().take(4) {
            let sizes = cache.load_sizes(slot);
            assert_eq!((sizes.get(0), sizes.get(1)), (100 + n, 200 + n), "text {n}");
        }
        // Not kept, so nothing remembered: the next load makes no room ahead.
        assert_eq!(cache.load_sizes(None).get(0), 0);
        // The next load's count replaces the last one; a count beyond u32
        // is remembered as the largest u32.
        cache.load_sizes(Some(2)).set(1, 7);
        assert_eq!(cache.load_sizes(Some(2)).get(1), 7);
        cache.load_sizes(Some(3)).set(0, usize::MAX);
        assert_eq!(cache.load_sizes(Some(3)).get(0), u32::MAX as usize);
    }
}
