use orm::Model;

#[derive(Model, Debug, Clone)]
#[orm(tabel = "users")]
pub struct User {
    #[orm(primary, identity)]
    pub id: i64,
    #[orm(nullable)]
    pub name: String,
}

fn main() {}
