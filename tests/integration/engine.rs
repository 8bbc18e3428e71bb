use std::time::Duration;

use orm::prelude::*;

#[test]
fn urls_in_every_accepted_form_build_engines() {
    for url in [
        "postgresql://postgres@127.0.0.1:5432/postgres",
        "postgres://postgres@127.0.0.1/postgres",
        "postgresql+psycopg2://user:p%40ss@db.internal:6543/app?sslmode=disable&application_name=web",
        "postgresql+asyncpg://user@%2Fvar%2Frun%2Fpostgresql/app",
        "postgresql://user@[::1]:5432/app?connect_timeout=3&options=-c%20search_path%3Dpublic",
    ] {
        create_engine(url).unwrap_or_else(|e| panic!("{url}: {e}"));
    }
}

#[test]
fn bad_urls_are_typed_errors_naming_the_part() {
    let part = |url: &str| match create_engine(url) {
        Err(Error::InvalidUrl { part, .. }) => part,
        other => panic!("{url}: expected InvalidUrl, got {other:?}"),
    };
    assert_eq!(part("not a url"), "scheme");
    assert_eq!(part("postgresql://h:port/db"), "port");
    assert_eq!(
        part("postgresql://h/db?connect_timeout=-1"),
        "query option \"connect_timeout\""
    );
    assert_eq!(part("postgresql://h/db?nonsense=1"), "query option \"nonsense\"");
    assert!(matches!(
        create_engine("mysql://root@localhost/db"),
        Err(Error::UnsupportedScheme { scheme }) if scheme == "mysql"
    ));
    assert!(matches!(
        create_engine("sqlite:///tmp/x.db"),
        Err(Error::UnsupportedScheme { .. })
    ));
}

#[test]
fn bad_options_are_typed_errors_naming_the_option() {
    let url = "postgresql://postgres@127.0.0.1/postgres";
    let option = |builder: orm::EngineBuilder| match builder.build() {
        Err(Error::InvalidOption { option, .. }) => option,
        other => panic!("expected InvalidOption, got {other:?}"),
    };
    assert_eq!(option(Engine::builder(url).pool_size(0)), "pool_size");
    assert_eq!(
        option(Engine::builder(url).pool_timeout(Duration::ZERO)),
        "pool_timeout"
    );
    assert_eq!(
        option(Engine::builder(url).connect_timeout(Duration::ZERO)),
        "connect_timeout"
    );
    assert_eq!(
        option(Engine::builder(url).statement_timeout(Duration::ZERO)),
        "statement_timeout"
    );
    assert_eq!(
        option(Engine::builder(url).query_cache_size(65_537)),
        "query_cache_size"
    );
    assert!(Engine::builder(url).query_cache_size(65_536).build().is_ok());
    assert!(Engine::builder(url).query_cache_size(0).build().is_ok());
}

#[tokio::test]
async fn the_password_never_shows() {
    let engine = create_engine("postgresql://sandy:s3cr%21t@127.0.0.1:1/postgres").unwrap();
    let debug = format!("{engine:?}");
    assert!(!debug.contains("s3cr") && debug.contains("***"), "{debug}");
    let builder = Engine::builder("postgresql://sandy:s3cr%21t@127.0.0.1:1/postgres");
    assert!(!format!("{builder:?}").contains("s3cr"));
    let error = engine.connect().await.unwrap_err();
    assert!(!error.to_string().contains("s3cr"), "{error}");
    assert!(!format!("{error:?}").contains("s3cr"), "{error:?}");
}

#[tokio::test]
async fn engines_connect_lazily_and_unreachable_servers_are_typed() {
    // Nothing listens on port 1: building succeeds, connecting fails.
    let engine = Engine::builder("postgresql://postgres@127.0.0.1:1/postgres")
        .connect_timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    assert_eq!(engine.pool_status().size, 0);
    let error = engine.connect().await.unwrap_err();
    assert!(matches!(error, Error::ServerUnreachable { .. }), "{error:?}");
}

#[tokio::test]
async fn missing_database_and_unknown_role_are_typed() {
    let server = crate::common::server().await;
    let url = orm::DatabaseUrl::parse(server.url()).unwrap();

    let missing = create_engine(&url.with_database("orm_no_such_database").unmasked()).unwrap();
    let error = missing.connect().await.unwrap_err();
    assert!(
        matches!(&error, Error::DatabaseNotFound { message, .. } if message.contains("orm_no_such_database")),
        "{error:?}"
    );

    let mut stranger = url.clone();
    stranger.user = Some("orm_no_such_role".into());
    let error = create_engine(&stranger.unmasked())
        .unwrap()
        .connect()
        .await
        .unwrap_err();
    assert!(
        matches!(&error, Error::AuthenticationFailed { message, .. } if message.contains("orm_no_such_role")),
        "{error:?}"
    );
}

#[tokio::test]
async fn connections_run_plain_sql_with_bound_parameters() {
    let db = crate::common::test_db().await;
    let conn = db.engine.connect().await.unwrap();
    conn.raw_batch("CREATE TABLE notes (id int PRIMARY KEY, body text)")
        .await
        .unwrap();
    let inserted = conn
        .raw_execute(
            "INSERT INTO notes VALUES ($1, $2), ($3, $4)",
            &[&1i32, &"one", &2i32, &"it's two"],
        )
        .await
        .unwrap();
    assert_eq!(inserted, 2);
    let rows = conn
        .raw_query("SELECT body FROM notes WHERE id > $1 ORDER BY id", &[&1i32])
        .await
        .unwrap();
    let bodies: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(bodies, ["it's two"]);
    assert!(!conn.client().is_closed());
}

#[tokio::test]
async fn pool_size_and_timeout_are_honoured() {
    let db = crate::common::test_db_with(|b| b.pool_size(1).pool_timeout(Duration::from_millis(200))).await;
    let held = db.engine.connect().await.unwrap();
    let started = std::time::Instant::now();
    let error = db.engine.connect().await.unwrap_err();
    assert!(matches!(error, Error::PoolTimeout { .. }), "{error:?}");
    assert!(started.elapsed() >= Duration::from_millis(150));
    assert_eq!(db.engine.pool_status().max_size, 1);
    drop(held);
    db.engine.connect().await.unwrap();
}

/// Ends the server process `pid` from another engine, and returns once the
/// server no longer lists it and the connection's task has had time to read
/// the server's goodbye.
async fn end_backend(db: &crate::common::TestDb, pid: i32) {
    let admin = Engine::builder(db.database.url()).build().unwrap();
    let admin = admin.connect().await.unwrap();
    admin
        .raw_query("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap();
    let gone = "SELECT count(*) FROM pg_stat_activity WHERE pid = $1";
    while admin.raw_query(gone, &[&pid]).await.unwrap()[0].get::<_, i64>(0) > 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
}

#[tokio::test]
async fn a_pooled_connection_that_died_while_idle_is_replaced_at_checkout() {
    let db = crate::common::test_db_with(|b| b.pool_size(1)).await;
    let backend_pid = |conn: orm::Connection| async move {
        let rows = conn.raw_query("SELECT pg_backend_pid()", &[]).await.unwrap();
        rows[0].get::<_, i32>(0)
    };
    let pid = backend_pid(db.engine.connect().await.unwrap()).await;

    // This engine's only connection sits in its pool.
    end_backend(&db, pid).await;

    let new_pid = backend_pid(db.engine.connect().await.unwrap()).await;
    assert_ne!(new_pid, pid, "the dead connection was handed out again");
    assert_eq!(db.engine.pool_status().size, 1, "it was replaced, not added to");
}

#[tokio::test]
async fn statement_timeout_and_application_name_reach_the_server() {
    let db = crate::common::test_db_with(|b| {
        b.statement_timeout(Duration::from_millis(150))
            .application_name("orm-tests")
    })
    .await;
    let conn = db.engine.connect().await.unwrap();
    let rows = conn
        .raw_query(
            "SELECT current_setting('statement_timeout'), current_setting('application_name')",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows[0].get::<_, String>(0), "150ms");
    assert_eq!(rows[0].get::<_, String>(1), "orm-tests");
    match conn.raw_batch("SELECT pg_sleep(2)").await.unwrap_err() {
        Error::Database { code, .. } => assert_eq!(code.as_deref(), Some("57014")),
        other => panic!("expected query_canceled, got {other:?}"),
    }
}

#[tokio::test]
async fn url_query_options_reach_the_server() {
    let server = crate::common::server().await;
    let db = crate::common::test_db().await;
    let _ = server;
    let url = format!("{}?application_name=from-url&options=-c%20work_mem%3D7MB", db.url());
    let engine = create_engine(&url).unwrap();
    let conn = engine.connect().await.unwrap();
    let rows = conn
        .raw_query(
            "SELECT current_setting('application_name'), current_setting('work_mem')",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows[0].get::<_, String>(0), "from-url");
    assert_eq!(rows[0].get::<_, String>(1), "7MB");
}

#[tokio::test]
async fn a_server_that_never_answers_is_a_connect_timeout() {
    // Accepts TCP connections and then says nothing.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let engine = Engine::builder(format!("postgresql://postgres@127.0.0.1:{port}/postgres"))
        .connect_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    match engine.connect().await.unwrap_err() {
        Error::ConnectTimeout { waited } => assert_eq!(waited, Duration::from_millis(300)),
        other => panic!("expected a connect timeout, got {other:?}"),
    }
    silent.abort();
}

#[tokio::test]
async fn a_server_asking_for_a_password_none_was_given_for_is_an_authentication_failure() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // A stand-in server: reads the startup message, asks for a cleartext
    // password, then waits.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut socket, _)) = listener.accept().await {
            let mut length = [0u8; 4];
            if socket.read_exact(&mut length).await.is_err() {
                continue;
            }
            let mut startup = vec![0u8; (u32::from_be_bytes(length) as usize).saturating_sub(4)];
            if socket.read_exact(&mut startup).await.is_err() {
                continue;
            }
            let _ = socket.write_all(&[b'R', 0, 0, 0, 8, 0, 0, 0, 3]).await;
            held.push(socket);
        }
    });
    let engine = Engine::builder(format!("postgresql://sandy@127.0.0.1:{port}/postgres"))
        .connect_timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    match engine.connect().await.unwrap_err() {
        Error::AuthenticationFailed { message, .. } => assert!(message.contains("password"), "{message}"),
        other => panic!("expected an authentication failure, got {other:?}"),
    }
    server.abort();
}

/// The server process behind the connection a session reads through.
async fn session_backend_pid(session: &mut Session) -> i32 {
    session.raw_query("SELECT pg_backend_pid()", &[]).await.unwrap()[0].get(0)
}

#[tokio::test]
async fn a_connection_kept_at_hand_counts_as_available_and_serves_the_next_checkout() {
    let db = crate::common::test_db_with(|b| b.pool_size(2)).await;
    let readers = sessionmaker(&db.engine).autocommit(true);
    let mut first = readers.session();
    let pid = session_backend_pid(&mut first).await;
    let status = db.engine.pool_status();
    assert_eq!(
        (status.size, status.available),
        (1, 1),
        "given back, and counted as free"
    );

    let mut second = readers.session();
    assert_eq!(session_backend_pid(&mut second).await, pid);
    assert_eq!(session_backend_pid(&mut first).await, pid);
    assert_eq!(db.engine.pool_status().size, 1, "no second connection was opened");
}

#[tokio::test]
async fn a_connection_given_back_while_a_checkout_waits_goes_to_the_waiter() {
    let db = crate::common::test_db_with(|b| b.pool_size(1).pool_timeout(Duration::from_secs(5))).await;
    let mut holder = sessionmaker(&db.engine).session();
    let pid = session_backend_pid(&mut holder).await; // inside its transaction: held

    let readers = sessionmaker(&db.engine).autocommit(true);
    let waiter = tokio::spawn(async move {
        let mut session = readers.session();
        session
            .raw_query("SELECT pg_backend_pid()", &[])
            .await
            .map(|rows| rows[0].get::<_, i32>(0))
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!waiter.is_finished(), "the pool's one connection is held");

    // Kept at hand instead, the connection would leave the waiter to time out.
    holder.commit().await.unwrap();
    let waited = waiter.await.unwrap();
    assert_eq!(waited.unwrap(), pid);
    let status = db.engine.pool_status();
    assert_eq!((status.size, status.available), (1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_sharing_one_connection_all_get_their_turn() {
    let db = crate::common::test_db_with(|b| b.pool_size(1).pool_timeout(Duration::from_secs(10))).await;
    let readers = sessionmaker(&db.engine).autocommit(true);
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let readers = readers.clone();
            tokio::spawn(async move {
                let mut session = readers.session();
                for _ in 0..200 {
                    session.raw_query("SELECT 1", &[]).await?;
                }
                Ok::<_, Error>(())
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    let status = db.engine.pool_status();
    assert_eq!((status.size, status.available), (1, 1));
}

#[tokio::test]
async fn a_connection_at_hand_that_died_is_replaced_at_checkout() {
    let db = crate::common::test_db_with(|b| b.pool_size(1)).await;
    let readers = sessionmaker(&db.engine).autocommit(true);
    let pid = session_backend_pid(&mut readers.session()).await;

    // This engine's only connection is at hand, outside its pool.
    end_backend(&db, pid).await;

    let new_pid = session_backend_pid(&mut readers.session()).await;
    assert_ne!(new_pid, pid, "the dead connection was handed out again");
    assert_eq!(db.engine.pool_status().size, 1, "it was replaced, not added to");
}
