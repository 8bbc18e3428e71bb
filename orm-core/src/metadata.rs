//! The declarative base: which models exist, in which order their tables
//! depend on each other, and the DDL that creates or drops them.

use std::any::TypeId;
use std::collections::{BTreeMap, BTreeSet};

use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::model::TableDef;
use crate::sql::{
    ColumnSpec, CreateIndexStatement, CreateTableStatement, Dialect, DropTableStatement, PgDialect, SqlType,
    TableConstraint,
};

/// A model's registration with a declarative base, submitted by
/// `#[derive(Model)]` at link time.
#[derive(Debug)]
pub struct Registration {
    /// The base's type id.
    pub base: fn() -> TypeId,
    /// The model's table.
    pub table: &'static TableDef,
}

inventory::collect!(Registration);

/// Used by `#[derive(Model)]` to name a base by type.
#[doc(hidden)]
pub fn base_id<B: 'static>() -> TypeId {
    TypeId::of::<B>()
}

/// The tables of one declarative base, parents before children.
#[derive(Debug, Clone)]
pub struct MetaData {
    tables: Vec<&'static TableDef>,
}

impl MetaData {
    /// Collects every model registered with base `B`.
    pub fn for_base<B: 'static>() -> Result<Self> {
        let base = TypeId::of::<B>();
        let tables: Vec<&'static TableDef> = inventory::iter::<Registration>
            .into_iter()
            .filter(|r| (r.base)() == base)
            .map(|r| r.table)
            .collect();
        Self::from_tables(tables)
    }

    /// Orders the given tables so that every table comes after the tables it
    /// references. Fails on two models claiming one table, or on a cycle.
    pub fn from_tables(tables: Vec<&'static TableDef>) -> Result<Self> {
        let mut by_name: BTreeMap<&'static str, &'static TableDef> = BTreeMap::new();
        for table in tables {
            if let Some(previous) = by_name.insert(table.name, table) {
                if !previous.same_as(table) {
                    return Err(Error::Metadata(format!(
                        "models {} and {} both map to table {:?}",
                        previous.model, table.model, table.name
                    )));
                }
            }
        }
        check_relation_names(by_name.values().copied())?;
        let (order, leftover) = dependency_order(&by_name);
        if !leftover.is_empty() {
            return Err(Error::Metadata(format!(
                "foreign keys form a cycle between tables {}; tables that reference each other are not supported yet, remove one of the foreign keys from the models",
                leftover.join(", ")
            )));
        }
        Ok(MetaData {
            tables: order.into_iter().map(|name| by_name[name]).collect(),
        })
    }

    /// The tables, parents before children.
    pub fn tables(&self) -> &[&'static TableDef] {
        &self.tables
    }

    /// The statements `create_all` runs, in order.
    pub fn create_all_sql(&self) -> Vec<String> {
        let dialect = PgDialect;
        let mut statements = Vec::new();
        for table in &self.tables {
            let mut sql = String::new();
            dialect.prepare_create_table(&mut sql, &create_table_statement(table));
            statements.push(sql);
            for index in create_index_statements(table) {
                let mut sql = String::new();
                dialect.prepare_create_index(&mut sql, &index);
                statements.push(sql);
            }
        }
        statements
    }

    /// The statements `drop_all` runs, in order (children first).
    pub fn drop_all_sql(&self) -> Vec<String> {
        self.tables
            .iter()
            .rev()
            .map(|table| {
                let mut sql = String::new();
                PgDialect.prepare_drop_table(
                    &mut sql,
                    &DropTableStatement {
                        name: table.name,
                        if_exists: true,
                    },
                );
                sql
            })
            .collect()
    }

    /// Creates every table and index that does not exist yet, in one
    /// transaction. Running it twice changes nothing the second time.
    pub async fn create_all(&self, engine: &Engine) -> Result<()> {
        engine.run_in_transaction(&self.create_all_sql()).await
    }

    /// Drops every table, children first, in one transaction.
    pub async fn drop_all(&self, engine: &Engine) -> Result<()> {
        engine.run_in_transaction(&self.drop_all_sql()).await
    }
}

/// Kahn's algorithm, ties broken by name so the order is stable. Returns the
/// order and the tables left over because they sit on a cycle. References to
/// tables outside `tables` are ignored (they belong to another base).
fn dependency_order(tables: &BTreeMap<&'static str, &'static TableDef>) -> (Vec<&'static str>, Vec<&'static str>) {
    let mut waiting_on: BTreeMap<&'static str, BTreeSet<&'static str>> = BTreeMap::new();
    for (name, table) in tables {
        let parents = table
            .referenced_tables()
            .filter(|parent| parent != name && tables.contains_key(parent))
            .collect();
        waiting_on.insert(name, parents);
    }
    let mut order = Vec::with_capacity(tables.len());
    loop {
        let ready: Vec<&'static str> = waiting_on
            .iter()
            .filter(|(_, parents)| parents.is_empty())
            .map(|(name, _)| *name)
            .collect();
        if ready.is_empty() {
            break;
        }
        for name in ready {
            waiting_on.remove(name);
            for parents in waiting_on.values_mut() {
                parents.remove(name);
            }
            order.push(name);
        }
    }
    (order, waiting_on.into_keys().collect())
}

/// Orders tables so that every table comes after the tables it references,
/// telling tables apart by model as well as name (so two bases may each have
/// a table of the same name). Tables on a foreign key cycle come last, in the order
/// given. Used by the session to order a flush among the tables it touches.
pub(crate) fn parents_first(tables: &[&'static TableDef]) -> Vec<&'static TableDef> {
    let mut remaining: Vec<&'static TableDef> = tables.to_vec();
    let mut order = Vec::with_capacity(tables.len());
    while !remaining.is_empty() {
        let ready = remaining.iter().position(|table| {
            table.columns.iter().filter_map(|c| c.foreign_key.as_ref()).all(|fk| {
                let parent = (fk.target)();
                parent.same_as(table) || !remaining.iter().any(|other| other.same_as(parent))
            })
        });
        // On a cycle nothing is ready: take the first and go on.
        order.push(remaining.remove(ready.unwrap_or(0)));
    }
    order
}

/// PostgreSQL keeps the first 63 bytes of an identifier (at a character
/// boundary) and drops the rest.
fn as_stored(name: &str) -> &str {
    let mut end = name.len().min(63);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    &name[..end]
}

/// Tables and the indexes `create_all` names (primary keys, unique
/// constraints, plain indexes) share one namespace per schema. Two of the
/// generated names meeting there would make `create_all` fail half-way, or
/// (`IF NOT EXISTS`) skip an index without a word: refuse them up front.
fn check_relation_names(tables: impl Iterator<Item = &'static TableDef>) -> Result<()> {
    let mut seen: BTreeMap<String, String> = BTreeMap::new();
    for table in tables {
        let mut names = vec![
            (table.name.to_owned(), format!("table {:?}", table.name)),
            (
                format!("{}_pkey", table.name),
                format!("the primary key of table {:?}", table.name),
            ),
        ];
        for column in table.columns {
            if column.unique && !(column.primary_key && table.primary_key.len() == 1) {
                names.push((
                    format!("{}_{}_key", table.name, column.name),
                    format!("the unique constraint on {}.{}", table.name, column.name),
                ));
            }
            if column.index && !column.unique {
                names.push((
                    format!("ix_{}_{}", table.name, column.name),
                    format!("the index on {}.{}", table.name, column.name),
                ));
            }
        }
        for (name, what) in names {
            let stored = as_stored(&name).to_owned();
            if let Some(previous) = seen.insert(stored.clone(), what.clone()) {
                return Err(Error::Metadata(format!(
                    "{previous} and {what} would both be named {stored:?} in the database; rename a table or column"
                )));
            }
        }
    }
    Ok(())
}

fn create_table_statement(table: &'static TableDef) -> CreateTableStatement {
    let columns = table
        .columns
        .iter()
        .map(|column| ColumnSpec {
            name: column.name,
            sql_type: match column.length {
                Some(length) => SqlType::Varchar(length),
                None => SqlType::Named(column.sql_type),
            },
            not_null: !column.nullable,
            identity: column.identity,
            default: column.default,
        })
        .collect();
    let mut constraints = vec![TableConstraint::PrimaryKey {
        name: format!("{}_pkey", table.name),
        columns: table.primary_key_names(),
    }];
    for column in table
        .columns
        .iter()
        .filter(|c| c.unique && !(c.primary_key && table.primary_key.len() == 1))
    {
        constraints.push(TableConstraint::Unique {
            name: format!("{}_{}_key", table.name, column.name),
            columns: vec![column.name],
        });
    }
    for column in table.columns {
        if let Some(expression) = column.check {
            constraints.push(TableConstraint::Check {
                name: format!("{}_{}_check", table.name, column.name),
                expression,
            });
        }
    }
    for column in table.columns {
        if let Some(fk) = &column.foreign_key {
            constraints.push(TableConstraint::ForeignKey {
                name: format!("{}_{}_fkey", table.name, column.name),
                columns: vec![column.name],
                references: (fk.target)().name,
                referenced_columns: vec![fk.column],
                on_delete: fk.on_delete,
            });
        }
    }
    CreateTableStatement {
        name: table.name,
        if_not_exists: true,
        columns,
        constraints,
    }
}

fn create_index_statements(table: &'static TableDef) -> Vec<CreateIndexStatement> {
    table
        .columns
        .iter()
        .filter(|c| c.index && !c.unique)
        .map(|column| CreateIndexStatement {
            name: format!("ix_{}_{}", table.name, column.name),
            table: table.name,
            columns: vec![column.name],
            unique: false,
            if_not_exists: true,
        })
        .collect()
}
