use orm::Model;

#[derive(Model, Debug, Clone)]
pub struct User {
    #[orm(primary_key)]
    pub id: i64,
}

#[derive(Model, Debug, Clone)]
pub struct Post {
    #[orm(primary_key)]
    pub id: i64,
    #[orm(foreign_key = User::uid)]
    pub user_id: i64,
    #[orm(foreign_key = Nobody::id)]
    pub nobody_id: i64,
}

fn main() {}
