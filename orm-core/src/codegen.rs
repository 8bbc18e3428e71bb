//! Support for the code `#[derive(Model)]` generates. Not a public API.

use crate::expr::Column;
use crate::model::TableDef;
use crate::types::{ColumnType, NullableColumnType, PrimaryKeyColumnType, TextColumnType};

pub use crate::metadata::{base_id, Registration};
pub use crate::model::decode_column;
pub use crate::sql::ReferentialAction;
pub use crate::types::IdentityColumnType;
pub use tokio_postgres::Row;

/// Fails to compile, on the field's type, unless it is a column type.
pub fn assert_column_type<T: ColumnType>() {}

/// Fails to compile unless the type can be a primary key (not nullable,
/// and comparable exactly, which rules out floats).
pub fn assert_primary_key_type<T: PrimaryKeyColumnType>() {}

/// Fails to compile unless the column accepts NULL (for `on_delete = "set null"`).
pub fn assert_nullable_type<T: NullableColumnType>() {}

/// Fails to compile unless the type can be an identity column.
pub fn assert_identity_type<T: IdentityColumnType>() {}

/// Fails to compile unless the type takes a `length`.
pub fn assert_text_type<T: TextColumnType>() {}

/// A field of type `Self` can reference a column of type `T`: the same
/// type, or its nullable form.
#[diagnostic::on_unimplemented(
    message = "a field of type `{Self}` cannot reference a column of type `{T}`",
    label = "the foreign key's type must match the referenced column's"
)]
pub trait References<T> {}

impl<T: ColumnType> References<T> for T {}
impl<T: ColumnType> References<T> for Option<T> {}

impl<M, T> Column<M, T> {
    /// Fails to compile unless a field of type `F` can reference this column.
    /// A method rather than a function so that `T` is known from the column
    /// before `F` is checked, which gives the clearer message.
    #[doc(hidden)]
    pub fn __assert_referenced_by<F: References<T>>(self) {}
}

/// Decodes a field; bound by `ColumnType` so a wrong field type is reported
/// once, as an unsupported column type.
#[inline]
pub fn decode_field<T: ColumnType>(row: &Row, index: usize, table: &TableDef, column: usize) -> crate::Result<T> {
    crate::model::decode_column(row, index, table, column)
}

/// A field as a value to encode; bound by `ColumnType` for the same reason
/// as `decode_field`.
#[inline]
pub fn column_value<T: ColumnType>(value: &T) -> &(dyn tokio_postgres::types::ToSql + Sync) {
    value
}

/// One field's value, cloned into a bind parameter.
pub fn column_param<T: ColumnType>(value: &T) -> crate::types::Param {
    Box::new(value.clone())
}

/// Reached only if generated code and its table description disagree.
pub fn no_such_column(table: &TableDef, column: usize) -> ! {
    panic!(
        "internal error: model {} has no column at position {column}",
        table.model
    )
}
