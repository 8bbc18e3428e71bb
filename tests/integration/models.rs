//! Models shared by the session and query tests, on a base of their own.

use orm::prelude::*;

orm::declarative_base!(pub TestBase);

#[derive(Model, Debug, Clone, PartialEq)]
#[orm(table = "users", base = TestBase)]
pub struct User {
    #[orm(primary_key, identity)]
    pub id: i64,
    #[orm(unique, length = 50)]
    pub name: String,
    pub email: Option<String>,
    #[orm(default = "true")]
    pub active: Option<bool>,
    #[orm(default = "'member'")]
    pub role: Option<String>,
}

impl User {
    pub fn new(name: &str) -> Self {
        User {
            id: 0,
            name: name.to_owned(),
            email: None,
            active: None,
            role: None,
        }
    }
}

#[derive(Model, Debug, Clone, PartialEq)]
#[orm(table = "posts", base = TestBase)]
pub struct Post {
    #[orm(primary_key, identity)]
    pub id: i32,
    #[orm(foreign_key = User::id, on_delete = "cascade", index)]
    pub user_id: i64,
    pub title: String,
    pub score: f64,
}

impl Post {
    /// Post number `i` of user `user_id`: titled "post {i}", scored `i`.
    pub fn numbered(user_id: i64, i: i32) -> Self {
        Post {
            id: 0,
            user_id,
            title: format!("post {i}"),
            score: f64::from(i),
        }
    }
}

/// Adds and commits the user "sandy", for posts to belong to; returns the key.
pub async fn add_author(session: &mut Session) -> i64 {
    let author = session.add(User::new("sandy"));
    session.commit().await.expect("commit the author");
    let id = author.read().id;
    id
}

/// Linked to both users and posts: joining it to a query of both needs
/// the columns named.
#[derive(Model, Debug, Clone, PartialEq)]
#[orm(table = "comments", base = TestBase)]
pub struct Comment {
    #[orm(primary_key, identity)]
    pub id: i64,
    #[orm(foreign_key = Post::id, on_delete = "cascade")]
    pub post_id: i32,
    #[orm(foreign_key = User::id, on_delete = "cascade")]
    pub user_id: i64,
    pub body: String,
}

/// Keys chosen by the application: lets a test add a child before its parent.
#[derive(Model, Debug, Clone, PartialEq)]
#[orm(table = "authors", base = TestBase)]
pub struct Author {
    #[orm(primary_key)]
    pub id: i64,
    pub name: String,
}

#[derive(Model, Debug, Clone, PartialEq)]
#[orm(table = "books", base = TestBase)]
pub struct Book {
    #[orm(primary_key)]
    pub isbn: String,
    #[orm(foreign_key = Author::id)]
    pub author_id: i64,
    pub title: String,
}

/// A composite primary key.
#[derive(Model, Debug, Clone, PartialEq)]
#[orm(table = "memberships", base = TestBase)]
pub struct Membership {
    #[orm(primary_key)]
    pub group_id: i32,
    #[orm(primary_key)]
    pub user_key: i64,
    pub level: i16,
    pub note: Option<Vec<u8>>,
    #[orm(skip)]
    pub scratch: Vec<String>,
}

pub async fn setup() -> crate::common::TestDb {
    let db = crate::common::test_db().await;
    TestBase::create_all(&db.engine).await.expect("create_all");
    db
}
