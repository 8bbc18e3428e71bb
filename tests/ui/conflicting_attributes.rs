use orm::Model;

#[derive(Model, Debug, Clone)]
pub struct User {
    #[orm(primary_key, identity, default = "1")]
    pub id: i64,
    #[orm(skip, unique)]
    pub cache: String,
    #[orm(on_delete = "cascade")]
    pub owner: i64,
    #[orm(unique, unique)]
    pub email: String,
    #[orm(on_delete = "explode", foreign_key = User::id)]
    pub parent: i64,
}

fn main() {}
