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
    #[orm(foreign_key = User::id)]
    pub user_id: i32,
}

fn main() {}
