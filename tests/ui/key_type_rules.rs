use orm::Model;

#[derive(Model, Debug, Clone)]
pub struct Reading {
    #[orm(primary_key)]
    pub at: f64,
    #[orm(foreign_key = Self::at, on_delete = "set null")]
    pub previous: f64,
}

fn main() {}
