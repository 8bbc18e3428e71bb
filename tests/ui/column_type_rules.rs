use orm::Model;

#[derive(Model, Debug, Clone)]
pub struct Thing {
    #[orm(primary_key)]
    pub id: Option<i64>,
    #[orm(identity)]
    pub code: String,
    #[orm(length = 10)]
    pub count: i32,
}

fn main() {}
