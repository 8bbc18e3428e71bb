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
}

async fn posts_of(session: &mut orm::Session) {
    let _ = session.query::<User>().filter(Post::id.eq(1)).all().await;
}

fn main() {
    let _ = posts_of;
}
