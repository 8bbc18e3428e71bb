use orm::prelude::*;

use crate::common::EchoCapture;
use crate::models::{add_author, setup, Author, Book, Membership, Post, User};

#[tokio::test]
async fn add_and_commit_assigns_keys_and_server_defaults() {
    let db = setup().await;
    let mut session = sessionmaker(&db.engine).session();
    let sandy = session.add(User::new("sandy"));
    let mut patrick = User::new("patrick");
    patrick.role = Some("admin".into());
    patrick.active = Some(false);
    let patrick = session.add(patrick);
    assert_eq!(sandy.status(), ObjectStatus::Pending);
    session.commit().await.unwrap();

    assert_eq!(sandy.status(), ObjectStatus::Persistent);
    let (sandy_id, patrick_id) = (sandy.read().id, patrick.read().id);
    assert!(sandy_id > 0 && patrick_id > sandy_id, "{sandy_id} {patrick_id}");
    // Server defaults come back for the fields left to the database...
    assert_eq!(sandy.read().role.as_deref(), Some("member"));
    assert_eq!(sandy.read().active, Some(true));
    // ...and explicit values are kept.
    assert_eq!(patrick.read().role.as_deref(), Some("admin"));
    assert_eq!(patrick.read().active, Some(false));

    let rows = db
        .strings("SELECT id || ':' || name || ':' || role || ':' || active FROM users ORDER BY id")
        .await;
    assert_eq!(
        rows,
        vec![
            format!("{sandy_id}:sandy:member:true"),
            format!("{patrick_id}:patrick:admin:false")
        ]
    );
}

#[tokio::test]
async fn a_lone_new_object_is_one_values_row_and_several_are_one_unnest() {
    let db = setup().await;
    let mut session = sessionmaker(&db.engine).session();
    let sandy = session.add(User::new("sandy"));
    let echo = EchoCapture::start();
    session.flush().await.unwrap();
    let inserts: Vec<String> = echo.take().into_iter().filter(|s| s.starts_with("INSERT")).collect();
    assert_eq!(
        inserts,
        [r#"INSERT INTO "users" ("name", "email") VALUES ($1::text, $2::text) RETURNING "id", "active", "role""#]
    );
    assert!(sandy.read().id > 0);
    assert_eq!(
        sandy.read().role.as_deref(),
        Some("member"),
        "the server default came back"
    );

    let pair = session.add_all([User::new("patrick"), User::new("gary")]);
    let echo = EchoCapture::start();
    session.flush().await.unwrap();
    let inserts: Vec<String> = echo.take().into_iter().filter(|s| s.starts_with("INSERT")).collect();
    assert_eq!(inserts.len(), 1);
    assert!(inserts[0].contains("FROM unnest("), "{inserts:?}");
    assert!(pair[0].read().id < pair[1].read().id);
    session.commit().await.unwrap();
    assert_eq!(
        db.strings("SELECT name || ':' || role FROM users ORDER BY id").await,
        ["sandy:member", "patrick:member", "gary:member"]
    );
}

#[tokio::test]
async fn a_value_too_long_for_its_column_is_refused_alone_or_in_a_batch_never_cut() {
    let db = setup().await;
    let too_long = "x".repeat(51);
    for batch in [1, 2] {
        let mut session = sessionmaker(&db.engine).session();
        session.add_all((0..batch).map(|i| User::new(&format!("{too_long}{i}"))));
        match session.commit().await.unwrap_err() {
            Error::Database { code, message, .. } => {
                assert_eq!(code.as_deref(), Some("22001"), "{message}");
                assert!(message.contains("character varying(50)"), "{message}");
            }
            other => panic!("expected the server's refusal, got {other:?}"),
        }
        session.rollback().await.unwrap();
    }
    assert_eq!(db.scalar("SELECT count(*) FROM users").await, 0);
}

#[tokio::test]
async fn one_flush_batches_each_table_into_one_insert_and_matches_keys() {
    let db = setup().await;
    let mut session = sessionmaker(&db.engine).session();
    let names: Vec<String> = (0..250).map(|i| format!("user{i:03}")).collect();
    let users = session.add_all(names.iter().map(|n| User::new(n)));
    let echo = EchoCapture::start();
    session.flush().await.unwrap();
    let inserts: Vec<String> = echo.take().into_iter().filter(|s| s.starts_with("INSERT")).collect();
    assert_eq!(inserts.len(), 1, "{inserts:?}");
    session.commit().await.unwrap();

    // Each object carries the key of its own row.
    for user in &users {
        let user = user.read();
        let name = db
            .strings(&format!("SELECT name FROM users WHERE id = {}", user.id))
            .await;
        assert_eq!(name, vec![user.name.clone()]);
    }
}

#[tokio::test]
async fn flush_inserts_parents_first_and_deletes_children_first() {
    let db = setup().await;
    let mut session = sessionmaker(&db.engine).session();
    // The child is added before its parent: the flush must still insert the author first.
    let book = session.add(Book {
        isbn: "978-0".into(),
        author_id: 7,
        title: "Rust".into(),
    });
    let author = session.add(Author {
        id: 7,
        name: "Ferris".into(),
    });
    session.commit().await.unwrap();
    assert_eq!(db.scalar("SELECT count(*) FROM books").await, 1);

    // Deleting the parent first and the child second must still delete the child first.
    let mut session = sessionmaker(&db.engine).session();
    let author = session.get::<Author>(author.read().id).await.unwrap().unwrap();
    let book = session.get::<Book>(book.read().isbn.clone()).await.unwrap().unwrap();
    session.delete(&author).unwrap();
    session.delete(&book).unwrap();
    session.commit().await.unwrap();
    assert_eq!(db.scalar("SELECT count(*) FROM authors").await, 0);
    assert_eq!(db.scalar("SELECT count(*) FROM books").await, 0);
    assert_eq!(book.status(), ObjectStatus::Deleted);
}

#[tokio::test]
async fn updates_send_only_changed_columns_and_nothing_when_unchanged() {
    let db = setup().await;
    let mut session = sessionmaker(&db.engine).session();
    let sandy = session.add(User::new("sandy"));
    let other = session.add(User::new("other"));
    session.flush().await.unwrap();

    let echo = EchoCapture::start();
    sandy.write().email = Some("sandy@example.com".into());
    // Borrowed mutably but not changed: no statement.
    other.write().name = "other".into();
    session.flush().await.unwrap();
    let statements = echo.take();
    assert_eq!(statements.len(), 1, "{statements:?}");
    assert!(
        statements[0].starts_with(r#"UPDATE "users" SET "email" = "orm_rows"."email" FROM"#),
        "{}",
        statements[0]
    );
    assert!(!statements[0].contains(r#""name" ="#));

    session.flush().await.unwrap();
    assert!(echo.take().is_empty(), "a clean session sends nothing");
    session.commit().await.unwrap();
    assert_eq!(
        db.strings("SELECT coalesce(email, '-') FROM users ORDER BY id").await,
        vec!["sandy@example.com", "-"]
    );
}

#[tokio::test]
async fn many_updates_of_one_shape_are_one_statement() {
    let db = setup().await;
    let mut session = sessionmaker(&db.engine).session();
    let users = session.add_all((0..100).map(|i| User::new(&format!("u{i}"))));
    session.flush().await.unwrap();
    for (i, user) in users.iter().enumerate() {
        user.write().email = Some(format!("u{i}@example.com"));
    }
    let echo = EchoCapture::start();
    session.commit().await.unwrap();
    let statements = echo.take();
    assert_eq!(
        statements.iter().filter(|s| s.starts_with("UPDATE")).count(),
        1,
        "{statements:?}"
    );
    assert_eq!(
        db.scalar("SELECT count(*) FROM users WHERE email = name || '@example.com'")
            .await,
        100
    );
}

/// Objects that changed different columns go out in one statement per set
/// of columns, even when they come interleaved, each row with its own
/// values.
#[tokio::test]
async fn updates_are_grouped_by_the_columns_that_changed() {
    let db = setup().await;
    let mut session = sessionmaker(&db.engine).session();
    let users = session.add_all((0..6).map(|i| User::new(&format!("u{i}"))));
    session.flush().await.unwrap();
    for (i, user) in users.iter().enumerate() {
        let mut user = user.write();
        match i % 3 {
            0 => user.name = format!("renamed {i}"),
            1 => user.email = Some(format!("u{i}@example.com")),
            _ => {
                user.name = format!("renamed {i}");
                user.email = Some(format!("u{i}@example.com"));
            }
        }
    }
    let echo = EchoCapture::start();
    session.commit().await.unwrap();
    let mut updates: Vec<String> = echo
        .take()
        .into_iter()
        .filter(|s| s.starts_with("UPDATE"))
        .map(|s| s[..s.find(" FROM").unwrap()].to_owned())
        .collect();
    updates.sort();
    assert_eq!(
        updates,
        [
            r#"UPDATE "users" SET "email" = "orm_rows"."email""#,
            r#"UPDATE "users" SET "name" = "orm_rows"."name""#,
            r#"UPDATE "users" SET "name" = "orm_rows"."name", "email" = "orm_rows"."email""#,
        ]
    );
    // Nothing left to send.
    session.flush().await.unwrap();
    assert!(echo.take().is_empty());
    assert_eq!(
        db.strings("SELECT name || ' ' || coalesce(email, '-') FROM users ORDER BY id")
            .await,
        [
            "renamed 0 -",
            "u1 u1@example.com",
            "renamed 2 u2@example.com",
            "renamed 3 -",
            "u4 u4@example.com",
            "renamed 5 u5@example.com",
        ]
    );
}

#[tokio::test]
async fn autoflush_on_lets_queries_see_pending_objects() {
    let db = setup().await;
    let mut session = sessionmaker(&db.engine).session();
    session.add(User::new("sandy"));
    let found = session
        .query::<User>()
        .filter(User::name.eq("sandy"))
        .all()
        .await
        .unwrap();
    assert_eq!(found.len(), 1);
    assert!(found[0].read().id > 0);
}

#[tokio::test]
async fn autoflush_off_sends_nothing_until_flush() {
    let db = setup().await;
    let mut session = sessionmaker(&db.engine).autoflush(false).session();
    session.add(User::new("sandy"));
    assert!(session.query::<User>().all().await.unwrap().is_empty());
    session.flush().await.unwrap();
    assert_eq!(session.query::<User>().all().await.unwrap().len(), 1);
}

#[tokio::test]
async fn without_autocommit_nothing_is_visible_to_others_before_commit() {
    let db = setup().await;
    let mut session = sessionmaker(&db.engine).session();
    session.add(User::new("sandy"));
    session.flush().await.unwrap();
    assert!(session.in_transaction());
    assert_eq!(db.scalar("SELECT count(*) FROM users").await, 0);
    session.commit().await.unwrap();
    assert!(!session.in_transaction());
    assert_eq!(db.scalar("SELECT count(*) FROM users").await, 1);
}

#[tokio::test]
async fn autocommit_commits_each_flush_and_holds_no_transaction() {
    let db = setup().await;
    let mut session = sessionmaker(&db.engine).autocommit(true).session();
    session.add(User::new("sandy"));
    session.flush().await.unwrap();
    assert!(!session.in_transaction());
    assert_eq!(db.scalar("SELECT count(*) FROM users").await, 1);

    // A read opens no transaction either.
    let echo = EchoCapture::start();
    assert_eq!(session.query::<User>().count().await.unwrap(), 1);
    assert!(!echo.take().iter().any(|s| s == "BEGIN"));
    assert!(!session.in_transaction());

    // An explicit begin() opens a block that lasts until commit.
    session.begin().await.unwrap();
    session.add(User::new("patrick"));
    session.flush().await.unwrap();
    assert!(session.in_transaction());
    assert_eq!(db.scalar("SELECT count(*) FROM users").await, 1);
    session.commit().await.unwrap();
    assert_eq!(db.scalar("SELECT count(*) FROM users").await, 2);
    assert!(matches!(session.begin().await, Ok(())));
    assert!(matches!(session.begin().await, Err(Error::InvalidState(_))));
    session.rollback().await.unwrap();
}

#[tokio::test]
async fn rollback_discards_staged_and_flushed_changes() {
    let db = setup().await;
    let mut session = sessionmaker(&db.engine).session();
    let flushed = session.add(User::new("flushed"));
    session.flush().await.unwrap();
    let staged = session.add(User::new("staged"));
    session.rollback().await.unwrap();
    assert_eq!(flushed.status(), ObjectStatus::Detached);
    assert_eq!(staged.status(), ObjectStatus::Detached);

    // Nothing staged survives into the next commit.
    session.commit().await.unwrap();
    assert_eq!(db.scalar("SELECT count(*) FROM users").await, 0);
    assert!(session.query::<User>().all().await.unwrap().is_empty());
}

#[tokio::test]
async fn a_dropped_session_rolls_back_before_its_connection_is_reused() {
    let db = crate::common::test_db_with(|b| b.pool_size(1)).await;
    crate::models::TestBase::create_all(&db.engine).await.unwrap();
    {
        let mut session = sessionmaker(&db.engine).session();
        session.add(User::new("ghost"));
        session.flush().await.unwrap();
        assert!(session.in_transaction());
        // Dropped here, inside its transaction.
    }
    // The only pooled connection must come back clean: outside a transaction
    // block, SAVEPOINT is refused (SQLSTATE 25P01).
    let conn = db.engine.connect().await.unwrap();
    crate::common::assert_outside_transaction(&conn).await;
    let count: i64 = conn.raw_query("SELECT count(*) FROM users", &[]).await.unwrap()[0].get(0);
    assert_eq!(count, 0);
    drop(conn);
    assert_eq!(
        db.engine.pool_status().size,
        1,
        "the connection was reused, not replaced"
    );

    assert_eq!(db.idle_in_transaction().await, 0);
}

#[tokio::test]
async fn a_cancelled_flush_still_rolls_back() {
    let db = setup().await;
    {
        let mut session = sessionmaker(&db.engine).session();
        session.add(User::new("first"));
        session.flush().await.unwrap();
        session.add(User::new("second"));
        // Cancel the flush at its first await point.
        let flush = session.flush();
        let _ = tokio::time::timeout(std::time::Duration::from_nanos(1), flush).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert_eq!(db.scalar("SELECT count(*) FROM users").await, 0);
    assert_eq!(db.idle_in_transaction().await, 0);
}

/// A flush cancelled while its INSERT waits leaves the new object listed as
/// the session's own: deleting it detaches it, and the rollback writes
/// nothing.
#[tokio::test]
async fn a_flush_cancelled_mid_insert_keeps_its_new_objects() {
    let db = setup().await;
    let lock = db.lock_table("users").await;
    let mut session = sessionmaker(&db.engine).session();
    let kept = session.add(User::new("kept"));
    let dropped = session.add(User::new("dropped"));
    let waited = tokio::time::timeout(std::time::Duration::from_millis(300), session.flush()).await;
    assert!(waited.is_err(), "the INSERT waits on the lock until cancelled");

    session.delete(&dropped).unwrap();
    assert_eq!(dropped.status(), ObjectStatus::Detached);
    assert_eq!(kept.status(), ObjectStatus::Pending);
    lock.release().await;
    session.rollback().await.unwrap();
    assert_eq!(kept.status(), ObjectStatus::Detached);
    assert_eq!(db.scalar("SELECT count(*) FROM users").await, 0);
}

/// The DELETE of an object goes to the row it was loaded from, even if its
/// key field is edited after `delete()`.
#[tokio::test]
async fn a_key_edited_after_delete_does_not_move_the_delete() {
    let db = setup().await;
    db.execute("INSERT INTO users (name) VALUES ('first'), ('second')")
        .await;
    let mut session = sessionmaker(&db.engine).session();
    let first = session
        .query::<User>()
        .filter(User::name.eq("first"))
        .one()
        .await
        .unwrap();
    let second_id = db.scalar("SELECT id FROM users WHERE name = 'second'").await;
    session.delete(&first).unwrap();
    first.write().id = second_id;
    session.commit().await.unwrap();
    assert_eq!(db.strings("SELECT name FROM users").await, ["second"]);
}

#[tokio::test]
async fn get_answers_from_the_identity_map() {
    let db = setup().await;
    let mut session = sessionmaker(&db.engine).expire_on_commit(false).session();
    let sandy = session.add(User::new("sandy"));
    session.commit().await.unwrap();
    let id = sandy.read().id;

    let echo = EchoCapture::start();
    let first = session.get::<User>(id).await.unwrap().unwrap();
    let second = session.get::<User>(id).await.unwrap().unwrap();
    assert!(echo.take().is_empty(), "answered without a query");
    assert!(first.ptr_eq(&sandy) && second.ptr_eq(&sandy));

    // A query of the same row yields the same object.
    let queried = session.query::<User>().filter(User::id.eq(id)).one().await.unwrap();
    assert!(queried.ptr_eq(&sandy));
    assert!(session.get::<User>(id + 1000).await.unwrap().is_none());
}

/// A session's gets share one statement and one list to return their
/// object in: each must still bring its own row, and a miss nothing.
#[tokio::test]
async fn gets_in_one_session_each_bring_their_own_row() {
    let db = setup().await;
    db.execute("INSERT INTO users (id, name) OVERRIDING SYSTEM VALUE VALUES (1, 'one'), (2, 'two'), (3, 'three')")
        .await;
    db.execute("INSERT INTO memberships (group_id, user_key, level) VALUES (1, 2, 12), (2, 1, 21), (1, 1, 11)")
        .await;
    let mut session = sessionmaker(&db.engine).autocommit(true).session();
    let echo = EchoCapture::start();
    let mut loaded = Vec::new();
    for (id, name) in [(3, "three"), (1, "one"), (2, "two")] {
        let user = session.get::<User>(id).await.unwrap().unwrap();
        assert_eq!((user.read().id, user.read().name.as_str()), (id, name));
        assert!(session.get::<User>(id + 100).await.unwrap().is_none());
        loaded.push(user);
    }
    assert_eq!(echo.take().len(), 6, "one query a get");
    let again = session.get::<User>(1).await.unwrap().unwrap();
    assert!(again.ptr_eq(&loaded[1]), "the object loaded before");

    // A composite key binds its values in key column order.
    for (key, level) in [((2, 1), 21), ((1, 2), 12), ((1, 1), 11)] {
        let member = session.get::<Membership>(key).await.unwrap().unwrap();
        assert_eq!((member.read().group_id, member.read().user_key), key);
        assert_eq!(member.read().level, level);
    }
    assert!(session.get::<Membership>((2, 2)).await.unwrap().is_none());
}

/// The first row of a load is held back on its own until a second comes:
/// whether the keys still ascend must count it, or a later lookup by key
/// would miss objects the session holds.
#[tokio::test]
async fn gets_find_the_objects_of_loads_in_any_key_order() {
    let db = setup().await;
    db.execute("INSERT INTO users (id, name) OVERRIDING SYSTEM VALUE VALUES (1, 'one'), (2, 'two'), (3, 'three')")
        .await;
    for order in [[2, 1], [1, 2], [3, 1]] {
        let mut session = sessionmaker(&db.engine).session();
        let loaded = session
            .query::<User>()
            .filter(User::id.is_in(order))
            .order_by(if order[0] > order[1] {
                User::id.desc()
            } else {
                User::id.asc()
            })
            .all()
            .await
            .unwrap();
        let keys: Vec<i64> = loaded.iter().map(|user| user.read().id).collect();
        assert_eq!(keys, order);
        let echo = EchoCapture::start();
        for user in &loaded {
            let id = user.read().id;
            let found = session.get::<User>(id).await.unwrap().unwrap();
            assert!(found.ptr_eq(user), "user {id} of the load {order:?}");
        }
        assert!(echo.take().is_empty(), "answered from the identity map");
        session.close().await.unwrap();
    }
}

#[tokio::test]
async fn loading_a_row_twice_in_a_fresh_session_gives_one_object() {
    let db = setup().await;
    db.execute("INSERT INTO users (name) VALUES ('sandy')").await;
    let mut session = sessionmaker(&db.engine).session();
    let a = session.query::<User>().one().await.unwrap();
    let b = session
        .query::<User>()
        .filter(User::name.eq("sandy"))
        .one()
        .await
        .unwrap();
    assert!(a.ptr_eq(&b));
    let echo = EchoCapture::start();
    let c = session.get::<User>(a.read().id).await.unwrap().unwrap();
    assert!(c.ptr_eq(&a));
    assert!(echo.take().is_empty());
}

#[tokio::test]
async fn expire_on_commit_reloads_on_next_access() {
    let db = setup().await;
    let mut session = sessionmaker(&db.engine).session();
    let sandy = session.add(User::new("sandy"));
    session.commit().await.unwrap();
    let id = sandy.read().id;
    db.execute(&format!("UPDATE users SET email = 'changed@elsewhere' WHERE id = {id}"))
        .await;
    let reloaded = session.get::<User>(id).await.unwrap().unwrap();
    assert!(reloaded.ptr_eq(&sandy));
    assert_eq!(sandy.read().email.as_deref(), Some("changed@elsewhere"));

    // Without expiry, the identity map keeps answering with what it has.
    let mut keeping = sessionmaker(&db.engine).expire_on_commit(false).session();
    let patrick = keeping.add(User::new("patrick"));
    keeping.commit().await.unwrap();
    let id = patrick.read().id;
    db.execute(&format!("UPDATE users SET email = 'changed@elsewhere' WHERE id = {id}"))
        .await;
    let cached = keeping.get::<User>(id).await.unwrap().unwrap();
    assert_eq!(cached.read().email, None);
    keeping.refresh(&cached).await.unwrap();
    assert_eq!(cached.read().email.as_deref(), Some("changed@elsewhere"));
}

#[tokio::test]
async fn a_failed_flush_writes_nothing_and_needs_rollback() {
    let db = setup().await;
    let mut session = sessionmaker(&db.engine).session();
    session.add(User::new("sandy"));
    session.commit().await.unwrap();

    session.add(Author {
        id: 1,
        name: "a".into(),
    });
    session.add(User::new("sandy")); // duplicate name
    let error = session.commit().await.unwrap_err();
    match &error {
        Error::UniqueViolation { constraint, table, .. } => {
            assert_eq!(constraint.as_deref(), Some("users_name_key"));
            assert_eq!(table.as_deref(), Some("users"));
        }
        other => panic!("expected a unique violation, got {other:?}"),
    }
    assert_eq!(error.constraint(), Some("users_name_key"));
    // The author of the same flush was not half-written.
    assert_eq!(db.scalar("SELECT count(*) FROM authors").await, 0);
    assert!(matches!(
        session.query::<User>().all().await,
        Err(Error::InvalidState(_))
    ));

    session.rollback().await.unwrap();
    assert_eq!(session.query::<User>().count().await.unwrap(), 1);
    session.add(Author {
        id: 2,
        name: "b".into(),
    });
    session.commit().await.unwrap();
    assert_eq!(db.scalar("SELECT count(*) FROM authors").await, 1);
}

#[tokio::test]
async fn constraint_violations_are_typed() {
    let db = setup().await;
    let mut session = sessionmaker(&db.engine).session();
    session.add(Book {
        isbn: "1".into(),
        author_id: 404,
        title: "orphan".into(),
    });
    match session.commit().await.unwrap_err() {
        Error::ForeignKeyViolation { constraint, .. } => {
            assert_eq!(constraint.as_deref(), Some("books_author_id_fkey"))
        }
        other => panic!("expected a foreign key violation, got {other:?}"),
    }
    session.rollback().await.unwrap();

    // Too long for varchar(50): rejected, never truncated.
    session.add(User::new(&"x".repeat(51)));
    match session.commit().await.unwrap_err() {
        Error::Database { code, .. } => assert_eq!(code.as_deref(), Some("22001")),
        other => panic!("expected string_data_right_truncation, got {other:?}"),
    }
    session.rollback().await.unwrap();
    assert_eq!(db.scalar("SELECT count(*) FROM users").await, 0);
}

#[tokio::test]
async fn updating_or_deleting_a_vanished_row_is_stale_data() {
    let db = setup().await;
    let mut session = sessionmaker(&db.engine).session();
    let sandy = session.add(User::new("sandy"));
    let patrick = session.add(User::new("patrick"));
    session.commit().await.unwrap();
    let sandy = session.get::<User>(sandy.read().id).await.unwrap().unwrap();
    let patrick = session.get::<User>(patrick.read().id).await.unwrap().unwrap();
    db.execute("DELETE FROM users").await;
    sandy.write().email = Some("x".into());
    match session.flush().await.unwrap_err() {
        Error::StaleData {
            table,
            operation,
            expected,
            actual,
        } => {
            assert_eq!((table.as_str(), operation, expected, actual), ("users", "update", 1, 0));
        }
        other => panic!("expected stale data, got {other:?}"),
    }
    session.rollback().await.unwrap();
    let _ = patrick;
}

#[tokio::test]
async fn deleting_a_pending_object_just_forgets_it() {
    let db = setup().await;
    let mut session = sessionmaker(&db.engine).session();
    let sandy = session.add(User::new("sandy"));
    session.delete(&sandy).unwrap();
    session.commit().await.unwrap();
    assert_eq!(db.scalar("SELECT count(*) FROM users").await, 0);
    assert_eq!(sandy.status(), ObjectStatus::Detached);
    assert!(matches!(session.delete(&sandy), Err(Error::InvalidState(_))));
}

#[tokio::test]
async fn changing_a_primary_key_is_refused() {
    let db = setup().await;
    let mut session = sessionmaker(&db.engine).session();
    let author = session.add(Author {
        id: 1,
        name: "a".into(),
    });
    let sandy = session.add(User::new("sandy"));
    session.flush().await.unwrap();
    // A legitimate change to another model, planned before the refusal...
    sandy.write().email = Some("sandy@reef.org".into());
    author.write().id = 2;
    let error = session.flush().await.unwrap_err();
    assert!(
        matches!(&error, Error::InvalidState(m) if m.contains("authors.id")),
        "{error}"
    );
    // Refused before anything was sent: the transaction is intact, and
    // putting the key back is enough to go on.
    author.write().id = 1;
    author.write().name = "b".into();
    session.commit().await.unwrap();
    assert_eq!(db.strings("SELECT id || ':' || name FROM authors").await, ["1:b"]);
    // ...still reaches the database with the next flush.
    assert_eq!(db.strings("SELECT email FROM users").await, ["sandy@reef.org"]);
}

#[tokio::test]
async fn rolling_back_a_flushed_delete_detaches_the_object() {
    let db = setup().await;
    let mut session = sessionmaker(&db.engine).session();
    let author = session.add(Author {
        id: 1,
        name: "a".into(),
    });
    session.commit().await.unwrap();
    let author = session.get::<Author>(author.read().id).await.unwrap().unwrap();
    session.delete(&author).unwrap();
    session.flush().await.unwrap();
    assert_eq!(author.status(), ObjectStatus::Deleted);
    // Deleting it again inside the same transaction changes nothing.
    session.delete(&author).unwrap();
    session.rollback().await.unwrap();
    // The row is back; the object no longer stands for anything here.
    assert_eq!(db.scalar("SELECT count(*) FROM authors").await, 1);
    assert_eq!(author.status(), ObjectStatus::Detached);
    assert!(matches!(session.delete(&author), Err(Error::InvalidState(_))));

    // After a commit the object stays Deleted, and deleting it again is an error.
    let author = session.get::<Author>(1).await.unwrap().unwrap();
    session.delete(&author).unwrap();
    session.commit().await.unwrap();
    assert_eq!(author.status(), ObjectStatus::Deleted);
    match session.delete(&author) {
        Err(Error::InvalidState(message)) => assert!(message.contains("deleted"), "{message}"),
        other => panic!("expected an error, got {other:?}"),
    }
    assert_eq!(db.scalar("SELECT count(*) FROM authors").await, 0);
}

#[tokio::test]
async fn an_autocommit_flush_is_a_commit_and_expires_objects() {
    let db = setup().await;
    let mut session = sessionmaker(&db.engine).autocommit(true).session();
    let sandy = session.add(User::new("sandy"));
    session.flush().await.unwrap();
    let id = sandy.read().id;
    db.execute(&format!("UPDATE users SET email = 'changed@elsewhere' WHERE id = {id}"))
        .await;
    assert!(sandy.is_expired());
    let again = session.get::<User>(id).await.unwrap().unwrap();
    assert!(again.ptr_eq(&sandy));
    assert!(!sandy.is_expired());
    assert_eq!(again.read().email.as_deref(), Some("changed@elsewhere"));
}

#[tokio::test]
async fn transaction_control_through_raw_sql_is_refused() {
    let db = setup().await;
    for autocommit in [false, true] {
        let mut session = sessionmaker(&db.engine).autocommit(autocommit).session();
        for sql in ["BEGIN", "  commit", "ROLLBACK", "start transaction", "END;", "abort"] {
            match session.raw_execute(sql, &[]).await {
                Err(Error::InvalidState(message)) => assert!(message.contains("session.begin()"), "{message}"),
                other => panic!("{sql}: expected a refusal, got {other:?}"),
            }
        }
        // Refused before reaching the server: no transaction was opened.
        assert!(!session.in_transaction());
    }
    // Savepoints stay inside the session's transaction and are allowed.
    let mut session = sessionmaker(&db.engine).session();
    session.raw_execute("SAVEPOINT before_bob", &[]).await.unwrap();
    session
        .raw_execute("INSERT INTO users (name) VALUES ('bob')", &[])
        .await
        .unwrap();
    session
        .raw_execute("ROLLBACK TO SAVEPOINT before_bob", &[])
        .await
        .unwrap();
    session.commit().await.unwrap();
    assert_eq!(db.scalar("SELECT count(*) FROM users").await, 0);
    let conn = db.engine.connect().await.unwrap();
    crate::common::assert_outside_transaction(&conn).await;
}

#[tokio::test]
async fn composite_keys_round_trip() {
    let db = setup().await;
    let mut session = sessionmaker(&db.engine).session();
    let second = Membership {
        group_id: 1,
        user_key: 11,
        level: 1,
        note: None,
        scratch: vec![],
    };
    session.add_all([
        Membership {
            group_id: 1,
            user_key: 10,
            level: 3,
            note: Some(vec![0, 159, 255]),
            scratch: vec!["not stored".into()],
        },
        second.clone(),
    ]);
    session.commit().await.unwrap();

    let mut session = sessionmaker(&db.engine).session();
    let member = session.get::<Membership>((1, 10)).await.unwrap().unwrap();
    assert_eq!(member.read().note, Some(vec![0, 159, 255]));
    assert!(member.read().scratch.is_empty(), "skipped fields load as Default");
    member.write().level = 5;
    session.commit().await.unwrap();
    assert_eq!(
        db.scalar("SELECT level::bigint FROM memberships WHERE group_id = 1 AND user_key = 10")
            .await,
        5
    );
    // Loaded again in the same session: the composite key read off each row
    // finds the object the session holds.
    let members = session
        .query::<Membership>()
        .order_by(Membership::user_key)
        .all()
        .await
        .unwrap();
    assert_eq!(members.len(), 2);
    assert!(members[0].ptr_eq(&member));
    assert_eq!(members[0].read().level, 5);
    // The other, new to the session, decoded around the key read first.
    assert_eq!(*members[1].read(), second);
    assert_eq!(
        db.scalar("SELECT level::bigint FROM memberships WHERE group_id = 1 AND user_key = 11")
            .await,
        1
    );
}

#[tokio::test]
async fn a_column_of_another_type_is_a_type_mismatch_naming_it() {
    let db = crate::common::test_db().await;
    db.execute("CREATE TABLE authors (id bigint PRIMARY KEY, name integer)")
        .await;
    db.execute("INSERT INTO authors VALUES (1, 42)").await;
    let mut session = sessionmaker(&db.engine).session();
    crate::common::assert_type_mismatch(session.get::<Author>(1).await, "authors", "name");
    // Decoding failed on this side: the session's transaction is intact.
    assert_eq!(session.query::<Author>().count().await.unwrap(), 1);
}

#[tokio::test]
async fn sessions_made_directly_behave_like_factory_sessions() {
    let db = setup().await;
    let mut session = Session::new(&db.engine);
    assert_eq!(session.config(), sessionmaker(&db.engine).config());
    let post_owner = session.add(User::new("sandy"));
    session.flush().await.unwrap();
    session.add(Post {
        id: 0,
        user_id: post_owner.read().id,
        title: "hello".into(),
        score: 1.5,
    });
    session.commit().await.unwrap();
    session.close().await.unwrap();
    assert_eq!(db.scalar("SELECT count(*) FROM posts").await, 1);
}

#[tokio::test]
async fn begin_travels_with_the_first_statement_and_costs_nothing_unused() {
    let db = setup().await;
    let mut session = sessionmaker(&db.engine).session();
    let echo = EchoCapture::start();
    session.begin().await.unwrap();
    session.commit().await.unwrap();
    assert!(echo.take().is_empty(), "a transaction with no statement sends nothing");

    // The first read opens the transaction; another session does not see its writes.
    assert_eq!(session.query::<User>().count().await.unwrap(), 0);
    assert!(session.in_transaction());
    let statements = echo.take();
    assert_eq!(statements.first().map(String::as_str), Some("BEGIN"), "{statements:?}");
    session
        .raw_execute("INSERT INTO users (name) VALUES ('inside')", &[])
        .await
        .unwrap();
    assert_eq!(db.scalar("SELECT count(*) FROM users").await, 0);
    session.rollback().await.unwrap();
    assert_eq!(db.scalar("SELECT count(*) FROM users").await, 0);
}

#[tokio::test]
async fn a_lost_connection_is_typed_and_the_session_recovers() {
    let db = setup().await;
    let mut session = sessionmaker(&db.engine).session();
    session.add(User::new("sandy"));
    session.flush().await.unwrap();
    let pid: i32 = session.raw_query("SELECT pg_backend_pid()", &[]).await.unwrap()[0].get(0);
    db.execute(&format!("SELECT pg_terminate_backend({pid})")).await;

    let error = session.query::<User>().count().await.unwrap_err();
    assert!(matches!(error, Error::ConnectionLost { .. }), "{error:?}");
    session.rollback().await.unwrap();
    // The dead connection was not pooled again: the session works on a new one.
    assert_eq!(session.query::<User>().count().await.unwrap(), 0);
    let new_pid: i32 = session.raw_query("SELECT pg_backend_pid()", &[]).await.unwrap()[0].get(0);
    assert_ne!(pid, new_pid);
}

#[tokio::test]
async fn a_session_kept_after_an_interrupted_flush_refuses_to_commit_half_of_it() {
    let db = setup().await;
    // The INSERT waits on this lock, so the flush is surely cut off mid-way
    // (a timeout alone can lose the race with a fast local server).
    let lock = db.lock_table("users").await;
    let mut session = sessionmaker(&db.engine).session();
    session.add_all([User::new("a"), User::new("b")]);
    let interrupted = tokio::time::timeout(std::time::Duration::from_millis(200), session.flush()).await;
    assert!(interrupted.is_err(), "the flush was meant to be cut off");
    lock.release().await;
    assert!(matches!(session.commit().await, Err(Error::InvalidState(m)) if m.contains("interrupted")));
    assert!(matches!(
        session.query::<User>().all().await,
        Err(Error::InvalidState(_))
    ));
    session.rollback().await.unwrap();
    assert_eq!(db.scalar("SELECT count(*) FROM users").await, 0);
    session.add(User::new("c"));
    session.commit().await.unwrap();
    assert_eq!(db.strings("SELECT name FROM users").await, ["c"]);
}

#[tokio::test]
async fn reloading_an_expired_object_keeps_its_unflushed_changes() {
    let db = setup().await;
    let mut session = sessionmaker(&db.engine).autoflush(false).session();
    let sandy = session.add(User::new("sandy"));
    session.commit().await.unwrap(); // expires sandy
    let id = sandy.read().id;
    sandy.write().email = Some("mine@example.com".into());
    db.execute(&format!("UPDATE users SET role = 'theirs' WHERE id = {id}"))
        .await;

    let reloaded = session.get::<User>(id).await.unwrap().unwrap();
    assert!(reloaded.ptr_eq(&sandy));
    assert_eq!(
        sandy.read().email.as_deref(),
        Some("mine@example.com"),
        "the caller's change survives"
    );
    assert_eq!(sandy.read().role.as_deref(), Some("theirs"), "the rest is fresh");
    session.commit().await.unwrap();
    assert_eq!(
        db.strings(&format!("SELECT email || ' ' || role FROM users WHERE id = {id}"))
            .await,
        ["mine@example.com theirs"]
    );
}

#[tokio::test]
async fn objects_of_other_sessions_are_refused() {
    let db = setup().await;
    let mut mine = sessionmaker(&db.engine).session();
    let mut theirs = sessionmaker(&db.engine).session();
    let pending = theirs.add(User::new("theirs"));
    assert!(matches!(mine.delete(&pending), Err(Error::InvalidState(_))));
    assert!(matches!(mine.refresh(&pending).await, Err(Error::InvalidState(_))));
    theirs.commit().await.unwrap();
    assert_eq!(
        db.scalar("SELECT count(*) FROM users").await,
        1,
        "their insert still happened"
    );
    // Persistent in their session, unknown to mine.
    let loaded = theirs.get::<User>(pending.read().id).await.unwrap().unwrap();
    assert!(matches!(mine.refresh(&loaded).await, Err(Error::InvalidState(_))));
    assert!(matches!(mine.delete(&loaded), Err(Error::InvalidState(_))));
}

#[tokio::test]
async fn an_error_from_a_for_each_callback_leaves_the_session_usable() {
    let db = setup().await;
    let mut session = sessionmaker(&db.engine).session();
    session.add_all([User::new("a"), User::new("b"), User::new("c")]);
    session.flush().await.unwrap();
    let mut seen = 0;
    let result = session
        .query::<User>()
        .for_each(|_user| {
            seen += 1;
            Err(Error::InvalidState("stop after the first".into()))
        })
        .await;
    assert!(matches!(result, Err(Error::InvalidState(_))));
    assert_eq!(seen, 1);
    // The transaction (with its flushed rows) is intact.
    assert_eq!(session.query::<User>().count().await.unwrap(), 3);
    session.commit().await.unwrap();
    assert_eq!(db.scalar("SELECT count(*) FROM users").await, 3);

    let mut names = Vec::new();
    session
        .query::<User>()
        .order_by(User::name.desc())
        .for_each(|user| {
            names.push(user.name);
            Ok(())
        })
        .await
        .unwrap();
    assert_eq!(names, ["c", "b", "a"]);
}

#[tokio::test]
async fn failing_statements_are_echoed_too() {
    let db = setup().await;
    let mut session = sessionmaker(&db.engine).session();
    session.add(Book {
        isbn: "1".into(),
        author_id: 404,
        title: "orphan".into(),
    });
    let echo = EchoCapture::start();
    assert!(session.commit().await.is_err());
    assert!(echo.take().iter().any(|s| s.starts_with(r#"INSERT INTO "books""#)));
}

/// Sessions and their futures can move between threads, as `tokio::spawn`
/// and web frameworks require; a non-Send future here fails to compile.
#[test]
fn sessions_and_their_futures_are_send() {
    fn send<T: Send>(_: &T) {}
    fn check(engine: &Engine, session: &mut Session, user: &Tracked<User>) {
        send(engine);
        send(user);
        send(&session.flush());
        send(&session.commit());
        send(&session.rollback());
        send(&session.get::<User>(1));
        send(&session.refresh(user));
        send(&session.query::<User>().filter(User::name.eq("x")).all());
        send(&session.query::<User>().count());
        send(&session.query::<User>().for_each(|_| Ok(())));
        send(&session.raw_query("SELECT 1", &[]));
    }
    fn static_send<T: Send + Sync + 'static>() {}
    static_send::<Session>();
    static_send::<SessionMaker>();
    let _ = check;
}

#[tokio::test]
async fn a_failed_commit_of_an_autocommit_flush_requires_rollback() {
    let db = setup().await;
    // A deferred constraint fails at COMMIT, not at the INSERT.
    db.execute(
        "ALTER TABLE users DROP CONSTRAINT users_name_key; \
         ALTER TABLE users ADD CONSTRAINT users_name_key UNIQUE (name) DEFERRABLE INITIALLY DEFERRED",
    )
    .await;
    let mut session = sessionmaker(&db.engine).autocommit(true).session();
    let twins = session.add_all([User::new("twin"), User::new("twin")]);
    let error = session.flush().await.unwrap_err();
    assert_eq!(error.constraint(), Some("users_name_key"), "{error:?}");
    // The objects must not pass for saved rows.
    assert!(matches!(
        session.query::<User>().count().await,
        Err(Error::InvalidState(_))
    ));
    session.rollback().await.unwrap();
    assert!(twins.iter().all(|t| t.status() == ObjectStatus::Detached));
    assert_eq!(db.scalar("SELECT count(*) FROM users").await, 0);
    assert_eq!(session.query::<User>().count().await.unwrap(), 0);
}

#[tokio::test]
async fn server_errors_in_raw_sql_require_rollback_and_client_errors_do_not() {
    let db = setup().await;
    let mut session = sessionmaker(&db.engine).session();
    session.add(User::new("kept"));
    session.flush().await.unwrap();

    // A missing parameter is caught before anything reaches the server.
    let error = session.raw_execute("SELECT $1::int4", &[]).await.unwrap_err();
    assert!(!matches!(error, Error::InvalidState(_)), "{error:?}");
    assert_eq!(
        session.query::<User>().count().await.unwrap(),
        1,
        "the transaction is intact"
    );

    // Any error the server reports aborts its transaction, whatever its kind.
    let error = session
        .raw_execute("ALTER DATABASE orm_no_such_database SET work_mem = '1MB'", &[])
        .await
        .unwrap_err();
    assert!(matches!(error, Error::DatabaseNotFound { .. }), "{error:?}");
    assert!(matches!(session.commit().await, Err(Error::InvalidState(_))));
    session.rollback().await.unwrap();
    assert_eq!(db.scalar("SELECT count(*) FROM users").await, 0);
}

#[tokio::test]
async fn a_cancelled_read_inside_a_transaction_requires_rollback() {
    let db = setup().await;
    let mut session = sessionmaker(&db.engine).session();
    session.add(User::new("pending"));
    session.flush().await.unwrap();
    let slow = session.raw_query("SELECT pg_sleep(1)", &[]);
    assert!(tokio::time::timeout(std::time::Duration::from_millis(50), slow)
        .await
        .is_err());
    assert!(matches!(session.commit().await, Err(Error::InvalidState(m)) if m.contains("interrupted")));
    session.rollback().await.unwrap();
    assert_eq!(db.scalar("SELECT count(*) FROM users").await, 0);
    assert_eq!(session.query::<User>().count().await.unwrap(), 0);
}

#[tokio::test]
async fn a_row_marked_for_deletion_stays_one_deleted_object_until_flushed() {
    let db = setup().await;
    db.execute("INSERT INTO users (name) VALUES ('doomed')").await;
    let mut session = sessionmaker(&db.engine).autoflush(false).session();
    let doomed = session.query::<User>().one().await.unwrap();
    let id = doomed.read().id;
    session.delete(&doomed).unwrap();
    assert!(session.get::<User>(id).await.unwrap().is_none());
    let again = session.query::<User>().one().await.unwrap();
    assert!(
        again.ptr_eq(&doomed),
        "the query gives back the deleted object, not a new one"
    );
    assert_eq!(again.status(), ObjectStatus::Deleted);
    session.commit().await.unwrap();
    assert_eq!(db.scalar("SELECT count(*) FROM users").await, 0);
}

#[tokio::test]
async fn a_change_made_while_its_flush_is_in_flight_is_not_lost() {
    let db = setup().await;
    let mut session = sessionmaker(&db.engine).session();
    let sandy = session.add(User::new("sandy"));
    session.flush().await.unwrap();

    // Another task changes the object after the UPDATE was built, before it completed.
    sandy.write().email = Some("first@example.com".into());
    let (flushed, ()) = tokio::join!(session.flush(), async {
        sandy.write().role = Some("late".into());
    });
    flushed.unwrap();
    // Likewise for a new object during its INSERT.
    let patrick = session.add(User::new("patrick"));
    let (flushed, ()) = tokio::join!(session.flush(), async {
        patrick.write().email = Some("late@example.com".into());
    });
    flushed.unwrap();
    session.commit().await.unwrap();
    assert_eq!(
        db.strings("SELECT name || ' ' || coalesce(email, '-') || ' ' || role FROM users ORDER BY id")
            .await,
        ["sandy first@example.com late", "patrick late@example.com member"]
    );
}

#[tokio::test]
async fn deleting_a_row_and_adding_one_with_its_key_in_one_flush_updates_it() {
    let db = setup().await;
    let mut session = sessionmaker(&db.engine).session();
    session.add(Author {
        id: 1,
        name: "old".into(),
    });
    session.commit().await.unwrap();

    let old = session.get::<Author>(1).await.unwrap().unwrap();
    session.delete(&old).unwrap();
    let new = session.add(Author {
        id: 1,
        name: "new".into(),
    });
    let echo = EchoCapture::start();
    session.commit().await.unwrap();
    let statements = echo.take();
    assert!(
        statements.iter().any(|s| s.starts_with(r#"UPDATE "authors""#)),
        "{statements:?}"
    );
    assert!(
        !statements
            .iter()
            .any(|s| s.starts_with("DELETE") || s.starts_with("INSERT")),
        "{statements:?}"
    );
    assert_eq!(db.strings("SELECT id || ':' || name FROM authors").await, ["1:new"]);
    assert_eq!(old.status(), ObjectStatus::Detached);
    assert_eq!(new.status(), ObjectStatus::Persistent);
    let got = session.get::<Author>(1).await.unwrap().unwrap();
    assert!(got.ptr_eq(&new));
}

/// A row switch refused because either object is borrowed changes nothing:
/// once the borrow ends, the next flush switches the row.
#[tokio::test]
async fn a_row_switch_refused_for_a_borrow_is_done_by_the_next_flush() {
    let db = setup().await;
    let mut session = sessionmaker(&db.engine).session();
    for id in [1, 2] {
        session.add(Author { id, name: "old".into() });
    }
    session.commit().await.unwrap();

    for (id, borrow_new) in [(1, true), (2, false)] {
        let old = session.get::<Author>(id).await.unwrap().unwrap();
        session.delete(&old).unwrap();
        let new = session.add(Author {
            id,
            name: format!("new {id}"),
        });
        {
            let _new_guard = borrow_new.then(|| new.read());
            let _old_guard = (!borrow_new).then(|| old.write());
            let refused = session.flush().await.unwrap_err();
            assert!(
                matches!(refused, Error::InvalidState(ref m) if m.contains("borrowed")),
                "{refused:?}"
            );
        }
        assert_eq!(old.status(), ObjectStatus::Deleted);
        assert_eq!(new.status(), ObjectStatus::Pending);
        session.commit().await.unwrap();
        assert_eq!(old.status(), ObjectStatus::Detached);
        assert_eq!(new.status(), ObjectStatus::Persistent);
    }
    assert_eq!(
        db.strings("SELECT id || ':' || name FROM authors ORDER BY id").await,
        ["1:new 1", "2:new 2"]
    );
}

#[tokio::test]
async fn large_batches_with_every_column_set_go_in_by_binary_copy() {
    let db = setup().await;
    let mut session = sessionmaker(&db.engine).session();
    let members = session.add_all((0..2_500i64).map(|i| Membership {
        group_id: (i % 7) as i32,
        user_key: i,
        level: (i % 5) as i16,
        note: (i % 3 == 0).then(|| vec![i as u8, 0, 255]),
        scratch: vec![],
    }));
    let echo = EchoCapture::start();
    session.commit().await.unwrap();
    let statements = echo.take();
    assert!(
        statements
            .iter()
            .any(|s| s == r#"COPY "memberships" ("group_id", "user_key", "level", "note") FROM STDIN (FORMAT binary)"#),
        "{statements:?}"
    );
    assert!(!statements.iter().any(|s| s.starts_with("INSERT")), "{statements:?}");
    assert!(members.iter().all(|m| m.status() == ObjectStatus::Persistent));
    assert_eq!(db.scalar("SELECT count(*) FROM memberships").await, 2_500);
    assert_eq!(
        db.scalar("SELECT count(*) FROM memberships WHERE note IS NULL").await,
        1_666
    );
    assert_eq!(
        db.strings("SELECT group_id || ':' || user_key || ':' || level || ':' || encode(note, 'hex') FROM memberships WHERE user_key = 2499")
            .await,
        ["0:2499:4:c300ff"]
    );
    // The objects are tracked like inserted ones: a change is one UPDATE.
    members[10].write().level = 42;
    session.commit().await.unwrap();
    assert_eq!(
        db.scalar("SELECT level::bigint FROM memberships WHERE user_key = 10")
            .await,
        42
    );

    // A violation inside a COPY is typed like any other, and nothing stays.
    let mut session = sessionmaker(&db.engine).session();
    session.add_all((0..1_500i64).map(|i| Membership {
        group_id: 100,
        user_key: if i == 1_499 { 0 } else { i },
        level: 0,
        note: None,
        scratch: vec![],
    }));
    let echo = EchoCapture::start();
    match session.commit().await.unwrap_err() {
        Error::UniqueViolation { constraint, .. } => assert_eq!(constraint.as_deref(), Some("memberships_pkey")),
        other => panic!("expected a unique violation, got {other:?}"),
    }
    // Echoed as any failing statement is: no parameters, a duration, the error.
    let copy = echo.take_starting_with("COPY");
    assert_eq!((copy.params, copy.elapsed_us.is_some()), (Some(0), true));
    let logged = copy.error.expect("its error was logged");
    assert!(logged.contains("memberships_pkey"), "{logged}");
    session.rollback().await.unwrap();
    assert_eq!(
        db.scalar("SELECT count(*) FROM memberships WHERE group_id = 100").await,
        0
    );
}

#[tokio::test]
async fn large_batches_with_identity_keys_reserve_their_keys_then_copy() {
    let db = setup().await;
    let mut session = sessionmaker(&db.engine).session();
    let author_id = add_author(&mut session).await;

    let posts = session.add_all((0..1_500).map(|i| Post::numbered(author_id, i)));
    let echo = EchoCapture::start();
    session.flush().await.unwrap();
    let statements = echo.take();
    assert!(
        statements.iter().any(|s| s.contains("ARRAY(SELECT nextval(")),
        "{statements:?}"
    );
    assert!(
        statements
            .iter()
            .any(|s| s == r#"COPY "posts" ("id", "user_id", "title", "score") FROM STDIN (FORMAT binary)"#),
        "{statements:?}"
    );
    assert!(!statements.iter().any(|s| s.starts_with("INSERT")), "{statements:?}");

    // Every object holds the key of its own row, ascending in the order added.
    let ids: Vec<i32> = posts.iter().map(|p| p.read().id).collect();
    assert!(ids.windows(2).all(|pair| pair[0] < pair[1]), "keys ascend in add order");
    session.commit().await.unwrap();
    for i in [0usize, 1, 749, 1_499] {
        let id = i64::from(ids[i]);
        assert_eq!(
            db.strings(&format!("SELECT title FROM posts WHERE id = {id}")).await,
            [format!("post {i}")]
        );
    }
    assert_eq!(db.scalar("SELECT count(*) FROM posts").await, 1_500);

    // The sequence moved past the reserved keys: a later insert by the
    // database's own default does not collide.
    let after = session.add(Post {
        id: 0,
        user_id: author_id,
        title: "after".to_owned(),
        score: 0.0,
    });
    session.commit().await.unwrap();
    assert!(after.read().id > ids[1_499]);

    // A failed COPY leaves no row and no key on the objects.
    let mut session = sessionmaker(&db.engine).session();
    let orphans = session.add_all((0..1_200).map(|i| Post {
        id: 0,
        user_id: if i == 1_100 { author_id + 1_000 } else { author_id },
        title: format!("orphan {i}"),
        score: 0.0,
    }));
    match session.commit().await.unwrap_err() {
        Error::ForeignKeyViolation { constraint, .. } => {
            assert_eq!(constraint.as_deref(), Some("posts_user_id_fkey"))
        }
        other => panic!("expected a foreign key violation, got {other:?}"),
    }
    session.rollback().await.unwrap();
    assert!(orphans.iter().all(|p| p.read().id == 0));
    assert_eq!(
        db.scalar("SELECT count(*) FROM posts WHERE title LIKE 'orphan%'").await,
        0
    );
}

#[tokio::test]
async fn a_role_that_may_not_take_sequence_values_still_inserts_large_batches() {
    let db = setup().await;
    let mut session = sessionmaker(&db.engine).session();
    let author = session.add(User::new("sandy"));
    session.commit().await.unwrap();
    let author_id = author.read().id;

    // A role allowed to insert into posts but given nothing on its sequence.
    let role = format!("writer_{}", std::process::id());
    let database: String = db.strings("SELECT current_database()").await.remove(0);
    let role = format!("{role}_{}", &database[database.len().saturating_sub(12)..]);
    db.execute(&format!(
        "CREATE ROLE \"{role}\"; GRANT SELECT, INSERT ON posts TO \"{role}\"; GRANT SELECT ON users TO \"{role}\""
    ))
    .await;
    let url = format!("{}?options=-c%20role%3D{role}", db.url());
    let limited = Engine::builder(url).pool_size(1).echo(true).build().unwrap();
    let mut session = sessionmaker(&limited).session();
    let echo = EchoCapture::start();
    let posts = session.add_all((0..1_100).map(|i| Post {
        id: 0,
        user_id: author_id,
        title: format!("post {i}"),
        score: 0.0,
    }));
    session.commit().await.unwrap();
    let statements = echo.take();
    // The reservation found no sequence it may use, and INSERT assigned the keys.
    assert!(
        statements.iter().any(|s| s.contains("ARRAY(SELECT nextval(")),
        "{statements:?}"
    );
    assert!(statements.iter().any(|s| s.starts_with("INSERT")), "{statements:?}");
    assert!(!statements.iter().any(|s| s.starts_with("COPY")), "{statements:?}");
    assert!(posts.iter().all(|p| p.read().id > 0));
    assert_eq!(db.scalar("SELECT count(*) FROM posts").await, 1_100);
    drop(session);
    drop(limited);
    db.execute(&format!("DROP OWNED BY \"{role}\"; DROP ROLE \"{role}\""))
        .await;
}

/// Every move of a future copies all of it. A future handed to an async fn
/// used to be kept twice, beside the future awaiting it, and an autoflush
/// with nothing to do carried a whole flush: a query's future was 5.6 KB.
/// Then a read carried, inline, the futures of a transaction's BEGIN sent
/// with it and of preparing its statement, and a close that of a ROLLBACK:
/// each rare where it sits, and boxed now (this query's future went from
/// 2.7 KB to 2.4 KB, a close's from 648 bytes to under 256). The driver's
/// own query future is about 1 KB of what is left.
#[tokio::test]
async fn query_and_flush_futures_stay_small() {
    let db = setup().await;
    let mut session = sessionmaker(&db.engine).session();
    let query = std::mem::size_of_val(&session.query::<User>().all());
    assert!(query < 2560, "a query's future takes {query} bytes");
    let flush = std::mem::size_of_val(&session.flush());
    assert!(flush < 512, "a flush's future takes {flush} bytes");
    let close = std::mem::size_of_val(&session.close());
    assert!(close < 256, "a close's future takes {close} bytes");
}
