//! Misuse of `#[derive(Model)]` and of column handles must fail to compile,
//! with messages that point at the offending field or attribute. The
//! expected messages are in `tests/ui/*.stderr` (rustc's wording on the
//! pinned toolchain); regenerate with `TRYBUILD=overwrite` and review the diff.

#[test]
fn ui() {
    let cases = trybuild::TestCases::new();
    cases.compile_fail("tests/ui/*.rs");
}
