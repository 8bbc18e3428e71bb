//! Generate: [`Model`] → the trait impl, the column handles, the type
//! assertions and the registration with the declarative base.

use proc_macro2::TokenStream;
use quote::{format_ident, quote, quote_spanned};
use syn::spanned::Spanned;

use crate::model::{Column, Model, OnDelete};

pub(crate) fn expand_model(model: &Model<'_>) -> TokenStream {
    let assertions = expand_assertions(model);
    let handles = expand_column_handles(model);
    let model_impl = expand_model_impl(model);
    let registration = expand_registration(model);
    quote! {
        #assertions
        #handles
        #model_impl
        #registration
    }
}

/// Type checks the macro cannot make itself, each spanned on the field's
/// type so the compiler's message points there.
fn expand_assertions(model: &Model<'_>) -> TokenStream {
    let krate = &model.krate;
    let mut checks = Vec::new();
    for column in &model.columns {
        let ty = column.ty;
        checks.push(quote_spanned!(ty.span()=> #krate::__private::assert_column_type::<#ty>();));
        if column.primary_key {
            checks.push(quote_spanned!(ty.span()=> #krate::__private::assert_primary_key_type::<#ty>();));
        }
        if column.identity {
            checks.push(quote_spanned!(ty.span()=> #krate::__private::assert_identity_type::<#ty>();));
        }
        if let Some((_, span)) = column.length {
            checks.push(quote_spanned!(span=> #krate::__private::assert_text_type::<#ty>();));
        }
        if let Some(fk) = &column.foreign_key {
            if let (crate::model::OnDelete::SetNull, Some(span)) = (fk.on_delete, fk.on_delete_span) {
                checks.push(quote_spanned!(span=> #krate::__private::assert_nullable_type::<#ty>();));
            }
            let path = &fk.path;
            checks.push(quote_spanned!(path.span()=> #path.__assert_referenced_by::<#ty>();));
        }
    }
    quote! {
        const _: () = {
            #[allow(dead_code, clippy::all)]
            fn __orm_type_assertions() {
                #(#checks)*
            }
        };
    }
}

fn expand_column_handles(model: &Model<'_>) -> TokenStream {
    let krate = &model.krate;
    let ident = model.ident;
    let handles = model.columns.iter().enumerate().map(|(position, column)| {
        let field = column.ident;
        let ty = column.ty;
        let name = &column.name;
        let doc = format!("The column `{}.{}`, for filters and ordering.", model.table, name);
        quote! {
            #[doc = #doc]
            pub const #field: #krate::Column<#ident, #ty> = #krate::Column::new(#position, #name);
        }
    });
    quote! {
        #[allow(non_upper_case_globals)]
        impl #ident {
            #(#handles)*
        }
    }
}

fn on_delete_tokens(krate: &syn::Path, on_delete: OnDelete) -> TokenStream {
    let variant = match on_delete {
        OnDelete::NoAction => quote!(NoAction),
        OnDelete::Restrict => quote!(Restrict),
        OnDelete::Cascade => quote!(Cascade),
        OnDelete::SetNull => quote!(SetNull),
        OnDelete::SetDefault => quote!(SetDefault),
    };
    quote!(#krate::__private::ReferentialAction::#variant)
}

fn expand_column_def(krate: &syn::Path, column: &Column<'_>) -> TokenStream {
    let ty = column.ty;
    let name = &column.name;
    let field = column.ident.to_string();
    let primary_key = column.primary_key;
    let identity = column.identity;
    let unique = column.unique;
    let index = column.index;
    let default = match &column.default {
        Some(sql) => quote!(::core::option::Option::Some(#sql)),
        None => quote!(::core::option::Option::None),
    };
    let check = match &column.check {
        Some(sql) => quote!(::core::option::Option::Some(#sql)),
        None => quote!(::core::option::Option::None),
    };
    let length = match column.length {
        Some((n, _)) => quote!(::core::option::Option::Some(#n)),
        None => quote!(::core::option::Option::None),
    };
    let foreign_key = match &column.foreign_key {
        Some(fk) => {
            let target = &fk.model;
            let path = &fk.path;
            let on_delete = on_delete_tokens(krate, fk.on_delete);
            quote!(::core::option::Option::Some(#krate::ForeignKeyDef {
                target: || <#target as #krate::Model>::TABLE,
                column: #path.name,
                on_delete: #on_delete,
            }))
        }
        None => quote!(::core::option::Option::None),
    };
    quote! {
        #krate::ColumnDef {
            name: #name,
            field: #field,
            sql_type: <#ty as #krate::ColumnType>::SQL_TYPE,
            array_type: <#ty as #krate::ColumnType>::ARRAY_TYPE,
            nullable: <#ty as #krate::ColumnType>::NULLABLE,
            primary_key: #primary_key,
            identity: #identity,
            unique: #unique,
            index: #index,
            default: #default,
            length: #length,
            foreign_key: #foreign_key,
            check: #check,
        }
    }
}

fn expand_model_impl(model: &Model<'_>) -> TokenStream {
    let krate = &model.krate;
    let ident = model.ident;
    let table = &model.table;
    let model_name = ident.to_string();
    let column_defs = model.columns.iter().map(|c| expand_column_def(krate, c));
    let primary_key = model.primary_key();
    let pk_positions = primary_key.iter().map(|(i, _)| *i);
    let pk_types: Vec<_> = primary_key.iter().map(|(_, c)| c.ty).collect();
    let pk_fields: Vec<_> = primary_key.iter().map(|(_, c)| c.ident).collect();
    let to_sql = quote!(dyn #krate::tokio_postgres::types::ToSql + ::core::marker::Sync);
    let (pk_type, pk_value, pk_refs) = if primary_key.len() == 1 {
        let ty = pk_types[0];
        let field = pk_fields[0];
        (
            quote!(#ty),
            quote!(::core::clone::Clone::clone(&self.#field)),
            quote!([key as &(#to_sql)]),
        )
    } else {
        let indexes: Vec<_> = (0..primary_key.len()).map(syn::Index::from).collect();
        (
            quote!((#(#pk_types,)*)),
            quote!((#(::core::clone::Clone::clone(&self.#pk_fields),)*)),
            quote!([#(&key.#indexes as &(#to_sql)),*]),
        )
    };

    // Decodes the column at `position` of a row whose model's columns start
    // at `offset`, spanned on the field's type so an unsupported type is
    // reported there.
    let decode_at = |position: usize, column: &Column<'_>| {
        let ty = column.ty;
        let decode = quote_spanned!(ty.span()=> #krate::__private::decode_field::<#ty>);
        quote!(#decode(row, offset + #position, <Self as #krate::Model>::TABLE, #position))
    };
    let mut pk_decodes = primary_key
        .iter()
        .map(|&(position, column)| decode_at(position, column));
    let pk_decode = if primary_key.len() == 1 {
        pk_decodes.next().unwrap_or_default()
    } else {
        quote!(::core::result::Result::Ok((#(#pk_decodes?,)*)))
    };

    let decode_fields = model.columns.iter().enumerate().map(|(position, column)| {
        let field = column.ident;
        let decode = decode_at(position, column);
        quote!(#field: #decode?,)
    });
    // The key's parts, bound by name, for `from_row_with_key` to move into
    // their fields instead of decoding them again.
    let key_parts: Vec<syn::Ident> = (0..primary_key.len())
        .map(|i| format_ident!("__orm_key_{}", i))
        .collect();
    let key_pattern = if key_parts.len() == 1 {
        let part = &key_parts[0];
        quote!(#part)
    } else {
        quote!((#(#key_parts,)*))
    };
    let fields_with_key = model.columns.iter().enumerate().map(|(position, column)| {
        let field = column.ident;
        match primary_key.iter().position(|(p, _)| *p == position) {
            Some(part) => {
                let part = &key_parts[part];
                quote!(#field: #part,)
            }
            None => {
                let decode = decode_at(position, column);
                quote!(#field: #decode?,)
            }
        }
    });
    let skipped: Vec<_> = model
        .skipped
        .iter()
        .map(|field| quote!(#field: ::core::default::Default::default(),))
        .collect();
    let set_arms = model.columns.iter().enumerate().map(|(position, column)| {
        let field = column.ident;
        let ty = column.ty;
        let decode = quote_spanned!(ty.span()=> #krate::__private::decode_field::<#ty>);
        quote!(#position => self.#field = #decode(row, index, <Self as #krate::Model>::TABLE, #position)?,)
    });
    let array_arms = model.columns.iter().enumerate().map(|(position, column)| {
        let field = column.ident;
        let ty = column.ty;
        quote!(#position => <#ty as #krate::ColumnType>::to_array(objects.iter().map(|object| &object.#field)),)
    });
    let value_arms = model.columns.iter().enumerate().map(|(position, column)| {
        let field = column.ident;
        let ty = column.ty;
        let as_value = quote_spanned!(ty.span()=> #krate::__private::column_value::<#ty>);
        quote!(#position => #as_value(&self.#field),)
    });
    let param_arms = model.columns.iter().enumerate().map(|(position, column)| {
        let field = column.ident;
        let ty = column.ty;
        let as_param = quote_spanned!(ty.span()=> #krate::__private::column_param::<#ty>);
        quote!(#position => #as_param(&self.#field),)
    });
    let copy_arms = model.columns.iter().enumerate().map(|(position, column)| {
        let field = column.ident;
        quote!(#position => self.#field = ::core::clone::Clone::clone(&other.#field),)
    });
    let differs_arms = model.columns.iter().enumerate().map(|(position, column)| {
        let field = column.ident;
        quote!(#position => self.#field != other.#field,)
    });
    let unset_arms = model.columns.iter().enumerate().filter_map(|(position, column)| {
        let field = column.ident;
        let ty = column.ty;
        if column.identity {
            Some(quote!(#position => <#ty as #krate::__private::IdentityColumnType>::is_unassigned(&self.#field),))
        } else if column.default.is_some() {
            Some(quote!(#position => <#ty as #krate::ColumnType>::is_null(&self.#field),))
        } else {
            None
        }
    });
    let assign_key_arms = model
        .columns
        .iter()
        .enumerate()
        .filter(|(_, c)| c.identity)
        .map(|(position, column)| {
            let field = column.ident;
            let ty = column.ty;
            quote! {
                #position => match <#ty as #krate::__private::IdentityColumnType>::from_key(key) {
                    ::core::option::Option::Some(value) => {
                        self.#field = value;
                        true
                    }
                    ::core::option::Option::None => false,
                },
            }
        });
    let row = format_ident!("row");

    quote! {
        impl #krate::Model for #ident {
            type PrimaryKey = #pk_type;

            const TABLE: &'static #krate::TableDef = &#krate::TableDef {
                name: #table,
                model: #model_name,
                columns: &[#(#column_defs),*],
                primary_key: &[#(#pk_positions),*],
            };

            fn primary_key(&self) -> Self::PrimaryKey {
                #pk_value
            }

            #[inline]
            fn primary_key_refs<'k>(
                key: &'k Self::PrimaryKey,
            ) -> impl ::core::convert::AsRef<[&'k (#to_sql)]> + ::core::marker::Send + 'k {
                #pk_refs
            }

            #[inline]
            fn primary_key_at(#row: &#krate::__private::Row, offset: usize) -> #krate::Result<Self::PrimaryKey> {
                #pk_decode
            }

            // Always inlined: returned from a call, the decoded struct goes
            // through memory inside a `Result` laid out for the error type,
            // and the caller's wider reads of it stall on the callee's stores.
            #[inline(always)]
            fn from_row_at(#row: &#krate::__private::Row, offset: usize) -> #krate::Result<Self> {
                ::core::result::Result::Ok(#ident {
                    #(#decode_fields)*
                    #(#skipped)*
                })
            }

            #[inline(always)]
            fn from_row_with_key(
                #row: &#krate::__private::Row,
                offset: usize,
                key: Self::PrimaryKey,
            ) -> #krate::Result<Self> {
                let #key_pattern = key;
                ::core::result::Result::Ok(#ident {
                    #(#fields_with_key)*
                    #(#skipped)*
                })
            }

            fn set_from_row(&mut self, #row: &#krate::__private::Row, columns: &[usize]) -> #krate::Result<()> {
                for (index, column) in columns.iter().enumerate() {
                    match *column {
                        #(#set_arms)*
                        _ => {}
                    }
                }
                ::core::result::Result::Ok(())
            }

            fn column_array(objects: &[&Self], column: usize) -> #krate::Param {
                match column {
                    #(#array_arms)*
                    _ => #krate::__private::no_such_column(<Self as #krate::Model>::TABLE, column),
                }
            }

            fn column_param(&self, column: usize) -> #krate::Param {
                match column {
                    #(#param_arms)*
                    _ => #krate::__private::no_such_column(<Self as #krate::Model>::TABLE, column),
                }
            }

            fn column_value(&self, column: usize) -> &(dyn #krate::tokio_postgres::types::ToSql + ::core::marker::Sync) {
                match column {
                    #(#value_arms)*
                    _ => #krate::__private::no_such_column(<Self as #krate::Model>::TABLE, column),
                }
            }

            fn copy_column(&mut self, other: &Self, column: usize) {
                match column {
                    #(#copy_arms)*
                    _ => {}
                }
            }

            fn column_differs(&self, other: &Self, column: usize) -> bool {
                match column {
                    #(#differs_arms)*
                    _ => false,
                }
            }

            fn assign_key(&mut self, column: usize, key: i64) -> bool {
                match column {
                    #(#assign_key_arms)*
                    _ => false,
                }
            }

            fn column_is_unset(&self, column: usize) -> bool {
                match column {
                    #(#unset_arms)*
                    _ => false,
                }
            }
        }
    }
}

fn expand_registration(model: &Model<'_>) -> TokenStream {
    let krate = &model.krate;
    let ident = model.ident;
    let base = &model.base;
    quote! {
        #krate::__private::inventory::submit! {
            #krate::__private::Registration {
                base: #krate::__private::base_id::<#base>,
                table: <#ident as #krate::Model>::TABLE,
            }
        }
    }
}
