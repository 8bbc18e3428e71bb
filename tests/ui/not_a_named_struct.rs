use orm::Model;

#[derive(Model, Debug, Clone)]
pub struct Pair(i64, i64);

#[derive(Model, Debug, Clone)]
pub enum Shape {
    Circle,
}

fn main() {}
