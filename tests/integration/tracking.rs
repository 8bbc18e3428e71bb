//! How loads track objects: blocks of rows, identity across them, and the
//! states objects take when their session commits, closes or goes away.

use orm::prelude::*;

use crate::common::{assert_type_mismatch, test_db, EchoCapture};
use crate::models::{add_author, setup, Author, Post, User};

/// A module with a model that counts how many of its values were dropped,
/// to see when a session lets go of objects. Each test has its own module,
/// and so its own counter: tests run at once.
macro_rules! drop_counting_model {
    ($module:ident, $base:ident, $model:ident, $table:tt) => {
        mod $module {
            use std::sync::atomic::{AtomicUsize, Ordering};

            use orm::prelude::*;

            orm::declarative_base!(pub $base);

            pub static DROPPED: AtomicUsize = AtomicUsize::new(0);

            #[derive(Model, Debug, Clone)]
            #[orm(table = $table, base = $base)]
            pub struct $model {
                #[orm(primary_key)]
                pub id: i64,
                pub name: String,
            }

            impl Drop for $model {
                fn drop(&mut self) {
                    DROPPED.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    };
}

drop_counting_model!(counted, CountedBase, CountedRow, "counted_rows");

/// String fields over every column type the driver reads as plain text,
/// and over one it reads otherwise.
mod texts {
    use orm::prelude::*;

    orm::declarative_base!(pub TextsBase);

    #[derive(Model, Debug, Clone, PartialEq)]
    #[orm(table = "text_kinds", base = TextsBase)]
    pub struct TextKinds {
        pub plain: String,
        // The key in the middle: rows whose key was decoded first fill the
        // other fields around it.
        #[orm(primary_key)]
        pub id: i64,
        pub limited: String,
        pub padded: String,
        pub system_name: String,
        pub maybe: Option<String>,
    }
}

/// One field of each number type and a boolean, some nullable.
mod numbers {
    use orm::prelude::*;

    orm::declarative_base!(pub NumbersBase);

    #[derive(Model, Debug, Clone, PartialEq)]
    #[orm(table = "number_kinds", base = NumbersBase)]
    pub struct NumberKinds {
        #[orm(primary_key)]
        pub id: i32,
        pub small: i16,
        pub big: i64,
        pub single: f32,
        pub double: f64,
        pub flag: bool,
        pub maybe_big: Option<i64>,
        pub maybe_flag: Option<bool>,
    }
}

/// A model over a table without a primary key constraint, so that a
/// result may repeat a key.
mod loose {
    use orm::prelude::*;

    orm::declarative_base!(pub LooseBase);

    #[derive(Model, Debug, Clone, PartialEq)]
    #[orm(table = "loose_rows", base = LooseBase)]
    pub struct LooseRow {
        #[orm(primary_key)]
        pub id: i64,
        pub name: String,
    }
}

/// A model whose clone panics while `FAIL_CLONES` is set, as a hand-written
/// `Clone` might.
mod brittle {
    use std::sync::atomic::{AtomicBool, Ordering};

    use orm::prelude::*;

    orm::declarative_base!(pub BrittleBase);

    pub static FAIL_CLONES: AtomicBool = AtomicBool::new(false);

    #[derive(Model, Debug)]
    #[orm(table = "brittle_rows", base = BrittleBase)]
    pub struct BrittleRow {
        #[orm(primary_key)]
        pub id: i64,
        pub name: String,
    }

    impl Clone for BrittleRow {
        fn clone(&self) -> Self {
            assert!(!FAIL_CLONES.load(Ordering::Relaxed), "a clone that fails");
            BrittleRow {
                id: self.id,
                name: self.name.clone(),
            }
        }
    }
}

/// A fresh database whose `users` are "user 1" to "user {count}", with ids
/// 1 to `count` in the same order.
async fn users_named_in_order(count: i64) -> crate::common::TestDb {
    let db = setup().await;
    db.execute(&format!(
        "INSERT INTO users (name) SELECT 'user ' || i FROM generate_series(1, {count}) AS i"
    ))
    .await;
    db
}

#[tokio::test]
async fn a_large_load_keeps_row_order_and_meets_known_objects_where_they_fall() {
    let db = users_named_in_order(200).await;
    let mut session = sessionmaker(&db.engine).session();
    let fifth = session.get::<User>(5).await.unwrap().unwrap();
    let late = session.get::<User>(130).await.unwrap().unwrap();
    // Changed before the load: the session's object keeps the change.
    late.write().name = "renamed, not flushed".to_owned();

    let users = session.query::<User>().order_by(User::id).all().await.unwrap();
    let ids: Vec<i64> = users.iter().map(|u| u.read().id).collect();
    assert_eq!(ids, (1..=200).collect::<Vec<i64>>(), "the rows' order");
    assert!(users[4].ptr_eq(&fifth));
    assert!(users[129].ptr_eq(&late));
    assert_eq!(late.read().name, "renamed, not flushed");
    assert_eq!(users[130].read().name, "user 131");
    for pair in users.windows(2) {
        assert!(!pair[0].ptr_eq(&pair[1]), "one object per row");
    }

    // Every loaded object is in the identity map: no query for any of them.
    let echo = EchoCapture::start();
    for user in &users {
        let id = user.read().id;
        assert!(session.get::<User>(id).await.unwrap().unwrap().ptr_eq(user));
    }
    assert!(echo.take().is_empty(), "answered from the identity map");

    // A second load gives the same objects again.
    let again = session.query::<User>().order_by(User::id).all().await.unwrap();
    assert!(again.iter().zip(&users).all(|(a, b)| a.ptr_eq(b)));

    // Changes to objects of a block reach the database like any other.
    users[70].write().email = Some("seventy-one@example.com".to_owned());
    session.commit().await.unwrap();
    assert_eq!(
        db.strings("SELECT name || ' ' || email FROM users WHERE email IS NOT NULL")
            .await,
        ["user 71 seventy-one@example.com"]
    );
    assert_eq!(
        db.strings("SELECT name FROM users WHERE id = 130").await,
        ["renamed, not flushed"]
    );
}

/// A fresh session's load whose keys ascend is kept unindexed until
/// something looks a key up: every way of reaching its objects must find
/// them all the same.
#[tokio::test]
async fn a_load_in_key_order_is_found_by_every_later_lookup() {
    let db = users_named_in_order(200).await;
    let mut session = sessionmaker(&db.engine).session();
    let users = session.query::<User>().order_by(User::id).all().await.unwrap();
    assert_eq!(users.len(), 200);

    // A flush finds changes to its objects before any lookup.
    users[70].write().email = Some("seventy-one@example.com".to_owned());
    users[199].write().name = "last".to_owned();
    session.commit().await.unwrap();
    assert_eq!(
        db.strings("SELECT name || ' ' || coalesce(email, '-') FROM users WHERE id IN (71, 200) ORDER BY id")
            .await,
        ["user 71 seventy-one@example.com", "last -"]
    );

    // Loaded again, in another order: the same objects.
    let again = session.query::<User>().order_by(User::id.desc()).all().await.unwrap();
    assert!(again.iter().rev().zip(&users).all(|(a, b)| a.ptr_eq(b)));

    // Every object is in the identity map: no query for any of them.
    let echo = EchoCapture::start();
    for (user, id) in users.iter().zip(1..) {
        assert!(session.get::<User>(id).await.unwrap().unwrap().ptr_eq(user));
    }
    assert!(echo.take().is_empty(), "answered from the identity map");

    session.delete(&users[9]).unwrap();
    session.commit().await.unwrap();
    assert_eq!(db.strings("SELECT count(*)::text FROM users").await, ["199"]);
    assert_eq!(users[9].status(), ObjectStatus::Deleted);
}

/// A delete, the first thing after a load in key order, finds the object
/// in the unindexed blocks, and the next load does not bring it back.
#[tokio::test]
async fn a_delete_right_after_a_load_in_key_order_meets_its_object() {
    let db = users_named_in_order(100).await;
    let mut session = sessionmaker(&db.engine).session();
    let users = session.query::<User>().order_by(User::id).all().await.unwrap();
    session.delete(&users[99]).unwrap();
    let rest = session.query::<User>().order_by(User::id).all().await.unwrap();
    assert_eq!(rest.len(), 99, "the delete was flushed before the query");
    assert!(rest.iter().zip(&users).all(|(a, b)| a.ptr_eq(b)));
    session.commit().await.unwrap();
    assert_eq!(db.strings("SELECT count(*)::text FROM users").await, ["99"]);
}

#[tokio::test]
async fn rows_repeating_a_key_in_one_load_are_one_object() {
    let db = test_db().await;
    db.execute(
        "CREATE TABLE loose_rows (id bigint, name text); \
         INSERT INTO loose_rows VALUES (1, 'a'), (1, 'a'), (2, 'b'), (1, 'a')",
    )
    .await;
    let mut session = sessionmaker(&db.engine).session();
    let rows = session
        .query::<loose::LooseRow>()
        .order_by(loose::LooseRow::name)
        .all()
        .await
        .unwrap();
    assert_eq!(rows.len(), 4);
    assert!(rows[0].ptr_eq(&rows[1]) && rows[1].ptr_eq(&rows[2]));
    assert!(!rows[0].ptr_eq(&rows[3]));
    assert_eq!(rows[3].read().name, "b");
}

#[tokio::test]
async fn a_key_repeated_across_blocks_or_already_known_stays_one_object() {
    let db = test_db().await;
    // Seventy rows in name order; the 66th repeats the 10th's key.
    db.execute(
        "CREATE TABLE loose_rows (id bigint, name text); \
         INSERT INTO loose_rows SELECT CASE WHEN i = 66 THEN 10 ELSE i END, 'n' || lpad(i::text, 3, '0') \
         FROM generate_series(1, 70) AS i",
    )
    .await;
    let mut session = sessionmaker(&db.engine).session();
    let load = |rows: &[Tracked<loose::LooseRow>]| rows.iter().map(|r| r.read().id).collect::<Vec<i64>>();

    let rows = session
        .query::<loose::LooseRow>()
        .order_by(loose::LooseRow::name)
        .all()
        .await
        .unwrap();
    assert_eq!(rows.len(), 70);
    assert!(
        rows[9].ptr_eq(&rows[65]),
        "the first block's object stands for the later row"
    );
    assert_eq!(rows[65].read().name, "n010", "and keeps the first row's values");

    // Loaded again while the session holds objects: every row meets its object.
    let mut other = sessionmaker(&db.engine).session();
    let fifth = other.get::<loose::LooseRow>(5).await.unwrap().unwrap();
    let again = other
        .query::<loose::LooseRow>()
        .order_by(loose::LooseRow::name)
        .all()
        .await
        .unwrap();
    assert!(again[4].ptr_eq(&fifth));
    assert!(again[9].ptr_eq(&again[65]));
    assert_eq!(load(&again), load(&rows));
    let reloaded = session
        .query::<loose::LooseRow>()
        .order_by(loose::LooseRow::name)
        .all()
        .await
        .unwrap();
    assert!(reloaded.iter().zip(&rows).all(|(a, b)| a.ptr_eq(b)));
}

#[tokio::test]
async fn deleting_an_object_uses_its_loaded_key_even_while_borrowed_or_edited() {
    let db = setup().await;
    db.execute("INSERT INTO users (name) VALUES ('borrowed'), ('edited'), ('kept')")
        .await;
    let mut session = sessionmaker(&db.engine).session();
    let users = session.query::<User>().order_by(User::id).all().await.unwrap();
    {
        let guard = users[0].write();
        assert_eq!(guard.name, "borrowed");
        session.delete(&users[0]).unwrap();
    }
    // A changed key is refused at a flush, but a delete goes by the row's key.
    users[1].write().id = 999;
    session.delete(&users[1]).unwrap();
    session.commit().await.unwrap();
    assert_eq!(db.strings("SELECT name FROM users").await, ["kept"]);
}

#[tokio::test]
async fn a_long_lived_session_lets_go_of_the_objects_it_deleted() {
    use std::sync::atomic::Ordering;

    let db = test_db().await;
    db.execute(
        "CREATE TABLE counted_rows (id bigint PRIMARY KEY, name text NOT NULL); \
         INSERT INTO counted_rows SELECT i, 'row ' || i FROM generate_series(1, 100) AS i",
    )
    .await;
    // Without expiry the get below answers from the identity map, so no
    // value is replaced by a reload.
    let mut session = sessionmaker(&db.engine).expire_on_commit(false).session();
    let rows = session
        .query::<counted::CountedRow>()
        .order_by(counted::CountedRow::id)
        .all()
        .await
        .unwrap();
    let kept = rows[99].clone();
    for row in &rows[..99] {
        session.delete(row).unwrap();
    }
    session.commit().await.unwrap();
    let before = counted::DROPPED.load(Ordering::Relaxed);
    drop(rows);
    // The first block (64 rows) held only deleted objects: it is freed while
    // the session lives on. The second still holds the kept object.
    assert_eq!(counted::DROPPED.load(Ordering::Relaxed) - before, 64);
    assert_eq!(db.scalar("SELECT count(*) FROM counted_rows").await, 1);
    assert!(session
        .get::<counted::CountedRow>(100)
        .await
        .unwrap()
        .unwrap()
        .ptr_eq(&kept));
    drop(kept);
    session.close().await.unwrap();
    assert_eq!(counted::DROPPED.load(Ordering::Relaxed) - before, 100);
}

#[tokio::test]
async fn a_dropped_session_detaches_its_objects_but_a_committed_delete_stays_deleted() {
    let db = setup().await;
    db.execute("INSERT INTO users (name) VALUES ('kept'), ('gone')").await;
    let mut session = sessionmaker(&db.engine).session();
    let users = session.query::<User>().order_by(User::id).all().await.unwrap();
    let (kept, gone) = (users[0].clone(), users[1].clone());
    let added = session.add(User::new("added"));
    session.delete(&gone).unwrap();
    session.flush().await.unwrap();
    session.commit().await.unwrap();
    let pending = session.add(User::new("never flushed"));
    assert_eq!(kept.status(), ObjectStatus::Persistent);
    assert_eq!(gone.status(), ObjectStatus::Deleted);

    drop(session);
    assert_eq!(kept.status(), ObjectStatus::Detached);
    assert_eq!(added.status(), ObjectStatus::Detached);
    assert_eq!(pending.status(), ObjectStatus::Detached);
    assert_eq!(gone.status(), ObjectStatus::Deleted, "its row is gone for good");
}

#[tokio::test]
async fn close_detaches_every_object_and_the_session_starts_afresh() {
    let db = setup().await;
    db.execute("INSERT INTO users (name) VALUES ('sandy')").await;
    let mut session = sessionmaker(&db.engine).session();
    let sandy = session.get::<User>(1).await.unwrap().unwrap();
    let pending = session.add(User::new("patrick"));
    session.close().await.unwrap();
    assert_eq!(sandy.status(), ObjectStatus::Detached);
    assert_eq!(pending.status(), ObjectStatus::Detached);

    // Usable again, with nothing of before: the row loads as a new object,
    // and the pending object was never inserted.
    let again = session.get::<User>(1).await.unwrap().unwrap();
    assert!(!again.ptr_eq(&sandy));
    assert_eq!(again.status(), ObjectStatus::Persistent);
    session.commit().await.unwrap();
    assert_eq!(db.strings("SELECT name FROM users").await, ["sandy"]);
}

#[tokio::test]
async fn a_commit_expires_what_was_loaded_before_it_and_nothing_loaded_after() {
    let db = setup().await;
    db.execute("INSERT INTO users (name) VALUES ('before'), ('after')")
        .await;
    let mut session = sessionmaker(&db.engine).session();
    let before = session.get::<User>(1).await.unwrap().unwrap();
    assert!(!before.is_expired());
    session.commit().await.unwrap();
    assert!(before.is_expired());

    let after = session.get::<User>(2).await.unwrap().unwrap();
    assert!(!after.is_expired(), "loaded after the commit");
    assert!(before.is_expired(), "still expired until loaded again");
    db.execute("UPDATE users SET email = 'fresh@example.com' WHERE id = 1")
        .await;
    let reloaded = session.get::<User>(1).await.unwrap().unwrap();
    assert!(reloaded.ptr_eq(&before));
    assert!(!before.is_expired());
    assert_eq!(before.read().email.as_deref(), Some("fresh@example.com"));

    // The next commit expires both again; a new session's objects are fresh.
    session.commit().await.unwrap();
    assert!(before.is_expired() && after.is_expired());
    let mut other = sessionmaker(&db.engine).session();
    assert!(!other.get::<User>(1).await.unwrap().unwrap().is_expired());
}

#[tokio::test]
async fn values_are_plain_rows_that_the_session_does_not_track() {
    let db = setup().await;
    db.execute("INSERT INTO users (name, email) VALUES ('sandy', 'sandy@example.com'), ('patrick', NULL)")
        .await;
    let mut session = sessionmaker(&db.engine).session();
    // Autoflush first, as for every query: the pending object is a row.
    session.add(User::new("gary"));
    let users: Vec<User> = session.query::<User>().order_by(User::id).values().await.unwrap();
    let names: Vec<&str> = users.iter().map(|u| u.name.as_str()).collect();
    assert_eq!(names, ["sandy", "patrick", "gary"]);
    assert_eq!(users[0].email.as_deref(), Some("sandy@example.com"));
    assert_eq!(users[1].role.as_deref(), Some("member"), "server defaults as stored");

    // Nothing entered the identity map: a get needs a query.
    let echo = EchoCapture::start();
    let sandy = session.get::<User>(users[0].id).await.unwrap().unwrap();
    assert_eq!(echo.take().len(), 1, "loaded by a query");
    // A change to a tracked object is autoflushed before values are read.
    sandy.write().name = "sandy cheeks".to_owned();
    let value = session
        .query::<User>()
        .filter(User::name.eq("sandy cheeks"))
        .values()
        .await
        .unwrap();
    assert_eq!(value.len(), 1, "the autoflush sent the change");
    assert_eq!(value[0].id, users[0].id);
}

#[tokio::test]
async fn values_and_for_each_work_on_joins() {
    let db = setup().await;
    db.execute(
        "INSERT INTO users (name) VALUES ('sandy'), ('gary'); \
         INSERT INTO posts (user_id, title, score) VALUES (1, 'acorns', 3), (1, 'karate', 9.5)",
    )
    .await;
    let mut session = sessionmaker(&db.engine).session();
    let rows: Vec<(User, Option<Post>)> = session
        .query::<User>()
        .left_join::<Post>()
        .order_by(User::id)
        .order_by(Post::id)
        .values()
        .await
        .unwrap();
    let shown: Vec<(&str, Option<&str>)> = rows
        .iter()
        .map(|(user, post)| (user.name.as_str(), post.as_ref().map(|p| p.title.as_str())))
        .collect();
    assert_eq!(
        shown,
        [("sandy", Some("acorns")), ("sandy", Some("karate")), ("gary", None)]
    );

    let mut streamed = Vec::new();
    session
        .query::<User>()
        .join::<Post>()
        .filter(Post::score.gt(5.0))
        .for_each(|(user, post)| {
            streamed.push(format!("{} {}", user.name, post.title));
            Ok(())
        })
        .await
        .unwrap();
    assert_eq!(streamed, ["sandy karate"]);
}

#[tokio::test]
async fn values_of_a_column_of_another_type_are_a_type_mismatch_naming_it() {
    let db = test_db().await;
    db.execute("CREATE TABLE loose_rows (id bigint, name integer); INSERT INTO loose_rows VALUES (1, 42)")
        .await;
    let mut session = sessionmaker(&db.engine).session();
    assert_type_mismatch(session.query::<loose::LooseRow>().values().await, "loose_rows", "name");
}

/// Text decodes alike from the columns read directly (text, varchar, char
/// padded, name) and from citext, which goes through the driver: through a
/// tracked load (into an empty session, and into one holding an object,
/// which decodes the key first), a get and plain values. NULL gives None in
/// an Option and a type mismatch naming the column in a String; a column
/// the driver does not read as text is refused as it always was.
#[tokio::test]
async fn text_decodes_alike_from_every_text_column_type() {
    use texts::TextKinds;

    let db = test_db().await;
    db.execute(
        "CREATE EXTENSION citext; \
         CREATE TABLE text_kinds (plain citext, id bigint PRIMARY KEY, limited varchar(10), padded char(5), \
         system_name name, maybe text); \
         INSERT INTO text_kinds VALUES ('héllo', 1, 'wörld', 'ab', 'pg_class', NULL), \
         ('', 2, '', '', '', 'ünïcode ✓')",
    )
    .await;
    let expected = [
        TextKinds {
            id: 1,
            plain: "héllo".to_owned(),
            limited: "wörld".to_owned(),
            padded: "ab   ".to_owned(),
            system_name: "pg_class".to_owned(),
            maybe: None,
        },
        TextKinds {
            id: 2,
            plain: String::new(),
            limited: String::new(),
            padded: "     ".to_owned(),
            system_name: String::new(),
            maybe: Some("ünïcode ✓".to_owned()),
        },
    ];
    let mut session = sessionmaker(&db.engine).session();
    let values = session
        .query::<TextKinds>()
        .order_by(TextKinds::id)
        .values()
        .await
        .unwrap();
    assert_eq!(values, expected);
    let tracked = session
        .query::<TextKinds>()
        .order_by(TextKinds::id)
        .all()
        .await
        .unwrap();
    let read: Vec<TextKinds> = tracked.iter().map(|row| row.read().clone()).collect();
    assert_eq!(read, expected);
    // A load into a session that holds one of the objects decodes the key
    // first, then the rest of the new row around it.
    let mut other = sessionmaker(&db.engine).session();
    assert_eq!(*other.get::<TextKinds>(2).await.unwrap().unwrap().read(), expected[1]);
    let again = other.query::<TextKinds>().order_by(TextKinds::id).all().await.unwrap();
    let read: Vec<TextKinds> = again.iter().map(|row| row.read().clone()).collect();
    assert_eq!(read, expected);
    // Their transactions' locks would hold up the changes below.
    session.close().await.unwrap();
    other.close().await.unwrap();

    db.execute("UPDATE text_kinds SET limited = NULL WHERE id = 2").await;
    let mut session = sessionmaker(&db.engine).session();
    assert_type_mismatch(session.query::<TextKinds>().values().await, "text_kinds", "limited");
    session.close().await.unwrap();

    // An enum is not text to the driver: refused, naming the column.
    let db = test_db().await;
    db.execute(
        "CREATE TYPE mood AS ENUM ('happy'); \
         CREATE TABLE text_kinds (plain text, id bigint PRIMARY KEY, limited mood, padded char(5), \
         system_name name, maybe text); \
         INSERT INTO text_kinds VALUES ('a', 1, 'happy', 'b', 'c', NULL)",
    )
    .await;
    let mut session = sessionmaker(&db.engine).session();
    assert_type_mismatch(session.get::<TextKinds>(1).await, "text_kinds", "limited");
}

/// Numbers and booleans, which the session reads from their bytes when the
/// column has exactly the field's type, decode as the driver decodes them:
/// extremes, negative zero, NaN and infinities, NULL into an Option,
/// through a load, a get and plain values. NULL where none is allowed, and
/// a column of another width, are type mismatches naming the column.
#[tokio::test]
async fn numbers_decode_alike_at_their_extremes() {
    use numbers::{NumberKinds, NumbersBase};

    let db = test_db().await;
    NumbersBase::create_all(&db.engine).await.unwrap();
    db.execute(
        "INSERT INTO number_kinds VALUES \
         (-2147483648, -32768, -9223372036854775808, '-Infinity', '-0', false, NULL, NULL), \
         (0, 0, 0, 'NaN', 'NaN', true, 0, false), \
         (2147483647, 32767, 9223372036854775807, 3.4028235e38, 1.7976931348623157e308, true, -1, true)",
    )
    .await;
    let check = |rows: &[NumberKinds]| {
        assert_eq!(rows.len(), 3);
        let (low, middle, high) = (&rows[0], &rows[1], &rows[2]);
        assert_eq!((low.id, low.small, low.big), (i32::MIN, i16::MIN, i64::MIN));
        assert_eq!(low.single, f32::NEG_INFINITY);
        assert!(low.double == 0.0 && low.double.is_sign_negative());
        assert_eq!((low.flag, low.maybe_big, low.maybe_flag), (false, None, None));
        assert!(middle.single.is_nan() && middle.double.is_nan());
        assert_eq!(
            (middle.flag, middle.maybe_big, middle.maybe_flag),
            (true, Some(0), Some(false))
        );
        assert_eq!((high.id, high.small, high.big), (i32::MAX, i16::MAX, i64::MAX));
        assert_eq!((high.single, high.double), (f32::MAX, f64::MAX));
        assert_eq!((high.maybe_big, high.maybe_flag), (Some(-1), Some(true)));
    };
    let mut session = sessionmaker(&db.engine).session();
    check(
        &session
            .query::<NumberKinds>()
            .order_by(NumberKinds::id)
            .values()
            .await
            .unwrap(),
    );
    let tracked = session
        .query::<NumberKinds>()
        .order_by(NumberKinds::id)
        .all()
        .await
        .unwrap();
    check(&tracked.iter().map(|row| row.read().clone()).collect::<Vec<_>>());
    let mut other = sessionmaker(&db.engine).session();
    let high = other.get::<NumberKinds>(i32::MAX).await.unwrap().unwrap();
    assert_eq!(high.read().big, i64::MAX);
    session.close().await.unwrap();
    other.close().await.unwrap();

    db.execute(
        "ALTER TABLE number_kinds ALTER COLUMN flag DROP NOT NULL; UPDATE number_kinds SET flag = NULL WHERE id = 0",
    )
    .await;
    let mut session = sessionmaker(&db.engine).session();
    assert_type_mismatch(session.query::<NumberKinds>().values().await, "number_kinds", "flag");
    session.close().await.unwrap();

    // A column one width narrower than its field is refused, not widened.
    let db = test_db().await;
    db.execute(
        "CREATE TABLE number_kinds (id integer PRIMARY KEY, small smallint, big integer, single real, \
         double double precision, flag boolean, maybe_big bigint, maybe_flag boolean); \
         INSERT INTO number_kinds VALUES (0, 0, 0, 0, 0, true, NULL, NULL)",
    )
    .await;
    let mut session = sessionmaker(&db.engine).session();
    assert_type_mismatch(session.get::<NumberKinds>(0).await, "number_kinds", "big");
}

/// A column that changed type under a pooled connection's prepared
/// statement: PostgreSQL refuses the stale statement once (the error is
/// the server's, as it is), and the connection prepares its statements
/// again from the next call on, in an autocommit session and after a
/// rollback alike.
#[tokio::test]
async fn a_statement_prepared_before_a_column_changed_type_is_prepared_again() {
    use crate::common::test_db_with;

    // One connection, so that every call meets the statements it cached.
    let db = test_db_with(|builder| builder.pool_size(1)).await;
    db.execute("CREATE TABLE loose_rows (id bigint, name text); INSERT INTO loose_rows VALUES (1, 'a')")
        .await;
    let reader = sessionmaker(&db.engine).autocommit(true);
    let names = |rows: Vec<loose::LooseRow>| rows.into_iter().map(|row| row.name).collect::<Vec<_>>();
    let mut session = reader.session();
    assert_eq!(names(session.query::<loose::LooseRow>().values().await.unwrap()), ["a"]);

    db.execute("ALTER TABLE loose_rows ALTER COLUMN name TYPE varchar(20)")
        .await;
    match session.query::<loose::LooseRow>().values().await.unwrap_err() {
        Error::Database { code, .. } => assert_eq!(code.as_deref(), Some("0A000")),
        other => panic!("expected the server's stale statement error, got {other:?}"),
    }
    assert_eq!(names(session.query::<loose::LooseRow>().values().await.unwrap()), ["a"]);
    session.close().await.unwrap();

    // Inside a transaction the failure aborts it: a rollback, then the
    // statement is prepared again.
    let mut session = sessionmaker(&db.engine).session();
    assert_eq!(session.query::<loose::LooseRow>().all().await.unwrap().len(), 1);
    session.rollback().await.unwrap();
    db.execute("ALTER TABLE loose_rows ALTER COLUMN name TYPE text").await;
    match session.query::<loose::LooseRow>().all().await.unwrap_err() {
        Error::Database { code, .. } => assert_eq!(code.as_deref(), Some("0A000")),
        other => panic!("expected the server's stale statement error, got {other:?}"),
    }
    session.rollback().await.unwrap();
    let rows = session.query::<loose::LooseRow>().all().await.unwrap();
    assert_eq!(rows[0].read().name, "a");
}

/// A seeded walk of loads (in key order and out of it), gets, deletes, adds,
/// commits and closes. After every step each row the session's transaction
/// sees has exactly one object, reached alike by a load and by `get`: the
/// unindexed blocks of ordered loads and the hashed entries must agree.
#[tokio::test]
async fn a_random_walk_of_loads_and_changes_keeps_one_object_per_row() {
    let db = users_named_in_order(150).await;
    let mut session = sessionmaker(&db.engine).session();
    // A fixed seed: the same walk every run.
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move |n: u64| {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (state >> 33) % n
    };
    let mut added = 0;
    let mut steps = Vec::new();
    for _ in 0..150 {
        let step = next(8);
        steps.push(step);
        let pick = next(200) as i64 + 1;
        match step {
            0 | 1 => {
                session.query::<User>().order_by(User::id).all().await.unwrap();
            }
            2 => {
                session.query::<User>().order_by(User::id.desc()).all().await.unwrap();
            }
            3 => {
                session.get::<User>(pick).await.unwrap();
            }
            4 => {
                if let Some(user) = session.get::<User>(pick).await.unwrap() {
                    session.delete(&user).unwrap();
                }
            }
            5 => {
                added += 1;
                session.add(User::new(&format!("added {added}")));
            }
            6 => session.commit().await.unwrap(),
            _ => session.close().await.unwrap(),
        }
        // Checked after some steps only, so that runs of steps (a close, an
        // ordered load, a delete) also meet each other unchecked.
        if next(3) != 0 {
            continue;
        }

        let visible: Vec<i64> = session
            .raw_query("SELECT id FROM users ORDER BY id", &[])
            .await
            .unwrap()
            .iter()
            .map(|row| row.get(0))
            .collect();
        let loaded = session.query::<User>().order_by(User::id).all().await.unwrap();
        let ids: Vec<i64> = loaded.iter().map(|user| user.read().id).collect();
        assert_eq!(ids, visible, "after steps {steps:?}");
        for user in &loaded {
            let id = user.read().id;
            let got = session.get::<User>(id).await.unwrap().unwrap();
            assert!(got.ptr_eq(user), "one object for row {id} after steps {steps:?}");
        }
        for pair in loaded.windows(2) {
            assert!(!pair[0].ptr_eq(&pair[1]), "after steps {steps:?}");
        }
    }
    assert!(steps.contains(&7) && steps.contains(&4) && steps.contains(&5));
}

/// A large insert into a session that holds no objects of the model enters
/// them in the identity map without hashing their keys: every way of
/// reaching them afterwards must find them all the same.
#[tokio::test]
async fn objects_of_a_large_insert_are_found_by_every_later_lookup() {
    let db = setup().await;
    let mut session = sessionmaker(&db.engine).session();
    let author_id = add_author(&mut session).await;

    // Enough for binary COPY, with keys taken from the sequence.
    let posts = session.add_all((0..1_500).map(|i| Post::numbered(author_id, i)));
    // Flushed, not committed, which would expire the objects: a get would
    // then load each again.
    session.flush().await.unwrap();

    let echo = EchoCapture::start();
    for post in &posts {
        let id = post.read().id;
        assert!(session.get::<Post>(id).await.unwrap().unwrap().ptr_eq(post));
    }
    assert!(echo.take().is_empty(), "answered from the identity map");

    let loaded = session.query::<Post>().order_by(Post::id).all().await.unwrap();
    assert_eq!(loaded.len(), 1_500);
    assert!(loaded.iter().zip(&posts).all(|(a, b)| a.ptr_eq(b)));

    posts[700].write().title = "changed".to_owned();
    session.delete(&posts[3]).unwrap();
    session.commit().await.unwrap();
    let (changed, deleted) = (posts[700].read().id, posts[3].read().id);
    assert_eq!(
        db.strings(&format!("SELECT title FROM posts WHERE id = {changed}"))
            .await,
        ["changed"]
    );
    assert_eq!(
        db.scalar(&format!("SELECT count(*) FROM posts WHERE id = {deleted}"))
            .await,
        0
    );
}

/// Inserted objects go in the identity map by hashing when they cannot go
/// in unindexed: keys that do not ascend, a block that lost an object before
/// the flush, or a session that holds objects of the model already. Each
/// way, lookups find the inserted objects.
#[tokio::test]
async fn inserted_objects_are_found_however_they_enter_the_identity_map() {
    let db = setup().await;
    db.execute("INSERT INTO authors VALUES (5000, 'held')").await;
    let authors = |ids: Vec<i64>| {
        ids.into_iter().map(|id| Author {
            id,
            name: format!("author {id}"),
        })
    };

    // Keys chosen by the application, descending.
    let mut session = sessionmaker(&db.engine).session();
    let descending = session.add_all(authors((1..=300).rev().collect()));
    session.flush().await.unwrap();

    // A block of `add_all` without one of its objects, removed before the
    // flush.
    let mut gapped_session = sessionmaker(&db.engine).session();
    let gapped = gapped_session.add_all(authors((1_001..=1_100).collect()));
    gapped_session.delete(&gapped[50]).unwrap();
    gapped_session.flush().await.unwrap();

    // A session that holds an author already.
    let mut holding_session = sessionmaker(&db.engine).session();
    let held = holding_session.get::<Author>(5_000).await.unwrap().unwrap();
    let added = holding_session.add_all(authors((2_001..=2_100).collect()));
    holding_session.flush().await.unwrap();

    let echo = EchoCapture::start();
    for author in &descending {
        let id = author.read().id;
        assert!(session.get::<Author>(id).await.unwrap().unwrap().ptr_eq(author));
    }
    for (i, author) in gapped.iter().enumerate().filter(|&(i, _)| i != 50) {
        let id = 1_001 + i as i64;
        assert!(gapped_session.get::<Author>(id).await.unwrap().unwrap().ptr_eq(author));
    }
    for author in added.iter().chain([&held]) {
        let id = author.read().id;
        assert!(holding_session.get::<Author>(id).await.unwrap().unwrap().ptr_eq(author));
    }
    assert!(echo.take().is_empty(), "answered from the identity maps");
    assert!(gapped_session.get::<Author>(1_051).await.unwrap().is_none());
    for session in [&mut session, &mut gapped_session, &mut holding_session] {
        session.commit().await.unwrap();
    }
    assert_eq!(db.scalar("SELECT count(*) FROM authors").await, 500);
}

drop_counting_model!(threaded, ThreadedBase, ThreadedRow, "threaded_rows");

/// Handles of one load, sent to other threads that read, clone and drop
/// them while the session closes: every object reads as its row, and each
/// block's values are freed once, when its last handle goes, wherever that
/// is.
#[tokio::test]
async fn handles_dropped_on_other_threads_free_each_object_once() {
    use std::sync::atomic::Ordering;
    use threaded::{ThreadedRow, DROPPED};

    let db = test_db().await;
    db.execute(
        "CREATE TABLE threaded_rows (id bigint PRIMARY KEY, name text NOT NULL); \
         INSERT INTO threaded_rows SELECT i, 'row ' || i FROM generate_series(1, 300) AS i",
    )
    .await;
    let mut session = sessionmaker(&db.engine).session();
    let rows = session
        .query::<ThreadedRow>()
        .order_by(ThreadedRow::id)
        .all()
        .await
        .unwrap();
    assert_eq!(rows.len(), 300);
    assert_eq!(DROPPED.load(Ordering::SeqCst), 0, "nothing freed while held");

    // Interleaved, so that every block has handles on every thread.
    let mut shares: Vec<Vec<Tracked<ThreadedRow>>> = vec![Vec::new(); 4];
    for (i, row) in rows.into_iter().enumerate() {
        shares[i % 4].push(row);
    }
    let threads: Vec<_> = shares
        .into_iter()
        .map(|share| {
            std::thread::spawn(move || {
                for _ in 0..50 {
                    for row in &share {
                        let copy = row.clone();
                        let value = copy.read();
                        assert_eq!(value.name, format!("row {}", value.id));
                    }
                }
                share
            })
        })
        .collect();
    session.close().await.unwrap();
    let returned: Vec<Vec<Tracked<ThreadedRow>>> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert!(returned
        .iter()
        .flatten()
        .all(|row| row.status() == ObjectStatus::Detached));
    assert_eq!(DROPPED.load(Ordering::SeqCst), 0, "the handles still hold every block");

    // The last handles go on other threads again.
    let droppers: Vec<_> = returned
        .into_iter()
        .map(|share| std::thread::spawn(move || drop(share)))
        .collect();
    for dropper in droppers {
        dropper.join().unwrap();
    }
    assert_eq!(DROPPED.load(Ordering::SeqCst), 300, "each value freed exactly once");
}

/// A tracked object of a session that never connects: guards need no server.
fn unsaved_user(name: &str) -> (Session, Tracked<User>) {
    let engine = create_engine("postgresql://postgres@127.0.0.1:1/postgres").unwrap();
    let mut session = sessionmaker(&engine).session();
    let user = session.add(User::new(name));
    (session, user)
}

/// Runs `f` on a thread of its own and returns its panic message, failing
/// if it neither panics nor returns within a few seconds (a deadlock).
fn panic_message_of(f: impl FnOnce() + Send + 'static) -> Option<String> {
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        let message = outcome.err().map(|payload| {
            payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_default()
        });
        let _ = done.send(message);
    });
    finished
        .recv_timeout(std::time::Duration::from_secs(10))
        .expect("the thread neither panicked nor finished: it waits on its own guard")
}

/// Asking for a guard that one of this thread's own guards blocks would
/// wait forever: it panics instead, naming the model, as `RefCell` does.
#[test]
fn a_guard_blocked_by_this_threads_own_guard_panics_instead_of_waiting_forever() {
    let message = panic_message_of(|| {
        let (_session, user) = unsaved_user("sandy");
        // The right-hand side's read guard lives to the end of the statement.
        user.write().name = user.read().name.clone() + "!";
    })
    .expect("write() under this thread's own read() guard panics");
    assert!(message.contains("write() on a User object"), "{message}");

    let message = panic_message_of(|| {
        let (_session, user) = unsaved_user("sandy");
        let mut changing = user.write();
        changing.name = user.read().name.clone();
    })
    .expect("read() under this thread's own write() guard panics");
    assert!(message.contains("read() on a User object"), "{message}");

    let message = panic_message_of(|| {
        let (_session, user) = unsaved_user("sandy");
        let first = user.write();
        let _second = user.write();
        drop(first);
    })
    .expect("a second write() on one thread panics");
    assert!(message.contains("write() on a User object"), "{message}");
}

/// Guards of one object on one thread that do not block each other, and
/// guards another thread holds, are no reason to panic: two reads share,
/// a guard dropped is forgotten, and a write waits for another thread's
/// read and then goes ahead.
#[test]
fn guards_that_do_not_deadlock_are_left_alone() {
    let outcome = panic_message_of(|| {
        let (_session, user) = unsaved_user("sandy");
        let (first, second) = (user.read(), user.read());
        assert_eq!((first.name.as_str(), second.name.as_str()), ("sandy", "sandy"));
        drop((first, second));
        // This thread read and let go; another thread's read now blocks the
        // write, which must wait for it rather than panic.
        let name = user.read().name.clone();
        user.write().name = name + "!";

        let (holding, held) = std::sync::mpsc::channel();
        let (release, released) = std::sync::mpsc::channel::<()>();
        let reader = {
            let user = user.clone();
            std::thread::spawn(move || {
                let guard = user.read();
                holding.send(()).unwrap();
                released.recv().unwrap();
                drop(guard);
            })
        };
        held.recv().unwrap();
        // The read is let go a while after the write below starts waiting;
        // nothing here can tell that it waits, so the while is generous.
        let releaser = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(300));
            release.send(()).unwrap();
        });
        user.write().name = "sandy!!".into();
        reader.join().unwrap();
        releaser.join().unwrap();
        assert_eq!(user.read().name, "sandy!!");
    });
    assert_eq!(outcome, None, "no guard here deadlocks, so nothing panics");
}

/// A `write()` whose copy of the database state panics (a hand-written
/// `Clone`) leaves no record of a guard behind: a later `write()` on the same
/// thread that must wait for another thread's read waits, and succeeds.
#[tokio::test]
async fn a_write_that_panics_while_copying_leaves_no_guard_recorded() {
    use brittle::{BrittleBase, BrittleRow, FAIL_CLONES};
    use std::sync::atomic::Ordering;

    let db = test_db().await;
    BrittleBase::create_all(&db.engine).await.unwrap();
    let mut session = sessionmaker(&db.engine).session();
    let row = session.add(BrittleRow {
        id: 1,
        name: "sandy".into(),
    });
    session.flush().await.unwrap();
    assert_eq!(row.status(), ObjectStatus::Persistent);

    let outcome = panic_message_of(move || {
        FAIL_CLONES.store(true, Ordering::Relaxed);
        let failed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            row.write().name = "lost".into();
        }));
        FAIL_CLONES.store(false, Ordering::Relaxed);
        assert!(failed.is_err(), "the copy panicked");

        // Another thread reads; this thread's write must wait for it.
        let (holding, held) = std::sync::mpsc::channel();
        let reader = {
            let row = row.clone();
            std::thread::spawn(move || {
                let guard = row.read();
                holding.send(()).unwrap();
                std::thread::sleep(std::time::Duration::from_millis(200));
                drop(guard);
            })
        };
        held.recv().unwrap();
        row.write().name = "sandy!".into();
        reader.join().unwrap();
        assert_eq!(row.read().name, "sandy!");
    });
    assert_eq!(outcome, None);
}
