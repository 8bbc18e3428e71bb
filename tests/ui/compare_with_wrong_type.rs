use orm::Model;

#[derive(Model, Debug, Clone)]
pub struct User {
    #[orm(primary_key)]
    pub id: i64,
    pub name: String,
}

fn main() {
    let _ = User::id.eq("sandy");
    let _ = User::name.eq(42);
}
