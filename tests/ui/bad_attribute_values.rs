use orm::Model;

#[derive(Model, Debug, Clone)]
#[orm(table = "")]
pub struct Thing {
    #[orm(primary_key)]
    pub id: i64,
    #[orm(length = 0)]
    pub label: String,
    #[orm(default = " ")]
    pub note: Option<String>,
    #[orm(column = "")]
    pub other: i32,
    #[orm(foreign_key = id)]
    pub parent: i64,
}

fn main() {}
