//! Internal proc-macros of [`orm`](https://docs.rs/orm). Depend on `orm`,
//! which re-exports them; this crate is not semver-stable on its own.
//!
//! The derive is thin: `model` parses the struct and its `#[orm(...)]`
//! attributes into a model of the table, checks rules that span fields, and
//! `expand` generates code that calls into `orm-core`.

#![forbid(unsafe_code)]

extern crate proc_macro;

mod expand;
mod model;

use proc_macro::TokenStream;

/// Implements `orm::Model` for a struct with named fields; see the `orm`
/// crate's documentation of `Model` for the attributes.
#[proc_macro_derive(Model, attributes(orm))]
pub fn derive_model(input: TokenStream) -> TokenStream {
    derive_model_inner(input.into()).into()
}

/// The derive on `proc_macro2` tokens, reachable from unit tests.
fn derive_model_inner(input: proc_macro2::TokenStream) -> proc_macro2::TokenStream {
    let parsed = match syn::parse2::<syn::DeriveInput>(input) {
        Ok(parsed) => parsed,
        Err(error) => return error.to_compile_error(),
    };
    match model::Model::from_ast(&parsed) {
        Ok(model) => expand::expand_model(&model),
        Err(error) => error.to_compile_error(),
    }
}
