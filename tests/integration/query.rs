use orm::prelude::*;

use crate::common::EchoCapture;
use crate::models::{setup, Post, User};

async fn seeded() -> (crate::common::TestDb, Session) {
    let db = setup().await;
    let mut session = sessionmaker(&db.engine).session();
    for (name, email) in [
        ("sandy", Some("sandy@reef.org")),
        ("patrick", None),
        ("squidward", Some("squid@krusty.com")),
        ("gary", None),
    ] {
        let mut user = User::new(name);
        user.email = email.map(str::to_owned);
        session.add(user);
    }
    session.commit().await.unwrap();
    (db, session)
}

fn q(session: &mut Session) -> orm::Query<'_, User> {
    session.query::<User>().order_by(User::name)
}

fn names(users: &[Tracked<User>]) -> Vec<String> {
    users.iter().map(|u| u.read().name.clone()).collect()
}

#[tokio::test]
async fn filters_compare_with_bound_values() {
    let (_db, mut session) = seeded().await;
    assert_eq!(
        names(&q(&mut session).filter(User::name.eq("sandy")).all().await.unwrap()),
        ["sandy"]
    );
    assert_eq!(
        names(&q(&mut session).filter(User::name.ne("sandy")).all().await.unwrap()),
        ["gary", "patrick", "squidward"]
    );
    assert_eq!(
        names(&q(&mut session).filter(User::name.lt("patrick")).all().await.unwrap()),
        ["gary"]
    );
    assert_eq!(
        names(&q(&mut session).filter(User::name.le("patrick")).all().await.unwrap()),
        ["gary", "patrick"]
    );
    assert_eq!(
        names(&q(&mut session).filter(User::name.gt("sandy")).all().await.unwrap()),
        ["squidward"]
    );
    assert_eq!(
        names(&q(&mut session).filter(User::name.ge("sandy")).all().await.unwrap()),
        ["sandy", "squidward"]
    );
    assert_eq!(
        names(&q(&mut session).filter(User::email.is_null()).all().await.unwrap()),
        ["gary", "patrick"]
    );
    assert_eq!(
        names(&q(&mut session).filter(User::email.is_not_null()).all().await.unwrap()),
        ["sandy", "squidward"]
    );
    assert_eq!(
        names(
            &q(&mut session)
                .filter(User::email.eq("squid@krusty.com"))
                .all()
                .await
                .unwrap()
        ),
        ["squidward"]
    );
    assert_eq!(
        names(&q(&mut session).filter(User::name.like("s%")).all().await.unwrap()),
        ["sandy", "squidward"]
    );
    assert_eq!(
        names(&q(&mut session).filter(User::name.ilike("G%")).all().await.unwrap()),
        ["gary"]
    );
    assert_eq!(
        names(
            &q(&mut session)
                .filter(User::name.is_in(["gary", "sandy", "nobody"]))
                .all()
                .await
                .unwrap()
        ),
        ["gary", "sandy"]
    );
}

#[tokio::test]
async fn equality_with_none_is_a_null_test() {
    let (_db, mut session) = seeded().await;
    let echo = EchoCapture::start();
    let without = session
        .query::<User>()
        .filter(User::email.eq(None::<String>))
        .order_by(User::name)
        .all()
        .await
        .unwrap();
    assert_eq!(names(&without), ["gary", "patrick"]);
    let with = session
        .query::<User>()
        .filter(User::email.ne(None::<String>))
        .order_by(User::name)
        .all()
        .await
        .unwrap();
    assert_eq!(names(&with), ["sandy", "squidward"]);
    let statements = echo.take();
    assert!(
        statements.iter().any(|s| s.contains(r#""users"."email" IS NULL"#)),
        "{statements:?}"
    );
    assert!(
        statements.iter().any(|s| s.contains(r#""users"."email" IS NOT NULL"#)),
        "{statements:?}"
    );
    // A value that may or may not be there, in one expression.
    for (maybe, expected) in [(Some("sandy@reef.org"), vec!["sandy"]), (None, vec!["gary", "patrick"])] {
        let found = session
            .query::<User>()
            .filter(User::email.eq(maybe.map(str::to_owned)))
            .order_by(User::name)
            .all()
            .await
            .unwrap();
        assert_eq!(names(&found), expected);
    }
    // Ordering against NULL matches nothing, as in SQL.
    assert_eq!(
        session
            .query::<User>()
            .filter(User::email.gt(None::<String>))
            .count()
            .await
            .unwrap(),
        0
    );
}

#[tokio::test]
async fn conditions_combine_with_and_or_not() {
    let (_db, mut session) = seeded().await;
    let both = session
        .query::<User>()
        .filter(User::name.like("s%") & User::email.like("%krusty%"))
        .all()
        .await
        .unwrap();
    assert_eq!(names(&both), ["squidward"]);
    let either = session
        .query::<User>()
        .filter(User::name.eq("gary").or(User::name.eq("patrick")))
        .order_by(User::name.desc())
        .all()
        .await
        .unwrap();
    assert_eq!(names(&either), ["patrick", "gary"]);
    let negated = session
        .query::<User>()
        .filter(!(User::name.eq("gary") | User::name.eq("patrick")))
        .order_by(User::name)
        .all()
        .await
        .unwrap();
    assert_eq!(names(&negated), ["sandy", "squidward"]);
    // Two filter() calls are joined with AND.
    let chained = session
        .query::<User>()
        .filter(User::email.is_null())
        .filter(User::name.ne("gary"))
        .all()
        .await
        .unwrap();
    assert_eq!(names(&chained), ["patrick"]);
}

#[tokio::test]
async fn order_limit_offset() {
    let (_db, mut session) = seeded().await;
    let page = session
        .query::<User>()
        .order_by(User::name.asc())
        .limit(2)
        .offset(1)
        .all()
        .await
        .unwrap();
    assert_eq!(names(&page), ["patrick", "sandy"]);
    let by_id_desc = session
        .query::<User>()
        .order_by(User::id.desc())
        .first()
        .await
        .unwrap()
        .unwrap();
    assert_eq!(by_id_desc.read().name, "gary");
    let ordered_twice = session
        .query::<User>()
        .order_by(User::email.desc())
        .order_by(User::name)
        .all()
        .await
        .unwrap();
    // NULLs sort first in descending order; ties broken by name.
    assert_eq!(names(&ordered_twice), ["gary", "patrick", "squidward", "sandy"]);
}

#[tokio::test]
async fn one_first_one_or_none_and_count() {
    let (_db, mut session) = seeded().await;
    let sandy = session
        .query::<User>()
        .filter(User::name.eq("sandy"))
        .one()
        .await
        .unwrap();
    assert_eq!(sandy.read().email.as_deref(), Some("sandy@reef.org"));

    let missing = session
        .query::<User>()
        .filter(User::name.eq("plankton"))
        .one()
        .await
        .unwrap_err();
    assert!(missing.is_not_found(), "{missing:?}");
    assert!(matches!(missing, Error::NotFound { ref table } if table == "users"));

    let several = session
        .query::<User>()
        .filter(User::email.is_null())
        .one()
        .await
        .unwrap_err();
    assert!(
        matches!(several, Error::MultipleRowsFound { ref table } if table == "users"),
        "{several:?}"
    );
    assert!(matches!(
        session.query::<User>().one_or_none().await,
        Err(Error::MultipleRowsFound { .. })
    ));
    assert!(session
        .query::<User>()
        .filter(User::name.eq("plankton"))
        .one_or_none()
        .await
        .unwrap()
        .is_none());
    assert!(session
        .query::<User>()
        .filter(User::name.eq("plankton"))
        .first()
        .await
        .unwrap()
        .is_none());

    assert_eq!(session.query::<User>().count().await.unwrap(), 4);
    assert_eq!(
        session
            .query::<User>()
            .filter(User::email.is_null())
            .count()
            .await
            .unwrap(),
        2
    );
    assert_eq!(session.query::<User>().limit(3).offset(2).count().await.unwrap(), 2);
    assert_eq!(session.query::<User>().limit(1).count().await.unwrap(), 1);
    // A query that found nothing leaves the transaction usable.
    assert_eq!(session.query::<User>().count().await.unwrap(), 4);
}

#[tokio::test]
async fn values_are_bound_never_spliced() {
    let (db, mut session) = seeded().await;
    let hostile = "x'; DROP TABLE users; --";
    let echo = EchoCapture::start();
    let found = session
        .query::<User>()
        .filter(User::name.eq(hostile))
        .all()
        .await
        .unwrap();
    assert!(found.is_empty());
    let statements = echo.take();
    assert!(statements.iter().all(|s| !s.contains("DROP")), "{statements:?}");
    assert!(
        statements.iter().any(|s| s.contains(r#""users"."name" = $1"#)),
        "{statements:?}"
    );

    session.add(User::new(hostile));
    session.commit().await.unwrap();
    assert_eq!(db.scalar("SELECT count(*) FROM users").await, 5);
    let stored = session
        .query::<User>()
        .filter(User::name.eq(hostile))
        .one()
        .await
        .unwrap();
    assert_eq!(stored.read().name, hostile);
}

#[tokio::test]
async fn echo_logs_statement_parameter_count_and_duration() {
    let (_db, mut session) = seeded().await;
    let echo = EchoCapture::start();
    session
        .query::<User>()
        .filter(User::name.eq("sandy"))
        .limit(5)
        .all()
        .await
        .unwrap();
    let select = echo.take_starting_with("SELECT");
    assert_eq!(select.params, Some(2));
    assert!(select.elapsed_us.is_some());
    assert_eq!(select.error, None);

    // A statement that fails is echoed too, with its error.
    let echo = EchoCapture::start();
    let error = session
        .raw_query("SELECT 1 / $1::int", &[&0i32])
        .await
        .expect_err("division by zero");
    let failed = echo.take_starting_with("SELECT 1 /");
    assert_eq!(failed.params, Some(1));
    assert!(failed.elapsed_us.is_some());
    let logged = failed.error.as_deref().expect("its error was logged");
    assert!(logged.contains("division by zero"), "{logged}");
    assert!(error.to_string().contains("division by zero"), "{error}");
}

#[tokio::test]
async fn queries_of_related_tables() {
    let (_db, mut session) = seeded().await;
    let sandy = session
        .query::<User>()
        .filter(User::name.eq("sandy"))
        .one()
        .await
        .unwrap();
    let sandy_id = sandy.read().id;
    session.add_all((1..=3).map(|i| Post {
        id: 0,
        user_id: sandy_id,
        title: format!("post {i}"),
        score: f64::from(i) * 1.5,
    }));
    let posts = session
        .query::<Post>()
        .filter(Post::user_id.eq(sandy_id) & Post::score.gt(2.0))
        .order_by(Post::score.desc())
        .all()
        .await
        .unwrap();
    let titles: Vec<String> = posts.iter().map(|p| p.read().title.clone()).collect();
    assert_eq!(titles, ["post 3", "post 2"]);
}

#[tokio::test]
async fn a_limit_or_offset_beyond_bigint_is_an_error_naming_it() {
    let (_db, mut session) = seeded().await;
    match session.query::<User>().limit(u64::MAX).all().await {
        Err(Error::InvalidState(message)) => assert!(message.contains("limit"), "{message}"),
        other => panic!("expected an error naming the limit, got {other:?}"),
    }
    match session.query::<User>().offset(u64::MAX).first().await {
        Err(Error::InvalidState(message)) => assert!(message.contains("offset"), "{message}"),
        other => panic!("expected an error naming the offset, got {other:?}"),
    }
    // Nothing reached the server: the session is still usable.
    assert_eq!(session.query::<User>().limit(i64::MAX as u64).count().await.unwrap(), 4);
}

/// A connection keeps the statement it prepared for each cached text, by
/// the text's number in the engine's cache: statements of many shapes,
/// interleaved on one connection, each get their own rows, and running them
/// again prepares nothing more on the server.
#[tokio::test]
async fn a_connection_prepares_each_shape_once_and_never_mixes_them_up() {
    prepares_each_shape_once(None).await;
}

/// Shapes beyond the engine's `query_cache_size` are rendered each time and
/// prepared through the driver's statement cache: still once per
/// connection, still each with its own rows.
#[tokio::test]
async fn shapes_beyond_the_query_cache_are_still_prepared_once_per_connection() {
    // Two: the flush's INSERT and the first select take them.
    prepares_each_shape_once(Some(2)).await;
    prepares_each_shape_once(Some(0)).await;
}

async fn prepares_each_shape_once(query_cache_size: Option<usize>) {
    let db = crate::common::test_db_with(|builder| match query_cache_size {
        Some(shapes) => builder.pool_size(1).query_cache_size(shapes),
        None => builder.pool_size(1),
    })
    .await;
    crate::models::TestBase::create_all(&db.engine).await.unwrap();
    let mut session = sessionmaker(&db.engine).autocommit(true).session();
    session.add_all(["sandy", "patrick", "squidward", "gary"].map(User::new));
    session.flush().await.unwrap();

    async fn run_shape(session: &mut Session, shape: usize) -> Vec<String> {
        let query = session.query::<User>();
        let users = match shape {
            0 => query.order_by(User::name).all().await,
            1 => query.filter(User::name.eq("gary")).all().await,
            2 => query.filter(User::name.ne("gary")).order_by(User::name).all().await,
            3 => query.order_by(User::name).limit(2).all().await,
            4 => query.order_by(User::name).offset(3).all().await,
            _ => {
                query
                    .filter(User::email.is_null())
                    .order_by(User::name.desc())
                    .all()
                    .await
            }
        };
        names(&users.unwrap())
    }
    let expected = |shape: usize| -> Vec<&str> {
        match shape {
            0 => vec!["gary", "patrick", "sandy", "squidward"],
            1 => vec!["gary"],
            2 => vec!["patrick", "sandy", "squidward"],
            3 => vec!["gary", "patrick"],
            4 => vec!["squidward"],
            _ => vec!["squidward", "sandy", "patrick", "gary"],
        }
    };
    // The names of the selects of users the connection keeps prepared, one
    // per distinct text (a statement prepared again gets a new name).
    async fn selects_prepared(session: &mut Session) -> Vec<String> {
        let rows = session
            .raw_query(
                "SELECT name, count(*) OVER (PARTITION BY statement) FROM pg_prepared_statements \
                 WHERE statement LIKE 'SELECT %FROM \"users\"%' AND statement NOT LIKE '%pg_prepared%' \
                 ORDER BY name",
                &[],
            )
            .await
            .unwrap();
        assert!(
            rows.iter().all(|row| row.get::<_, i64>(1) == 1),
            "a text prepared twice"
        );
        rows.iter().map(|row| row.get(0)).collect()
    }
    for shape in 0..6 {
        assert_eq!(run_shape(&mut session, shape).await, expected(shape), "shape {shape}");
    }
    let prepared = selects_prepared(&mut session).await;
    assert_eq!(prepared.len(), 6);
    // Again, in another order: the same statements, nothing prepared anew.
    for shape in [5, 3, 1, 0, 4, 2, 2, 5] {
        assert_eq!(run_shape(&mut session, shape).await, expected(shape), "shape {shape}");
    }
    assert_eq!(selects_prepared(&mut session).await, prepared);
    let kept = query_cache_size.unwrap_or(usize::MAX);
    assert_eq!(db.engine.sql_cache().len(), kept.min(7), "the INSERT and six selects");
}

#[tokio::test]
async fn each_shape_of_statement_is_rendered_once_per_engine() {
    let (db, mut session) = seeded().await;
    async fn by_name(session: &mut Session, name: &str) -> String {
        let user = session
            .query::<User>()
            .filter(User::name.eq(name))
            .limit(1)
            .one()
            .await
            .unwrap();
        let name = user.read().name.clone();
        name
    }
    assert_eq!(by_name(&mut session, "sandy").await, "sandy");
    let shapes = db.engine.sql_cache().len();
    // Same shape, other values: the cached text, the new values.
    assert_eq!(by_name(&mut session, "gary").await, "gary");
    let mut other = sessionmaker(&db.engine).session();
    assert_eq!(by_name(&mut other, "patrick").await, "patrick");
    assert_eq!(db.engine.sql_cache().len(), shapes);

    // A new shape is a new entry; so are flush statements, once each.
    session
        .query::<User>()
        .filter(User::email.is_null())
        .count()
        .await
        .unwrap();
    assert_eq!(db.engine.sql_cache().len(), shapes + 1);
    for round in 0..2 {
        let user = session
            .query::<User>()
            .filter(User::name.eq("gary"))
            .one()
            .await
            .unwrap();
        user.write().email = Some(format!("gary{round}@shell.org"));
        session.commit().await.unwrap();
    }
    let stored = session
        .raw_query("SELECT email FROM users WHERE name = 'gary'", &[])
        .await
        .unwrap();
    assert_eq!(
        stored[0].get::<_, Option<String>>(0).as_deref(),
        Some("gary1@shell.org")
    );
    // One UPDATE shape for both rounds; the select has by_name's shape (a bound limit).
    assert_eq!(db.engine.sql_cache().len(), shapes + 2);
}
