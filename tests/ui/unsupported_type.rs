use orm::Model;

#[derive(Model, Debug, Clone)]
pub struct Event {
    #[orm(primary_key)]
    pub id: i64,
    pub at: std::time::Instant,
}

fn main() {}
