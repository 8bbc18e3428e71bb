//! Rust ↔ PostgreSQL column types.
//!
//! | Rust        | PostgreSQL                                  |
//! |-------------|---------------------------------------------|
//! | `i16`       | `smallint`                                  |
//! | `i32`       | `integer`                                   |
//! | `i64`       | `bigint`                                    |
//! | `f32`       | `real`                                      |
//! | `f64`       | `double precision`                          |
//! | `bool`      | `boolean`                                   |
//! | `String`    | `text`, or `varchar(n)` with `length = n`   |
//! | `Vec<u8>`   | `bytea`                                     |
//! | `Option<T>` | the same type, nullable                     |
//!
//! Every other field type is a compile error on the field. Values travel as
//! bind parameters through `postgres-types`' `ToSql`/`FromSql`.

use tokio_postgres::types::{FromSql, ToSql, Type};

/// A bound parameter: any value the driver can encode, owned.
pub type Param = Box<dyn ToSql + Send + Sync>;

/// A Rust type that can be a model field, and so a column.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be a column type",
    label = "unsupported column type",
    note = "supported column types: i16, i32, i64, f32, f64, bool, String, Vec<u8>, and Option<T> of these; use #[orm(skip)] for fields that are not columns"
)]
pub trait ColumnType: ToSql + for<'a> FromSql<'a> + Clone + PartialEq + Send + Sync + 'static {
    /// The PostgreSQL type used in `CREATE TABLE`.
    const SQL_TYPE: &'static str;
    /// The PostgreSQL array type used to bind many values of the column at once.
    const ARRAY_TYPE: &'static str;
    /// Whether the column accepts NULL (true for `Option<T>`).
    const NULLABLE: bool;

    /// True when the value is SQL NULL; a column with a server default is
    /// left to the database when its field holds NULL on insert.
    fn is_null(&self) -> bool {
        false
    }

    /// Whether [`decode_fast`](Self::decode_fast) can ever decode a value,
    /// so that other types skip the attempt at compile time.
    #[doc(hidden)]
    const DECODES_FAST: bool = false;

    /// Decodes a value of a column of type `ty` from its bytes (`None` for
    /// NULL), where that can skip checks the driver repeats on every value;
    /// `None` leaves the value to the driver's `FromSql`, which also reports
    /// every error.
    #[doc(hidden)]
    #[inline(always)]
    fn decode_fast(ty: &Type, raw: Option<&[u8]>) -> Option<Self> {
        let _ = (ty, raw);
        None
    }

    /// Collects one column of many rows into an array parameter.
    fn to_array<'a, I>(values: I) -> Param
    where
        I: Iterator<Item = &'a Self>,
        Self: 'a,
    {
        Box::new(values.cloned().collect::<Vec<Self>>())
    }
}

/// A column type that can never be NULL; primary keys must have one.
#[diagnostic::on_unimplemented(
    message = "primary key column has the nullable type `{Self}`",
    label = "a primary key cannot be NULL",
    note = "use the inner type instead of Option<T>"
)]
pub trait NotNullColumnType: ColumnType {}

/// A column type that can be (part of) a primary key: never NULL, and
/// compared exactly and ordered, since the identity map hashes keys and
/// notices loads whose keys ascend.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be a primary key column",
    label = "a primary key needs a non-null type that compares exactly",
    note = "use i16, i32, i64, bool, String or Vec<u8>; a primary key cannot be Option<T> or a float"
)]
pub trait PrimaryKeyColumnType: NotNullColumnType + Ord + std::hash::Hash {}

/// A column type that accepts NULL: `Option<T>`.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot hold NULL",
    label = "on_delete = \"set null\" needs an Option<T> field",
    note = "make the field Option<...>, or choose another on_delete action"
)]
pub trait NullableColumnType: ColumnType {}

/// Integer types that PostgreSQL can generate as an identity column.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be an identity column",
    label = "identity/autoincrement needs an integer type",
    note = "use i16, i32 or i64"
)]
pub trait IdentityColumnType: PrimaryKeyColumnType {
    /// True when the field holds the "not assigned yet" value, zero: the
    /// database then assigns the key on insert.
    fn is_unassigned(&self) -> bool;

    /// A key taken from the column's sequence, in this type; `None` if it
    /// does not fit (which a sequence of this column never hands out).
    fn from_key(key: i64) -> Option<Self>;
}

/// Text types, the only ones that accept `length = n`.
#[diagnostic::on_unimplemented(
    message = "`length` needs a text column, not `{Self}`",
    label = "length applies to String or Option<String>"
)]
pub trait TextColumnType: ColumnType {}

/// How a column type's values decode without the driver's checks; see
/// [`ColumnType::decode_fast`]. The driver's text decoding compares the
/// column's type name with three extension types' (`ltree` and its kin) on
/// every value, which the profile put at 4% of loading 10,000 rows of two
/// text columns; numbers and booleans go through its generic path (a check
/// that the type is accepted, then the decoder, each result moved through
/// the driver's error-sized `Result`). Here a value of exactly the field's
/// own type is read from its bytes as the driver reads it.
trait FastDecode: Sized {
    const FAST: bool = false;

    /// Whether values of a column of type `ty` decode here.
    #[inline(always)]
    fn fast_type(ty: &Type) -> bool {
        let _ = ty;
        false
    }

    /// A non-NULL value of a column whose type `fast_type` accepted; `None`
    /// if it is not valid, for the driver to report.
    #[inline(always)]
    fn decode(raw: &[u8]) -> Option<Self> {
        let _ = raw;
        None
    }
}

/// Numbers, read big-endian from exactly their width of bytes, as
/// postgres-protocol does; any other length is left to the driver.
macro_rules! fast_numbers {
    ($($rust:ty => $sql:ident;)*) => {$(
        impl FastDecode for $rust {
            const FAST: bool = true;

            #[inline(always)]
            fn fast_type(ty: &Type) -> bool {
                matches!(*ty, Type::$sql)
            }

            #[inline(always)]
            fn decode(raw: &[u8]) -> Option<Self> {
                raw.try_into().ok().map(<$rust>::from_be_bytes)
            }
        }
    )*};
}

fast_numbers! {
    i16 => INT2;
    i32 => INT4;
    i64 => INT8;
    f32 => FLOAT4;
    f64 => FLOAT8;
}

impl FastDecode for bool {
    const FAST: bool = true;

    #[inline(always)]
    fn fast_type(ty: &Type) -> bool {
        matches!(*ty, Type::BOOL)
    }

    /// One byte, true when not zero, as postgres-protocol reads it.
    #[inline(always)]
    fn decode(raw: &[u8]) -> Option<Self> {
        match raw {
            [byte] => Some(*byte != 0),
            _ => None,
        }
    }
}

impl FastDecode for Vec<u8> {}

impl FastDecode for String {
    const FAST: bool = true;

    /// The types whose values the driver decodes as plain UTF-8 text.
    #[inline(always)]
    fn fast_type(ty: &Type) -> bool {
        matches!(
            *ty,
            Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::UNKNOWN
        )
    }

    #[inline(always)]
    fn decode(raw: &[u8]) -> Option<Self> {
        std::str::from_utf8(raw).ok().map(str::to_owned)
    }
}

macro_rules! column_types {
    ($($rust:ty => $sql:literal, $array:literal;)*) => {$(
        impl ColumnType for $rust {
            const SQL_TYPE: &'static str = $sql;
            const ARRAY_TYPE: &'static str = $array;
            const NULLABLE: bool = false;
            const DECODES_FAST: bool = <$rust as FastDecode>::FAST;

            #[inline(always)]
            fn decode_fast(ty: &Type, raw: Option<&[u8]>) -> Option<Self> {
                if <$rust as FastDecode>::fast_type(ty) {
                    <$rust as FastDecode>::decode(raw?)
                } else {
                    None
                }
            }
        }
        impl NotNullColumnType for $rust {}
        impl NullableColumnType for Option<$rust> {}
        impl ColumnType for Option<$rust> {
            const SQL_TYPE: &'static str = $sql;
            const ARRAY_TYPE: &'static str = $array;
            const NULLABLE: bool = true;
            const DECODES_FAST: bool = <$rust as FastDecode>::FAST;

            fn is_null(&self) -> bool {
                self.is_none()
            }

            #[inline(always)]
            fn decode_fast(ty: &Type, raw: Option<&[u8]>) -> Option<Self> {
                if !<$rust as FastDecode>::fast_type(ty) {
                    return None;
                }
                match raw {
                    None => Some(None),
                    Some(raw) => <$rust as FastDecode>::decode(raw).map(Some),
                }
            }
        }
        impl IntoValue<$rust> for $rust {
            fn into_value(self) -> $rust {
                self
            }
        }
        impl IntoValue<Option<$rust>> for $rust {
            fn into_value(self) -> Option<$rust> {
                Some(self)
            }
        }
        impl IntoValue<Option<$rust>> for Option<$rust> {
            fn into_value(self) -> Option<$rust> {
                self
            }
        }
    )*};
}

column_types! {
    i16 => "smallint", "int2[]";
    i32 => "integer", "int4[]";
    i64 => "bigint", "int8[]";
    f32 => "real", "float4[]";
    f64 => "double precision", "float8[]";
    bool => "boolean", "bool[]";
    // Arrays of text, not varchar(n): an explicit cast to varchar(n) truncates
    // silently, while the assignment cast on insert rejects overlong values.
    String => "text", "text[]";
    Vec<u8> => "bytea", "bytea[]";
}

macro_rules! identity_types {
    ($($rust:ty),*) => {$(
        impl IdentityColumnType for $rust {
            fn is_unassigned(&self) -> bool {
                *self == 0
            }

            fn from_key(key: i64) -> Option<Self> {
                <$rust>::try_from(key).ok()
            }
        }
    )*};
}
identity_types!(i16, i32, i64);

macro_rules! primary_key_types {
    ($($rust:ty),*) => {$(
        impl PrimaryKeyColumnType for $rust {}
    )*};
}
primary_key_types!(i16, i32, i64, bool, String, Vec<u8>);

impl TextColumnType for String {}
impl TextColumnType for Option<String> {}

/// A Rust value that may be compared with, or assigned to, a column of type `T`.
///
/// `User::name.eq("sandy")` compiles because `&str: IntoValue<String>`;
/// `User::id.eq("sandy")` does not, because `&str` is no `IntoValue<i64>`.
#[diagnostic::on_unimplemented(
    message = "a `{Self}` cannot be compared with a column of type `{T}`",
    label = "expected a value of the column's type `{T}`"
)]
pub trait IntoValue<T> {
    /// Converts into the column's Rust type.
    fn into_value(self) -> T;
}

impl IntoValue<String> for &str {
    fn into_value(self) -> String {
        self.to_owned()
    }
}

impl IntoValue<Option<String>> for &str {
    fn into_value(self) -> Option<String> {
        Some(self.to_owned())
    }
}

impl IntoValue<String> for &String {
    fn into_value(self) -> String {
        self.clone()
    }
}

impl IntoValue<Vec<u8>> for &[u8] {
    fn into_value(self) -> Vec<u8> {
        self.to_vec()
    }
}
