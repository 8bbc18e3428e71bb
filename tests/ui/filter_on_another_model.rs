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
    pub user_id: i64,
}

#[derive(Model, Debug, Clone)]
pub struct Tag {
    #[orm(primary_key)]
    pub id: i64,
}

async fn posts_of(session: &mut orm::Session) {
    let _ = session.query::<User>().filter(Post::id.eq(1)).all().await;
    let _ = session.query::<User>().order_by(Post::id).all().await;
    let _ = session.query::<User>().join::<Post>().filter(Tag::id.eq(1)).all().await;
    let _ = session.query::<User>().join_on(User::id, Post::user_id).all().await;
}

async fn joined_on_different_types(session: &mut orm::Session) {
    #[derive(Model, Debug, Clone)]
    pub struct Named {
        #[orm(primary_key)]
        pub name: String,
    }
    let _ = session.query::<User>().join_on(User::id, Named::name).all().await;
}

fn main() {
    let _ = posts_of;
    let _ = joined_on_different_types;
}
