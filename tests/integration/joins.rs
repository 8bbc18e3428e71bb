//! Joins: the ON condition read from foreign keys or named, conditions and
//! order on either model, pairs merged into the identity map, left joins.

use orm::prelude::*;

use crate::common::EchoCapture;
use crate::models::{setup, Author, Book, Comment, Post, User};

/// sandy has three posts, patrick one, gary none.
async fn seeded() -> (crate::common::TestDb, Session) {
    let db = setup().await;
    let mut session = sessionmaker(&db.engine).session();
    let users: Vec<_> = ["sandy", "patrick", "gary"]
        .into_iter()
        .map(|name| session.add(User::new(name)))
        .collect();
    session.flush().await.unwrap();
    let (sandy, patrick) = (users[0].read().id, users[1].read().id);
    for (user_id, title, score) in [
        (sandy, "acorns", 3.0),
        (sandy, "karate", 9.5),
        (sandy, "texas", 7.0),
        (patrick, "rock", 1.0),
    ] {
        session.add(Post {
            id: 0,
            user_id,
            title: title.to_owned(),
            score,
        });
    }
    session.commit().await.unwrap();
    (db, session)
}

fn titles_and_names(rows: &[(Tracked<User>, Tracked<Post>)]) -> Vec<(String, String)> {
    rows.iter()
        .map(|(user, post)| (user.read().name.clone(), post.read().title.clone()))
        .collect()
}

#[tokio::test]
async fn join_reads_the_condition_from_the_foreign_key_and_filters_both_sides() {
    let (_db, mut session) = seeded().await;
    let echo = EchoCapture::start();
    let rows = session
        .query::<User>()
        .join::<Post>()
        .filter(User::name.ne("patrick"))
        .filter(Post::score.gt(5.0))
        .order_by(Post::score.desc())
        .limit(10)
        .all()
        .await
        .unwrap();
    assert_eq!(
        titles_and_names(&rows),
        [
            ("sandy".to_owned(), "karate".to_owned()),
            ("sandy".to_owned(), "texas".to_owned())
        ]
    );
    let select = echo
        .take_events()
        .into_iter()
        .find(|e| e.sql.starts_with("SELECT"))
        .expect("the select was echoed");
    assert!(
        select.sql.contains(
            r#" FROM "users" JOIN "posts" ON "posts"."user_id" = "users"."id" WHERE ("users"."name" <> $1 AND "posts"."score" > $2) ORDER BY "posts"."score" DESC LIMIT $3"#
        ),
        "{}",
        select.sql
    );
    assert_eq!(select.params, Some(3));
}

#[tokio::test]
async fn joined_objects_enter_the_identity_map_once_per_row() {
    let (_db, mut session) = seeded().await;
    let rows = session
        .query::<User>()
        .join::<Post>()
        .filter(User::name.eq("sandy"))
        .all()
        .await
        .unwrap();
    assert_eq!(rows.len(), 3);
    // One user object for the three rows that carry sandy...
    assert!(rows.iter().all(|(user, _)| user.ptr_eq(&rows[0].0)));
    // ...and it is the session's object for that key, as are the posts.
    let sandy_id = rows[0].0.read().id;
    let sandy = session.get::<User>(sandy_id).await.unwrap().unwrap();
    assert!(sandy.ptr_eq(&rows[0].0));
    let post_id = rows[1].1.read().id;
    let post = session.get::<Post>(post_id).await.unwrap().unwrap();
    assert!(post.ptr_eq(&rows[1].1));

    // Changes made through a joined object are flushed like any other.
    rows[0].1.write().title = "acorns, revised".to_owned();
    session.commit().await.unwrap();
    let stored = session
        .raw_query("SELECT title FROM posts WHERE id = $1", &[&rows[0].1.read().id])
        .await
        .unwrap();
    assert_eq!(stored[0].get::<_, String>(0), "acorns, revised");
}

#[tokio::test]
async fn join_from_the_child_side_follows_the_same_foreign_key() {
    let (_db, mut session) = seeded().await;
    let (post, author) = session
        .query::<Post>()
        .join::<User>()
        .filter(Post::title.eq("rock"))
        .one()
        .await
        .unwrap();
    assert_eq!(post.read().title, "rock");
    assert_eq!(author.read().name, "patrick");
    assert_eq!(post.read().user_id, author.read().id);
}

#[tokio::test]
async fn left_join_keeps_rows_without_a_match() {
    let (_db, mut session) = seeded().await;
    let rows = session
        .query::<User>()
        .left_join::<Post>()
        .order_by(User::name)
        .order_by(Post::title)
        .all()
        .await
        .unwrap();
    let seen: Vec<(String, Option<String>)> = rows
        .iter()
        .map(|(user, post)| (user.read().name.clone(), post.as_ref().map(|p| p.read().title.clone())))
        .collect();
    assert_eq!(
        seen,
        [
            ("gary".to_owned(), None),
            ("patrick".to_owned(), Some("rock".to_owned())),
            ("sandy".to_owned(), Some("acorns".to_owned())),
            ("sandy".to_owned(), Some("karate".to_owned())),
            ("sandy".to_owned(), Some("texas".to_owned())),
        ]
    );
    // The classic anti-join: users with no posts.
    let lonely = session
        .query::<User>()
        .left_join::<Post>()
        .filter(Post::id.is_null())
        .all()
        .await
        .unwrap();
    assert_eq!(lonely.len(), 1);
    assert_eq!(lonely[0].0.read().name, "gary");
    assert!(lonely[0].1.is_none());
}

#[tokio::test]
async fn count_first_and_one_work_on_joins() {
    let (_db, mut session) = seeded().await;
    assert_eq!(session.query::<User>().join::<Post>().count().await.unwrap(), 4);
    assert_eq!(session.query::<User>().left_join::<Post>().count().await.unwrap(), 5);
    assert_eq!(
        session
            .query::<User>()
            .join::<Post>()
            .filter(User::name.eq("sandy"))
            .limit(2)
            .count()
            .await
            .unwrap(),
        2
    );
    let (_, top) = session
        .query::<User>()
        .join::<Post>()
        .order_by(Post::score.desc())
        .first()
        .await
        .unwrap()
        .expect("a row");
    assert_eq!(top.read().title, "karate");
    match session
        .query::<User>()
        .join::<Post>()
        .filter(User::name.eq("sandy"))
        .one()
        .await
    {
        Err(Error::MultipleRowsFound { table }) => assert_eq!(table, "users"),
        other => panic!("expected MultipleRowsFound, got {other:?}"),
    }
    match session
        .query::<User>()
        .join::<Post>()
        .filter(User::name.eq("gary"))
        .one()
        .await
    {
        Err(Error::NotFound { table }) => assert_eq!(table, "users"),
        other => panic!("expected NotFound, got {other:?}"),
    }
}

#[tokio::test]
async fn a_join_sees_unflushed_changes_when_autoflush_is_on() {
    let (_db, mut session) = seeded().await;
    let gary = session
        .query::<User>()
        .filter(User::name.eq("gary"))
        .one()
        .await
        .unwrap();
    let gary_id = gary.read().id;
    session.add(Post {
        id: 0,
        user_id: gary_id,
        title: "meow".to_owned(),
        score: 2.0,
    });
    let rows = session
        .query::<User>()
        .join::<Post>()
        .filter(User::id.eq(gary_id))
        .all()
        .await
        .unwrap();
    assert_eq!(titles_and_names(&rows), [("gary".to_owned(), "meow".to_owned())]);
}

#[tokio::test]
async fn join_on_names_the_columns() {
    let db = setup().await;
    let mut session = sessionmaker(&db.engine).session();
    session.add(Author {
        id: 7,
        name: "Tolkien".to_owned(),
    });
    for (isbn, title) in [("isbn-1", "The Hobbit"), ("isbn-2", "Silmarillion")] {
        session.add(Book {
            isbn: isbn.to_owned(),
            author_id: 7,
            title: title.to_owned(),
        });
    }
    // A column pair no foreign key declares: authors matched to users by name.
    session.add(User::new("Tolkien"));
    session.commit().await.unwrap();

    let rows = session
        .query::<Author>()
        .join_on(Author::id, Book::author_id)
        .order_by(Book::isbn.desc())
        .all()
        .await
        .unwrap();
    let titles: Vec<String> = rows.iter().map(|(_, b)| b.read().title.clone()).collect();
    assert_eq!(titles, ["Silmarillion", "The Hobbit"]);

    let (author, user) = session
        .query::<Author>()
        .join_on(Author::name, User::name)
        .one()
        .await
        .unwrap();
    assert_eq!(author.read().id, 7);
    assert_eq!(user.read().name, "Tolkien");

    let rows = session
        .query::<User>()
        .left_join_on(User::name, Author::name)
        .filter(User::name.eq("Tolkien"))
        .all()
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].1.as_ref().map(|a| a.read().id), Some(7));
}

#[tokio::test]
async fn joins_without_one_foreign_key_or_of_a_table_with_itself_are_errors_naming_them() {
    let db = setup().await;
    let mut session = sessionmaker(&db.engine).session();
    match session.query::<User>().join::<Author>().all().await {
        Err(Error::Metadata(message)) => {
            assert!(message.contains("User") && message.contains("Author"), "{message}");
            assert!(message.contains("join_on"), "{message}");
        }
        other => panic!("expected a metadata error naming both models, got {other:?}"),
    }
    match session.query::<User>().left_join::<User>().count().await {
        Err(Error::Metadata(message)) => assert!(message.contains("itself"), "{message}"),
        other => panic!("expected a metadata error for a self-join, got {other:?}"),
    }
    // Nothing reached the server: the session is still usable.
    assert_eq!(session.query::<User>().count().await.unwrap(), 0);
}

#[tokio::test]
async fn joins_chain_across_three_models_as_nested_pairs() {
    let (_db, mut session) = seeded().await;
    let users = session.query::<User>().order_by(User::name).all().await.unwrap();
    let (gary, patrick) = (users[0].read().id, users[1].read().id);
    let karate = session
        .query::<Post>()
        .filter(Post::title.eq("karate"))
        .one()
        .await
        .unwrap();
    let karate_id = karate.read().id;
    for (user_id, body) in [(patrick, "nice moves"), (gary, "meow")] {
        session.add(Comment {
            id: 0,
            post_id: karate_id,
            user_id,
            body: body.to_owned(),
        });
    }
    session.commit().await.unwrap();

    // Author, post, comment: the comment is linked to users and posts both,
    // so the ON columns are named; the left column may be either model's.
    let echo = EchoCapture::start();
    let rows = session
        .query::<User>()
        .join::<Post>()
        .join_on(Post::id, Comment::post_id)
        .filter(Comment::body.ne("spam"))
        .order_by(Comment::body)
        .all()
        .await
        .unwrap();
    let seen: Vec<(String, String, String)> = rows
        .iter()
        .map(|((author, post), comment)| {
            (
                author.read().name.clone(),
                post.read().title.clone(),
                comment.read().body.clone(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("sandy".to_owned(), "karate".to_owned(), "meow".to_owned()),
            ("sandy".to_owned(), "karate".to_owned(), "nice moves".to_owned()),
        ]
    );
    // The post is the session's object for its row, in both rows.
    assert!(rows.iter().all(|((_, post), _)| post.ptr_eq(&karate)));
    let select = echo
        .take()
        .into_iter()
        .find(|s| s.starts_with("SELECT"))
        .expect("echoed");
    assert!(
        select.contains(
            r#" FROM "users" JOIN "posts" ON "posts"."user_id" = "users"."id" JOIN "comments" ON "posts"."id" = "comments"."post_id" WHERE "comments"."body" <> $1"#
        ),
        "{select}"
    );

    // Inferred from the one foreign key linking comments with the query's
    // models, here posts (users are not selected).
    let rows = session
        .query::<Post>()
        .left_join::<Comment>()
        .filter(Post::title.is_in(["karate", "rock"]))
        .order_by(Post::title)
        .order_by(Comment::body)
        .all()
        .await
        .unwrap();
    let seen: Vec<(String, Option<String>)> = rows
        .iter()
        .map(|(post, comment)| {
            (
                post.read().title.clone(),
                comment.as_ref().map(|c| c.read().body.clone()),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("karate".to_owned(), Some("meow".to_owned())),
            ("karate".to_owned(), Some("nice moves".to_owned())),
            ("rock".to_owned(), None),
        ]
    );

    // A left join in the middle: gary has no post, and his comment's columns
    // are still read after the (NULL) post columns.
    let rows = session
        .query::<User>()
        .left_join::<Post>()
        .join_on(User::id, Comment::user_id)
        .filter(User::name.eq("gary"))
        .all()
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    let ((user, post), comment) = &rows[0];
    assert_eq!(user.read().name, "gary");
    assert!(post.is_none());
    assert_eq!(comment.read().body, "meow");
    assert_eq!(comment.read().post_id, karate_id);

    // Comments link to both users and posts: inferring is ambiguous.
    match session.query::<User>().join::<Post>().join::<Comment>().count().await {
        Err(Error::Metadata(message)) => {
            assert!(message.contains("2 foreign keys"), "{message}");
            assert!(message.contains("join_on"), "{message}");
        }
        other => panic!("expected an ambiguity error, got {other:?}"),
    }
    // A model already selected cannot be joined again.
    match session.query::<User>().join::<Post>().join::<User>().count().await {
        Err(Error::Metadata(message)) => assert!(message.contains("already selects"), "{message}"),
        other => panic!("expected a self-join error, got {other:?}"),
    }
    // Three models, counted and bounded like any query.
    assert_eq!(
        session
            .query::<User>()
            .join::<Post>()
            .left_join_on(Post::id, Comment::post_id)
            .count()
            .await
            .unwrap(),
        5
    );
}

/// A join reuses the left side's objects from the row before when its key
/// repeats; a parent that comes back after another one, or that a commit
/// expired, must still be the session's one object, refreshed.
#[tokio::test]
async fn a_parent_on_consecutive_or_scattered_rows_is_one_object_refreshed_once() {
    let (db, mut session) = seeded().await;
    let patrick = session
        .query::<User>()
        .filter(User::name.eq("patrick"))
        .one()
        .await
        .unwrap();
    session.commit().await.unwrap();
    // Behind the session's back: its objects are expired by the commit, so
    // the next load takes the new name.
    db.execute("UPDATE users SET name = 'sandra' WHERE name = 'sandy'")
        .await;

    // In title order: acorns, karate (sandy), rock (patrick), texas (sandy).
    let rows = session
        .query::<User>()
        .join::<Post>()
        .order_by(Post::title)
        .all()
        .await
        .unwrap();
    let names: Vec<String> = rows.iter().map(|(user, _)| user.read().name.clone()).collect();
    assert_eq!(names, ["sandra", "sandra", "patrick", "sandra"]);
    assert!(rows[0].0.ptr_eq(&rows[1].0) && rows[1].0.ptr_eq(&rows[3].0));
    assert!(rows[2].0.ptr_eq(&patrick));
    assert!(!rows[0].0.ptr_eq(&patrick));
    let posts: Vec<String> = rows.iter().map(|(_, post)| post.read().title.clone()).collect();
    assert_eq!(posts, ["acorns", "karate", "rock", "texas"]);
    for pair in rows.windows(2) {
        assert!(!pair[0].1.ptr_eq(&pair[1].1), "one post per row");
    }
}

/// Three users with 50 posts each, the posts' keys interleaved across the
/// users (post 1 is sandy's, 2 patrick's, 3 gary's, ...).
async fn many_posts() -> crate::common::TestDb {
    let db = setup().await;
    db.execute(
        "INSERT INTO users (name) VALUES ('sandy'), ('patrick'), ('gary'); \
         INSERT INTO posts (user_id, title, score) \
         SELECT 1 + (i - 1) % 3, 'post ' || i, i FROM generate_series(1, 150) AS i",
    )
    .await;
    db
}

/// Every post with its `J`s, by a join from the posts' side, in post order.
async fn posts_joined_to<J: Model>(session: &mut Session) -> Vec<(Tracked<Post>, Tracked<J>)> {
    session
        .query::<Post>()
        .join::<J>()
        .order_by(Post::id)
        .all()
        .await
        .unwrap()
}

/// A join holds its joined model's new objects back and tracks them 64 at a
/// time: rows still come out in order, each with its own row's object,
/// objects the session held before the join among them, and one object per
/// row whether it repeats within a block or across blocks.
#[tokio::test]
async fn a_join_tracks_new_joined_objects_in_blocks_and_keeps_row_order() {
    let db = many_posts().await;
    let mut session = sessionmaker(&db.engine).session();
    // Held before the join, in the first, second and third block's rows.
    let held: Vec<Tracked<Post>> = {
        let mut held = Vec::new();
        for id in [4, 100, 149] {
            held.push(session.get::<Post>(id).await.unwrap().unwrap());
        }
        held
    };

    let rows = session
        .query::<User>()
        .join::<Post>()
        .order_by(User::id)
        .order_by(Post::id)
        .all()
        .await
        .unwrap();
    let expected = db
        .strings(
            "SELECT u.name || ':' || p.id || ':' || p.title FROM users u JOIN posts p ON p.user_id = u.id \
             ORDER BY u.id, p.id",
        )
        .await;
    let got: Vec<String> = rows
        .iter()
        .map(|(user, post)| format!("{}:{}:{}", user.read().name, post.read().id, post.read().title))
        .collect();
    assert_eq!(got, expected);
    for held in &held {
        let id = held.read().id;
        let (_, post) = rows.iter().find(|(_, post)| post.read().id == id).unwrap();
        assert!(post.ptr_eq(held), "post {id} is the object held before the join");
    }
    let echo = EchoCapture::start();
    for (_, post) in &rows {
        let id = post.read().id;
        assert!(session.get::<Post>(id).await.unwrap().unwrap().ptr_eq(post));
    }
    assert!(echo.take().is_empty(), "every joined post is in the identity map");

    // From the child side, in a fresh session, each user comes back on
    // every one of its rows: repeated within the first block, and in later
    // blocks after it was made. The posts, on the left, are gathered in
    // blocks too; one of them was held before the join.
    let mut session = sessionmaker(&db.engine).session();
    let held = session.get::<Post>(70).await.unwrap().unwrap();
    let rows = posts_joined_to::<User>(&mut session).await;
    assert_eq!(rows.len(), 150);
    for (i, (post, user)) in rows.iter().enumerate() {
        assert_eq!(post.read().id as usize, i + 1);
        assert_eq!(post.read().title, format!("post {}", i + 1));
        assert!(user.ptr_eq(&rows[i % 3].1), "row {i}");
    }
    assert!(rows[69].0.ptr_eq(&held));
    let echo = EchoCapture::start();
    for (post, _) in &rows {
        let id = post.read().id;
        assert!(session.get::<Post>(id).await.unwrap().unwrap().ptr_eq(post));
    }
    assert!(echo.take().is_empty(), "every post is in the identity map");
    // A left side repeated on consecutive rows (a post with three comments)
    // is one object, whether its block was made before the repeat or not:
    // the 64th comment, the first of post 22, fills a block between two of
    // that post's rows.
    db.execute(
        "INSERT INTO comments (post_id, user_id, body) \
         SELECT p, 1, 'comment ' || c FROM generate_series(1, 150) AS p, generate_series(1, 3) AS c",
    )
    .await;
    let commented = posts_joined_to::<Comment>(&mut session).await;
    assert_eq!(commented.len(), 450);
    for (i, (post, _)) in commented.iter().enumerate() {
        assert!(post.ptr_eq(&rows[i / 3].0), "row {i}");
    }
    let mut fresh_session = sessionmaker(&db.engine).session();
    let fresh = posts_joined_to::<Comment>(&mut fresh_session).await;
    for (i, (post, comment)) in fresh.iter().enumerate() {
        assert!(post.ptr_eq(&fresh[i - i % 3].0), "row {i}");
        assert_eq!(comment.read().post_id, post.read().id);
    }
    // In a fresh session the posts come in key order and are gathered
    // without hashing; a lookup then finds each.
    let echo = EchoCapture::start();
    for (post, comment) in fresh.iter().step_by(7) {
        let (post_id, comment_id) = (post.read().id, comment.read().id);
        assert!(fresh_session.get::<Post>(post_id).await.unwrap().unwrap().ptr_eq(post));
        assert!(fresh_session
            .get::<Comment>(comment_id)
            .await
            .unwrap()
            .unwrap()
            .ptr_eq(comment));
    }
    assert!(echo.take().is_empty(), "found in the identity maps");
    rows[7].1.write().email = Some("patrick@example.com".to_owned());
    session.commit().await.unwrap();
    assert_eq!(
        db.strings("SELECT coalesce(email, '-') FROM users ORDER BY id").await,
        ["-", "patrick@example.com", "-"]
    );
}

/// Posts read through a view, `view_posts`, which each test defines as
/// it needs (to stall the server, to hide a title).
mod views {
    use orm::prelude::*;

    use crate::models::User;

    orm::declarative_base!(pub ViewBase);

    #[derive(Model, Debug, Clone)]
    #[orm(table = "view_posts", base = ViewBase)]
    pub struct ViewPost {
        #[orm(primary_key)]
        pub id: i32,
        #[orm(foreign_key = User::id)]
        pub user_id: i64,
        pub title: String,
    }
}

/// A join given up in the middle of its rows (its future dropped) still
/// tracks the joined objects it held back, whose slots the identity map
/// already holds, and the session goes on after a rollback.
#[tokio::test]
async fn a_join_given_up_mid_rows_leaves_a_session_that_rolls_back_and_goes_on() {
    use views::ViewPost;

    let db = many_posts().await;
    // Rows wide enough that the server sends the first ones before it
    // stalls on post 120 for two seconds.
    db.execute(
        "CREATE VIEW view_posts AS SELECT id, user_id, \
         CASE WHEN id = 120 THEN (SELECT repeat('x', 500) FROM pg_sleep(2)) ELSE repeat('x', 500) END AS title \
         FROM posts; ANALYZE posts",
    )
    .await;
    let mut session = sessionmaker(&db.engine).session();
    let load = session.query::<ViewPost>().join::<User>().all();
    let given_up = tokio::time::timeout(std::time::Duration::from_millis(700), load).await;
    assert!(given_up.is_err(), "the load waits on the stalled row");

    // The merger, dropped with the load, tracked the users it had met on
    // the rows before the stall (their slots in the identity map name the
    // block it was gathering), and nothing panicked. The session itself
    // refuses to go on until it is rolled back, which forgets them.
    assert!(matches!(session.get::<User>(1).await, Err(Error::InvalidState(_))));

    // The session goes on after a rollback.
    session.rollback().await.unwrap();
    let again = session.query::<User>().order_by(User::id).all().await.unwrap();
    assert_eq!(again.len(), 3);
}

/// A row that cannot be decoded midway through a join fails the load with
/// an error naming the column; the objects of the rows before it, held back
/// for their blocks, are tracked all the same, and found without a query.
#[tokio::test]
async fn a_join_failing_on_a_row_names_the_column_and_keeps_the_rows_before() {
    use views::ViewPost;

    let db = many_posts().await;
    db.execute(
        "CREATE VIEW view_posts AS SELECT id, user_id, CASE WHEN id = 100 THEN NULL ELSE title END AS title \
         FROM posts",
    )
    .await;
    let mut session = sessionmaker(&db.engine).session();
    let failed = session
        .query::<ViewPost>()
        .join::<User>()
        .order_by(ViewPost::id)
        .all()
        .await;
    crate::common::assert_type_mismatch(failed, "view_posts", "title");

    let echo = EchoCapture::start();
    for id in [1, 64, 65, 99] {
        let post = session.get::<ViewPost>(id).await.unwrap().unwrap();
        assert_eq!(post.read().title, format!("post {id}"));
    }
    for id in 1..=3 {
        assert_eq!(session.get::<User>(id).await.unwrap().unwrap().read().id, id);
    }
    assert!(
        echo.take().is_empty(),
        "the rows before the failure are in the identity map"
    );
}

/// Parents and children whose values count their drops, for a join's
/// blocks to be shown freed exactly once.
mod counted_join {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use orm::prelude::*;

    orm::declarative_base!(pub CountedJoinBase);

    pub static PARENTS_DROPPED: AtomicUsize = AtomicUsize::new(0);
    pub static CHILDREN_DROPPED: AtomicUsize = AtomicUsize::new(0);

    #[derive(Model, Debug, Clone)]
    #[orm(table = "counted_parents", base = CountedJoinBase)]
    pub struct Parent {
        #[orm(primary_key)]
        pub id: i64,
        pub name: String,
    }

    #[derive(Model, Debug, Clone)]
    #[orm(table = "counted_children", base = CountedJoinBase)]
    pub struct Child {
        #[orm(primary_key)]
        pub id: i64,
        #[orm(foreign_key = Parent::id)]
        pub parent_id: i64,
        pub name: String,
    }

    impl Drop for Parent {
        fn drop(&mut self) {
            PARENTS_DROPPED.fetch_add(1, Ordering::Relaxed);
        }
    }

    impl Drop for Child {
        fn drop(&mut self) {
            CHILDREN_DROPPED.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Children joined to their parents, a parent's children on consecutive
/// rows: the joined side repeats the row before's object, in the block
/// being gathered (the first parent, over 50 rows), across the children's
/// block boundary at row 64 (the second parent), and after its block was
/// made. Each row has its own child and its parent's one object, and once
/// the rows and the session go, every value is freed exactly once.
#[tokio::test]
async fn a_joined_object_repeated_on_consecutive_rows_is_one_object_freed_once() {
    use counted_join::{Child, CountedJoinBase, Parent, CHILDREN_DROPPED, PARENTS_DROPPED};
    use std::sync::atomic::Ordering;

    let db = crate::common::test_db().await;
    CountedJoinBase::create_all(&db.engine).await.unwrap();
    db.execute(
        "INSERT INTO counted_parents SELECT i, 'parent ' || i FROM generate_series(1, 3) AS i; \
         INSERT INTO counted_children SELECT i, 1 + (i - 1) / 50, 'child ' || i FROM generate_series(1, 150) AS i",
    )
    .await;
    let mut session = sessionmaker(&db.engine).session();
    let rows = session
        .query::<Child>()
        .join::<Parent>()
        .order_by(Child::parent_id)
        .order_by(Child::id)
        .all()
        .await
        .unwrap();
    assert_eq!(rows.len(), 150);
    for (i, (child, parent)) in rows.iter().enumerate() {
        let (child, parent_handle) = (child.read(), parent);
        assert_eq!(child.id as usize, i + 1);
        assert_eq!(child.name, format!("child {}", i + 1));
        let parent = parent_handle.read();
        assert_eq!(parent.id, child.parent_id);
        assert_eq!(parent.name, format!("parent {}", parent.id));
        assert!(parent_handle.ptr_eq(&rows[i - i % 50].1), "row {i}");
    }
    assert!(!rows[0].1.ptr_eq(&rows[50].1) && !rows[50].1.ptr_eq(&rows[100].1));
    let echo = EchoCapture::start();
    for id in 1..=3 {
        let parent = session.get::<Parent>(id).await.unwrap().unwrap();
        assert!(parent.ptr_eq(&rows[(id as usize - 1) * 50].1));
    }
    assert!(echo.take().is_empty(), "every parent is in the identity map");
    assert_eq!(PARENTS_DROPPED.load(Ordering::SeqCst), 0, "nothing freed while held");
    assert_eq!(CHILDREN_DROPPED.load(Ordering::SeqCst), 0, "nothing freed while held");

    session.close().await.unwrap();
    drop(rows);
    assert_eq!(
        PARENTS_DROPPED.load(Ordering::SeqCst),
        3,
        "each parent freed exactly once"
    );
    assert_eq!(
        CHILDREN_DROPPED.load(Ordering::SeqCst),
        150,
        "each child freed exactly once"
    );
}

/// A joined model whose keys ascend, then fall back: posts 1..=200 by users
/// 11..=210 in order (three blocks of 64 kept unhashed, users 203..=210
/// still being gathered), then posts by the first and last user of each
/// kept block, by a gathered one, by a user not seen yet (3), and by that
/// user again. Each row gets its own user's one object, whichever way the
/// map found it, and `get` finds the same objects afterwards, before and
/// after a change hashes every key.
#[tokio::test]
async fn joined_keys_out_of_order_find_the_objects_of_earlier_blocks() {
    let db = setup().await;
    let late = [11, 74, 75, 138, 139, 202, 210, 3, 3];
    db.execute(&format!(
        "INSERT INTO users (name) SELECT 'user ' || i FROM generate_series(1, 210) AS i; \
         INSERT INTO posts (user_id, title, score) \
         SELECT 10 + i, 'post ' || i, i FROM generate_series(1, 200) AS i; \
         INSERT INTO posts (user_id, title, score) SELECT u, 'late', 0 FROM unnest(ARRAY{late:?}) AS u"
    ))
    .await;
    let mut session = sessionmaker(&db.engine).session();
    let rows = posts_joined_to::<User>(&mut session).await;
    assert_eq!(rows.len(), 209);
    let author_ids: Vec<i64> = rows.iter().map(|(post, _)| post.read().user_id).collect();
    assert_eq!(author_ids[200..], late);
    for (post, user) in &rows {
        assert_eq!(user.read().id, post.read().user_id, "post {}", post.read().id);
    }
    // One object per user: a late row shares its user's earlier row's object.
    let first_row_of = |user_id: i64| author_ids.iter().position(|&id| id == user_id).unwrap();
    for (i, &user_id) in author_ids.iter().enumerate() {
        assert!(
            rows[i].1.ptr_eq(&rows[first_row_of(user_id)].1),
            "row {i}, user {user_id}"
        );
    }
    assert!(!rows[206].1.ptr_eq(&rows[205].1));
    // Found by get, unhashed keys and hashed ones alike.
    for (i, &user_id) in author_ids.iter().enumerate() {
        let found = session.get::<User>(user_id).await.unwrap().unwrap();
        assert!(found.ptr_eq(&rows[i].1), "user {user_id}");
    }
    // A change hashes every key; the map still holds the same objects.
    session.delete(&rows[0].1).unwrap();
    for (i, &user_id) in author_ids.iter().enumerate().skip(1) {
        if user_id != 11 {
            let found = session.get::<User>(user_id).await.unwrap().unwrap();
            assert!(found.ptr_eq(&rows[i].1), "user {user_id} after a delete");
        }
    }
    assert!(session.get::<User>(11).await.unwrap().is_none());
}

/// A statement's loads make room in the identity maps for as many objects
/// as its last load brought: the same join run again, larger, smaller and
/// larger again, in fresh sessions and in one that already holds posts,
/// must still give each row its own objects.
#[tokio::test]
async fn a_join_run_again_at_other_sizes_gives_each_row_its_objects() {
    let db = setup().await;
    db.execute(
        "INSERT INTO users (id, name) OVERRIDING SYSTEM VALUE SELECT i, 'user ' || i FROM generate_series(1, 60) AS i",
    )
    .await;
    // Post keys out of user order, so the join hashes them: user u's
    // posts are u, u + 60, u + 120, ...
    db.execute(
        "INSERT INTO posts (id, user_id, title, score) OVERRIDING SYSTEM VALUE \
         SELECT i, 1 + (i - 1) % 60, 'post ' || i, i FROM generate_series(1, 600) AS i",
    )
    .await;
    let mut held = sessionmaker(&db.engine).session();
    let earlier = held
        .query::<Post>()
        .filter(Post::id.le(30))
        .order_by(Post::id)
        .all()
        .await
        .unwrap();
    for users in [60, 2, 60, 59] {
        for fresh in [true, false] {
            let mut new_session = sessionmaker(&db.engine).session();
            let session = if fresh { &mut new_session } else { &mut held };
            let rows = session
                .query::<User>()
                .left_join::<Post>()
                .filter(User::id.le(users))
                .order_by(User::id)
                .order_by(Post::id)
                .all()
                .await
                .unwrap();
            assert_eq!(rows.len(), users as usize * 10, "{users} users");
            let mut seen = std::collections::HashSet::new();
            for (user, post) in &rows {
                let post = post.as_ref().expect("every user has posts");
                let (user_id, post_id) = (user.read().id, post.read().id);
                assert_eq!(post.read().user_id, user_id);
                assert_eq!((post_id - 1) % 60 + 1, user_id as i32);
                assert!(seen.insert(post_id), "post {post_id} twice");
                if !fresh && post_id <= 30 {
                    assert!(post.ptr_eq(&earlier[post_id as usize - 1]), "post {post_id}");
                }
            }
            new_session.close().await.unwrap();
        }
    }
}
