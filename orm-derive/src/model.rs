//! Parse and check: `DeriveInput` → [`Model`], every error collected.

use proc_macro2::Span;
use syn::meta::ParseNestedMeta;
use syn::spanned::Spanned;
use syn::{Data, DeriveInput, Fields, Ident, LitInt, LitStr, Path, Type};

/// The `#[orm(...)]` keys allowed on the struct.
const CONTAINER_KEYS: &str = "table, base, crate";
/// The `#[orm(...)]` keys allowed on a field.
const FIELD_KEYS: &str =
    "primary_key, identity, autoincrement, unique, index, default, check, length, foreign_key, on_delete, column, skip";

/// Collects errors so that one compile reports every mistake.
#[derive(Default)]
struct Errors(Option<syn::Error>);

impl Errors {
    fn push(&mut self, error: syn::Error) {
        match &mut self.0 {
            Some(existing) => existing.combine(error),
            None => self.0 = Some(error),
        }
    }

    fn at(&mut self, span: Span, message: impl std::fmt::Display) {
        self.push(syn::Error::new(span, message));
    }

    fn finish<T>(self, value: T) -> syn::Result<T> {
        match self.0 {
            Some(error) => Err(error),
            None => Ok(value),
        }
    }
}

/// The struct, as a table.
pub(crate) struct Model<'a> {
    pub ident: &'a Ident,
    pub table: String,
    pub base: Path,
    pub krate: Path,
    pub columns: Vec<Column<'a>>,
    pub skipped: Vec<&'a Ident>,
}

/// `ON DELETE` actions, as written in the attribute.
#[derive(Clone, Copy)]
pub(crate) enum OnDelete {
    NoAction,
    Restrict,
    Cascade,
    SetNull,
    SetDefault,
}

/// A field that is a column.
pub(crate) struct Column<'a> {
    pub ident: &'a Ident,
    pub ty: &'a Type,
    pub name: String,
    pub primary_key: bool,
    pub identity: bool,
    pub unique: bool,
    pub index: bool,
    pub default: Option<LitStr>,
    pub check: Option<LitStr>,
    pub length: Option<(u32, Span)>,
    pub foreign_key: Option<ForeignKey>,
}

pub(crate) struct ForeignKey {
    /// `User::id` (`Self::id` is rewritten to the struct's name, since the
    /// path is also used outside the model's impl).
    pub path: Path,
    /// `User`.
    pub model: Path,
    pub on_delete: OnDelete,
    /// Where `on_delete` was written, for type checks that depend on it.
    pub on_delete_span: Option<Span>,
}

impl<'a> Model<'a> {
    pub(crate) fn from_ast(input: &'a DeriveInput) -> syn::Result<Self> {
        let mut errors = Errors::default();
        let fields = match &input.data {
            Data::Struct(data) => match &data.fields {
                Fields::Named(named) => Some(&named.named),
                _ => {
                    errors.at(input.ident.span(), "#[derive(Model)] needs a struct with named fields");
                    None
                }
            },
            _ => {
                errors.at(input.ident.span(), "#[derive(Model)] works on structs only");
                None
            }
        };
        if !input.generics.params.is_empty() {
            errors.at(
                input.generics.span(),
                "#[derive(Model)] does not support generic structs",
            );
        }

        let mut table = None;
        let mut base = None;
        let mut krate = None;
        for attr in input.attrs.iter().filter(|a| a.path().is_ident("orm")) {
            let result = attr.parse_nested_meta(|meta| {
                if meta.path.is_ident("table") {
                    let value: LitStr = meta.value()?.parse()?;
                    if value.value().is_empty() {
                        errors.at(value.span(), "table name must not be empty");
                    }
                    set_once(&mut errors, &meta, &mut table, value.value());
                } else if meta.path.is_ident("base") {
                    let value: Path = meta.value()?.parse()?;
                    set_once(&mut errors, &meta, &mut base, value);
                } else if meta.path.is_ident("crate") {
                    let value: LitStr = meta.value()?.parse()?;
                    let path: Path = value.parse()?;
                    set_once(&mut errors, &meta, &mut krate, path);
                } else {
                    errors.push(unknown_key(&meta, CONTAINER_KEYS, "#[orm(table = \"users\")]"));
                    skip_value(&meta)?;
                }
                Ok(())
            });
            if let Err(error) = result {
                errors.push(error);
            }
        }
        let krate: Path = krate.unwrap_or_else(|| syn::parse_quote!(::orm));
        let base = base.unwrap_or_else(|| syn::parse_quote!(#krate::Base));

        let mut columns = Vec::new();
        let mut skipped = Vec::new();
        for field in fields.into_iter().flatten() {
            let ident = field.ident.as_ref().expect("named fields have names");
            match parse_field(field, ident, &input.ident, &mut errors) {
                FieldKind::Column(column) => columns.push(column),
                FieldKind::Skipped => skipped.push(ident),
            }
        }
        check(input, &columns, &mut errors);

        let model = Model {
            ident: &input.ident,
            table: table.unwrap_or_else(|| snake_case(&input.ident.to_string())),
            base,
            krate,
            columns,
            skipped,
        };
        errors.finish(model)
    }

    pub(crate) fn primary_key(&self) -> Vec<(usize, &Column<'a>)> {
        self.columns.iter().enumerate().filter(|(_, c)| c.primary_key).collect()
    }
}

enum FieldKind<'a> {
    Column(Column<'a>),
    Skipped,
}

fn parse_field<'a>(field: &'a syn::Field, ident: &'a Ident, struct_name: &Ident, errors: &mut Errors) -> FieldKind<'a> {
    let mut column = Column {
        ident,
        ty: &field.ty,
        name: ident.to_string().trim_start_matches("r#").to_owned(),
        primary_key: false,
        identity: false,
        unique: false,
        index: false,
        default: None,
        check: None,
        length: None,
        foreign_key: None,
    };
    let mut skip: Option<Span> = None;
    let mut other_keys: Vec<Span> = Vec::new();
    let mut seen: Vec<String> = Vec::new();
    let mut name_override = None;
    let mut foreign_key: Option<(Path, Span)> = None;
    let mut on_delete: Option<(OnDelete, Span)> = None;

    for attr in field.attrs.iter().filter(|a| a.path().is_ident("orm")) {
        let result = attr.parse_nested_meta(|meta| {
            let key = meta.path.get_ident().map(Ident::to_string).unwrap_or_default();
            let span = meta.path.span();
            if seen.contains(&key) {
                errors.at(span, format!("duplicate attribute `{key}`"));
            }
            seen.push(key.clone());
            if key != "skip" {
                other_keys.push(span);
            }
            match key.as_str() {
                "primary_key" => column.primary_key = true,
                "identity" | "autoincrement" => column.identity = true,
                "unique" => column.unique = true,
                "index" => column.index = true,
                "skip" => skip = Some(span),
                "default" => {
                    let value: LitStr = meta.value()?.parse()?;
                    if value.value().trim().is_empty() {
                        errors.at(value.span(), "default must be an SQL expression, such as \"now()\" or \"0\"");
                    }
                    column.default = Some(value);
                }
                "check" => {
                    let value: LitStr = meta.value()?.parse()?;
                    if value.value().trim().is_empty() {
                        errors.at(value.span(), "check must be an SQL condition, such as \"price >= 0\"");
                    }
                    column.check = Some(value);
                }
                "length" => {
                    let value: LitInt = meta.value()?.parse()?;
                    match value.base10_parse::<u32>() {
                        Ok(0) | Err(_) => errors.at(value.span(), "length must be a whole number from 1 to 10485760"),
                        Ok(n) if n > 10_485_760 => errors.at(value.span(), "length must be at most 10485760 (PostgreSQL's varchar limit)"),
                        Ok(n) => column.length = Some((n, value.span())),
                    }
                }
                "column" => {
                    let value: LitStr = meta.value()?.parse()?;
                    if value.value().is_empty() {
                        errors.at(value.span(), "column name must not be empty");
                    }
                    name_override = Some(value.value());
                }
                "foreign_key" => {
                    let path: Path = meta.value()?.parse()?;
                    if path.segments.len() < 2 {
                        errors.at(
                            path.span(),
                            "foreign_key names a model's column as `Model::field`, for example `foreign_key = User::id`",
                        );
                    } else {
                        foreign_key = Some((path, span));
                    }
                }
                "on_delete" => {
                    let value: LitStr = meta.value()?.parse()?;
                    let action = match value.value().to_ascii_lowercase().as_str() {
                        "cascade" => OnDelete::Cascade,
                        "restrict" => OnDelete::Restrict,
                        "set null" | "set_null" => OnDelete::SetNull,
                        "set default" | "set_default" => OnDelete::SetDefault,
                        "no action" | "no_action" => OnDelete::NoAction,
                        _ => {
                            errors.at(
                                value.span(),
                                "on_delete must be one of \"cascade\", \"restrict\", \"set null\", \"set default\", \"no action\"",
                            );
                            OnDelete::NoAction
                        }
                    };
                    on_delete = Some((action, span));
                }
                _ => {
                    errors.push(unknown_key(&meta, FIELD_KEYS, "#[orm(primary_key, identity)]"));
                    skip_value(&meta)?;
                }
            }
            Ok(())
        });
        if let Err(error) = result {
            errors.push(error);
        }
    }

    if let Some(skip) = skip {
        for span in other_keys {
            errors.at(
                span,
                "this attribute conflicts with `skip`: a skipped field is not a column",
            );
        }
        let _ = skip;
        return FieldKind::Skipped;
    }
    if let Some(name) = name_override {
        column.name = name;
    }
    if column.identity && column.default.is_some() {
        let span = column.default.as_ref().map_or(ident.span(), LitStr::span);
        errors.at(
            span,
            "an identity column takes its value from the database; it cannot also have a `default`",
        );
    }
    if let (Some((_, span)), None) = (&on_delete, &foreign_key) {
        errors.at(*span, "`on_delete` needs a `foreign_key` on the same field");
    }
    if let Some((mut path, _)) = foreign_key {
        if let Some(first) = path.segments.first_mut() {
            if first.ident == "Self" {
                first.ident = Ident::new(&struct_name.to_string(), first.ident.span());
            }
        }
        let mut model = path.clone();
        model.segments.pop();
        model.segments.pop_punct();
        column.foreign_key = Some(ForeignKey {
            path,
            model,
            on_delete: on_delete.map_or(OnDelete::NoAction, |(action, _)| action),
            on_delete_span: on_delete.map(|(_, span)| span),
        });
    }
    FieldKind::Column(column)
}

/// Rules that span fields.
fn check(input: &DeriveInput, columns: &[Column<'_>], errors: &mut Errors) {
    if !matches!(input.data, Data::Struct(_)) {
        return;
    }
    if !columns.iter().any(|c| c.primary_key) {
        errors.at(
            input.ident.span(),
            "a model needs a primary key: mark one or more fields with #[orm(primary_key)]",
        );
    }
    let identities: Vec<&Column<'_>> = columns.iter().filter(|c| c.identity).collect();
    for extra in identities.iter().skip(1) {
        errors.at(extra.ident.span(), "a table can have only one identity column");
    }
    for (i, column) in columns.iter().enumerate() {
        if columns[..i].iter().any(|other| other.name == column.name) {
            errors.at(
                column.ident.span(),
                format!("two fields map to the column {:?}", column.name),
            );
        }
    }
}

fn set_once<T>(errors: &mut Errors, meta: &ParseNestedMeta<'_>, slot: &mut Option<T>, value: T) {
    if slot.is_some() {
        let key = meta.path.get_ident().map(Ident::to_string).unwrap_or_default();
        errors.at(meta.path.span(), format!("duplicate attribute `{key}`"));
    }
    *slot = Some(value);
}

fn unknown_key(meta: &ParseNestedMeta<'_>, valid: &str, example: &str) -> syn::Error {
    let key = meta
        .path
        .get_ident()
        .map(Ident::to_string)
        .unwrap_or_else(|| "this path".into());
    syn::Error::new(
        meta.path.span(),
        format!("unknown orm attribute `{key}`; expected one of: {valid}\nhelp: write it as {example}"),
    )
}

/// Consumes `= value` or `(...)` after an unknown key so parsing can go on.
fn skip_value(meta: &ParseNestedMeta<'_>) -> syn::Result<()> {
    if meta.input.peek(syn::Token![=]) {
        let _: syn::Expr = meta.value()?.parse()?;
    } else if meta.input.peek(syn::token::Paren) {
        let content;
        syn::parenthesized!(content in meta.input);
        let _: proc_macro2::TokenStream = content.parse()?;
    }
    Ok(())
}

/// `BlogPost` → `blog_post`, `HTTPRequest` → `http_request`.
pub(crate) fn snake_case(name: &str) -> String {
    let chars: Vec<char> = name.chars().collect();
    let mut out = String::new();
    for (i, &c) in chars.iter().enumerate() {
        if c.is_uppercase() {
            let prev_lower = i > 0 && (chars[i - 1].is_lowercase() || chars[i - 1].is_ascii_digit());
            let next_lower = chars.get(i + 1).is_some_and(|n| n.is_lowercase());
            let prev_upper = i > 0 && chars[i - 1].is_uppercase();
            if i > 0 && (prev_lower || (prev_upper && next_lower)) {
                out.push('_');
            }
            out.extend(c.to_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snake_case_names() {
        assert_eq!(snake_case("User"), "user");
        assert_eq!(snake_case("BlogPost"), "blog_post");
        assert_eq!(snake_case("HTTPRequest"), "http_request");
        assert_eq!(snake_case("Item2Tag"), "item2_tag");
    }
}
